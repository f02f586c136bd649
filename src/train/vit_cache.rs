//! The frozen ViT's outputs, computed once per image and kept on disk (issue: training spends
//! most of its time in the ViT, whose weights never change).
//!
//! An entry is keyed by the BLAKE3 hash of the *preprocessed pixels* the ViT would see, so a
//! cached row is exactly the output for that input: a change of image, transform or image size
//! is a different key, never a stale hit. A cache folder belongs to one vision encoder: its
//! name is the fingerprint of the encoder's configuration and weights.
//!
//! Layout of `DIR/vit-<fingerprint>-<dtype>/`: `meta.json` (fingerprint, dtype, row shape),
//! `rows.bin` (row i at offset i·row_bytes, little-endian float16 or float32) and `keys.bin`
//! (row i's 32-byte key at offset 32·i). Rows are written before their keys, so after a crash
//! the shorter of the two files says how many rows are complete; the rest is cut off on open.
//! Reads go through a memory map of `rows.bin`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::Slot4ACir;
use crate::weights::ParamStore;

/// How cached rows are stored. Float32 reproduces the ViT exactly; float16 halves the disk and
/// memory traffic (relative error ~5e-4 on the features).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheDType {
    F16,
    F32,
}

impl CacheDType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f16" | "float16" => Ok(Self::F16),
            "f32" | "float32" => Ok(Self::F32),
            other => bail!("unknown cache dtype '{other}' (f16, f32)"),
        }
    }

    fn bytes(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Meta {
    fingerprint: String,
    dtype: CacheDType,
    /// (T, W) of one row.
    tokens: usize,
    width: usize,
}

type Key = [u8; 32];

struct Store {
    rows: File,
    keys: File,
    index: HashMap<Key, usize>,
    map: Option<memmap2::Mmap>,
    /// Rows counted by the map (it is refreshed when rows were added since).
    mapped_rows: usize,
}

/// Counters of one cache's use, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: usize,
    pub computed: usize,
}

pub struct VitCache {
    dir: PathBuf,
    meta: Meta,
    store: Mutex<Store>,
    stats: Mutex<CacheStats>,
}

