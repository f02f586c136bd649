//! The convolution routes of `ops` (fast depthwise kernel, pointwise as a matrix product) equal
//! candle's convolution, forward and backward.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::rel_err;
use slot4acir::ops::{conv2d, conv2d_padded, depthwise::depthwise_conv2d, Pads};

/// (batch, channels, height, width, kernel, stride, padding top/bottom/left/right)
const CASES: &[(usize, usize, usize, usize, usize, usize, Pads)] = &[
    (2, 8, 13, 11, 3, 1, [1; 4]),
    (2, 8, 12, 12, 3, 2, [1; 4]),
    (1, 5, 15, 9, 5, 2, [2; 4]),
    (3, 4, 10, 10, 5, 1, [2; 4]),
    (2, 6, 9, 14, 3, 1, [0; 4]),
    (1, 3, 11, 11, 5, 3, [0; 4]),
    (2, 4, 7, 7, 3, 2, [3; 4]),
    (1, 16, 7, 7, 5, 1, [2; 4]),
    (2, 3, 6, 8, 7, 1, [3; 4]),
    // TF-style SAME on stride 2: one more row/column at the bottom/right.
    (2, 8, 12, 12, 3, 2, [0, 1, 0, 1]),
    (1, 6, 14, 10, 5, 2, [1, 2, 1, 2]),
    (2, 4, 9, 11, 3, 2, [1, 0, 2, 1]),
];

/// Candle's grouped convolution with explicit padding: the reference.
fn candle_conv(
    x: &Tensor,
    w: &Tensor,
    pads: Pads,
    s: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    let [t, b, l, r] = pads;
    x.pad_with_zeros(2, t, b)?
        .pad_with_zeros(3, l, r)?
        .conv2d(w, 0, s, 1, groups)
}

struct Grads {
    y: Tensor,
    gx: Tensor,
    gw: Tensor,
}

/// Output and gradients of `sum(y * r)` through `f`.
fn run(
    f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    r: &Tensor,
) -> Grads {
    let xv = Var::from_tensor(x).unwrap();
    let wv = Var::from_tensor(w).unwrap();
    let y = f(xv.as_tensor(), wv.as_tensor()).unwrap();
    let loss = (&y * r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    Grads {
        y: y.detach(),
        gx: grads.get(xv.as_tensor()).unwrap().clone(),
        gw: grads.get(wv.as_tensor()).unwrap().clone(),
    }
}

fn check(dtype: DType, tol: f64) {
    let dev = Device::Cpu;
    let mut worst = 0f64;
    for &(b, c, h, w, k, s, p) in CASES {
        let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let wt = Tensor::randn(0f32, 1., (c, 1, k, k), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let (oh, ow) = ((h + p[0] + p[1] - k) / s + 1, (w + p[2] + p[3] - k) / s + 1);
        let r = Tensor::randn(0f32, 1., (b, c, oh, ow), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let reference = run(|x, w| candle_conv(x, w, p, s, c), &x, &wt, &r);
        let fast = run(|x, w| depthwise_conv2d(x, w, p, s), &x, &wt, &r);
        worst = worst.max(rel_err(&fast.y, &reference.y));
        worst = worst.max(rel_err(&fast.gx, &reference.gx));
        worst = worst.max(rel_err(&fast.gw, &reference.gw));
        let case = format!("{dtype:?} b{b} c{c} {h}x{w} k{k} s{s} p{p:?}");
        assert_eq!(fast.y.dims(), reference.y.dims(), "{case}");
        let (ey, ex, ew) = (
            rel_err(&fast.y, &reference.y),
            rel_err(&fast.gx, &reference.gx),
            rel_err(&fast.gw, &reference.gw),
        );
        assert!(
            ey < tol && ex < tol && ew < tol,
            "{case}: forward {ey:.2e}, grad input {ex:.2e}, grad weight {ew:.2e}"
        );
    }
    println!("{dtype:?}: worst relative error over forward and gradients {worst:.2e}");
}

#[test]
fn forward_and_gradients_match_grouped_conv_f32() {
    check(DType::F32, 1e-5);
}

#[test]
fn forward_and_gradients_match_grouped_conv_f64() {
    check(DType::F64, 1e-12);
}

#[test]
fn conv2d_routes_depthwise_and_handles_strided_views() {
    let dev = Device::Cpu;
    // A permuted (non-contiguous) view of shape (2, 6, 9, 10).
    let x = Tensor::randn(0f32, 1., (2, 10, 6, 9), &dev)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    assert!(!x.is_contiguous());
    let w = Tensor::randn(0f32, 1., (6, 1, 3, 3), &dev).unwrap();
    let fast = conv2d(&x, &w, 1, 2, 6).unwrap();
    let reference = x.contiguous().unwrap().conv2d(&w, 1, 2, 1, 6).unwrap();
    assert!(rel_err(&fast, &reference) < 1e-6);
}

#[test]
fn rejects_mismatched_kernel() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((3, 1, 3, 3), DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d(&x, &w, [1; 4], 1).is_err());
    let w = Tensor::zeros((4, 1, 11, 11), DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d(&x, &w, [1; 4], 1).is_err());
}

#[test]
fn pointwise_route_matches_candle_conv() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (3, 16, 9, 7), &dev).unwrap();
    let w = Tensor::randn(0f32, 1., (24, 16, 1, 1), &dev).unwrap();
    let r = Tensor::randn(0f32, 1., (3, 24, 9, 7), &dev).unwrap();
    let fast = run(|x, w| conv2d(x, w, 0, 1, 1), &x, &w, &r);
    let reference = run(|x, w| x.conv2d(w, 0, 1, 1, 1), &x, &w, &r);
    for (a, b, what) in [
        (&fast.y, &reference.y, "forward"),
        (&fast.gx, &reference.gx, "grad input"),
        (&fast.gw, &reference.gw, "grad weight"),
    ] {
        let e = rel_err(a, b);
        assert!(e < 1e-5, "{what}: {e:.2e}");
    }
}

#[test]
fn other_convolutions_pad_asymmetric_sides() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 3, 10, 10), &dev).unwrap();
    let w = Tensor::randn(0f32, 1., (8, 3, 3, 3), &dev).unwrap();
    let got = conv2d_padded(&x, &w, [0, 1, 0, 1], 2, 1).unwrap();
    let want = candle_conv(&x, &w, [0, 1, 0, 1], 2, 1).unwrap();
    assert_eq!(got.dims(), &[2, 8, 5, 5]);
    assert!(rel_err(&got, &want) < 1e-6);
}
