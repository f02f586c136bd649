//! Slot inversion (`fusion_slot.slot_module.*`, SPEC section 2): multi-head slot attention
//! with a GRU update and the coupling function, optionally wrapped by the adaptive keep-slot
//! predictor (`fusion_slot.slot_module.slot_attn.*` + `pred_keep_slot`).

use std::sync::Mutex;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::layers::{LayerNorm, Linear};

/// Reference hyper-parameters of `MultiHeadSlotAttention` (not stored in checkpoints).
pub const SLOT_HEADS: usize = 12;
pub const SLOT_ITERS: usize = 3;
pub const SLOT_EPS: f64 = 1e-8;

/// The reference's `nn.Linear` init in `SlotFusion`: normal(0, 0.02), zero bias.
fn slot_linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let b = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// `torch.nn.GRUCell`, gates in torch's order (r, z, n) along the rows of `weight_ih`/`weight_hh`.
#[derive(Debug, Clone)]
pub struct GruCell {
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor,
    bias_hh: Tensor,
    dim: usize,
}

impl GruCell {
    pub fn new(vb: VarBuilder, input: usize, hidden: usize) -> Result<Self> {
        let k = 1.0 / (hidden as f64).sqrt();
        let init = Init::Uniform { lo: -k, up: k };
        Ok(Self {
            weight_ih: vb.get_with_hints((3 * hidden, input), "weight_ih", init)?,
            weight_hh: vb.get_with_hints((3 * hidden, hidden), "weight_hh", init)?,
            bias_ih: vb.get_with_hints(3 * hidden, "bias_ih", init)?,
            bias_hh: vb.get_with_hints(3 * hidden, "bias_hh", init)?,
            dim: hidden,
        })
    }

    /// `x` (N,input), `h` (N,hidden) → the next hidden state (N,hidden).
    pub fn forward(&self, x: &Tensor, h: &Tensor) -> Result<Tensor> {
        let d = self.dim;
        let gi = x
            .matmul(&self.weight_ih.t()?)?
            .broadcast_add(&self.bias_ih)?;
        let gh = h
            .matmul(&self.weight_hh.t()?)?
            .broadcast_add(&self.bias_hh)?;
        let gate = |t: &Tensor, i: usize| t.narrow(1, i * d, d);
        let r = candle_nn::ops::sigmoid(&(gate(&gi, 0)? + gate(&gh, 0)?)?)?;
        let z = candle_nn::ops::sigmoid(&(gate(&gi, 1)? + gate(&gh, 1)?)?)?;
        let n = (gate(&gi, 2)? + (r * gate(&gh, 2)?)?)?.tanh()?;
        // (1 − z)·n + z·h
        (z.affine(-1.0, 1.0)? * n)? + (z * h)?
    }
}

/// The coupling function CF(s) = trans(sigmoid(sig(s)) · s): each slot becomes a learned
/// mixture of all slots (`sig`: D→S, so the weights are (B,S,S)).
#[derive(Debug, Clone)]
pub struct CouplingFunction {
    trans: Linear,
    sig: Linear,
}

impl CouplingFunction {
    pub fn new(vb: VarBuilder, num_slots: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            trans: slot_linear(dim, dim, true, vb.pp("trans"))?,
            // `sig` is nn.Sequential(Linear, Sigmoid): the Linear is item 0.
            sig: slot_linear(dim, num_slots, true, vb.pp("sig.0"))?,
        })
    }
}

impl Module for CouplingFunction {
    fn forward(&self, slots: &Tensor) -> Result<Tensor> {
        let weights = candle_nn::ops::sigmoid(&self.sig.forward(slots)?)?;
        self.trans.forward(&weights.matmul(slots)?)
    }
}

/// `MultiHeadSlotAttention`: tokens (B,N,C) → slots (B,S,D).
#[derive(Debug, Clone)]
pub struct MultiHeadSlotAttention {
    slots: Tensor,
    norm_input: LayerNorm,
    norm_slots: LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    combine_heads: Linear,
    gru: GruCell,
    norm_pre_ff: LayerNorm,
    cf: CouplingFunction,
    num_slots: usize,
    dim: usize,
}

