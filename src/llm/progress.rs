//! The resumable progress file, `{output}.progress.jsonl`: a header line with the run's
//! settings, then one line per finished caption, appended and fsynced as each one finishes, so a
//! killed run continues where it stopped and never asks again for a finished caption.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::captions::Triplets;

const VERSION: u32 = 1;

/// The settings a progress file belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub slot4acir_llm_progress: u32,
    /// The original caption file's name.
    pub input: String,
    pub triplets: usize,
    pub paraphrases: usize,
    pub model: String,
    pub prompt: String,
}

impl Header {
    pub fn new(
        input: &Path,
        triplets: usize,
        paraphrases: usize,
        model: &str,
        prompt: &str,
    ) -> Self {
        Self {
            slot4acir_llm_progress: VERSION,
            input: input
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            triplets,
            paraphrases,
            model: model.to_string(),
            prompt: prompt.to_string(),
        }
    }
}

/// One finished caption: caption `slot` of triplet `i` and its paraphrases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub i: usize,
    pub slot: usize,
    pub caption: String,
    pub paraphrases: Vec<String>,
}

/// The progress file, open for appending.
pub struct Progress {
    file: File,
    path: PathBuf,
}

/// Where the progress of `output` is kept.
pub fn progress_path(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".progress.jsonl");
    PathBuf::from(name)
}

impl Progress {
    /// Opens or creates the progress file and returns the captions it holds as finished. A torn
    /// last line (the run was killed while writing it) is cut off; anything else that does not
    /// match `header` and `triplets` is an error, never silently redone or reused.
    pub fn open(path: &Path, header: &Header, triplets: &Triplets) -> Result<(Self, Vec<Record>)> {
        let ctx = || format!("progress file {}", path.display());
        let mut records = Vec::new();
        let mut text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(ctx),
        };
        if !text.is_empty() && !text.ends_with('\n') {
            let keep = text.rfind('\n').map_or(0, |at| at + 1);
            tracing::warn!(
                "{}: dropping a torn last line from an interrupted run",
                ctx()
            );
            text.truncate(keep);
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(ctx)?;
            f.set_len(keep as u64).with_context(ctx)?;
            f.sync_all().with_context(ctx)?;
        }
        let mut lines = text.lines().enumerate();
        let fresh = match lines.next() {
            None => true,
            Some((_, first)) => {
                let found: Header = serde_json::from_str(first)
                    .with_context(|| format!("{}: line 1 is not a progress header", ctx()))?;
                check_header(&found, header).with_context(ctx)?;
                false
            }
        };
        for (n, line) in lines {
            let rec: Record = serde_json::from_str(line)
                .with_context(|| format!("{}: line {} is not a progress record", ctx(), n + 1))?;
            let ok = rec.i < triplets.len()
                && rec.slot < triplets.dataset.captions_per_triplet()
                && triplets.captions(rec.i)[rec.slot] == rec.caption
                && rec.paraphrases.len() == header.paraphrases;
            if !ok {
                bail!(
                    "{}: line {} (triplet {}, caption {}) does not match {}; was the caption file \
                     changed? Delete the progress file to start over",
                    ctx(),
                    n + 1,
                    rec.i,
                    rec.slot,
                    triplets.path.display()
                );
            }
            records.push(rec);
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(ctx)?;
        if fresh {
            let line = serde_json::to_string(header)? + "\n";
            file.write_all(line.as_bytes()).with_context(ctx)?;
            file.sync_data().with_context(ctx)?;
        }
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
            },
            records,
        ))
    }

    /// Appends one finished caption and makes it durable before returning.
    pub fn append(&mut self, rec: &Record) -> Result<()> {
        let line = serde_json::to_string(rec)? + "\n";
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("appending to progress file {}", self.path.display()))
    }
}

fn check_header(found: &Header, want: &Header) -> Result<()> {
    if found.slot4acir_llm_progress != want.slot4acir_llm_progress
        || found.input != want.input
        || found.triplets != want.triplets
        || found.paraphrases != want.paraphrases
    {
        bail!(
            "it was made for {} ({} triplets, {} paraphrases), not {} ({} triplets, {} \
             paraphrases); use the same settings or delete it to start over",
            found.input,
            found.triplets,
            found.paraphrases,
            want.input,
            want.triplets,
            want.paraphrases
        );
    }
    if found.model != want.model || found.prompt != want.prompt {
        tracing::warn!(
            "resuming a run made with model `{}` and {} prompt: the file will mix both",
            found.model,
            if found.prompt == want.prompt {
                "the same"
            } else {
                "another"
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::captions::Dataset;

    fn triplets(dir: &Path) -> Triplets {
        let input = dir.join("cap.rc2.train.json");
        std::fs::write(&input, r#"[{"caption": "a b"}, {"caption": "c d"}]"#).unwrap();
        Triplets::read(Dataset::Cirr, &input).unwrap()
    }

    #[test]
    fn resumes_records_and_cuts_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let t = triplets(dir.path());
        let path = dir.path().join("p.jsonl");
        let header = Header::new(&t.path, 2, 1, "m", "prompt");
        let rec = Record {
            i: 1,
            slot: 0,
            caption: "c d".into(),
            paraphrases: vec!["x".into()],
        };
        {
            let (mut p, done) = Progress::open(&path, &header, &t).unwrap();
            assert!(done.is_empty());
            p.append(&rec).unwrap();
        }
        // A kill in the middle of a write leaves a line without its newline.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"i":0,"slot":0,"capt"#).unwrap();
        drop(f);
        let (mut p, done) = Progress::open(&path, &header, &t).unwrap();
        assert_eq!(done, vec![rec.clone()]);
        p.append(&rec).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    }

    #[test]
    fn other_settings_or_changed_captions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = triplets(dir.path());
        let path = dir.path().join("p.jsonl");
        let header = Header::new(&t.path, 2, 1, "m", "prompt");
        let (mut p, _) = Progress::open(&path, &header, &t).unwrap();
        let other = Header {
            paraphrases: 3,
            ..header.clone()
        };
        assert!(Progress::open(&path, &other, &t).is_err());
        p.append(&Record {
            i: 0,
            slot: 0,
            caption: "changed".into(),
            paraphrases: vec!["x".into()],
        })
        .unwrap();
        let e = Progress::open(&path, &header, &t)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
