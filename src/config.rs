//! The model configuration: exactly the keys of a fixture's `meta.json` `config` object.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::TokenLayout;

/// Dimensions and choices of a Slot4ACir model (SPEC sections 1-2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vit_width: usize,
    pub vit_depth: usize,
    pub vit_heads: usize,
    pub qformer_hidden: usize,
    pub qformer_layers: usize,
    pub qformer_heads: usize,
    pub qformer_intermediate: usize,
    pub cross_attention_freq: usize,
    pub num_query_token: usize,
    pub embed_dim: usize,
    pub max_txt_len: usize,
    pub img_size: usize,
    pub patch_size: usize,
    pub light_model: String,
    pub num_slots: usize,
    pub use_adapt: bool,
    pub vocab_size: usize,
    pub vit_mlp_ratio: f64,
    pub vit_ln_eps: f64,
    pub qformer_ln_eps: f64,
    /// The gallery side's frozen image encoder: [`EVA_VIT`] (the paper's, the default), or a
    /// light backbone name whose feature map, one token per position, stands in for the ViT
    /// (`vit_width` is then its channel count). Left out of files that use the ViT, so the
    /// reference's configurations read and write unchanged.
    #[serde(default = "eva_vit", skip_serializing_if = "is_eva_vit")]
    pub vision_model: String,
    /// How the light feature map becomes tokens: the reference's memory reinterpretation (the
    /// default, left out of files) or `channel-last`, one token per position, for new training.
    #[serde(default, skip_serializing_if = "is_reinterpret")]
    pub token_layout: TokenLayout,
}

fn is_reinterpret(t: &TokenLayout) -> bool {
    *t == TokenLayout::Reinterpret
}

/// [`ModelConfig::vision_model`] of the paper: the EVA ViT.
pub const EVA_VIT: &str = "eva-vit";

fn eva_vit() -> String {
    EVA_VIT.to_string()
}

fn is_eva_vit(s: &str) -> bool {
    s == EVA_VIT
}

/// The light query backbones (SPEC section 2), by their `--light-model-name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LightModelKind {
    EfficientNetB0,
    EfficientNetB1,
    EfficientNetB2,
    EfficientNetLite0,
    EfficientNetLite1,
    EfficientNetLite2,
    EfficientVitM2,
    EfficientVitM4,
    MobileNetV3Small,
    MobileNetV3Large,
}

impl LightModelKind {
    pub const ALL: [(&'static str, LightModelKind); 10] = [
        ("efficientnet-b0", Self::EfficientNetB0),
        ("efficientnet-b1", Self::EfficientNetB1),
        ("efficientnet-b2", Self::EfficientNetB2),
        ("efficientnet-lite0", Self::EfficientNetLite0),
        ("efficientnet-lite1", Self::EfficientNetLite1),
        ("efficientnet-lite2", Self::EfficientNetLite2),
        ("efficientvit-m2", Self::EfficientVitM2),
        ("efficientvit-m4", Self::EfficientVitM4),
        ("mobilenetv3-s", Self::MobileNetV3Small),
        ("mobilenetv3-l", Self::MobileNetV3Large),
    ];

    pub fn parse(name: &str) -> Result<Self> {
        match Self::ALL.iter().find(|(n, _)| *n == name) {
            Some((_, k)) => Ok(*k),
            None => {
                let known: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
                bail!("unknown light model '{name}' (known: {})", known.join(", "))
            }
        }
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }
}

impl ModelConfig {
    /// The paper's configuration: EVA ViT-g/14 (39 blocks), BERT-base Q-Former,
    /// EfficientNet-B0 query encoder, 8 slots.
    pub fn paper() -> Self {
        Self {
            vit_width: 1408,
            vit_depth: 39,
            vit_heads: 16,
            qformer_hidden: 768,
            qformer_layers: 12,
            qformer_heads: 12,
            qformer_intermediate: 3072,
            cross_attention_freq: 2,
            num_query_token: 32,
            embed_dim: 256,
            max_txt_len: 32,
            img_size: 224,
            patch_size: 14,
            light_model: "efficientnet-b0".into(),
            num_slots: 8,
            use_adapt: false,
            vocab_size: 30523,
            vit_mlp_ratio: 4.3637,
            vit_ln_eps: 1e-6,
            qformer_ln_eps: 1e-12,
            vision_model: eva_vit(),
            token_layout: TokenLayout::Reinterpret,
        }
    }

    /// The demo's small configuration (`slot4acir demo`), every part from real pretrained
    /// weights available offline: EfficientNet-Lite2's feature map (1280 × 7 × 7) as the frozen
    /// gallery encoder, a Q-Former of MiniLM-L6's width (384, 12 heads) and 2 layers (the demo
    /// starts them from MiniLM's first and last layers), 16 query tokens, EfficientNet-Lite0
    /// query encoder with one token per position (channel-last), 8 slots, texts of at most 16
    /// tokens.
    pub fn demo() -> Self {
        Self {
            vit_width: 1280,
            vit_depth: 0,
            vit_heads: 16,
            qformer_hidden: 384,
            qformer_layers: 2,
            qformer_heads: 12,
            qformer_intermediate: 1536,
            num_query_token: 16,
            max_txt_len: 16,
            light_model: "efficientnet-lite0".into(),
            vision_model: "efficientnet-lite2".into(),
            token_layout: TokenLayout::ChannelLast,
            ..Self::paper()
        }
    }

