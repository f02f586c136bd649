//! Depthwise 2-d convolution (one k×k filter per channel, `groups == channels`), forward and
//! backward, as candle custom ops.
//!
//! Candle runs a grouped convolution as one convolution per group (chunk, convolve, concatenate),
//! which costs tens of milliseconds for a single EfficientNet layer; here each (batch, channel)
//! plane is one independent task for rayon, and the inner loops run along contiguous rows so
//! that they vectorize. Zero padding may differ per side (TF-style SAME padding is asymmetric on
//! stride 2), which spares the padded copy of the input. Only the CPU kernel exists; on other
//! devices [`depthwise_conv2d`] falls back to candle's grouped convolution.

use candle_core::{CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::Elem;

/// Zero padding of each side of the image: (top, bottom, left, right).
pub type Pads = [usize; 4];

/// Depthwise convolution of `x` (B,C,H,W) with `w` (C,1,kh,kw), zero padding `pads`
/// (top, bottom, left, right), equal stride on both axes. Differentiable with respect to both
/// arguments.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, pads: Pads, stride: usize) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (wc, one, _, _) = w.dims4()?;
    if wc != c || one != 1 {
        return Err(Error::Msg(format!(
            "depthwise conv2d: kernel {:?} does not match input {:?} (expected ({c}, 1, kh, kw))",
            w.dims(),
            x.dims()
        )));
    }
    Geometry::new(x.shape(), w.shape(), pads, stride)?;
    if !is_supported(x, w) {
        let [t, b, l, r] = pads;
        if t == b && l == r && t == l {
            return x.conv2d(w, t, stride, 1, c);
        }
        let x = x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?;
        return x.conv2d(w, 0, stride, 1, c);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2(&w, DepthwiseForward { pads, stride })
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
    top: usize,
    left: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(x: &Shape, k: &Shape, pads: Pads, stride: usize) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let (_, _, kh, kw) = k.dims4()?;
        let [top, bottom, left, right] = pads;
        let (ph, pw) = (h + top + bottom, w + left + right);
        if stride == 0 || ph < kh || pw < kw {
            return Err(Error::Msg(format!(
                "depthwise conv2d: kernel {kh}x{kw} larger than the padded input {ph}x{pw}, or \
                 zero stride"
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
            top,
            left,
            oh: (ph - kh) / stride + 1,
            ow: (pw - kw) / stride + 1,
        })
    }

    /// Input row read by output row `o` through kernel row `k`, if inside the image.
    fn in_row(&self, o: usize, k: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.top)
            .filter(|&i| i < self.h)
    }

    /// For kernel column `k`: the output columns `lo..hi` whose input column
    /// `ox*stride + k - left` lies inside the image, and the input column of `lo`; `None` if
    /// none.
    fn valid_cols(&self, k: usize) -> Option<(usize, usize, usize)> {
        if self.w + self.left <= k {
            return None;
        }
        let lo = self.left.saturating_sub(k).div_ceil(self.stride);
        let hi = ((self.w - 1 + self.left - k) / self.stride + 1).min(self.ow);
        (lo < hi).then(|| (lo, hi, lo * self.stride + k - self.left))
    }

    fn all_valid_cols(&self) -> Vec<Option<(usize, usize, usize)>> {
        (0..self.kw).map(|k| self.valid_cols(k)).collect()
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
    pads: Pads,
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
        let g = Geometry::new(l1.shape(), l2.shape(), self.pads, self.stride)?;
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
        let g = Geometry::new(x.shape(), w.shape(), self.pads, self.stride)?;
        let grad_y = grad_y.contiguous()?;
        let grad_x = grad_y.apply_op2_no_bwd(w, &DepthwiseGradInput(g))?;
        let grad_w = x.apply_op2_no_bwd(&grad_y, &DepthwiseGradWeight(g))?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

fn check_grad_shape(g: &Geometry, grad_y: &Shape) -> Result<()> {
    if grad_y.dims4()? != (g.b, g.c, g.oh, g.ow) {
        return Err(Error::Msg(format!(
            "depthwise conv2d backward: gradient {:?} does not match the output ({}, {}, {}, {})",
            grad_y.dims(),
            g.b,
            g.c,
            g.oh,
            g.ow
        )));
    }
    Ok(())
}

/// ∂L/∂x from (∂L/∂y, w).
struct DepthwiseGradInput(Geometry);

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
        let g = &self.0;
        check_grad_shape(g, l1.shape())?;
        let out = dispatch!(s1, l1, s2, l2, |gy, w| grad_input(gy, w, g));
        Ok((out, Shape::from((g.b, g.c, g.h, g.w))))
    }
}

/// ∂L/∂w from (x, ∂L/∂y).
struct DepthwiseGradWeight(Geometry);

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
        let g = &self.0;
        check_grad_shape(g, l2.shape())?;
        let out = dispatch!(s1, l1, s2, l2, |x, gy| grad_weight(x, gy, g));
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
