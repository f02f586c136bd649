//! `slot4acir encode` end to end on a fixture: pixels and token ids from inputs.safetensors,
//! outputs compared with expected.safetensors.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use slot4acir::model::Slot4ACir;

use common::{fixture_dir, rel_err};

fn encode(dir: &Path, pixels_key: &str, out: &Path) -> std::collections::HashMap<String, Tensor> {
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
        .arg("--tokens")
        .arg(&inputs)
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

    let targets = encode(
        &dir,
        "target_images",
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

    let refs = encode(
        &dir,
        "reference_images",
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
