//! Retrieval metrics from a score matrix, as the reference computes them (SPEC section 5).
//!
//! The reference sorts `distances = 1 - scores` (float32) with `torch.argsort`; two scores that
//! round to the same distance are a tie, broken here by gallery position (torch leaves the
//! order of ties unspecified). A query's outcome is the 0-based position of its target in that
//! order, computed by counting (no sort): recall@K counts the positions below K.

use std::cmp::Ordering;

use anyhow::{bail, Result};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// Named figures in the reference's key order (serialized as a JSON object in that order).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metrics(pub Vec<(String, f64)>);

impl Metrics {
    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    fn push(&mut self, key: impl Into<String>, v: f64) {
        self.0.push((key.into(), v));
    }
}

impl Serialize for Metrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// The reference's sort key of a gallery item for one query.
#[inline]
pub fn distance(score: f32) -> f32 {
    1.0 - score
}

/// Whether gallery item `a` comes before `b` in the ranking (`d` = distances of one query).
#[inline]
fn ranks_before(d: &[f32], a: usize, b: usize) -> bool {
    match d[a].total_cmp(&d[b]) {
        Ordering::Less => true,
        Ordering::Equal => a < b,
        Ordering::Greater => false,
    }
}

/// The ranking order over gallery positions: ascending distance, then position.
pub fn ranking_cmp(d: &[f32], a: usize, b: usize) -> Ordering {
    d[a].total_cmp(&d[b]).then(a.cmp(&b))
}

/// Position of `target` among `candidates` (which may include it; each counted once).
pub fn rank_among(d: &[f32], target: usize, candidates: impl IntoIterator<Item = usize>) -> usize {
    candidates
        .into_iter()
        .filter(|&c| c != target && ranks_before(d, c, target))
        .count()
}

/// The reference's `(torch.sum(labels[:, :k]) / len(labels)).item() * 100`: a float32 ratio
/// widened to a double, then scaled.
pub fn recall(hits: usize, total: usize) -> f64 {
    (hits as f32 / total as f32) as f64 * 100.0
}

/// A CIRR validation query in gallery positions.
#[derive(Debug, Clone, PartialEq)]
pub struct CirrQuery {
    pub reference: usize,
    pub target: usize,
    /// `img_set.members` present in the gallery (duplicates allowed; the reference is ignored).
    pub members: Vec<usize>,
}

/// Where a CIRR query's target landed, the reference removed from the ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CirrRanks {
    /// In the whole gallery.
    pub rank: usize,
    /// Among the query's `img_set.members`.
    pub subset_rank: usize,
}

/// Ranks of one query from its row of scores over the gallery.
pub fn cirr_ranks(scores: &[f32], q: &CirrQuery) -> Result<CirrRanks> {
    if q.target == q.reference {
        bail!("the target is the reference image");
    }
    if !q.members.contains(&q.target) {
        bail!("the target is not among img_set.members");
    }
    let d: Vec<f32> = scores.iter().map(|&s| distance(s)).collect();
    let rank = rank_among(&d, q.target, (0..d.len()).filter(|&i| i != q.reference));
    let mut members: Vec<usize> = q
        .members
        .iter()
        .copied()
        .filter(|&m| m != q.reference)
        .collect();
    members.sort_unstable();
    members.dedup();
    let subset_rank = rank_among(&d, q.target, members);
    Ok(CirrRanks { rank, subset_rank })
}

/// CIRR validation figures with the reference's keys and order: `group_recall_at1..3`,
/// `recall_at1/5/10/50`, `mean(R@5+R_s@1)`, and the arithmetic, harmonic and geometric means
/// of the seven recalls.
pub fn cirr_metrics(ranks: &[CirrRanks]) -> Result<Metrics> {
    if ranks.is_empty() {
        bail!("no CIRR queries to score");
    }
    let n = ranks.len();
    let at = |k: usize| recall(ranks.iter().filter(|r| r.rank < k).count(), n);
    let group_at = |k: usize| recall(ranks.iter().filter(|r| r.subset_rank < k).count(), n);
    let mut m = Metrics::default();
    for k in 1..=3 {
        m.push(format!("group_recall_at{k}"), group_at(k));
    }
    for k in [1, 5, 10, 50] {
        m.push(format!("recall_at{k}"), at(k));
    }
    let results: Vec<f64> = m.0.iter().map(|(_, v)| *v).collect();
    m.push("mean(R@5+R_s@1)", (group_at(1) + at(5)) / 2.0);
    m.push("arithmetic_mean", mean(&results));
    m.push("harmonic_mean", harmonic_mean(&results));
    m.push("geometric_mean", geometric_mean(&results));
    Ok(m)
}

/// FashionIQ: recall@10 and @50 of one category from the targets' ranks (reference kept).
pub fn fashioniq_recalls(ranks: &[usize]) -> Result<(f64, f64)> {
    if ranks.is_empty() {
        bail!("no FashionIQ queries to score");
    }
    let at = |k: usize| recall(ranks.iter().filter(|&&r| r < k).count(), ranks.len());
    Ok((at(10), at(50)))
}

