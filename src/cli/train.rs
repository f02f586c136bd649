//! `slot4acir train`: the reference's training script (SPEC section 3) on CIRR or FashionIQ.
//!
//! A run writes `save-dir/<dataset>/<exp-name>_<timestamp>/`: `configs.json` (these options and
//! the model configuration), `train_metrics.csv`, `validation_metrics.csv`, the best and last
//! checkpoints (safetensors, reference key names) and the training state `--resume` continues
//! from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::config::{LightModelKind, ModelConfig};
use crate::data::preprocess::Transform;
use crate::data::{cirr, data_root, fashioniq, Dataset, LoadOptions, SkipLog};
use crate::eval::driver::{self, EvalOptions};
use crate::model::{LossWeights, Slot4ACir};
use crate::text::Tokenizer;
use crate::train::checkpoint::write_atomic;
use crate::train::init::load_init_weights;
use crate::train::optim::{AdamWConfig, ScheduleKind};
use crate::train::task::{DatasetTask, ValidationSet};
use crate::train::trainer::{self, TrainerConfig, LAST_CHECKPOINT};
use crate::train::vit_cache::{CacheDType, VitCache};
use crate::weights::{load_state_dict, Mode, ParamStore};

/// The run's options, as `configs.json` stores them.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct Args {
    /// `cirr` or `fashioniq`.
    #[arg(long, default_value = "cirr")]
    pub dataset: String,
    /// The data root holding `CIRR/` and `FashionIQ/` (default: `$SLOT4ACIR_DATA_ROOT`).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Name of the run folder (a timestamp is appended).
    #[arg(long, default_value = "slot4acir")]
    pub exp_name: String,
    #[arg(long, default_value_t = 50)]
    pub num_epochs: usize,
    /// Triplets per optimizer step (the contrastive batch).
    #[arg(long, default_value_t = 96)]
    pub batch_size: usize,
    /// Gradient accumulation: encode the batch this many triplets at a time (exact for the
    /// contrastive losses; default: the whole batch at once).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Peak learning rate (default: 1e-5 for CIRR, 2e-5 for FashionIQ, the paper's).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// The light query backbone (overrides the model configuration's).
    #[arg(long)]
    pub light_model_name: Option<String>,
    /// Number of slots (overrides the model configuration's).
    #[arg(long)]
    pub num_slots: Option<usize>,
    /// Adaptive slots (overrides the model configuration's).
    #[arg(long)]
    pub use_adapt: bool,
    /// Losses: `itc`, or `itc` with `dta` (adds the DTA and RTC teacher losses), e.g. `itc_dta`.
    #[arg(long, default_value = "itc_dta")]
    pub loss_setting: String,
    /// Weight of the DTA loss in the total.
    #[arg(long, default_value_t = 0.4)]
    pub loss_dta: f64,
    /// Weight of the RTC loss in the total.
    #[arg(long, default_value_t = 0.4)]
    pub loss_rtc: f64,
    /// The reference's FashionIQ script: sum ITC, DTA and RTC unweighted, ignoring
    /// `--loss-dta`/`--loss-rtc` (for reproducing its FashionIQ numbers only).
    #[arg(long)]
    pub reference_fashioniq_loss: bool,
    /// Train on the LLM-augmented caption files.
    #[arg(long)]
    pub llm_sampler: bool,
    /// `targetpad` or `squarepad`.
    #[arg(long, default_value = "targetpad")]
    pub transform: String,
    /// TargetPad's ratio.
    #[arg(long, default_value_t = 1.25)]
    pub target_ratio: f64,
    /// Validate every this many epochs (0: never).
    #[arg(long, default_value_t = 1)]
    pub validation_frequency: usize,
    /// Write the last checkpoint and the training state after every epoch (needed by `--resume`).
    #[arg(long)]
    pub save_training: bool,
    /// Write the checkpoint of the best validation figure.
    #[arg(long)]
    pub save_best: bool,
    #[arg(long, default_value = "runs")]
    pub save_dir: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub num_workers: Option<usize>,
    /// Model configuration: a preset (`paper`), a JSON file or a fixture's meta.json.
    #[arg(long, default_value = "paper")]
    pub model_config: String,
    /// Initial weights, repeatable: a Slot4ACir or BLIP-2 checkpoint, a light backbone's own
    /// release, a BERT checkpoint for the Q-Former. The rest is randomly initialized.
    #[arg(long)]
    pub init_weights: Vec<PathBuf>,
    /// FashionIQ categories (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "dress,shirt,toptee")]
    pub categories: Vec<String>,
    /// Where the frozen ViT's outputs are kept, computed once per image and reused every epoch
    /// and by validation (default: `SAVE_DIR/vit-cache`; about 0.7 MB per image for ViT-g in
    /// float16).
    #[arg(long)]
    #[serde(default)]
    pub vit_cache: Option<PathBuf>,
    /// Run the ViT on every use instead of caching its outputs.
    #[arg(long)]
    #[serde(default)]
    pub no_vit_cache: bool,
    /// `f16` (half the disk, relative error ~5e-4) or `f32` (identical to running the ViT).
    #[arg(long, default_value = "f16")]
    #[serde(default = "default_cache_dtype")]
    pub vit_cache_dtype: String,
    /// Skip triplets whose image files are missing (counted and reported) instead of stopping.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Continue the run in this folder where it stopped (its own options are used).
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    #[serde(skip)]
    pub quiet: bool,
}

