//! The training loop on a small two-tower contrastive task: it learns, an interrupted and
//! resumed run equals an uninterrupted one, a NaN stops the run keeping the last checkpoint.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops::log_softmax;
use rand::rngs::StdRng;
use slot4acir::train::gradcache::{BatchContrastive, LossOutput};
use slot4acir::train::optim::{AdamWConfig, ScheduleKind};
use slot4acir::train::trainer::{self, TrainTask, TrainerConfig, Validation};
use slot4acir::weights::{Mode, ParamStore};

struct Toy {
    store: ParamStore,
    wq: Tensor,
    wg: Tensor,
    temp: Tensor,
    x: Tensor,
    y: Tensor,
    poison_at_call: Option<usize>,
    calls: std::cell::Cell<usize>,
}

/// Deterministic pseudo-random values in [-0.5, 0.5).
fn fixed(shape: (usize, usize), seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.gen::<f32>() - 0.5)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

impl Toy {
    /// From fixed initial weights, or from a checkpoint file.
    fn new(weights: Option<&Path>) -> Toy {
        let dev = Device::Cpu;
        let source: HashMap<String, Tensor> = match weights {
            Some(p) => candle_core::safetensors::load(p, &dev).unwrap(),
            None => [
                ("wq".to_string(), fixed((6, 8), 1)),
                ("wg".to_string(), fixed((6, 8), 2)),
                ("temp".to_string(), Tensor::new(0.5f32, &dev).unwrap()),
            ]
            .into(),
        };
        let store = ParamStore::new(source, "toy", Mode::Training, false);
        let vb = store.var_builder(&dev);
        let (wq, wg, temp) = (
            vb.get((6, 8), "wq").unwrap(),
            vb.get((6, 8), "wg").unwrap(),
            vb.get((), "temp").unwrap(),
        );
        store.finish().unwrap();
        // 24 pairs: the target is a fixed rotation of the query input plus a shift.
        let x = fixed((24, 6), 3);
        let y = (x.matmul(&fixed((6, 6), 4)).unwrap() + 0.1).unwrap();
        Toy {
            store,
            wq,
            wg,
            temp,
            x,
            y,
            poison_at_call: None,
            calls: 0.into(),
        }
    }

    fn weights(&self) -> Vec<f32> {
        let sd = self.store.state_dict();
        sd.values()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }
}

impl BatchContrastive for Toy {
    type Chunk = Vec<usize>;
    fn encode(&self, idx: &Vec<usize>, _seed: u64) -> candle_core::Result<Vec<Tensor>> {
        let ids = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            &Device::Cpu,
        )?;
        let q = self.x.index_select(&ids, 0)?.matmul(&self.wq)?;
        let g = self.y.index_select(&ids, 0)?.matmul(&self.wg)?;
        let norm = |t: Tensor| t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?);
        Ok(vec![norm(q)?, norm(g)?])
    }
    fn loss(&self, reps: &[Tensor]) -> candle_core::Result<LossOutput> {
        self.calls.set(self.calls.get() + 1);
        let logits = reps[0].matmul(&reps[1].t()?)?.broadcast_div(&self.temp)?;
        let n = logits.dim(0)?;
        let diag =
            log_softmax(&logits, D::Minus1)?.mul(&Tensor::eye(n, DType::F32, &Device::Cpu)?)?;
        let mut itc = (diag.sum_all()? * (-1.0 / n as f64))?;
        if self.poison_at_call == Some(self.calls.get()) {
            itc = (itc * f64::NAN)?;
        }
        Ok(LossOutput {
            total: itc.clone(),
            parts: vec![("itc", itc)],
        })
    }
}

impl TrainTask for Toy {
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn len(&self) -> usize {
        24
    }
    fn chunk(&self, indices: &[usize], _rng: &mut StdRng) -> Result<Vec<usize>> {
        Ok(indices.to_vec())
    }
    fn validate(&self) -> Result<Validation> {
        let all: Vec<usize> = (0..24).collect();
        let reps = self.encode(&all, 0)?;
        let sims = reps[0].matmul(&reps[1].t()?)?.to_vec2::<f32>()?;
        let hits = sims
            .iter()
            .enumerate()
            .filter(|(i, row)| row.iter().all(|&s| s <= row[*i]))
            .count();
        let r1 = 100.0 * hits as f64 / 24.0;
        Ok(Validation {
            metrics: vec![("recall_at1".into(), r1)],
            primary: "recall_at1".into(),
        })
    }
}

