//! `slot4acir encode`: gallery vectors, light tokens and slots of images; with texts (one per
//! image), the composed query vectors and the query × gallery scores.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::data::preprocess::{self, Transform};
use crate::model::{KeepMode, Slot4ACir};

#[derive(clap::Args)]
pub struct Args {
    /// A preset name (`paper`) or a JSON file (a fixture's meta.json is accepted).
    #[arg(long)]
    pub model_config: String,
    /// Model weights (.safetensors) under the reference key names.
    #[arg(long)]
    pub weights: PathBuf,
    /// Image files to encode.
    #[arg(long, num_args = 1.., conflicts_with = "pixels", required_unless_present = "pixels")]
    pub images: Vec<PathBuf>,
    /// Preprocessing of --images: `targetpad[:ratio]` or `squarepad`.
    #[arg(long, default_value = "targetpad")]
    pub transform: String,
    /// A .safetensors file holding preprocessed pixels (N,3,S,S).
    #[arg(long)]
    pub pixels: Option<PathBuf>,
    /// The tensor to read from --pixels (needed when the file holds several).
    #[arg(long, requires = "pixels")]
    pub pixels_key: Option<String>,
    /// Pre-tokenized modification texts, one per image: a .safetensors file with
    /// `input_ids` and `attention_mask` (N,L).
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Adaptive models: draw the keep mask as the reference (sample) or deterministically.
    #[arg(long, value_enum, default_value = "sample")]
    pub keep_mode: KeepModeArg,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Output .safetensors file.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum KeepModeArg {
    Sample,
    Argmax,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = ModelConfig::load(&args.model_config)?;
    let pixels = match &args.pixels {
        Some(path) => read_tensor(path, args.pixels_key.as_deref())?,
        None => load_images(
            &args.images,
            &Transform::parse(&args.transform)?,
            cfg.img_size,
        )?,
    };
    let n = pixels.dim(0)?;
    let tokens = args.tokens.as_deref().map(read_tokens).transpose()?;
    if let Some((ids, _)) = &tokens {
        if ids.dim(0)? != n {
            bail!("{} texts for {n} images (one text per image)", ids.dim(0)?);
        }
    }
    // Inputs are checked first: the model is the slow part to load.
    let device = Device::cuda_if_available(0)?;
    let (mut model, _) = Slot4ACir::load(&cfg, &args.weights, &device)?;
    model.keep_mode = match args.keep_mode {
        KeepModeArg::Sample => KeepMode::Sample,
        KeepModeArg::Argmax => KeepMode::Argmax,
    };
    let out = encode(
        &model,
        &pixels.to_device(&device)?,
        tokens.as_ref(),
        args.batch_size,
    )
    .context("encoding")?;
    candle_core::safetensors::save(&out, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!("wrote {} ({n} images)", args.out.display());
    Ok(())
}

/// Runs the model over `pixels` in batches; the outputs as the command writes them.
pub fn encode(
    model: &Slot4ACir,
    pixels: &Tensor,
    tokens: Option<&(Tensor, Tensor)>,
    batch_size: usize,
) -> Result<HashMap<String, Tensor>> {
    let n = pixels.dim(0)?;
    let mut parts: HashMap<&str, Vec<Tensor>> = HashMap::new();
    for start in (0..n).step_by(batch_size.max(1)) {
        let len = batch_size.max(1).min(n - start);
        let x = pixels.narrow(0, start, len)?;
        let light = model.light_tokens(&x, false)?;
        let slots = model.slots(&light, false)?;
        parts
            .entry("target_feats")
            .or_default()
            .push(model.gallery_feats(&x)?);
        if let Some((ids, mask)) = tokens {
            let (ids, mask) = (ids.narrow(0, start, len)?, mask.narrow(0, start, len)?);
            let q = model.query_feats_from_slots(&slots, &ids, &mask, false)?;
            parts.entry("query_feats").or_default().push(q);
        }
        if let Some(keep) = &slots.keep_mask {
            parts.entry("keep_mask").or_default().push(keep.clone());
        }
        parts.entry("slots").or_default().push(slots.slots);
        parts.entry("light_tokens").or_default().push(light);
    }
    let mut out = HashMap::new();
    for (k, v) in parts {
        out.insert(k.to_string(), Tensor::cat(&v, 0)?);
    }
    if let Some(q) = out.get("query_feats") {
        let scores = Slot4ACir::scores(q, &out["target_feats"])?;
        out.insert("scores".into(), scores);
    }
    Ok(out)
}

fn read_tensor(path: &Path, key: Option<&str>) -> Result<Tensor> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let t = match key {
        Some(k) => tensors
            .remove(k)
            .with_context(|| format!("{} has no tensor {k}", path.display()))?,
        None if tensors.len() == 1 => tensors.into_values().next().expect("one tensor"),
        None => {
            let mut names: Vec<_> = tensors.keys().cloned().collect();
            names.sort();
            bail!(
                "{} holds several tensors ({}): choose one with --pixels-key",
                path.display(),
                names.join(", ")
            )
        }
    };
    if t.rank() != 4 || t.dim(1)? != 3 {
        bail!(
            "{}: pixels must be (N,3,S,S), got {:?}",
            path.display(),
            t.dims()
        );
    }
    Ok(t.to_dtype(DType::F32)?)
}

fn read_tokens(path: &Path) -> Result<(Tensor, Tensor)> {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut take = |k: &str| {
        t.remove(k)
            .with_context(|| format!("{} has no tensor {k}", path.display()))
    };
    let ids = take("input_ids")?.to_dtype(DType::I64)?;
    let mask = take("attention_mask")?.to_dtype(DType::F32)?;
    if ids.rank() != 2 || ids.dims() != mask.dims() {
        bail!(
            "{}: input_ids {:?} and attention_mask {:?} must be the same (N,L)",
            path.display(),
            ids.dims(),
            mask.dims()
        );
    }
    Ok((ids, mask))
}

/// Pillow-exact preprocessing of every image; an error names every file that failed.
fn load_images(paths: &[PathBuf], transform: &Transform, size: usize) -> Result<Tensor> {
    let batch = preprocess::load_batch(paths, transform, size)?;
    if !batch.failed.is_empty() {
        let list: Vec<String> = batch
            .failed
            .iter()
            .map(|(i, e)| format!("{}: {e:#}", paths[*i].display()))
            .collect();
        bail!("{} image(s) failed:\n  {}", list.len(), list.join("\n  "));
    }
    Ok(batch.pixels)
}
