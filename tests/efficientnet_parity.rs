//! EfficientNet-B0 light encoder against the reference fixture `parity-b0`: the eval-mode feature
//! map of the reference images, BatchNorm folding, the BatchNorm running statistics after one
//! training-mode forward, and the gradient of the total loss with respect to the light encoder
//! (through the whole model, in eval and training mode).

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{fixture_dir, rel_err};
use slot4acir::config::ModelConfig;
use slot4acir::model::backbone::efficientnet::{EfficientNet, EfficientNetConfig};
use slot4acir::model::backbone::{build, LightEncoder};
use slot4acir::model::{LightInput, LossWeights, Slot4ACir, TrainBatch, VitInput};
use slot4acir::weights::{load_state_dict, Mode, ParamStore};

const PREFIX: &str = "light_visual_encoder";

struct Fixture {
    weights: HashMap<String, Tensor>,
    inputs: HashMap<String, Tensor>,
    expected: HashMap<String, Tensor>,
    config: ModelConfig,
}

fn fixture() -> Fixture {
    let dir = fixture_dir("parity-b0");
    let load = |f: &str| load_state_dict(&dir.join(f)).unwrap();
    Fixture {
        weights: load("weights.safetensors"),
        inputs: load("inputs.safetensors"),
        expected: load("expected.safetensors"),
        config: ModelConfig::load(dir.join("meta.json").to_str().unwrap()).unwrap(),
    }
}

fn store(f: &Fixture, mode: Mode) -> ParamStore {
    ParamStore::new(
        f.weights.clone(),
        "parity-b0/weights.safetensors",
        mode,
        false,
    )
}

#[test]
fn eval_feature_map_matches_reference() {
    let f = fixture();
    let store = store(&f, Mode::Inference);
    let enc = build(
        f.config.light_model_kind(),
        store.var_builder(&Device::Cpu).pp(PREFIX),
    )
    .unwrap();
    store.finish().unwrap();
    let want = &f.expected["light_feature_map"];
    assert_eq!(enc.out_channels(), want.dim(1).unwrap());
    let got = enc
        .extract_features(&f.inputs["reference_images"], false)
        .unwrap();
    assert_eq!(got.dims(), want.dims());
    let err = rel_err(&got, want);
    println!("light_feature_map relative error (BatchNorm folded): {err:.3e}");
    assert!(err < 1e-4, "relative error {err:.3e}");
}

#[test]
fn folding_batchnorm_keeps_parity() {
    let f = fixture();
    let x = &f.inputs["reference_images"];
    let mut cfg = EfficientNetConfig::for_kind(f.config.light_model_kind()).unwrap();
    let vb = store(&f, Mode::Inference).var_builder(&Device::Cpu);
    let fused = EfficientNet::new(vb.pp(PREFIX), &cfg).unwrap();
    cfg.fuse_bn = false;
    let plain = EfficientNet::new(vb.pp(PREFIX), &cfg).unwrap();
    assert!(fused.is_fused() && !plain.is_fused());
    let (a, b) = (
        fused.extract_features(x, false).unwrap(),
        plain.extract_features(x, false).unwrap(),
    );
    let between = rel_err(&a, &b);
    let plain_err = rel_err(&b, &f.expected["light_feature_map"]);
    println!("fused vs unfused {between:.3e}; unfused vs reference {plain_err:.3e}");
    assert!(between < 1e-5, "fused vs unfused {between:.3e}");
    assert!(plain_err < 1e-4, "unfused vs reference {plain_err:.3e}");
}

/// The reference's training forward runs the light encoder on the reference images only (the
/// target images go through the ViT): one training-mode forward over them must leave the
/// fixture's running statistics (momentum 0.01, unbiased variance).
#[test]
fn training_forward_updates_running_stats_like_reference() {
    let f = fixture();
    let store = store(&f, Mode::Training);
    let enc = build(
        f.config.light_model_kind(),
        store.var_builder(&Device::Cpu).pp(PREFIX),
    )
    .unwrap();
    store.finish().unwrap();
    let out = enc
        .extract_features(&f.inputs["reference_images"], true)
        .unwrap();
    assert_eq!(out.dims(), f.expected["light_feature_map"].dims());
    let mut checked = 0;
    for (key, want) in &f.expected {
        let Some(name) = key.strip_prefix("train.bn.") else {
            continue;
        };
        if !name.starts_with(PREFIX) {
            continue;
        }
        let before = &f.weights[name];
        let got = store.get_registered(name).unwrap();
        let err = rel_err(&got, want);
        let moved = rel_err(want, before);
        println!("{name}: relative error {err:.3e} (update moved it by {moved:.3e})");
        assert!(moved > 1e-6, "{name}: the fixture did not move");
        assert!(err < 1e-4, "{name}: relative error {err:.3e}");
        checked += 1;
    }
    assert!(
        checked >= 4,
        "only {checked} running statistics in the fixture"
    );
}

/// `loss_total` and `grad.light_visual_encoder.*` of the full model fed with pixels: the
/// gradient flows back through the whole EfficientNet (depthwise backward, BatchNorm, SE).
fn light_encoder_gradients(train: bool) {
    let f = fixture();
    let prefix = if train { "train." } else { "" };
    let store = store(&f, Mode::Training);
    let mut model = Slot4ACir::new(&f.config, store.var_builder(&Device::Cpu)).unwrap();
    store.finish().unwrap();
    model.qformer.dropout = 0.0; // the fixture switches every dropout off
    let batch = TrainBatch {
        reference: LightInput::Pixels(f.inputs["reference_images"].clone()),
        reference_vit: VitInput::Pixels(f.inputs["reference_images"].clone()),
        target_vit: VitInput::Pixels(f.inputs["target_images"].clone()),
        input_ids: f.inputs["input_ids"].clone(),
        attention_mask: f.inputs["attention_mask"].clone(),
    };
    let losses = model.losses(&batch, &LossWeights::cirr(), train).unwrap();
    let total = losses
        .total
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let want = f.expected[&format!("{prefix}loss_total")]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    println!("{prefix}loss_total {total:.6} vs {want:.6}");
    assert!(
        (total - want).abs() < 1e-4,
        "{prefix}loss_total {total} vs {want}"
    );
    let grads = losses.total.backward().unwrap();
    let vars: HashMap<String, _> = store.trainable_vars().into_iter().collect();
    let mut checked = 0;
    let grad_prefix = format!("{prefix}grad.{PREFIX}.");
    for (key, want) in f
        .expected
        .iter()
        .filter(|(k, _)| k.starts_with(&grad_prefix))
    {
        let param = &key[format!("{prefix}grad.").len()..];
        let g = grads.get(vars[param].as_tensor()).unwrap();
        let err = rel_err(g, want);
        println!("{key}: relative error {err:.3e}");
        assert!(err < 1e-3, "{key}: relative error {err:.3e}");
        checked += 1;
    }
    assert!(checked >= 1, "no light-encoder gradient in the fixture");
}

#[test]
fn light_encoder_gradient_eval_mode() {
    light_encoder_gradients(false);
}

#[test]
fn light_encoder_gradient_training_mode() {
    light_encoder_gradients(true);
}
