//! The training loop (SPEC section 3): epochs of shuffled batches, each batch as one exact
//! full-batch step (micro-batches through [`batch_grads`]), AdamW with the one-cycle
//! schedule stepped every batch, validation every few epochs, best and last checkpoints, CSV
//! logs, a progress bar, `--resume`.
//!
//! Every random choice (shuffling, caption sampling, dropout and Gumbel noise) comes from a
//! stream derived from (seed, epoch, batch), so a resumed run repeats exactly what the
//! uninterrupted run would have done.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use crate::train::checkpoint::{
    check_finite, checkpoint_epoch, load_training_state, save_training_state, save_weights,
    TrainingState,
};
use crate::train::gradcache::{batch_grads, BatchContrastive};
use crate::train::optim::{AdamW, AdamWConfig, OneCycle, ScheduleKind};
use crate::weights::ParamStore;

/// File names inside a run folder.
pub const BEST_CHECKPOINT: &str = "checkpoint_best.safetensors";
pub const LAST_CHECKPOINT: &str = "checkpoint_last.safetensors";
pub const TRAINING_STATE: &str = "training_state.safetensors";
pub const TRAIN_CSV: &str = "train_metrics.csv";
pub const VALIDATION_CSV: &str = "validation_metrics.csv";

/// What the loop needs from a dataset + model pair.
pub trait TrainTask: BatchContrastive {
    /// The parameters: trainable ones for the optimizer, all of them for checkpoints.
    fn store(&self) -> &ParamStore;
    /// Number of training triplets.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Loads triplets `indices` as one micro-batch; per-use random choices (which caption
    /// paraphrase) come from `rng`.
    fn chunk(&self, indices: &[usize], rng: &mut StdRng) -> Result<Self::Chunk>;
    /// Validation figures of the current weights.
    fn validate(&self) -> Result<Validation>;
}

/// Validation figures, in display order, and which one selects the best checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    pub metrics: Vec<(String, f64)>,
    pub primary: String,
}

impl Validation {
    pub fn primary_value(&self) -> Option<f64> {
        self.metrics
            .iter()
            .find(|(k, _)| *k == self.primary)
            .map(|(_, v)| *v)
    }
}

#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub run_dir: PathBuf,
    pub num_epochs: usize,
    pub batch_size: usize,
    /// Micro-batch size for gradient accumulation (`None`: the whole batch at once).
    pub micro_batch: Option<usize>,
    pub learning_rate: f64,
    pub schedule: ScheduleKind,
    pub adamw: AdamWConfig,
    /// Validate every this many epochs (0: never).
    pub validation_frequency: usize,
    /// Write the last checkpoint and the training state after every epoch.
    pub save_training: bool,
    /// Write the checkpoint of the best validation figure.
    pub save_best: bool,
    pub seed: u64,
    /// Stop (as if interrupted) once this many epochs are done in total.
    pub stop_after_epochs: Option<usize>,
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub state: TrainingState,
    /// Mean losses of the last epoch trained in this call, by name.
    pub last_epoch_losses: Vec<(String, f64)>,
    pub last_validation: Option<Validation>,
    /// Triplets per second over this call's training steps (validation excluded).
    pub triplets_per_second: f64,
    pub train_seconds: f64,
}

