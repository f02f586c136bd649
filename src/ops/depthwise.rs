//! Depthwise 2-d convolution (one k×k filter per channel, `groups == channels`), forward and
//! backward, as candle custom ops.
//!
//! Candle runs a grouped convolution as one convolution per group (chunk, convolve, concatenate),
//! which costs tens of milliseconds for a single EfficientNet layer; here each (batch, channel)
//! plane is one independent task for rayon, and the inner loops run along contiguous rows so
//! that they vectorize. Padding is symmetric (TF-style asymmetric SAME padding is applied by
//! `layers::Conv2d` before calling this). Only the CPU kernel exists; on other devices
//! [`depthwise_conv2d`] falls back to candle's grouped convolution.

use std::ops::{Add, AddAssign, Mul};

use candle_core::{CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Depthwise convolution of `x` (B,C,H,W) with `w` (C,1,kh,kw), zero padding `padding` on
/// every side, equal stride on both axes. Differentiable with respect to both arguments.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (wc, one, _, _) = w.dims4()?;
    if wc != c || one != 1 {
        return Err(Error::Msg(format!(
            "depthwise conv2d: kernel {:?} does not match input {:?} (expected ({c}, 1, kh, kw))",
            w.dims(),
            x.dims()
        )));
    }
    if !is_supported(x, w) {
        return x.conv2d(w, padding, stride, 1, c);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2(&w, DepthwiseForward { padding, stride })
}

/// Whether the fast kernel handles these arguments (CPU, float32 or float64).
pub fn is_supported(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Sizes of one depthwise convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(x: &Shape, k: &Shape, padding: usize, stride: usize) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let (_, _, kh, kw) = k.dims4()?;
        if stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
            return Err(Error::Msg(format!(
                "depthwise conv2d: kernel {kh}x{kw} larger than padded input {h}x{w} (padding \
                 {padding}) or zero stride"
            )));
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            kh,
            kw,
            stride,
            pad: padding,
            oh: (h + 2 * padding - kh) / stride + 1,
            ow: (w + 2 * padding - kw) / stride + 1,
        })
    }

    /// Input row read by output row `o` through kernel row `k`, if inside the image.
    fn in_row(&self, o: usize, k: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.pad)
            .filter(|&i| i < self.h)
    }

    /// For kernel column `k`: the output columns `lo..hi` whose input column
    /// `ox*stride + k - pad` lies inside the image, and the input column of `lo`; `None` if none.
    fn valid_cols(&self, k: usize) -> Option<(usize, usize, usize)> {
        if self.w + self.pad <= k {
            return None;
        }
        let lo = self.pad.saturating_sub(k).div_ceil(self.stride);
        let hi = ((self.w - 1 + self.pad - k) / self.stride + 1).min(self.ow);
        (lo < hi).then(|| (lo, hi, lo * self.stride + k - self.pad))
    }

    fn all_valid_cols(&self) -> Vec<Option<(usize, usize, usize)>> {
        (0..self.kw).map(|k| self.valid_cols(k)).collect()
    }
}

/// Element types of the kernels.
trait Elem:
    Copy + Send + Sync + Default + Add<Output = Self> + Mul<Output = Self> + AddAssign + 'static
{
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Elem for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Elem for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(Error::Msg(format!(
            "depthwise conv2d: {what} must be contiguous"
        ))),
    }
}

/// Runs `f` on the two storages as slices of one element type.
macro_rules! dispatch {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $f:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let (a, b) = (contiguous(a, $l1, "lhs")?, contiguous(b, $l2, "rhs")?);
                CpuStorage::F32($f(a, b))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let (a, b) = (contiguous(a, $l1, "lhs")?, contiguous(b, $l2, "rhs")?);
                CpuStorage::F64($f(a, b))
            }
            _ => {
                return Err(Error::Msg(
                    "depthwise conv2d: only float32 and float64 of one dtype are supported".into(),
                ))
            }
        }
    };
}

/// y = x ⊛ w.
struct DepthwiseForward {
    padding: usize,
    stride: usize,
}