fn config(dir: &Path, micro: Option<usize>) -> TrainerConfig {
    TrainerConfig {
        run_dir: dir.to_path_buf(),
        num_epochs: 30,
        batch_size: 8,
        micro_batch: micro,
        learning_rate: 1e-2,
        schedule: ScheduleKind::Cirr,
        adamw: AdamWConfig::default(),
        validation_frequency: 10,
        save_training: true,
        save_best: true,
        seed: 7,
        stop_after_epochs: None,
        progress: false,
    }
}

#[test]
fn learns_and_writes_the_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let toy = Toy::new(None);
    let before = toy.validate().unwrap().metrics[0].1;
    let s = trainer::train(&toy, &config(dir.path(), Some(3)), false).unwrap();
    let loss = s
        .last_epoch_losses
        .iter()
        .find(|(k, _)| k == "itc")
        .unwrap()
        .1;
    let after = s.last_validation.unwrap().metrics[0].1;
    println!("toy: R@1 {before} -> {after}, final itc {loss}");
    assert!(after > before && after >= 90.0, "R@1 {before} -> {after}");
    assert_eq!(s.state.step, 90);
    for f in [
        trainer::BEST_CHECKPOINT,
        trainer::LAST_CHECKPOINT,
        trainer::TRAINING_STATE,
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    let train_csv = std::fs::read_to_string(dir.path().join(trainer::TRAIN_CSV)).unwrap();
    assert_eq!(train_csv.lines().count(), 31, "{train_csv}");
    assert!(
        train_csv.starts_with("epoch,step,loss_total,loss_itc,lr,"),
        "{train_csv}"
    );
    let val_csv = std::fs::read_to_string(dir.path().join(trainer::VALIDATION_CSV)).unwrap();
    assert_eq!(val_csv.lines().count(), 4, "{val_csv}");
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = Toy::new(None);
    trainer::train(&full, &config(d1.path(), Some(3)), false).unwrap();

    let mut cfg = config(d2.path(), Some(3));
    cfg.stop_after_epochs = Some(13);
    let first = Toy::new(None);
    let s = trainer::train(&first, &cfg, false).unwrap();
    assert_eq!(s.state.epochs_done, 13);
    assert_ne!(first.weights(), full.weights());
    // A fresh process: the model from the last checkpoint, the rest from the state file.
    let resumed = Toy::new(Some(&d2.path().join(trainer::LAST_CHECKPOINT)));
    cfg.stop_after_epochs = None;
    let s = trainer::train(&resumed, &cfg, true).unwrap();
    assert_eq!(s.state.epochs_done, 30);
    assert_eq!(resumed.weights(), full.weights(), "resumed weights differ");
    // Both runs logged the same losses.
    let a = std::fs::read_to_string(d1.path().join(trainer::TRAIN_CSV)).unwrap();
    let b = std::fs::read_to_string(d2.path().join(trainer::TRAIN_CSV)).unwrap();
    let strip = |s: &str| {
        s.lines()
            .map(|l| l.rsplitn(3, ',').nth(2).unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&a), strip(&b));
}

#[test]
fn nan_loss_stops_and_keeps_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut toy = Toy::new(None);
    // 3 steps per epoch, one loss call per step without accumulation: epoch 2, step 7.
    toy.poison_at_call = Some(8);
    let err = trainer::train(&toy, &config(dir.path(), None), false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("NaN") && msg.contains("epoch 2") && msg.contains(trainer::LAST_CHECKPOINT),
        "{msg}"
    );
    let last = dir.path().join(trainer::LAST_CHECKPOINT);
    assert_eq!(
        slot4acir::train::checkpoint::checkpoint_epoch(&last).unwrap(),
        1
    );
    // Resuming from it continues (the data is fine this time).
    let resumed = Toy::new(Some(&last));
    let s = trainer::train(&resumed, &config(dir.path(), None), true).unwrap();
    assert_eq!(s.state.epochs_done, 30);
}
