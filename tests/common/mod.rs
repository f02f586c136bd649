//! Shared test helpers: where the reference fixtures and data live.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `../shared` beside the crate (as CI lays it out), or `$SLOT4ACIR_SHARED`. Panics with a clear
/// message when absent: the parity tests must fail, never skip, without their ground truth.
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("SLOT4ACIR_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(
        dir.join("fixtures").is_dir(),
        "reference fixtures not found at {} (set SLOT4ACIR_SHARED or lay ../shared beside the crate)",
        dir.display()
    );
    dir
}

pub fn fixture_dir(name: &str) -> PathBuf {
    shared_dir().join("fixtures").join(name)
}

/// ‖a − b‖ / ‖b‖ over all elements.
pub fn rel_err(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    let a = a
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let b = b
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let den = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (num / den.max(1e-300)).sqrt()
}

/// A state dict with its float32 tensors in float64 (integer buffers unchanged), for checks of
/// how well a result is conditioned.
#[allow(dead_code)]
pub fn to_f64(
    weights: &std::collections::HashMap<String, candle_core::Tensor>,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    use candle_core::DType;
    weights
        .iter()
        .map(|(k, v)| {
            let v = if v.dtype() == DType::F32 {
                v.to_dtype(DType::F64).unwrap()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}
