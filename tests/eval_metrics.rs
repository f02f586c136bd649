//! Metrics and submissions on the real annotation files: score matrices that put each target
//! at a known rank give exactly the recalls that rank implies.

mod common;
mod data_support;

use std::collections::{HashMap, HashSet};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use slot4acir::data::{cirr, fashioniq, Dataset, LoadOptions, SkipLog};
use slot4acir::eval::metrics::{
    cirr_metrics, cirr_ranks, fashioniq_metrics, fashioniq_recalls, rank_among, CirrQuery,
};
use slot4acir::eval::submission::{write_cirr_submission, CirrAnswer, SUBSET_TOP_K, TOP_K};

/// Scores of one query that rank the gallery in `order` (best first).
fn scores_for(order: &[usize]) -> Vec<f32> {
    let n = order.len();
    let mut s = vec![0f32; n];
    for (pos, &i) in order.iter().enumerate() {
        s[i] = (n - pos) as f32 / n as f32;
    }
    s
}

fn pct(hits: usize, n: usize) -> f64 {
    100.0 * hits as f64 / n as f64
}

fn load_cirr(split: cirr::CirrSplit) -> Dataset {
    let root = data_support::linked_root();
    let log = SkipLog::new(false);
    let mut ds = cirr::load(root.path(), split, LoadOptions::default(), &log).unwrap();
    ds.require_in_gallery(&log).unwrap();
    ds
}

#[test]
fn cirr_val_recalls_follow_the_planted_ranks() {
    let ds = load_cirr(cirr::CirrSplit::Val);
    let index = ds.gallery_index();
    let n = ds.gallery.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut planted, mut reference_above) = (Vec::new(), 0);
    let mut ranks = Vec::new();
    for t in &ds.triplets {
        let reference = index[t.reference.as_str()];
        let target = index[t.target.as_ref().unwrap().as_str()];
        let mut others: Vec<usize> = t
            .members
            .iter()
            .map(|m| index[m.as_str()])
            .filter(|&m| m != reference && m != target)
            .collect();
        assert_eq!(others.len(), 4, "pairid {}", t.pair_id);
        others.shuffle(&mut rng);
        let member_set: HashSet<usize> = t.members.iter().map(|m| index[m.as_str()]).collect();
        let mut rest: Vec<usize> = (0..n).filter(|i| !member_set.contains(i)).collect();
        rest.shuffle(&mut rng);
        // Planted: target at position p once the reference is removed, s members above it.
        let p = rng.gen_range(0..70usize);
        let s = rng.gen_range(0..=p.min(4));
        let mut above: Vec<usize> = others[..s]
            .iter()
            .copied()
            .chain(rest.drain(..p - s))
            .collect();
        above.shuffle(&mut rng);
        let mut below: Vec<usize> = others[s..].iter().copied().chain(rest).collect();
        below.shuffle(&mut rng);
        let mut order: Vec<usize> = above.into_iter().chain([target]).chain(below).collect();
        // The reference goes on top for half of the queries, anywhere for the others.
        let q = if rng.gen_bool(0.5) {
            0
        } else {
            rng.gen_range(0..n)
        };
        order.insert(q, reference);
        reference_above += usize::from(q <= p);
        let members: Vec<usize> = t.members.iter().map(|m| index[m.as_str()]).collect();
        let r = cirr_ranks(
            &scores_for(&order),
            &CirrQuery {
                reference,
                target,
                members,
            },
        )
        .unwrap();
        assert_eq!((r.rank, r.subset_rank), (p, s), "pairid {}", t.pair_id);
        planted.push((p, s));
        ranks.push(r);
    }
    assert!(reference_above > 1000, "the reference removal is exercised");
    let m = cirr_metrics(&ranks).unwrap();
    let total = planted.len();
    let mut expected = Vec::new();
    for k in 1..=3 {
        expected.push((
            format!("group_recall_at{k}"),
            pct(planted.iter().filter(|x| x.1 < k).count(), total),
        ));
    }
    for k in [1, 5, 10, 50] {
        expected.push((
            format!("recall_at{k}"),
            pct(planted.iter().filter(|x| x.0 < k).count(), total),
        ));
    }
    let keys: Vec<&str> = m.0.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "group_recall_at1",
            "group_recall_at2",
            "group_recall_at3",
            "recall_at1",
            "recall_at5",
            "recall_at10",
            "recall_at50",
            "mean(R@5+R_s@1)",
            "arithmetic_mean",
            "harmonic_mean",
            "geometric_mean"
        ]
    );
    for (k, v) in &expected {
        // The reference divides in float32: equal to the exact ratio within float32 precision.
        assert!(
            (m.get(k).unwrap() - v).abs() < 1e-4,
            "{k}: {} vs {v}",
            m.get(k).unwrap()
        );
    }
    let vals: Vec<f64> = expected.iter().map(|e| e.1).collect();
    let close = |k: &str, v: f64| assert!((m.get(k).unwrap() - v).abs() < 1e-4, "{k}");
    close("mean(R@5+R_s@1)", (vals[4] + vals[0]) / 2.0);
    close("arithmetic_mean", vals.iter().sum::<f64>() / 7.0);
    close(
        "harmonic_mean",
        7.0 / vals.iter().map(|v| 1.0 / v).sum::<f64>(),
    );
    close(
        "geometric_mean",
        vals.iter().product::<f64>().powf(1.0 / 7.0),
    );
    println!("{}", serde_json::to_string(&m).unwrap());
}