/// The fingerprint of a model's vision encoder: its configuration and every `visual_encoder.*`
/// tensor (names, shapes, values).
pub fn vision_fingerprint(model: &Slot4ACir, store: &ParamStore) -> Result<String> {
    let c = &model.cfg;
    let cfg = serde_json::json!({
        "vision_model": c.vision_model, "vit_width": c.vit_width, "vit_depth": c.vit_depth,
        "vit_heads": c.vit_heads, "img_size": c.img_size, "patch_size": c.patch_size,
        "vit_mlp_ratio": c.vit_mlp_ratio, "vit_ln_eps": c.vit_ln_eps,
    });
    let vision: std::collections::BTreeMap<String, Tensor> = store
        .state_dict()
        .into_iter()
        .filter(|(n, _)| n.starts_with("visual_encoder."))
        .collect();
    let weights = crate::weights::fingerprint::hash_tensors(&vision)?;
    let mut h = blake3::Hasher::new();
    h.update(cfg.to_string().as_bytes());
    h.update(weights.as_bytes());
    Ok(h.finalize().to_hex()[..16].to_string())
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl VitCache {
    /// Opens (or creates) the cache for `fingerprint` under `root`. An existing folder whose
    /// metadata disagrees is an error naming it.
    pub fn open(
        root: &Path,
        fingerprint: &str,
        dtype: CacheDType,
        tokens: usize,
        width: usize,
    ) -> Result<Self> {
        let dir = root.join(format!("vit-{fingerprint}-{}", dtype.name()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let meta = Meta {
            fingerprint: fingerprint.to_string(),
            dtype,
            tokens,
            width,
        };
        let meta_path = dir.join("meta.json");
        if meta_path.exists() {
            let text = std::fs::read_to_string(&meta_path)
                .with_context(|| format!("reading {}", meta_path.display()))?;
            let found: Meta = serde_json::from_str(&text).with_context(|| {
                format!("{} is not a ViT cache description", meta_path.display())
            })?;
            if found != meta {
                bail!(
                    "{} describes {found:?}, not the expected {meta:?}; remove the folder",
                    meta_path.display()
                );
            }
        } else {
            crate::train::checkpoint::write_atomic(
                &meta_path,
                serde_json::to_string_pretty(&meta)?.as_bytes(),
            )?;
        }
        let open = |name: &str| -> Result<File> {
            let p = dir.join(name);
            OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&p)
                .with_context(|| format!("opening {}", p.display()))
        };
        let (rows, keys) = (open("rows.bin")?, open("keys.bin")?);
        let row_bytes = (tokens * width * dtype.bytes()) as u64;
        let n_rows = rows.metadata()?.len() / row_bytes;
        let n_keys = keys.metadata()?.len() / 32;
        let n = n_rows.min(n_keys);
        // Cut off a row or key written without its partner (an interrupted run).
        rows.set_len(n * row_bytes)
            .with_context(|| format!("repairing {}", dir.join("rows.bin").display()))?;
        keys.set_len(n * 32)
            .with_context(|| format!("repairing {}", dir.join("keys.bin").display()))?;
        let key_bytes = std::fs::read(dir.join("keys.bin"))
            .with_context(|| format!("reading {}", dir.join("keys.bin").display()))?;
        let index = key_bytes
            .chunks_exact(32)
            .enumerate()
            .map(|(i, k)| (k.try_into().expect("32 bytes"), i))
            .collect();
        Ok(Self {
            dir,
            meta,
            store: Mutex::new(Store {
                rows,
                keys,
                index,
                map: None,
                mapped_rows: 0,
            }),
            stats: Mutex::new(CacheStats::default()),
        })
    }

    /// Opens the cache of `model`'s vision encoder under `root`.
    pub fn for_model(
        root: &Path,
        model: &Slot4ACir,
        store: &ParamStore,
        dtype: CacheDType,
    ) -> Result<Self> {
        let fp = vision_fingerprint(model, store)?;
        let (t, w) = model
            .visual_encoder
            .token_shape(&model.cfg, model.query_tokens.device())?;
        Self::open(root, &fp, dtype, t, w)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn len(&self) -> usize {
        self.store.lock().expect("cache lock").index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> CacheStats {
        *self.stats.lock().expect("cache lock")
    }

    fn row_elems(&self) -> usize {
        self.meta.tokens * self.meta.width
    }

    /// The ViT outputs (B,T,W) float32 of `pixels` (B,3,S,S): cached rows where present, the
    /// rest computed with `model` (in one batch) and added.
    pub fn features(&self, model: &Slot4ACir, pixels: &Tensor) -> Result<Tensor> {
        let device = pixels.device().clone();
        let b = pixels.dim(0)?;
        let host = pixels.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let flat: Vec<f32> = host.flatten_all()?.to_vec1()?;
        let per = flat.len() / b.max(1);
        let keys: Vec<Key> = (0..b)
            .map(|i| *blake3::hash(bytemuck_f32(&flat[i * per..(i + 1) * per])).as_bytes())
            .collect();
        let missing: Vec<usize> = {
            let store = self.store.lock().expect("cache lock");
            let mut seen = std::collections::HashSet::new();
            (0..b)
                .filter(|&i| !store.index.contains_key(&keys[i]) && seen.insert(keys[i]))
                .collect()
        };
        if !missing.is_empty() {
            let idx = Tensor::new(
                missing.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                &Device::Cpu,
            )?;
            let sub = host
                .index_select(&idx, 0)?
                .to_device(model.query_tokens.device())?;
            let out = model.vit_features(&sub)?;
            self.append(&missing.iter().map(|&i| keys[i]).collect::<Vec<_>>(), &out)?;
        }
        {
            let mut s = self.stats.lock().expect("cache lock");
            s.computed += missing.len();
            s.hits += b - missing.len();
        }
        Ok(self.read(&keys)?.to_device(&device)?)
    }

    fn append(&self, keys: &[Key], out: &Tensor) -> Result<()> {
        let (n, t, w) = out.dims3()?;
        if (t, w) != (self.meta.tokens, self.meta.width) || n != keys.len() {
            bail!(
                "ViT output {:?} does not fit the cache rows ({}, {})",
                out.dims(),
                self.meta.tokens,
                self.meta.width
            );
        }
        let bytes: Vec<u8> = match self.meta.dtype {
            CacheDType::F32 => {
                let v: Vec<f32> = out.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            CacheDType::F16 => {
                let v: Vec<half::f16> = out
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F16)?
                    .flatten_all()?
                    .to_vec1()?;
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        };
        let mut store = self.store.lock().expect("cache lock");
        let first = store.index.len();
        let rows_path = self.dir.join("rows.bin");
        store
            .rows
            .write_all(&bytes)
            .and_then(|_| store.rows.flush())
            .with_context(|| format!("writing {}", rows_path.display()))?;
        let key_bytes: Vec<u8> = keys.iter().flatten().copied().collect();
        store
            .keys
            .write_all(&key_bytes)
            .with_context(|| format!("writing {}", self.dir.join("keys.bin").display()))?;
        for (i, k) in keys.iter().enumerate() {
            store.index.insert(*k, first + i);
        }
        Ok(())
    }

    fn read(&self, keys: &[Key]) -> Result<Tensor> {
        let mut store = self.store.lock().expect("cache lock");
        let n = store.index.len();
        if store.map.is_none() || store.mapped_rows != n {
            // SAFETY: the file is only ever appended to (by this process, under this lock);
            // the mapped prefix never changes.
            let map = unsafe { memmap2::Mmap::map(&store.rows) }
                .with_context(|| format!("mapping {}", self.dir.join("rows.bin").display()))?;
            store.map = Some(map);
            store.mapped_rows = n;
        }
        let map = store.map.as_ref().expect("mapped");
        let elems = self.row_elems();
        let rb = elems * self.meta.dtype.bytes();
        let mut out: Vec<f32> = Vec::with_capacity(keys.len() * elems);
        for k in keys {
            let row = *store.index.get(k).expect("row present after append");
            let bytes = &map[row * rb..(row + 1) * rb];
            match self.meta.dtype {
                CacheDType::F32 => out.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
                CacheDType::F16 => out.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
            }
        }
        Ok(Tensor::from_vec(
            out,
            (keys.len(), self.meta.tokens, self.meta.width),
            &Device::Cpu,
        )?)
    }
}
