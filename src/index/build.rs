//! Building an index: encode every gallery image once, in batches, resumably.
//!
//! Work goes to `<out>.partial/`: `plan.json` (the final header, batch size and image list)
//! and one `chunk-NNNNNN.bin` per finished batch (vectors then tokens, already in the index
//! dtype), each written to a temporary name and renamed, so a chunk file is either complete
//! or absent. An interrupted build rerun with the same arguments skips the finished chunks;
//! since batch boundaries are part of the plan, the assembled file is byte-identical to a
//! one-shot build. Images are decoded and preprocessed on a second thread (in parallel)
//! while the model encodes the previous batch.

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::encoder::Encoder;
use super::format::{names_blob, Dtype, GalleryImage, IndexFileWriter, IndexHeader};

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub dtype: Dtype,
    pub batch_size: usize,
    pub progress: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            dtype: Dtype::F16,
            batch_size: 32,
            progress: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    pub total: usize,
    /// Images encoded by this run.
    pub encoded: usize,
    /// Images found already encoded by an interrupted run.
    pub resumed: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Plan {
    header: IndexHeader,
    batch_size: usize,
    images: Vec<GalleryImage>,
}

pub fn partial_dir(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

fn chunk_path(dir: &Path, c: usize) -> PathBuf {
    dir.join(format!("chunk-{c:06}.bin"))
}

/// Encodes `images` (paths relative to `image_root`) into the index file `out`.
pub fn build_index(
    encoder: &dyn Encoder,
    images: &[GalleryImage],
    image_root: &Path,
    out: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport> {
    ensure!(opts.batch_size > 0, "batch size must be positive");
    check_unique_names(images)?;
    let layout = encoder.layout();
    let names = names_blob(images)?;
    let root = std::fs::canonicalize(image_root)
        .with_context(|| format!("image directory {}", image_root.display()))?;
    let header = IndexHeader::new(
        encoder.model_config(),
        encoder.fingerprint(),
        opts.dtype,
        images.len(),
        layout,
        Some(root.to_string_lossy().into_owned()),
        names.len() as u64,
    );
    let plan = Plan {
        header: header.clone(),
        batch_size: opts.batch_size,
        images: images.to_vec(),
    };
    let dir = partial_dir(out);
    let plan_path = dir.join("plan.json");
    if plan_path.exists() {
        let old: Plan = serde_json::from_slice(
            &std::fs::read(&plan_path)
                .with_context(|| format!("reading {}", plan_path.display()))?,
        )
        .with_context(|| format!("parsing {}", plan_path.display()))?;
        if old != plan {
            bail!(
                "{} holds an interrupted build of a different index (other images, model, \
                 dtype or batch size); rerun with the same arguments to resume it, or delete \
                 that directory to start over",
                dir.display()
            );
        }
    } else {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        write_atomic(&plan_path, &serde_json::to_vec_pretty(&plan)?)?;
    }

    let n_chunks = images.len().div_ceil(opts.batch_size);
    let chunk_range = |c: usize| c * opts.batch_size..((c + 1) * opts.batch_size).min(images.len());
    let pending: Vec<usize> = (0..n_chunks)
        .filter(|&c| !chunk_path(&dir, c).exists())
        .collect();
    let resumed = images.len() - pending.iter().map(|&c| chunk_range(c).len()).sum::<usize>();
    let bar = if opts.progress {
        let b = ProgressBar::new(images.len() as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} images ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_position(resumed as u64);
        b
    } else {
        ProgressBar::hidden()
    };

    let mut encoded = 0;
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = sync_channel::<Result<(usize, Tensor)>>(1);
        let pending = &pending;
        let chunk_range = &chunk_range;
        s.spawn(move || {
            for &c in pending {
                let batch = load_batch(encoder, &images[chunk_range(c)], &root);
                let failed = batch.is_err();
                if tx.send(batch.map(|t| (c, t))).is_err() || failed {
                    return;
                }
            }
        });
        for item in rx {
            let (c, pixels) = item?;
            let (vectors, tokens) = encoder
                .encode_gallery(&pixels)
                .with_context(|| format!("encoding images {:?}", chunk_range(c)))?;
            let b = chunk_range(c).len();
            let vectors = flat_checked(&vectors, &[b, layout.vectors_per_image, layout.dim])?;
            let tokens = flat_checked(&tokens, &[b, layout.tokens_per_image, layout.token_dim])?;
            let mut bytes = opts.dtype.encode(&vectors);
            bytes.extend_from_slice(&opts.dtype.encode(&tokens));
            write_atomic(&chunk_path(&dir, c), &bytes)?;
            encoded += b;
            bar.inc(b as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();

    assemble(&header, &names, &dir, out, n_chunks, opts.batch_size)?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(BuildReport {
        total: images.len(),
        encoded,
        resumed,
    })
}

fn check_unique_names(images: &[GalleryImage]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for g in images {
        ensure!(
            seen.insert(g.name.as_str()),
            "two gallery images are named '{}'",
            g.name
        );
    }
    Ok(())
}

/// Decodes and preprocesses a batch in parallel → (B,3,S,S).
fn load_batch(encoder: &dyn Encoder, batch: &[GalleryImage], root: &Path) -> Result<Tensor> {
    let pixels: Vec<Tensor> = batch
        .par_iter()
        .map(|g| {
            let path = root.join(&g.path);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("reading image {}", path.display()))?;
            encoder
                .preprocess(&bytes)
                .with_context(|| format!("preprocessing image {}", path.display()))
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::stack(&pixels, 0)?)
}

fn flat_checked(t: &Tensor, dims: &[usize]) -> Result<Vec<f32>> {
    ensure!(
        t.dims() == dims,
        "the encoder produced shape {:?}, expected {:?}",
        t.dims(),
        dims
    );
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
}

fn assemble(
    header: &IndexHeader,
    names: &[u8],
    dir: &Path,
    out: &Path,
    n_chunks: usize,
    batch_size: usize,
) -> Result<()> {
    let el = header.dtype.size() as u64;
    let vec_per = header.layout.vector_elems() as u64 * el;
    let tok_per = header.layout.token_elems() as u64 * el;
    let mut w = IndexFileWriter::create(out, header)?;
    for c in 0..n_chunks {
        let path = chunk_path(dir, c);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let first = (c * batch_size) as u64;
        let b = (header.count as u64 - first).min(batch_size as u64);
        ensure!(
            bytes.len() as u64 == b * (vec_per + tok_per),
            "{} has {} bytes, expected {}",
            path.display(),
            bytes.len(),
            b * (vec_per + tok_per)
        );
        let split = (b * vec_per) as usize;
        w.write_at(header.vectors.offset + first * vec_per, &bytes[..split])?;
        w.write_at(header.tokens.offset + first * tok_per, &bytes[split..])?;
    }
    w.write_at(header.names.offset, names)?;
    w.finish()
}

/// Every image under `dir` (png, jpg, jpeg; recursive), sorted by path; the name is the path
/// relative to `dir` without its extension.
pub fn list_image_dir(dir: &Path) -> Result<Vec<GalleryImage>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<GalleryImage>) -> Result<()> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
        for e in entries {
            let path = e
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            if path.is_dir() {
                walk(root, &path, out)?;
                continue;
            }
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .map(|e| e.to_ascii_lowercase());
            if !matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let rel_str = rel
                .to_str()
                .with_context(|| format!("image path {} is not UTF-8", path.display()))?;
            let name = rel.with_extension("");
            out.push(GalleryImage {
                name: name.to_string_lossy().into_owned(),
                path: rel_str.to_string(),
            });
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    ensure!(
        !out.is_empty(),
        "no png or jpeg images under {}",
        dir.display()
    );
    Ok(out)
}

/// The gallery of a CIRR split: `cirr/image_splits/split.rc2.{split}.json` under `data_root`
/// (the `CIRR/` directory), image paths relative to it; sorted by name.
pub fn list_cirr_split(data_root: &Path, split: &str) -> Result<Vec<GalleryImage>> {
    let file = data_root
        .join("cirr/image_splits")
        .join(format!("split.rc2.{split}.json"));
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let map: std::collections::BTreeMap<String, String> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected an object of name → path", file.display()))?;
    Ok(map
        .into_iter()
        .map(|(name, path)| GalleryImage {
            name,
            path: path.trim_start_matches("./").to_string(),
        })
        .collect())
}
