//! A dataset and the Slot4ACir model as a [`TrainTask`]: training triplets loaded and
//! preprocessed in parallel into [`TrainBatch`]es, validation through the evaluation driver
//! (CIRR val or FashionIQ val) on the current weights.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rayon::prelude::*;

use super::gradcache::{BatchContrastive, LossOutput};
use super::objective::ModelObjective;
use super::trainer::{TrainTask, Validation};
use super::vit_cache::VitCache;
use crate::data::preprocess::Transform;
use crate::data::{Dataset, SkipLog};
use crate::eval::driver::{self, EvalOptions};
use crate::index::model_encoder::ModelEncoder;
use crate::model::{LightInput, LossWeights, Slot4ACir, TrainBatch, VitInput};
use crate::text::{process_caption, Tokenizer};
use crate::weights::ParamStore;

/// What validation ranks, and which figure picks the best checkpoint (the reference's).
pub enum ValidationSet {
    /// CIRR val; best by `arithmetic_mean`.
    Cirr(Dataset),
    /// FashionIQ val, one dataset per category; best by `average_recall`.
    FashionIq(Vec<(String, Dataset)>),
}

pub struct DatasetTask {
    pub model: Arc<Slot4ACir>,
    pub store: ParamStore,
    pub train: Dataset,
    pub validation: Option<ValidationSet>,
    pub weights: LossWeights,
    pub transform: Transform,
    pub tokenizer: Tokenizer,
    pub eval: EvalOptions,
    pub device: Device,
    /// The frozen ViT's outputs kept on disk (targets, the teacher's references and the
    /// validation gallery); `None` runs the ViT every time.
    pub vit_cache: Option<Arc<VitCache>>,
}

impl DatasetTask {
    fn objective(&self) -> ModelObjective<'_> {
        ModelObjective {
            model: &self.model,
            weights: self.weights,
            train: true,
        }
    }
}

impl BatchContrastive for DatasetTask {
    type Chunk = TrainBatch;

    fn encode(&self, chunk: &TrainBatch, seed: u64) -> candle_core::Result<Vec<Tensor>> {
        self.objective().encode(chunk, seed)
    }

    fn loss(&self, reps: &[Tensor]) -> candle_core::Result<LossOutput> {
        self.objective().loss(reps)
    }
}

impl TrainTask for DatasetTask {
    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn len(&self) -> usize {
        self.train.triplets.len()
    }

    fn chunk(&self, indices: &[usize], rng: &mut StdRng) -> Result<TrainBatch> {
        let size = self.model.cfg.img_size;
        // Captions drawn in order from `rng` (reproducible); images decoded in parallel.
        let captions: Vec<String> = indices
            .iter()
            .map(|&i| process_caption(&self.train.triplets[i].text.train_caption(rng)))
            .collect();
        let images: Vec<(Vec<f32>, Vec<f32>)> = indices
            .par_iter()
            .map(|&i| {
                let t = &self.train.triplets[i];
                let (r, g) = self.train.load_triplet_images(t, &self.transform, size)?;
                let g = g.with_context(|| format!("{}: no target", self.train.describe(t)))?;
                Ok((r, g))
            })
            .collect::<Result<_>>()?;
        let n = indices.len();
        let mut refs = Vec::with_capacity(n * 3 * size * size);
        let mut targets = Vec::with_capacity(n * 3 * size * size);
        for (r, g) in images {
            refs.extend_from_slice(&r);
            targets.extend_from_slice(&g);
        }
        let shape = (n, 3, size, size);
        let reference = Tensor::from_vec(refs, shape, &self.device)?;
        let target = Tensor::from_vec(targets, shape, &self.device)?;
        let (ids, mask) = self
            .tokenizer
            .encode_batch_longest(&captions, self.model.cfg.max_txt_len)?;
        let (reference_vit, target_vit) = match &self.vit_cache {
            Some(cache) => (
                VitInput::Features(cache.features(&self.model, &reference)?),
                VitInput::Features(cache.features(&self.model, &target)?),
            ),
            None => (
                VitInput::Pixels(reference.clone()),
                VitInput::Pixels(target),
            ),
        };
        Ok(TrainBatch {
            reference: LightInput::Pixels(reference),
            reference_vit,
            target_vit,
            input_ids: ids.to_device(&self.device)?,
            attention_mask: mask.to_device(&self.device)?,
        })
    }

    fn validate(&self) -> Result<Validation> {
        let Some(set) = &self.validation else {
            anyhow::bail!("no validation set was given");
        };
        let enc = ModelEncoder::from_model(self.model.clone(), self.store.clone())?
            .with_transform(self.transform)
            .with_vit_cache(self.vit_cache.clone());
        let log = SkipLog::new(false);
        let (metrics, primary) = match set {
            ValidationSet::Cirr(ds) => (
                driver::cirr_val(&enc, ds, &self.eval, &log)?,
                "arithmetic_mean",
            ),
            ValidationSet::FashionIq(cats) => (
                driver::fashioniq_val(&enc, cats, &self.eval, &log)?,
                "average_recall",
            ),
        };
        Ok(Validation {
            metrics: metrics.0,
            primary: primary.into(),
        })
    }
}
