//! `slot4acir eval`: validation metrics of a checkpoint (CIRR val or FashionIQ val), printed as
//! JSON with the reference's key names and written to a file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::config::ModelConfig;
use crate::data::{cirr, data_root, fashioniq, LoadOptions, SkipLog};
use crate::eval::driver::{self, EvalOptions};
use crate::index::model_encoder::ModelEncoder;
use crate::model::slots::KeepMode;

/// What `eval` and `submit` share: the model, the data root and how bad input is treated.
#[derive(clap::Args)]
pub struct ModelData {
    /// The data root holding `CIRR/` and `FashionIQ/` (default: `$SLOT4ACIR_DATA_ROOT`).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Model configuration: a preset (`paper`), a JSON file or a fixture's meta.json.
    #[arg(long)]
    pub model_config: String,
    /// Model weights (safetensors or a PyTorch checkpoint).
    #[arg(long)]
    pub weights: PathBuf,
    /// Gallery images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Skip unreadable images and bad records (counted and reported) instead of stopping.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Adaptive-slot models: keep slots by the argmax of their logits instead of sampling as
    /// the reference does (reproducible results).
    #[arg(long)]
    pub deterministic_slots: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl ModelData {
    pub fn root(&self) -> Result<PathBuf> {
        data_root(self.data_root.as_deref())
    }

    pub fn encoder(&self) -> Result<ModelEncoder> {
        let cfg = ModelConfig::load(&self.model_config)?;
        let mut enc = ModelEncoder::load(&cfg, &self.weights)?;
        if self.deterministic_slots {
            enc.set_keep_mode(KeepMode::Argmax);
        }
        Ok(enc)
    }

    /// Annotation reading for evaluation: the original captions, skips as `--skip-bad-images`.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            llm_sampler: false,
            skip_bad: self.skip_bad_images,
        }
    }

    pub fn options(&self) -> EvalOptions {
        EvalOptions {
            batch_size: self.batch_size.max(1),
            progress: !self.quiet,
            ..EvalOptions::default()
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// `cirr` (val, reference removed, subset recalls) or `fashioniq` (val, per category).
    #[arg(long)]
    pub dataset: String,
    #[command(flatten)]
    pub model: ModelData,
    /// FashionIQ categories to evaluate (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "dress,shirt,toptee")]
    pub categories: Vec<String>,
    /// Where to write the metrics JSON (default: `metrics_<dataset>_val.json`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let root = args.model.root()?;
    let log = SkipLog::new(args.model.skip_bad_images);
    let load = args.model.load_options();
    // Annotations first: a bad caption file fails before the model is loaded.
    let metrics = match args.dataset.as_str() {
        "cirr" => {
            let mut ds = cirr::load(&root, cirr::CirrSplit::Val, load, &log)?;
            ds.require_in_gallery(&log)?;
            let enc = args.model.encoder()?;
            driver::cirr_val(&enc, &ds, &args.model.options(), &log)?
        }
        "fashioniq" => {
            for c in &args.categories {
                if !fashioniq::CATEGORIES.contains(&c.as_str()) {
                    bail!(
                        "unknown FashionIQ category '{c}' (known: {})",
                        fashioniq::CATEGORIES.join(", ")
                    );
                }
            }
            let cats: Vec<&str> = args.categories.iter().map(String::as_str).collect();
            let datasets = driver::fashioniq_val_datasets(&root, &cats, &log)?;
            let enc = args.model.encoder()?;
            driver::fashioniq_val(&enc, &datasets, &args.model.options(), &log)?
        }
        other => bail!("unknown dataset '{other}' (known: cirr, fashioniq)"),
    };
    log.report("eval");
    let text = serde_json::to_string_pretty(&metrics)?;
    println!("{text}");
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("metrics_{}_val.json", args.dataset)));
    std::fs::write(&out, format!("{text}\n"))
        .with_context(|| format!("writing metrics to {}", out.display()))?;
    tracing::info!("metrics written to {}", out.display());
    Ok(())
}
