//! Index → search equals scoring with the model directly; resumed builds equal one-shot
//! builds; mismatched models and damaged files are refused.

mod gallery;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Result;
use candle_core::{Device, Tensor};
use half::f16;
use slot4acir::index::build::{list_image_dir, partial_dir};
use slot4acir::index::format::{Dtype, Layout};
use slot4acir::index::{
    build_index, BuildOptions, Encoder, Index, Query, QueryImage, Searcher, ToyEncoder,
};

/// Counts gallery batches and fails after `fail_after` of them (a simulated interruption).
struct Flaky {
    inner: ToyEncoder,
    calls: AtomicUsize,
    fail_after: usize,
}

impl Encoder for Flaky {
    fn layout(&self) -> Layout {
        self.inner.layout()
    }
    fn model_config(&self) -> serde_json::Value {
        self.inner.model_config()
    }
    fn fingerprint(&self) -> String {
        self.inner.fingerprint()
    }
    fn preprocess(&self, encoded: &[u8]) -> Result<Tensor> {
        self.inner.preprocess(encoded)
    }
    fn encode_gallery(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.calls.fetch_add(1, Ordering::SeqCst) >= self.fail_after {
            anyhow::bail!("simulated interruption");
        }
        self.inner.encode_gallery(pixels)
    }
    fn light_tokens(&self, pixels: &Tensor) -> Result<Tensor> {
        self.inner.light_tokens(pixels)
    }
    fn encode_query(&self, tokens: &Tensor, texts: &[String]) -> Result<Tensor> {
        self.inner.encode_query(tokens, texts)
    }
}

fn opts(dtype: Dtype) -> BuildOptions {
    BuildOptions {
        dtype,
        batch_size: 4,
        progress: false,
    }
}

/// The encoder's own outputs for every gallery image, in f32.
fn direct(enc: &ToyEncoder, dir: &Path) -> (Tensor, Tensor) {
    let imgs = list_image_dir(dir).unwrap();
    let px: Vec<Tensor> = imgs
        .iter()
        .map(|g| {
            enc.preprocess(&std::fs::read(dir.join(&g.path)).unwrap())
                .unwrap()
        })
        .collect();
    enc.encode_gallery(&Tensor::stack(&px, 0).unwrap()).unwrap()
}

#[test]
fn index_search_matches_direct_scoring_within_float16_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = gallery::write_gallery(tmp.path(), 11);
    let enc = Arc::new(ToyEncoder::new(3, 12, gallery::LAYOUT).unwrap());
    let (g_direct, t_direct) = direct(&enc, &dir);
    let l = gallery::LAYOUT;
    let g_flat = g_direct.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let t_flat = t_direct.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let images = list_image_dir(&dir).unwrap();
    let n = images.len();

    for (dtype, tol) in [(Dtype::F32, 1e-5f32), (Dtype::F16, 3e-3)] {
        let out = tmp.path().join(format!("{dtype:?}.s4idx"));
        let report = build_index(enc.as_ref(), &images, &dir, &out, &opts(dtype)).unwrap();
        assert_eq!((report.total, report.encoded, report.resumed), (n, n, 0));
        assert!(!partial_dir(&out).exists());
        let index = Index::open(&out).unwrap();
        assert_eq!(index.len(), n);
        assert_eq!(index.images(), images.as_slice());
        // Stored values are the encoder's, rounded once to the storage type.
        let round = |x: f32| match dtype {
            Dtype::F16 => f16::from_f32(x).to_f32(),
            Dtype::F32 => x,
        };
        for i in 0..n {
            let want: Vec<f32> = g_flat[i * l.vector_elems()..(i + 1) * l.vector_elems()]
                .iter()
                .map(|x| round(*x))
                .collect();
            assert_eq!(index.vectors_f32(i), want);
            let want: Vec<f32> = t_flat[i * l.token_elems()..(i + 1) * l.token_elems()]
                .iter()
                .map(|x| round(*x))
                .collect();
            assert_eq!(index.tokens_f32(i), want);
        }

        let searcher = Searcher::new(index, enc.clone()).unwrap();
        let texts = ["make it red", "", "add a dog and more sky"];
        let upload = enc
            .preprocess(&std::fs::read(dir.join(&images[2].path)).unwrap())
            .unwrap();
        let mut queries = Vec::new();
        for (r, text) in [(0usize, texts[0]), (5, texts[1]), (n - 1, texts[2])] {
            queries.push(Query {
                image: QueryImage::Reference(r),
                text: text.into(),
                k: 4,
            });
        }
        queries.push(Query {
            image: QueryImage::Pixels(upload.clone()),
            text: texts[0].into(),
            k: n + 3,
        });
        let got = searcher.search(&queries).unwrap();

        for (q, found) in queries.iter().zip(&got) {
            // Direct: the model's own tokens, query vector and f32 gallery vectors.
            let (tokens, exclude) = match q.image {
                QueryImage::Reference(r) => (t_direct.get(r).unwrap(), Some(r)),
                QueryImage::Pixels(_) => (
                    enc.light_tokens(&upload.unsqueeze(0).unwrap())
                        .unwrap()
                        .get(0)
                        .unwrap(),
                    None,
                ),
            };
            let qv = enc
                .encode_query(&tokens.unsqueeze(0).unwrap(), std::slice::from_ref(&q.text))
                .unwrap();
            let scores = g_direct
                .broadcast_matmul(&qv.t().unwrap())
                .unwrap()
                .squeeze(2)
                .unwrap()
                .max(1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut rank: Vec<usize> = (0..n).filter(|i| Some(*i) != exclude).collect();
            rank.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
            rank.truncate(q.k);
            assert_eq!(found.len(), rank.len());
            for (f, want) in found.iter().zip(&rank) {
                // Same ranking up to ties within the storage rounding, same scores.
                assert!(
                    (f.score - scores[*want]).abs() < tol,
                    "{dtype:?}: {} vs {}",
                    f.score,
                    scores[*want]
                );
                assert!((scores[f.index] - scores[*want]).abs() < tol);
                if dtype == Dtype::F32 {
                    assert_eq!(f.index, *want);
                }
                assert_eq!(f.name, images[f.index].name);
            }
        }
    }
}

