//! Training the real model on a tiny configuration (the parity-b0 fixture's dimensions, random
//! weights, a small stand-in light encoder): exact accumulation, the model can learn, an
//! interrupted and resumed run equals an uninterrupted one, checkpoints read back exactly.

mod common;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use slot4acir::config::ModelConfig;
use slot4acir::model::backbone::LightEncoder;
use slot4acir::model::layers::{Conv2d, Padding};
use slot4acir::model::{LightInput, LossWeights, Slot4ACir, TrainBatch, VitInput};
use slot4acir::train::checkpoint::save_weights;
use slot4acir::train::gradcache::{batch_grads, BatchContrastive, LossOutput};
use slot4acir::train::objective::ModelObjective;
use slot4acir::train::optim::{AdamWConfig, ScheduleKind};
use slot4acir::train::trainer::{self, TrainTask, TrainerConfig, Validation};
use slot4acir::weights::{Mode, ParamStore};

/// A trainable stand-in for a light backbone: 4×4 average pooling, then a 1×1 convolution to
/// 16 channels: (B,3,28,28) → (B,16,7,7) (small references keep the steps fast).
struct TinyEncoder(Conv2d);

impl LightEncoder for TinyEncoder {
    fn extract_features(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        self.0.forward(&x.avg_pool2d(4)?)
    }
    fn out_channels(&self) -> usize {
        16
    }
    fn is_fused(&self) -> bool {
        false
    }
}

fn tiny_config() -> ModelConfig {
    let meta = common::fixture_dir("parity-b0").join("meta.json");
    let mut cfg = ModelConfig::load(meta.to_str().unwrap()).unwrap();
    // Token ids below 8192 only: a smaller embedding table keeps the steps fast.
    cfg.vocab_size = 8192;
    cfg
}

fn build(source: HashMap<String, Tensor>, mode: Mode) -> (Slot4ACir, ParamStore) {
    let store = ParamStore::new(source, "test weights", mode, false);
    let vb: VarBuilder = store.var_builder(&Device::Cpu);
    let enc = Conv2d::new(
        vb.pp("light_visual_encoder.conv"),
        3,
        16,
        1,
        1,
        Padding::Symmetric(0),
        1,
        true,
    )
    .unwrap();
    let model =
        Slot4ACir::with_light_encoder(&tiny_config(), vb, Box::new(TinyEncoder(enc))).unwrap();
    store.finish().unwrap();
    (model, store)
}

/// Fixed random initial weights (the same for every model of a test).
fn initial_weights() -> HashMap<String, Tensor> {
    let store = ParamStore::random(Mode::Inference);
    let vb = store.var_builder(&Device::Cpu);
    let enc = Conv2d::new(
        vb.pp("light_visual_encoder.conv"),
        3,
        16,
        1,
        1,
        Padding::Symmetric(0),
        1,
        true,
    )
    .unwrap();
    Slot4ACir::with_light_encoder(&tiny_config(), vb, Box::new(TinyEncoder(enc))).unwrap();
    // BERT's std-0.02 linears make a tiny random Q-Former's outputs nearly independent of its
    // input (scores equal to 3 digits, gradients ~1e-5): scale the matrices up so the model
    // starts where its input matters and the gradients are well above float32 noise.
    store
        .state_dict()
        .into_iter()
        .map(|(k, t)| {
            let t = if k.starts_with("Qformer.") && k.ends_with(".weight") && t.rank() == 2 {
                (t * LINEAR_SCALE).unwrap()
            } else {
                t.copy().unwrap()
            };
            (k, t)
        })
        .collect()
}

const LINEAR_SCALE: f64 = 5.0;

/// Eight triplets in memory: pixels, cached ViT features of the targets, token ids.
struct Triplets {
    reference: Tensor,
    reference_vit: Tensor,
    target_vit: Tensor,
    ids: Tensor,
    mask: Tensor,
}

