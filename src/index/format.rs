//! The gallery index file: everything a query needs, memory-mapped on open.
//!
//! Layout (little-endian):
//! ```text
//! 0     magic  b"S4ACIDX\0"
//! 8     version u32 (= 1), reserved u32
//! 16    header length u64
//! 24    reserved up to 64
//! 64    header: JSON (IndexHeader)
//! ...   sections, each starting on a 4096-byte boundary:
//!       vectors  N × V × D   gallery vectors (V = 32 per image), f16 or f32
//!       tokens   N × T × C   light tokens (so a gallery image can be a query's reference)
//!       names    JSON [[name, relative path], …]
//! ```
//! The header carries the model configuration and the weights fingerprint so that a
//! mismatched model is refused ([`Index::check_model`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use half::f16;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"S4ACIDX\0";
pub const VERSION: u32 = 1;
const PREAMBLE: usize = 64;
const ALIGN: u64 = 4096;

#[cfg(not(target_endian = "little"))]
compile_error!("the index format is little-endian and read in place");

/// Storage type of the vectors and tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F16,
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f16" | "float16" => Ok(Dtype::F16),
            "f32" | "float32" => Ok(Dtype::F32),
            _ => bail!("unknown index dtype '{s}' (expected f16 or f32)"),
        }
    }

    /// Encodes f32 values as little-endian bytes of this type (f16: round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        match self {
            Dtype::F16 => {
                for v in values {
                    out.extend_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
            Dtype::F32 => {
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        out
    }
}

/// The shapes an encoder produces per image (SPEC: V = 32 vectors of D = 256; T = h·w light
/// tokens of width C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub vectors_per_image: usize,
    pub dim: usize,
    pub tokens_per_image: usize,
    pub token_dim: usize,
}

impl Layout {
    pub fn vector_elems(&self) -> usize {
        self.vectors_per_image * self.dim
    }
    pub fn token_elems(&self) -> usize {
        self.tokens_per_image * self.token_dim
    }
}

/// A byte range of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Section {
    pub offset: u64,
    pub len: u64,
}

/// One gallery image: its name (what search answers) and its path relative to the image root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GalleryImage {
    pub name: String,
    pub path: String,
}

/// The JSON header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexHeader {
    /// The model configuration that encoded the gallery (a `ModelConfig` for the real model).
    pub model_config: serde_json::Value,
    /// [`crate::weights::fingerprint`] of the weights that encoded the gallery.
    pub weights_fingerprint: String,
    pub dtype: Dtype,
    pub count: usize,
    pub layout: Layout,
    /// Directory the image paths are relative to, as given when indexing (for `GET /images`).
    pub image_root: Option<String>,
    pub vectors: Section,
    pub tokens: Section,
    pub names: Section,
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

impl IndexHeader {
    /// A header with its sections laid out for `count` images and the given names blob.
    pub fn new(
        model_config: serde_json::Value,
        weights_fingerprint: String,
        dtype: Dtype,
        count: usize,
        layout: Layout,
        image_root: Option<String>,
        names_len: u64,
    ) -> Self {
        let mut h = Self {
            model_config,
            weights_fingerprint,
            dtype,
            count,
            layout,
            image_root,
            vectors: Section::default(),
            tokens: Section::default(),
            names: Section::default(),
        };
        // The header's own length depends on the offsets: lay out with a generous bound.
        let json_bound = serde_json::to_vec(&h).map(|v| v.len()).unwrap_or(0) as u64 + 256;
        let el = dtype.size() as u64;
        let vec_len = count as u64 * layout.vector_elems() as u64 * el;
        let tok_len = count as u64 * layout.token_elems() as u64 * el;
        h.vectors = Section {
            offset: align_up(PREAMBLE as u64 + json_bound),
            len: vec_len,
        };
        h.tokens = Section {
            offset: align_up(h.vectors.offset + vec_len),
            len: tok_len,
        };
        h.names = Section {
            offset: align_up(h.tokens.offset + tok_len),
            len: names_len,
        };
        h
    }

    pub fn file_len(&self) -> u64 {
        self.names.offset + self.names.len
    }

