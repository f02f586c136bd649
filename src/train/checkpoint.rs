//! Checkpoints: model weights as safetensors under the reference key names (the full
//! `ParamStore::state_dict()`, so the reference code can `load_state_dict` them), and a
//! training-state file (AdamW moments per parameter name, optimizer step, epoch, best metric,
//! seed) that `--resume` continues from exactly. Every write is atomic
//! (`weights::save_state_dict` for tensors, [`write_atomic`] for other files): a temporary file
//! in the same folder, fsync, rename, fsync of the folder — a crash mid-save leaves the
//! previous file intact.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::train::optim::AdamW;

/// Metadata key of the training-state JSON inside the state file.
const STATE_KEY: &str = "slot4acir_training_state";
const FORMAT_VERSION: u32 = 1;

/// Writes `bytes` to `path` atomically (temp file + fsync + rename + fsync of the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        // The rename itself must reach the disk; not every file system lets a folder be opened.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Saves a model state dict (reference key names) atomically, with `epoch` in the metadata.
pub fn save_weights(
    path: &Path,
    state_dict: &BTreeMap<String, Tensor>,
    epoch: usize,
) -> Result<()> {
    let meta = BTreeMap::from([("epoch".to_string(), epoch.to_string())]);
    crate::weights::save_state_dict(path, state_dict, &meta)
}

/// The epoch recorded in a checkpoint written by [`save_weights`].
pub fn checkpoint_epoch(path: &Path) -> Result<usize> {
    crate::weights::read_metadata(path)?
        .get("epoch")
        .and_then(|e| e.parse().ok())
        .with_context(|| format!("{} records no epoch", path.display()))
}

/// Where a run stands, for `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub format_version: u32,
    /// Epochs completed (0-based epoch `epochs_done` is the next to run).
    pub epochs_done: usize,
    /// Optimizer steps taken (the schedule position).
    pub step: u64,
    /// Seed of every random stream; each stream is re-derived from (seed, epoch, step), so
    /// this and the counters above are the whole random state.
    pub seed: u64,
    /// Best validation figure so far and its epoch.
    pub best_metric: Option<f64>,
    pub best_epoch: Option<usize>,
    /// Total schedule length, checked on resume.
    pub total_steps: usize,
}

impl TrainingState {
    pub fn new(seed: u64, total_steps: usize) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            epochs_done: 0,
            step: 0,
            seed,
            best_metric: None,
            best_epoch: None,
            total_steps,
        }
    }
}

/// Saves the training state and the optimizer moments (`m.<param>`, `v.<param>`) atomically.
pub fn save_training_state(path: &Path, state: &TrainingState, opt: &AdamW) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (name, m, v) in opt
        .state()
        .with_context(|| format!("collecting optimizer state for {}", path.display()))?
    {
        tensors.insert(format!("m.{name}"), m);
        tensors.insert(format!("v.{name}"), v);
    }
    let meta = BTreeMap::from([(STATE_KEY.to_string(), serde_json::to_string(state)?)]);
    crate::weights::save_state_dict(path, &tensors, &meta)
}

/// AdamW (first, second) moments by parameter name.
pub type SavedMoments = HashMap<String, (Tensor, Tensor)>;

/// Reads a training-state file: the state and the moments by parameter name.
pub fn load_training_state(path: &Path) -> Result<(TrainingState, SavedMoments)> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading training state {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .with_context(|| format!("{} holds no slot4acir training state", path.display()))?;
    let state: TrainingState = serde_json::from_str(json)
        .with_context(|| format!("training state in {} is malformed", path.display()))?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "{}: training-state format {} (this build reads {FORMAT_VERSION})",
            path.display(),
            state.format_version
        );
    }
    let mut tensors = crate::weights::load_state_dict(path)?;
    let names: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("m.").map(str::to_string))
        .collect();
    let mut moments = HashMap::new();
    for name in names {
        let m = tensors.remove(&format!("m.{name}")).expect("listed key");
        let v = tensors
            .remove(&format!("v.{name}"))
            .with_context(|| format!("{}: m.{name} has no matching v.{name}", path.display()))?;
        moments.insert(name, (m, v));
    }
    Ok((state, moments))
}

/// Fails with a clear message when a loss is NaN or infinite; the caller has not stepped the
/// optimizer, so the last checkpoint on disk is the last good one.
pub fn check_finite(
    value: f64,
    what: &str,
    epoch: usize,
    step: u64,
    last_good: &Path,
) -> Result<()> {
    if !value.is_finite() {
        bail!(
            "{what} is {value} at epoch {epoch}, step {step}: training stopped. The last good \
             checkpoint is {} (lower the learning rate or check the data, then --resume).",
            last_good.display()
        );
    }
    Ok(())
}
