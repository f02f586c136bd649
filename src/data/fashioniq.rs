//! FashionIQ (SPEC section 4): `FashionIQ/captions/cap.{type}.{split}.json` triplets
//! (`candidate`, `target`, two `captions`), `FashionIQ/image_splits/split.{type}.{split}.json`
//! (a list of names) and `FashionIQ/images/{name}.png`. Categories are read one by one
//! (validation) or combined (training), in the order given.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::{
    read_json, Dataset, GalleryImage, ImageLocator, LoadOptions, SkipLog, Triplet, TripletText,
};

/// The three categories, in the reference's order.
pub const CATEGORIES: [&str; 3] = ["dress", "shirt", "toptee"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FiqSplit {
    Train,
    Val,
    Test,
}

impl FiqSplit {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Self::Train),
            "val" => Ok(Self::Val),
            "test" => Ok(Self::Test),
            _ => bail!("unknown FashionIQ split '{s}' (train, val, test)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Val => "val",
            Self::Test => "test",
        }
    }
}

#[derive(Deserialize)]
struct Record {
    candidate: String,
    #[serde(default)]
    target: Option<String>,
    captions: Vec<String>,
}

pub fn fiq_dir(data_root: &Path) -> PathBuf {
    data_root.join("FashionIQ")
}

/// The caption file of a category and split (the LLM-augmented one for training with the
/// sampler).
pub fn caption_file(data_root: &Path, category: &str, split: FiqSplit, llm: bool) -> PathBuf {
    let name = if llm && split == FiqSplit::Train {
        format!("cap.{category}.llm.train.json")
    } else {
        format!("cap.{category}.{}.json", split.name())
    };
    fiq_dir(data_root).join("captions").join(name)
}

pub fn split_file(data_root: &Path, category: &str, split: FiqSplit) -> PathBuf {
    fiq_dir(data_root)
        .join("image_splits")
        .join(format!("split.{category}.{}.json", split.name()))
}

/// Reads the given categories of a split, concatenated in that order: triplets and gallery.
pub fn load(
    data_root: &Path,
    categories: &[&str],
    split: FiqSplit,
    opts: LoadOptions,
    log: &SkipLog,
) -> Result<Dataset> {
    if categories.is_empty() {
        bail!("no FashionIQ category given");
    }
    let images = fiq_dir(data_root).join("images");
    let mut ds = Dataset {
        name: format!("FashionIQ {} {}", categories.join("+"), split.name()),
        triplets: Vec::new(),
        gallery: Vec::new(),
        caption_files: Vec::new(),
        locator: ImageLocator::Directory(images.clone()),
    };
    for &category in categories {
        if !CATEGORIES.contains(&category) {
            bail!("unknown FashionIQ category '{category}' (dress, shirt, toptee)");
        }
        let sp = split_file(data_root, category, split);
        let names: Vec<String> = serde_json::from_value(read_json(&sp, "FashionIQ split file")?)
            .with_context(|| {
                format!(
                    "FashionIQ split file {} is not a JSON list of names",
                    sp.display()
                )
            })?;
        ds.gallery
            .extend(names.into_iter().map(|name| GalleryImage {
                path: images.join(format!("{name}.png")),
                name,
            }));

        let llm = opts.llm_sampler && split == FiqSplit::Train;
        let cp = caption_file(data_root, category, split, opts.llm_sampler);
        let value = read_json(&cp, "FashionIQ caption file")?;
        let records = value.as_array().with_context(|| {
            format!(
                "FashionIQ caption file {} is not a JSON list of triplets",
                cp.display()
            )
        })?;
        for (i, rec) in records.iter().enumerate() {
            match parse_record(rec, i, category, split, llm) {
                Ok(t) => ds.triplets.push(t),
                Err(e) => log.skip_or_fail(e.context(format!("{}: record {i}", cp.display())))?,
            }
        }
        ds.caption_files.push(cp);
    }
    Ok(ds)
}

fn parse_record(
    rec: &serde_json::Value,
    index: usize,
    category: &str,
    split: FiqSplit,
    llm: bool,
) -> Result<Triplet> {
    let r = Record::deserialize(rec).context("not a FashionIQ triplet")?;
    let target = match (split, r.target) {
        (FiqSplit::Test, _) => None,
        (_, Some(t)) => Some(t),
        (_, None) => bail!("no target"),
    };
    let text = if llm {
        // captions[0..3] are variants of the first caption, captions[3..] of the second.
        if r.captions.len() < 4 {
            bail!(
                "LLM caption list has {} entries, expected at least 4",
                r.captions.len()
            );
        }
        let (a, b) = r.captions.split_at(3);
        TripletText::FashionIq {
            captions: [a[0].clone(), b[0].clone()],
            variants: Some([a.to_vec(), b.to_vec()]),
        }
    } else {
        match <[String; 2]>::try_from(r.captions) {
            Ok(captions) => TripletText::FashionIq {
                captions,
                variants: None,
            },
            Err(c) => bail!("expected 2 captions, found {}", c.len()),
        }
    };
    Ok(Triplet {
        pair_id: index as i64,
        category: category.to_string(),
        reference: r.candidate,
        target,
        text,
        members: Vec::new(),
    })
}
