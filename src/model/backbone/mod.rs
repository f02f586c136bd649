//! Light query encoders (SPEC section 2). Interim: the trait and the factory; the backbones
//! themselves (EfficientNet, EfficientViT, MobileNetV3) land separately.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::LightModelKind;

/// A light encoder under `light_visual_encoder.*`.
pub trait LightEncoder: Send + Sync {
    /// Everything before global pooling and the classifier: (B,3,H,W) → (B,C,h,w).
    /// `train`: BatchNorm with batch statistics (and running-stat updates).
    fn extract_features(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    fn out_channels(&self) -> usize;
}

/// Builds the light encoder of `kind` from `vb` (already under `light_visual_encoder`).
pub fn build(kind: LightModelKind, _vb: VarBuilder) -> Result<Box<dyn LightEncoder>> {
    candle_core::bail!("light encoder {} is not implemented yet", kind.name())
}
