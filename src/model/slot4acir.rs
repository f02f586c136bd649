//! The whole model (SPEC sections 1-3): gallery vectors from the large model, composed query
//! vectors from the light encoder + slot inversion + text, max-over-32 scores, and the
//! training losses (ITC, RTC, DTA).

use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::backbone::{self, LightEncoder};
use super::layers::{l2_normalize, LayerNorm, Linear};
use super::qformer::{token_at, QFormer};
use super::slots::{KeepMode, SlotModule, SlotOutput};
use super::vision::VisionEncoder;
use crate::config::ModelConfig;
use crate::weights::{self, Mode, ParamStore};

/// How the light feature map (B,C,h,w) becomes tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenLayout {
    /// The reference: the contiguous buffer reinterpreted as (B, h·w, C) — a reshape, not a
    /// transpose. Checkpoints were trained this way.
    #[default]
    Reinterpret,
    /// (B,C,h·w) transposed to (B,h·w,C): one token per position (for new training only).
    ChannelLast,
}

impl TokenLayout {
    /// Feature map (B,C,h,w) → tokens (B,h·w,C).
    pub fn tokens(self, map: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = map.dims4()?;
        match self {
            Self::Reinterpret => map.contiguous()?.reshape((b, h * w, c)),
            Self::ChannelLast => map.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous(),
        }
    }
}

/// Input of the frozen ViT side: pixels, or its outputs computed earlier (a cache).
#[derive(Debug, Clone)]
pub enum VitInput {
    /// (B,3,S,S) normalized pixels.
    Pixels(Tensor),
    /// (B,T,W) ViT outputs *before* `ln_vision` (which is trained, so it is not cached).
    Features(Tensor),
}

/// Input of the light query encoder.
#[derive(Debug, Clone)]
pub enum LightInput {
    /// (B,3,S,S) normalized pixels.
    Pixels(Tensor),
    /// (B,N,C) light tokens computed earlier (no gradient reaches the light encoder).
    Tokens(Tensor),
}

/// One batch of training triplets (reference image i, modification text i, target image i).
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// The reference image for the light encoder.
    pub reference: LightInput,
    /// The reference image for the large model (the RTC teacher); unused without `dta`.
    pub reference_vit: VitInput,
    pub target_vit: VitInput,
    /// (B,L) token ids and (B,L) attention mask of the processed modification texts.
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
}

/// `--loss-setting` and the weights of the total loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    /// `dta` in the loss setting: adds the teacher pass, DTA and RTC.
    pub teacher: bool,
    pub dta: f64,
    pub rtc: f64,
}

impl LossWeights {
    /// The reference CIRR setting: ITC + 0.4·DTA + 0.4·RTC.
    pub fn cirr() -> Self {
        Self {
            teacher: true,
            dta: 0.4,
            rtc: 0.4,
        }
    }

    /// The reference FashionIQ script sums the three unweighted.
    pub fn fashioniq() -> Self {
        Self {
            teacher: true,
            dta: 1.0,
            rtc: 1.0,
        }
    }

    /// `--loss-setting itc`.
    pub fn itc_only() -> Self {
        Self {
            teacher: false,
            dta: 0.0,
            rtc: 0.0,
        }
    }
}

/// Scalar (0-dim) losses of one batch.
#[derive(Debug, Clone)]
pub struct Losses {
    pub itc: Tensor,
    pub rtc: Option<Tensor>,
    pub dta: Option<Tensor>,
    pub total: Tensor,
}

/// See the module documentation. Parameters live under the reference key names.
pub struct Slot4ACir {
    pub cfg: ModelConfig,
    /// Adaptive models: how the keep mask is drawn outside training.
    pub keep_mode: KeepMode,
    pub token_layout: TokenLayout,
    pub visual_encoder: VisionEncoder,
    pub ln_vision: LayerNorm,
    pub qformer: QFormer,
    pub query_tokens: Tensor,
    pub light_encoder: Box<dyn LightEncoder>,
    pub slot_module: SlotModule,
    pub vision_proj: Linear,
    pub text_proj: Linear,
    /// The learned temperature of the contrastive losses (0-dim).
    pub temp: Tensor,
}

fn proj(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let b = vb.get_with_hints(out_dim, "bias", init)?;
    Ok(Linear::new(w, Some(b)))
}