    /// The preamble and JSON header, ready to be written at offset 0.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(self)?;
        ensure!(
            (PREAMBLE + json.len()) as u64 <= self.vectors.offset,
            "index header does not fit before the vectors section"
        );
        let mut out = Vec::with_capacity(PREAMBLE + json.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.resize(PREAMBLE, 0);
        out.extend_from_slice(&json);
        Ok(out)
    }
}

/// The names section's bytes.
pub fn names_blob(images: &[GalleryImage]) -> Result<Vec<u8>> {
    let pairs: Vec<(&str, &str)> = images
        .iter()
        .map(|g| (g.name.as_str(), g.path.as_str()))
        .collect();
    Ok(serde_json::to_vec(&pairs)?)
}

/// Writes a complete index file from in-memory parts (vectors and tokens already encoded in
/// `header.dtype`), through a temporary file renamed into place.
pub fn write_index(
    path: &Path,
    header: &IndexHeader,
    vectors: &[u8],
    tokens: &[u8],
    names: &[u8],
) -> Result<()> {
    let mut w = IndexFileWriter::create(path, header)?;
    w.write_at(header.vectors.offset, vectors)?;
    w.write_at(header.tokens.offset, tokens)?;
    w.write_at(header.names.offset, names)?;
    w.finish()
}

/// Positional writer of an index file; the file appears at its path only on `finish`.
pub struct IndexFileWriter {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
}

