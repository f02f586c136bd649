//! Initial weights of a training run (`--init-weights`, repeatable): each file is recognised by
//! its keys and mapped into the Slot4ACir naming, then all are merged (a later file wins).
//! - a Slot4ACir or LAVIS BLIP-2 checkpoint (reference names, used as they are);
//! - a light backbone's own release (mapped into `light_visual_encoder.*`);
//! - a BERT checkpoint for the Q-Former, the way BLIP-2 initializes from `bert-base-uncased`:
//!   `Qformer.bert.*`, each layer's feed-forward copied into its query branch
//!   (`intermediate_query`, `output_query`), the word embeddings grown by the added `[DEC]` row.
//!
//! What no file provides (cross-attention, query tokens, slots, projections) is initialized
//! randomly by the model's own init hints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::model::backbone;
use crate::weights::load_state_dict;

/// Top-level names of a Slot4ACir state dict.
const MODEL_PREFIXES: [&str; 10] = [
    "visual_encoder.",
    "ln_vision.",
    "Qformer.",
    "query_tokens",
    "light_visual_encoder.",
    "fusion_slot.",
    "vision_proj.",
    "text_proj.",
    "itm_head.",
    "temp",
];

/// What a weights file holds, by its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    Model,
    Bert,
    Backbone,
}

pub fn classify(keys: &[&String]) -> InitKind {
    if keys
        .iter()
        .any(|k| MODEL_PREFIXES.iter().any(|p| k.starts_with(p)))
    {
        return InitKind::Model;
    }
    let bert = keys.iter().any(|k| {
        let k = k.strip_prefix("bert.").unwrap_or(k);
        k.starts_with("embeddings.word_embeddings") || k.contains(".attention.self.query")
    });
    if bert {
        InitKind::Bert
    } else {
        InitKind::Backbone
    }
}

/// Merges `files` into one state dict under the Slot4ACir names.
pub fn load_init_weights(files: &[PathBuf], cfg: &ModelConfig) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for path in files {
        let sd = load_state_dict(path)?;
        let mut keys: Vec<&String> = sd.keys().collect();
        keys.sort();
        let kind = classify(&keys);
        let mapped = match kind {
            InitKind::Model => sd,
            InitKind::Bert => map_bert(sd, cfg).with_context(|| bert_context(path))?,
            InitKind::Backbone => backbone::map_pretrained(cfg.light_model_kind(), sd)
                .with_context(|| {
                    format!(
                        "mapping {} as a {} backbone",
                        path.display(),
                        cfg.light_model
                    )
                })?,
        };
        if mapped.is_empty() {
            bail!(
                "weights file {}: none of its keys belongs to the model (read as {kind:?} weights)",
                path.display()
            );
        }
        tracing::info!(
            "init weights: {} tensors from {} ({kind:?})",
            mapped.len(),
            path.display()
        );
        out.extend(mapped);
    }
    Ok(out)
}

fn bert_context(path: &Path) -> String {
    format!(
        "mapping {} as BERT weights for the Q-Former",
        path.display()
    )
}

