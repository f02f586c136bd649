//! `slot4acir serve`: the search service over an index (see `crate::serve`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::index::model_encoder::ModelEncoder;
use crate::index::{Index, Searcher};
use crate::model::slots::KeepMode;
use crate::serve::{App, BatchOptions, Limits, Server};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub index: PathBuf,
    /// The weights the index was built with (checked against its fingerprint).
    #[arg(long)]
    pub weights: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Directory of the gallery images (default: the one recorded when indexing).
    #[arg(long)]
    pub images_root: Option<PathBuf>,
    /// Largest accepted upload, in bytes.
    #[arg(long, default_value_t = Limits::default().max_upload_bytes)]
    pub max_upload_bytes: usize,
    /// Largest accepted image side, in pixels.
    #[arg(long, default_value_t = Limits::default().max_image_side)]
    pub max_image_side: u32,
    /// Longest accepted modification text, in characters.
    #[arg(long, default_value_t = Limits::default().max_text_chars)]
    pub max_text_chars: usize,
    /// Largest accepted k.
    #[arg(long, default_value_t = Limits::default().max_k)]
    pub max_k: usize,
    /// Most queries answered by one model call.
    #[arg(long, default_value_t = BatchOptions::default().max_batch)]
    pub max_batch: usize,
    /// How long the first query of a batch waits for others, in milliseconds.
    #[arg(long, default_value_t = 2)]
    pub max_wait_ms: u64,
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
    let searcher = Searcher::new(index, encoder)?;
    let limits = Limits {
        max_upload_bytes: args.max_upload_bytes,
        max_image_side: args.max_image_side,
        max_text_chars: args.max_text_chars,
        max_k: args.max_k,
        ..Limits::default()
    };
    let batch = BatchOptions {
        max_batch: args.max_batch,
        max_wait: Duration::from_millis(args.max_wait_ms),
        ..BatchOptions::default()
    };
    let n = searcher.index().len();
    let app = App::new(searcher, args.images_root.as_deref(), limits, &batch)?;
    let server = Server::start(app, &args.addr)?;
    tracing::info!("serving {n} gallery images on http://{}/", server.addr);
    server.wait();
    Ok(())
}
