//! The frozen-ViT feature cache: rows equal the ViT's outputs (exactly in float32), persist
//! across runs, survive an interrupted write, refuse a folder of another encoder, and a
//! `slot4acir train` run with the float32 cache writes the same checkpoint as one without.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use slot4acir::config::ModelConfig;
use slot4acir::demo::benchmark::{build, BenchmarkConfig};
use slot4acir::demo::objects::ObjectLibrary;
use slot4acir::model::{LightInput, LossWeights, Slot4ACir, TrainBatch, VitInput};
use slot4acir::train::trainer::{LAST_CHECKPOINT, VALIDATION_CSV};
use slot4acir::train::vit_cache::{vision_fingerprint, CacheDType, VitCache};
use slot4acir::weights::{load_state_dict, Mode, ParamStore};

const BIN: &str = env!("CARGO_BIN_EXE_slot4acir");

struct Fx {
    cfg: ModelConfig,
    weights: HashMap<String, Tensor>,
    inputs: HashMap<String, Tensor>,
}

fn fixture() -> Fx {
    let dir = common::fixture_dir("parity-b0");
    Fx {
        cfg: ModelConfig::load(dir.join("meta.json").to_str().unwrap()).unwrap(),
        weights: load_state_dict(&dir.join("weights.safetensors")).unwrap(),
        inputs: candle_core::safetensors::load(dir.join("inputs.safetensors"), &Device::Cpu)
            .unwrap(),
    }
}

