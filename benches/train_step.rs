//! One training step of the paper configuration (ViT-g, BERT-base Q-Former, EfficientNet-B0,
//! 8 slots) on random weights with the frozen ViT's outputs given (what the feature cache
//! provides), split into its parts: forward, backward, optimizer. `cargo bench --bench
//! train_step [-- BATCH STEPS]`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use slot4acir::config::ModelConfig;
use slot4acir::model::{LightInput, LossWeights, Slot4ACir, TrainBatch, VitInput};
use slot4acir::text::Tokenizer;
use slot4acir::train::gradcache::ParamGrads;
use slot4acir::train::optim::{AdamW, AdamWConfig};
use slot4acir::weights::{Mode, ParamStore};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    slot4acir::cli::tune_allocator();
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let batch: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    // The ViT's outputs are given, so its ~1B parameters are left out (same step otherwise).
    let cfg = ModelConfig {
        vit_depth: 0,
        ..ModelConfig::paper()
    };
    let dev = Device::Cpu;
    let store = ParamStore::random(Mode::Training);
    let model = Slot4ACir::new(&cfg, store.var_builder(&dev))?;
    let vars = store.trainable_vars();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let tok = Tokenizer::bert_uncased()?;
    let texts: Vec<String> = (0..batch)
        .map(|i| format!("make the shirt striped and add a collar {i}"))
        .collect();
    let (ids, mask) = tok.encode_batch_longest(&texts, cfg.max_txt_len)?;
    let s = cfg.img_size;
    let px = Tensor::randn(0f32, 1.0, (batch, 3, s, s), &dev)?;
    let (t, w) = (257, cfg.vit_width);
    let feats = || Tensor::randn(0f32, 1.0, (batch, t, w), &dev);
    let (rf, tf) = (feats()?, feats()?);
    println!("batch {batch}, text length {}", ids.dim(1)?);
    for step in 0..steps {
        let t0 = Instant::now();
        let b = TrainBatch {
            reference: LightInput::Pixels(px.clone()),
            reference_vit: VitInput::Features(rf.clone()),
            target_vit: VitInput::Features(tf.clone()),
            input_ids: ids.clone(),
            attention_mask: mask.clone(),
        };
        let losses = model.losses(&b, &LossWeights::cirr(), true)?;
        let t1 = Instant::now();
        let grads = losses.total.backward()?;
        let t2 = Instant::now();
        opt.step(&ParamGrads::from_store(&grads, &vars), 1e-5, 0.9)?;
        let t3 = Instant::now();
        println!(
            "step {step}: forward {:.2} s, backward {:.2} s, optimizer {:.2} s, total {:.2} s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t3 - t0).as_secs_f64()
        );
    }
    Ok(())
}
