//! The frozen encoders' outputs of every image, computed once: the gallery encoder's image
//! tokens (before `ln_vision`) and the query encoder's light tokens. The demo freezes both
//! encoders, so each epoch and each evaluation reads these instead of running the CNNs again.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::data::preprocess::{load_batch, Transform};
use crate::data::Dataset;
use crate::model::Slot4ACir;
use crate::weights::{load_state_dict, read_metadata, save_state_dict};

pub struct FeatureBank {
    row: HashMap<String, u32>,
    /// Image names by row.
    names: Vec<String>,
    /// (N,T,W) image tokens of the frozen gallery encoder.
    pub vision: Tensor,
    /// (N,t,C) light tokens of the frozen query encoder.
    pub light: Tensor,
}

impl FeatureBank {
    /// Encodes every gallery image of `datasets` (names must be unique across them).
    pub fn build(
        model: &Slot4ACir,
        datasets: &[&Dataset],
        batch: usize,
        progress: bool,
    ) -> Result<Self> {
        let images: Vec<_> = datasets.iter().flat_map(|d| d.gallery.iter()).collect();
        let tty = std::io::stderr().is_terminal();
        let pb = if progress {
            indicatif::ProgressBar::new(images.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "encoding images [{bar:40}] {pos}/{len} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let size = model.cfg.img_size;
        let device = model.query_tokens.device().clone();
        let (mut row, mut vision, mut light) = (HashMap::new(), Vec::new(), Vec::new());
        let mut names = Vec::with_capacity(images.len());
        let tenth = images.len().div_ceil(10).max(1);
        for chunk in images.chunks(batch.max(1)) {
            let paths: Vec<_> = chunk.iter().map(|g| g.path.clone()).collect();
            let loaded = load_batch(&paths, &Transform::default(), size)?;
            if let Some((i, e)) = loaded.failed.into_iter().next() {
                return Err(e.context(format!("reading image {}", paths[i].display())));
            }
            let pixels = loaded.pixels.to_device(&device)?;
            vision.push(model.vit_features(&pixels)?.to_device(&Device::Cpu)?);
            light.push(
                model
                    .light_tokens(&pixels, false)?
                    .to_device(&Device::Cpu)?,
            );
            for g in chunk {
                let n = row.len() as u32;
                if row.insert(g.name.clone(), n).is_some() {
                    bail!("image name {} appears in two splits", g.name);
                }
                names.push(g.name.clone());
            }
            pb.inc(chunk.len() as u64);
            // Without a terminal the bar is not drawn: log about every tenth of the images.
            let done = names.len();
            if progress && !tty && done / tenth != (done - chunk.len()) / tenth {
                tracing::info!("encoded {done}/{} images", images.len());
            }
        }
        pb.finish_and_clear();
        if row.is_empty() {
            bail!("no images to encode");
        }
        Ok(Self {
            row,
            names,
            vision: Tensor::cat(&vision, 0)?,
            light: Tensor::cat(&light, 0)?,
        })
    }

    /// Saves the bank (float32, atomically) under `key`, which names what it was computed from.
    pub fn save(&self, path: &Path, key: &str) -> Result<()> {
        let tensors = BTreeMap::from([
            ("vision".to_string(), self.vision.clone()),
            ("light".to_string(), self.light.clone()),
        ]);
        let meta = BTreeMap::from([
            ("key".to_string(), key.to_string()),
            ("names".to_string(), serde_json::to_string(&self.names)?),
        ]);
        save_state_dict(path, &tensors, &meta)
    }

    /// The bank saved at `path` if it was computed under `key` (the same images and encoders);
    /// `None` when there is none or it is stale. A damaged file is an error naming it.
    pub fn load(path: &Path, key: &str) -> Result<Option<Self>> {
        if !path.is_file() {
            return Ok(None);
        }
        let meta = read_metadata(path)?;
        if meta.get("key").map(String::as_str) != Some(key) {
            return Ok(None);
        }
        let names: Vec<String> = serde_json::from_str(meta.get("names").map_or("", |s| s))
            .with_context(|| format!("{}: the image names are unreadable", path.display()))?;
        let mut t = load_state_dict(path)?;
        let (Some(vision), Some(light)) = (t.remove("vision"), t.remove("light")) else {
            bail!(
                "{}: not a feature bank (no vision/light tensors)",
                path.display()
            );
        };
        if vision.dim(0)? != names.len() || light.dim(0)? != names.len() {
            bail!(
                "{}: {} names for {} rows",
                path.display(),
                names.len(),
                vision.dim(0)?
            );
        }
        let row = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        Ok(Some(Self {
            row,
            names,
            vision,
            light,
        }))
    }

    pub fn len(&self) -> usize {
        self.row.len()
    }

    pub fn is_empty(&self) -> bool {
        self.row.is_empty()
    }

    fn rows<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<Tensor> {
        let idx: Vec<u32> = names
            .into_iter()
            .map(|n| {
                self.row
                    .get(n)
                    .copied()
                    .with_context(|| format!("image {n} was not encoded"))
            })
            .collect::<Result<_>>()?;
        let n = idx.len();
        Ok(Tensor::from_vec(idx, n, &Device::Cpu)?)
    }

    /// The rows of `all` (vision or light) of the named images, on `device`.
    fn select<'a>(
        &self,
        all: &Tensor,
        names: impl IntoIterator<Item = &'a str>,
        device: &Device,
    ) -> Result<Tensor> {
        Ok(all.index_select(&self.rows(names)?, 0)?.to_device(device)?)
    }

    /// Image tokens (B,T,W) of the named images, on `device`.
    pub fn vision_of<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
        device: &Device,
    ) -> Result<Tensor> {
        self.select(&self.vision, names, device)
    }

    /// Light tokens (B,t,C) of the named images, on `device`.
    pub fn light_of<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
        device: &Device,
    ) -> Result<Tensor> {
        self.select(&self.light, names, device)
    }
}
