//! Dataset readers on the real annotation files, with generated images (one per name).

mod common;
mod data_support;

use std::collections::HashSet;

use data_support::{assert_is_image_of, linked_root, write_images, SIDE};
use rand::SeedableRng;
use slot4acir::data::preprocess::{load_image, Transform};
use slot4acir::data::{cirr, fashioniq, LoadOptions, SkipLog, TripletText};

#[test]
fn every_cirr_val_triplet_and_test1_pair_is_read() {
    let root = linked_root();
    let log = SkipLog::new(false);
    for (split, n_triplets, n_images) in [
        (cirr::CirrSplit::Val, 4181, 2297),
        (cirr::CirrSplit::Test1, 4148, 2315),
    ] {
        let mut ds = cirr::load(root.path(), split, LoadOptions::default(), &log).unwrap();
        assert_eq!(
            (ds.triplets.len(), ds.gallery.len()),
            (n_triplets, n_images),
            "{}",
            ds.name
        );
        write_images(
            ds.gallery
                .iter()
                .map(|g| (g.name.as_str(), g.path.as_path())),
        );
        ds.require_in_gallery(&log).unwrap();
        assert_eq!(ds.triplets.len(), n_triplets);
        let ids: HashSet<i64> = ds.triplets.iter().map(|t| t.pair_id).collect();
        assert_eq!(ids.len(), n_triplets, "pair ids are unique");
        for t in &ds.triplets {
            assert_eq!(t.members.len(), 6);
            assert_eq!(t.target.is_some(), split == cirr::CirrSplit::Val);
            let what = ds.describe(t);
            let (r, g) = ds
                .load_triplet_images(t, &Transform::default(), SIDE)
                .unwrap();
            assert_is_image_of(&r, &t.reference, &what);
            if let Some(target) = &t.target {
                assert_is_image_of(&g.unwrap(), target, &what);
            }
            assert!(!t.text.eval_caption().is_empty());
        }
        // The gallery is the split map in file order; every image reads back as itself.
        assert!(ds.gallery[0]
            .path
            .ends_with(if split == cirr::CirrSplit::Val {
                "CIRR/./dev/dev-244-0-img0.png"
            } else {
                "CIRR/./test1/test1-147-1-img1.png"
            }));
        for g in ds.gallery.iter().step_by(97) {
            assert_is_image_of(
                &load_image(&g.path, &Transform::SquarePad, SIDE).unwrap(),
                &g.name,
                &g.name,
            );
        }
    }
    assert_eq!(log.count(), 0);
    // The first val triplet as the file has it.
    let ds = cirr::load(
        root.path(),
        cirr::CirrSplit::Val,
        LoadOptions::default(),
        &log,
    )
    .unwrap();
    let t = &ds.triplets[0];
    assert_eq!((t.pair_id, t.reference.as_str()), (12060, "dev-244-0-img0"));
    assert_eq!(t.target.as_deref(), Some("dev-1028-1-img1"));
    assert_eq!(t.text.eval_caption(), "show three bottles of soft drink");
}

#[test]
fn every_fashioniq_val_triplet_is_read_per_category() {
    let root = linked_root();
    let log = SkipLog::new(false);
    let expected = [
        ("dress", 2017, 3817),
        ("shirt", 2038, 6346),
        ("toptee", 1961, 5373),
    ];
    for (cat, n_triplets, n_images) in expected {
        let mut ds = fashioniq::load(
            root.path(),
            &[cat],
            fashioniq::FiqSplit::Val,
            LoadOptions::default(),
            &log,
        )
        .unwrap();
        assert_eq!(
            (ds.triplets.len(), ds.gallery.len()),
            (n_triplets, n_images),
            "{cat}"
        );
        write_images(
            ds.gallery
                .iter()
                .map(|g| (g.name.as_str(), g.path.as_path())),
        );
        ds.require_in_gallery(&log).unwrap();
        assert_eq!(ds.triplets.len(), n_triplets);
        for t in &ds.triplets {
            assert_eq!(t.category, cat);
            let what = ds.describe(t);
            let (r, g) = ds
                .load_triplet_images(t, &Transform::default(), SIDE)
                .unwrap();
            assert_is_image_of(&r, &t.reference, &what);
            assert_is_image_of(&g.unwrap(), t.target.as_ref().unwrap(), &what);
        }
    }
    // Evaluation joins the two captions "c1 and c2", stripped of ".?, " and lowercased.
    let ds = fashioniq::load(
        root.path(),
        &["dress"],
        fashioniq::FiqSplit::Val,
        LoadOptions::default(),
        &log,
    )
    .unwrap();
    assert_eq!(
        ds.triplets[0].text.eval_caption(),
        "is shiny and silver with shorter sleeves and fit and flare"
    );
    assert_eq!(log.count(), 0);
}

