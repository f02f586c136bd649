//! The fused training-mode BatchNorm kernel equals the composition of candle ops (PyTorch's
//! formula), forward, batch statistics and gradients.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::rel_err;
use slot4acir::ops::batchnorm::batch_norm_train;

/// Reference: (y, mean, biased var) from candle ops.
fn composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> (Tensor, Tensor, Tensor) {
    let c = x.dim(1).unwrap();
    let mut shape = vec![1usize; x.rank()];
    shape[1] = c;
    let xt = x
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((c, ()))
        .unwrap();
    let mean = xt.mean(D::Minus1).unwrap();
    let var = xt
        .broadcast_sub(&mean.unsqueeze(1).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean(D::Minus1)
        .unwrap();
    let scale = (w * (&var + eps).unwrap().sqrt().unwrap().recip().unwrap()).unwrap();
    let shift = (b - (&mean * &scale).unwrap()).unwrap();
    let y = x
        .broadcast_mul(&scale.reshape(shape.as_slice()).unwrap())
        .unwrap()
        .broadcast_add(&shift.reshape(shape.as_slice()).unwrap())
        .unwrap();
    (y, mean, var)
}

fn check(dims: &[usize], dtype: DType, tol: f64) -> f64 {
    let dev = Device::Cpu;
    let c = dims[1];
    let rand = |shape: &[usize], mean: f32, std: f32| {
        Tensor::randn(mean, std, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    // Offset and scaled input: the statistics are not those of a unit normal.
    let x = Var::from_tensor(&rand(dims, 0.7, 2.5)).unwrap();
    let w = Var::from_tensor(&rand(&[c], 1.0, 0.3)).unwrap();
    let b = Var::from_tensor(&rand(&[c], 0.0, 0.3)).unwrap();
    let r = rand(dims, 0.0, 1.0);
    let eps = 1e-3;
    let mut worst = 0f64;
    let fast = batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps).unwrap();
    let (y, mean, var) = composed(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps);
    for (got, want, what) in [
        (&fast.y, &y, "y"),
        (&fast.mean, &mean, "mean"),
        (&fast.var, &var, "var"),
    ] {
        let e = rel_err(got, want);
        assert!(e < tol, "{dims:?} {dtype:?} {what}: {e:.2e}");
        worst = worst.max(e);
    }
    let g_fast = (&fast.y * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_ref = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (v, what) in [(&x, "grad x"), (&w, "grad weight"), (&b, "grad bias")] {
        let e = rel_err(
            g_fast.get(v.as_tensor()).unwrap(),
            g_ref.get(v.as_tensor()).unwrap(),
        );
        assert!(e < tol, "{dims:?} {dtype:?} {what}: {e:.2e}");
        worst = worst.max(e);
    }
    worst
}

#[test]
fn fused_batchnorm_matches_composition() {
    let mut worst = 0f64;
    for dims in [&[4, 6, 5, 7][..], &[2, 3, 8, 8], &[5, 12], &[1, 4, 3, 3]] {
        worst = worst.max(check(dims, DType::F32, 1e-5));
        check(dims, DType::F64, 1e-10);
    }
    println!("float32: worst relative error {worst:.2e}");
}

#[test]
fn rejects_wrong_parameter_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev).unwrap();
    let w = Tensor::ones(4, DType::F32, &dev).unwrap();
    assert!(batch_norm_train(&x, &w, &w, 1e-5).is_err());
}
