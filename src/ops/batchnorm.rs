//! Training-mode BatchNorm (batch statistics) as one candle custom op with its backward.
//!
//! Composed from candle ops, a training-mode BatchNorm costs a transposed copy, seven passes over
//! the activations and, in the backward pass, reductions over the broadcast dimensions that
//! candle runs slowly; it dominates the training step of the CNN backbones. Here the forward is
//! two passes (statistics per channel, then the affine map) and the backward two more, each
//! parallel over channels or (batch, channel) planes, accumulating in f64.
//!
//! y = (x − μ_c) / sqrt(σ²_c + eps) · γ_c + β_c with μ, σ² (biased) over batch and space;
//! ∂x = γ_c · inv_c · (∂y − mean(∂y) − x̂ · mean(∂y · x̂)), ∂γ_c = Σ ∂y · x̂, ∂β_c = Σ ∂y.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, Elem};

/// Output of [`batch_norm_train`].
pub struct BatchNormTrain {
    /// The normalized, scaled and shifted input (differentiable w.r.t. x, γ and β).
    pub y: Tensor,
    /// Per-channel batch mean (C,), detached.
    pub mean: Tensor,
    /// Per-channel biased batch variance (C,), detached.
    pub var: Tensor,
}

/// Whether the fused kernel handles this input (CPU, float32/64, parameters of the same dtype).
pub fn is_supported(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cpu()
        && weight.device().is_cpu()
        && x.dtype() == weight.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.rank() >= 2
}

/// BatchNorm of `x` (B,C,…) over every dimension but 1, with batch statistics.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<BatchNormTrain> {
    if !is_supported(x, weight) || bias.dtype() != x.dtype() {
        return Err(Error::Msg(
            "batch_norm_train: CPU float32/float64 input and parameters of one dtype expected"
                .into(),
        ));
    }
    let c = x.dim(1)?;
    if weight.dims() != [c] || bias.dims() != [c] {
        return Err(Error::Msg(format!(
            "batch_norm_train: parameters {:?} / {:?} for {c} channels",
            weight.dims(),
            bias.dims()
        )));
    }
    let stats = Arc::new(Mutex::new(None));
    let op = Forward {
        eps,
        stats: stats.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let s: Stats = stats
        .lock()
        .unwrap()
        .clone()
        .ok_or_else(|| Error::Msg("batch_norm_train: statistics not computed".into()))?;
    let to_tensor =
        |v: Vec<f64>| Tensor::from_vec(v, c, x.device()).and_then(|t| t.to_dtype(x.dtype()));
    Ok(BatchNormTrain {
        y,
        mean: to_tensor(s.mean)?,
        var: to_tensor(s.var)?,
    })
}

/// Sizes: `b` samples, `c` channels, `s` positions per plane.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    c: usize,
    s: usize,
}

impl Dims {
    fn of(shape: &Shape) -> Result<Self> {
        let d = shape.dims();
        if d.len() < 2 {
            return Err(Error::Msg(format!(
                "batch norm: input {d:?} has no channels"
            )));
        }
        Ok(Self {
            b: d[0],
            c: d[1],
            s: d[2..].iter().product(),
        })
    }

    /// Elements per channel.
    fn n(&self) -> usize {
        self.b * self.s
    }
}

/// Batch statistics per channel, and the inverse standard deviation used to normalize.
#[derive(Debug, Clone)]
struct Stats {
    mean: Vec<f64>,
    var: Vec<f64>,
    inv_std: Vec<f64>,
}

/// The planes of channel `c`: `b` runs of `s` values.
fn planes<T>(x: &[T], d: Dims, c: usize) -> impl Iterator<Item = &[T]> {
    (0..d.b).map(move |b| &x[(b * d.c + c) * d.s..(b * d.c + c + 1) * d.s])
}