#[test]
fn fashioniq_combined_train_and_test_splits() {
    let root = linked_root();
    let log = SkipLog::new(false);
    let all = fashioniq::CATEGORIES;
    let train = fashioniq::load(
        root.path(),
        &all,
        fashioniq::FiqSplit::Train,
        LoadOptions::default(),
        &log,
    )
    .unwrap();
    assert_eq!(train.triplets.len(), 5985 + 5988 + 6027);
    assert_eq!(train.gallery.len(), 11452 + 19036 + 16121);
    let cats: Vec<&str> = train.triplets.iter().map(|t| t.category.as_str()).collect();
    assert_eq!(
        (cats[0], cats[5985], cats[5985 + 5988]),
        ("dress", "shirt", "toptee")
    );
    let p = train.image_path(&train.triplets[0].reference).unwrap();
    assert!(p.ends_with("FashionIQ/images/B003FGW7MK.png"));

    let test = fashioniq::load(
        root.path(),
        &all,
        fashioniq::FiqSplit::Test,
        LoadOptions::default(),
        &log,
    )
    .unwrap();
    assert_eq!(test.triplets.len(), 2024 + 2038 + 2056);
    assert!(test.triplets.iter().all(|t| t.target.is_none()));

    // Training captions: the four ways of joining, stripped and lowercased.
    let text = &train.triplets[0].text; // "is solid black with no sleeves", "is black with straps"
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let seen: HashSet<String> = (0..200).map(|_| text.train_caption(&mut rng)).collect();
    let expected: HashSet<String> = [
        "is solid black with no sleeves and is black with straps",
        "is black with straps and is solid black with no sleeves",
        "is solid black with no sleeves",
        "is black with straps",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(seen, expected);
}

#[test]
fn llm_caption_files_are_sampled() {
    let root = linked_root();
    let log = SkipLog::new(false);
    let opts = LoadOptions {
        llm_sampler: true,
        skip_bad: false,
    };
    // CIRR: `caption` is a list of paraphrases.
    let cap = root.path().join("CIRR/cirr/captions");
    std::fs::remove_file(&cap).unwrap();
    std::fs::create_dir_all(&cap).unwrap();
    std::fs::write(
        cap.join("cap.rc2.llm.train.json"),
        r#"[{"pairid": 7, "reference": "train-11041-2-img0", "target_hard": "train-5247-3-img1",
             "caption": ["make it red", "turn it red", "red instead"],
             "img_set": {"id": 1, "members": []}}]"#,
    )
    .unwrap();
    let ds = cirr::load(root.path(), cirr::CirrSplit::Train, opts, &log).unwrap();
    assert!(ds
        .image_path("train-5247-3-img1")
        .unwrap()
        .ends_with("CIRR/./train/4/train-5247-3-img1.png"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let seen: HashSet<String> = (0..100)
        .map(|_| ds.triplets[0].text.train_caption(&mut rng))
        .collect();
    assert_eq!(seen.len(), 3);
    assert_eq!(ds.triplets[0].text.eval_caption(), "make it red");

    // FashionIQ: captions[0..3] vary the first caption, captions[3..] the second.
    let fcap = root.path().join("FashionIQ/captions");
    std::fs::remove_file(&fcap).unwrap();
    std::fs::create_dir_all(&fcap).unwrap();
    std::fs::write(
        fcap.join("cap.dress.llm.train.json"),
        r#"[{"candidate": "a", "target": "b", "captions": ["A1.", "a2", "a3", "b1?", "b2"]}]"#,
    )
    .unwrap();
    let ds = fashioniq::load(
        root.path(),
        &["dress"],
        fashioniq::FiqSplit::Train,
        opts,
        &log,
    )
    .unwrap();
    let TripletText::FashionIq {
        variants: Some([a, b]),
        ..
    } = &ds.triplets[0].text
    else {
        panic!("no variants")
    };
    assert_eq!((a.len(), b.len()), (3, 2));
    let seen: HashSet<String> = (0..400)
        .map(|_| ds.triplets[0].text.train_caption(&mut rng))
        .collect();
    // 3×2 orderings × 2 joins + 3 + 2 single captions.
    assert_eq!(seen.len(), 17);
    assert!(seen.contains("a1 and b1") && seen.contains("b2 and a3") && seen.contains("b1"));
}