impl CustomOp2 for DepthwiseForward {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.shape(), l2.shape(), self.padding, self.stride)?;
        let out = dispatch!(s1, l1, s2, l2, |x, w| forward(x, w, &g));
        Ok((out, Shape::from((g.b, g.c, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_y = grad_y.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let grad_x = grad_y.apply_op2_no_bwd(
            w,
            &DepthwiseGradInput {
                padding: self.padding,
                stride: self.stride,
                h,
                w: wd,
            },
        )?;
        let grad_w = x.apply_op2_no_bwd(
            &grad_y,
            &DepthwiseGradWeight {
                padding: self.padding,
                stride: self.stride,
                kh,
                kw,
            },
        )?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// ∂L/∂x from (∂L/∂y, w).
struct DepthwiseGradInput {
    padding: usize,
    stride: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for DepthwiseGradInput {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, oh, ow) = l1.shape().dims4()?;
        let g = Geometry::new(
            &Shape::from((b, c, self.h, self.w)),
            l2.shape(),
            self.padding,
            self.stride,
        )?;
        if (g.oh, g.ow) != (oh, ow) {
            return Err(Error::Msg(format!(
                "depthwise conv2d backward: gradient {oh}x{ow} does not match output {}x{}",
                g.oh, g.ow
            )));
        }
        let out = dispatch!(s1, l1, s2, l2, |gy, w| grad_input(gy, w, &g));
        Ok((out, Shape::from((b, c, self.h, self.w))))
    }
}

/// ∂L/∂w from (x, ∂L/∂y).
struct DepthwiseGradWeight {
    padding: usize,
    stride: usize,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for DepthwiseGradWeight {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = l1.shape().dims4()?.1;
        let g = Geometry::new(
            l1.shape(),
            &Shape::from((c, 1, self.kh, self.kw)),
            self.padding,
            self.stride,
        )?;
        if l2.shape().dims4()? != (g.b, g.c, g.oh, g.ow) {
            return Err(Error::Msg(format!(
                "depthwise conv2d backward: gradient {:?} does not match output",
                l2.shape().dims()
            )));
        }
        let out = dispatch!(s1, l1, s2, l2, |x, gy| grad_weight(x, gy, &g));
        Ok((out, Shape::from((g.c, 1, g.kh, g.kw))))
    }
}

/// `acc[i] += wv * src[start + i*stride]` for every i of `acc`.
#[inline(always)]
fn axpy_strided<T: Elem>(acc: &mut [T], wv: T, src: &[T], start: usize, stride: usize) {
    if stride == 1 {
        let n = acc.len();
        for (a, &s) in acc.iter_mut().zip(&src[start..start + n]) {
            *a += wv * s;
        }
    } else {
        for (a, &s) in acc.iter_mut().zip(src[start..].iter().step_by(stride)) {
            *a += wv * s;
        }
    }
}

fn forward<T: Elem>(x: &[T], w: &[T], g: &Geometry) -> Vec<T> {
    let (plane_in, plane_out, taps) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
    let cols = g.all_valid_cols();
    let mut y = vec![T::default(); g.b * g.c * plane_out];
    y.par_chunks_mut(plane_out).enumerate().for_each(|(p, yp)| {
        let xp = &x[p * plane_in..(p + 1) * plane_in];
        let wp = &w[(p % g.c) * taps..(p % g.c + 1) * taps];
        for oy in 0..g.oh {
            let yrow = &mut yp[oy * g.ow..(oy + 1) * g.ow];
            for ki in 0..g.kh {
                let Some(iy) = g.in_row(oy, ki) else { continue };
                let xrow = &xp[iy * g.w..(iy + 1) * g.w];
                for (kj, span) in cols.iter().enumerate() {
                    let Some((lo, hi, ix)) = *span else { continue };
                    axpy_strided(&mut yrow[lo..hi], wp[ki * g.kw + kj], xrow, ix, g.stride);
                }
            }
        }
    });
    y
}

fn grad_input<T: Elem>(gy: &[T], w: &[T], g: &Geometry) -> Vec<T> {
    let (plane_in, plane_out, taps) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
    let cols = g.all_valid_cols();
    let mut gx = vec![T::default(); g.b * g.c * plane_in];
    gx.par_chunks_mut(plane_in)
        .enumerate()
        .for_each(|(p, gxp)| {
            let gyp = &gy[p * plane_out..(p + 1) * plane_out];
            let wp = &w[(p % g.c) * taps..(p % g.c + 1) * taps];
            for oy in 0..g.oh {
                let gyrow = &gyp[oy * g.ow..(oy + 1) * g.ow];
                for ki in 0..g.kh {
                    let Some(iy) = g.in_row(oy, ki) else { continue };
                    let gxrow = &mut gxp[iy * g.w..(iy + 1) * g.w];
                    for (kj, span) in cols.iter().enumerate() {
                        let Some((lo, hi, ix)) = *span else { continue };
                        let wv = wp[ki * g.kw + kj];
                        // The scatter transpose of `axpy_strided`.
                        if g.stride == 1 {
                            for (d, &s) in gxrow[ix..ix + hi - lo].iter_mut().zip(&gyrow[lo..hi]) {
                                *d += wv * s;
                            }
                        } else {
                            for (d, &s) in
                                gxrow[ix..].iter_mut().step_by(g.stride).zip(&gyrow[lo..hi])
                            {
                                *d += wv * s;
                            }
                        }
                    }
                }
            }
        });
    gx
}

fn grad_weight<T: Elem>(x: &[T], gy: &[T], g: &Geometry) -> Vec<T> {
    let (plane_in, plane_out, taps) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
    let cols = g.all_valid_cols();
    let mut gw = vec![T::default(); g.c * taps];
    gw.par_chunks_mut(taps).enumerate().for_each(|(c, gwc)| {
        // Long sums (batch × output plane): accumulate each row in T, the total in f64.
        let mut acc = vec![0f64; taps];
        for b in 0..g.b {
            let p = b * g.c + c;
            let xp = &x[p * plane_in..(p + 1) * plane_in];
            let gyp = &gy[p * plane_out..(p + 1) * plane_out];
            for oy in 0..g.oh {
                let gyrow = &gyp[oy * g.ow..(oy + 1) * g.ow];
                for ki in 0..g.kh {
                    let Some(iy) = g.in_row(oy, ki) else { continue };
                    let xrow = &xp[iy * g.w..(iy + 1) * g.w];
                    for (kj, span) in cols.iter().enumerate() {
                        let Some((lo, hi, ix)) = *span else { continue };
                        let mut s = T::default();
                        for (&a, &v) in gyrow[lo..hi]
                            .iter()
                            .zip(xrow[ix..].iter().step_by(g.stride))
                        {
                            s += a * v;
                        }
                        acc[ki * g.kw + kj] += s.to_f64();
                    }
                }
            }
        }
        for (d, a) in gwc.iter_mut().zip(acc) {
            *d = T::from_f64(a);
        }
    });
    gw
}
