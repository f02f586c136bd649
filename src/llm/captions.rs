//! The caption files (SPEC section 3 and 4): where the originals are, what the augmented files
//! are called, and their layout. Every field of a triplet is kept (in file order); only
//! the caption field becomes a list of variants with the original first:
//! - CIRR `cap.rc2.llm.{split}.json`: `caption` = [original, paraphrase 1..N];
//! - FashionIQ `cap.{type}.llm.{split}.json`: `captions` = [c1, its N paraphrases, c2, its N
//!   paraphrases]; the training reader draws from `captions[0:3]` and `captions[3:]`, so N = 2.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dataset {
    Cirr,
    #[value(name = "fashioniq")]
    FashionIq,
}

pub const FASHIONIQ_TYPES: [&str; 3] = ["dress", "shirt", "toptee"];

impl Dataset {
    /// The field holding the modification text(s).
    pub fn caption_key(self) -> &'static str {
        match self {
            Dataset::Cirr => "caption",
            Dataset::FashionIq => "captions",
        }
    }

    /// Original captions per triplet.
    pub fn captions_per_triplet(self) -> usize {
        match self {
            Dataset::Cirr => 1,
            Dataset::FashionIq => 2,
        }
    }

    /// The reader's layout fixes FashionIQ at 3 variants (original + 2) of the first caption.
    pub fn check_paraphrases(self, n: usize) -> Result<()> {
        match self {
            _ if n == 0 => bail!("--paraphrases must be at least 1"),
            Dataset::FashionIq if n != 2 => bail!(
                "FashionIQ needs --paraphrases 2: the training reader takes captions[0:3] as the \
                 variants of the first caption and captions[3:] as those of the second"
            ),
            _ => Ok(()),
        }
    }

    /// Folders under `root` that may hold the caption files, most specific first: `root` may be
    /// the caption folder's parent (`data/cirr`), the dataset folder (`CIRR/`) or the base path.
    fn caption_dirs(self, root: &Path) -> Vec<PathBuf> {
        match self {
            Dataset::Cirr => vec![
                root.join("captions"),
                root.join("cirr/captions"),
                root.join("CIRR/cirr/captions"),
            ],
            Dataset::FashionIq => vec![root.join("captions"), root.join("FashionIQ/captions")],
        }
    }
}

/// One original caption file and the augmented file made from it.
#[derive(Debug, Clone)]
pub struct CaptionFile {
    pub input: PathBuf,
    pub output: PathBuf,
}

/// The files to augment for `dataset` under `root` (FashionIQ: one per clothing type).
pub fn caption_files(
    dataset: Dataset,
    root: &Path,
    split: &str,
    types: &[String],
) -> Result<Vec<CaptionFile>> {
    let names: Vec<(String, String)> = match dataset {
        Dataset::Cirr => vec![(
            format!("cap.rc2.{split}.json"),
            format!("cap.rc2.llm.{split}.json"),
        )],
        Dataset::FashionIq => {
            if types.is_empty() {
                bail!("no FashionIQ type given (--types dress,shirt,toptee)");
            }
            for t in types {
                if !FASHIONIQ_TYPES.contains(&t.as_str()) {
                    bail!("unknown FashionIQ type `{t}` (expected one of {FASHIONIQ_TYPES:?})");
                }
            }
            types
                .iter()
                .map(|t| {
                    (
                        format!("cap.{t}.{split}.json"),
                        format!("cap.{t}.llm.{split}.json"),
                    )
                })
                .collect()
        }
    };
    let dirs = dataset.caption_dirs(root);
    names
        .into_iter()
        .map(|(input, output)| {
            let dir = dirs
                .iter()
                .find(|d| d.join(&input).is_file())
                .with_context(|| {
                    let tried: Vec<String> = dirs
                        .iter()
                        .map(|d| d.join(&input).display().to_string())
                        .collect();
                    format!("caption file not found; tried {}", tried.join(", "))
                })?;
            Ok(CaptionFile {
                input: dir.join(input),
                output: dir.join(output),
            })
        })
        .collect()
}

/// A triplet's fields in file order (a `serde_json::Map` would sort them).
pub struct Triplet(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Triplet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Triplet;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a triplet object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Triplet, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    fields.push(entry);
                }
                Ok(Triplet(fields))
            }
        }
        d.deserialize_map(Fields)
    }
}