#[test]
fn resumed_build_equals_one_shot_build() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = gallery::write_gallery(tmp.path(), 13);
    let images = list_image_dir(&dir).unwrap();
    let toy = || ToyEncoder::new(5, 10, gallery::LAYOUT).unwrap();

    let one_shot = tmp.path().join("one.s4idx");
    build_index(&toy(), &images, &dir, &one_shot, &opts(Dtype::F16)).unwrap();

    let resumed = tmp.path().join("resumed.s4idx");
    let flaky = Flaky {
        inner: toy(),
        calls: AtomicUsize::new(0),
        fail_after: 2,
    };
    let err = build_index(&flaky, &images, &dir, &resumed, &opts(Dtype::F16)).unwrap_err();
    assert!(
        format!("{err:#}").contains("simulated interruption"),
        "{err:#}"
    );
    assert!(!resumed.exists());
    assert!(partial_dir(&resumed).join("plan.json").exists());

    // Other arguments must not silently mix with the interrupted build.
    let err = build_index(&toy(), &images, &dir, &resumed, &opts(Dtype::F32)).unwrap_err();
    assert!(format!("{err:#}").contains("interrupted build"), "{err:#}");

    let counting = Flaky {
        inner: toy(),
        calls: AtomicUsize::new(0),
        fail_after: usize::MAX,
    };
    let report = build_index(&counting, &images, &dir, &resumed, &opts(Dtype::F16)).unwrap();
    assert_eq!((report.total, report.resumed, report.encoded), (13, 8, 5));
    assert_eq!(
        counting.calls.load(Ordering::SeqCst),
        2,
        "only the two missing batches"
    );
    assert_eq!(
        std::fs::read(&one_shot).unwrap(),
        std::fs::read(&resumed).unwrap()
    );
    assert!(!partial_dir(&resumed).exists());
}

#[test]
fn mismatched_models_and_damaged_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = gallery::write_gallery(tmp.path(), 3);
    let images = list_image_dir(&dir).unwrap();
    let out = tmp.path().join("g.s4idx");
    build_index(
        &ToyEncoder::new(1, 8, gallery::LAYOUT).unwrap(),
        &images,
        &dir,
        &out,
        &opts(Dtype::F16),
    )
    .unwrap();

    let other = Arc::new(ToyEncoder::new(2, 8, gallery::LAYOUT).unwrap());
    let err = Searcher::new(Index::open(&out).unwrap(), other)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("different model configuration"),
        "{err:#}"
    );

    // Same configuration, other weights: the fingerprint catches it.
    let index = Index::open(&out).unwrap();
    let same_cfg = ToyEncoder::new(1, 8, gallery::LAYOUT).unwrap();
    assert!(index
        .check_model(&same_cfg.model_config(), "0123", same_cfg.layout())
        .is_err());
    let err = index
        .check_model(&same_cfg.model_config(), "0123", same_cfg.layout())
        .unwrap_err();
    assert!(err.to_string().contains("fingerprint"), "{err}");
    assert!(index
        .check_model(
            &same_cfg.model_config(),
            &same_cfg.fingerprint(),
            same_cfg.layout()
        )
        .is_ok());

    let bytes = std::fs::read(&out).unwrap();
    let bad = tmp.path().join("bad.s4idx");
    let mut wrong_magic = bytes.clone();
    wrong_magic[0] = b'X';
    std::fs::write(&bad, &wrong_magic).unwrap();
    let err = Index::open(&bad).err().unwrap();
    assert!(format!("{err:#}").contains("bad magic") && format!("{err:#}").contains("bad.s4idx"));
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    assert!(format!("{:#}", Index::open(&bad).err().unwrap()).contains("truncated"));
    std::fs::write(&bad, b"").unwrap();
    assert!(Index::open(&bad).is_err());
    let _ = Device::Cpu;
}
