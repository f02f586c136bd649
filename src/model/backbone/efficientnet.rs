//! EfficientNet-B0/B1/B2 (lukemelas' `efficientnet_pytorch`, as the reference builds it with
//! `EfficientNet.from_pretrained(name)`) and EfficientNet-Lite0/1/2 (the
//! `efficientnet_lite_pytorch` port of TensorFlow's Lite models), under their state-dict names:
//! `_conv_stem`, `_bn0`, `_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_se_reduce,
//! _se_expand,_project_conv,_bn2}`, `_conv_head`, `_bn1`, `_fc`.
//!
//! Convolutions use TensorFlow's static SAME padding computed for the model's *native*
//! resolution (224/240/260), as `Conv2dStaticSamePadding` does whatever the input size: the
//! reference feeds 224×224 images to B1 and B2 too, so their stride-2 layers pad as for 240/260.
//! BatchNorm: eps 1e-3, momentum 0.01 (TensorFlow's 0.99 in PyTorch's convention).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::config::LightModelKind;
use crate::model::backbone::LightEncoder;
use crate::model::layers::{same_padding, BatchNorm, Conv2d, ConvBn, Padding};

const BN_EPS: f64 = 1e-3;
const BN_MOMENTUM: f64 = 0.01;

/// One stage of the B0 baseline (`r1_k3_s11_e1_i32_o16_se0.25`, …): repeats, kernel, stride,
/// expansion, input and output filters. The Lite models share it, without squeeze-excite.
#[derive(Debug, Clone, Copy)]
struct Stage {
    repeats: usize,
    kernel: usize,
    stride: usize,
    expand: usize,
    input: usize,
    output: usize,
}

const fn stage(
    repeats: usize,
    kernel: usize,
    stride: usize,
    expand: usize,
    input: usize,
    output: usize,
) -> Stage {
    Stage {
        repeats,
        kernel,
        stride,
        expand,
        input,
        output,
    }
}

const STAGES: [Stage; 7] = [
    stage(1, 3, 1, 1, 32, 16),
    stage(2, 3, 2, 6, 16, 24),
    stage(2, 5, 2, 6, 24, 40),
    stage(3, 3, 2, 6, 40, 80),
    stage(3, 5, 1, 6, 80, 112),
    stage(4, 5, 2, 6, 112, 192),
    stage(1, 3, 1, 6, 192, 320),
];

const SE_RATIO: f64 = 0.25;

/// The scaling and variant of one family member, plus the training-time drop-connect rate.
#[derive(Debug, Clone, PartialEq)]
pub struct EfficientNetConfig {
    /// Width multiplier (channels, through `round_filters`).
    pub width: f64,
    /// Depth multiplier (repeats per stage, through `round_repeats`).
    pub depth: f64,
    /// The native resolution, for which the static SAME padding is computed.
    pub resolution: usize,
    /// Lite variant: no squeeze-excite, ReLU6, stem/head widths and first/last stage repeats
    /// not scaled.
    pub lite: bool,
    /// Drop-connect (stochastic depth) rate of the last block in training mode, scaled by
    /// `block_index / blocks` as the library does. The reference library trains with 0.2; the
    /// default here is 0 (off), the value the parity fixtures were produced with, so that
    /// training forwards are deterministic. Eval forwards never drop.
    pub drop_connect_rate: f64,
    /// Fold each BatchNorm into its convolution for eval-mode forwards when the parameters are
    /// frozen (inference store). Exact up to float rounding.
    pub fuse_bn: bool,
}

impl EfficientNetConfig {
    /// (width, depth, resolution) of `efficientnet_params` / the Lite builder.
    fn new(width: f64, depth: f64, resolution: usize, lite: bool) -> Self {
        Self {
            width,
            depth,
            resolution,
            lite,
            drop_connect_rate: 0.0,
            fuse_bn: true,
        }
    }

    /// The configuration of an EfficientNet kind, `None` for the other families.
    pub fn for_kind(kind: LightModelKind) -> Option<Self> {
        use LightModelKind::*;
        Some(match kind {
            EfficientNetB0 => Self::new(1.0, 1.0, 224, false),
            EfficientNetB1 => Self::new(1.0, 1.1, 240, false),
            EfficientNetB2 => Self::new(1.1, 1.2, 260, false),
            EfficientNetLite0 => Self::new(1.0, 1.0, 224, true),
            EfficientNetLite1 => Self::new(1.0, 1.1, 240, true),
            EfficientNetLite2 => Self::new(1.1, 1.2, 260, true),
            _ => return None,
        })
    }

    /// `round_filters`: scale by the width multiplier, round to a multiple of 8 (at least 8),
    /// never more than 10% down.
    pub fn round_filters(&self, filters: usize) -> usize {
        let f = filters as f64 * self.width;
        let mut new = ((f + 4.0) as usize / 8 * 8).max(8);
        if (new as f64) < 0.9 * f {
            new += 8;
        }
        new
    }

