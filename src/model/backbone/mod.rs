//! The light query encoders (SPEC section 2): each turns a (B,3,224,224) image batch into the
//! feature map before global pooling, under its own project's state-dict names (the caller
//! roots the `VarBuilder` at [`PREFIX`]).

pub mod efficientnet;
pub mod efficientvit;
pub mod mobilenetv3;

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::LightModelKind;

/// Where the light encoder's weights live in a Slot4ACir state dict.
pub const PREFIX: &str = "light_visual_encoder";

/// A light query backbone.
pub trait LightEncoder: Send + Sync {
    /// Everything before global pooling and the classifier: (B, C, h, w). With `train`,
    /// BatchNorm uses batch statistics and updates its running statistics (when mutable).
    fn extract_features(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// C of the feature map.
    fn out_channels(&self) -> usize;
    /// Whether the eval-mode forward runs with BatchNorm folded into the convolutions (frozen
    /// weights, i.e. built for inference).
    fn is_fused(&self) -> bool;
}

/// Builds the encoder `kind` from `vb` (rooted at the encoder, e.g. `vb.pp(PREFIX)`).
pub fn build(kind: LightModelKind, vb: VarBuilder) -> Result<Box<dyn LightEncoder>> {
    use LightModelKind as K;
    if let Some(cfg) = efficientnet::EfficientNetConfig::for_kind(kind) {
        return Ok(Box::new(efficientnet::EfficientNet::new(vb, &cfg)?));
    }
    Ok(match kind {
        K::MobileNetV3Small => Box::new(mobilenetv3::MobileNetV3::new(
            vb,
            mobilenetv3::Variant::Small,
        )?),
        K::MobileNetV3Large => Box::new(mobilenetv3::MobileNetV3::new(
            vb,
            mobilenetv3::Variant::Large,
        )?),
        K::EfficientVitM2 => Box::new(efficientvit::EfficientVit::new(
            vb,
            &efficientvit::EfficientVitConfig::m2(),
        )?),
        K::EfficientVitM4 => Box::new(efficientvit::EfficientVit::new(
            vb,
            &efficientvit::EfficientVitConfig::m4(),
        )?),
        other => candle_core::bail!("light model {} is not implemented", other.name()),
    })
}

/// Maps a backbone's published state dict (as `weights::load_state_dict` returns it) into the
/// Slot4ACir naming (`light_visual_encoder.*`). Keys that belong to no part of the backbone
/// (optimizer state, EMA copies, epoch counters) are dropped.
pub fn map_pretrained(
    kind: LightModelKind,
    state_dict: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    use LightModelKind as K;
    match kind {
        K::MobileNetV3Small | K::MobileNetV3Large => mobilenetv3::map_pretrained(state_dict),
        K::EfficientVitM2 | K::EfficientVitM4 => efficientvit::map_pretrained(state_dict),
        K::EfficientNetB0
        | K::EfficientNetB1
        | K::EfficientNetB2
        | K::EfficientNetLite0
        | K::EfficientNetLite1
        | K::EfficientNetLite2 => Ok(rename_pretrained(
            state_dict,
            &["_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1"],
        )),
        #[allow(unreachable_patterns)]
        other => candle_core::bail!("no pretrained key mapping for light model {}", other.name()),
    }
}

/// [`map_pretrained`] under another prefix than [`PREFIX`] (`visual_encoder` for a backbone
/// standing in for the ViT).
pub fn map_pretrained_under(
    kind: LightModelKind,
    state_dict: HashMap<String, Tensor>,
    prefix: &str,
) -> Result<HashMap<String, Tensor>> {
    let mapped = map_pretrained(kind, state_dict)?;
    Ok(mapped
        .into_iter()
        .map(|(k, t)| match k.strip_prefix(PREFIX) {
            Some(rest) => (format!("{prefix}{rest}"), t),
            None => (k, t),
        })
        .collect())
}

/// The common part of the pretrained key mappings: strips the wrappers that training scripts
/// add (`module.` from DataParallel, `model.` / `state_dict.` from checkpoint dictionaries, in
/// any nesting), keeps the keys whose first component is one of the backbone's top-level
/// modules, and prefixes them with [`PREFIX`].
pub(crate) fn rename_pretrained(
    state_dict: HashMap<String, Tensor>,
    top_level_modules: &[&str],
) -> HashMap<String, Tensor> {
    const WRAPPERS: [&str; 3] = ["module.", "model.", "state_dict."];
    let mut out = HashMap::new();
    for (key, t) in state_dict {
        let mut k = key.as_str();
        while let Some(rest) = WRAPPERS.iter().find_map(|w| k.strip_prefix(w)) {
            k = rest;
        }
        let first = k.split('.').next().unwrap_or("");
        if top_level_modules.contains(&first) {
            out.insert(format!("{PREFIX}.{k}"), t);
        }
    }
    out
}
