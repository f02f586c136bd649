//! The evaluation driver with the toy encoder: the gallery is encoded once per image, queries
//! reuse the gallery's light tokens, and the metrics and answers equal an independent
//! per-image computation.

mod common;
mod data_support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use slot4acir::data::{cirr, fashioniq, Dataset, LoadOptions, SkipLog};
use slot4acir::eval::driver::{
    cirr_test1, cirr_val, fashioniq_val, fashioniq_val_datasets, EvalOptions,
};
use slot4acir::eval::metrics::{cirr_metrics, fashioniq_metrics, fashioniq_recalls, CirrRanks};
use slot4acir::index::{Encoder, Layout, ToyEncoder};

const LAYOUT: Layout = Layout {
    vectors_per_image: 4,
    dim: 16,
    tokens_per_image: 3,
    token_dim: 8,
};

/// The toy encoder, counting what the driver asks of it.
struct Counting {
    inner: ToyEncoder,
    gallery_images: AtomicUsize,
    light_token_calls: AtomicUsize,
    queries: AtomicUsize,
}

impl Counting {
    fn new() -> Self {
        Self {
            inner: ToyEncoder::new(5, data_support::SIDE, LAYOUT).unwrap(),
            gallery_images: AtomicUsize::new(0),
            light_token_calls: AtomicUsize::new(0),
            queries: AtomicUsize::new(0),
        }
    }
}

impl Encoder for Counting {
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
        self.gallery_images
            .fetch_add(pixels.dim(0)?, Ordering::SeqCst);
        self.inner.encode_gallery(pixels)
    }
    fn light_tokens(&self, pixels: &Tensor) -> Result<Tensor> {
        self.light_token_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.light_tokens(pixels)
    }
    fn encode_query(&self, tokens: &Tensor, texts: &[String]) -> Result<Tensor> {
        self.queries.fetch_add(texts.len(), Ordering::SeqCst);
        self.inner.encode_query(tokens, texts)
    }
}

const WORDS: [&str; 8] = [
    "red", "blue", "bigger", "two", "dogs", "remove", "add", "shiny",
];

fn caption(rng: &mut impl Rng) -> String {
    (0..4)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// A CIRR split of `n` images and `q` triplets under `root`, images written.
fn synthetic_cirr(root: &Path, split: &str, n: usize, q: usize, rng: &mut impl Rng) {
    let dir = root.join("CIRR/cirr");
    std::fs::create_dir_all(dir.join("captions")).unwrap();
    std::fs::create_dir_all(dir.join("image_splits")).unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("{split}-{i}-img0")).collect();
    let map: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .map(|n| (n.clone(), format!("./{split}/{n}.png").into()))
        .collect();
    std::fs::write(
        dir.join(format!("image_splits/split.rc2.{split}.json")),
        serde_json::to_string(&map).unwrap(),
    )
    .unwrap();
    for name in &names {
        let c: [u8; 3] = rng.gen();
        data_support::write_png(&root.join(format!("CIRR/{split}/{name}.png")), c);
    }
    let triplets: Vec<serde_json::Value> = (0..q)
        .map(|i| {
            let mut pick: Vec<&String> = names.choose_multiple(rng, 6).collect();
            pick.shuffle(rng);
            let mut t = serde_json::json!({
                "pairid": 1000 + i, "reference": pick[0], "caption": caption(rng),
                "img_set": {"id": i, "members": pick},
            });
            if split != "test1" {
                t["target_hard"] = pick[1].clone().into();
            }
            t
        })
        .collect();
    std::fs::write(
        dir.join(format!("captions/cap.rc2.{split}.json")),
        serde_json::to_string(&triplets).unwrap(),
    )
    .unwrap();
}

