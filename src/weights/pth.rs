//! PyTorch checkpoints: the zip archive of `torch.save` (torch ≥ 1.6) and the legacy stream
//! before it. Both pickle a (possibly wrapped) state dict whose tensors name raw storages by
//! persistent id; they differ in where those storages live.
//!
//! Errors here name the tensor or storage; the caller adds the file path.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};

use super::pickle::{self, StorageRef, TensorRef, Value};

/// Keys under which checkpoints nest the state dict: the reference's
/// `{"epoch": e, "Blip2LightCir": sd}`, LAVIS's `{"model": sd, …}`, and the common
/// `state_dict` and `model_state_dict` (PyTorch's tutorials).
const WRAPPER_KEYS: &[&str] = &["Blip2LightCir", "model", "state_dict", "model_state_dict"];

/// `torch.serialization.MAGIC_NUMBER` = 0x1950a86a20f9469cfc6c, little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL_VERSION: i64 = 1001;

/// A zip archive: `<name>/data.pkl`, the storages in `<name>/data/<key>`, and an optional
/// `<name>/byteorder`.
pub fn load_zip(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).context("reading the zip archive")?;
    let pkls: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(|n| n.into_owned())
        .collect();
    let [pkl] = pkls.as_slice() else {
        bail!(
            "expected one data.pkl in the archive, found {} ({pkls:?})",
            pkls.len()
        );
    };
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
    let little_endian = match zip_entry(&mut zip, bytes, &format!("{prefix}byteorder")) {
        Ok(order) => match order.as_ref() {
            b"little" => true,
            b"big" => false,
            other => bail!("byteorder entry is {:?}", String::from_utf8_lossy(other)),
        },
        Err(_) => true,
    };
    let data = zip_entry(&mut zip, bytes, pkl)?;
    let (top, _) = pickle::load(&data, &mut 0).with_context(|| format!("unpickling {pkl}"))?;
    build_tensors(&top, little_endian, |key| {
        zip_entry(&mut zip, bytes, &format!("{prefix}data/{key}"))
    })
}

/// An archive entry: a slice of the file when stored uncompressed (as torch writes them).
fn zip_entry<'a>(
    zip: &mut zip::ZipArchive<Cursor<&'a [u8]>>,
    bytes: &'a [u8],
    name: &str,
) -> Result<Cow<'a, [u8]>> {
    let mut f = zip
        .by_name(name)
        .with_context(|| format!("archive entry {name}"))?;
    if f.compression() == zip::CompressionMethod::Stored && !f.encrypted() {
        if let Some(start) = f.data_start() {
            let end = start.saturating_add(f.size());
            return usize::try_from(end)
                .ok()
                .and_then(|end| bytes.get(start as usize..end))
                .map(Cow::Borrowed)
                .ok_or_else(|| anyhow!("archive entry {name} runs past the end of the file"));
        }
    }
    let mut out = Vec::with_capacity(f.size().min(1 << 26) as usize);
    f.read_to_end(&mut out)
        .with_context(|| format!("reading archive entry {name}"))?;
    Ok(Cow::Owned(out))
}

