//! The Slot4ACir model as a batch-contrastive objective for [`super::gradcache`].

use candle_core::{Result, Tensor};

use crate::model::{LossReps, LossWeights, Slot4ACir, TrainBatch};
use crate::train::gradcache::{BatchContrastive, LossOutput};

/// The model's training losses under `weights`; `train` selects training-mode forwards
/// (BatchNorm batch statistics, dropout, sampled keep masks).
pub struct ModelObjective<'a> {
    pub model: &'a Slot4ACir,
    pub weights: LossWeights,
    pub train: bool,
}

impl BatchContrastive for ModelObjective<'_> {
    type Chunk = TrainBatch;

    fn encode(&self, chunk: &TrainBatch, seed: u64) -> Result<Vec<Tensor>> {
        self.model.seed(seed);
        Ok(self
            .model
            .loss_reps(chunk, &self.weights, self.train)?
            .to_vec())
    }

    fn loss(&self, reps: &[Tensor]) -> Result<LossOutput> {
        let l = self
            .model
            .losses_from_reps(&LossReps::from_slice(reps)?, &self.weights)?;
        let mut parts = vec![("itc", l.itc)];
        if let (Some(dta), Some(rtc)) = (l.dta, l.rtc) {
            parts.push(("dta", dta));
            parts.push(("rtc", rtc));
        }
        Ok(LossOutput {
            total: l.total,
            parts,
        })
    }
}