    /// `round_repeats`: ceil(depth multiplier × repeats).
    pub fn round_repeats(&self, repeats: usize) -> usize {
        (self.depth * repeats as f64).ceil() as usize
    }

    /// Output channels of the stem and of the head.
    fn stem_head(&self) -> (usize, usize) {
        if self.lite {
            (32, 1280)
        } else {
            (self.round_filters(32), self.round_filters(1280))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Swish,
    Relu6,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Swish if crate::ops::silu::is_supported(x) => crate::ops::silu::silu(x),
            Self::Swish => x.silu(),
            Self::Relu6 => x.relu()?.minimum(6f32),
        }
    }
}

/// Squeeze-and-excite: x · sigmoid(expand(act(reduce(mean over space of x)))).
#[derive(Debug, Clone)]
struct SqueezeExcite {
    reduce: Conv2d,
    expand: Conv2d,
}

/// Mobile inverted bottleneck block (`MBConvBlock`).
#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    se: Option<SqueezeExcite>,
    project: ConvBn,
    /// Identity skip: stride 1 and as many output channels as input channels.
    skip: bool,
    drop_rate: f64,
    act: Activation,
}

/// A bias-free convolution with static SAME padding for an input of side `image`, and its
/// BatchNorm.
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    vb: &VarBuilder,
    conv: &str,
    bn: &str,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    image: usize,
    fuse: bool,
) -> Result<ConvBn> {
    let padding = same_padding(image, kernel, stride, 1);
    let conv = Conv2d::new(
        vb.pp(conv),
        cin,
        cout,
        kernel,
        stride,
        padding,
        groups,
        false,
    )?;
    let bn = BatchNorm::new(vb.pp(bn), cout, BN_EPS, BN_MOMENTUM)?;
    ConvBn::new(conv, bn, fuse)
}