/// The legacy stream: pickles of the magic number, the protocol version, the system info, the
/// object, and the sorted storage keys; then each storage as an 8-byte element count followed
/// by its raw bytes, in that key order.
pub fn load_legacy(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let mut pos = 0;
    let (magic, _) = pickle::load(bytes, &mut pos).context("reading the magic number")?;
    if !matches!(&magic, Value::BigInt(b) if **b == LEGACY_MAGIC) {
        bail!("not a PyTorch checkpoint: a pickle without torch's magic number");
    }
    let (version, _) = pickle::load(bytes, &mut pos).context("reading the protocol version")?;
    if !matches!(version, Value::Int(LEGACY_PROTOCOL_VERSION)) {
        bail!(
            "unsupported legacy protocol version {} (expected {LEGACY_PROTOCOL_VERSION})",
            version.kind()
        );
    }
    let (sys_info, _) = pickle::load(bytes, &mut pos).context("reading the system info")?;
    let little_endian = !matches!(
        dict_get(&sys_info, "little_endian"),
        Some(Value::Bool(false))
    );
    let (top, storages) = pickle::load(bytes, &mut pos).context("unpickling the checkpoint")?;
    let (keys, _) = pickle::load(bytes, &mut pos).context("reading the storage keys")?;
    let Value::List(keys) = keys else {
        bail!("storage key list is a {}", keys.kind());
    };

    let elem_size: HashMap<&str, usize> = storages
        .iter()
        .map(|s| {
            let elem = storage_elem(s, None).with_context(|| format!("storage {}", s.key))?;
            Ok((s.key.as_str(), elem.size()))
        })
        .collect::<Result<_>>()?;
    let mut raw: HashMap<String, &[u8]> = HashMap::new();
    for key in keys.borrow().iter() {
        let Value::Str(key) = key else {
            bail!("storage key is a {}", key.kind());
        };
        let size = *elem_size
            .get(&**key)
            .ok_or_else(|| anyhow!("storage {key} is listed but no tensor uses it"))?;
        let header: [u8; 8] = bytes
            .get(pos..pos + 8)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| anyhow!("file truncated in the header of storage {key}"))?;
        let numel = if little_endian {
            u64::from_le_bytes(header)
        } else {
            u64::from_be_bytes(header)
        };
        pos += 8;
        let end = numel
            .checked_mul(size as u64)
            .and_then(|n| n.checked_add(pos as u64))
            .filter(|&end| end <= bytes.len() as u64)
            .ok_or_else(|| {
                anyhow!(
                    "file truncated in storage {key}: {numel} elements of {size} bytes \
                     at byte {pos}, file has {}",
                    bytes.len()
                )
            })? as usize;
        raw.insert(key.to_string(), &bytes[pos..end]);
        pos = end;
    }
    build_tensors(&top, little_endian, |key| {
        raw.get(key)
            .map(|b| Cow::Borrowed(*b))
            .ok_or_else(|| anyhow!("storage {key} is not in the file"))
    })
}

/// Finds the state dict in `top` and reads each tensor from its storage bytes.
fn build_tensors<'a>(
    top: &Value,
    little_endian: bool,
    mut storage: impl FnMut(&str) -> Result<Cow<'a, [u8]>>,
) -> Result<Vec<(String, Tensor)>> {
    let entries = state_dict_entries(top)?;
    let mut out = Vec::with_capacity(entries.len());
    for (name, t) in entries {
        let tensor = storage(&t.storage.key)
            .and_then(|bytes| materialize(&t, &bytes, little_endian))
            .with_context(|| format!("tensor {name}"))?;
        out.push((name, tensor));
    }
    Ok(out)
}

fn dict_get(dict: &Value, key: &str) -> Option<Value> {
    let Value::Dict(d) = dict else { return None };
    let d = d.borrow();
    d.iter()
        .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
        .map(|(_, v)| v.clone())
}

/// Unwraps the known checkpoint wrappers and lists the tensors of the state dict. Entries that
/// are not tensors (counters, configs) are skipped.
fn state_dict_entries(top: &Value) -> Result<Vec<(String, Rc<TensorRef>)>> {
    let mut sd = top.clone();
    // Bounded: a dict may (pathologically) contain itself.
    for _ in 0..8 {
        let inner = WRAPPER_KEYS
            .iter()
            .find_map(|k| dict_get(&sd, k).filter(|v| matches!(v, Value::Dict(_))));
        match inner {
            Some(inner) => sd = inner,
            None => break,
        }
    }
    let Value::Dict(d) = &sd else {
        bail!("the checkpoint holds a {}, not a state dict", sd.kind());
    };
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for (k, v) in d.borrow().iter() {
        let Value::Str(name) = k else {
            bail!("state dict key is a {}, not a str", k.kind());
        };
        match v {
            Value::Tensor(t) => out.push((name.to_string(), t.clone())),
            other => skipped.push(format!("{name} ({})", other.kind())),
        }
    }
    if out.is_empty() {
        let keys: Vec<String> = d.borrow().iter().map(|(k, _)| k.kind()).collect();
        bail!(
            "no tensors found in the checkpoint (keys: {})",
            keys.join(", ")
        );
    }
    if !skipped.is_empty() {
        tracing::debug!("skipped non-tensor entries: {}", skipped.join(", "));
    }
    Ok(out)
}

