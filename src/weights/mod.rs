//! Loading and saving weights under the reference key names.
//!
//! [`load_state_dict`] reads safetensors and PyTorch checkpoints (zip and legacy), recognised
//! by content rather than extension, into float32 tensors; [`save_state_dict`] writes
//! safetensors atomically.

pub mod fingerprint;
pub mod pickle;
mod pth;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

pub use fingerprint::fingerprint;
pub use store::{Mode, ParamStore, Role};

/// The prefix `torch.nn.DataParallel` adds to every key.
const DATA_PARALLEL_PREFIX: &str = "module.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Safetensors,
    /// A `torch.save` zip archive (torch ≥ 1.6).
    Zip,
    /// A pickle stream: the legacy `torch.save` layout.
    Pickle,
}

fn detect(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return Some(Format::Zip);
    }
    if bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]) {
        return Some(Format::Pickle);
    }
    // safetensors: an 8-byte little-endian header length, then a JSON object.
    let header_len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    if bytes.get(8) == Some(&b'{') && header_len <= bytes.len() as u64 - 8 {
        return Some(Format::Safetensors);
    }
    None
}

/// Loads a state dict: `.safetensors`, or a PyTorch `.pth`/`.pt`/`.bin` in the zip or the
/// legacy format, whatever the file is named. PyTorch checkpoints may wrap the state dict as
/// the reference does (`{"epoch", "Blip2LightCir"}`), as LAVIS does (`{"model", …}`), or under
/// `state_dict`. Every tensor becomes float32 on the CPU (integer buffers such as
/// `num_batches_tracked` too); a `module.` prefix (DataParallel) is removed. Errors name the
/// file and, where known, the tensor.
pub fn load_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    let name = path.display().to_string();
    let fail = |e: anyhow::Error| anyhow!("weights file {name}: {e:#}");
    let file = File::open(path).map_err(|e| fail(e.into()))?;
    if file.metadata().map_err(|e| fail(e.into()))?.len() == 0 {
        return Err(fail(anyhow!("empty file")));
    }
    // SAFETY: the mapping is read-only and dropped before returning; like every loader that
    // maps weights, it assumes the file is not truncated by another process meanwhile.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| fail(e.into()))?;
    load_state_dict_bytes(&mmap, &name)
}

/// [`load_state_dict`] of a file's content already in memory; `name` stands for the file in
/// error messages.
pub fn load_state_dict_bytes(bytes: &[u8], name: &str) -> Result<HashMap<String, Tensor>> {
    let fail = |e: anyhow::Error| anyhow!("weights file {name}: {e:#}");
    let entries = match detect(bytes) {
        Some(Format::Safetensors) => load_safetensors(bytes),
        Some(Format::Zip) => pth::load_zip(bytes),
        Some(Format::Pickle) => pth::load_legacy(bytes),
        None => Err(anyhow!(
            "unrecognised format: not safetensors, a PyTorch zip archive or a pickle"
        )),
    }
    .map_err(fail)?;
    let mut out = HashMap::with_capacity(entries.len());
    for (key, tensor) in entries {
        let key = match key.strip_prefix(DATA_PARALLEL_PREFIX) {
            Some(stripped) => stripped.to_string(),
            None => key,
        };
        let tensor = tensor
            .to_dtype(DType::F32)
            .map_err(|e| fail(anyhow!("tensor {key}: {e}")))?;
        if out.insert(key.clone(), tensor).is_some() {
            return Err(fail(anyhow!(
                "key {key} appears twice (with and without `module.`)"
            )));
        }
    }
    Ok(out)
}

fn load_safetensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    use candle_core::safetensors::Load;
    let st = safetensors::SafeTensors::deserialize(bytes).context("reading safetensors")?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = view
                .load(&Device::Cpu)
                .with_context(|| format!("tensor {name}"))?;
            Ok((name, t))
        })
        .collect()
}

/// The `__metadata__` of a safetensors file (empty when it has none).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let fail = |e: anyhow::Error| anyhow!("weights file {}: {e:#}", path.display());
    let file = File::open(path).map_err(|e| fail(e.into()))?;
    // SAFETY: as in `load_state_dict`.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| fail(e.into()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| fail(anyhow!("reading safetensors header: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Saves tensors (any dtype, any device) as safetensors with `metadata` in the header,
/// atomically: written to a temporary file in the same folder, synced, then renamed over
/// `path`, so that an interrupted save never leaves a partial file under `path`.
pub fn save_state_dict(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let fail = |e: anyhow::Error| anyhow!("saving weights file {}: {e:#}", path.display());
    let cpu: Vec<(&String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| fail(e.into()))?;
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let meta = (!meta.is_empty()).then_some(meta);
    let tmp = temp_path(path).map_err(fail)?;
    let written = safetensors::serialize_to_file(cpu, meta, &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(File::open(&tmp)?.sync_all()?))
        .and_then(|()| Ok(std::fs::rename(&tmp, path)?));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e));
    }
    // Make the rename itself durable (best effort: not every platform syncs folders).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// `dir/.name.tmp.<pid>.<n>` beside `path`, so that the final rename stays on one filesystem.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("not a file path"))?
        .to_string_lossy();
    let dir = path.parent().unwrap_or(Path::new(""));
    for n in 0..1000 {
        let tmp = dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()));
        match File::options().write(true).create_new(true).open(&tmp) {
            Ok(_) => return Ok(tmp),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).context("creating a temporary file"),
        }
    }
    bail!("could not create a temporary file beside it")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats_by_content() {
        assert_eq!(detect(b"PK\x03\x04rest"), Some(Format::Zip));
        assert_eq!(detect(b"\x80\x02\x8a\x0a"), Some(Format::Pickle));
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend(b"{}");
        assert_eq!(detect(&st), Some(Format::Safetensors));
        // A header length beyond the file is not safetensors.
        let mut bad = 100u64.to_le_bytes().to_vec();
        bad.extend(b"{}");
        assert_eq!(detect(&bad), None);
        assert_eq!(detect(b"hello"), None);
    }
}