    /// Built-in presets by name (`paper`, `demo`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "paper" => Some(Self::paper()),
            "demo" => Some(Self::demo()),
            _ => None,
        }
    }

    /// The light backbone that replaces the ViT on the gallery side, if any.
    pub fn vision_backbone(&self) -> Option<LightModelKind> {
        if is_eva_vit(&self.vision_model) {
            None
        } else {
            Some(LightModelKind::parse(&self.vision_model).expect("validated configuration"))
        }
    }

    /// Reads a configuration file: either the object itself, or any JSON object with a
    /// top-level `config` key (a fixture's `meta.json`). A preset name is accepted too.
    pub fn load(path_or_preset: &str) -> Result<Self> {
        if let Some(c) = Self::preset(path_or_preset) {
            return Ok(c);
        }
        let path = Path::new(path_or_preset);
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model configuration {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in model configuration {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
        let obj = match value.get("config") {
            Some(inner) => inner.clone(),
            None => value,
        };
        let cfg: Self = serde_json::from_value(obj)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        LightModelKind::parse(&self.light_model)?;
        if !is_eva_vit(&self.vision_model) {
            LightModelKind::parse(&self.vision_model)
                .with_context(|| format!("vision_model (or {EVA_VIT})"))?;
        }
        let div = |a: usize, b: usize, what: &str| -> Result<()> {
            if b == 0 || !a.is_multiple_of(b) {
                bail!("{what}: {a} is not divisible by {b}");
            }
            Ok(())
        };
        div(self.vit_width, self.vit_heads, "vit_width / vit_heads")?;
        div(
            self.qformer_hidden,
            self.qformer_heads,
            "qformer_hidden / qformer_heads",
        )?;
        div(self.img_size, self.patch_size, "img_size / patch_size")?;
        if self.cross_attention_freq == 0 {
            bail!("cross_attention_freq must be at least 1");
        }
        if self.num_slots == 0 || self.num_query_token == 0 || self.max_txt_len < 2 {
            bail!("num_slots and num_query_token must be positive and max_txt_len at least 2");
        }
        Ok(())
    }

    pub fn light_model_kind(&self) -> LightModelKind {
        LightModelKind::parse(&self.light_model).expect("validated configuration")
    }

    /// Hidden width of the ViT MLP: `int(width * mlp_ratio)` as the reference computes it.
    pub fn vit_mlp_hidden(&self) -> usize {
        (self.vit_width as f64 * self.vit_mlp_ratio) as usize
    }

    /// Number of ViT tokens: patches plus the class token.
    pub fn vit_tokens(&self) -> usize {
        let g = self.img_size / self.patch_size;
        g * g + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_preset_mlp_hidden_matches_spec() {
        assert_eq!(ModelConfig::paper().vit_mlp_hidden(), 6144);
        assert_eq!(ModelConfig::paper().vit_tokens(), 257);
    }

    #[test]
    fn accepts_meta_wrapper_and_rejects_unknown_keys() {
        let inner = serde_json::to_string(&ModelConfig::paper()).unwrap();
        let wrapped = format!("{{\"config\": {inner}, \"other\": 1}}");
        assert_eq!(
            ModelConfig::from_json(&wrapped).unwrap(),
            ModelConfig::paper()
        );
        let bad = inner.replace("\"num_slots\"", "\"num_slotz\"");
        assert!(ModelConfig::from_json(&bad).is_err());
    }

    #[test]
    fn the_vit_choice_is_left_out_of_files_and_read_back() {
        let paper = serde_json::to_value(ModelConfig::paper()).unwrap();
        assert!(paper.get("vision_model").is_none());
        assert!(paper.get("token_layout").is_none());
        let demo = serde_json::to_string(&ModelConfig::demo()).unwrap();
        assert_eq!(ModelConfig::from_json(&demo).unwrap(), ModelConfig::demo());
        assert_eq!(
            ModelConfig::demo().vision_backbone(),
            Some(LightModelKind::EfficientNetLite2)
        );
        assert!(demo.contains(r#""token_layout":"channel-last""#), "{demo}");
        let bad = demo.replace("efficientnet-lite2", "resnet-50");
        assert!(ModelConfig::from_json(&bad).is_err());
        let bad = demo.replace("channel-last", "channel-first");
        assert!(ModelConfig::from_json(&bad).is_err());
    }

    #[test]
    fn fixture_mlp_hidden_is_truncated() {
        let mut c = ModelConfig::paper();
        c.vit_width = 48;
        assert_eq!(c.vit_mlp_hidden(), 209);
    }
}