impl MultiHeadSlotAttention {
    pub fn new(vb: VarBuilder, num_slots: usize, input_dim: usize, dim: usize) -> Result<Self> {
        if !dim.is_multiple_of(SLOT_HEADS) {
            candle_core::bail!("slot dim {dim} is not divisible by {SLOT_HEADS} heads");
        }
        // xavier_uniform_ on (1,S,D): fan_in = S·D, fan_out = D.
        let bound = (6.0 / ((num_slots + 1) * dim) as f64).sqrt();
        let slots = vb.get_with_hints(
            (1, num_slots, dim),
            "slots",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        // The reference's LayerNorms use torch's default eps.
        let ln = |name: &str, d: usize| LayerNorm::new(vb.pp(name), d, 1e-5);
        Ok(Self {
            slots,
            norm_input: ln("norm_input", input_dim)?,
            norm_slots: ln("norm_slots", dim)?,
            to_q: slot_linear(dim, dim, true, vb.pp("to_q"))?,
            to_k: slot_linear(input_dim, dim, true, vb.pp("to_k"))?,
            to_v: slot_linear(input_dim, dim, true, vb.pp("to_v"))?,
            combine_heads: slot_linear(dim, dim, true, vb.pp("combine_heads"))?,
            gru: GruCell::new(vb.pp("gru"), dim, dim)?,
            norm_pre_ff: ln("norm_pre_ff", dim)?,
            cf: CouplingFunction::new(vb.pp("cf"), num_slots, dim)?,
            num_slots,
            dim,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        x.reshape((b, n, SLOT_HEADS, d / SLOT_HEADS))?
            .transpose(1, 2)?
            .contiguous()
    }

    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, _n, c) = tokens.dims3()?;
        let expected = self.norm_input.weight.dim(0)?;
        if c != expected {
            candle_core::bail!("slot attention expects {expected}-channel tokens, got {c}");
        }
        let (s, d) = (self.num_slots, self.dim);
        let x = self.norm_input.forward(tokens)?;
        let k = self.split_heads(&self.to_k.forward(&x)?)?;
        let v = self.split_heads(&self.to_v.forward(&x)?)?;
        let kt = k.t()?;
        let scale = (d as f64).powf(-0.5); // the FULL slot dim, not the head dim
        let mut slots = self.slots.broadcast_as((b, s, d))?.contiguous()?;
        for _ in 0..SLOT_ITERS {
            let prev = slots.clone();
            let q = self.split_heads(&self.to_q.forward(&self.norm_slots.forward(&slots)?)?)?;
            let dots = (q.matmul(&kt)? * scale)?; // (B,H,S,N)
                                                  // Each input token distributes itself over the slots ...
            let attn = (candle_nn::ops::softmax(&dots, D::Minus2)? + SLOT_EPS)?;
            // ... then each slot takes a weighted mean of the tokens (F.normalize p=1).
            let l1 = attn
                .sum_keepdim(D::Minus1)?
                .clamp(1e-12f32, f32::INFINITY)?;
            let attn = attn.broadcast_div(&l1)?;
            let updates = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, s, d))?;
            let updates = self.combine_heads.forward(&updates)?;
            slots = self
                .gru
                .forward(&updates.reshape((b * s, d))?, &prev.reshape((b * s, d))?)?
                .reshape((b, s, d))?;
            slots = (&slots + self.cf.forward(&self.norm_pre_ff.forward(&slots)?)?)?;
        }
        Ok(slots)
    }
}

/// How the adaptive keep mask is drawn outside training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepMode {
    /// The reference: hard Gumbel-softmax sampling, also at evaluation (rankings then vary
    /// from run to run).
    #[default]
    Sample,
    /// Deterministic: keep a slot iff its "keep" logit exceeds its "drop" logit.
    Argmax,
}

/// What the slot module produces for a batch of tokens.
#[derive(Debug, Clone)]
pub struct SlotOutput {
    /// (B,S,D)
    pub slots: Tensor,
    /// (B,S,2), adaptive models only.
    pub keep_logits: Option<Tensor>,
    /// (B,S) of {0,1} (with a straight-through gradient in training), adaptive models only.
    pub keep_mask: Option<Tensor>,
}