impl Triplet {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The triplet as one JSON line with `key` set to `value`.
    fn to_json_with(&self, key: &str, value: &Value) -> String {
        let fields: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| {
                let v = if k == key { value } else { v };
                format!("{}:{v}", Value::from(k.as_str()))
            })
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// An original caption file: its triplets and their captions.
pub struct Triplets {
    pub dataset: Dataset,
    pub path: PathBuf,
    items: Vec<Triplet>,
    /// Per triplet, its original caption(s), `captions_per_triplet` of them.
    captions: Vec<Vec<String>>,
}

impl Triplets {
    pub fn read(dataset: Dataset, path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let items: Vec<Triplet> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON list of triplet objects", path.display()))?;
        let key = dataset.caption_key();
        let captions = items
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let raw = t.get(key).cloned().unwrap_or(Value::Null);
                let parsed: Result<Vec<String>, _> = match dataset {
                    Dataset::Cirr => serde_json::from_value::<String>(raw.clone()).map(|c| vec![c]),
                    Dataset::FashionIq => serde_json::from_value::<Vec<String>>(raw.clone()),
                };
                match parsed {
                    Ok(c) if c.len() == dataset.captions_per_triplet() => Ok(c),
                    _ => bail!(
                        "{}: triplet {i}{}: `{key}` must be {}, found {raw}",
                        path.display(),
                        t.get("pairid")
                            .map(|p| format!(" (pairid {p})"))
                            .unwrap_or_default(),
                        match dataset {
                            Dataset::Cirr => "a string",
                            Dataset::FashionIq => "a list of two strings",
                        }
                    ),
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            dataset,
            path: path.to_path_buf(),
            items,
            captions,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Triplet `i`'s original captions.
    pub fn captions(&self, i: usize) -> &[String] {
        &self.captions[i]
    }

    /// Writes the augmented file; `paraphrases[i][slot]` are the paraphrases of caption `slot`
    /// of triplet `i`. Written beside the target and renamed, so a crash leaves no torn file.
    pub fn write_augmented(&self, output: &Path, paraphrases: &[Vec<Vec<String>>]) -> Result<()> {
        let key = self.dataset.caption_key();
        let mut text = String::from("[\n");
        for (i, (triplet, originals)) in self.items.iter().zip(&self.captions).enumerate() {
            let mut variants: Vec<Value> = Vec::new();
            for (original, para) in originals.iter().zip(&paraphrases[i]) {
                variants.push(original.as_str().into());
                variants.extend(para.iter().map(|p| Value::from(p.as_str())));
            }
            text.push_str(&triplet.to_json_with(key, &Value::Array(variants)));
            text.push_str(if i + 1 < self.items.len() {
                ",\n"
            } else {
                "\n"
            });
        }
        text.push_str("]\n");
        let tmp = output.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, output)
        };
        write().with_context(|| format!("writing {}", output.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_order_and_only_the_caption_changes() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("cap.toptee.train.json");
        std::fs::write(
            &input,
            r#"[{"target": "B1", "candidate": "A1", "captions": ["is red", ""], "z": {"b": 1, "a": 2}}]"#,
        )
        .unwrap();
        let t = Triplets::read(Dataset::FashionIq, &input).unwrap();
        assert_eq!(t.captions(0), ["is red".to_string(), String::new()]);
        let out = dir.path().join("out.json");
        let para = vec![vec![
            vec!["red one".into(), "in red".into()],
            vec![String::new(); 2],
        ]];
        t.write_augmented(&out, &para).unwrap();
        let written = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            written,
            "[\n{\"target\":\"B1\",\"candidate\":\"A1\",\"captions\":[\"is red\",\"red one\",\
             \"in red\",\"\",\"\",\"\"],\"z\":{\"a\":2,\"b\":1}}\n]\n"
        );
    }

    #[test]
    fn bad_caption_fields_name_the_file_and_triplet() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("cap.rc2.train.json");
        std::fs::write(
            &input,
            r#"[{"pairid": 1, "caption": "a"}, {"pairid": 7, "caption": 3}]"#,
        )
        .unwrap();
        let e = Triplets::read(Dataset::Cirr, &input)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("cap.rc2.train.json") && e.contains("triplet 1 (pairid 7)"),
            "{e}"
        );
        assert!(Dataset::FashionIq.check_paraphrases(3).is_err());
        assert!(Dataset::Cirr.check_paraphrases(3).is_ok());
    }
}