#[test]
fn fashioniq_val_recalls_follow_the_planted_ranks() {
    let root = data_support::linked_root();
    let log = SkipLog::new(false);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut per_category = Vec::new();
    let mut expected = HashMap::new();
    for cat in fashioniq::CATEGORIES {
        let mut ds = fashioniq::load(
            root.path(),
            &[cat],
            fashioniq::FiqSplit::Val,
            LoadOptions::default(),
            &log,
        )
        .unwrap();
        ds.require_in_gallery(&log).unwrap();
        let index = ds.gallery_index();
        let n = ds.gallery.len();
        let mut ranks = Vec::new();
        let mut planted = Vec::new();
        for t in &ds.triplets {
            let target = index[t.target.as_ref().unwrap().as_str()];
            let mut order: Vec<usize> = (0..n).filter(|&i| i != target).collect();
            order.shuffle(&mut rng);
            // The reference is not removed in FashionIQ: put it on top half of the time.
            if rng.gen_bool(0.5) {
                let r = index[t.reference.as_str()];
                order.retain(|&i| i != r);
                order.insert(0, r);
            }
            let p = rng.gen_range(0..80usize);
            order.insert(p, target);
            let d: Vec<f32> = scores_for(&order).iter().map(|&s| 1.0 - s).collect();
            ranks.push(rank_among(&d, target, 0..n));
            planted.push(p);
        }
        assert_eq!(ranks, planted, "{cat}");
        let (r10, r50) = fashioniq_recalls(&ranks).unwrap();
        let e10 = pct(planted.iter().filter(|&&p| p < 10).count(), planted.len());
        let e50 = pct(planted.iter().filter(|&&p| p < 50).count(), planted.len());
        assert!(
            (r10 - e10).abs() < 1e-4 && (r50 - e50).abs() < 1e-4,
            "{cat}"
        );
        expected.insert(cat, (e10, e50));
        per_category.push((cat.to_string(), r10, r50));
    }
    let m = fashioniq_metrics(&per_category).unwrap();
    let keys: Vec<&str> = m.0.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "dress_recall_at10",
            "dress_recall_at50",
            "shirt_recall_at10",
            "shirt_recall_at50",
            "toptee_recall_at10",
            "toptee_recall_at50",
            "average_recall_at10",
            "average_recall_at50",
            "average_recall"
        ]
    );
    let a10 = expected.values().map(|e| e.0).sum::<f64>() / 3.0;
    let a50 = expected.values().map(|e| e.1).sum::<f64>() / 3.0;
    assert!((m.get("average_recall_at10").unwrap() - a10).abs() < 1e-4);
    assert!((m.get("average_recall_at50").unwrap() - a50).abs() < 1e-4);
    assert!((m.get("average_recall").unwrap() - (a10 + a50) / 2.0).abs() < 1e-4);
}

#[test]
fn cirr_test1_submission_files() {
    let ds = load_cirr(cirr::CirrSplit::Test1);
    let index = ds.gallery_index();
    let names: Vec<String> = ds.gallery.iter().map(|g| g.name.clone()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut all_scores = Vec::new();
    let answers: Vec<CirrAnswer> = ds
        .triplets
        .iter()
        .map(|t| {
            let scores: Vec<f32> = (0..names.len()).map(|_| rng.gen()).collect();
            let members: Vec<usize> = t.members.iter().map(|m| index[m.as_str()]).collect();
            let a = CirrAnswer::from_scores(
                t.pair_id,
                &scores,
                index[t.reference.as_str()],
                &members,
                &names,
            );
            all_scores.push(scores);
            a
        })
        .collect();
    let out = tempfile::tempdir().unwrap();
    let [recall, subset] = write_cirr_submission(out.path(), "test", &answers).unwrap();
    assert!(recall.ends_with("recall_submission_test.json"));
    assert!(subset.ends_with("recall_subset_submission_test.json"));
    let read = |p: &std::path::Path| -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (recall, subset) = (read(&recall), read(&subset));
    assert_eq!(
        (recall["version"].as_str(), recall["metric"].as_str()),
        (Some("rc2"), Some("recall"))
    );
    assert_eq!(subset["metric"].as_str(), Some("recall_subset"));
    assert_eq!(recall.len(), 4148 + 2);
    assert_eq!(subset.len(), 4148 + 2);
    for (t, scores) in ds.triplets.iter().zip(&all_scores) {
        let key = t.pair_id.to_string();
        let top: Vec<&str> = recall[&key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let distinct: HashSet<&str> = top.iter().copied().collect();
        assert_eq!((top.len(), distinct.len()), (TOP_K, TOP_K), "pairid {key}");
        assert!(
            !distinct.contains(t.reference.as_str()),
            "pairid {key}: the reference is answered"
        );
        let s: Vec<f32> = top.iter().map(|n| scores[index[n]]).collect();
        assert!(
            s.windows(2).all(|w| w[0] >= w[1]),
            "pairid {key}: not in score order"
        );
        // Nothing left out scores above the 50th answer.
        let best_left_out = (0..names.len())
            .filter(|&i| i != index[t.reference.as_str()] && !distinct.contains(names[i].as_str()))
            .map(|i| scores[i])
            .fold(f32::MIN, f32::max);
        assert!(best_left_out <= s[TOP_K - 1], "pairid {key}");

        let sub: Vec<&str> = subset[&key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(sub.len(), SUBSET_TOP_K);
        assert!(
            sub.iter()
                .all(|n| t.members.iter().any(|m| m == n) && *n != t.reference),
            "pairid {key}"
        );
        let mut cands: Vec<&String> = t.members.iter().filter(|m| **m != t.reference).collect();
        cands.sort_by(|a, b| scores[index[b.as_str()]].total_cmp(&scores[index[a.as_str()]]));
        let best: Vec<&str> = cands.iter().take(3).map(|s| s.as_str()).collect();
        assert_eq!(sub, best, "pairid {key}");
    }
}