impl MbConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        cfg: &EfficientNetConfig,
        st: &Stage,
        input: usize,
        output: usize,
        stride: usize,
        image: usize,
        drop_rate: f64,
    ) -> Result<Self> {
        let fuse = cfg.fuse_bn;
        let hidden = input * st.expand;
        let expand = if st.expand != 1 {
            let e = conv_bn(
                &vb,
                "_expand_conv",
                "_bn0",
                input,
                hidden,
                1,
                1,
                1,
                image,
                fuse,
            )?;
            Some(e)
        } else {
            None
        };
        let depthwise = conv_bn(
            &vb,
            "_depthwise_conv",
            "_bn1",
            hidden,
            hidden,
            st.kernel,
            stride,
            hidden,
            image,
            fuse,
        )?;
        let se = if cfg.lite {
            None
        } else {
            let squeezed = ((input as f64 * SE_RATIO) as usize).max(1);
            let p = Padding::Symmetric(0);
            Some(SqueezeExcite {
                reduce: Conv2d::new(vb.pp("_se_reduce"), hidden, squeezed, 1, 1, p, 1, true)?,
                expand: Conv2d::new(vb.pp("_se_expand"), squeezed, hidden, 1, 1, p, 1, true)?,
            })
        };
        let project = conv_bn(
            &vb,
            "_project_conv",
            "_bn2",
            hidden,
            output,
            1,
            1,
            1,
            image.div_ceil(stride),
            fuse,
        )?;
        Ok(Self {
            expand,
            depthwise,
            se,
            project,
            skip: stride == 1 && input == output,
            drop_rate,
            act: if cfg.lite {
                Activation::Relu6
            } else {
                Activation::Swish
            },
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = match &self.expand {
            Some(e) => self.act.apply(&e.forward_t(x, train)?)?,
            None => x.clone(),
        };
        h = self.act.apply(&self.depthwise.forward_t(&h, train)?)?;
        if let Some(se) = &self.se {
            let s = h.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
            let s = se.reduce.forward(&s)?;
            let s = se.expand.forward(&self.act.apply(&s)?)?;
            h = h.broadcast_mul(&candle_nn::ops::sigmoid(&s)?)?;
        }
        h = self.project.forward_t(&h, train)?;
        if !self.skip {
            return Ok(h);
        }
        if train && self.drop_rate > 0.0 {
            h = drop_connect(&h, self.drop_rate)?;
        }
        h + x
    }
}

/// Drops whole samples with probability `p` and rescales the kept ones by 1/(1-p).
fn drop_connect(x: &Tensor, p: f64) -> Result<Tensor> {
    let keep = 1.0 - p;
    let mask = (Tensor::rand(0f32, 1f32, (x.dim(0)?, 1, 1, 1), x.device())? + keep)?
        .floor()?
        .to_dtype(x.dtype())?;
    x.broadcast_mul(&(mask / keep)?)
}

/// EfficientNet / EfficientNet-Lite. See the module documentation.
#[derive(Debug, Clone)]
pub struct EfficientNet {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    /// The ImageNet classifier, present when the weights carry it (unused by the features).
    fc: Option<Linear>,
    act: Activation,
    out_channels: usize,
}

impl EfficientNet {
    pub fn new(vb: VarBuilder, cfg: &EfficientNetConfig) -> Result<Self> {
        let (stem_c, head_c) = cfg.stem_head();
        let mut image = cfg.resolution;
        let stem = conv_bn(
            &vb,
            "_conv_stem",
            "_bn0",
            3,
            stem_c,
            3,
            2,
            1,
            image,
            cfg.fuse_bn,
        )?;
        image = image.div_ceil(2);

        // (stage, input, output, repeats) after scaling.
        let mut plan = Vec::new();
        for (i, st) in STAGES.iter().enumerate() {
            let mut input = cfg.round_filters(st.input);
            let output = cfg.round_filters(st.output);
            let fixed = cfg.lite && (i == 0 || i == STAGES.len() - 1);
            let repeats = if fixed {
                st.repeats
            } else {
                cfg.round_repeats(st.repeats)
            };
            if cfg.lite && i == 0 {
                input = stem_c;
            }
            plan.push((st, input, output, repeats));
        }
        let total: usize = plan.iter().map(|p| p.3).sum();
        let vb_blocks = vb.pp("_blocks");
        let mut blocks = Vec::with_capacity(total);
        for (st, input, output, repeats) in plan {
            for r in 0..repeats {
                let (cin, stride) = if r == 0 {
                    (input, st.stride)
                } else {
                    (output, 1)
                };
                let idx = blocks.len();
                let drop_rate = cfg.drop_connect_rate * idx as f64 / total as f64;
                let block = MbConv::new(
                    vb_blocks.pp(idx),
                    cfg,
                    st,
                    cin,
                    output,
                    stride,
                    image,
                    drop_rate,
                )?;
                blocks.push(block);
                image = image.div_ceil(stride);
            }
        }
        let last = cfg.round_filters(STAGES[STAGES.len() - 1].output);
        let head = conv_bn(
            &vb,
            "_conv_head",
            "_bn1",
            last,
            head_c,
            1,
            1,
            1,
            image,
            cfg.fuse_bn,
        )?;
        let fc = if vb.contains_tensor("_fc.weight") {
            Some(candle_nn::linear(head_c, 1000, vb.pp("_fc"))?)
        } else {
            None
        };
        Ok(Self {
            stem,
            blocks,
            head,
            fc,
            act: if cfg.lite {
                Activation::Relu6
            } else {
                Activation::Swish
            },
            out_channels: head_c,
        })
    }

    /// Number of MBConv blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// ImageNet logits (B,1000) in eval mode: features, global average pooling, `_fc`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let fc = self.fc.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("these EfficientNet weights have no `_fc` classifier".into())
        })?;
        let f = self.extract_features(x, false)?;
        fc.forward(&f.flatten_from(2)?.mean(D::Minus1)?)
    }
}

impl LightEncoder for EfficientNet {
    fn extract_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.act.apply(&self.stem.forward_t(x, train)?)?;
        for block in &self.blocks {
            h = block.forward_t(&h, train)?;
        }
        self.act.apply(&self.head.forward_t(&h, train)?)
    }

    fn out_channels(&self) -> usize {
        self.out_channels
    }

    fn is_fused(&self) -> bool {
        self.stem.is_fused()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_rules_match_the_library() {
        let b2 = EfficientNetConfig::for_kind(LightModelKind::EfficientNetB2).unwrap();
        // round_filters with width 1.1: 32→32, 16→16, 24→24, 40→48, 80→88, 112→120,
        // 192→208, 320→352, 1280→1408.
        let got: Vec<usize> = [32, 16, 24, 40, 80, 112, 192, 320, 1280]
            .iter()
            .map(|&f| b2.round_filters(f))
            .collect();
        assert_eq!(got, vec![32, 16, 24, 48, 88, 120, 208, 352, 1408]);
        let reps: Vec<usize> = STAGES.iter().map(|s| b2.round_repeats(s.repeats)).collect();
        assert_eq!(reps, vec![2, 3, 3, 4, 4, 5, 2]);
        let b1 = EfficientNetConfig::for_kind(LightModelKind::EfficientNetB1).unwrap();
        let reps: Vec<usize> = STAGES.iter().map(|s| b1.round_repeats(s.repeats)).collect();
        assert_eq!(reps, vec![2, 3, 3, 4, 4, 5, 2]);
    }
}
