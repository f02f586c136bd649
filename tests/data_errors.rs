//! Bad input never loses data silently: every problem is an error naming the file (and the
//! triplet), or with skipping enabled a counted skip.

mod common;
mod data_support;

use std::path::Path;

use data_support::{write_png, SIDE};
use slot4acir::data::preprocess::{load_batch, load_image, Transform};
use slot4acir::data::{cirr, fashioniq, LoadOptions, SkipLog};

const SPLIT: &str = r#"{"a": "./dev/a.png", "b": "./dev/b.png", "c": "./dev/c.png"}"#;

fn triplet(pairid: i64, reference: &str, target: &str, members: &str) -> String {
    format!(
        r#"{{"pairid": {pairid}, "reference": "{reference}", "target_hard": "{target}",
            "caption": "make it so", "img_set": {{"id": 1, "members": {members}}}}}"#
    )
}

/// A small CIRR val root: split map `SPLIT`, the given caption file text, images a, b, c.
fn cirr_root(captions: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let c = root.path().join("CIRR/cirr");
    std::fs::create_dir_all(c.join("captions")).unwrap();
    std::fs::create_dir_all(c.join("image_splits")).unwrap();
    std::fs::write(c.join("captions/cap.rc2.val.json"), captions).unwrap();
    std::fs::write(c.join("image_splits/split.rc2.val.json"), SPLIT).unwrap();
    for n in ["a", "b", "c"] {
        write_png(&root.path().join(format!("CIRR/dev/{n}.png")), [1, 2, 3]);
    }
    root
}

fn load_val(root: &Path, log: &SkipLog) -> anyhow::Result<slot4acir::data::Dataset> {
    cirr::load(root, cirr::CirrSplit::Val, LoadOptions::default(), log)
}

fn message(e: anyhow::Error) -> String {
    format!("{e:#}")
}

