//! Gradient accumulation for batch-contrastive losses ("GradCache", Gao et al. 2021).
//!
//! ITC and RTC compare every query of a batch with every gallery vector of the batch, so
//! summing the gradients of micro-batch losses would change the objective. Instead:
//! 1. encode every micro-batch into its per-example representations (query vector, gallery
//!    vectors, ...) and keep them detached;
//! 2. compute the full-batch loss on those representations and its gradient with respect to
//!    them (and to the parameters the loss itself uses, such as the temperature);
//! 3. encode each micro-batch again, this time keeping the graph, and backpropagate
//!    `sum(rep · d loss / d rep)` — the micro-batch's exact share of the full-batch gradient.
//!
//! The parameter gradients are those of the full batch, at the price of a second forward
//! pass. What cannot be exact is BatchNorm in training mode, which normalizes each
//! micro-batch with its own statistics (as any accumulation does); the running statistics
//! are restored after the first pass so they are updated once per micro-batch, not twice.
//! Randomness inside the encoder must be replayed: `encode` receives a seed per micro-batch
//! and must derive all of its noise from it.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Result, Tensor, TensorId, Var};

use crate::weights::{ParamStore, Role};

/// A model whose losses are functions of per-example representations.
pub trait BatchContrastive {
    type Chunk;
    /// Representations of a micro-batch: each tensor has the examples along dim 0.
    fn encode(&self, chunk: &Self::Chunk, seed: u64) -> Result<Vec<Tensor>>;
    /// The losses of a whole batch from its representations: the total (a scalar) and named
    /// components for logging.
    fn loss(&self, reps: &[Tensor]) -> Result<LossOutput>;
}

/// The total loss and its named components (all scalars).
pub struct LossOutput {
    pub total: Tensor,
    pub parts: Vec<(&'static str, Tensor)>,
}

impl LossOutput {
    /// (name, value) of the total (named `total`) and of each component.
    pub fn values(&self) -> Result<Vec<(&'static str, f64)>> {
        let mut out = vec![("total", scalar(&self.total)?)];
        for (n, t) in &self.parts {
            out.push((n, scalar(t)?));
        }
        Ok(out)
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f64>()
}

/// Gradients of the trainable parameters only (the rest of a `GradStore` is dropped at once,
/// which frees the activations' gradients).
#[derive(Default)]
pub struct ParamGrads(HashMap<TensorId, Tensor>);

impl ParamGrads {
    pub fn from_store(store: &GradStore, vars: &[(String, Var)]) -> Self {
        Self(
            vars.iter()
                .filter_map(|(_, v)| store.get(v.as_tensor()).map(|g| (v.id(), g.clone())))
                .collect(),
        )
    }

    /// Adds `other` into `self`.
    pub fn accumulate(&mut self, other: ParamGrads) -> Result<()> {
        for (id, g) in other.0 {
            let sum = match self.0.remove(&id) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            self.0.insert(id, sum);
        }
        Ok(())
    }

    pub fn get(&self, var: &Var) -> Option<&Tensor> {
        self.0.get(&var.id())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The BatchNorm running statistics of a store, copied (so later in-place updates do not
/// reach the copy).
pub fn snapshot_buffers(store: &ParamStore) -> Result<Vec<(String, Tensor)>> {
    store
        .state_dict()
        .into_keys()
        .filter(|k| store.role(k) == Role::Buffer)
        .filter_map(|k| store.get_registered(&k).map(|t| (k, t)))
        .filter(|(_, t)| t.is_variable())
        .map(|(k, t)| Ok((k, t.copy()?)))
        .collect()
}

pub fn restore_buffers(store: &ParamStore, snapshot: &[(String, Tensor)]) -> Result<()> {
    for (k, t) in snapshot {
        store.set(k, t)?;
    }
    Ok(())
}

/// The loss of a batch given as micro-batches, and the gradients of `vars`, equal to those of
/// the whole batch in one pass (see the module documentation). `seeds[i]` is handed to both
/// encodings of micro-batch `i`. With a single micro-batch it is a plain forward + backward.
pub fn batch_grads<M: BatchContrastive>(
    model: &M,
    chunks: &[M::Chunk],
    seeds: &[u64],
    vars: &[(String, Var)],
    store: &ParamStore,
) -> Result<(Vec<(&'static str, f64)>, ParamGrads)> {
    assert_eq!(chunks.len(), seeds.len(), "one seed per micro-batch");
    if chunks.len() == 1 {
        let reps = model.encode(&chunks[0], seeds[0])?;
        let out = model.loss(&reps)?;
        let grads = ParamGrads::from_store(&out.total.backward()?, vars);
        return Ok((out.values()?, grads));
    }
    // 1. Representations without keeping the graph.
    let snapshot = snapshot_buffers(store)?;
    let mut per_chunk: Vec<Vec<Tensor>> = Vec::with_capacity(chunks.len());
    for (c, &s) in chunks.iter().zip(seeds) {
        per_chunk.push(model.encode(c, s)?.iter().map(|t| t.detach()).collect());
    }
    restore_buffers(store, &snapshot)?;
    let sizes: Vec<usize> = per_chunk
        .iter()
        .map(|r| r[0].dim(0))
        .collect::<Result<_>>()?;
    let n_reps = per_chunk[0].len();
    let rep_vars: Vec<Var> = (0..n_reps)
        .map(|k| {
            let parts: Vec<&Tensor> = per_chunk.iter().map(|r| &r[k]).collect();
            Var::from_tensor(&Tensor::cat(&parts, 0)?)
        })
        .collect::<Result<_>>()?;
    drop(per_chunk);
    // 2. Full-batch loss, its gradient w.r.t. the representations and the loss's own params.
    let reps: Vec<Tensor> = rep_vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = model.loss(&reps)?;
    let store_grads = out.total.backward()?;
    let mut grads = ParamGrads::from_store(&store_grads, vars);
    let rep_grads: Vec<Tensor> = rep_vars
        .iter()
        .map(|v| match store_grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.zeros_like(),
        })
        .collect::<Result<_>>()?;
    drop(store_grads);
    // 3. Per micro-batch: backpropagate its share.
    let mut start = 0;
    for ((c, &s), &n) in chunks.iter().zip(seeds).zip(&sizes) {
        let reps = model.encode(c, s)?;
        let mut surrogate: Option<Tensor> = None;
        for (r, g) in reps.iter().zip(&rep_grads) {
            let term = (r * g.narrow(0, start, n)?)?.sum_all()?;
            surrogate = Some(match surrogate {
                Some(acc) => (acc + term)?,
                None => term,
            });
        }
        if let Some(sur) = surrogate {
            grads.accumulate(ParamGrads::from_store(&sur.backward()?, vars))?;
        }
        start += n;
    }
    Ok((out.values()?, grads))
}
