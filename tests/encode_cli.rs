//! `slot4acir encode` end to end on a fixture: pixels from inputs.safetensors, texts as its
//! token ids or as the raw captions of meta.json; outputs compared with expected.safetensors.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use slot4acir::model::Slot4ACir;

use common::{fixture_dir, rel_err};

/// Runs the command on the fixture's `pixels_key` images with `text_args` (--tokens or --texts).
fn encode(
    dir: &Path,
    pixels_key: &str,
    text_args: &[String],
    out: &Path,
) -> std::collections::HashMap<String, Tensor> {
    let inputs = dir.join("inputs.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_slot4acir"))
        .arg("encode")
        .arg("--model-config")
        .arg(dir.join("meta.json"))
        .arg("--weights")
        .arg(dir.join("weights.safetensors"))
        .arg("--pixels")
        .arg(&inputs)
        .args(["--pixels-key", pixels_key])
        .args(text_args)
        .args(["--batch-size", "3"]) // two batches of 4 images: exercises the concatenation
        .arg("--out")
        .arg(out)
        .status()
        .expect("running slot4acir encode");
    assert!(status.success(), "slot4acir encode failed: {status}");
    candle_core::safetensors::load(out, &Device::Cpu).expect("reading the encode output")
}

fn check(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let e = rel_err(got, want);
    println!("{what}: relative error {e:.3e}");
    assert!(e < 1e-4, "{what}: relative error {e:.3e}");
}

#[test]
fn encode_matches_the_fixture() {
    let dir = fixture_dir("parity-b0");
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    let inputs = dir.join("inputs.safetensors").display().to_string();
    let tokens = ["--tokens".to_string(), inputs];
    let targets = encode(
        &dir,
        "target_images",
        &tokens,
        &tmp.path().join("targets.safetensors"),
    );
    check(
        "target_feats",
        &targets["target_feats"],
        &expected["target_feats"],
    );
    check(
        "light_tokens",
        &targets["light_tokens"],
        &expected["target_light_tokens"],
    );
    assert_eq!(targets["scores"].dims(), [4, 4]);

    // The references with the raw captions: caption processing and tokenizer included.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let mut texts = vec!["--texts".to_string()];
    for c in meta["raw_captions"].as_array().unwrap() {
        texts.push(c.as_str().unwrap().to_string());
    }
    let refs = encode(
        &dir,
        "reference_images",
        &texts,
        &tmp.path().join("refs.safetensors"),
    );
    check("slots", &refs["slots"], &expected["slots"]);
    // Queries from the references and their texts against the targets' gallery vectors.
    let sims = Slot4ACir::scores(&refs["query_feats"], &targets["target_feats"]).unwrap();
    check("inference_sims", &sims, &expected["inference_sims"]);
    // The command's own scores are queries × the same images' gallery vectors.
    let own = Slot4ACir::scores(&refs["query_feats"], &refs["target_feats"]).unwrap();
    check("scores", &refs["scores"], &own);
}