impl Slot4ACir {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let kind = crate::config::LightModelKind::parse(&cfg.light_model)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let light = backbone::build(kind, vb.pp("light_visual_encoder"))?;
        Self::with_light_encoder(cfg, vb, light)
    }

    /// Builds every part but the light encoder, which is given (already built).
    pub fn with_light_encoder(
        cfg: &ModelConfig,
        vb: VarBuilder,
        light_encoder: Box<dyn LightEncoder>,
    ) -> Result<Self> {
        let h = cfg.qformer_hidden;
        let visual_encoder = VisionEncoder::new(cfg, vb.pp("visual_encoder"))?;
        let ln_vision = LayerNorm::new(vb.pp("ln_vision"), cfg.vit_width, 1e-5)?;
        let qformer = QFormer::new(cfg, vb.pp("Qformer.bert"))?;
        let query_tokens = vb.get_with_hints(
            (1, cfg.num_query_token, h),
            "query_tokens",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let slot_module = SlotModule::new(
            vb.pp("fusion_slot.slot_module"),
            cfg.num_slots,
            light_encoder.out_channels(),
            h,
            cfg.use_adapt,
        )?;
        let vision_proj = proj(h, cfg.embed_dim, vb.pp("vision_proj"))?;
        let text_proj = proj(h, cfg.embed_dim, vb.pp("text_proj"))?;
        let temp = vb.get_with_hints((), "temp", Init::Const(0.07))?;
        Ok(Self {
            cfg: cfg.clone(),
            keep_mode: KeepMode::default(),
            token_layout: cfg.token_layout,
            visual_encoder,
            ln_vision,
            qformer,
            query_tokens,
            light_encoder,
            slot_module,
            vision_proj,
            text_proj,
            temp,
        })
    }

    /// The inference model from a weights file: every missing key or shape mismatch is
    /// reported at once, naming the file.
    pub fn load(
        cfg: &ModelConfig,
        weights: &Path,
        device: &Device,
    ) -> anyhow::Result<(Self, ParamStore)> {
        let source = weights::load_state_dict(weights)?;
        let store = ParamStore::new(
            source,
            weights.display().to_string(),
            Mode::Inference,
            false,
        );
        let model = Self::new(cfg, store.var_builder(device));
        store.finish()?;
        let model =
            model.with_context(|| format!("building the model from {}", weights.display()))?;
        Ok((model, store))
    }

    // ---- gallery side ----

    /// The frozen vision encoder's output (B,T,W) before `ln_vision`; never part of the
    /// autograd graph.
    pub fn vit_features(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.visual_encoder.forward(pixels)?.detach())
    }

    /// `ln_vision(ViT(x))`, (B,T,W).
    pub fn vit_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        self.ln_vision.forward(&self.vit_features(pixels)?)
    }

    fn embeds_of(&self, input: &VitInput) -> Result<Tensor> {
        match input {
            VitInput::Pixels(p) => self.vit_embeds(p),
            VitInput::Features(f) => self.ln_vision.forward(&f.detach()),
        }
    }

    fn expanded_query_tokens(&self, b: usize) -> Result<Tensor> {
        let (_, q, h) = self.query_tokens.dims3()?;
        self.query_tokens.broadcast_as((b, q, h))
    }

    fn gallery_feats_t(&self, embeds: &Tensor, train: bool) -> Result<Tensor> {
        let queries = self.expanded_query_tokens(embeds.dim(0)?)?;
        let out = self.qformer.gallery(&queries, embeds, train)?;
        l2_normalize(&self.vision_proj.forward(&out)?)
    }

    /// Normalized gallery vectors (B,Q,E) from `ln_vision` outputs (B,T,W).
    pub fn gallery_feats_from_embeds(&self, embeds: &Tensor) -> Result<Tensor> {
        self.gallery_feats_t(embeds, false)
    }

    /// Normalized gallery vectors (B,Q,E) of images (B,3,S,S).
    pub fn gallery_feats(&self, pixels: &Tensor) -> Result<Tensor> {
        self.gallery_feats_from_embeds(&self.vit_embeds(pixels)?)
    }

    // ---- query side ----

    /// Light feature map (B,C,h,w) → tokens (B,h·w,C) as `token_layout` says.
    pub fn tokens_from_feature_map(&self, map: &Tensor) -> Result<Tensor> {
        self.token_layout.tokens(map)
    }

    /// Light tokens (B,h·w,C) of images (B,3,S,S).
    pub fn light_tokens(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let map = self.light_encoder.extract_features(pixels, train)?;
        self.tokens_from_feature_map(&map)
    }

    /// Slots (and the keep mask of adaptive models) of light tokens.
    pub fn slots(&self, tokens: &Tensor, train: bool) -> Result<SlotOutput> {
        self.slot_module.forward(tokens, train, self.keep_mode)
    }

    /// The text-only pass with a prefix (slots or anchors) and its mask; the output at the
    /// text's `[CLS]` (position P) through `text_proj`, normalized: (B,E).
    fn composed(
        &self,
        prefix: &Tensor,
        prefix_mask: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let p = prefix.dim(1)?;
        let mask = Tensor::cat(&[prefix_mask, &attention_mask.to_dtype(prefix.dtype())?], 1)?;
        let out = self
            .qformer
            .text_with_prefix(prefix, input_ids, &mask, train)?;
        l2_normalize(&self.text_proj.forward(&token_at(&out, p)?)?)
    }

    fn check_text(&self, b: usize, input_ids: &Tensor, attention_mask: &Tensor) -> Result<()> {
        let (bi, l) = input_ids.dims2()?;
        if bi != b || attention_mask.dims() != [bi, l] {
            candle_core::bail!(
                "text ids {:?} / mask {:?} do not match a batch of {b}",
                input_ids.dims(),
                attention_mask.dims()
            );
        }
        Ok(())
    }

    /// Composed query vectors (B,E) from given slots and the texts.
    pub fn query_feats_from_slots(
        &self,
        slots: &SlotOutput,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, s, _) = slots.slots.dims3()?;
        self.check_text(b, input_ids, attention_mask)?;
        let prefix_mask = match &slots.keep_mask {
            Some(m) => m.clone(),
            None => Tensor::ones((b, s), slots.slots.dtype(), slots.slots.device())?,
        };
        self.composed(&slots.slots, &prefix_mask, input_ids, attention_mask, train)
    }

    /// Composed query vectors (B,E) from light tokens and the texts.
    pub fn query_feats(
        &self,
        tokens: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let slots = self.slots(tokens, train)?;
        self.query_feats_from_slots(&slots, input_ids, attention_mask, train)
    }

    /// score(query i, image j) = max over the image's Q vectors of their dot product with the
    /// query: (Bq,E) × (N,Q,E) → (Bq,N).
    pub fn scores(query: &Tensor, gallery: &Tensor) -> Result<Tensor> {
        let (n, q, e) = gallery.dims3()?;
        let bq = query.dim(0)?;
        query
            .matmul(&gallery.reshape((n * q, e))?.t()?)?
            .reshape((bq, n, q))?
            .max(D::Minus1)
    }

    // ---- training ----

    fn light_tokens_of(&self, input: &LightInput, train: bool) -> Result<Tensor> {
        match input {
            LightInput::Pixels(p) => self.light_tokens(p, train),
            LightInput::Tokens(t) => Ok(t.detach()),
        }
    }

    /// Reseeds every random stream of a training-mode forward (Q-Former dropout, Gumbel keep
    /// masks) on this thread, so a forward can be replayed exactly (gradient accumulation,
    /// `--resume`).
    pub fn seed(&self, seed: u64) {
        super::layers::seed_dropout(seed);
        self.slot_module.seed(seed.wrapping_add(0x5EED));
    }

    /// ITC (and with the teacher, RTC and DTA) on a batch, SPEC section 3. `train`: BatchNorm
    /// batch statistics, Q-Former dropout, sampled keep masks; the ViT is always frozen.
    pub fn losses(&self, batch: &TrainBatch, w: &LossWeights, train: bool) -> Result<Losses> {
        self.losses_from_reps(&self.loss_reps(batch, w, train)?, w)
    }

    /// The per-example outputs the losses are computed from (every one keeps its graph).
    pub fn loss_reps(&self, batch: &TrainBatch, w: &LossWeights, train: bool) -> Result<LossReps> {
        let tokens = self.light_tokens_of(&batch.reference, train)?;
        let b = tokens.dim(0)?;
        let slots = self.slots(&tokens, train)?;
        let query =
            self.query_feats_from_slots(&slots, &batch.input_ids, &batch.attention_mask, train)?;
        let target = self.gallery_feats_t(&self.embeds_of(&batch.target_vit)?, train)?;
        if target.dim(0)? != b {
            candle_core::bail!("{} targets for {b} references", target.dim(0)?);
        }
        if !w.teacher {
            return Ok(LossReps {
                query,
                target,
                teacher: None,
            });
        }
        // Teacher: the reference image through the large model, jointly with the text.
        let reference = self.embeds_of(&batch.reference_vit)?;
        let queries = self.expanded_query_tokens(b)?;
        let nq = queries.dim(1)?;
        let ones = Tensor::ones((b, nq), queries.dtype(), tokens.device())?;
        let mask = Tensor::cat(
            &[&ones, &batch.attention_mask.to_dtype(queries.dtype())?],
            1,
        )?;
        let joint = self
            .qformer
            .joint(&queries, &batch.input_ids, &mask, &reference, train)?;
        let anchors = joint.narrow(1, 0, nq)?;
        let teacher = self.composed(
            &anchors,
            &ones,
            &batch.input_ids,
            &batch.attention_mask,
            train,
        )?;
        Ok(LossReps {
            query,
            target,
            teacher: Some(TeacherReps {
                query: teacher,
                slot_mean: slots.slots.mean(1)?,
                anchor_mean: anchors.mean(1)?,
            }),
        })
    }

    /// The losses of a batch from its per-example outputs (row i of every tensor is triplet i).
    pub fn losses_from_reps(&self, reps: &LossReps, w: &LossWeights) -> Result<Losses> {
        let b = reps.query.dim(0)?;
        let labels = Tensor::arange(0u32, b as u32, reps.query.device())?;
        let contrastive = |q: &Tensor| -> Result<Tensor> {
            let logits = Self::scores(q, &reps.target)?.broadcast_div(&self.temp)?;
            candle_nn::loss::cross_entropy(&logits, &labels)
        };
        let itc = contrastive(&reps.query)?;
        let Some(t) = reps.teacher.as_ref().filter(|_| w.teacher) else {
            return Ok(Losses {
                total: itc.clone(),
                itc,
                rtc: None,
                dta: None,
            });
        };
        let rtc = contrastive(&t.query)?;
        let dta = candle_nn::loss::mse(&t.slot_mean, &t.anchor_mean)?;
        let total = ((&itc + (&dta * w.dta)?)? + (&rtc * w.rtc)?)?;
        Ok(Losses {
            itc,
            rtc: Some(rtc),
            dta: Some(dta),
            total,
        })
    }
}

