//! The evaluation driver (SPEC section 5): encode a split's gallery once, build every query from
//! the light tokens the gallery pass computed for its reference image (never recomputed), score
//! the queries against the gallery, and turn the ranks into metrics or submission answers.
//!
//! The model is reached through [`Encoder`], so the driver runs the real model and the toy one
//! alike; the commands are thin wrappers over [`cirr_val`], [`fashioniq_val`] and [`cirr_test1`].

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::metrics::{
    cirr_metrics, cirr_ranks, distance, fashioniq_metrics, fashioniq_recalls, rank_among,
    CirrQuery, Metrics,
};
use super::submission::CirrAnswer;
use crate::data::{fashioniq, Dataset, LoadOptions, SkipLog};
use crate::index::Encoder;
use crate::model::Slot4ACir;

/// Batch sizes of the driver.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Gallery images per forward pass (also query texts per query pass).
    pub batch_size: usize,
    /// Queries scored against the whole gallery at once.
    pub score_chunk: usize,
    /// Show progress bars (on a terminal).
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch_size: 32,
            score_chunk: 256,
            progress: true,
        }
    }
}

/// A split after the gallery pass.
pub struct EncodedSplit {
    /// Encoded gallery images, as positions in `Dataset::gallery` (unreadable ones skipped).
    pub gallery: Vec<usize>,
    /// Gallery vectors (gallery.len(), V, D), on the CPU.
    pub vectors: Tensor,
    /// Triplets that got a query vector, as positions in `Dataset::triplets`, in order.
    pub queries: Vec<usize>,
    /// Query vectors (queries.len(), D), on the CPU.
    pub query_vectors: Tensor,
}

fn progress(len: usize, what: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}