impl IndexFileWriter {
    pub fn create(path: &Path, header: &IndexHeader) -> Result<Self> {
        let tmp = path.with_extension("tmp-write");
        let file =
            File::create(&tmp).with_context(|| format!("creating index file {}", tmp.display()))?;
        file.set_len(header.file_len())
            .with_context(|| format!("sizing index file {}", tmp.display()))?;
        let mut w = Self {
            file,
            tmp,
            path: path.to_path_buf(),
        };
        w.write_at(0, &header.to_bytes()?)?;
        Ok(w)
    }

    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(bytes, offset)
            .with_context(|| format!("writing index file {}", self.tmp.display()))
    }

    pub fn finish(mut self) -> Result<()> {
        self.file.flush()?;
        self.file
            .sync_all()
            .with_context(|| format!("syncing index file {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("renaming {} to {}", self.tmp.display(), self.path.display()))
    }
}

/// The gallery vectors of an open index, in their stored type.
#[derive(Clone, Copy)]
pub enum Vectors<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

/// An open, memory-mapped index.
pub struct Index {
    path: PathBuf,
    mmap: Mmap,
    header: IndexHeader,
    images: Vec<GalleryImage>,
    by_name: std::collections::HashMap<String, usize>,
}

impl Index {
    pub fn open(path: &Path) -> Result<Self> {
        let ctx = || format!("index file {}", path.display());
        let file = File::open(path).with_context(|| format!("opening {}", ctx()))?;
        // SAFETY: the file is opened read-only; an index is written once and renamed into place.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", ctx()))?;
        let header = Self::parse_header(&mmap).with_context(ctx)?;
        let names = Self::section(&mmap, header.names).with_context(ctx)?;
        let pairs: Vec<(String, String)> =
            serde_json::from_slice(names).with_context(|| format!("names section of {}", ctx()))?;
        ensure!(
            pairs.len() == header.count,
            "{}: names section has {} entries, header says {}",
            ctx(),
            pairs.len(),
            header.count
        );
        let images: Vec<GalleryImage> = pairs
            .into_iter()
            .map(|(name, path)| GalleryImage { name, path })
            .collect();
        let by_name = images
            .iter()
            .enumerate()
            .map(|(i, g)| (g.name.clone(), i))
            .collect();
        let index = Self {
            path: path.to_path_buf(),
            mmap,
            header,
            images,
            by_name,
        };
        index.validate_sections().with_context(ctx)?;
        Ok(index)
    }

    fn parse_header(bytes: &[u8]) -> Result<IndexHeader> {
        ensure!(
            bytes.len() >= PREAMBLE && &bytes[..8] == MAGIC,
            "not a slot4acir index (bad magic)"
        );
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        ensure!(
            version == VERSION,
            "index format version {version} is not supported (this build reads {VERSION})"
        );
        let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
        let json = bytes
            .get(PREAMBLE..PREAMBLE.saturating_add(len))
            .context("truncated index header")?;
        serde_json::from_slice(json).context("index header is not valid")
    }

    fn section(bytes: &[u8], s: Section) -> Result<&[u8]> {
        let start = usize::try_from(s.offset)?;
        let end = start
            .checked_add(usize::try_from(s.len)?)
            .context("section overflows")?;
        bytes
            .get(start..end)
            .with_context(|| format!("truncated file: section {start}..{end} is past its end"))
    }

    fn validate_sections(&self) -> Result<()> {
        let h = &self.header;
        let el = h.dtype.size() as u64;
        let n = h.count as u64;
        ensure!(
            h.vectors.len == n * h.layout.vector_elems() as u64 * el
                && h.tokens.len == n * h.layout.token_elems() as u64 * el,
            "section sizes disagree with the header's counts"
        );
        for s in [h.vectors, h.tokens] {
            Self::section(&self.mmap, s)?;
            ensure!(s.offset.is_multiple_of(ALIGN), "misaligned section");
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn header(&self) -> &IndexHeader {
        &self.header
    }
    pub fn len(&self) -> usize {
        self.header.count
    }
    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }
    pub fn layout(&self) -> Layout {
        self.header.layout
    }
    pub fn images(&self) -> &[GalleryImage] {
        &self.images
    }
    pub fn position(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn vectors(&self) -> Vectors<'_> {
        let bytes = Self::section(&self.mmap, self.header.vectors).expect("validated on open");
        // SAFETY: the section is 4096-aligned within a page-aligned mapping and its length is a
        // multiple of the element size (validated on open); f16 and f32 have no invalid bits.
        unsafe {
            match self.header.dtype {
                Dtype::F16 => Vectors::F16(std::slice::from_raw_parts(
                    bytes.as_ptr() as *const f16,
                    bytes.len() / 2,
                )),
                Dtype::F32 => Vectors::F32(std::slice::from_raw_parts(
                    bytes.as_ptr() as *const f32,
                    bytes.len() / 4,
                )),
            }
        }
    }

    /// The light tokens of image `i` as f32 (T·C values, row-major (T, C)).
    pub fn tokens_f32(&self, i: usize) -> Vec<f32> {
        let per = self.header.layout.token_elems();
        let el = self.header.dtype.size();
        let bytes = Self::section(&self.mmap, self.header.tokens).expect("validated on open");
        let b = &bytes[i * per * el..(i + 1) * per * el];
        match self.header.dtype {
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }

    /// The gallery vectors of image `i` as f32 (V·D values).
    pub fn vectors_f32(&self, i: usize) -> Vec<f32> {
        let per = self.header.layout.vector_elems();
        match self.vectors() {
            Vectors::F16(v) => v[i * per..(i + 1) * per]
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            Vectors::F32(v) => v[i * per..(i + 1) * per].to_vec(),
        }
    }

    /// Refuses a model other than the one that built the index, saying what differs.
    pub fn check_model(
        &self,
        model_config: &serde_json::Value,
        fingerprint: &str,
        layout: Layout,
    ) -> Result<()> {
        let h = &self.header;
        if &h.model_config != model_config {
            bail!(
                "index {} was built with a different model configuration:\n  index: {}\n  model: {}",
                self.path.display(),
                h.model_config,
                model_config
            );
        }
        if h.weights_fingerprint != fingerprint {
            bail!(
                "index {} was built with weights of fingerprint {}, but the given weights have \
                 fingerprint {}: refusing to search a gallery encoded by another model",
                self.path.display(),
                h.weights_fingerprint,
                fingerprint
            );
        }
        if h.layout != layout {
            bail!(
                "index {} has layout {:?}, the model produces {:?}",
                self.path.display(),
                h.layout,
                layout
            );
        }
        Ok(())
    }
}