#[test]
fn caption_file_that_is_not_the_expected_json() {
    let log = SkipLog::new(false);
    for (text, expect) in [
        ("[{\"pairid\": 1,", "is not valid JSON"),
        ("{\"pairid\": 1}", "is not a JSON list of triplets"),
    ] {
        let root = cirr_root(text);
        let e = message(load_val(root.path(), &log).unwrap_err());
        assert!(e.contains("cap.rc2.val.json") && e.contains(expect), "{e}");
    }
    // A record missing a field: the file, the record and its pair id are named.
    let root = cirr_root(&format!(
        "[{}, {{\"pairid\": 5, \"reference\": \"a\"}}]",
        triplet(4, "a", "b", r#"["a", "b"]"#)
    ));
    let e = message(load_val(root.path(), &log).unwrap_err());
    assert!(
        e.contains("cap.rc2.val.json: record 1 (pairid 5)") && e.contains("caption"),
        "{e}"
    );
    // Skipping drops that record only, and counts it.
    let skip = SkipLog::new(true);
    let ds = load_val(root.path(), &skip).unwrap();
    assert_eq!((ds.triplets.len(), skip.count()), (1, 1));
    // A split map that is not an object of names.
    std::fs::write(
        root.path()
            .join("CIRR/cirr/image_splits/split.rc2.val.json"),
        "[\"a\"]",
    )
    .unwrap();
    let e = message(load_val(root.path(), &log).unwrap_err());
    assert!(
        e.contains("split.rc2.val.json is not the expected JSON"),
        "{e}"
    );
}

#[test]
fn name_missing_from_the_split_map() {
    let text = format!(
        "[{}, {}]",
        triplet(1, "a", "b", r#"["a", "b"]"#),
        triplet(2, "a", "zz", r#"["a", "zz"]"#)
    );
    let root = cirr_root(&text);
    let e = message(load_val(root.path(), &SkipLog::new(false)).unwrap_err());
    assert!(
        e.contains("cap.rc2.val.json: record 1 (pairid 2)")
            && e.contains("'zz' is not in the split map")
            && e.contains("split.rc2.val.json"),
        "{e}"
    );
    let skip = SkipLog::new(true);
    let ds = load_val(root.path(), &skip).unwrap();
    assert_eq!((ds.triplets.len(), skip.count()), (1, 1));
    assert!(skip.entries()[0].contains("zz"));

    // A member outside the gallery: evaluation needs every member ranked.
    let root = cirr_root(&format!("[{}]", triplet(3, "a", "b", r#"["a", "b", "q"]"#)));
    let mut ds = load_val(root.path(), &SkipLog::new(false)).unwrap();
    let e = message(ds.require_in_gallery(&SkipLog::new(false)).unwrap_err());
    assert!(
        e.contains("triplet pairid 3 of CIRR val") && e.contains("\"q\""),
        "{e}"
    );
    let skip = SkipLog::new(true);
    ds.require_in_gallery(&skip).unwrap();
    assert_eq!((ds.triplets.len(), skip.count()), (0, 1));
}

#[test]
fn missing_unreadable_and_truncated_images() {
    let root = cirr_root(&format!("[{}]", triplet(9, "a", "b", r#"["a", "b"]"#)));
    let ds = load_val(root.path(), &SkipLog::new(false)).unwrap();
    let t = &ds.triplets[0];
    let tf = Transform::default();
    assert!(ds.load_triplet_images(t, &tf, SIDE).is_ok());

    // Missing target: the file, the triplet and the caption file are named.
    let b = root.path().join("CIRR/dev/b.png");
    std::fs::remove_file(&b).unwrap();
    let e = message(ds.load_triplet_images(t, &tf, SIDE).unwrap_err());
    assert!(
        e.contains("triplet pairid 9 of CIRR val")
            && e.contains("cap.rc2.val.json")
            && e.contains("dev/b.png"),
        "{e}"
    );

    // Truncated PNG: a real image cut in half.
    let big = root.path().join("big.png");
    {
        let file = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let mut enc = png::Encoder::new(file, 64, 64);
        enc.set_color(png::ColorType::Rgb);
        let mut w = enc.write_header().unwrap();
        let noise: Vec<u8> = (0..64 * 64 * 3u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        w.write_image_data(&noise).unwrap();
    }
    assert!(load_image(&big, &tf, 224).is_ok());
    let bytes = std::fs::read(&big).unwrap();
    std::fs::write(&b, &bytes[..bytes.len() / 2]).unwrap();
    let e = message(ds.load_triplet_images(t, &tf, SIDE).unwrap_err());
    assert!(e.contains("dev/b.png") && e.contains("truncated"), "{e}");

    // Not an image at all.
    let junk = root.path().join("CIRR/dev/c.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let e = message(load_image(&junk, &tf, SIDE).unwrap_err());
    assert!(e.contains("dev/c.png"), "{e}");

    // A batch keeps going and reports each bad file; skipping counts them.
    let paths = vec![
        root.path().join("CIRR/dev/a.png"),
        b.clone(),
        junk,
        root.path().join("CIRR/dev/none.png"),
        big,
    ];
    let batch = load_batch(&paths, &tf, SIDE).unwrap();
    assert_eq!(batch.loaded, vec![0, 4]);
    assert_eq!(batch.pixels.dims(), &[2, 3, SIDE, SIDE]);
    let failed: Vec<usize> = batch.failed.iter().map(|(i, _)| *i).collect();
    assert_eq!(failed, vec![1, 2, 3]);
    assert!(message(batch.failed.into_iter().nth(2).unwrap().1).contains("none.png"));
    let strict = SkipLog::new(false);
    assert!(strict.skip_or_fail(anyhow::anyhow!("bad")).is_err());
    let skip = SkipLog::new(true);
    for _ in 0..3 {
        skip.skip_or_fail(anyhow::anyhow!("bad")).unwrap();
    }
    assert_eq!(skip.count(), 3);
}

#[test]
fn fashioniq_bad_records_and_files() {
    let root = tempfile::tempdir().unwrap();
    let f = root.path().join("FashionIQ");
    std::fs::create_dir_all(f.join("captions")).unwrap();
    std::fs::create_dir_all(f.join("image_splits")).unwrap();
    std::fs::write(f.join("image_splits/split.dress.val.json"), r#"["a", "b"]"#).unwrap();
    std::fs::write(
        f.join("captions/cap.dress.val.json"),
        r#"[{"candidate": "a", "target": "b", "captions": ["x", "y"]},
            {"candidate": "a", "target": "b", "captions": ["only one"]}]"#,
    )
    .unwrap();
    let load = |log: &SkipLog| {
        fashioniq::load(
            root.path(),
            &["dress"],
            fashioniq::FiqSplit::Val,
            LoadOptions::default(),
            log,
        )
    };
    let e = message(load(&SkipLog::new(false)).unwrap_err());
    assert!(
        e.contains("cap.dress.val.json: record 1") && e.contains("expected 2 captions"),
        "{e}"
    );
    let skip = SkipLog::new(true);
    assert_eq!(load(&skip).unwrap().triplets.len(), 1);
    assert_eq!(skip.count(), 1);
    // Missing caption file; unknown category.
    std::fs::remove_file(f.join("captions/cap.dress.val.json")).unwrap();
    let e = message(load(&skip).unwrap_err());
    assert!(
        e.contains("reading FashionIQ caption file") && e.contains("cap.dress.val.json"),
        "{e}"
    );
    let e = message(
        fashioniq::load(
            root.path(),
            &["hat"],
            fashioniq::FiqSplit::Val,
            LoadOptions::default(),
            &skip,
        )
        .unwrap_err(),
    );
    assert!(e.contains("unknown FashionIQ category 'hat'"), "{e}");
}
