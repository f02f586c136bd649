//! The light query encoders (SPEC section 2): each turns a (B,3,224,224) image batch into the
//! feature map that the slot module reads.

pub mod efficientnet;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::LightModelKind;

/// A light encoder under `light_visual_encoder.*`.
pub trait LightEncoder: Send + Sync {
    /// everything before global pooling and the classifier: (B,C,h,w).
    /// `train`: BatchNorm with batch statistics (and running-stat updates).
    fn extract_features(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    fn out_channels(&self) -> usize;
}

/// The encoder `kind` with its parameters from `vb` (already under `light_visual_encoder` for a
/// Slot4ACir checkpoint; the root for a backbone's own weights).
pub fn build(kind: LightModelKind, vb: VarBuilder) -> Result<Box<dyn LightEncoder>> {
    if let Some(cfg) = efficientnet::EfficientNetConfig::for_kind(kind) {
        return Ok(Box::new(efficientnet::EfficientNet::new(vb, &cfg)?));
    }
    candle_core::bail!("light encoder {} is not implemented yet", kind.name())
}