/// What the driver should compute, image by image: gallery vectors one image at a time, the
/// query from the reference image's own light tokens; scores = max over the image's vectors.
fn independent_scores(enc: &ToyEncoder, ds: &Dataset) -> (Vec<String>, Vec<Vec<f32>>) {
    let pix = |path: &Path| {
        enc.preprocess(&std::fs::read(path).unwrap())
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    let mut names = Vec::new();
    let mut gallery = Vec::new();
    for g in &ds.gallery {
        let Ok(bytes) = std::fs::read(&g.path) else {
            continue;
        };
        let Ok(p) = enc.preprocess(&bytes) else {
            continue;
        };
        let (v, _) = enc.encode_gallery(&p.unsqueeze(0).unwrap()).unwrap();
        gallery.push(v.squeeze(0).unwrap().to_vec2::<f32>().unwrap());
        names.push(g.name.clone());
    }
    let scores = ds
        .triplets
        .iter()
        .map(|t| {
            let tokens = enc
                .light_tokens(&pix(&ds.image_path(&t.reference).unwrap()))
                .unwrap();
            let q = enc.encode_query(&tokens, &[t.text.eval_caption()]).unwrap();
            let q: Vec<f32> = q.squeeze(0).unwrap().to_vec1().unwrap();
            gallery
                .iter()
                .map(|vs| {
                    vs.iter()
                        .map(|v| v.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>())
                        .fold(f32::MIN, f32::max)
                })
                .collect()
        })
        .collect();
    (names, scores)
}

/// Names of the gallery sorted by descending score.
fn sorted_names<'a>(names: &'a [String], scores: &[f32]) -> Vec<&'a str> {
    let mut idx: Vec<usize> = (0..names.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    idx.into_iter().map(|i| names[i].as_str()).collect()
}

fn opts() -> EvalOptions {
    EvalOptions {
        batch_size: 7,
        score_chunk: 5,
        progress: false,
    }
}

#[test]
fn cirr_val_encodes_each_image_once_and_matches_independent_ranks() {
    let root = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    synthetic_cirr(root.path(), "val", 40, 25, &mut rng);
    let log = SkipLog::new(false);
    let mut ds = cirr::load(
        root.path(),
        cirr::CirrSplit::Val,
        LoadOptions::default(),
        &log,
    )
    .unwrap();
    ds.require_in_gallery(&log).unwrap();
    let enc = Counting::new();
    let m = cirr_val(&enc, &ds, &opts(), &log).unwrap();
    assert_eq!(
        enc.gallery_images.load(Ordering::SeqCst),
        40,
        "each gallery image encoded once"
    );
    assert_eq!(
        enc.light_token_calls.load(Ordering::SeqCst),
        0,
        "queries reuse the gallery's tokens"
    );
    assert_eq!(enc.queries.load(Ordering::SeqCst), 25);

    let (names, scores) = independent_scores(&enc.inner, &ds);
    let ranks: Vec<CirrRanks> = ds
        .triplets
        .iter()
        .zip(&scores)
        .map(|(t, s)| {
            let order: Vec<&str> = sorted_names(&names, s)
                .into_iter()
                .filter(|n| *n != t.reference)
                .collect();
            let target = t.target.as_deref().unwrap();
            let rank = order.iter().position(|n| *n == target).unwrap();
            let subset: Vec<&&str> = order
                .iter()
                .filter(|n| t.members.iter().any(|m| m == **n))
                .collect();
            let subset_rank = subset.iter().position(|n| **n == target).unwrap();
            CirrRanks { rank, subset_rank }
        })
        .collect();
    assert_eq!(m, cirr_metrics(&ranks).unwrap());
    assert!(m.get("recall_at50").unwrap() == 100.0 && m.get("group_recall_at3").unwrap() < 100.0);
}

#[test]
fn cirr_val_skips_bad_images_only_when_asked() {
    let root = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    synthetic_cirr(root.path(), "val", 30, 20, &mut rng);
    let strict = SkipLog::new(false);
    let mut ds = cirr::load(
        root.path(),
        cirr::CirrSplit::Val,
        LoadOptions::default(),
        &strict,
    )
    .unwrap();
    ds.require_in_gallery(&strict).unwrap();
    let bad = ds.image_path(&ds.triplets[0].reference).unwrap();
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\ntruncated").unwrap();
    let e = format!(
        "{:#}",
        cirr_val(&Counting::new(), &ds, &opts(), &strict).unwrap_err()
    );
    assert!(e.contains(&bad.display().to_string()), "{e}");

    let skip = SkipLog::new(true);
    let m = cirr_val(&Counting::new(), &ds, &opts(), &skip).unwrap();
    let bad_name = ds.triplets[0].reference.clone();
    let affected = ds
        .triplets
        .iter()
        .filter(|t| {
            std::iter::once(&t.reference)
                .chain(&t.target)
                .chain(&t.members)
                .any(|n| *n == bad_name)
        })
        .count();
    // The image and every query that needs it are counted.
    assert_eq!(skip.count(), 1 + affected);
    let mut kept = ds.clone();
    kept.triplets.retain(|t| {
        !std::iter::once(&t.reference)
            .chain(&t.target)
            .chain(&t.members)
            .any(|n| *n == bad_name)
    });
    let m_kept = cirr_val(&Counting::new(), &kept, &opts(), &SkipLog::new(true)).unwrap();
    assert_eq!(m, m_kept);
}