fn default_cache_dtype() -> String {
    "f16".into()
}

/// What `configs.json` holds.
#[derive(Serialize, Deserialize)]
struct RunConfig {
    args: Args,
    model: ModelConfig,
}

const CONFIGS: &str = "configs.json";

pub fn run(args: Args) -> Result<()> {
    if let Some(n) = args.num_workers {
        // Ignored when the pool already exists (a second run in one process).
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    let (args, cfg, run_dir, resume) = match &args.resume {
        Some(dir) => {
            let path = dir.join(CONFIGS);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {} to resume the run", path.display()))?;
            let rc: RunConfig = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a run configuration", path.display()))?;
            let mut a = rc.args;
            a.quiet = args.quiet;
            (a, rc.model, dir.clone(), true)
        }
        None => {
            let cfg = model_config(&args)?;
            let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string()
                .replace(':', "-");
            let dir = args.save_dir.join(&args.dataset).join(format!(
                "{}_{}",
                args.exp_name,
                stamp.trim_end_matches('Z')
            ));
            (args, cfg, dir, false)
        }
    };
    let summary = train_run(&args, &cfg, &run_dir, resume)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "run_dir": run_dir,
            "epochs_done": summary.state.epochs_done,
            "steps": summary.state.step,
            "best_metric": summary.state.best_metric,
            "best_epoch": summary.state.best_epoch,
            "last_epoch_losses": summary.last_epoch_losses.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "last_validation": summary.last_validation.map(|v| v.metrics.into_iter().collect::<std::collections::BTreeMap<_, _>>()),
            "triplets_per_second": summary.triplets_per_second,
        }))?
    );
    Ok(())
}

fn model_config(args: &Args) -> Result<ModelConfig> {
    let mut cfg = ModelConfig::load(&args.model_config)?;
    if let Some(name) = &args.light_model_name {
        LightModelKind::parse(name)?;
        cfg.light_model = name.clone();
    }
    if let Some(s) = args.num_slots {
        cfg.num_slots = s;
    }
    if args.use_adapt {
        cfg.use_adapt = true;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn loss_weights(args: &Args) -> Result<LossWeights> {
    let setting = args.loss_setting.to_lowercase();
    if !setting.contains("itc") {
        bail!("--loss-setting '{}' must contain itc", args.loss_setting);
    }
    if !setting.contains("dta") {
        return Ok(LossWeights::itc_only());
    }
    if args.reference_fashioniq_loss {
        if args.dataset != "fashioniq" {
            bail!("--reference-fashioniq-loss is the reference's FashionIQ behaviour only");
        }
        return Ok(LossWeights::fashioniq());
    }
    Ok(LossWeights {
        teacher: true,
        dta: args.loss_dta,
        rtc: args.loss_rtc,
    })
}

/// The training and validation datasets, checked before any model is built.
fn datasets(args: &Args, log: &SkipLog) -> Result<(Dataset, Option<ValidationSet>)> {
    let root = data_root(args.data_root.as_deref())?;
    let load = LoadOptions {
        llm_sampler: args.llm_sampler,
        skip_bad: args.skip_bad_images,
    };
    let validate = args.validation_frequency > 0;
    let (mut train, val) = match args.dataset.as_str() {
        "cirr" => {
            let train = cirr::load(&root, cirr::CirrSplit::Train, load, log)?;
            let val = if validate {
                let mut v = cirr::load(
                    &root,
                    cirr::CirrSplit::Val,
                    LoadOptions {
                        llm_sampler: false,
                        ..load
                    },
                    log,
                )?;
                v.require_in_gallery(log)?;
                Some(ValidationSet::Cirr(v))
            } else {
                None
            };
            (train, val)
        }
        "fashioniq" => {
            let cats: Vec<&str> = args.categories.iter().map(String::as_str).collect();
            let train = fashioniq::load(&root, &cats, fashioniq::FiqSplit::Train, load, log)?;
            let val = if validate {
                Some(ValidationSet::FashionIq(driver::fashioniq_val_datasets(
                    &root, &cats, log,
                )?))
            } else {
                None
            };
            (train, val)
        }
        other => bail!("unknown dataset '{other}' (known: cirr, fashioniq)"),
    };
    require_image_files(&mut train, log)?;
    Ok((train, val))
}

/// Every training triplet's image files exist (a stat each, no decoding): a missing one is an
/// error naming it and the triplet, or with skipping a counted skip of the triplet.
fn require_image_files(ds: &mut Dataset, log: &SkipLog) -> Result<()> {
    let mut keep = Vec::with_capacity(ds.triplets.len());
    for t in &ds.triplets {
        let ok = match ds.triplet_paths(t) {
            Ok((r, g)) => {
                let missing: Vec<&PathBuf> = std::iter::once(&r)
                    .chain(g.iter())
                    .filter(|p| !p.is_file())
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "{}: missing image file(s) {missing:?}",
                        ds.describe(t)
                    ))
                }
            }
            Err(e) => Err(e),
        };
        keep.push(ok.is_ok());
        if let Err(e) = ok {
            log.skip_or_fail(e)?;
        }
    }
    let mut keep = keep.into_iter();
    ds.triplets.retain(|_| keep.next().unwrap_or(false));
    Ok(())
}

