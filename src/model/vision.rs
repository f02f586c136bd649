//! The gallery side's frozen image encoder (`visual_encoder.*`): the paper's EVA ViT, or a light
//! backbone whose feature map stands in for it ([`ModelConfig::vision_model`], the demo's small
//! configuration). Either way, normalized pixels (B,3,S,S) → image tokens (B,T,W) before
//! `ln_vision`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::backbone::{self, LightEncoder};
use super::slot4acir::TokenLayout;
use super::vit::EvaVit;
use crate::config::ModelConfig;

pub enum VisionEncoder {
    Eva(EvaVit),
    /// A CNN's feature map (B,C,h,w) as h·w tokens of width C (one per position).
    Backbone(Box<dyn LightEncoder>),
}

impl VisionEncoder {
    /// Built from `visual_encoder` (pass `vb.pp("visual_encoder")`).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let Some(kind) = cfg.vision_backbone() else {
            return Ok(Self::Eva(EvaVit::new(cfg, vb)?));
        };
        let net = backbone::build(kind, vb)?;
        if net.out_channels() != cfg.vit_width {
            candle_core::bail!(
                "vision_model {} gives {} channels but vit_width is {}",
                cfg.vision_model,
                net.out_channels(),
                cfg.vit_width
            );
        }
        Ok(Self::Backbone(net))
    }

    /// (T, W) of one image's tokens at `cfg.img_size`: from the configuration for the ViT, from
    /// one probe image for a backbone (whose downsampling the configuration does not state).
    pub fn token_shape(
        &self,
        cfg: &ModelConfig,
        device: &candle_core::Device,
    ) -> Result<(usize, usize)> {
        match self {
            Self::Eva(_) => Ok((cfg.vit_tokens(), cfg.vit_width)),
            Self::Backbone(_) => {
                let s = cfg.img_size;
                let probe = Tensor::zeros((1, 3, s, s), candle_core::DType::F32, device)?;
                let (_, t, w) = self.forward(&probe)?.dims3()?;
                Ok((t, w))
            }
        }
    }

    /// (B,3,S,S) → (B,T,W); frozen: BatchNorm always uses its running statistics.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        match self {
            Self::Eva(vit) => vit.forward(pixels),
            Self::Backbone(net) => {
                TokenLayout::ChannelLast.tokens(&net.extract_features(pixels, false)?)
            }
        }
    }
}
