//! `slot4acir bench`: times the query path, the gallery path and a training step of a
//! configuration on random weights (see [`crate::bench`]); prints a table and writes JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::bench::{run as run_bench, BenchOptions};
use crate::config::ModelConfig;

#[derive(clap::Args)]
pub struct Args {
    /// A preset name (`paper`, the default) or a configuration file.
    #[arg(long, default_value = "paper")]
    pub model_config: String,
    /// Fewer repetitions (medians of 3 instead of 7) and a training batch of 2 instead of 8.
    #[arg(long)]
    pub quick: bool,
    /// Where the figures go: a JSON list of {"name", "value", "unit"}.
    #[arg(long, default_value = "bench.json")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let o = BenchOptions {
        cfg: ModelConfig::load(&args.model_config)?,
        repeats: if args.quick { 3 } else { 7 },
        train_batch: if args.quick { 2 } else { 8 },
        gallery_images: if args.quick { 1 } else { 4 },
    };
    println!("{:<32} {:>12}  unit", "figure", "value");
    let figures = run_bench(&o, |f| {
        println!("{:<32} {:>12.4}  {}", f.name, f.value, f.unit)
    })?;
    let text = serde_json::to_string_pretty(&figures)?;
    crate::train::checkpoint::write_atomic(&args.out, text.as_bytes())
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}
