//! A small pickle machine: the opcodes of protocols 2–5 that PyTorch checkpoints use.
//!
//! It evaluates the few globals that rebuild tensors (`torch._utils._rebuild_tensor_v2` and
//! friends) and `OrderedDict`, and keeps every other object opaque. Unlike
//! `candle_core::pickle` it never panics on malformed input (every read is bounds-checked and
//! every length is checked against the bytes left), parses the 10-byte `LONG1` magic number of
//! legacy checkpoints, handles `DICT`, `MEMOIZE`, `FRAME` and `SHORT_BINUNICODE`, and shares
//! memoized containers as Python does (a dict fetched from the memo is the same dict).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{anyhow, bail, Result};

/// A pickled value.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond `i64`, as little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Value]>),
    List(Rc<RefCell<Vec<Value>>>),
    /// Key/value pairs in insertion order (also `OrderedDict`).
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A `GLOBAL`: (module, name).
    Global(Rc<(String, String)>),
    /// A storage named by a persistent id.
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// Anything else the machine does not model: `callable(*args)`.
    Object(Rc<Opaque>),
}

#[derive(Debug)]
pub struct Opaque {
    pub callable: Value,
    pub args: Value,
}

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

impl Value {
    /// A short description for error messages (never the whole, possibly huge, value).
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(s) => format!("str {:?}", truncated(s)),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(t) => format!("tuple of {}", t.len()),
            Value::List(l) => format!("list of {}", l.borrow().len()),
            Value::Dict(d) => format!("dict of {}", d.borrow().len()),
            Value::Global(g) => format!("global {}.{}", g.0, g.1),
            Value::Storage(_) => "storage".into(),
            Value::Tensor(_) => "tensor".into(),
            Value::Object(o) => match &o.callable {
                Value::Global(g) => format!("{}.{} object", g.0, g.1),
                _ => "object".into(),
            },
        }
    }

    fn as_int(&self, what: &str) -> Result<i64> {
        match self {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(*b as i64),
            v => bail!("{what}: expected an int, found {}", v.kind()),
        }
    }

    fn as_uint(&self, what: &str) -> Result<u64> {
        let i = self.as_int(what)?;
        u64::try_from(i).map_err(|_| anyhow!("{what}: negative value {i}"))
    }

    fn as_str(&self, what: &str) -> Result<Rc<str>> {
        match self {
            Value::Str(s) => Ok(s.clone()),
            v => bail!("{what}: expected a str, found {}", v.kind()),
        }
    }

    fn as_uint_tuple(&self, what: &str) -> Result<Vec<u64>> {
        match self {
            Value::Tuple(t) => t.iter().map(|v| v.as_uint(what)).collect(),
            Value::List(l) => l.borrow().iter().map(|v| v.as_uint(what)).collect(),
            v => bail!("{what}: expected a tuple, found {}", v.kind()),
        }
    }
}

fn truncated(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Reads one pickle from `data[*pos..]` up to its `STOP`, advancing `pos` past it. Also
/// returns every storage its persistent ids named, in order (a legacy checkpoint needs the
/// element size of each to find the raw storages, even of tensors outside the state dict).
pub fn load(data: &[u8], pos: &mut usize) -> Result<(Value, Vec<Rc<StorageRef>>)> {
    let mut m = Machine {
        data,
        pos: *pos,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: Vec::new(),
    };
    let value = m.run()?;
    *pos = m.pos;
    Ok((value, m.storages))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each open `MARK`.
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    storages: Vec<Rc<StorageRef>>,
}

impl Machine<'_> {
    fn take(&mut self, n: u64) -> Result<&[u8]> {
        let left = self.data.len() - self.pos;
        if n > left as u64 {
            bail!(
                "pickle truncated at byte {}: needs {n} more bytes, {left} left",
                self.pos
            );
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.data[start..self.pos])
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("pickle truncated at byte {}: unterminated line", self.pos))?;
        let line = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(line)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            bail!("malformed pickle at byte {}: stack underflow", self.pos);
        }
        Ok(self.stack.pop().expect("stack above floor"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            bail!("malformed pickle at byte {}: stack underflow", self.pos);
        }
        Ok(self.stack.last_mut().expect("stack above floor"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| anyhow!("malformed pickle at byte {}: no MARK", self.pos))?;
        Ok(self.stack.split_off(mark))
    }

    fn memo_get(&self, key: u64) -> Result<Value> {
        self.memo
            .get(&key)
            .cloned()
            .ok_or_else(|| anyhow!("malformed pickle at byte {}: memo {key} unset", self.pos))
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        bail!("unsupported pickle protocol {proto} at byte {at}");
                    }
                }
                0x95 => {
                    self.le::<8>()?; // FRAME: a length hint only.
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64))
                }
                0x8a => {
                    let n = self.u8()? as u64;
                    let v = long(self.take(n)?);
                    self.push(v)
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.le()?);
                    let n = u64::try_from(n).map_err(|_| anyhow!("negative LONG4 at {at}"))?;
                    let v = long(self.take(n)?);
                    self.push(v)
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v))
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    self.string(n, at)?
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    self.string(n, at)?
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.le()?);
                    self.string(n, at)?
                }
                // Python 2 byte strings: keys of old checkpoints, read as text.
                b'T' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.push(Value::Str(s.into()))
                }
                b'U' => {
                    let n = self.u8()? as u64;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.push(Value::Str(s.into()))
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let b: Rc<[u8]> = self.take(n)?.into();
                    self.push(Value::Bytes(b))
                }
                b'C' => {
                    let n = self.u8()? as u64;
                    let b: Rc<[u8]> = self.take(n)?.into();
                    self.push(Value::Bytes(b))
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.le()?);
                    let b: Rc<[u8]> = self.take(n)?.into();
                    self.push(Value::Bytes(b))
                }
                b')' => self.push(Value::Tuple(Rc::new([]))),
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        bail!("malformed pickle at byte {at}: stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(items.into()))
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items.into()))
                }
                b']' => self.push(Value::List(Rc::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))))
                }
                b'}' => self.push(Value::Dict(Rc::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = Value::Dict(Rc::default());
                    set_items(&dict, items, at)?;
                    self.push(dict)
                }
                0x8f => self.push(Value::List(Rc::default())), // EMPTY_SET, as a list
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items.into()))
                }
                b'a' => {
                    let v = self.pop()?;
                    append(self.top()?, vec![v], at)?
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    append(self.top()?, items, at)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    set_items(self.top()?, vec![k, v], at)?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    set_items(self.top()?, items, at)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(Rc::new((module, name))))
                }
                0x93 => {
                    let name = self.pop()?.as_str("STACK_GLOBAL name")?;
                    let module = self.pop()?.as_str("STACK_GLOBAL module")?;
                    self.push(Value::Global(Rc::new((
                        module.to_string(),
                        name.to_string(),
                    ))))
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = call(callable, args).map_err(|e| e.context(format!("at byte {at}")))?;
                    self.push(v)
                }
                0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(Value::Object(Rc::new(Opaque { callable, args })))
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(Value::Object(Rc::new(Opaque { callable, args })))
                }
                // BUILD sets attributes (`OrderedDict._metadata`, module state): nothing a
                // state dict needs, so the state is dropped.
                b'b' => {
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = persistent_load(&pid)
                        .map_err(|e| e.context(format!("persistent id at byte {at}")))?;
                    let storage = Rc::new(storage);
                    self.storages.push(storage.clone());
                    self.push(Value::Storage(storage))
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?) as u64;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    let v = self.memo_get(k)?;
                    self.push(v)
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?) as u64;
                    let v = self.memo_get(k)?;
                    self.push(v)
                }
                op => bail!("unsupported pickle opcode 0x{op:02x} at byte {at}"),
            }
        }
    }

    fn string(&mut self, n: u64, at: usize) -> Result<()> {
        let s = std::str::from_utf8(self.take(n)?)
            .map_err(|_| anyhow!("invalid UTF-8 string at byte {at}"))?;
        let s: Rc<str> = s.into();
        self.push(Value::Str(s));
        Ok(())
    }
}

