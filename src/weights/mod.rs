//! Loading and saving weights under the reference key names.

pub mod fingerprint;
pub mod store;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

pub use fingerprint::fingerprint;
pub use store::{Mode, ParamStore, Role};

/// Loads a state dict from a `.safetensors` file.
// TODO(weights helper): `.pth` (zip and legacy pickle) with the reference and LAVIS wrappers.
pub fn load_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading weights file {}", path.display()))
}