fn stats<T: Elem>(x: &[T], d: Dims, eps: f64) -> Stats {
    let n = d.n().max(1) as f64;
    let (mean, var): (Vec<f64>, Vec<f64>) = (0..d.c)
        .into_par_iter()
        .map(|c| {
            // Two passes for precision: mean, then centered squares.
            let sum: f64 = planes(x, d, c)
                .map(|p| p.iter().map(|v| v.to_f64()).sum::<f64>())
                .sum();
            let mean = sum / n;
            let sq: f64 = planes(x, d, c)
                .map(|p| p.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>())
                .sum();
            (mean, sq / n)
        })
        .unzip();
    let inv_std = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    Stats { mean, var, inv_std }
}

/// out[plane] = f(channel) applied per element: `y = x·a_c + b_c`.
fn affine<T: Elem>(x: &[T], d: Dims, a: &[f64], b: &[f64]) -> Vec<T> {
    let mut y = vec![T::default(); x.len()];
    y.par_chunks_mut(d.s.max(1))
        .zip(x.par_chunks(d.s.max(1)))
        .enumerate()
        .for_each(|(p, (yp, xp))| {
            let (a, b) = (T::from_f64(a[p % d.c]), T::from_f64(b[p % d.c]));
            for (o, &v) in yp.iter_mut().zip(xp) {
                *o = v * a + b;
            }
        });
    y
}

macro_rules! float_storage {
    ($s:expr, $l:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                let $v = contiguous(v, $l, "batch norm")?;
                $body
            }
            CpuStorage::F64(v) => {
                let $v = contiguous(v, $l, "batch norm")?;
                $body
            }
            _ => return Err(Error::Msg("batch norm: float32 or float64 expected".into())),
        }
    };
}

fn to_f64(s: &CpuStorage, l: &Layout) -> Result<Vec<f64>> {
    Ok(float_storage!(s, l, |v| v
        .iter()
        .map(|x| x.to_f64())
        .collect()))
}

struct Forward {
    eps: f64,
    stats: Arc<Mutex<Option<Stats>>>,
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "batch-norm-train"
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
        let d = Dims::of(l1.shape())?;
        let (gamma, beta) = (to_f64(s2, l2)?, to_f64(s3, l3)?);
        let run = |st: &Stats| -> (Vec<f64>, Vec<f64>) {
            let a: Vec<f64> = (0..d.c).map(|c| gamma[c] * st.inv_std[c]).collect();
            let b = (0..d.c).map(|c| beta[c] - st.mean[c] * a[c]).collect();
            (a, b)
        };
        let out = match s1 {
            CpuStorage::F32(v) => {
                let x = contiguous(v, l1, "batch norm")?;
                let st = stats(x, d, self.eps);
                let (a, b) = run(&st);
                *self.stats.lock().unwrap() = Some(st);
                CpuStorage::F32(affine(x, d, &a, &b))
            }
            CpuStorage::F64(v) => {
                let x = contiguous(v, l1, "batch norm")?;
                let st = stats(x, d, self.eps);
                let (a, b) = run(&st);
                *self.stats.lock().unwrap() = Some(st);
                CpuStorage::F64(affine(x, d, &a, &b))
            }
            _ => return Err(Error::Msg("batch norm: float32 or float64 expected".into())),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let st = self
            .stats
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| Error::Msg("batch norm backward before forward".into()))?;
        let grad_y = grad_y.contiguous()?;
        // (2, C): Σ ∂y and Σ ∂y·x̂ per channel.
        let sums = x.apply_op2_no_bwd(&grad_y, &GradSums(st.clone()))?;
        let grad_beta = sums.get(0)?;
        let grad_gamma = sums.get(1)?;
        let grad_x = x.apply_op3_no_bwd(
            &grad_y,
            &sums,
            &GradInput(st, gamma.to_dtype(DType::F64)?.to_vec1()?),
        )?;
        Ok((Some(grad_x), Some(grad_gamma), Some(grad_beta)))
    }
}

