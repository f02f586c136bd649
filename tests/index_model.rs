//! The deployment with the real model against the reference fixtures: an index of the fixture's
//! target images holds the reference gallery vectors and light tokens, and searching it with
//! (reference image, caption) queries gives the reference `inference_sims`; the CLI does the
//! same end to end; other weights are refused.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use slot4acir::config::ModelConfig;
use slot4acir::index::format::{Dtype, GalleryImage};
use slot4acir::index::model_encoder::ModelEncoder;
use slot4acir::index::{build_index, BuildOptions, Encoder, Index, Query, QueryImage, Searcher};

fn meta(fx: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fx.join("meta.json")).unwrap()).unwrap()
}

fn files(meta: &serde_json::Value, key: &str) -> Vec<String> {
    meta[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn index_and_search_reproduce_the_reference_scores() {
    let fx = common::fixture_dir("parity-b0");
    let meta = meta(&fx);
    let cfg = ModelConfig::load(fx.join("meta.json").to_str().unwrap()).unwrap();
    let weights = fx.join("weights.safetensors");
    let enc = Arc::new(ModelEncoder::load(&cfg, &weights).unwrap());
    let expected =
        candle_core::safetensors::load(fx.join("expected.safetensors"), &Device::Cpu).unwrap();
    let sims = expected["inference_sims"].to_vec2::<f32>().unwrap();
    let targets = files(&meta, "target_image_files");
    let refs = files(&meta, "reference_image_files");
    let captions = files(&meta, "raw_captions");
    // Gallery j = target image j (a file may appear twice under two names).
    let gallery: Vec<GalleryImage> = targets
        .iter()
        .enumerate()
        .map(|(j, f)| GalleryImage {
            name: format!("target{j}"),
            path: f.clone(),
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();

    for (dtype, tol) in [(Dtype::F32, 1e-4f32), (Dtype::F16, 3e-3)] {
        let out = tmp.path().join(format!("{dtype:?}.s4idx"));
        let opts = BuildOptions {
            dtype,
            batch_size: 3,
            progress: false,
        };
        build_index(enc.as_ref(), &gallery, &fx.join("images"), &out, &opts).unwrap();
        let index = Index::open(&out).unwrap();
        if dtype == Dtype::F32 {
            // The stored gallery vectors and tokens are the reference's.
            let n = gallery.len();
            let l = index.layout();
            let v: Vec<f32> = (0..n).flat_map(|i| index.vectors_f32(i)).collect();
            let v = Tensor::from_vec(v, (n, l.vectors_per_image, l.dim), &Device::Cpu).unwrap();
            let e = common::rel_err(&v, &expected["target_feats"]);
            assert!(e < 1e-4, "gallery vectors: relative error {e}");
            let t: Vec<f32> = (0..n).flat_map(|i| index.tokens_f32(i)).collect();
            let t =
                Tensor::from_vec(t, (n, l.tokens_per_image, l.token_dim), &Device::Cpu).unwrap();
            let e = common::rel_err(&t, &expected["target_light_tokens"]);
            assert!(e < 1e-4, "light tokens: relative error {e}");
        }
        let searcher = Searcher::new(index, enc.clone()).unwrap();
        let queries: Vec<Query> = refs
            .iter()
            .zip(&captions)
            .map(|(r, c)| Query {
                image: QueryImage::Pixels(
                    enc.preprocess(&std::fs::read(fx.join("images").join(r)).unwrap())
                        .unwrap(),
                ),
                text: c.clone(),
                k: gallery.len(),
            })
            .collect();
        let results = searcher.search(&queries).unwrap();
        let mut worst = 0f32;
        for (i, found) in results.iter().enumerate() {
            assert_eq!(found.len(), gallery.len());
            let by_name: HashMap<&str, f32> =
                found.iter().map(|f| (f.name.as_str(), f.score)).collect();
            for (j, want) in sims[i].iter().enumerate() {
                let got = by_name[format!("target{j}").as_str()];
                worst = worst.max((got - want).abs());
            }
            assert!(found.windows(2).all(|p| p[0].score >= p[1].score));
        }
        assert!(
            worst < tol,
            "{dtype:?}: scores differ from inference_sims by up to {worst}"
        );
        println!("{dtype:?} index: max |score - reference| = {worst:.2e}");

        // A gallery image as the reference: its tokens come from the index, and the query
        // equals one built from the same image file (up to the stored type's rounding).
        let by_ref = searcher
            .search(&[Query {
                image: QueryImage::Reference(2),
                text: captions[0].clone(),
                k: 3,
            }])
            .unwrap()
            .remove(0);
        assert!(
            by_ref.iter().all(|f| f.name != "target2"),
            "the reference is left out"
        );
        let px = enc
            .preprocess(&std::fs::read(fx.join("images").join(&targets[2])).unwrap())
            .unwrap();
        let by_px = searcher
            .search(&[Query {
                image: QueryImage::Pixels(px),
                text: captions[0].clone(),
                k: 4,
            }])
            .unwrap()
            .remove(0);
        for f in &by_ref {
            let same = by_px.iter().find(|p| p.name == f.name).unwrap();
            assert!(
                (same.score - f.score).abs() < tol,
                "{} vs {}",
                same.score,
                f.score
            );
        }
    }
}

#[test]
fn cli_index_then_search_and_other_weights_are_refused() {
    let fx = common::fixture_dir("parity-b0");
    let tmp = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_slot4acir");
    let weights = fx.join("weights.safetensors");
    let out = tmp.path().join("fx.s4idx");
    let run = |args: &[&str]| {
        let o = Command::new(bin).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run(&[
        "index",
        "--model-config",
        fx.join("meta.json").to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--images",
        fx.join("images").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "4",
        "--quiet",
    ]);
    assert!(ok, "index failed: {err}");
    let (ok, stdout, err) = run(&[
        "search",
        "--index",
        out.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--reference",
        "img0",
        "--text",
        "make it red",
        "-k",
        "3",
        "--json",
    ]);
    assert!(ok, "search failed: {err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert!(results
        .iter()
        .all(|r| r["name"] != "img0" && r["score"].is_number()));

    // Table output with an uploaded image file.
    let (ok, stdout, err) = run(&[
        "search",
        "--index",
        out.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--image",
        fx.join("images/img3.png").to_str().unwrap(),
        "--text",
        "make it red",
    ]);
    assert!(ok, "search failed: {err}");
    assert_eq!(
        stdout.lines().count(),
        1 + 6,
        "header and all six images:\n{stdout}"
    );

    // Weights that differ in one value: the fingerprint refuses them.
    let mut sd = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let b = sd["text_proj.bias"].clone();
    sd.insert("text_proj.bias".into(), (b + 1e-3).unwrap());
    let other = tmp.path().join("other.safetensors");
    candle_core::safetensors::save(&sd, &other).unwrap();
    let (ok, _, err) = run(&[
        "search",
        "--index",
        out.to_str().unwrap(),
        "--weights",
        other.to_str().unwrap(),
        "--reference",
        "img0",
        "--text",
        "x",
    ]);
    assert!(!ok);
    assert!(
        err.contains("fingerprint") && err.contains("refusing"),
        "{err}"
    );
}
