//! What the globals and persistent ids of a PyTorch pickle mean: storages, the
//! `torch._utils._rebuild_tensor_v2` family, parameters, `OrderedDict`. Everything else stays
//! an opaque object.

use std::rc::Rc;

use anyhow::{anyhow, bail, Result};

use super::pickle::{set_items, Opaque, Value};

/// The persistent id `('storage', storage_type, key, location, numel[, view_metadata])`.
#[derive(Debug)]
pub struct StorageRef {
    /// The storage class name: `FloatStorage`, `HalfStorage`, …, or `UntypedStorage`.
    pub class: String,
    pub key: String,
    /// Elements (bytes for `UntypedStorage`).
    pub numel: u64,
    /// Legacy storage views: this view's offset (elements) in the storage `key`.
    pub view_offset: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it (sizes and offsets in elements).
#[derive(Debug)]
pub struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
    /// The explicit dtype name of `_rebuild_tensor_v3` (`float16`, …); else the storage's.
    pub dtype: Option<String>,
}

fn tuple_items(args: &Value, what: &str) -> Result<Rc<[Value]>> {
    match args {
        Value::Tuple(t) => Ok(t.clone()),
        v => bail!("{what}: arguments are {}, not a tuple", v.kind()),
    }
}

fn arg<'v>(args: &'v [Value], i: usize, what: &str) -> Result<&'v Value> {
    args.get(i)
        .ok_or_else(|| anyhow!("{what}: {} arguments, expected more than {i}", args.len()))
}

/// `REDUCE`: evaluates the globals that build dicts and tensors; anything else stays opaque.
pub(super) fn call(callable: Value, args: Value) -> Result<Value> {
    let Value::Global(g) = &callable else {
        return Ok(Value::Object(Rc::new(Opaque { callable, args })));
    };
    let what = format!("{}.{}", g.0, g.1);
    match (g.0.as_str(), g.1.as_str()) {
        ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict") => {
            let args = tuple_items(&args, &what)?;
            let dict = Value::Dict(Rc::default());
            if let Some(Value::List(pairs)) = args.first() {
                for pair in pairs.borrow().iter() {
                    let kv = tuple_items(pair, &what)?;
                    set_items(&dict, kv.to_vec(), 0)?;
                }
            }
            Ok(dict)
        }
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => {
            rebuild_tensor(&tuple_items(&args, &what)?, None, &what)
        }
        ("torch._utils", "_rebuild_tensor_v3") => {
            let a = tuple_items(&args, &what)?;
            let dtype = match arg(&a, 6, &what)? {
                Value::Global(d) if d.0 == "torch" => d.1.clone(),
                v => bail!("{what}: dtype is {}", v.kind()),
            };
            rebuild_tensor(&a, Some(dtype), &what)
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Ok(arg(&tuple_items(&args, &what)?, 0, &what)?.clone())
        }
        ("torch._tensor", "_rebuild_from_type_v2") => {
            let a = tuple_items(&args, &what)?;
            call(arg(&a, 0, &what)?.clone(), arg(&a, 2, &what)?.clone())
        }
        ("torch", "Size") => Ok(arg(&tuple_items(&args, &what)?, 0, &what)?.clone()),
        // How protocol 2 pickles `bytes`: `_codecs.encode(text, "latin1")`.
        ("_codecs", "encode") => {
            let a = tuple_items(&args, &what)?;
            let text = arg(&a, 0, &what)?.as_str(&what)?;
            let bytes: Option<Vec<u8>> = text.chars().map(|c| u8::try_from(c).ok()).collect();
            let bytes = bytes.ok_or_else(|| anyhow!("{what}: text is not latin-1"))?;
            Ok(Value::Bytes(bytes.into()))
        }
        _ => Ok(Value::Object(Rc::new(Opaque { callable, args }))),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, …)`.
fn rebuild_tensor(a: &[Value], dtype: Option<String>, what: &str) -> Result<Value> {
    let storage = match arg(a, 0, what)? {
        Value::Storage(s) => s.clone(),
        v => bail!("{what}: storage argument is {}", v.kind()),
    };
    let offset = arg(a, 1, what)?.as_uint("storage offset")?;
    let size = arg(a, 2, what)?.as_uint_tuple("size")?;
    let stride = arg(a, 3, what)?.as_uint_tuple("stride")?;
    if size.len() != stride.len() {
        bail!("{what}: size {size:?} and stride {stride:?} differ in rank");
    }
    Ok(Value::Tensor(Rc::new(TensorRef {
        storage,
        offset,
        size,
        stride,
        dtype,
    })))
}

/// `('storage', storage_type, key, location, numel[, view_metadata])`.
pub(super) fn persistent_load(pid: &Value) -> Result<StorageRef> {
    let t = tuple_items(pid, "persistent id")?;
    match t.first() {
        Some(Value::Str(s)) if &**s == "storage" => {}
        _ => bail!("unsupported persistent id (not a storage)"),
    }
    let class = match arg(&t, 1, "storage")? {
        Value::Global(g) => g.1.clone(),
        v => bail!("storage type is {}", v.kind()),
    };
    let key = arg(&t, 2, "storage")?.as_str("storage key")?.to_string();
    let numel = arg(&t, 4, "storage")?.as_uint("storage size")?;
    // view_metadata = (view_key, offset, view_size), the view of the root storage `key`.
    let view_offset = match t.get(5) {
        None | Some(Value::None) => 0,
        Some(view) => {
            arg(&tuple_items(view, "storage view")?, 1, "storage view")?.as_uint("view offset")?
        }
    };
    Ok(StorageRef {
        class,
        key,
        numel,
        view_offset,
    })
}