#[test]
fn fashioniq_val_per_category_matches_independent_ranks() {
    let root = tempfile::tempdir().unwrap();
    let f = root.path().join("FashionIQ");
    std::fs::create_dir_all(f.join("captions")).unwrap();
    std::fs::create_dir_all(f.join("image_splits")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for (ci, cat) in fashioniq::CATEGORIES.iter().enumerate() {
        let names: Vec<String> = (0..60 + 5 * ci).map(|i| format!("{cat}{i}")).collect();
        for n in &names {
            data_support::write_png(&f.join(format!("images/{n}.png")), rng.gen());
        }
        std::fs::write(
            f.join(format!("image_splits/split.{cat}.val.json")),
            serde_json::to_string(&names).unwrap(),
        )
        .unwrap();
        let triplets: Vec<serde_json::Value> = (0..30)
            .map(|_| {
                let p: Vec<&String> = names.choose_multiple(&mut rng, 2).collect();
                serde_json::json!({"candidate": p[0], "target": p[1], "captions": [caption(&mut rng), caption(&mut rng)]})
            })
            .collect();
        std::fs::write(
            f.join(format!("captions/cap.{cat}.val.json")),
            serde_json::to_string(&triplets).unwrap(),
        )
        .unwrap();
    }
    let enc = Counting::new();
    let log = SkipLog::new(false);
    let datasets = fashioniq_val_datasets(root.path(), &fashioniq::CATEGORIES, &log).unwrap();
    let m = fashioniq_val(&enc, &datasets, &opts(), &log).unwrap();
    assert_eq!(enc.gallery_images.load(Ordering::SeqCst), 60 + 65 + 70);
    assert_eq!(enc.light_token_calls.load(Ordering::SeqCst), 0);

    let mut per_category = Vec::new();
    for cat in fashioniq::CATEGORIES {
        let ds = fashioniq::load(
            root.path(),
            &[cat],
            fashioniq::FiqSplit::Val,
            LoadOptions::default(),
            &SkipLog::new(false),
        )
        .unwrap();
        let (names, scores) = independent_scores(&enc.inner, &ds);
        let ranks: Vec<usize> = ds
            .triplets
            .iter()
            .zip(&scores)
            .map(|(t, s)| {
                sorted_names(&names, s)
                    .iter()
                    .position(|n| *n == t.target.as_deref().unwrap())
                    .unwrap()
            })
            .collect();
        let (r10, r50) = fashioniq_recalls(&ranks).unwrap();
        per_category.push((cat.to_string(), r10, r50));
    }
    assert_eq!(m, fashioniq_metrics(&per_category).unwrap());
    assert!(m.get("dress_recall_at10").unwrap() < 100.0);
}

#[test]
fn cirr_test1_answers_match_independent_rankings() {
    let root = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    synthetic_cirr(root.path(), "test1", 70, 12, &mut rng);
    let log = SkipLog::new(false);
    let mut ds = cirr::load(
        root.path(),
        cirr::CirrSplit::Test1,
        LoadOptions::default(),
        &log,
    )
    .unwrap();
    ds.require_in_gallery(&log).unwrap();
    let enc = Counting::new();
    let answers = cirr_test1(&enc, &ds, &opts(), &log).unwrap();
    assert_eq!(enc.gallery_images.load(Ordering::SeqCst), 70);
    let (names, scores) = independent_scores(&enc.inner, &ds);
    assert_eq!(answers.len(), 12);
    for ((a, t), s) in answers.iter().zip(&ds.triplets).zip(&scores) {
        assert_eq!(a.pair_id, t.pair_id);
        let order: Vec<&str> = sorted_names(&names, s)
            .into_iter()
            .filter(|n| *n != t.reference)
            .collect();
        assert_eq!(a.top, order[..50].to_vec());
        let subset: Vec<&str> = order
            .iter()
            .copied()
            .filter(|n| t.members.iter().any(|m| m == n))
            .take(3)
            .collect();
        assert_eq!(a.subset_top, subset);
    }
}
