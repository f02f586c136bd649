//! Command-line entry: parse and dispatch, nothing else.

use clap::{Parser, Subcommand};

// candle allocates a fresh buffer per operation: the system allocator returns large ones to the
// kernel at once, so every step page-faults them in again; mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "slot4acir",
    version,
    about = "Slot Inversion for Asymmetric Composed Image Retrieval"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once: the size of the largest Args does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Time the query path, the gallery path and a training step on random weights.
    Bench(slot4acir::cli::bench::Args),
    /// Print the model configuration of a preset or file, with its parameter counts.
    Config(slot4acir::cli::config::Args),
    /// Encode images (gallery vectors, light tokens, slots) and, with texts, composed queries.
    Encode(slot4acir::cli::encode::Args),
    /// Write the LLM-paraphrased training caption files with an OpenAI-compatible endpoint.
    LlmAugment(slot4acir::cli::llm_augment::Args),
    /// The main job on the built-in default: build a benchmark from real photographs, train
    /// the small demo model from offline pretrained weights, report before and after.
    Demo(slot4acir::cli::demo::Args),
    /// Train a light query model against the large gallery model (CIRR or FashionIQ).
    Train(slot4acir::cli::train::Args),
    /// Validation metrics of a checkpoint on CIRR val or FashionIQ val, as JSON.
    Eval(slot4acir::cli::eval::Args),
    /// Write the CIRR test1 submission files of a checkpoint.
    Submit(slot4acir::cli::submit::Args),
    /// Encode a gallery once with the large model into an index file (resumable).
    Index(slot4acir::cli::index::Args),
    /// Answer one composed query (image + text) against an index with the light model.
    Search(slot4acir::cli::search::Args),
    /// Serve searches over HTTP, with a web page.
    Serve(slot4acir::cli::serve::Args),
}

fn main() -> anyhow::Result<()> {
    slot4acir::cli::tune_allocator();
    slot4acir::cli::init_logging();
    match Cli::parse().command {
        Command::Bench(a) => slot4acir::cli::bench::run(a),
        Command::Config(a) => slot4acir::cli::config::run(a),
        Command::Encode(a) => slot4acir::cli::encode::run(a),
        Command::LlmAugment(a) => slot4acir::cli::llm_augment::run(a),
        Command::Demo(a) => slot4acir::cli::demo::run(a),
        Command::Train(a) => slot4acir::cli::train::run(a),
        Command::Eval(a) => slot4acir::cli::eval::run(a),
        Command::Submit(a) => slot4acir::cli::submit::run(a),
        Command::Index(a) => slot4acir::cli::index::run(a),
        Command::Search(a) => slot4acir::cli::search::run(a),
        Command::Serve(a) => slot4acir::cli::serve::run(a),
    }
}
