//! Small building blocks shared by the light backbones: 2-d convolution (with TF-style SAME
//! padding on request) and BatchNorm with the reference's training/eval semantics.

use candle_core::{Module, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

/// Padding of a convolution: symmetric (PyTorch `padding=`) or explicit per side, as TF-style
/// static SAME padding needs (asymmetric on stride 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Symmetric(usize),
    /// (top, bottom, left, right)
    Explicit(usize, usize, usize, usize),
}

/// TF-style static SAME padding for a square input of side `input`, as EfficientNet's
/// `Conv2dStaticSamePadding` computes it: total `max((ceil(in/s)-1)*s + (k-1)*d + 1 - in, 0)`,
/// the smaller half first.
pub fn same_padding(input: usize, kernel: usize, stride: usize, dilation: usize) -> Padding {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + (kernel - 1) * dilation + 1).saturating_sub(input);
    let a = total / 2;
    Padding::Explicit(a, total - a, a, total - a)
}

/// A 2-d convolution under the reference naming (`weight`, optional `bias`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: Padding,
    pub groups: usize,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
        groups: usize,
        bias: bool,
    ) -> Result<Self> {
        let fan_in = (in_c / groups) * kernel * kernel;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let weight = vb.get_with_hints(
            (out_c, in_c / groups, kernel, kernel),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(
                out_c,
                "bias",
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            groups,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let pads = match self.padding {
            Padding::Symmetric(p) => [p; 4],
            Padding::Explicit(t, b, l, r) => [t, b, l, r],
        };
        let y = crate::ops::conv2d_padded(x, &self.weight, pads, self.stride, self.groups)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// BatchNorm over dim 1 of a (B,C,H,W) or (B,C) tensor, PyTorch semantics: in training
/// mode it normalizes with the batch statistics (biased variance) and, when its buffers are
/// mutable (`ParamStore` training mode), updates the running statistics with `momentum` using
/// the unbiased variance; in eval mode it uses the running statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNorm {
    pub fn new(vb: VarBuilder, c: usize, eps: f64, momentum: f64) -> Result<Self> {
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
        // Registered so that checkpoints carry it; its value is never used.
        let _ = vb.get_with_hints((), "num_batches_tracked", Init::Const(0.0));
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            eps,
            momentum,
        })
    }

    /// Per-channel scale and shift equivalent to eval mode: y = x * scale + shift.
    pub fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let scale = (&self.weight / (&self.running_var + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (&self.running_mean * &scale)?)?;
        Ok((scale, shift))
    }

    /// Running statistics update from a batch's mean and biased variance over `n` values per
    /// channel (unbiased variance in the update, as PyTorch); only for mutable buffers.
    fn update_running_stats(&self, mean: &Tensor, var: &Tensor, n: usize) -> Result<()> {
        if !self.running_mean.is_variable() {
            return Ok(());
        }
        let m = self.momentum;
        let unbiased = (var.detach() * (n as f64 / (n.max(2) - 1) as f64))?;
        let new_mean = ((&self.running_mean * (1.0 - m))? + (mean.detach() * m)?)?;
        let new_var = ((&self.running_var * (1.0 - m))? + (unbiased * m)?)?;
        Var::from_tensor(&self.running_mean)?.set(&new_mean)?;
        Var::from_tensor(&self.running_var)?.set(&new_var)
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = x.dim(1)?;
        let mut bshape = vec![1usize; x.rank()];
        bshape[1] = c;
        if !train {
            let (scale, shift) = self.eval_scale_shift()?;
            return x
                .broadcast_mul(&scale.reshape(bshape.as_slice())?)?
                .broadcast_add(&shift.reshape(bshape.as_slice())?);
        }
        let n = x.elem_count() / c.max(1);
        // The fused kernel where it runs (CPU); the composition of candle ops elsewhere.
        if crate::ops::batchnorm::is_supported(x, &self.weight) {
            let out =
                crate::ops::batchnorm::batch_norm_train(x, &self.weight, &self.bias, self.eps)?;
            self.update_running_stats(&out.mean, &out.var, n)?;
            return Ok(out.y);
        }
        // Batch statistics over every dim but the channels, summed one dim at a time (short
        // f32 accumulations: one long sum over B·H·W drifts by ~1e-5, visible in the losses).
        let per_channel_mean = |t: &Tensor| -> Result<Tensor> {
            let mut t = t.clone();
            for d in (0..t.rank()).rev().filter(|&d| d != 1) {
                t = t.sum_keepdim(d)?;
            }
            t.flatten_all()? / n as f64
        };
        let mean = per_channel_mean(x)?;
        let centered = x.broadcast_sub(&mean.reshape(bshape.as_slice())?)?;
        let var = per_channel_mean(&centered.sqr()?)?;
        self.update_running_stats(&mean, &var, n)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let scale = (&self.weight * inv)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        x.broadcast_mul(&scale.reshape(bshape.as_slice())?)?
            .broadcast_add(&shift.reshape(bshape.as_slice())?)
    }
}

