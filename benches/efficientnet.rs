//! EfficientNet light encoders on the CPU: eval forward (BatchNorm folded or not) and a
//! training step (batch-statistics forward + backward), random weights.
//!
//! `cargo bench --bench efficientnet [-- BATCH]` (default batch 8).

use std::time::Instant;

use candle_core::{Device, Tensor};
use slot4acir::config::LightModelKind;
use slot4acir::model::backbone::efficientnet::{EfficientNet, EfficientNetConfig};
use slot4acir::model::backbone::LightEncoder;
use slot4acir::weights::{Mode, ParamStore};

/// Median wall time of `f` over `n` runs after one warm-up, in milliseconds.
fn time_ms(n: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

fn model(kind: LightModelKind, mode: Mode, fuse: bool) -> EfficientNet {
    let mut cfg = EfficientNetConfig::for_kind(kind).unwrap();
    cfg.fuse_bn = fuse;
    let store = ParamStore::random(mode);
    EfficientNet::new(store.var_builder(&Device::Cpu), &cfg).unwrap()
}

fn main() -> candle_core::Result<()> {
    let batch: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(8);
    println!(
        "EfficientNet at 224x224, {} rayon threads (median ms)",
        rayon::current_num_threads()
    );
    println!(
        "{:<20} {:>12} {:>12} {:>14} {:>14}",
        "model",
        "eval b1",
        format!("eval b{batch}"),
        "eval unfused",
        "train step"
    );
    for kind in [
        LightModelKind::EfficientNetB0,
        LightModelKind::EfficientNetLite0,
    ] {
        let x1 = Tensor::randn(0f32, 1., (1, 3, 224, 224), &Device::Cpu)?;
        let xb = Tensor::randn(0f32, 1., (batch, 3, 224, 224), &Device::Cpu)?;
        let fused = model(kind, Mode::Inference, true);
        let plain = model(kind, Mode::Inference, false);
        let e1 = time_ms(5, || {
            fused.extract_features(&x1, false).unwrap();
        });
        let eb = time_ms(3, || {
            fused.extract_features(&xb, false).unwrap();
        });
        let eu = time_ms(3, || {
            plain.extract_features(&xb, false).unwrap();
        });
        let trainable = model(kind, Mode::Training, true);
        let step = time_ms(3, || {
            let y = trainable.extract_features(&xb, true).unwrap();
            y.sum_all().unwrap().backward().unwrap();
        });
        println!(
            "{:<20} {:>12.1} {:>12.1} {:>14.1} {:>14.1}",
            kind.name(),
            e1,
            eb,
            eu,
            step
        );
    }
    Ok(())
}