/// Element types of torch storages, all read as f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::F64 | Elem::I64 => 8,
            Elem::F32 | Elem::I32 => 4,
            Elem::F16 | Elem::BF16 | Elem::I16 => 2,
            Elem::I8 | Elem::U8 | Elem::Bool => 1,
        }
    }

    /// `torch.FloatStorage` → F32; `UntypedStorage` holds bytes.
    fn from_storage_class(class: &str) -> Option<Elem> {
        Some(match class {
            "DoubleStorage" => Elem::F64,
            "FloatStorage" => Elem::F32,
            "HalfStorage" => Elem::F16,
            "BFloat16Storage" => Elem::BF16,
            "LongStorage" => Elem::I64,
            "IntStorage" => Elem::I32,
            "ShortStorage" => Elem::I16,
            "CharStorage" => Elem::I8,
            "ByteStorage" | "UntypedStorage" => Elem::U8,
            "BoolStorage" => Elem::Bool,
            _ => return None,
        })
    }

    /// `torch.float16` and its aliases, as `_rebuild_tensor_v3` names dtypes.
    fn from_dtype_name(name: &str) -> Option<Elem> {
        Some(match name {
            "float64" | "double" => Elem::F64,
            "float32" | "float" => Elem::F32,
            "float16" | "half" => Elem::F16,
            "bfloat16" => Elem::BF16,
            "int64" | "long" => Elem::I64,
            "int32" | "int" => Elem::I32,
            "int16" | "short" => Elem::I16,
            "int8" => Elem::I8,
            "uint8" => Elem::U8,
            "bool" => Elem::Bool,
            _ => return None,
        })
    }

    /// Appends `bytes` (whole elements) to `out` as f32.
    fn decode(self, bytes: &[u8], little: bool, out: &mut Vec<f32>) {
        macro_rules! each {
            ($n:literal, $conv:expr) => {
                out.extend(bytes.chunks_exact($n).map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    if !little {
                        a.reverse();
                    }
                    $conv(a)
                }))
            };
        }
        match self {
            Elem::F64 => each!(8, |a| f64::from_le_bytes(a) as f32),
            Elem::F32 => each!(4, f32::from_le_bytes),
            Elem::F16 => each!(2, |a| half::f16::from_le_bytes(a).to_f32()),
            Elem::BF16 => each!(2, |a| half::bf16::from_le_bytes(a).to_f32()),
            Elem::I64 => each!(8, |a| i64::from_le_bytes(a) as f32),
            Elem::I32 => each!(4, |a| i32::from_le_bytes(a) as f32),
            Elem::I16 => each!(2, |a| i16::from_le_bytes(a) as f32),
            Elem::I8 => out.extend(bytes.iter().map(|&b| b as i8 as f32)),
            Elem::U8 | Elem::Bool => out.extend(bytes.iter().map(|&b| b as f32)),
        }
    }
}

/// The element type of a tensor: `_rebuild_tensor_v3`'s explicit dtype, else its storage's.
fn storage_elem(s: &StorageRef, dtype: Option<&str>) -> Result<Elem> {
    match dtype {
        Some(d) => Elem::from_dtype_name(d).ok_or_else(|| anyhow!("unsupported dtype torch.{d}")),
        None => Elem::from_storage_class(&s.class)
            .ok_or_else(|| anyhow!("unsupported storage type {}", s.class)),
    }
}

fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| anyhow!("{what} {v} too large"))
}

