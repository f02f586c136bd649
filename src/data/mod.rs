//! The data layer: image files and annotation files in, normalized pixels and triplets out.
//!
//! Both datasets live under one data root (`--data-root` or `$SLOT4ACIR_DATA_ROOT`), laid out as
//! the reference expects (SPEC section 4): `CIRR/cirr/{captions,image_splits}/` with images at
//! the split map's paths relative to `CIRR/`, and `FashionIQ/{captions,image_splits,images}/`.
//! A reader gives a [`Dataset`]: its triplets (the reference's "relative" mode) and its gallery
//! (the "classic" mode: every image of the split, in file order).

pub mod cirr;
pub mod fashioniq;
pub mod preprocess;
pub mod raster;
pub mod resample;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use rand::Rng;

/// Environment variable naming the data root when `--data-root` is not given.
pub const DATA_ROOT_ENV: &str = "SLOT4ACIR_DATA_ROOT";

/// The data root: the argument if given, else `$SLOT4ACIR_DATA_ROOT`.
pub fn data_root(arg: Option<&Path>) -> Result<PathBuf> {
    let root = match arg {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os(DATA_ROOT_ENV) {
            Some(p) => PathBuf::from(p),
            None => bail!("no data root: pass --data-root or set {DATA_ROOT_ENV}"),
        },
    };
    if !root.is_dir() {
        bail!("data root {} is not a directory", root.display());
    }
    Ok(root)
}

/// How a reader treats bad input. By default every problem is an error naming the file (and the
/// triplet); with `skip_bad` a bad record, a name missing from the split map or an unreadable
/// image is skipped instead, counted in a [`SkipLog`] and reported at the end.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Read the LLM-augmented training caption files (`--llm-sampler`).
    pub llm_sampler: bool,
    /// `--skip-bad-images`
    pub skip_bad: bool,
}

/// Skipped inputs, shared across threads; errors pass through unless skipping is enabled.
#[derive(Debug, Default)]
pub struct SkipLog {
    enabled: bool,
    entries: Mutex<Vec<String>>,
}

