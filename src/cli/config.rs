//! `slot4acir config`: show a configuration (preset name or file) as JSON.

use anyhow::Result;

use crate::config::ModelConfig;

#[derive(clap::Args)]
pub struct Args {
    /// A preset name (`paper`) or a JSON file (a fixture's meta.json is accepted).
    #[arg(long, default_value = "paper")]
    pub model_config: String,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = ModelConfig::load(&args.model_config)?;
    println!("{}", serde_json::to_string_pretty(&cfg)?);
    Ok(())
}
