//! The run over one caption file: resume from the progress file, ask for every unfinished
//! caption with bounded concurrency, record each answer durably, then write the augmented file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::ask::{ask_paraphrases, Asked, Outcome};
use super::captions::{caption_files, CaptionFile, Dataset, Triplets};
use super::client::{ChatClient, ClientOptions, RetryPolicy};
use super::progress::{progress_path, Header, Progress, Record};
use super::prompt::PromptTemplate;

/// Everything `slot4acir llm-augment` needs.
#[derive(Debug, Clone)]
pub struct AugmentOptions {
    pub dataset: Dataset,
    pub data_root: PathBuf,
    pub split: String,
    /// FashionIQ clothing types (ignored for CIRR).
    pub types: Vec<String>,
    /// Paraphrases per original caption.
    pub paraphrases: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Write the file even when captions failed, with the original in their place.
    pub allow_failed: bool,
    pub client: ClientOptions,
    pub retry: RetryPolicy,
    pub template: PromptTemplate,
}

/// What happened to one caption file.
#[derive(Debug, Clone, Default)]
pub struct FileReport {
    pub output: PathBuf,
    pub triplets: usize,
    /// Non-blank original captions, each paraphrased once.
    pub captions: usize,
    /// Blank captions, kept as they are (nothing to paraphrase).
    pub blank: usize,
    /// Finished by an earlier, interrupted run.
    pub resumed: usize,
    /// Finished by this run.
    pub done: usize,
    /// Captions that needed more than one request.
    pub retried: usize,
    pub failed: usize,
    pub requests: u64,
    pub retries: u64,
    pub reasks: u64,
    /// The first failure reasons, for the report.
    pub failures: Vec<String>,
    pub written: bool,
}

impl fmt::Display for FileReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "{}:", self.output.display())?;
        writeln!(
            f,
            "  {} triplets, {} captions: {} done now, {} done before, {} retried, {} failed, {} \
             blank kept",
            self.triplets,
            self.captions,
            self.done,
            self.resumed,
            self.retried,
            self.failed,
            self.blank
        )?;
        write!(
            f,
            "  {} requests ({} retries after faults, {} re-asks after unusable answers); {}",
            self.requests,
            self.retries,
            self.reasks,
            if self.written {
                "file written"
            } else {
                "file NOT written"
            }
        )?;
        for reason in &self.failures {
            write!(f, "\n  failed: {reason}")?;
        }
        Ok(())
    }
}

/// The caption files of a run and the client that serves them.
pub struct Augmenter {
    opts: AugmentOptions,
    client: ChatClient,
}

impl Augmenter {
    pub fn new(opts: AugmentOptions) -> Result<Self> {
        opts.dataset.check_paraphrases(opts.paraphrases)?;
        if opts.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        let client = ChatClient::new(opts.client.clone());
        Ok(Self { opts, client })
    }

    pub fn files(&self) -> Result<Vec<CaptionFile>> {
        let o = &self.opts;
        caption_files(o.dataset, &o.data_root, &o.split, &o.types)
    }

    pub fn endpoint(&self) -> &str {
        self.client.url()
    }

