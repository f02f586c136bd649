//! SiLU (swish), x·σ(x), as one candle custom op with its backward.
//!
//! candle evaluates it element by element through libm's scalar `expf`, and its backward is a
//! composition of seven tensors. Here float32 uses a vectorizable `exp` (Cephes' polynomial,
//! within 2 ulp of libm) and the backward is one pass: ∂x = ∂y·σ(x)·(1 + x·(1 − σ(x))).
//! Float64 keeps the exact `exp`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous;

/// Whether the fused kernel handles this input (CPU, float32/64).
pub fn is_supported(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Silu)
}

/// e^x for float32 without a libm call (so loops over it vectorize): range reduction by
/// ln 2, a degree-5 polynomial on [−ln2/2, ln2/2], scaling by 2ⁿ through the exponent bits.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer with plain float adds
    // (`floor` is a libm call on baseline x86-64, which would stop the loop vectorizing).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    f32::from_bits(((n as i32 + 127) << 23) as u32) * y
}

trait Sigmoid: Copy + Send + Sync {
    fn sigmoid(self) -> Self;
    fn silu(self) -> Self;
    fn silu_grad(self, g: Self) -> Self;
}

impl Sigmoid for f32 {
    #[inline(always)]
    fn sigmoid(self) -> f32 {
        1.0 / (1.0 + exp_f32(-self))
    }
    #[inline(always)]
    fn silu(self) -> f32 {
        self * self.sigmoid()
    }
    #[inline(always)]
    fn silu_grad(self, g: f32) -> f32 {
        let s = self.sigmoid();
        g * s * (1.0 + self * (1.0 - s))
    }
}

impl Sigmoid for f64 {
    fn sigmoid(self) -> f64 {
        1.0 / (1.0 + (-self).exp())
    }
    fn silu(self) -> f64 {
        self * self.sigmoid()
    }
    fn silu_grad(self, g: f64) -> f64 {
        let s = self.sigmoid();
        g * s * (1.0 + self * (1.0 - s))
    }
}

const CHUNK: usize = 1 << 14;

fn map<T: Sigmoid + Default>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::default(); x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(ys, xs)| ys.iter_mut().zip(xs).for_each(|(y, &x)| *y = x.silu()));
    y
}

fn map_grad<T: Sigmoid + Default>(x: &[T], g: &[T]) -> Vec<T> {
    let mut d = vec![T::default(); x.len()];
    d.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(ds, (xs, gs))| {
            for ((d, &x), &g) in ds.iter_mut().zip(xs).zip(gs) {
                *d = x.silu_grad(g);
            }
        });
    d
}

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(map(contiguous(v, l, "silu")?)),
            CpuStorage::F64(v) => CpuStorage::F64(map(contiguous(v, l, "silu")?)),
            _ => return Err(Error::Msg("silu: float32 or float64 expected".into())),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &SiluGrad)?))
    }
}

struct SiluGrad;

impl CustomOp2 for SiluGrad {
    fn name(&self) -> &'static str {
        "silu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(map_grad(
                contiguous(x, l1, "silu")?,
                contiguous(g, l2, "silu")?,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(map_grad(
                contiguous(x, l1, "silu")?,
                contiguous(g, l2, "silu")?,
            )),
            _ => {
                return Err(Error::Msg(
                    "silu backward: float32 or float64 expected".into(),
                ))
            }
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// The float32 exp is within 2 ulp of libm's over the range SiLU uses.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp_f32(x), x.exp());
            worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
            x += 0.0137;
        }
        assert!(worst <= 2, "{worst} ulp");
    }

    /// Values and gradient equal candle's `silu` (and its autograd) to float32 rounding.
    #[test]
    fn fused_silu_matches_candle() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 4.0, (3, 7, 101), &dev).unwrap())).unwrap();
        let p = Tensor::randn(0f32, 1.0, (3, 7, 101), &dev).unwrap();
        let fused = super::silu(x.as_tensor()).unwrap();
        let plain = x.as_tensor().silu().unwrap();
        let rel = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
            let n = b.sqr().unwrap().sum_all().unwrap();
            (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
        };
        assert!(rel(&fused, &plain) < 1e-7, "values {}", rel(&fused, &plain));
        let gf = (&fused * &p)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (&plain * &p)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            gf.get(x.as_tensor()).unwrap(),
            gp.get(x.as_tensor()).unwrap(),
        );
        assert!(rel(a, b) < 1e-6, "gradient {}", rel(a, b));
    }
}