/// Number of encoder layers in a BERT state dict (`bert.` prefix optional).
pub fn bert_layer_count(sd: &HashMap<String, Tensor>) -> usize {
    sd.keys()
        .filter_map(|k| {
            let k = k.strip_prefix("bert.").unwrap_or(k);
            k.strip_prefix("encoder.layer.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// A BERT state dict (`bert.` prefix optional) as the Q-Former's initial weights.
/// Q-Former layer `i` starts from BERT layer `i`; Q-Former layers beyond the checkpoint's keep
/// their random start.
pub fn map_bert(sd: HashMap<String, Tensor>, cfg: &ModelConfig) -> Result<HashMap<String, Tensor>> {
    let first: Vec<usize> = (0..cfg.qformer_layers.min(bert_layer_count(&sd))).collect();
    map_bert_layers(sd, cfg, &first)
}

/// [`map_bert`] with Q-Former layer `i` initialized from the checkpoint's layer `layers[i]`,
/// e.g. the first and the last layer of a deeper BERT. Q-Former layers past `layers.len()`
/// keep their random start; a chosen layer the checkpoint lacks is an error.
pub fn map_bert_layers(
    sd: HashMap<String, Tensor>,
    cfg: &ModelConfig,
    layers: &[usize],
) -> Result<HashMap<String, Tensor>> {
    if layers.len() > cfg.qformer_layers {
        bail!(
            "{} BERT layers chosen for a Q-Former of {} layers",
            layers.len(),
            cfg.qformer_layers
        );
    }
    let mut out = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (key, t) in sd {
        let k = key.strip_prefix("bert.").unwrap_or(&key).to_string();
        if k.starts_with("pooler.")
            || k.starts_with("cls.")
            || k.starts_with("embeddings.token_type_embeddings")
        {
            continue;
        }
        if k == "embeddings.word_embeddings.weight" {
            out.insert(format!("Qformer.bert.{k}"), grow_vocabulary(&t, cfg)?);
            continue;
        }
        if k.ends_with("LayerNorm.weight") || k == "embeddings.position_embeddings.weight" {
            let h = *t.dims().last().unwrap_or(&0);
            if h != cfg.qformer_hidden {
                bail!(
                    "{key} is {h} wide but the configuration's qformer_hidden is {}",
                    cfg.qformer_hidden
                );
            }
        }
        if let Some(rest) = k.strip_prefix("encoder.layer.") {
            let (layer, part) = rest.split_once('.').context("malformed layer key")?;
            let layer: usize = layer
                .parse()
                .with_context(|| format!("layer index in {key}"))?;
            seen.insert(layer);
            // A BERT layer may initialize several Q-Former layers, or none.
            for (i, _) in layers.iter().enumerate().filter(|(_, &l)| l == layer) {
                for (plain, query) in [
                    ("intermediate.", "intermediate_query."),
                    ("output.", "output_query."),
                ] {
                    if let Some(tail) = part.strip_prefix(plain) {
                        out.insert(
                            format!("Qformer.bert.encoder.layer.{i}.{query}{tail}"),
                            t.clone(),
                        );
                    }
                }
                out.insert(format!("Qformer.bert.encoder.layer.{i}.{part}"), t.clone());
            }
            continue;
        }
        out.insert(format!("Qformer.bert.{k}"), t);
    }
    if let Some(l) = layers.iter().find(|l| !seen.contains(l)) {
        bail!(
            "the BERT checkpoint has no layer {l} (it has {})",
            seen.len()
        );
    }
    Ok(out)
}

/// BERT's vocabulary (30522 rows) plus the added tokens (`[DEC]`): new rows drawn from
/// N(0, 0.02) as Hugging Face's `resize_token_embeddings` initializes them.
fn grow_vocabulary(t: &Tensor, cfg: &ModelConfig) -> Result<Tensor> {
    let (rows, h) = t.dims2()?;
    if rows > cfg.vocab_size {
        bail!(
            "word embeddings have {rows} rows, more than the configuration's vocab_size {}",
            cfg.vocab_size
        );
    }
    if rows == cfg.vocab_size {
        return Ok(t.clone());
    }
    let extra = Tensor::randn(0f32, 0.02, (cfg.vocab_size - rows, h), &Device::Cpu)?;
    Ok(Tensor::cat(&[t, &extra], 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize]) -> Tensor {
        Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn bert_layers_fill_the_query_branch_and_the_vocabulary_grows() {
        let mut cfg = ModelConfig::paper();
        cfg.qformer_hidden = 4;
        cfg.qformer_layers = 1;
        cfg.vocab_size = 7;
        let mut sd = HashMap::new();
        sd.insert(
            "bert.embeddings.word_embeddings.weight".to_string(),
            t(&[6, 4]),
        );
        sd.insert(
            "bert.embeddings.token_type_embeddings.weight".to_string(),
            t(&[2, 4]),
        );
        sd.insert(
            "bert.encoder.layer.0.intermediate.dense.weight".to_string(),
            t(&[8, 4]),
        );
        sd.insert(
            "bert.encoder.layer.0.output.LayerNorm.weight".to_string(),
            t(&[4]),
        );
        sd.insert(
            "bert.encoder.layer.0.attention.output.dense.weight".to_string(),
            t(&[4, 4]),
        );
        sd.insert(
            "bert.encoder.layer.1.output.dense.weight".to_string(),
            t(&[4, 8]),
        );
        let keys: Vec<&String> = sd.keys().collect();
        assert_eq!(classify(&keys), InitKind::Bert);
        let m = map_bert(sd, &cfg).unwrap();
        let mut names: Vec<&String> = m.keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "Qformer.bert.embeddings.word_embeddings.weight",
                "Qformer.bert.encoder.layer.0.attention.output.dense.weight",
                "Qformer.bert.encoder.layer.0.intermediate.dense.weight",
                "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight",
                "Qformer.bert.encoder.layer.0.output.LayerNorm.weight",
                "Qformer.bert.encoder.layer.0.output_query.LayerNorm.weight",
            ]
        );
        let emb = &m["Qformer.bert.embeddings.word_embeddings.weight"];
        assert_eq!(emb.dims(), [7, 4]);
        let first: Vec<f32> = emb.get(0).unwrap().to_vec1().unwrap();
        assert_eq!(first, [1.0; 4]);
    }

    #[test]
    fn a_bert_of_the_wrong_width_is_refused() {
        let cfg = ModelConfig::paper();
        let mut sd = HashMap::new();
        sd.insert("embeddings.LayerNorm.weight".to_string(), t(&[384]));
        sd.insert(
            "embeddings.word_embeddings.weight".to_string(),
            t(&[10, 384]),
        );
        let err = map_bert(sd, &cfg).unwrap_err().to_string();
        assert!(err.contains("384 wide") && err.contains("768"), "{err}");
    }

    #[test]
    fn chosen_bert_layers_initialize_the_qformer_layers_in_order() {
        let mut cfg = ModelConfig::paper();
        cfg.qformer_hidden = 4;
        cfg.qformer_layers = 2;
        let layer = |l: usize| {
            let v = Tensor::full(l as f32, (4, 4), &Device::Cpu).unwrap();
            (format!("encoder.layer.{l}.output.dense.weight"), v)
        };
        let sd: HashMap<String, Tensor> = (0..6).map(layer).collect();
        assert_eq!(bert_layer_count(&sd), 6);
        let m = map_bert_layers(sd.clone(), &cfg, &[0, 5]).unwrap();
        let value = |k: &str| -> f32 { m[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] };
        assert_eq!(
            value("Qformer.bert.encoder.layer.0.output.dense.weight"),
            0.0
        );
        assert_eq!(
            value("Qformer.bert.encoder.layer.1.output.dense.weight"),
            5.0
        );
        assert_eq!(
            value("Qformer.bert.encoder.layer.1.output_query.dense.weight"),
            5.0
        );
        assert_eq!(m.len(), 4, "layers 1 to 4 are left out");
        let err = map_bert_layers(sd.clone(), &cfg, &[0, 6])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no layer 6"), "{err}");
        let err = map_bert_layers(sd.clone(), &cfg, &[0, 1, 2])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("3 BERT layers chosen for a Q-Former of 2"),
            "{err}"
        );
        // A BERT shallower than the Q-Former fills its first layers, as before.
        cfg.qformer_layers = 8;
        let m = map_bert(sd, &cfg).unwrap();
        assert!(m.contains_key("Qformer.bert.encoder.layer.5.output.dense.weight"));
        assert!(!m.keys().any(|k| k.contains("layer.6.")));
    }
}
