//! LayerNorm over the last dimension as one candle custom op with its backward.
//!
//! Composed from candle ops, a LayerNorm is nine tensors forward and about twenty backward (each
//! gradient also starts as a zeroed tensor that candle adds into); the Q-Former runs dozens per
//! training step. Here the forward is one pass per row (two-pass mean and variance in f64, as
//! PyTorch's numerics) and the backward one more:
//!
//! y = x̂·w + b, x̂ = (x − μ)/sqrt(σ² + eps) (biased σ² over the row);
//! ∂x = inv·(g − mean(g) − x̂·mean(g·x̂)) with g = ∂y·w, ∂w = Σ_rows ∂y·x̂, ∂b = Σ_rows ∂y.

use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, Elem};

/// Whether the fused kernel handles this input (CPU, float32/64, parameters of its dtype).
pub fn is_supported(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && weight.dtype() == x.dtype()
        && bias.dtype() == x.dtype()
        && x.rank() >= 1
}

/// LayerNorm of `x` (…, H) with `weight`, `bias` (H,).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [h] || bias.dims() != [h] {
        return Err(Error::Msg(format!(
            "layer_norm: parameters {:?} / {:?} for rows of {h}",
            weight.dims(),
            bias.dims()
        )));
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Forward { eps })
}

/// Rows per parallel task: enough work to amortize the scheduling.
const ROWS_PER_TASK: usize = 16;

fn row_stats<T: Elem>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len().max(1) as f64;
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn forward<T: Elem>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let h = w.len().max(1);
    let mut y = vec![T::default(); x.len()];
    y.par_chunks_mut(h * ROWS_PER_TASK)
        .zip(x.par_chunks(h * ROWS_PER_TASK))
        .for_each(|(ys, xs)| {
            for (yr, xr) in ys.chunks_mut(h).zip(xs.chunks(h)) {
                let (mean, inv) = row_stats(xr, eps);
                for i in 0..h {
                    let xhat = (xr[i].to_f64() - mean) * inv;
                    yr[i] = T::from_f64(xhat * w[i].to_f64() + b[i].to_f64());
                }
            }
        });
    y
}

/// (∂x, ∂w, ∂b).
fn backward<T: Elem>(x: &[T], w: &[T], g: &[T], eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let h = w.len().max(1);
    let mut dx = vec![T::default(); x.len()];
    let zeros = || (vec![0f64; h], vec![0f64; h]);
    let (dw, db) = dx
        .par_chunks_mut(h * ROWS_PER_TASK)
        .zip(x.par_chunks(h * ROWS_PER_TASK))
        .zip(g.par_chunks(h * ROWS_PER_TASK))
        .fold(zeros, |(mut dw, mut db), ((dxs, xs), gs)| {
            let mut gw = vec![0f64; h];
            for ((dxr, xr), gr) in dxs.chunks_mut(h).zip(xs.chunks(h)).zip(gs.chunks(h)) {
                let (mean, inv) = row_stats(xr, eps);
                let (mut sum_g, mut sum_gx) = (0.0, 0.0);
                for i in 0..h {
                    let xhat = (xr[i].to_f64() - mean) * inv;
                    let gy = gr[i].to_f64();
                    dw[i] += gy * xhat;
                    db[i] += gy;
                    gw[i] = gy * w[i].to_f64();
                    sum_g += gw[i];
                    sum_gx += gw[i] * xhat;
                }
                let (mg, mgx) = (sum_g / h as f64, sum_gx / h as f64);
                for i in 0..h {
                    let xhat = (xr[i].to_f64() - mean) * inv;
                    dxr[i] = T::from_f64(inv * (gw[i] - mg - xhat * mgx));
                }
            }
            (dw, db)
        })
        .reduce(zeros, |(mut a, mut b), (c, d)| {
            a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
            b.iter_mut().zip(&d).for_each(|(b, d)| *b += d);
            (a, b)
        });
    let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
    (dx, cast(dw), cast(db))
}

struct Forward {
    eps: f64,
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(forward(
                    contiguous(x, l1, "layer norm")?,
                    contiguous(w, l2, "layer norm")?,
                    contiguous(b, l3, "layer norm")?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(forward(
                    contiguous(x, l1, "layer norm")?,
                    contiguous(w, l2, "layer norm")?,
                    contiguous(b, l3, "layer norm")?,
                    self.eps,
                ))
            }
            _ => {
                return Err(Error::Msg(
                    "layer norm: float32 or float64 of one dtype".into(),
                ))
            }
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dev, shape, h) = (x.device(), x.shape().clone(), w.dims1()?);
        macro_rules! run {
            ($t:ty) => {{
                let xv = x.flatten_all()?.to_vec1::<$t>()?;
                let wv = w.to_vec1::<$t>()?;
                let gv = grad.flatten_all()?.to_vec1::<$t>()?;
                let (dx, dw, db) = backward(&xv, &wv, &gv, self.eps);
                (
                    Tensor::from_vec(dx, shape, dev)?,
                    Tensor::from_vec(dw, h, dev)?,
                    Tensor::from_vec(db, h, dev)?,
                )
            }};
        }
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            other => return Err(Error::Msg(format!("layer norm backward: {other:?}"))),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use crate::model::layers::LayerNorm;

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (
            a.to_dtype(DType::F64).unwrap(),
            b.to_dtype(DType::F64).unwrap(),
        );
        let d = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f64>().unwrap() / n.to_scalar::<f64>().unwrap()).sqrt()
    }

    /// (output, ∂x, ∂w, ∂b) of Σ probe·LayerNorm(x) in `dtype`, fused or composed.
    fn run(
        fused: bool,
        dtype: DType,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        p: &Tensor,
    ) -> Vec<Tensor> {
        let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
        let (x, w, b) = (var(x), var(w), var(b));
        let ln = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            eps: 1e-12,
        };
        let y = if fused {
            super::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap()
        } else {
            ln.forward_composed(x.as_tensor()).unwrap()
        };
        let g = (&y * p.to_dtype(dtype).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![y];
        out.extend([&x, &w, &b].map(|v| g.get(v.as_tensor()).unwrap().clone()));
        out
    }

    /// Values and all three gradients against the float64 composition, on rows with a large
    /// common offset (where E[x²]−E[x]² would fail) and at BERT's eps; the float32 fused kernel
    /// is at least as close as the float32 composition.
    #[test]
    fn fused_layer_norm_matches_the_composition() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.0, (3, 5, 96), &dev).unwrap() + 40.0).unwrap();
        let w = Tensor::randn(1f32, 0.3, 96, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 96, &dev).unwrap();
        let p = Tensor::randn(0f32, 1.0, (3, 5, 96), &dev).unwrap();
        let truth = run(false, DType::F64, &x, &w, &b, &p);
        let fused = run(true, DType::F32, &x, &w, &b, &p);
        let composed = run(false, DType::F32, &x, &w, &b, &p);
        let fused64 = run(true, DType::F64, &x, &w, &b, &p);
        for (i, name) in ["output", "grad x", "grad weight", "grad bias"]
            .iter()
            .enumerate()
        {
            let (ef, ec) = (rel(&fused[i], &truth[i]), rel(&composed[i], &truth[i]));
            println!("{name}: fused {ef:.2e}, composed {ec:.2e}");
            assert!(
                ef < 1e-6 && ef <= ec * 1.5 + 1e-9,
                "{name}: fused {ef}, composed {ec}"
            );
            assert!(rel(&fused64[i], &truth[i]) < 1e-12, "{name} in float64");
        }
    }
}