    /// Augments one file. Errors on a setup fault (the endpoint refuses the key, unknown URL or
    /// model) or an I/O fault; failed captions are counted in the report instead, and the file
    /// is then written only with `allow_failed`. Finished captions stay in the progress file.
    pub fn augment_file(&self, file: &CaptionFile) -> Result<FileReport> {
        let o = &self.opts;
        let n = o.paraphrases;
        let triplets = Triplets::read(o.dataset, &file.input)?;
        let header = Header::new(
            &file.input,
            triplets.len(),
            n,
            &o.client.model,
            &o.template.identity(),
        );
        let (mut progress, finished) =
            Progress::open(&progress_path(&file.output), &header, &triplets)?;

        let per = o.dataset.captions_per_triplet();
        let mut result: Vec<Vec<Option<Vec<String>>>> = vec![vec![None; per]; triplets.len()];
        let mut report = FileReport {
            output: file.output.clone(),
            triplets: triplets.len(),
            ..Default::default()
        };
        for rec in finished {
            if result[rec.i][rec.slot].replace(rec.paraphrases).is_none() {
                report.resumed += 1;
            }
        }
        let mut pending: Vec<(usize, usize)> = Vec::new();
        for (i, slots) in result.iter_mut().enumerate() {
            for (slot, done) in slots.iter_mut().enumerate() {
                let caption = &triplets.captions(i)[slot];
                if caption.trim().is_empty() {
                    report.blank += 1;
                    *done = Some(vec![caption.clone(); n]);
                } else {
                    report.captions += 1;
                    if done.is_none() {
                        pending.push((i, slot));
                    }
                }
            }
        }

        let bar = progress_bar(pending.len(), &file.output);
        let stop = AtomicBool::new(false);
        let next = AtomicUsize::new(0);
        let mut fatal: Option<anyhow::Error> = None;
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<(usize, usize, Asked)>();
            for _ in 0..o.concurrency.min(pending.len()) {
                let (tx, next, stop, pending, triplets) =
                    (tx.clone(), &next, &stop, &pending, &triplets);
                s.spawn(move || loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, slot)) = pending.get(k) else {
                        break;
                    };
                    let caption = &triplets.captions(i)[slot];
                    let asked =
                        ask_paraphrases(&self.client, &o.template, &o.retry, caption, n, stop);
                    // Stop the other workers at once, not when the writer gets to this answer:
                    // otherwise they keep asking a server that refuses the whole run.
                    if matches!(asked.outcome, Outcome::Fatal(_)) {
                        stop.store(true, Ordering::SeqCst);
                    }
                    if tx.send((i, slot, asked)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            // This thread alone writes the progress file, in the order answers arrive.
            for (i, slot, asked) in rx {
                report.requests += u64::from(asked.requests);
                report.retries += u64::from(asked.retries);
                report.reasks += u64::from(asked.reasks);
                if asked.requests > 1 {
                    report.retried += 1;
                }
                match asked.outcome {
                    Outcome::Done(paraphrases) => {
                        let caption = triplets.captions(i)[slot].clone();
                        let rec = Record {
                            i,
                            slot,
                            caption,
                            paraphrases,
                        };
                        if let Err(e) = progress.append(&rec) {
                            stop.store(true, Ordering::Relaxed);
                            fatal.get_or_insert(e);
                        }
                        result[i][slot] = Some(rec.paraphrases);
                        report.done += 1;
                    }
                    Outcome::Failed(reason) => {
                        let caption = &triplets.captions(i)[slot];
                        let line = format!("triplet {i} caption {slot} {caption:?}: {reason}");
                        bar.suspend(|| tracing::warn!("{line}"));
                        if report.failures.len() < 5 {
                            report.failures.push(line);
                        }
                        report.failed += 1;
                    }
                    Outcome::Fatal(reason) => {
                        stop.store(true, Ordering::Relaxed);
                        fatal.get_or_insert_with(|| anyhow::anyhow!(reason));
                    }
                    Outcome::Stopped => {}
                }
                bar.inc(1);
                bar.set_message(format!(
                    "retried {} failed {}",
                    report.retried, report.failed
                ));
            }
        });
        bar.finish_and_clear();
        if let Some(e) = fatal {
            return Err(e.context(format!(
                "stopped augmenting {} (finished captions are kept in the progress file)",
                file.input.display()
            )));
        }

        if report.failed == 0 || o.allow_failed {
            let paraphrases: Vec<Vec<Vec<String>>> = result
                .into_iter()
                .enumerate()
                .map(|(i, slots)| {
                    let originals = triplets.captions(i);
                    let fill = |(slot, p): (usize, Option<Vec<String>>)| {
                        p.unwrap_or_else(|| vec![originals[slot].clone(); n])
                    };
                    slots.into_iter().enumerate().map(fill).collect()
                })
                .collect();
            triplets.write_augmented(&file.output, &paraphrases)?;
            report.written = true;
        }
        Ok(report)
    }
}

fn progress_bar(len: usize, output: &Path) -> ProgressBar {
    let name = output
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let style = ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta} {msg}",
    )
    .expect("a valid progress template");
    ProgressBar::new(len as u64)
        .with_style(style)
        .with_prefix(name)
}