impl BatchNorm {
    /// `conv` followed by this BatchNorm in eval mode, as one convolution:
    /// w' = w·scale (per output channel), b' = b·scale + shift.
    pub fn fold_into(&self, conv: &Conv2d) -> Result<Conv2d> {
        let (scale, shift) = self.eval_scale_shift()?;
        let weight = conv
            .weight
            .broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
        let bias = match &conv.bias {
            Some(b) => ((b * &scale)? + shift)?,
            None => shift,
        };
        Ok(Conv2d {
            weight,
            bias: Some(bias),
            ..conv.clone()
        })
    }
}

/// A convolution followed by BatchNorm. When built for inference (the parameters are plain
/// tensors, not `Var`s that an optimizer or a training-mode forward would change), the eval-mode
/// BatchNorm is folded into the convolution once, at construction; a training-mode forward
/// (batch statistics) still runs the two separately.
#[derive(Debug, Clone)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    fused: Option<Conv2d>,
}

impl ConvBn {
    /// Folds the BatchNorm in when `fuse` is set and no parameter is a `Var`.
    pub fn new(conv: Conv2d, bn: BatchNorm, fuse: bool) -> Result<Self> {
        let frozen = !conv.weight.is_variable()
            && !conv.bias.as_ref().is_some_and(|b| b.is_variable())
            && ![&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var]
                .iter()
                .any(|t| t.is_variable());
        let fused = if fuse && frozen {
            Some(bn.fold_into(&conv)?)
        } else {
            None
        };
        Ok(Self { conv, bn, fused })
    }

    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.fused {
            Some(f) if !train => f.forward(x),
            _ => self.bn.forward_t(&self.conv.forward(x)?, train),
        }
    }
}

/// `nn.Linear`: y = x·Wᵀ + b over the last dimension. Leading dimensions are flattened into
/// one matrix product; candle_nn's `Linear` broadcasts W over them instead, whose backward
/// pass builds one weight-sized gradient per batch item before summing them.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl From<candle_nn::Linear> for Linear {
    fn from(l: candle_nn::Linear) -> Self {
        Self::new(l.weight().clone(), l.bias().cloned())
    }
}

/// `candle_nn::linear` (its initialization) as this [`Linear`].
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(candle_nn::linear(in_dim, out_dim, vb)?.into())
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let inner = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / inner.max(1);
        let y = x.reshape((rows, inner))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims.to_vec();
        *out.last_mut().expect("rank ≥ 1") = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// LayerNorm over the last dimension, PyTorch semantics (biased variance, `eps` inside the
/// square root). Computed in two passes (mean, then centered variance): candle's fused kernel
/// uses E[x²]−E[x]², which loses precision at eps 1e-12 and has no backward pass.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl LayerNorm {
    /// The composition of candle ops (any device or dtype; the fused kernel's reference).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

impl Module for LayerNorm {
    /// The fused kernel (forward and backward) where it runs, else the composition.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::ops::layernorm::is_supported(x, &self.weight, &self.bias) {
            crate::ops::layernorm::layer_norm(x, &self.weight, &self.bias, self.eps)
        } else {
            self.forward_composed(x)
        }
    }
}

/// Softmax over the last dimension: candle's fused kernel when no gradient is needed, the
/// differentiable composition otherwise.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// `F.normalize(x, dim=-1)`: x / max(‖x‖₂, 1e-12).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    x.broadcast_div(&norm.clamp(1e-12f32, f32::INFINITY)?)
}

thread_local! {
    /// The dropout masks' random stream once seeded on this thread (candle's own CPU
    /// generator cannot be seeded); `None`: candle's generator.
    static DROPOUT_RNG: std::cell::RefCell<Option<rand::rngs::StdRng>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes this thread's dropout masks a reproducible stream from `seed` (training replays a
/// forward exactly for gradient accumulation and `--resume`).
pub fn seed_dropout(seed: u64) {
    use rand::SeedableRng;
    DROPOUT_RNG.with(|r| *r.borrow_mut() = Some(rand::rngs::StdRng::seed_from_u64(seed)));
}

/// Inverted dropout as `nn.Dropout` in training mode; identity when `p` is 0 or not training.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    let mask = DROPOUT_RNG.with(|r| {
        r.borrow_mut().as_mut().map(|rng| {
            use rand::Rng;
            let scale = (1.0 / (1.0 - p)) as f32;
            let keep: Vec<f32> = (0..x.elem_count())
                .map(|_| if rng.gen::<f64>() >= p { scale } else { 0.0 })
                .collect();
            keep
        })
    });
    match mask {
        Some(keep) => x.mul(&Tensor::from_vec(keep, x.shape(), x.device())?.to_dtype(x.dtype())?),
        None => candle_nn::ops::dropout(x, p as f32),
    }
}
