//! `slot4acir index`: encode a gallery once with the large model into an index file.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::config::ModelConfig;
use crate::index::build::{list_cirr_split, list_image_dir};
use crate::index::format::Dtype;
use crate::index::model_encoder::ModelEncoder;
use crate::index::{build_index, BuildOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Model configuration: a preset (`paper`), a JSON file or a fixture's meta.json.
    #[arg(long)]
    pub model_config: String,
    /// Model weights (the checkpoint the queries will be answered with).
    #[arg(long)]
    pub weights: PathBuf,
    /// Index every PNG/JPEG under this directory (recursively).
    #[arg(long, conflicts_with_all = ["dataset", "split", "data_root"])]
    pub images: Option<PathBuf>,
    /// Index a dataset split's gallery instead (`cirr`).
    #[arg(long, requires_all = ["split", "data_root"])]
    pub dataset: Option<String>,
    /// The split (`train`, `val`, `test1`).
    #[arg(long)]
    pub split: Option<String>,
    /// The dataset directory (for CIRR: the `CIRR/` folder holding `cirr/` and the images).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// The index file to write (an interrupted run resumes from `<out>.partial/`).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage type of vectors and tokens: f16 (default, half the memory) or f32.
    #[arg(long, default_value = "f16", value_parser = Dtype::parse)]
    pub dtype: Dtype,
    /// Images per model call (part of the resumable plan: keep it when resuming).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> Result<()> {
    let (images, root) = match (&args.images, args.dataset.as_deref()) {
        (Some(dir), None) => (list_image_dir(dir)?, dir.clone()),
        (None, Some("cirr")) => {
            let root = args.data_root.clone().expect("required by clap");
            let split = args.split.as_deref().expect("required by clap");
            (list_cirr_split(&root, split)?, root)
        }
        (None, Some(other)) => bail!("unknown dataset '{other}' (known: cirr)"),
        _ => bail!("give either --images DIR or --dataset cirr --split S --data-root R"),
    };
    let cfg = ModelConfig::load(&args.model_config)?;
    let encoder = ModelEncoder::load(&cfg, &args.weights)?;
    tracing::info!(
        "indexing {} images from {} into {}",
        images.len(),
        root.display(),
        args.out.display()
    );
    let opts = BuildOptions {
        dtype: args.dtype,
        batch_size: args.batch_size,
        progress: !args.quiet,
    };
    let report = build_index(&encoder, &images, &root, &args.out, &opts)?;
    tracing::info!(
        "wrote {} ({} images: {} encoded now, {} resumed)",
        args.out.display(),
        report.total,
        report.encoded,
        report.resumed
    );
    Ok(())
}
