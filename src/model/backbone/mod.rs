//! The light query encoders (SPEC section 2): each turns a (B,3,224,224) image batch into the
//! feature map that the slot module reads.

pub mod efficientnet;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::LightModelKind;

/// What every light encoder offers the model.
pub trait LightEncoder: Send + Sync {
    /// everything before global pooling and the classifier: (B,C,h,w)
    fn extract_features(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    fn out_channels(&self) -> usize;
}

/// The encoder `kind` with its parameters from `vb` (the reference names below
/// `light_visual_encoder.` for a Slot4ACir checkpoint, the root for a backbone's own weights).
pub fn build(kind: LightModelKind, vb: VarBuilder) -> Result<Box<dyn LightEncoder>> {
    if let Some(cfg) = efficientnet::EfficientNetConfig::for_kind(kind) {
        return Ok(Box::new(efficientnet::EfficientNet::new(vb, &cfg)?));
    }
    Err(candle_core::Error::Msg(format!(
        "light model {} is not available yet",
        kind.name()
    )))
}