fn triplets(model: &Slot4ACir, n: usize) -> Triplets {
    let dev = Device::Cpu;
    // Smooth images with distinct global structure (iid noise would look alike after pooling):
    // each channel a random plane a·x + b·y + c.
    let mut rng = StdRng::seed_from_u64(5);
    let mut pixels = |n: usize, side: usize| {
        let mut v = Vec::with_capacity(n * 3 * side * side);
        for _ in 0..n * 3 {
            let (a, b, c): (f32, f32, f32) = (
                rng.gen_range(-1.0..1.0),
                rng.gen_range(-1.0..1.0),
                rng.gen_range(-1.0..1.0),
            );
            let half = side as f32 / 2.0;
            for y in 0..side {
                for x in 0..side {
                    v.push(a * (x as f32 / half - 1.0) + b * (y as f32 / half - 1.0) + c);
                }
            }
        }
        Tensor::from_vec(v, (n, 3, side, side), &dev).unwrap()
    };
    let reference = pixels(n, 224);
    let target = pixels(n, 224);
    // The light encoder sees the references at 28×28 (the ViT needs its 224).
    let reference_small = reference.avg_pool2d(8).unwrap();
    let mut rng = StdRng::seed_from_u64(6);
    let mut ids = vec![0u32; n * 32];
    let mut mask = vec![0u32; n * 32];
    for i in 0..n {
        let len = 4 + i % 5;
        ids[i * 32] = 101;
        for j in 1..len - 1 {
            ids[i * 32 + j] = rng.gen_range(2000..8000);
        }
        ids[i * 32 + len - 1] = 102;
        mask[i * 32..i * 32 + len].iter_mut().for_each(|m| *m = 1);
    }
    Triplets {
        reference_vit: model.vit_features(&reference).unwrap(),
        target_vit: model.vit_features(&target).unwrap(),
        reference: reference_small,
        ids: Tensor::from_vec(ids, (n, 32), &dev)
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap(),
        mask: Tensor::from_vec(mask, (n, 32), &dev)
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap(),
    }
}

impl Triplets {
    fn batch(&self, idx: &[usize]) -> TrainBatch {
        let ids = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            &Device::Cpu,
        )
        .unwrap();
        let sel = |t: &Tensor| t.index_select(&ids, 0).unwrap();
        TrainBatch {
            reference: LightInput::Pixels(sel(&self.reference)),
            reference_vit: VitInput::Features(sel(&self.reference_vit)),
            target_vit: VitInput::Features(sel(&self.target_vit)),
            input_ids: sel(&self.ids),
            attention_mask: sel(&self.mask),
        }
    }
}

struct Task {
    model: Slot4ACir,
    store: ParamStore,
    data: Triplets,
    weights: LossWeights,
}

impl Task {
    fn new(source: HashMap<String, Tensor>, weights: LossWeights) -> Task {
        let (model, store) = build(source, Mode::Training);
        let data = triplets(&model, 8);
        Task {
            model,
            store,
            data,
            weights,
        }
    }
    fn objective(&self, train: bool) -> ModelObjective<'_> {
        ModelObjective {
            model: &self.model,
            weights: self.weights,
            train,
        }
    }
    fn weights_vec(&self) -> Vec<(String, Vec<f32>)> {
        self.store
            .state_dict()
            .into_iter()
            .map(|(k, t)| {
                (
                    k,
                    t.flatten_all()
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
            })
            .collect()
    }
}

impl BatchContrastive for Task {
    type Chunk = TrainBatch;
    fn encode(&self, chunk: &TrainBatch, seed: u64) -> candle_core::Result<Vec<Tensor>> {
        self.objective(true).encode(chunk, seed)
    }
    fn loss(&self, reps: &[Tensor]) -> candle_core::Result<LossOutput> {
        self.objective(true).loss(reps)
    }
}

