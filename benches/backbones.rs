//! Light query backbones on random weights: parameter count, feature-map shape and CPU
//! latency of `extract_features` (eval mode) per batch size.
//!
//! `cargo bench --bench backbones -- [--iters N] [--batches 1,32] [--only NAME]`

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::Parser;
use slot4acir::config::LightModelKind;
use slot4acir::model::backbone::{self, PREFIX};
use slot4acir::weights::{Mode, ParamStore, Role};

#[derive(Parser)]
struct Args {
    /// Timed forwards per batch size (after one warm-up forward).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batches: Vec<usize>,
    /// Only these backbones (by name), comma separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    slot4acir::cli::tune_allocator();
    let args = Args::parse();
    let dev = Device::Cpu;
    println!(
        "{:<20} {:>10} {:>14} {}",
        "backbone",
        "params",
        "features",
        args.batches
            .iter()
            .map(|b| format!("{:>14}", format!("ms @ batch {b}")))
            .collect::<String>()
    );
    for (name, kind) in LightModelKind::ALL {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        let store = ParamStore::random(Mode::Inference);
        let enc = match backbone::build(kind, store.var_builder(&dev).pp(PREFIX)) {
            Ok(e) => e,
            Err(e) => {
                let e = e.to_string();
                println!(
                    "{name:<20} not available: {}",
                    e.lines().next().unwrap_or("")
                );
                continue;
            }
        };
        let params: usize = store
            .state_dict()
            .iter()
            .filter(|(k, _)| store.role(k) != Role::Buffer)
            .map(|(_, t)| t.elem_count())
            .sum();
        let mut shape = String::new();
        let mut cells = String::new();
        for &b in &args.batches {
            let x = Tensor::randn(0f32, 1.0, (b, 3, 224, 224), &dev)?;
            let f = enc.extract_features(&x, false)?;
            if shape.is_empty() {
                let d = f.dims();
                shape = format!("{}x{}x{}", d[1], d[2], d[3]);
            }
            let mut times = Vec::with_capacity(args.iters);
            for _ in 0..args.iters {
                let t = Instant::now();
                enc.extract_features(&x, false)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
            cells.push_str(&format!("{median:>14.1}"));
        }
        println!(
            "{name:<20} {:>9.2}M {shape:>14} {cells}",
            params as f64 / 1e6
        );
    }
    Ok(())
}