fn model(fx: &Fx, weights: HashMap<String, Tensor>) -> (Slot4ACir, ParamStore) {
    let store = ParamStore::new(weights, "parity-b0", Mode::Training, false);
    let mut m = Slot4ACir::new(&fx.cfg, store.var_builder(&Device::Cpu)).unwrap();
    store.finish().unwrap();
    m.qformer.dropout = 0.0;
    (m, store)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn rows_equal_the_vit_and_persist() {
    let fx = fixture();
    let (m, store) = model(&fx, fx.weights.clone());
    let dir = tempfile::tempdir().unwrap();
    let refs = &fx.inputs["reference_images"];
    let targets = &fx.inputs["target_images"];
    let want = m.vit_features(targets).unwrap();

    let cache = VitCache::for_model(dir.path(), &m, &store, CacheDType::F32).unwrap();
    let got = cache.features(&m, targets).unwrap();
    assert_eq!(got.dims(), want.dims());
    assert_eq!(
        max_abs(&got, &want),
        0.0,
        "float32 rows are the ViT's outputs"
    );
    // Targets 2 and 3 are reference images 0 and 1: the same pixels, the same rows.
    let got_refs = cache.features(&m, refs).unwrap();
    assert_eq!(max_abs(&got_refs, &m.vit_features(refs).unwrap()), 0.0);
    let stats = cache.stats();
    println!("{stats:?}, {} rows", cache.len());
    assert_eq!(cache.len(), 6, "6 distinct images among the 8 inputs");
    assert_eq!((stats.computed, stats.hits), (6, 2));

    // A training step from cached rows equals one from pixels, bit for bit.
    let batch = |vit: &dyn Fn(&Tensor) -> VitInput| TrainBatch {
        reference: LightInput::Pixels(refs.clone()),
        reference_vit: vit(refs),
        target_vit: vit(targets),
        input_ids: fx.inputs["input_ids"].clone(),
        attention_mask: fx.inputs["attention_mask"].clone(),
    };
    let w = LossWeights::cirr();
    let from_pixels = m
        .losses(&batch(&|p| VitInput::Pixels(p.clone())), &w, true)
        .unwrap();
    let from_cache = m
        .losses(
            &batch(&|p| VitInput::Features(cache.features(&m, p).unwrap())),
            &w,
            true,
        )
        .unwrap();
    let scalar = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert_eq!(scalar(&from_pixels.total), scalar(&from_cache.total));

    // Reopened: every row is read back from disk, nothing recomputed.
    drop(cache);
    let again = VitCache::for_model(dir.path(), &m, &store, CacheDType::F32).unwrap();
    assert_eq!(again.len(), 6);
    assert_eq!(max_abs(&again.features(&m, targets).unwrap(), &want), 0.0);
    assert_eq!(again.stats().computed, 0);

    // float16: half the bytes, within float16 rounding.
    let half = VitCache::for_model(dir.path(), &m, &store, CacheDType::F16).unwrap();
    let h = half.features(&m, targets).unwrap();
    let err = common::rel_err(&h, &want);
    println!("float16 rows: relative error {err:.2e}");
    assert!(err > 0.0 && err < 1e-3, "float16 error {err}");
    assert_ne!(half.dir(), again.dir());
}

#[test]
fn other_weights_other_folder_and_interrupted_writes_are_cut_off() {
    let fx = fixture();
    let (m, store) = model(&fx, fx.weights.clone());
    let fp = vision_fingerprint(&m, &store).unwrap();
    // Another ViT (one weight changed): another fingerprint.
    let mut other = fx.weights.clone();
    let key = "visual_encoder.cls_token";
    other.insert(key.into(), (&fx.weights[key] + 1e-3).unwrap());
    let (m2, store2) = model(&fx, other);
    assert_ne!(fp, vision_fingerprint(&m2, &store2).unwrap());
    // The Q-Former is not part of it.
    let mut qf = fx.weights.clone();
    let key = "Qformer.bert.embeddings.LayerNorm.weight";
    qf.insert(key.into(), (&fx.weights[key] * 2.0).unwrap());
    let (m3, store3) = model(&fx, qf);
    assert_eq!(fp, vision_fingerprint(&m3, &store3).unwrap());

    let dir = tempfile::tempdir().unwrap();
    let targets = &fx.inputs["target_images"];
    let cache = VitCache::for_model(dir.path(), &m, &store, CacheDType::F32).unwrap();
    cache.features(&m, targets).unwrap();
    let folder = cache.dir().to_path_buf();
    drop(cache);
    // A crash after writing half a row and a key without its row.
    let append = |name: &str, bytes: &[u8]| {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(folder.join(name))
            .unwrap();
        f.write_all(bytes).unwrap();
    };
    append("rows.bin", &[7u8; 1000]);
    append("keys.bin", &[9u8; 32]);
    let cache = VitCache::for_model(dir.path(), &m, &store, CacheDType::F32).unwrap();
    assert_eq!(cache.len(), 4);
    let want = m.vit_features(targets).unwrap();
    assert_eq!(max_abs(&cache.features(&m, targets).unwrap(), &want), 0.0);
    assert_eq!(cache.stats().computed, 0);
    drop(cache);

    // A folder whose description disagrees is refused, naming the file.
    let meta = folder.join("meta.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, text.replace("\"tokens\": ", "\"tokens\": 1")).unwrap();
    let err = VitCache::for_model(dir.path(), &m, &store, CacheDType::F32)
        .err()
        .expect("mismatched description refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("meta.json"), "{msg}");
}

fn train(root: &Path, save: &Path, cache: &[&str]) -> PathBuf {
    let fixture = common::fixture_dir("parity-b0");
    let mut args: Vec<String> = [
        "train",
        "--dataset",
        "cirr",
        "--num-epochs",
        "1",
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--save-training",
        "--exp-name",
        "run",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, value) in [
        ("--data-root", root.to_path_buf()),
        ("--model-config", fixture.join("meta.json")),
        ("--init-weights", fixture.join("weights.safetensors")),
        ("--save-dir", save.to_path_buf()),
    ] {
        args.push(flag.into());
        args.push(value.display().to_string());
    }
    args.extend(cache.iter().map(|s| s.to_string()));
    let out = Command::new(BIN).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "slot4acir {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs = save.join("cirr");
    let mut dirs: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs.pop().expect("a run folder")
}

#[test]
fn training_with_the_float32_cache_equals_training_without() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    build(
        &root,
        &ObjectLibrary::drawn(12),
        &BenchmarkConfig {
            train_triplets: 8,
            val_images: 12,
            val_queries: 6,
            test_images: 6,
            test_queries: 2,
            variants: 4,
            train_variants: 4,
            image_size: 64,
            seed: 3,
        },
    )
    .unwrap();
    let plain = train(&root, &dir.path().join("plain"), &["--no-vit-cache"]);
    let cache_root = dir.path().join("cache");
    let cache_flag = cache_root.display().to_string();
    let flags = [
        "--vit-cache",
        cache_flag.as_str(),
        "--vit-cache-dtype",
        "f32",
    ];
    let first = train(&root, &dir.path().join("cached1"), &flags);
    let second = train(&root, &dir.path().join("cached2"), &flags);
    let read = |run: &Path| load_state_dict(&run.join(LAST_CHECKPOINT)).unwrap();
    let want = read(&plain);
    for run in [&first, &second] {
        let got = read(run);
        assert_eq!(got.len(), want.len());
        for (k, w) in &want {
            let g = &got[k];
            let values = |t: &Tensor| {
                t.flatten_all()
                    .and_then(|t| t.to_dtype(candle_core::DType::F64))
                    .and_then(|t| t.to_vec1::<f64>())
                    .unwrap()
            };
            let same = values(g) == values(w);
            assert!(
                same,
                "{}: {k} differs from the run without cache",
                run.display()
            );
        }
        let csv = |r: &Path| std::fs::read_to_string(r.join(VALIDATION_CSV)).unwrap();
        assert_eq!(csv(run), csv(&plain), "validation metrics");
    }
    // The cache folder holds every training and validation image once.
    let folders: Vec<_> = std::fs::read_dir(&cache_root).unwrap().collect();
    assert_eq!(folders.len(), 1);
    let keys = folders[0].as_ref().unwrap().path().join("keys.bin");
    let rows = std::fs::metadata(keys).unwrap().len() / 32;
    println!("{rows} cached images");
    assert!(rows >= 12, "{rows} rows");
}