/// A little-endian two's-complement integer of any length.
fn long(bytes: &[u8]) -> Value {
    if bytes.len() <= 8 {
        let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
        let mut buf = [if negative { 0xff } else { 0 }; 8];
        buf[..bytes.len()].copy_from_slice(bytes);
        Value::Int(i64::from_le_bytes(buf))
    } else {
        Value::BigInt(bytes.into())
    }
}

fn append(target: &mut Value, items: Vec<Value>, at: usize) -> Result<()> {
    match target {
        Value::List(l) => {
            l.borrow_mut().extend(items);
            Ok(())
        }
        v => bail!("malformed pickle at byte {at}: APPEND to {}", v.kind()),
    }
}

fn set_items(target: &Value, items: Vec<Value>, at: usize) -> Result<()> {
    let Value::Dict(d) = target else {
        bail!(
            "malformed pickle at byte {at}: SETITEM on {}",
            target.kind()
        );
    };
    if !items.len().is_multiple_of(2) {
        bail!("malformed pickle at byte {at}: odd number of dict items");
    }
    let mut d = d.borrow_mut();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.push((k, v));
    }
    Ok(())
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
fn call(callable: Value, args: Value) -> Result<Value> {
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
fn persistent_load(pid: &Value) -> Result<StorageRef> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Value> {
        Ok(load(bytes, &mut 0)?.0)
    }

    #[test]
    fn reads_the_legacy_magic_number_as_a_big_int() {
        let bytes = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
        match run(bytes).unwrap() {
            Value::BigInt(b) => assert_eq!(&*b, &bytes[4..14]),
            v => panic!("{v:?}"),
        }
        // Short LONG1 values sign-extend.
        assert!(matches!(run(b"\x8a\x01\xff.").unwrap(), Value::Int(-1)));
        assert!(matches!(
            run(b"\x8a\x02\xe8\x03.").unwrap(),
            Value::Int(1000)
        ));
    }

    #[test]
    fn memoized_dicts_are_shared_like_python_objects() {
        // d = {}; memo[0] = d; d['a'] = 7; pop d; push memo[0]: the same dict, now filled.
        let bytes = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x07s0h\x00.";
        match run(bytes).unwrap() {
            Value::Dict(d) => assert_eq!(d.borrow().len(), 1),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn dict_opcode_builds_a_filled_dict() {
        let v = run(b"(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02d.").unwrap();
        let Value::Dict(d) = v else { panic!() };
        let d = d.borrow();
        assert_eq!(d.len(), 2);
        assert!(matches!((&d[1].0, &d[1].1), (Value::Str(k), Value::Int(2)) if &**k == "b"));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"\x80",
            b"X\xff\xff\xff\xff",
            b"t.",
            b"0.",
            b"h\x05.",
            b"K\x01K\x02s.",
            b"\x85.",
            b"\xff",
        ] {
            assert!(run(bad).is_err(), "{bad:?}");
        }
    }
}
