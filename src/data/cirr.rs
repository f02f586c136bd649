//! CIRR (SPEC section 4): `CIRR/cirr/captions/cap.rc2.{split}.json` triplets and
//! `CIRR/cirr/image_splits/split.rc2.{split}.json` (name → path relative to `CIRR/`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::{
    ordered_string_map, read_json, Dataset, GalleryImage, ImageLocator, LoadOptions, SkipLog,
    Triplet, TripletText,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CirrSplit {
    Train,
    Val,
    Test1,
}

impl CirrSplit {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Self::Train),
            "val" => Ok(Self::Val),
            "test1" => Ok(Self::Test1),
            _ => bail!("unknown CIRR split '{s}' (train, val, test1)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Val => "val",
            Self::Test1 => "test1",
        }
    }
}

/// `caption` is a string, or in the LLM-augmented file a list of paraphrases.
#[derive(Deserialize)]
#[serde(untagged)]
enum CaptionField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ImgSet {
    members: Vec<String>,
}

#[derive(Deserialize)]
struct Record {
    pairid: i64,
    reference: String,
    #[serde(default)]
    target_hard: Option<String>,
    caption: CaptionField,
    #[serde(default)]
    img_set: Option<ImgSet>,
}

/// `CIRR/` under the data root.
pub fn cirr_dir(data_root: &Path) -> PathBuf {
    data_root.join("CIRR")
}

/// The caption file of a split (the LLM-augmented one for training with the sampler).
pub fn caption_file(data_root: &Path, split: CirrSplit, llm_sampler: bool) -> PathBuf {
    let name = if llm_sampler && split == CirrSplit::Train {
        "cap.rc2.llm.train.json".to_string()
    } else {
        format!("cap.rc2.{}.json", split.name())
    };
    cirr_dir(data_root).join("cirr/captions").join(name)
}

pub fn split_file(data_root: &Path, split: CirrSplit) -> PathBuf {
    cirr_dir(data_root)
        .join("cirr/image_splits")
        .join(format!("split.rc2.{}.json", split.name()))
}

/// Reads a CIRR split: its triplets and its gallery (every image of the split map, in order).
/// Every triplet's reference and target must be in the split map; `log` decides whether a bad
/// record or a missing name is an error or a counted skip.
pub fn load(
    data_root: &Path,
    split: CirrSplit,
    opts: LoadOptions,
    log: &SkipLog,
) -> Result<Dataset> {
    let split_path = split_file(data_root, split);
    let entries = ordered_string_map(&split_path, "CIRR split map")?;
    let base = cirr_dir(data_root);
    let gallery: Vec<GalleryImage> = entries
        .into_iter()
        .map(|(name, rel)| GalleryImage {
            path: base.join(rel),
            name,
        })
        .collect();
    let locator = ImageLocator::SplitMap {
        paths: gallery
            .iter()
            .map(|g| (g.name.clone(), g.path.clone()))
            .collect(),
        split_file: split_path.clone(),
    };

    let cap_path = caption_file(data_root, split, opts.llm_sampler);
    let value = read_json(&cap_path, "CIRR caption file")?;
    let records = value.as_array().with_context(|| {
        format!(
            "CIRR caption file {} is not a JSON list of triplets",
            cap_path.display()
        )
    })?;
    let mut dataset = Dataset {
        name: format!("CIRR {}", split.name()),
        triplets: Vec::with_capacity(records.len()),
        gallery,
        caption_files: vec![cap_path.clone()],
        locator,
    };
    for (i, rec) in records.iter().enumerate() {
        match parse_record(rec, split, &dataset) {
            Ok(t) => dataset.triplets.push(t),
            Err(e) => {
                let pairid = rec
                    .get("pairid")
                    .map(|p| p.to_string())
                    .unwrap_or("?".into());
                log.skip_or_fail(e.context(format!(
                    "{}: record {i} (pairid {pairid})",
                    cap_path.display()
                )))?
            }
        }
    }
    Ok(dataset)
}

fn parse_record(rec: &serde_json::Value, split: CirrSplit, ds: &Dataset) -> Result<Triplet> {
    let r = Record::deserialize(rec).context("not a CIRR triplet")?;
    let text = match r.caption {
        CaptionField::One(c) => TripletText::Cirr {
            caption: c,
            paraphrases: Vec::new(),
        },
        CaptionField::Many(list) => {
            let first = list.first().context("empty caption list")?.clone();
            TripletText::Cirr {
                caption: first,
                paraphrases: list,
            }
        }
    };
    let target = match (split, r.target_hard) {
        (CirrSplit::Test1, _) => None,
        (_, Some(t)) => Some(t),
        (_, None) => bail!("no target_hard"),
    };
    let members = r.img_set.map(|s| s.members).unwrap_or_default();
    if split != CirrSplit::Train && members.is_empty() {
        bail!("no img_set.members");
    }
    let t = Triplet {
        pair_id: r.pairid,
        category: String::new(),
        reference: r.reference,
        target,
        text,
        members,
    };
    ds.image_path(&t.reference)?;
    if let Some(g) = &t.target {
        ds.image_path(g)?;
    }
    Ok(t)
}
