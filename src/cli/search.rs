//! `slot4acir search`: one composed query against an index, with the light model alone.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::index::model_encoder::ModelEncoder;
use crate::index::{Encoder, Index, Query, QueryImage, Searcher};
use crate::model::slots::KeepMode;

#[derive(clap::Args)]
pub struct Args {
    /// The index file (from `slot4acir index`).
    #[arg(long)]
    pub index: PathBuf,
    /// The weights the index was built with (checked against its fingerprint).
    #[arg(long)]
    pub weights: PathBuf,
    /// The reference image, a file.
    #[arg(
        long,
        conflicts_with = "reference",
        required_unless_present = "reference"
    )]
    pub image: Option<PathBuf>,
    /// The reference image, a gallery image by name (left out of its own results).
    #[arg(long)]
    pub reference: Option<String>,
    /// The modification text.
    #[arg(long)]
    pub text: String,
    /// How many results.
    #[arg(short, long, default_value_t = 10)]
    pub k: usize,
    /// Print JSON (`{"results": [{"name", "score"}, …]}`) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Adaptive-slot models: keep slots by the argmax of their logits instead of sampling as
    /// the reference does (reproducible results).
    #[arg(long)]
    pub deterministic_slots: bool,
}

pub fn run(args: Args) -> Result<()> {
    let index = Index::open(&args.index)?;
    let mut encoder = ModelEncoder::for_index(&index, &args.weights)?;
    if args.deterministic_slots {
        encoder.set_keep_mode(KeepMode::Argmax);
    }
    let encoder = Arc::new(encoder);
    let image = match (&args.image, &args.reference) {
        (Some(path), _) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
            QueryImage::Pixels(
                encoder
                    .preprocess(&bytes)
                    .with_context(|| format!("preprocessing image {}", path.display()))?,
            )
        }
        (None, Some(name)) => QueryImage::Reference(index.position(name).with_context(|| {
            format!(
                "no gallery image named '{name}' in {}",
                args.index.display()
            )
        })?),
        (None, None) => unreachable!("clap requires one"),
    };
    let searcher = Searcher::new(index, encoder)?;
    let results = searcher
        .search(&[Query {
            image,
            text: args.text.clone(),
            k: args.k,
        }])?
        .remove(0);
    if args.json {
        println!("{}", serde_json::json!({ "results": results }));
    } else {
        println!("{:>4}  {:>8}  name", "rank", "score");
        for (i, r) in results.iter().enumerate() {
            println!("{:>4}  {:>8.4}  {}", i + 1, r.score, r.name);
        }
    }
    Ok(())
}
