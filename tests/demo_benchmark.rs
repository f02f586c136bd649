//! The demo benchmark: object names from stamp files, scenes and edits, the CIRR layout.

use std::collections::{HashMap, HashSet};

use image::{Rgba, RgbaImage};
use slot4acir::demo::benchmark::{build, BenchmarkConfig};
use slot4acir::demo::objects::{name_from_file, ObjectLibrary, ObjectSource};

#[test]
fn object_names_come_from_file_names() {
    assert_eq!(name_from_file("apple_granny_smith2"), "apple granny smith");
    assert_eq!(name_from_file("Strawberry2"), "strawberry");
    assert_eq!(name_from_file("sea-lion"), "sea lion");
}

#[test]
fn photographs_are_read_from_a_stamps_folder() {
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "zebra",
        "red_apple",
        "tea_pot2",
        "cat",
        "dog",
        "fish_1",
        "owl",
        "pear",
        "kiwi",
    ];
    for (i, n) in names.iter().enumerate() {
        let sub = dir.path().join(if i % 2 == 0 { "animals" } else { "food" });
        std::fs::create_dir_all(&sub).unwrap();
        // An opaque disc on a transparent square: a cut-out.
        let img = RgbaImage::from_fn(40, 30, |x, y| {
            let (dx, dy) = (x as f64 - 20.0, y as f64 - 15.0);
            if dx * dx + dy * dy < 120.0 {
                Rgba([200, 10 * i as u8, 50, 255])
            } else {
                Rgba([0, 0, 0, 0])
            }
        });
        img.save(sub.join(format!("{n}.png"))).unwrap();
    }
    // Drawings and other categories are left out, unreadable files skipped.
    std::fs::create_dir_all(dir.path().join("animals/cartoon")).unwrap();
    std::fs::write(dir.path().join("animals/cartoon/drawn.png"), b"garbage").unwrap();
    std::fs::create_dir_all(dir.path().join("symbols")).unwrap();
    std::fs::write(dir.path().join("symbols/letter.png"), b"garbage").unwrap();
    std::fs::write(dir.path().join("food/broken.png"), b"garbage").unwrap();
    let lib = ObjectLibrary::photographs(dir.path(), 100)
        .unwrap()
        .expect("enough stamps");
    assert_eq!(
        lib.source,
        ObjectSource::Photographs(dir.path().to_path_buf())
    );
    let got: HashSet<&str> = lib.objects.iter().map(|o| o.name.as_str()).collect();
    let want: HashSet<&str> = [
        "zebra",
        "red apple",
        "tea pot",
        "cat",
        "dog",
        "fish",
        "owl",
        "pear",
        "kiwi",
    ]
    .into();
    assert_eq!(got, want);
    // Cropped to the opaque part and scaled to the sprite size.
    assert!(lib
        .objects
        .iter()
        .all(|o| o.image.width().max(o.image.height()) == 128));
    // Too few stamps (or no folder): no library, the caller draws shapes instead.
    assert!(ObjectLibrary::photographs(&dir.path().join("none"), 100)
        .unwrap()
        .is_none());
}

#[test]
fn benchmark_has_the_cirr_layout_and_consistent_queries() {
    let dir = tempfile::tempdir().unwrap();
    let lib = ObjectLibrary::drawn(64);
    let cfg = BenchmarkConfig {
        train_triplets: 60,
        val_images: 40,
        val_queries: 20,
        test_images: 20,
        test_queries: 10,
        variants: 6,
        train_variants: 6,
        image_size: 48,
        seed: 1,
    };
    let s = build(dir.path(), &lib, &cfg).unwrap();
    assert!(
        s.train_triplets >= 60 && s.val_images >= 40 && s.val_queries >= 20 && s.test_queries >= 10,
        "{s:?}"
    );
    let root = dir.path().join("CIRR");
    let read = |p: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(p)).unwrap()).unwrap()
    };
    let mut pairids = HashSet::new();
    for (split, prefix) in [("train", "train"), ("val", "dev"), ("test1", "test1")] {
        let images: HashMap<String, String> =
            serde_json::from_value(read(&format!("cirr/image_splits/split.rc2.{split}.json")))
                .unwrap();
        for rel in images.values() {
            assert!(rel.starts_with(&format!("./{prefix}/")), "{rel}");
            let img = image::open(root.join(rel)).unwrap();
            assert_eq!((img.width(), img.height()), (48, 48));
        }
        let caps = read(&format!("cirr/captions/cap.rc2.{split}.json"));
        let caps = caps.as_array().unwrap();
        for c in caps {
            assert!(
                pairids.insert(c["pairid"].as_u64().unwrap()),
                "pairids are unique"
            );
            let r = c["reference"].as_str().unwrap();
            assert!(images.contains_key(r));
            let members: Vec<&str> = c["img_set"]["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap())
                .collect();
            assert_eq!(members.len(), 6);
            assert_eq!(
                members[c["img_set"]["reference_rank"].as_u64().unwrap() as usize],
                r
            );
            let cap = c["caption"].as_str().unwrap();
            assert!(!cap.is_empty());
            if split != "test1" {
                let t = c["target_hard"].as_str().unwrap();
                assert!(images.contains_key(t) && t != r);
                assert_eq!(
                    members[c["img_set"]["target_rank"].as_u64().unwrap() as usize],
                    t
                );
                // Reference and target come from the same family.
                let fam = |n: &str| n.rsplit_once('-').unwrap().0.to_string();
                assert_eq!(fam(r), fam(t));
            } else {
                assert!(c.get("target_hard").is_none());
            }
        }
        assert_eq!(
            caps.len(),
            match split {
                "train" => s.train_triplets,
                "val" => s.val_queries,
                _ => s.test_queries,
            }
        );
    }
    // The same seed builds the same benchmark.
    let dir2 = tempfile::tempdir().unwrap();
    build(dir2.path(), &lib, &cfg).unwrap();
    let a = std::fs::read(root.join("cirr/captions/cap.rc2.val.json")).unwrap();
    let b = std::fs::read(dir2.path().join("CIRR/cirr/captions/cap.rc2.val.json")).unwrap();
    assert_eq!(a, b);
}
