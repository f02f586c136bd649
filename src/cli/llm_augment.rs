//! `slot4acir llm-augment`: write the LLM sampler's caption files (`cap.rc2.llm.train.json`,
//! `cap.{type}.llm.train.json`) with any OpenAI-compatible chat endpoint.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::llm::captions::Triplets;
use crate::llm::{AugmentOptions, Augmenter, ClientOptions, Dataset, PromptTemplate, RetryPolicy};

#[derive(clap::Args)]
pub struct Args {
    /// Which caption files: CIRR `cap.rc2.{split}.json` or FashionIQ `cap.{type}.{split}.json`.
    #[arg(long, value_enum)]
    pub dataset: Dataset,
    /// Dataset folder: the one holding `captions/` (or the CIRR/FashionIQ base folder).
    #[arg(long)]
    pub data_root: PathBuf,
    /// Base URL of the API, e.g. http://127.0.0.1:8080/v1 (llama.cpp), http://127.0.0.1:11434/v1
    /// (Ollama), or the full .../chat/completions URL.
    #[arg(long)]
    pub endpoint: String,
    /// The model name sent with each request.
    #[arg(long)]
    pub model: String,
    /// Environment variable holding the API key (sent as a Bearer token).
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Paraphrases per caption (FashionIQ requires 2: its reader splits captions at index 3).
    #[arg(long, default_value_t = 2)]
    pub paraphrases: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// The split to augment (training reads only `train`'s LLM file).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// FashionIQ clothing types, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "dress,shirt,toptee")]
    pub types: Vec<String>,
    /// Prompt template file (default: the built-in assets/llm_prompt.txt, which documents the format).
    #[arg(long)]
    pub prompt_template: Option<PathBuf>,
    /// Sampling temperature sent with each request.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Answer length limit sent with each request (none by default).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Seconds allowed for one request, answer included.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Retries of one caption after timeouts, connection faults, 429 and 5xx.
    #[arg(long, default_value_t = 6)]
    pub retries: u32,
    /// Re-asks of one caption after unusable answers.
    #[arg(long, default_value_t = 3)]
    pub reasks: u32,
    /// First retry delay in seconds, doubled each retry (a server's Retry-After wins).
    #[arg(long, default_value_t = 1.0)]
    pub backoff: f64,
    /// Longest retry delay in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub max_backoff: f64,
    /// Write the file even if some captions failed, with the original caption in their place.
    #[arg(long)]
    pub allow_failed: bool,
    /// Print the endpoint and the messages for the first caption, and send nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn seconds(value: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| format!("{flag} {value}: not a duration"))
}

pub fn run(args: Args) -> Result<()> {
    let api_key = match &args.api_key_env {
        None => None,
        Some(var) => Some(std::env::var(var).with_context(|| {
            format!("environment variable {var} (named by --api-key-env) is not set")
        })?),
    };
    let opts = AugmentOptions {
        dataset: args.dataset,
        data_root: args.data_root,
        split: args.split,
        types: args.types,
        paraphrases: args.paraphrases,
        concurrency: args.concurrency,
        allow_failed: args.allow_failed,
        client: ClientOptions {
            endpoint: args.endpoint,
            model: args.model,
            api_key,
            timeout: seconds(args.timeout, "--timeout")?,
            temperature: args.temperature,
            max_tokens: args.max_tokens,
        },
        retry: RetryPolicy {
            retries: args.retries,
            reasks: args.reasks,
            backoff: seconds(args.backoff, "--backoff")?,
            max_backoff: seconds(args.max_backoff, "--max-backoff")?,
        },
        template: PromptTemplate::load(args.prompt_template.as_deref())?,
    };
    let augmenter = Augmenter::new(opts.clone())?;
    let files = augmenter.files()?;

    if args.dry_run {
        let triplets = Triplets::read(opts.dataset, &files[0].input)?;
        let caption = (0..triplets.len())
            .flat_map(|i| triplets.captions(i).iter())
            .find(|c| !c.trim().is_empty())
            .with_context(|| format!("{}: no caption to paraphrase", files[0].input.display()))?;
        println!(
            "POST {} (model {})",
            augmenter.endpoint(),
            opts.client.model
        );
        for m in opts.template.messages(caption, opts.paraphrases) {
            println!("--- {}\n{}", m.role, m.content);
        }
        return Ok(());
    }

    let mut unwritten = Vec::new();
    for file in &files {
        let report = augmenter.augment_file(file)?;
        println!("{report}");
        if !report.written {
            unwritten.push(format!(
                "{} ({} failed)",
                file.output.display(),
                report.failed
            ));
        }
    }
    if !unwritten.is_empty() {
        bail!(
            "not written: {}. Run the same command again to retry only the failed captions (the \
             finished ones are kept in the .progress.jsonl files), or pass --allow-failed",
            unwritten.join(", ")
        );
    }
    Ok(())
}