/// Per-example outputs of a training forward, from which [`Slot4ACir::losses_from_reps`]
/// computes the batch losses: the batch-contrastive losses only couple examples there, which
/// is what exact gradient accumulation needs (`train::gradcache`).
#[derive(Debug, Clone)]
pub struct LossReps {
    /// (B,E) composed query vectors.
    pub query: Tensor,
    /// (B,Q,E) gallery vectors of the targets.
    pub target: Tensor,
    /// With `dta` in the loss setting.
    pub teacher: Option<TeacherReps>,
}

#[derive(Debug, Clone)]
pub struct TeacherReps {
    /// (B,E) teacher query vectors (anchors + text).
    pub query: Tensor,
    /// (B,D) mean over slots of the slot module output.
    pub slot_mean: Tensor,
    /// (B,D) mean over the anchors.
    pub anchor_mean: Tensor,
}

impl LossReps {
    /// The tensors in a fixed order (query, target[, teacher query, slot mean, anchor mean]).
    pub fn to_vec(&self) -> Vec<Tensor> {
        let mut v = vec![self.query.clone(), self.target.clone()];
        if let Some(t) = &self.teacher {
            v.extend([t.query.clone(), t.slot_mean.clone(), t.anchor_mean.clone()]);
        }
        v
    }

    /// The inverse of [`LossReps::to_vec`].
    pub fn from_slice(v: &[Tensor]) -> Result<Self> {
        match v {
            [q, g] => Ok(Self {
                query: q.clone(),
                target: g.clone(),
                teacher: None,
            }),
            [q, g, t, s, a] => Ok(Self {
                query: q.clone(),
                target: g.clone(),
                teacher: Some(TeacherReps {
                    query: t.clone(),
                    slot_mean: s.clone(),
                    anchor_mean: a.clone(),
                }),
            }),
            _ => candle_core::bail!(
                "loss representations: expected 2 or 5 tensors, got {}",
                v.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_reinterpret_the_buffer_or_put_channels_last() {
        // (1, C=2, h=1, w=3): channel 0 = [0,1,2], channel 1 = [3,4,5].
        let map = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 3))
            .unwrap();
        let r = TokenLayout::Reinterpret.tokens(&map).unwrap();
        assert_eq!(
            r.to_vec3::<f32>().unwrap(),
            vec![vec![vec![0., 1.], vec![2., 3.], vec![4., 5.]]]
        );
        let c = TokenLayout::ChannelLast.tokens(&map).unwrap();
        assert_eq!(
            c.to_vec3::<f32>().unwrap(),
            vec![vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]]
        );
    }

    #[test]
    fn scores_take_the_max_over_gallery_vectors() {
        let dev = Device::Cpu;
        // Two queries (E=2), gallery of two images with Q=3 vectors each.
        let q = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap();
        let g = Tensor::new(
            &[
                [[0.5f32, 0.1], [0.9, -1.], [-1., 0.3]],
                [[0.2f32, 0.2], [0.1, 0.8], [0.0, 0.0]],
            ],
            &dev,
        )
        .unwrap();
        let s = Slot4ACir::scores(&q, &g).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(s, vec![vec![0.9, 0.2], vec![0.3, 0.8]]);
    }
}