/// Encodes the gallery of `ds` once and, in the same pass, the query of every triplet from the
/// light tokens of its reference image. Triplets must have their images in the gallery
/// ([`Dataset::require_in_gallery`]). An unreadable image is an error naming it, or with
/// skipping a counted skip that also drops the queries that need it.
pub fn encode_split(
    enc: &dyn Encoder,
    ds: &Dataset,
    opts: &EvalOptions,
    log: &SkipLog,
) -> Result<EncodedSplit> {
    let index = ds.gallery_index();
    let mut by_reference: HashMap<usize, Vec<usize>> = HashMap::new();
    for (ti, t) in ds.triplets.iter().enumerate() {
        let r = *index
            .get(t.reference.as_str())
            .with_context(|| format!("{}: reference not in the gallery", ds.describe(t)))?;
        by_reference.entry(r).or_default().push(ti);
    }
    let layout = enc.layout();
    let bs = opts.batch_size.max(1);
    let pb = progress(
        ds.gallery.len(),
        &format!("encoding {}", ds.name),
        opts.progress,
    );
    let (mut kept, mut vec_parts) = (Vec::new(), Vec::new());
    let (mut queries, mut query_parts) = (Vec::new(), Vec::new());
    for start in (0..ds.gallery.len()).step_by(bs) {
        let batch: Vec<usize> = (start..(start + bs).min(ds.gallery.len())).collect();
        let loaded: Vec<Result<Tensor>> = batch
            .par_iter()
            .map(|&i| {
                let path = &ds.gallery[i].path;
                let bytes = std::fs::read(path)
                    .with_context(|| format!("reading image {}", path.display()))?;
                enc.preprocess(&bytes)
                    .with_context(|| format!("decoding image {}", path.display()))
            })
            .collect();
        let (mut ok, mut pixels) = (Vec::new(), Vec::new());
        for (&i, r) in batch.iter().zip(loaded) {
            match r {
                Ok(p) => {
                    ok.push(i);
                    pixels.push(p);
                }
                Err(e) => log.skip_or_fail(e.context(format!("gallery of {}", ds.name)))?,
            }
        }
        pb.inc(batch.len() as u64);
        if ok.is_empty() {
            continue;
        }
        let (vectors, tokens) = enc
            .encode_gallery(&Tensor::stack(&pixels, 0)?)
            .with_context(|| format!("encoding gallery images {start}.. of {}", ds.name))?;
        let (v, t) = (layout.vectors_per_image, layout.tokens_per_image);
        ensure!(
            vectors.dims() == [ok.len(), v, layout.dim]
                && tokens.dims() == [ok.len(), t, layout.token_dim],
            "encoder gave {:?} / {:?} for {} images, layout {layout:?}",
            vectors.dims(),
            tokens.dims(),
            ok.len()
        );
        vec_parts.push(vectors.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);

        // The queries whose reference is in this batch, from its light tokens.
        let (mut rows, mut tids) = (Vec::new(), Vec::new());
        for (row, g) in ok.iter().enumerate() {
            for &ti in by_reference.get(g).into_iter().flatten() {
                rows.push(row as u32);
                tids.push(ti);
            }
        }
        for (r, ti) in rows.chunks(bs).zip(tids.chunks(bs)) {
            let sel = Tensor::from_vec(r.to_vec(), r.len(), tokens.device())?;
            let texts: Vec<String> = ti
                .iter()
                .map(|&i| ds.triplets[i].text.eval_caption())
                .collect();
            let q = enc
                .encode_query(&tokens.index_select(&sel, 0)?, &texts)
                .with_context(|| format!("encoding queries of {}", ds.name))?;
            ensure!(
                q.dims() == [r.len(), layout.dim],
                "query encoder gave {:?} for {} queries",
                q.dims(),
                r.len()
            );
            query_parts.push(q.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
            queries.extend_from_slice(ti);
        }
        kept.extend(ok);
    }
    pb.finish_and_clear();
    if kept.is_empty() {
        bail!("no image of the gallery of {} could be encoded", ds.name);
    }
    let vectors = Tensor::cat(&vec_parts, 0)?;
    let query_vectors = if query_parts.is_empty() {
        Tensor::zeros((0, layout.dim), DType::F32, &Device::Cpu)?
    } else {
        Tensor::cat(&query_parts, 0)?
    };
    let mut split = EncodedSplit {
        gallery: kept,
        vectors,
        queries,
        query_vectors,
    };
    drop_incomplete_queries(&mut split, ds, log)?;
    Ok(split)
}

/// Puts the queries in triplet order and, with skipped images, drops every query whose
/// reference, target or a member was not encoded (it cannot be scored as the reference would),
/// counting it.
fn drop_incomplete_queries(split: &mut EncodedSplit, ds: &Dataset, log: &SkipLog) -> Result<()> {
    let encoded: std::collections::HashSet<&str> = split
        .gallery
        .iter()
        .map(|&i| ds.gallery[i].name.as_str())
        .collect();
    let mut dropped = std::collections::HashSet::new();
    if split.gallery.len() < ds.gallery.len() {
        for (ti, t) in ds.triplets.iter().enumerate() {
            let missing: Vec<&String> = std::iter::once(&t.reference)
                .chain(t.target.iter())
                .chain(t.members.iter())
                .filter(|n| !encoded.contains(n.as_str()))
                .collect();
            if !missing.is_empty() {
                dropped.insert(ti);
                log.skip_or_fail(anyhow::anyhow!(
                    "{} dropped: image(s) {missing:?} could not be encoded",
                    ds.describe(t)
                ))?;
            }
        }
    }
    let mut rows: Vec<(usize, u32)> = split
        .queries
        .iter()
        .enumerate()
        .filter(|(_, ti)| !dropped.contains(*ti))
        .map(|(row, &ti)| (ti, row as u32))
        .collect();
    rows.sort_unstable();
    split.queries = rows.iter().map(|r| r.0).collect();
    let sel: Vec<u32> = rows.iter().map(|r| r.1).collect();
    let sel = Tensor::from_vec(sel, rows.len(), &Device::Cpu)?;
    split.query_vectors = split.query_vectors.index_select(&sel, 0)?;
    Ok(())
}

impl EncodedSplit {
    /// Calls `f(k, scores)` for every query `k` (a position in `self.queries`) with its scores
    /// over the encoded gallery, scoring `chunk` queries at a time.
    pub fn for_each_scores(
        &self,
        chunk: usize,
        mut f: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let q = self.queries.len();
        for start in (0..q).step_by(chunk.max(1)) {
            let len = chunk.max(1).min(q - start);
            let s = Slot4ACir::scores(&self.query_vectors.narrow(0, start, len)?, &self.vectors)?;
            for (k, row) in s.to_vec2::<f32>()?.iter().enumerate() {
                if let Some(bad) = row.iter().find(|v| !v.is_finite()) {
                    bail!("query {} has a non-finite score {bad}", start + k);
                }
                f(start + k, row)?;
            }
        }
        Ok(())
    }

    /// Position of every encoded gallery image by name.
    pub fn positions<'a>(&self, ds: &'a Dataset) -> HashMap<&'a str, usize> {
        self.gallery
            .iter()
            .enumerate()
            .map(|(p, &i)| (ds.gallery[i].name.as_str(), p))
            .collect()
    }
}

/// CIRR validation metrics of a `CIRR val` dataset (reference removed, subset recalls).
pub fn cirr_val(
    enc: &dyn Encoder,
    ds: &Dataset,
    opts: &EvalOptions,
    log: &SkipLog,
) -> Result<Metrics> {
    cirr_val_metrics(&encode_split(enc, ds, opts, log)?, ds, opts)
}