/// Reads a tensor (any strides, shared storages) from its storage bytes, as f32.
fn materialize(t: &TensorRef, bytes: &[u8], little: bool) -> Result<Tensor> {
    let elem = storage_elem(&t.storage, t.dtype.as_deref())?;
    let esize = elem.size();
    // The storage's length in elements: as declared (bytes for untyped storages), and present.
    let declared = if t.storage.class == "UntypedStorage" {
        t.storage.numel / esize as u64
    } else {
        t.storage.numel
    };
    let present = (bytes.len() / esize) as u64;
    if present < declared {
        bail!(
            "storage {} holds {present} elements, its record declares {declared}",
            t.storage.key
        );
    }
    let size: Vec<usize> = t
        .size
        .iter()
        .map(|&s| to_usize(s, "size"))
        .collect::<Result<_>>()?;
    let stride: Vec<usize> = t
        .stride
        .iter()
        .map(|&s| to_usize(s, "stride"))
        .collect::<Result<_>>()?;
    let numel = size
        .iter()
        .try_fold(1usize, |n, &s| n.checked_mul(s))
        .ok_or_else(|| anyhow!("size {size:?} overflows"))?;
    let offset = t
        .offset
        .checked_add(t.storage.view_offset)
        .ok_or_else(|| anyhow!("storage offset overflows"))?;
    let mut data = Vec::new();
    if numel > 0 {
        // The last element the view reaches must lie inside the storage.
        let last = size
            .iter()
            .zip(&stride)
            .try_fold(offset, |acc, (&n, &s)| {
                acc.checked_add((n as u64 - 1).checked_mul(s as u64)?)
            })
            .filter(|&last| last < declared)
            .ok_or_else(|| {
                anyhow!(
                    "storage offset {offset} with size {size:?} and stride {stride:?} \
                     is out of range of storage {} ({declared} elements)",
                    t.storage.key
                )
            })?;
        let span = &bytes[offset as usize * esize..(last as usize + 1) * esize];
        data.reserve_exact(numel);
        if is_contiguous(&size, &stride) {
            elem.decode(span, little, &mut data);
        } else {
            let mut flat = Vec::with_capacity(span.len() / esize);
            elem.decode(span, little, &mut flat);
            gather(&flat, &size, &stride, &mut data);
        }
    }
    Ok(Tensor::from_vec(data, size, &Device::Cpu)?)
}

/// Row-major contiguous (dimensions of size 1 may have any stride).
fn is_contiguous(size: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&n, &s) in size.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected *= n;
    }
    true
}

/// Copies the strided view of `src` (starting at 0) into `out` in row-major order. The caller
/// has checked that every index lies inside `src`.
fn gather(src: &[f32], size: &[usize], stride: &[usize], out: &mut Vec<f32>) {
    let numel: usize = size.iter().product();
    let mut idx = vec![0usize; size.len()];
    let mut pos = 0usize;
    for _ in 0..numel {
        out.push(src[pos]);
        for d in (0..size.len()).rev() {
            idx[d] += 1;
            pos += stride[d];
            if idx[d] < size[d] {
                break;
            }
            pos -= stride[d] * size[d];
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_transposed_and_broadcast_views() {
        // A 2×3 row-major storage 0..6 seen transposed (3×2, strides (1, 3)).
        let src: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let mut out = Vec::new();
        gather(&src, &[3, 2], &[1, 3], &mut out);
        assert_eq!(out, vec![0., 3., 1., 4., 2., 5.]);
        // An expanded row (stride 0).
        out.clear();
        gather(&src, &[2, 3], &[0, 1], &mut out);
        assert_eq!(out, vec![0., 1., 2., 0., 1., 2.]);
        assert!(is_contiguous(&[2, 1, 3], &[3, 7, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
    }

    #[test]
    fn decodes_every_element_type_in_both_byte_orders() {
        let mut out = Vec::new();
        Elem::F16.decode(&half::f16::from_f32(1.5).to_le_bytes(), true, &mut out);
        Elem::BF16.decode(&half::bf16::from_f32(-2.0).to_be_bytes(), false, &mut out);
        Elem::F64.decode(&0.25f64.to_be_bytes(), false, &mut out);
        Elem::I64.decode(&(-7i64).to_le_bytes(), true, &mut out);
        Elem::I8.decode(&[0xff], true, &mut out);
        Elem::Bool.decode(&[1], true, &mut out);
        assert_eq!(out, vec![1.5, -2.0, 0.25, -7.0, -1.0, 1.0]);
    }
}