/// Trains one run into `run_dir` (a new run, or with `resume` the continuation of one).
pub fn train_run(
    args: &Args,
    cfg: &ModelConfig,
    run_dir: &Path,
    resume: bool,
) -> Result<trainer::RunSummary> {
    let log = SkipLog::new(args.skip_bad_images);
    let weights = loss_weights(args)?;
    let transform = match args.transform.as_str() {
        "targetpad" => Transform::TargetPad(args.target_ratio),
        "squarepad" => Transform::SquarePad,
        other => bail!("unknown transform '{other}' (targetpad, squarepad)"),
    };
    let (train, validation) = datasets(args, &log)?;
    log.report("training data");
    tracing::info!("{}: {} training triplets", train.name, train.triplets.len());

    let device = Device::cuda_if_available(0)?;
    let (source, name) = if resume {
        let last = run_dir.join(LAST_CHECKPOINT);
        (load_state_dict(&last)?, last.display().to_string())
    } else {
        let names: Vec<String> = args
            .init_weights
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        (
            load_init_weights(&args.init_weights, cfg)?,
            names.join(", "),
        )
    };
    // A resumed run has every key; a new one initializes what its files lack.
    let store = ParamStore::new(source, name, Mode::Training, !resume).seeded(args.seed);
    let model = Slot4ACir::new(cfg, store.var_builder(&device));
    store.finish()?;
    let model = Arc::new(model.context("building the model")?);

    if !resume {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let rc = RunConfig {
            args: args.clone(),
            model: cfg.clone(),
        };
        write_atomic(
            &run_dir.join(CONFIGS),
            serde_json::to_string_pretty(&rc)?.as_bytes(),
        )?;
    }
    tracing::info!("run folder {}", run_dir.display());
    let vit_cache = if args.no_vit_cache {
        None
    } else {
        let root = args
            .vit_cache
            .clone()
            .unwrap_or_else(|| args.save_dir.join("vit-cache"));
        let dtype = CacheDType::parse(&args.vit_cache_dtype)?;
        let cache = VitCache::for_model(&root, &model, &store, dtype)?;
        tracing::info!(
            "frozen ViT outputs cached in {} ({} images so far)",
            cache.dir().display(),
            cache.len()
        );
        Some(Arc::new(cache))
    };
    let task = DatasetTask {
        model,
        store,
        train,
        validation,
        weights,
        transform,
        tokenizer: Tokenizer::bert_uncased()?,
        eval: EvalOptions {
            progress: !args.quiet,
            ..EvalOptions::default()
        },
        device,
        vit_cache,
    };
    let tcfg = TrainerConfig {
        run_dir: run_dir.to_path_buf(),
        num_epochs: args.num_epochs,
        batch_size: args.batch_size,
        micro_batch: args.micro_batch,
        learning_rate: args
            .learning_rate
            .unwrap_or(if args.dataset == "fashioniq" {
                2e-5
            } else {
                1e-5
            }),
        schedule: if args.dataset == "fashioniq" {
            ScheduleKind::FashionIq
        } else {
            ScheduleKind::Cirr
        },
        adamw: AdamWConfig::default(),
        validation_frequency: args.validation_frequency,
        save_training: args.save_training,
        save_best: args.save_best,
        seed: args.seed,
        stop_after_epochs: None,
        progress: !args.quiet,
    };
    trainer::train(&task, &tcfg, resume)
}
