//! `slot4acir bench`: the hot paths of the paper configuration on random weights, each with
//! its FLOP count and the fraction of the machine's measured matrix-multiply peak.
//!
//! FLOPs count the matrix products (2 per multiply-add) of the transformer and slot parts
//! from the configuration, plus the light backbone's published multiply-adds; elementwise
//! work is left out, so the fractions are slightly conservative.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Module, Tensor};
use serde::Serialize;

use crate::config::{LightModelKind, ModelConfig};
use crate::model::{LightInput, LossWeights, Slot4ACir, TrainBatch, VitInput};
use crate::text::{process_caption, Tokenizer};
use crate::train::gradcache::ParamGrads;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::weights::{Mode, ParamStore};

/// One figure of `bench.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

fn fig(name: &str, value: f64, unit: &str) -> Figure {
    Figure {
        name: name.into(),
        value,
        unit: unit.into(),
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub cfg: ModelConfig,
    /// Repetitions of the fast measurements (the median is reported).
    pub repeats: usize,
    /// Triplets in the measured training step.
    pub train_batch: usize,
    /// Images in the gallery measurement.
    pub gallery_images: usize,
}

/// Median seconds of `n` runs of `f` (after one warm-up run).
fn median_secs(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// f32 GFLOP/s of an n×n by n×n product.
pub fn sgemm_gflops(n: usize, repeats: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let s = median_secs(repeats, || Ok(a.matmul(&b).map(|_| ())?))?;
    Ok(2.0 * (n as f64).powi(3) / s / 1e9)
}

/// Published multiply-adds of a light backbone at 224 (its project's figures), in GMAC.
fn backbone_gmacs(kind: LightModelKind) -> f64 {
    use LightModelKind as K;
    match kind {
        K::EfficientNetB0 => 0.39,
        K::EfficientNetB1 => 0.70,
        K::EfficientNetB2 => 1.0,
        K::EfficientNetLite0 => 0.41,
        K::EfficientNetLite1 => 0.61,
        K::EfficientNetLite2 => 0.87,
        K::EfficientVitM2 => 0.20,
        K::EfficientVitM4 => 0.30,
        K::MobileNetV3Small => 0.06,
        K::MobileNetV3Large => 0.22,
    }
}

/// FLOPs of `layers` BERT layers over `t` tokens (self-attention and feed-forward).
fn bert_flops(cfg: &ModelConfig, t: usize, layers: usize) -> f64 {
    let (h, i, t) = (
        cfg.qformer_hidden as f64,
        cfg.qformer_intermediate as f64,
        t as f64,
    );
    layers as f64 * 2.0 * (4.0 * t * h * h + 2.0 * t * h * i + 2.0 * t * t * h)
}

/// FLOPs of one composed query: light backbone, slot attention (3 iterations), text pass.
pub fn query_flops(cfg: &ModelConfig, text_len: usize, tokens: usize, channels: usize) -> f64 {
    let (s, d) = (cfg.num_slots as f64, cfg.qformer_hidden as f64);
    let n = tokens as f64;
    let backbone = 2e9 * backbone_gmacs(cfg.light_model_kind());
    // to_k and to_v over the N input tokens, once.
    let kv = 2.0 * 2.0 * n * channels as f64 * d;
    // Per iteration: to_q; q·kᵀ and attn·v; the GRU cell (two S×D by D×3D products); the
    // coupling function (sig: D→S, the S×S mixing, trans: D→D).
    let per_iter = 2.0
        * (s * d * d + 2.0 * s * n * d + 2.0 * s * d * 3.0 * d + s * d * s + s * s * d + s * d * d);
    backbone + kv + 3.0 * per_iter + bert_flops(cfg, cfg.num_slots + text_len, cfg.qformer_layers)
}

/// FLOPs of one gallery image: the ViT and the Q-Former's query pass with cross-attention.
pub fn gallery_flops(cfg: &ModelConfig) -> f64 {
    let (w, depth) = (cfg.vit_width as f64, cfg.vit_depth as f64);
    let t = ((cfg.img_size / cfg.patch_size).pow(2) + 1) as f64;
    let mlp = (cfg.vit_width as f64 * cfg.vit_mlp_ratio).floor();
    let patch = 2.0 * (t - 1.0) * 3.0 * (cfg.patch_size.pow(2) as f64) * w;
    let vit = depth * 2.0 * (4.0 * t * w * w + 2.0 * t * w * mlp + 2.0 * t * t * w) + patch;
    let q = cfg.num_query_token;
    let cross_layers = cfg.qformer_layers.div_ceil(cfg.cross_attention_freq) as f64;
    let h = cfg.qformer_hidden as f64;
    let cross =
        cross_layers * 2.0 * (2.0 * t * w * h + 2.0 * q as f64 * h * h + 2.0 * q as f64 * t * h);
    vit + bert_flops(cfg, q, cfg.qformer_layers) + cross
}

/// A CIRR-like caption of `words` words.
fn caption(words: usize) -> String {
    let base = "replace the dog with two cats sitting on a wooden bench near the window and \
                make the background brighter with more trees";
    let w: Vec<&str> = base.split(' ').cycle().take(words).collect();
    process_caption(&w.join(" "))
}

/// Runs every measurement; `log` receives a line per figure as it is measured.
pub fn run(o: &BenchOptions, mut log: impl FnMut(&Figure)) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    let mut push = |f: Figure, out: &mut Vec<Figure>| {
        log(&f);
        out.push(f);
    };
    let peak = sgemm_gflops(2048, o.repeats.max(3))?;
    push(fig("sgemm_gflops", peak, "GFLOP/s"), &mut out);

    let cfg = &o.cfg;
    let device = Device::Cpu;
    let start = Instant::now();
    let store = ParamStore::random(Mode::Training);
    let model = Slot4ACir::new(cfg, store.var_builder(&device))?;
    push(
        fig("model_init_s", start.elapsed().as_secs_f64(), "s"),
        &mut out,
    );
    let tokenizer = Tokenizer::bert_uncased()?;
    let s = cfg.img_size;
    let pixels = |b: usize| Tensor::randn(0f32, 1.0, (b, 3, s, s), &device);
    let texts = |b: usize| -> Vec<String> { (0..b).map(|i| caption(8 + i % 8)).collect() };

    // Query side: light encoder + slots + text pass, as a search request runs it.
    let query = |b: usize| -> Result<(f64, f64)> {
        let px = pixels(b)?;
        let (ids, mask) = tokenizer.encode_batch_longest(&texts(b), cfg.max_txt_len)?;
        let secs = median_secs(o.repeats, || {
            let tokens = model.light_tokens(&px, false)?;
            model.query_feats(&tokens, &ids, &mask, false)?;
            Ok(())
        })?;
        let tokens = model.light_tokens(&px.narrow(0, 0, 1)?, false)?;
        let (_, n, c) = tokens.dims3()?;
        let flops = b as f64 * query_flops(cfg, ids.dim(1)?, n, c);
        Ok((secs, flops))
    };
    let (b1, _) = query(1)?;
    push(fig("query_b1_ms", b1 * 1e3, "ms"), &mut out);
    let (b32, flops32) = query(32)?;
    push(fig("query_b32_ms", b32 * 1e3, "ms"), &mut out);
    push(
        fig("query_b32_gflops", flops32 / b32 / 1e9, "GFLOP/s"),
        &mut out,
    );
    push(
        fig(
            "query_b32_peak_fraction",
            flops32 / b32 / 1e9 / peak,
            "fraction",
        ),
        &mut out,
    );

    // Gallery side: ViT + ln_vision + Q-Former query pass.
    let g = o.gallery_images.max(1);
    let px = pixels(g)?;
    let start = Instant::now();
    let feats = model.vit_features(&px)?;
    let vit_secs = start.elapsed().as_secs_f64();
    model.gallery_feats_from_embeds(&model.ln_vision.forward(&feats)?)?;
    let gallery_secs = start.elapsed().as_secs_f64();
    push(
        fig("gallery_images_per_s", g as f64 / gallery_secs, "images/s"),
        &mut out,
    );
    push(
        fig(
            "gallery_peak_fraction",
            g as f64 * gallery_flops(cfg) / gallery_secs / 1e9 / peak,
            "fraction",
        ),
        &mut out,
    );

    // One training step (forward, backward, AdamW), with the frozen ViT run on every image or
    // its outputs given (what a feature cache provides).
    let b = o.train_batch.max(2);
    let vars = store.trainable_vars();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let (ids, mask) = tokenizer.encode_batch_longest(&texts(b), cfg.max_txt_len)?;
    let (ref_px, tgt_px) = (pixels(b)?, pixels(b)?);
    let mut step = |reference_vit: VitInput, target_vit: VitInput| -> Result<f64> {
        let start = Instant::now();
        let batch = TrainBatch {
            reference: LightInput::Pixels(ref_px.clone()),
            reference_vit,
            target_vit,
            input_ids: ids.clone(),
            attention_mask: mask.clone(),
        };
        let losses = model.losses(&batch, &LossWeights::cirr(), true)?;
        let grads = ParamGrads::from_store(&losses.total.backward()?, &vars);
        opt.step(&grads, 1e-5, 0.9)?;
        Ok(start.elapsed().as_secs_f64())
    };
    let without = step(
        VitInput::Pixels(ref_px.clone()),
        VitInput::Pixels(tgt_px.clone()),
    )?;
    push(fig("train_step_s_without_cache", without, "s"), &mut out);
    let (ref_f, tgt_f) = (model.vit_features(&ref_px)?, model.vit_features(&tgt_px)?);
    let with = (0..o.repeats.clamp(1, 3))
        .map(|_| {
            step(
                VitInput::Features(ref_f.clone()),
                VitInput::Features(tgt_f.clone()),
            )
        })
        .collect::<Result<Vec<f64>>>()?
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    push(fig("train_step_s_with_cache", with, "s"), &mut out);
    push(
        fig("train_step_cache_speedup", without / with, "x"),
        &mut out,
    );
    push(fig("train_batch", b as f64, "triplets"), &mut out);
    push(fig("vit_s_per_image", vit_secs / g as f64, "s"), &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gallery_flops_match_the_published_vit_g_figure() {
        // EVA ViT-g/14 at 224: 267 GMAC for its 40 blocks; BLIP-2 runs 39 of them.
        let cfg = ModelConfig::paper();
        let vit_only = ModelConfig {
            qformer_layers: 0,
            ..cfg.clone()
        };
        let got = gallery_flops(&vit_only) / 2e9;
        let want = 267.0 * 39.0 / 40.0;
        assert!((got / want - 1.0).abs() < 0.02, "{got} GMAC vs {want}");
        // The Q-Former adds a little, not a lot.
        let all = gallery_flops(&cfg) / 2e9;
        assert!(all > got && all < got * 1.1, "{all} vs {got}");
    }

    #[test]
    fn query_flops_are_dominated_by_the_text_pass() {
        let cfg = ModelConfig::paper();
        // BERT-base over 8 slots + 16 text tokens: 12 layers of 24 tokens.
        let bert = bert_flops(&cfg, 24, 12);
        let by_hand =
            12.0 * 2.0 * 24.0 * (4.0 * 768.0 * 768.0 + 2.0 * 768.0 * 3072.0 + 2.0 * 24.0 * 768.0);
        assert!((bert - by_hand).abs() < 1.0);
        let q = query_flops(&cfg, 16, 49, 1280);
        let backbone = 2e9 * 0.39;
        assert!(q > bert + backbone && q < (bert + backbone) * 1.2, "{q}");
    }
}