impl SkipLog {
    pub fn new(skip_bad: bool) -> Self {
        Self {
            enabled: skip_bad,
            entries: Mutex::new(Vec::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// In skip mode records the error and returns `Ok(())`; otherwise returns the error.
    pub fn skip_or_fail(&self, err: anyhow::Error) -> Result<()> {
        if !self.enabled {
            return Err(err);
        }
        tracing::debug!("skipping: {err:#}");
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{err:#}"));
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn entries(&self) -> Vec<String> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Logs how many inputs were skipped and the first few reasons.
    pub fn report(&self, what: &str) {
        let entries = self.entries();
        if entries.is_empty() {
            return;
        }
        tracing::warn!("{what}: skipped {} bad inputs", entries.len());
        for e in entries.iter().take(10) {
            tracing::warn!("  {e}");
        }
        if entries.len() > 10 {
            tracing::warn!("  ... and {} more", entries.len() - 10);
        }
    }
}

/// One image of a split, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GalleryImage {
    pub name: String,
    pub path: PathBuf,
}

/// A query triplet: reference image + modification text → target image.
#[derive(Debug, Clone, PartialEq)]
pub struct Triplet {
    /// CIRR `pairid`; FashionIQ the triplet's position in its caption file.
    pub pair_id: i64,
    /// FashionIQ category (`dress`, `shirt`, `toptee`); empty for CIRR.
    pub category: String,
    pub reference: String,
    /// Absent in the test splits.
    pub target: Option<String>,
    pub text: TripletText,
    /// CIRR `img_set.members` (the subset for R_s@K); empty for FashionIQ.
    pub members: Vec<String>,
}

/// The modification text of a triplet, before the caption processor.
#[derive(Debug, Clone, PartialEq)]
pub enum TripletText {
    /// CIRR: the caption; with the LLM sampler, the paraphrases one is drawn from per use.
    Cirr {
        caption: String,
        paraphrases: Vec<String>,
    },
    /// FashionIQ: the two relative captions; with the LLM sampler, variants of each.
    FashionIq {
        captions: [String; 2],
        variants: Option<[Vec<String>; 2]>,
    },
}

/// Python's `s.strip('.?, ')`.
fn strip_fiq(s: &str) -> &str {
    s.trim_matches(|c| matches!(c, '.' | '?' | ',' | ' '))
}

impl TripletText {
    /// The evaluation caption: CIRR's caption, FashionIQ's "c1 and c2" (SPEC section 3).
    /// The reference capitalizes the first caption; the caption processor lowercases anyway.
    pub fn eval_caption(&self) -> String {
        match self {
            TripletText::Cirr { caption, .. } => caption.clone(),
            TripletText::FashionIq {
                captions: [a, b], ..
            } => format!(
                "{} and {}",
                strip_fiq(a).to_lowercase(),
                strip_fiq(b).to_lowercase()
            ),
        }
    }

    /// A training caption: a random paraphrase with the LLM sampler; for FashionIQ one of
    /// "c1 and c2", "c2 and c1", "c1", "c2" uniformly, each part stripped of `.?, `.
    pub fn train_caption(&self, rng: &mut impl Rng) -> String {
        match self {
            TripletText::Cirr {
                caption,
                paraphrases,
            } => {
                if paraphrases.is_empty() {
                    caption.clone()
                } else {
                    paraphrases[rng.gen_range(0..paraphrases.len())].clone()
                }
            }
            TripletText::FashionIq { captions, variants } => {
                let [a, b] = match variants {
                    Some([va, vb]) => [
                        &va[rng.gen_range(0..va.len())],
                        &vb[rng.gen_range(0..vb.len())],
                    ],
                    None => [&captions[0], &captions[1]],
                };
                let (a, b) = (strip_fiq(a).to_lowercase(), strip_fiq(b).to_lowercase());
                match rng.gen_range(0..4) {
                    0 => format!("{a} and {b}"),
                    1 => format!("{b} and {a}"),
                    2 => a,
                    _ => b,
                }
            }
        }
    }
}

/// Where image files of a dataset are.
#[derive(Debug, Clone)]
enum ImageLocator {
    /// CIRR: the split map (name → path), read from `split_file`.
    SplitMap {
        paths: HashMap<String, PathBuf>,
        split_file: PathBuf,
    },
    /// FashionIQ: `{dir}/{name}.png`.
    Directory(PathBuf),
}

/// A dataset split read from its annotation files: triplets and gallery.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// e.g. "CIRR val", "FashionIQ dress+shirt+toptee train".
    pub name: String,
    pub triplets: Vec<Triplet>,
    /// The split's images in file order (the reference's "classic" mode).
    pub gallery: Vec<GalleryImage>,
    /// The caption files the triplets came from (for messages).
    pub caption_files: Vec<PathBuf>,
    locator: ImageLocator,
}

impl Dataset {
    /// The file of an image by name; an error naming the split map when it is not listed.
    pub fn image_path(&self, name: &str) -> Result<PathBuf> {
        match &self.locator {
            ImageLocator::SplitMap { paths, split_file } => {
                paths.get(name).cloned().with_context(|| {
                    format!(
                        "image '{name}' is not in the split map {}",
                        split_file.display()
                    )
                })
            }
            ImageLocator::Directory(dir) => Ok(dir.join(format!("{name}.png"))),
        }
    }

    /// Position of every gallery image by name.
    pub fn gallery_index(&self) -> HashMap<&str, usize> {
        self.gallery
            .iter()
            .enumerate()
            .map(|(i, g)| (g.name.as_str(), i))
            .collect()
    }

    /// Paths of a triplet's reference and target, with errors naming the triplet.
    pub fn triplet_paths(&self, t: &Triplet) -> Result<(PathBuf, Option<PathBuf>)> {
        let ctx = || self.describe(t);
        let r = self.image_path(&t.reference).with_context(ctx)?;
        let g = match &t.target {
            Some(g) => Some(self.image_path(g).with_context(ctx)?),
            None => None,
        };
        Ok((r, g))
    }

    /// A triplet's reference and target images (training), preprocessed; errors name the image
    /// file, the triplet and its caption file.
    pub fn load_triplet_images(
        &self,
        t: &Triplet,
        transform: &preprocess::Transform,
        size: usize,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let ctx = || {
            let files: Vec<String> = self
                .caption_files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            format!("{} in {}", self.describe(t), files.join(", "))
        };
        let (r, g) = self.triplet_paths(t).with_context(ctx)?;
        let r = preprocess::load_image(&r, transform, size).with_context(ctx)?;
        let g = match g {
            Some(g) => Some(preprocess::load_image(&g, transform, size).with_context(ctx)?),
            None => None,
        };
        Ok((r, g))
    }

    /// "triplet pairid 123 of CIRR val", "triplet 5 (dress) of FashionIQ dress val".
    pub fn describe(&self, t: &Triplet) -> String {
        if t.category.is_empty() {
            format!("triplet pairid {} of {}", t.pair_id, self.name)
        } else {
            format!("triplet {} ({}) of {}", t.pair_id, t.category, self.name)
        }
    }

    /// Keeps only the triplets whose reference, target and members are all in the gallery
    /// (the evaluation ranks the gallery and reuses its reference features). Without skipping
    /// the first offender is an error naming the caption file and the triplet.
    pub fn require_in_gallery(&mut self, log: &SkipLog) -> Result<()> {
        let index: std::collections::HashSet<String> =
            self.gallery.iter().map(|g| g.name.clone()).collect();
        let files: Vec<String> = self
            .caption_files
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        let mut keep = Vec::with_capacity(self.triplets.len());
        for t in &self.triplets {
            let names = std::iter::once(&t.reference)
                .chain(t.target.iter())
                .chain(t.members.iter());
            let missing: Vec<&String> = names.filter(|n| !index.contains(*n)).collect();
            keep.push(missing.is_empty());
            if !missing.is_empty() {
                log.skip_or_fail(anyhow::anyhow!(
                    "{}: {}: image(s) {:?} not in the gallery of the split",
                    files.join(", "),
                    self.describe(t),
                    missing
                ))?;
            }
        }
        let mut keep = keep.into_iter();
        self.triplets.retain(|_| keep.next().unwrap_or(false));
        Ok(())
    }
}

/// Reads and parses a JSON file; errors name the file.
fn read_json(path: &Path, what: &str) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{what} {} is not valid JSON", path.display()))
}

/// A JSON object's entries in file order (serde_json's map would sort them; the gallery order of
/// the reference is the file order). A repeated key keeps its first position and last value,
/// like a Python dict.
fn ordered_string_map(path: &Path, what: &str) -> Result<Vec<(String, String)>> {
    struct Entries(Vec<(String, String)>);
    impl<'de> serde::Deserialize<'de> for Entries {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Entries;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object mapping image names to relative paths")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Entries, A::Error> {
                    let mut out: Vec<(String, String)> = Vec::new();
                    let mut pos: HashMap<String, usize> = HashMap::new();
                    while let Some((k, v)) = m.next_entry::<String, String>()? {
                        match pos.get(&k) {
                            Some(&i) => out[i].1 = v,
                            None => {
                                pos.insert(k.clone(), out.len());
                                out.push((k, v));
                            }
                        }
                    }
                    Ok(Entries(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    let e: Entries = serde_json::from_str(&text)
        .with_context(|| format!("{what} {} is not the expected JSON", path.display()))?;
    Ok(e.0)
}
