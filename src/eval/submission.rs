//! CIRR test1 submission files (SPEC section 5), byte-compatible with the reference's
//! `json.dump(..., sort_keys=True)`: `recall_submission_NAME.json` (top 50 of the gallery, the
//! reference removed) and `recall_subset_submission_NAME.json` (top 3 of the query's
//! `img_set.members`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::metrics::{distance, ranking_cmp};

/// Answers kept per query in the two files.
pub const TOP_K: usize = 50;
pub const SUBSET_TOP_K: usize = 3;

/// The top `k` gallery positions of one query in ranking order, `exclude` left out.
pub fn top_k(scores: &[f32], k: usize, exclude: usize) -> Vec<usize> {
    let d: Vec<f32> = scores.iter().map(|&s| distance(s)).collect();
    let mut idx: Vec<usize> = (0..d.len()).filter(|&i| i != exclude).collect();
    if idx.len() > k {
        idx.select_nth_unstable_by(k, |&a, &b| ranking_cmp(&d, a, b));
        idx.truncate(k);
    }
    idx.sort_unstable_by(|&a, &b| ranking_cmp(&d, a, b));
    idx
}

/// The subset answer: `members` (gallery positions; duplicates and the reference dropped) in
/// ranking order, the first `k`.
pub fn subset_top_k(scores: &[f32], members: &[usize], reference: usize, k: usize) -> Vec<usize> {
    let d: Vec<f32> = scores.iter().map(|&s| distance(s)).collect();
    let mut m: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&i| i != reference)
        .collect();
    m.sort_unstable();
    m.dedup();
    m.sort_by(|&a, &b| ranking_cmp(&d, a, b));
    m.truncate(k);
    m
}

/// Both answers of one test query, by image name.
#[derive(Debug, Clone, PartialEq)]
pub struct CirrAnswer {
    pub pair_id: i64,
    pub top: Vec<String>,
    pub subset_top: Vec<String>,
}

impl CirrAnswer {
    /// The answer of one query from its scores over the gallery (`names` by position).
    pub fn from_scores(
        pair_id: i64,
        scores: &[f32],
        reference: usize,
        members: &[usize],
        names: &[String],
    ) -> Self {
        let to_names = |v: Vec<usize>| v.into_iter().map(|i| names[i].clone()).collect();
        Self {
            pair_id,
            top: to_names(top_k(scores, TOP_K, reference)),
            subset_top: to_names(subset_top_k(scores, members, reference, SUBSET_TOP_K)),
        }
    }
}

/// Writes the two files into `dir` (created if needed); returns their paths. Pair ids must be
/// unique (the reference's dict would silently keep the last answer of a repeated id).
pub fn write_cirr_submission(
    dir: &Path,
    save_name: &str,
    answers: &[CirrAnswer],
) -> Result<[PathBuf; 2]> {
    let mut recall = BTreeMap::new();
    let mut subset = BTreeMap::new();
    for a in answers {
        let key = a.pair_id.to_string();
        if recall.insert(key.clone(), &a.top).is_some() {
            bail!("pair id {} appears twice in the submission", a.pair_id);
        }
        subset.insert(key, &a.subset_top);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = [
        (
            dir.join(format!("recall_submission_{save_name}.json")),
            "recall",
            recall,
        ),
        (
            dir.join(format!("recall_subset_submission_{save_name}.json")),
            "recall_subset",
            subset,
        ),
    ];
    let mut out = Vec::new();
    for (path, metric, answers) in files {
        let text = python_json(metric, &answers);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        out.push(path);
    }
    Ok([out[0].clone(), out[1].clone()])
}

/// `json.dumps({"version": "rc2", "metric": metric, **answers}, sort_keys=True)`: keys sorted
/// by code point, `", "` and `": "` separators, non-ASCII escaped.
fn python_json(metric: &str, answers: &BTreeMap<String, &Vec<String>>) -> String {
    let mut entries: BTreeMap<&str, String> = BTreeMap::new();
    entries.insert("version", py_str("rc2"));
    entries.insert("metric", py_str(metric));
    for (k, names) in answers {
        let list: Vec<String> = names.iter().map(|n| py_str(n)).collect();
        entries.insert(k, format!("[{}]", list.join(", ")));
    }
    let body: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}: {v}", py_str(k)))
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// A JSON string as Python's `json` writes it (`ensure_ascii=True`).
fn py_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_layout_and_key_order() {
        let a = vec!["x".to_string(), "y\u{e9}".to_string()];
        let b = vec!["z".to_string()];
        let mut m = BTreeMap::new();
        m.insert("99".to_string(), &a);
        m.insert("100".to_string(), &b);
        assert_eq!(
            python_json("recall", &m),
            r#"{"100": ["z"], "99": ["x", "y\u00e9"], "metric": "recall", "version": "rc2"}"#
        );
    }

    #[test]
    fn top_k_orders_by_score_and_skips_the_reference() {
        let s = [0.1f32, 0.9, 0.5, 0.7, 0.3];
        assert_eq!(top_k(&s, 3, 1), vec![3, 2, 4]);
        assert_eq!(top_k(&s, 10, 3), vec![1, 2, 4, 0]);
        assert_eq!(subset_top_k(&s, &[0, 4, 4, 1, 2], 2, 3), vec![1, 4, 0]);
    }
}