/// A stream seed from the run seed and counters (splitmix64 of a mix).
pub fn derive_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed
        .wrapping_add(a.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(b.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stream tags, so the streams of one (epoch, batch) differ.
const SHUFFLE: u64 = 1;
const DATA: u64 = 2;
const MODEL: u64 = 3;

/// Appends rows to a CSV file, writing the header when the file is new.
fn append_csv(path: &Path, header: &[String], row: &[String]) -> Result<()> {
    let new = !path.exists();
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut w = csv::Writer::from_writer(f);
    if new {
        w.write_record(header)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    w.write_record(row)
        .with_context(|| format!("writing {}", path.display()))?;
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn fmt_f(v: f64) -> String {
    format!("{v:.6}")
}

/// Trains `task` as `cfg` says. With `resume`, the model must already hold the weights of
/// the run folder's last checkpoint (the caller builds it from them); the optimizer state,
/// schedule position and counters come from the training-state file.
pub fn train<T: TrainTask>(task: &T, cfg: &TrainerConfig, resume: bool) -> Result<RunSummary> {
    let n = task.len();
    if cfg.batch_size < 2 {
        bail!(
            "the contrastive losses need a batch of at least 2 (got {})",
            cfg.batch_size
        );
    }
    if n < cfg.batch_size {
        bail!(
            "{n} training triplets: fewer than one batch of {}",
            cfg.batch_size
        );
    }
    std::fs::create_dir_all(&cfg.run_dir)
        .with_context(|| format!("creating run folder {}", cfg.run_dir.display()))?;
    // As the reference's loader, incomplete last batches are dropped.
    let steps_per_epoch = n / cfg.batch_size;
    let total_steps = steps_per_epoch * cfg.num_epochs;
    let sched = OneCycle::for_dataset(
        cfg.schedule,
        cfg.learning_rate,
        cfg.num_epochs,
        steps_per_epoch,
    );
    let vars = task.store().trainable_vars();
    if vars.is_empty() {
        bail!("the model has no trainable parameters (was it built in training mode?)");
    }
    let mut opt = AdamW::new(vars.clone(), cfg.adamw)?;
    let state_path = cfg.run_dir.join(TRAINING_STATE);
    let last_path = cfg.run_dir.join(LAST_CHECKPOINT);
    let mut state = if resume {
        let (st, moments) = load_training_state(&state_path)?;
        if st.total_steps != total_steps {
            bail!(
                "{}: the run was scheduled for {} steps, these options give {total_steps} \
                 (resume with the run's own epochs, batch size and data)",
                state_path.display(),
                st.total_steps
            );
        }
        let weights_epoch = checkpoint_epoch(&last_path)?;
        if Some(weights_epoch) != st.epochs_done.checked_sub(1) {
            bail!(
                "{} is from epoch {weights_epoch} but {} says {} epoch(s) were done: the run \
                 stopped while saving; start again from {}",
                last_path.display(),
                state_path.display(),
                st.epochs_done,
                last_path.display()
            );
        }
        opt.load_state(st.step, |name| moments.get(name).cloned())
            .with_context(|| format!("restoring the optimizer from {}", state_path.display()))?;
        st
    } else {
        TrainingState::new(cfg.seed, total_steps)
    };
    let micro = cfg
        .micro_batch
        .unwrap_or(cfg.batch_size)
        .clamp(1, cfg.batch_size);

    let mut summary = RunSummary {
        state: state.clone(),
        last_epoch_losses: vec![],
        last_validation: None,
        triplets_per_second: 0.0,
        train_seconds: 0.0,
    };
    let mut trained_triplets = 0usize;
    let log_tty = std::io::stderr().is_terminal();
    let log_every = (steps_per_epoch / 10).max(1);
    let end_epoch = cfg
        .stop_after_epochs
        .map_or(cfg.num_epochs, |s| s.min(cfg.num_epochs));
    for epoch in state.epochs_done..end_epoch {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut StdRng::seed_from_u64(derive_seed(
            state.seed,
            SHUFFLE,
            epoch as u64,
        )));
        let bar = progress_bar(cfg.progress, steps_per_epoch, epoch, cfg.num_epochs);
        let mut sums: Vec<(String, f64)> = Vec::new();
        let epoch_start = Instant::now();
        for b in 0..steps_per_epoch {
            let idx = &order[b * cfg.batch_size..(b + 1) * cfg.batch_size];
            let mut rng = StdRng::seed_from_u64(derive_seed(state.seed, DATA, state.step));
            let chunks = idx
                .chunks(micro)
                .map(|c| task.chunk(c, &mut rng))
                .collect::<Result<Vec<_>>>()?;
            let seeds: Vec<u64> = (0..chunks.len() as u64)
                .map(|k| derive_seed(state.seed, MODEL, state.step * 1024 + k))
                .collect();
            let (losses, grads) = batch_grads(task, &chunks, &seeds, &vars, task.store())
                .with_context(|| format!("epoch {epoch}, step {}", state.step))?;
            for (name, v) in &losses {
                check_finite(
                    *v,
                    &format!("the {name} loss"),
                    epoch,
                    state.step,
                    &last_path,
                )?;
            }
            let (lr, beta1) = sched.at(state.step as usize);
            opt.step(&grads, lr, beta1)?;
            state.step += 1;
            trained_triplets += idx.len();
            if sums.is_empty() {
                sums = losses.iter().map(|(k, _)| (k.to_string(), 0.0)).collect();
            }
            for ((_, s), (_, v)) in sums.iter_mut().zip(&losses) {
                *s += v;
            }
            let secs = epoch_start.elapsed().as_secs_f64();
            let running: Vec<String> = sums
                .iter()
                .map(|(k, s)| format!("{k} {:.4}", s / (b + 1) as f64))
                .collect();
            let message = format!(
                "{:.1} triplets/s | lr {lr:.2e} | {}",
                ((b + 1) * cfg.batch_size) as f64 / secs.max(1e-9),
                running.join(" ")
            );
            // Without a terminal the bar is not drawn: log a line every tenth of the epoch.
            if cfg.progress && !log_tty && (b + 1) % log_every == 0 {
                tracing::info!(
                    "epoch {}/{} step {}/{steps_per_epoch}: {message}",
                    epoch + 1,
                    cfg.num_epochs,
                    b + 1
                );
            }
            bar.set_message(message);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let secs = epoch_start.elapsed().as_secs_f64();
        summary.train_seconds += secs;
        state.epochs_done = epoch + 1;
        let means: Vec<(String, f64)> = sums
            .iter()
            .map(|(k, s)| (k.clone(), s / steps_per_epoch as f64))
            .collect();
        let tps = (steps_per_epoch * cfg.batch_size) as f64 / secs.max(1e-9);
        tracing::info!(
            "epoch {}/{}: {} | {tps:.1} triplets/s",
            epoch + 1,
            cfg.num_epochs,
            means
                .iter()
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut header: Vec<String> = vec!["epoch".into(), "step".into()];
        header.extend(means.iter().map(|(k, _)| format!("loss_{k}")));
        header.extend(["lr".into(), "triplets_per_s".into(), "seconds".into()]);
        let mut row = vec![epoch.to_string(), state.step.to_string()];
        row.extend(means.iter().map(|(_, v)| fmt_f(*v)));
        row.extend([
            format!("{:e}", sched.at(state.step.saturating_sub(1) as usize).0),
            format!("{tps:.3}"),
            format!("{secs:.3}"),
        ]);
        append_csv(&cfg.run_dir.join(TRAIN_CSV), &header, &row)?;
        summary.last_epoch_losses = means;

        if cfg.validation_frequency > 0 && (epoch + 1) % cfg.validation_frequency == 0 {
            let v = task
                .validate()
                .with_context(|| format!("validating after epoch {epoch}"))?;
            let mut header = vec!["epoch".to_string()];
            header.extend(v.metrics.iter().map(|(k, _)| k.clone()));
            let mut row = vec![epoch.to_string()];
            row.extend(v.metrics.iter().map(|(_, x)| fmt_f(*x)));
            append_csv(&cfg.run_dir.join(VALIDATION_CSV), &header, &row)?;
            let primary = v
                .primary_value()
                .with_context(|| format!("validation has no figure named {}", v.primary))?;
            tracing::info!(
                "validation after epoch {}: {} {primary:.3}",
                epoch + 1,
                v.primary
            );
            if state.best_metric.is_none_or(|b| primary > b) {
                state.best_metric = Some(primary);
                state.best_epoch = Some(epoch);
                if cfg.save_best {
                    save_weights(
                        &cfg.run_dir.join(BEST_CHECKPOINT),
                        &task.store().state_dict(),
                        epoch,
                    )?;
                }
            }
            summary.last_validation = Some(v);
        }
        if cfg.save_training {
            // Weights first, then the state: a crash between the two leaves weights one epoch
            // ahead of the state, which `--resume` detects from the epoch in the weights.
            save_weights(&last_path, &task.store().state_dict(), epoch)?;
            save_training_state(&state_path, &state, &opt)?;
        }
    }
    summary.triplets_per_second = trained_triplets as f64 / summary.train_seconds.max(1e-9);
    summary.state = state;
    Ok(summary)
}

fn progress_bar(enabled: bool, len: usize, epoch: usize, epochs: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "epoch {}/{epochs} {{bar:30}} step {{pos}}/{{len}} {{elapsed_precise}} {{msg}}",
            epoch + 1
        ))
        .expect("valid template"),
    );
    bar
}
