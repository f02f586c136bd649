//! One module per subcommand: a clap `Args` struct and `run(args) -> anyhow::Result<()>`.

pub mod bench;
pub mod config;
pub mod demo;
pub mod encode;
pub mod eval;
pub mod index;
pub mod llm_augment;
pub mod search;
pub mod serve;
pub mod submit;
pub mod train;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