impl TrainTask for Task {
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn len(&self) -> usize {
        8
    }
    fn chunk(&self, indices: &[usize], _rng: &mut StdRng) -> Result<TrainBatch> {
        Ok(self.data.batch(indices))
    }
    fn validate(&self) -> Result<Validation> {
        let all: Vec<usize> = (0..8).collect();
        let b = self.data.batch(&all);
        let VitInput::Features(f) = &b.target_vit else {
            unreachable!()
        };
        let gallery = self
            .model
            .gallery_feats_from_embeds(&self.model.ln_vision.forward(f)?)?;
        let LightInput::Pixels(p) = &b.reference else {
            unreachable!()
        };
        let tokens = self.model.light_tokens(p, false)?;
        let q = self
            .model
            .query_feats(&tokens, &b.input_ids, &b.attention_mask, false)?;
        let sims = Slot4ACir::scores(&q, &gallery)?.to_vec2::<f32>()?;
        let hits = sims
            .iter()
            .enumerate()
            .filter(|(i, r)| r.iter().all(|&s| s <= r[*i]))
            .count();
        Ok(Validation {
            metrics: vec![("r1".into(), 100.0 * hits as f64 / 8.0)],
            primary: "r1".into(),
        })
    }
}

fn grads_rel_diff(
    a: &slot4acir::train::gradcache::ParamGrads,
    b: &slot4acir::train::gradcache::ParamGrads,
    vars: &[(String, candle_core::Var)],
) -> f64 {
    let sq = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let pairs: Vec<(&String, &Tensor, &Tensor, f64)> = vars
        .iter()
        .map(|(name, v)| {
            let x = a.get(v).unwrap_or_else(|| panic!("{name}: no gradient"));
            (name, x, b.get(v).unwrap(), sq(x))
        })
        .collect();
    // Parameters whose exact gradient is zero (attention key biases: softmax ignores a shift)
    // hold float32 round-off only; relative errors of those mean nothing.
    let largest = pairs.iter().map(|p| p.3).fold(0.0, f64::max);
    pairs
        .iter()
        .filter(|p| p.3 > 1e-12 * largest)
        .map(|(_, x, y, _)| common::rel_err(y, x))
        .fold(0.0, f64::max)
}

#[test]
fn accumulated_step_equals_full_batch_step_on_the_model() {
    let task = Task::new(initial_weights(), LossWeights::cirr());
    let vars = task.store.trainable_vars();
    let obj = task.objective(false);
    let all: Vec<usize> = (0..8).collect();
    let (l_full, g_full) =
        batch_grads(&obj, &[task.data.batch(&all)], &[1], &vars, &task.store).unwrap();
    let chunks = vec![
        task.data.batch(&[0, 1, 2]),
        task.data.batch(&[3, 4, 5]),
        task.data.batch(&[6, 7]),
    ];
    let (l_acc, g_acc) = batch_grads(&obj, &chunks, &[1, 2, 3], &vars, &task.store).unwrap();
    for ((n, a), (_, b)) in l_full.iter().zip(&l_acc) {
        assert!((a - b).abs() < 1e-5, "loss {n}: {a} vs {b}");
    }
    assert_eq!(g_full.len(), g_acc.len());
    let worst = grads_rel_diff(&g_full, &g_acc, &vars);
    println!("accumulated vs full batch: losses {l_full:?}, worst gradient relative difference {worst:.2e}");
    assert!(worst < 1e-4, "{worst}");
}

#[test]
fn training_forward_replays_exactly_from_its_seed() {
    let task = Task::new(initial_weights(), LossWeights::cirr());
    let vars = task.store.trainable_vars();
    let obj = task.objective(true);
    let chunks = vec![
        task.data.batch(&[0, 1, 2, 3]),
        task.data.batch(&[4, 5, 6, 7]),
    ];
    let (l1, g1) = batch_grads(&obj, &chunks, &[10, 11], &vars, &task.store).unwrap();
    let (l2, g2) = batch_grads(&obj, &chunks, &[10, 11], &vars, &task.store).unwrap();
    let (l3, _) = batch_grads(&obj, &chunks, &[12, 13], &vars, &task.store).unwrap();
    assert_eq!(l1, l2);
    assert_eq!(grads_rel_diff(&g1, &g2, &vars), 0.0);
    // Dropout is on: other seeds give another loss.
    assert_ne!(l1[0].1, l3[0].1);
}

