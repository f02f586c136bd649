//! `slot4acir eval` and `slot4acir submit` as a user runs them: a small benchmark in the CIRR
//! layout (the demo's generator, drawn objects), the parity-b0 fixture model, the binary. The
//! printed and written metrics equal the evaluation driver's on the same model, and the
//! submission files answer every test1 pair as the CIRR server expects.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use slot4acir::cli::eval::ModelData;
use slot4acir::data::{cirr, LoadOptions, SkipLog};
use slot4acir::demo::benchmark::{build, BenchmarkConfig};
use slot4acir::demo::objects::ObjectLibrary;
use slot4acir::eval::driver;

const BIN: &str = env!("CARGO_BIN_EXE_slot4acir");

/// The common model flags and the same as the library's `ModelData`.
fn model_flags(root: &Path) -> (Vec<String>, ModelData) {
    let fixture = common::fixture_dir("parity-b0");
    let (config, weights) = (
        fixture.join("meta.json"),
        fixture.join("weights.safetensors"),
    );
    let flags = vec![
        "--data-root".to_string(),
        root.display().to_string(),
        "--model-config".into(),
        config.display().to_string(),
        "--weights".into(),
        weights.display().to_string(),
        "--batch-size".into(),
        "8".into(),
        "--quiet".into(),
    ];
    let data = ModelData {
        data_root: Some(root.to_path_buf()),
        model_config: config.display().to_string(),
        weights,
        batch_size: 8,
        skip_bad_images: false,
        deterministic_slots: false,
        quiet: true,
    };
    (flags, data)
}

fn run(args: &[String]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "slot4acir {args:?} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn eval_and_submit_commands_on_a_small_cirr_benchmark() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let built = build(
        &root,
        &ObjectLibrary::drawn(12),
        &BenchmarkConfig {
            train_triplets: 4,
            val_images: 24,
            val_queries: 10,
            test_images: 24,
            test_queries: 8,
            variants: 5,
            train_variants: 5,
            image_size: 96,
            seed: 7,
        },
    )
    .unwrap();
    assert!(
        built.val_queries >= 10 && built.test_queries >= 8,
        "{built:?}"
    );
    let (flags, data) = model_flags(&root);

    // eval: JSON on stdout and in --out, with the reference's key names.
    let out_file = dir.path().join("metrics.json");
    let mut args = vec!["eval".to_string(), "--dataset".into(), "cirr".into()];
    args.extend(flags.iter().cloned());
    args.extend(["--out".to_string(), out_file.display().to_string()]);
    let stdout = run(&args);
    let written: Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    let start = stdout.find('{').expect("metrics JSON on stdout");
    let printed: Value = serde_json::from_str(stdout[start..].trim()).unwrap();
    assert_eq!(printed, written);
    let keys = [
        "recall_at1",
        "recall_at5",
        "recall_at10",
        "recall_at50",
        "group_recall_at1",
        "group_recall_at2",
        "group_recall_at3",
        "mean(R@5+R_s@1)",
        "arithmetic_mean",
        "harmonic_mean",
        "geometric_mean",
    ];
    let obj = written.as_object().unwrap();
    assert_eq!(obj.len(), keys.len(), "{written}");
    // The same figures as the driver on the same model, in process.
    let log = SkipLog::new(false);
    let mut val = cirr::load(&root, cirr::CirrSplit::Val, LoadOptions::default(), &log).unwrap();
    val.require_in_gallery(&log).unwrap();
    let enc = data.encoder().unwrap();
    let want = driver::cirr_val(&enc, &val, &data.options(), &log).unwrap();
    for k in keys {
        let got = obj[k].as_f64().unwrap_or_else(|| panic!("{k} missing"));
        let w = want.get(k).unwrap();
        assert!((got - w).abs() < 1e-9, "{k}: command {got}, driver {w}");
        assert!((0.0..=100.0).contains(&got), "{k} = {got}");
    }
    // Every query's target is among the 24 val images, so R@50 is 100.
    assert_eq!(obj["recall_at50"].as_f64(), Some(100.0));

    // submit: the two files, every test1 pair answered, never the reference.
    let sub_dir = dir.path().join("sub");
    let mut args = vec!["submit".to_string()];
    args.extend(flags.iter().cloned());
    args.extend([
        "--save-name".to_string(),
        "small".into(),
        "--out".into(),
        sub_dir.display().to_string(),
    ]);
    run(&args);
    let mut test = cirr::load(&root, cirr::CirrSplit::Test1, LoadOptions::default(), &log).unwrap();
    test.require_in_gallery(&log).unwrap();
    let gallery: HashSet<&str> = test.gallery.iter().map(|g| g.name.as_str()).collect();
    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(sub_dir.join(name)).unwrap()).unwrap()
    };
    let recall = read("recall_submission_small.json");
    let subset = read("recall_subset_submission_small.json");
    assert_eq!(recall["version"], "rc2");
    assert_eq!(recall["metric"], "recall");
    assert_eq!(subset["metric"], "recall_subset");
    assert_eq!(recall.as_object().unwrap().len(), test.triplets.len() + 2);
    assert_eq!(subset.as_object().unwrap().len(), test.triplets.len() + 2);
    for t in &test.triplets {
        let id = t.pair_id.to_string();
        let top: Vec<&str> = recall[&id]
            .as_array()
            .unwrap_or_else(|| panic!("pair {id} not answered"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        // The whole gallery but the reference (fewer than 50 images), each once.
        assert_eq!(top.len(), gallery.len() - 1);
        assert_eq!(top.iter().collect::<HashSet<_>>().len(), top.len());
        assert!(top.iter().all(|n| gallery.contains(n) && *n != t.reference));
        let sub: Vec<&str> = subset[&id]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(sub.len(), 3.min(t.members.len() - 1));
        assert!(sub
            .iter()
            .all(|n| t.members.iter().any(|m| m == n) && *n != t.reference));
    }
}
