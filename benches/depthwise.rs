//! Depthwise convolution: candle's grouped conv2d (old) against `ops::depthwise` (new), forward
//! and backward, on the two EfficientNet shapes that dominate its time.
//!
//! `cargo bench --bench depthwise [-- BATCH]` (default batch 1).

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use slot4acir::ops::depthwise::depthwise_conv2d;

/// Median wall time of `f` in milliseconds.
fn time_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..7)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

type Conv = fn(&Tensor, &Tensor, usize, usize) -> candle_core::Result<Tensor>;

fn old(x: &Tensor, w: &Tensor, p: usize, s: usize) -> candle_core::Result<Tensor> {
    x.conv2d(w, p, s, 1, x.dim(1)?)
}

fn new(x: &Tensor, w: &Tensor, p: usize, s: usize) -> candle_core::Result<Tensor> {
    depthwise_conv2d(x, w, [p; 4], s)
}

fn main() -> candle_core::Result<()> {
    let batch: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1);
    let dev = Device::Cpu;
    println!(
        "depthwise conv2d, batch {batch}, {} rayon threads (times: median of 7, ms)",
        rayon::current_num_threads()
    );
    println!(
        "{:<28} {:>9} {:>9} {:>7}   {:>9} {:>9} {:>7}",
        "shape", "fwd old", "fwd new", "ratio", "bwd old", "bwd new", "ratio"
    );
    // (channels, size, kernel, stride, padding)
    for (c, hw, k, s, p) in [(1152, 7, 5, 1, 2), (96, 112, 3, 2, 1), (96, 112, 3, 1, 1)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (batch, c, hw, hw), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (c, 1, k, k), &dev)?)?;
        let mut fwd = [0f64; 2];
        let mut bwd = [0f64; 2];
        for (i, conv) in [old as Conv, new as Conv].into_iter().enumerate() {
            fwd[i] = time_ms(|| {
                conv(&x.as_tensor().detach(), &w.as_tensor().detach(), p, s).unwrap();
            });
            let y = conv(x.as_tensor(), w.as_tensor(), p, s)?;
            let r = Tensor::randn(0f32, 1., y.shape(), &dev)?;
            let loss = (y * r)?.sum_all()?;
            // Backward only: the graph is built once, `backward` walks it each time.
            bwd[i] = time_ms(|| {
                loss.backward().unwrap();
            });
        }
        println!(
            "{:<28} {:>9.2} {:>9.2} {:>6.1}x   {:>9.2} {:>9.2} {:>6.1}x",
            format!("{c}x{hw}x{hw} k{k} s{s} p{p}"),
            fwd[0],
            fwd[1],
            fwd[0] / fwd[1],
            bwd[0],
            bwd[1],
            bwd[0] / bwd[1]
        );
    }
    Ok(())
}