fn config(dir: &Path, epochs: usize, batch: usize, micro: Option<usize>, lr: f64) -> TrainerConfig {
    TrainerConfig {
        run_dir: dir.to_path_buf(),
        num_epochs: epochs,
        batch_size: batch,
        micro_batch: micro,
        learning_rate: lr,
        schedule: ScheduleKind::Cirr,
        adamw: AdamWConfig::default(),
        validation_frequency: epochs,
        save_training: true,
        save_best: false,
        seed: 3,
        stop_after_epochs: None,
        progress: false,
    }
}

#[test]
fn itc_goes_near_zero_on_eight_triplets() {
    let dir = tempfile::tempdir().unwrap();
    let task = Task::new(initial_weights(), LossWeights::itc_only());
    let before = task.validate().unwrap().metrics[0].1;
    let s = trainer::train(&task, &config(dir.path(), 400, 8, None, 3e-3), false).unwrap();
    let itc = s
        .last_epoch_losses
        .iter()
        .find(|(k, _)| k == "itc")
        .unwrap()
        .1;
    let after = s.last_validation.unwrap().metrics[0].1;
    let first: f64 = std::fs::read_to_string(dir.path().join(trainer::TRAIN_CSV))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    println!("400 steps on 8 triplets: itc {first:.4} -> {itc:.5}, R@1 {before} -> {after}, {:.1} triplets/s", s.triplets_per_second);
    assert!(itc < 0.1, "itc {first} -> {itc}");
    assert_eq!(after, 100.0);
}

#[test]
fn resumed_run_equals_uninterrupted_run_on_the_model() {
    let init = initial_weights();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = Task::new(init.clone(), LossWeights::cirr());
    trainer::train(&full, &config(d1.path(), 4, 4, Some(2), 1e-3), false).unwrap();

    let mut cfg = config(d2.path(), 4, 4, Some(2), 1e-3);
    cfg.stop_after_epochs = Some(2);
    let first = Task::new(init, LossWeights::cirr());
    trainer::train(&first, &cfg, false).unwrap();
    assert_ne!(first.weights_vec(), full.weights_vec());
    let ckpt =
        candle_core::safetensors::load(d2.path().join(trainer::LAST_CHECKPOINT), &Device::Cpu)
            .unwrap();
    let resumed = Task::new(ckpt, LossWeights::cirr());
    cfg.stop_after_epochs = None;
    let s = trainer::train(&resumed, &cfg, true).unwrap();
    assert_eq!(s.state.epochs_done, 4);
    assert_eq!(s.state.step, 8);
    // Bit-identical: trainable weights and the BatchNorm-free stand-in's buffers alike.
    let (a, b) = (full.weights_vec(), resumed.weights_vec());
    assert_eq!(a.len(), b.len());
    for ((k, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x, y, "{k} differs after resume");
    }
}

#[test]
fn checkpoint_read_back_gives_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let task = Task::new(initial_weights(), LossWeights::itc_only());
    trainer::train(&task, &config(dir.path(), 3, 8, None, 1e-3), false).unwrap();
    let path = dir.path().join("model.safetensors");
    save_weights(&path, &task.store.state_dict(), 2).unwrap();
    let (loaded, _) = build(
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap(),
        Mode::Inference,
    );
    let all: Vec<usize> = (0..8).collect();
    let b = task.data.batch(&all);
    let LightInput::Pixels(p) = &b.reference else {
        unreachable!()
    };
    let VitInput::Features(f) = &b.target_vit else {
        unreachable!()
    };
    let out = |m: &Slot4ACir| -> (Vec<f32>, Vec<f32>) {
        let t = m.light_tokens(p, false).unwrap();
        let q = m
            .query_feats(&t, &b.input_ids, &b.attention_mask, false)
            .unwrap();
        let g = m
            .gallery_feats_from_embeds(&m.ln_vision.forward(f).unwrap())
            .unwrap();
        (
            q.flatten_all().unwrap().to_vec1().unwrap(),
            g.flatten_all().unwrap().to_vec1().unwrap(),
        )
    };
    assert_eq!(out(&task.model), out(&loaded));
}