/// [`cirr_val`] of a split already encoded (by [`encode_split`] or from cached features).
pub fn cirr_val_metrics(split: &EncodedSplit, ds: &Dataset, opts: &EvalOptions) -> Result<Metrics> {
    let pos = split.positions(ds);
    let mut ranks = Vec::with_capacity(split.queries.len());
    split.for_each_scores(opts.score_chunk, |k, scores| {
        let t = &ds.triplets[split.queries[k]];
        let target = t
            .target
            .as_ref()
            .with_context(|| format!("{}: no target", ds.describe(t)))?;
        let q = CirrQuery {
            reference: pos[t.reference.as_str()],
            target: pos[target.as_str()],
            members: t.members.iter().map(|m| pos[m.as_str()]).collect(),
        };
        ranks.push(cirr_ranks(scores, &q).with_context(|| ds.describe(t))?);
        Ok(())
    })?;
    cirr_metrics(&ranks)
}

/// FashionIQ recall@10 and @50 of one category's validation dataset (reference kept).
pub fn fashioniq_category(
    enc: &dyn Encoder,
    ds: &Dataset,
    opts: &EvalOptions,
    log: &SkipLog,
) -> Result<(f64, f64)> {
    let split = encode_split(enc, ds, opts, log)?;
    let pos = split.positions(ds);
    let mut ranks = Vec::with_capacity(split.queries.len());
    split.for_each_scores(opts.score_chunk, |k, scores| {
        let t = &ds.triplets[split.queries[k]];
        let target = t
            .target
            .as_ref()
            .with_context(|| format!("{}: no target", ds.describe(t)))?;
        let d: Vec<f32> = scores.iter().map(|&s| distance(s)).collect();
        ranks.push(rank_among(&d, pos[target.as_str()], 0..d.len()));
        Ok(())
    })?;
    fashioniq_recalls(&ranks)
}

/// The validation datasets of FashionIQ `categories`, one per category, checked for
/// evaluation (every triplet's images in its category's gallery).
pub fn fashioniq_val_datasets(
    data_root: &Path,
    categories: &[&str],
    log: &SkipLog,
) -> Result<Vec<(String, Dataset)>> {
    categories
        .iter()
        .map(|&c| {
            let split = fashioniq::FiqSplit::Val;
            let mut ds = fashioniq::load(data_root, &[c], split, LoadOptions::default(), log)?;
            ds.require_in_gallery(log)?;
            Ok((c.to_string(), ds))
        })
        .collect()
}

/// FashionIQ validation metrics of per-category datasets ([`fashioniq_val_datasets`]), each
/// ranked within its own gallery.
pub fn fashioniq_val(
    enc: &dyn Encoder,
    categories: &[(String, Dataset)],
    opts: &EvalOptions,
    log: &SkipLog,
) -> Result<Metrics> {
    let mut per_category = Vec::new();
    for (category, ds) in categories {
        let (r10, r50) = fashioniq_category(enc, ds, opts, log)?;
        tracing::info!("FashionIQ {category}: R@10 {r10:.2} R@50 {r50:.2}");
        per_category.push((category.clone(), r10, r50));
    }
    fashioniq_metrics(&per_category)
}

/// The CIRR test1 answers (top 50 without the reference, top 3 of the subset) of every query.
pub fn cirr_test1(
    enc: &dyn Encoder,
    ds: &Dataset,
    opts: &EvalOptions,
    log: &SkipLog,
) -> Result<Vec<CirrAnswer>> {
    cirr_test1_answers(&encode_split(enc, ds, opts, log)?, ds, opts)
}

/// [`cirr_test1`] of a split already encoded.
pub fn cirr_test1_answers(
    split: &EncodedSplit,
    ds: &Dataset,
    opts: &EvalOptions,
) -> Result<Vec<CirrAnswer>> {
    let pos = split.positions(ds);
    let names: Vec<String> = split
        .gallery
        .iter()
        .map(|&i| ds.gallery[i].name.clone())
        .collect();
    let mut answers = Vec::with_capacity(split.queries.len());
    split.for_each_scores(opts.score_chunk, |k, scores| {
        let t = &ds.triplets[split.queries[k]];
        let members: Vec<usize> = t.members.iter().map(|m| pos[m.as_str()]).collect();
        let reference = pos[t.reference.as_str()];
        answers.push(CirrAnswer::from_scores(
            t.pair_id, scores, reference, &members, &names,
        ));
        Ok(())
    })?;
    Ok(answers)
}