/// (x, ∂y) → (2, C): Σ ∂y, Σ ∂y·x̂.
struct GradSums(Stats);

impl CustomOp2 for GradSums {
    fn name(&self) -> &'static str {
        "batch-norm-grad-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1.shape())?;
        let st = &self.0;
        fn sums<T: Elem>(x: &[T], dy: &[T], d: Dims, st: &Stats) -> Vec<T> {
            let per: Vec<(f64, f64)> = (0..d.c)
                .into_par_iter()
                .map(|c| {
                    let (m, inv) = (st.mean[c], st.inv_std[c]);
                    planes(x, d, c)
                        .zip(planes(dy, d, c))
                        .fold((0.0, 0.0), |(s, sx), (xp, gp)| {
                            let (a, b) = xp.iter().zip(gp).fold((0.0, 0.0), |(a, b), (v, g)| {
                                let g = g.to_f64();
                                (a + g, b + g * (v.to_f64() - m) * inv)
                            });
                            (s + a, sx + b)
                        })
                })
                .collect();
            let mut out: Vec<T> = per.iter().map(|p| T::from_f64(p.0)).collect();
            out.extend(per.iter().map(|p| T::from_f64(p.1)));
            out
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(sums(
                contiguous(x, l1, "batch norm")?,
                contiguous(g, l2, "batch norm")?,
                d,
                st,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(sums(
                contiguous(x, l1, "batch norm")?,
                contiguous(g, l2, "batch norm")?,
                d,
                st,
            )),
            _ => return Err(Error::Msg("batch norm: float32 or float64 expected".into())),
        };
        Ok((out, Shape::from((2, d.c))))
    }
}

/// (x, ∂y, sums) → ∂x, with the statistics and γ.
struct GradInput(Stats, Vec<f64>);

impl CustomOp3 for GradInput {
    fn name(&self) -> &'static str {
        "batch-norm-grad-input"
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
        let d = Dims::of(l1.shape())?;
        let (st, gamma) = (&self.0, &self.1);
        let sums = to_f64(s3, l3)?;
        let n = d.n().max(1) as f64;
        // ∂x = k_c·∂y + a_c·x + b_c with k = γ·inv, a = −k·inv·mean(∂y·x̂), and
        // b = −k·mean(∂y) − a·μ.
        let k: Vec<f64> = (0..d.c).map(|c| gamma[c] * st.inv_std[c]).collect();
        let a: Vec<f64> = (0..d.c)
            .map(|c| -k[c] * st.inv_std[c] * sums[d.c + c] / n)
            .collect();
        let b: Vec<f64> = (0..d.c)
            .map(|c| -k[c] * sums[c] / n - a[c] * st.mean[c])
            .collect();
        fn apply<T: Elem>(x: &[T], dy: &[T], d: Dims, k: &[f64], a: &[f64], b: &[f64]) -> Vec<T> {
            let mut dx = vec![T::default(); x.len()];
            let s = d.s.max(1);
            dx.par_chunks_mut(s)
                .zip(x.par_chunks(s).zip(dy.par_chunks(s)))
                .enumerate()
                .for_each(|(p, (o, (xp, gp)))| {
                    let c = p % d.c;
                    let (k, a, b) = (T::from_f64(k[c]), T::from_f64(a[c]), T::from_f64(b[c]));
                    for ((o, &v), &g) in o.iter_mut().zip(xp).zip(gp) {
                        *o = k * g + a * v + b;
                    }
                });
            dx
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(apply(
                contiguous(x, l1, "batch norm")?,
                contiguous(g, l2, "batch norm")?,
                d,
                &k,
                &a,
                &b,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(apply(
                contiguous(x, l1, "batch norm")?,
                contiguous(g, l2, "batch norm")?,
                d,
                &k,
                &a,
                &b,
            )),
            _ => return Err(Error::Msg("batch norm: float32 or float64 expected".into())),
        };
        Ok((out, l1.shape().clone()))
    }
}
