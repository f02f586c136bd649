//! Kernels candle lacks or runs slowly, each with its backward pass.

pub mod batchnorm;
pub mod depthwise;
pub mod layernorm;
pub mod silu;

use std::ops::{Add, AddAssign, Mul};

use candle_core::{Error, Layout, Result, Tensor};

pub use depthwise::Pads;

/// 2-d convolution, NCHW, symmetric zero padding. See [`conv2d_padded`].
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    conv2d_padded(x, w, [padding; 4], stride, groups)
}

/// 2-d convolution, NCHW, zero padding per side (top, bottom, left, right). Routes:
/// - depthwise (one filter per input channel) to the fast kernel of [`depthwise`], instead of
///   candle's one-convolution-per-group loop;
/// - pointwise (1×1, stride 1, no padding, one group) to a batched matrix product, several times
///   faster than candle's im2col path forward and backward;
/// - everything else to candle, padding asymmetric sides first.
pub fn conv2d_padded(
    x: &Tensor,
    w: &Tensor,
    pads: Pads,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    if groups > 1 && groups == c && o == c && depthwise::is_supported(x, w) {
        return depthwise::depthwise_conv2d(x, w, pads, stride);
    }
    if groups == 1 && (kh, kw, stride) == (1, 1, 1) && pads == [0; 4] {
        let y = w
            .reshape((o, c))?
            .broadcast_matmul(&x.reshape((b, c, h * wd))?)?;
        return y.reshape((b, o, h, wd));
    }
    let [t, bo, l, r] = pads;
    if t == bo && l == r && t == l {
        return x.conv2d(w, t, stride, 1, groups);
    }
    let x = x.pad_with_zeros(2, t, bo)?.pad_with_zeros(3, l, r)?;
    x.conv2d(w, 0, stride, 1, groups)
}

/// The contiguous slice of a custom op's input; `op` names the kernel in the error.
pub(crate) fn contiguous<'a, T>(v: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    l.contiguous_offsets()
        .map(|(a, b)| &v[a..b])
        .ok_or_else(|| Error::Msg(format!("{op}: inputs must be contiguous")))
}

/// Element types of the kernels.
pub(crate) trait Elem:
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
