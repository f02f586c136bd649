//! Kernels candle lacks or runs slowly, each with its backward pass.

pub mod depthwise;

use candle_core::{Result, Tensor};

/// 2-d convolution, NCHW, symmetric zero padding. Depthwise convolutions (one filter per input
/// channel) go to the fast kernel of [`depthwise`] on the CPU instead of candle's
/// one-convolution-per-group loop.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    if groups > 1 && groups == c && w.dims4()?.0 == c && depthwise::is_supported(x, w) {
        return depthwise::depthwise_conv2d(x, w, padding, stride);
    }
    x.conv2d(w, padding, stride, 1, groups)
}
