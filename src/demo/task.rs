//! The demo's model, encoders frozen, as a training task and an evaluated model: every image's
//! encoder outputs come from the [`FeatureBank`], so a step runs only the slots, the Q-Former
//! and the projections.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;

use super::features::FeatureBank;
use crate::data::Dataset;
use crate::eval::driver::{cirr_val_metrics, EncodedSplit, EvalOptions};
use crate::model::layers::l2_normalize;
use crate::model::{LightInput, LossWeights, Slot4ACir, TrainBatch, VitInput};
use crate::text::{process_caption, Tokenizer};
use crate::train::gradcache::{BatchContrastive, LossOutput};
use crate::train::objective::ModelObjective;
use crate::train::trainer::{TrainTask, Validation};
use crate::weights::ParamStore;
use candle_core::Module;

pub struct BankTask<'a> {
    pub model: &'a Slot4ACir,
    pub store: ParamStore,
    pub bank: &'a FeatureBank,
    pub train: &'a Dataset,
    pub val: &'a Dataset,
    pub weights: LossWeights,
    pub tokenizer: &'a Tokenizer,
    pub device: Device,
}

impl BankTask<'_> {
    fn objective(&self) -> ModelObjective<'_> {
        ModelObjective {
            model: self.model,
            weights: self.weights,
            train: true,
        }
    }
}

impl BatchContrastive for BankTask<'_> {
    type Chunk = TrainBatch;
    fn encode(&self, chunk: &TrainBatch, seed: u64) -> candle_core::Result<Vec<Tensor>> {
        self.objective().encode(chunk, seed)
    }
    fn loss(&self, reps: &[Tensor]) -> candle_core::Result<LossOutput> {
        self.objective().loss(reps)
    }
}

impl TrainTask for BankTask<'_> {
    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn len(&self) -> usize {
        self.train.triplets.len()
    }

    fn chunk(&self, indices: &[usize], rng: &mut StdRng) -> Result<TrainBatch> {
        let ts: Vec<_> = indices.iter().map(|&i| &self.train.triplets[i]).collect();
        let captions: Vec<String> = ts
            .iter()
            .map(|t| process_caption(&t.text.train_caption(rng)))
            .collect();
        let refs = ts.iter().map(|t| t.reference.as_str());
        let targets = ts.iter().map(|t| t.target.as_deref().unwrap_or(""));
        let (ids, mask) = self
            .tokenizer
            .encode_batch_longest(&captions, self.model.cfg.max_txt_len)?;
        Ok(TrainBatch {
            reference: LightInput::Tokens(self.bank.light_of(refs.clone(), &self.device)?),
            reference_vit: VitInput::Features(self.bank.vision_of(refs, &self.device)?),
            target_vit: VitInput::Features(self.bank.vision_of(targets, &self.device)?),
            input_ids: ids.to_device(&self.device)?,
            attention_mask: mask.to_device(&self.device)?,
        })
    }

    fn validate(&self) -> Result<Validation> {
        let split = encode_from_bank(self.model, self.bank, self.val, self.tokenizer, 64)?;
        let m = cirr_val_metrics(&split, self.val, &EvalOptions::default())?;
        Ok(Validation {
            metrics: m.0,
            primary: "arithmetic_mean".into(),
        })
    }
}

/// The gallery vectors of every image of `ds` and the query vector of every triplet, from the
/// bank (the same computation as the evaluation driver's, without the encoders).
pub fn encode_from_bank(
    model: &Slot4ACir,
    bank: &FeatureBank,
    ds: &Dataset,
    tokenizer: &Tokenizer,
    batch: usize,
) -> Result<EncodedSplit> {
    let device = model.query_tokens.device().clone();
    let mut vectors = Vec::new();
    for chunk in ds.gallery.chunks(batch) {
        let f = bank.vision_of(chunk.iter().map(|g| g.name.as_str()), &device)?;
        let v = model.gallery_feats_from_embeds(&model.ln_vision.forward(&f)?)?;
        // Detached: a stored output would otherwise keep its whole autograd graph alive.
        vectors.push(v.detach().to_device(&Device::Cpu)?);
    }
    let mut queries = Vec::new();
    for chunk in ds.triplets.chunks(batch) {
        let tokens = bank.light_of(chunk.iter().map(|t| t.reference.as_str()), &device)?;
        let texts: Vec<String> = chunk
            .iter()
            .map(|t| process_caption(&t.text.eval_caption()))
            .collect();
        let (ids, mask) = tokenizer.encode_batch_longest(&texts, model.cfg.max_txt_len)?;
        let q = model.query_feats(
            &tokens,
            &ids.to_device(&device)?,
            &mask.to_device(&device)?,
            false,
        )?;
        queries.push(q.detach().to_device(&Device::Cpu)?);
    }
    Ok(EncodedSplit {
        gallery: (0..ds.gallery.len()).collect(),
        vectors: Tensor::cat(&vectors, 0)?,
        queries: (0..ds.triplets.len()).collect(),
        query_vectors: Tensor::cat(&queries, 0)?,
    })
}

/// The image-only baseline: every image as one vector, the mean of its frozen gallery-encoder
/// tokens, normalized; a query is its reference image's vector (the text is ignored).
pub fn image_only_split(bank: &FeatureBank, ds: &Dataset) -> Result<EncodedSplit> {
    let pooled = |names: Vec<&str>| -> Result<Tensor> {
        let f = bank.vision_of(names, &Device::Cpu)?.to_dtype(DType::F32)?;
        Ok(l2_normalize(&f.mean(1)?)?)
    };
    let gallery = pooled(ds.gallery.iter().map(|g| g.name.as_str()).collect())?;
    let queries = pooled(ds.triplets.iter().map(|t| t.reference.as_str()).collect())?;
    Ok(EncodedSplit {
        gallery: (0..ds.gallery.len()).collect(),
        vectors: gallery.unsqueeze(1)?,
        queries: (0..ds.triplets.len()).collect(),
        query_vectors: queries,
    })
}