/// FashionIQ figures with the reference's keys: `{category}_recall_at10/50` per category, then
/// `average_recall_at10`, `average_recall_at50`, `average_recall`.
pub fn fashioniq_metrics(per_category: &[(String, f64, f64)]) -> Result<Metrics> {
    if per_category.is_empty() {
        bail!("no FashionIQ category scored");
    }
    let mut m = Metrics::default();
    for (c, r10, r50) in per_category {
        m.push(format!("{c}_recall_at10"), *r10);
        m.push(format!("{c}_recall_at50"), *r50);
    }
    let r10 = mean(&per_category.iter().map(|c| c.1).collect::<Vec<_>>());
    let r50 = mean(&per_category.iter().map(|c| c.2).collect::<Vec<_>>());
    m.push("average_recall_at10", r10);
    m.push("average_recall_at50", r50);
    m.push("average_recall", (r50 + r10) / 2.0);
    Ok(m)
}

/// Correctly rounded sum (Shewchuk's algorithm, as Python's `math.fsum`).
pub fn fsum(xs: &[f64]) -> f64 {
    let mut partials: Vec<f64> = Vec::new();
    for &x in xs {
        let mut x = x;
        let mut i = 0;
        for j in 0..partials.len() {
            let mut y = partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                partials[i] = lo;
                i += 1;
            }
            x = hi;
        }
        partials.truncate(i);
        if x != 0.0 {
            partials.push(x);
        }
    }
    // Round the partials' exact sum to nearest, as fsum does (half-way correction).
    let mut hi = 0.0;
    let mut k = partials.len();
    let mut lo = 0.0;
    while k > 0 {
        k -= 1;
        let x = hi;
        let y = partials[k];
        hi = x + y;
        lo = y - (hi - x);
        if lo != 0.0 {
            break;
        }
    }
    if k > 0 && ((lo < 0.0 && partials[k - 1] < 0.0) || (lo > 0.0 && partials[k - 1] > 0.0)) {
        let y = lo * 2.0;
        let x = hi + y;
        if y == x - hi {
            hi = x;
        }
    }
    hi
}

/// `statistics.mean` (exact sum, then one division).
pub fn mean(xs: &[f64]) -> f64 {
    fsum(xs) / xs.len() as f64
}

/// `statistics.harmonic_mean`: 0 when a value is 0.
pub fn harmonic_mean(xs: &[f64]) -> f64 {
    if xs.contains(&0.0) {
        return 0.0;
    }
    let inv: Vec<f64> = xs.iter().map(|&x| 1.0 / x).collect();
    xs.len() as f64 / fsum(&inv)
}

/// `statistics.geometric_mean` (Python 3.12: 0 when a value is 0).
pub fn geometric_mean(xs: &[f64]) -> f64 {
    if xs.contains(&0.0) {
        return 0.0;
    }
    let logs: Vec<f64> = xs.iter().map(|&x| x.ln()).collect();
    (fsum(&logs) / xs.len() as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsum_is_exact_where_naive_sum_is_not() {
        assert_eq!(fsum(&[1e100, 1.0, -1e100, 1e-100]), 1.0);
        assert_eq!(fsum(&[0.1; 10]), 1.0);
        assert_ne!([0.1f64; 10].iter().sum::<f64>(), 1.0);
    }

    #[test]
    fn means_of_known_values() {
        assert_eq!(mean(&[1.0, 2.0, 3.0, 6.0]), 3.0);
        assert!((harmonic_mean(&[1.0, 4.0, 4.0]) - 2.0).abs() < 1e-15);
        assert!((geometric_mean(&[1.0, 4.0, 16.0]) - 4.0).abs() < 1e-14);
        assert_eq!(harmonic_mean(&[0.0, 4.0]), 0.0);
        assert_eq!(geometric_mean(&[0.0, 4.0]), 0.0);
    }

    #[test]
    fn recall_is_a_float32_ratio() {
        // 1/3 in float32 widened: 33.33333432674408, not 33.333333333333336.
        assert_eq!(recall(1, 3), (1f32 / 3f32) as f64 * 100.0);
        assert_ne!(recall(1, 3), 100.0 / 3.0);
    }

    #[test]
    fn equal_distances_tie_by_position() {
        // Two different scores whose float32 distances 1 - s are equal.
        let (a, b) = (0..4)
            .map(|k| f32::from_bits(0.3f32.to_bits() + k))
            .map(|a| (a, f32::from_bits(a.to_bits() + 1)))
            .find(|&(a, b)| distance(b) == distance(a))
            .unwrap();
        // The higher score b comes second: the tie is broken by position, as a stable argsort of
        // the distances would.
        let s = [0.5f32, a, b, 0.9];
        let d: Vec<f32> = s.iter().map(|&x| distance(x)).collect();
        assert!(s[2] > s[1] && d[1] == d[2]);
        assert_eq!(rank_among(&d, 2, 0..4), 3);
        assert_eq!(rank_among(&d, 1, 0..4), 2);
        assert_eq!(rank_among(&d, 3, 0..4), 0);
    }
}