/// `AdaptiveSlotWrapper`'s `pred_keep_slot` (Linear D→2, no bias) and its hard
/// Gumbel-softmax (temperature 1) with a straight-through gradient.
pub struct KeepSlotPredictor {
    pred_keep_slot: Linear,
    temperature: f64,
    rng: Mutex<StdRng>,
}

impl KeepSlotPredictor {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            pred_keep_slot: slot_linear(dim, 2, false, vb.pp("pred_keep_slot"))?,
            temperature: 1.0,
            rng: Mutex::new(StdRng::from_entropy()),
        })
    }

    /// Gumbel noise −log(−log(u)) shaped as `logits`, u uniform in [0,1), clamped as the
    /// reference.
    fn gumbel_noise(&self, logits: &Tensor) -> Result<Tensor> {
        let n = logits.elem_count();
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let noise: Vec<f32> = (0..n)
            .map(|_| {
                let u: f32 = rng.gen();
                -(-(u.max(1e-20)).ln()).max(1e-20).ln()
            })
            .collect();
        Tensor::from_vec(noise, logits.shape(), logits.device())
    }

    /// (keep logits (B,S,2), keep mask (B,S)).
    pub fn forward(&self, slots: &Tensor, train: bool, mode: KeepMode) -> Result<(Tensor, Tensor)> {
        let logits = self.pred_keep_slot.forward(slots)?;
        let scaled = (&logits / self.temperature)?;
        let decided = if train || mode == KeepMode::Sample {
            (scaled.detach() + self.gumbel_noise(&scaled)?)?
        } else {
            scaled.detach()
        };
        // One-hot of the argmax, column 1 ("keep"); ties go to column 0 as torch's argmax.
        let hard = decided
            .narrow(D::Minus1, 1, 1)?
            .gt(&decided.narrow(D::Minus1, 0, 1)?)?
            .to_dtype(scaled.dtype())?
            .squeeze(D::Minus1)?;
        // Straight-through: the value of the hard choice, the gradient of the soft one.
        let soft = candle_nn::ops::softmax(&scaled, D::Minus1)?
            .narrow(D::Minus1, 1, 1)?
            .squeeze(D::Minus1)?;
        let keep = ((hard + &soft)? - soft.detach())?;
        Ok((logits, keep))
    }
}

/// The slot module of a model under the reference key layout: the slot attention, at
/// `slot_attn.*` with the keep-slot predictor beside it for adaptive models.
pub struct SlotModule {
    pub slot_attn: MultiHeadSlotAttention,
    pub keep: Option<KeepSlotPredictor>,
}

impl SlotModule {
    /// Built from `fusion_slot.slot_module` (pass `vb.pp("fusion_slot.slot_module")`).
    pub fn new(
        vb: VarBuilder,
        num_slots: usize,
        input_dim: usize,
        dim: usize,
        adaptive: bool,
    ) -> Result<Self> {
        if adaptive {
            Ok(Self {
                slot_attn: MultiHeadSlotAttention::new(
                    vb.pp("slot_attn"),
                    num_slots,
                    input_dim,
                    dim,
                )?,
                keep: Some(KeepSlotPredictor::new(vb, dim)?),
            })
        } else {
            Ok(Self {
                slot_attn: MultiHeadSlotAttention::new(vb, num_slots, input_dim, dim)?,
                keep: None,
            })
        }
    }

    pub fn forward(&self, tokens: &Tensor, train: bool, mode: KeepMode) -> Result<SlotOutput> {
        let slots = self.slot_attn.forward(tokens)?;
        let (keep_logits, keep_mask) = match &self.keep {
            Some(k) => {
                let (l, m) = k.forward(&slots, train, mode)?;
                (Some(l), Some(m))
            }
            None => (None, None),
        };
        Ok(SlotOutput {
            slots,
            keep_logits,
            keep_mask,
        })
    }

    /// Reseeds the Gumbel noise of adaptive models (reproducible sampling).
    pub fn seed(&self, seed: u64) {
        if let Some(k) = &self.keep {
            *k.rng.lock().unwrap_or_else(|e| e.into_inner()) = StdRng::seed_from_u64(seed);
        }
    }
}
