//! MobileNetV3-Small and -Large as the xiaolai-sqlai `mobilenetv3` PyTorch repository (2021
//! version) defines them: every bottleneck has a residual (`skip` branch when the shape
//! changes) followed by the block's activation, and the SE module (pool, 1×1 conv, BN, ReLU,
//! 1×1 conv, hardsigmoid) acts on the expanded features after the depthwise convolution.

use std::collections::HashMap;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::LightEncoder;
use crate::model::layers::{BatchNorm, Conv2d, Padding};

/// PyTorch `BatchNorm2d` defaults.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// Which network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Small,
    Large,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Relu,
    Hardswish,
}

/// `Block(kernel_size, in_size, expand_size, out_size, act, se, stride)` of the reference.
struct BlockSpec(usize, usize, usize, usize, Act, bool, usize);

use Act::{Hardswish as HS, Relu as RE};

const SMALL: [BlockSpec; 11] = [
    BlockSpec(3, 16, 16, 16, RE, true, 2),
    BlockSpec(3, 16, 72, 24, RE, false, 2),
    BlockSpec(3, 24, 88, 24, RE, false, 1),
    BlockSpec(5, 24, 96, 40, HS, true, 2),
    BlockSpec(5, 40, 240, 40, HS, true, 1),
    BlockSpec(5, 40, 240, 40, HS, true, 1),
    BlockSpec(5, 40, 120, 48, HS, true, 1),
    BlockSpec(5, 48, 144, 48, HS, true, 1),
    BlockSpec(5, 48, 288, 96, HS, true, 2),
    BlockSpec(5, 96, 576, 96, HS, true, 1),
    BlockSpec(5, 96, 576, 96, HS, true, 1),
];

const LARGE: [BlockSpec; 15] = [
    BlockSpec(3, 16, 16, 16, RE, false, 1),
    BlockSpec(3, 16, 64, 24, RE, false, 2),
    BlockSpec(3, 24, 72, 24, RE, false, 1),
    BlockSpec(5, 24, 72, 40, RE, true, 2),
    BlockSpec(5, 40, 120, 40, RE, true, 1),
    BlockSpec(5, 40, 120, 40, RE, true, 1),
    BlockSpec(3, 40, 240, 80, HS, false, 2),
    BlockSpec(3, 80, 200, 80, HS, false, 1),
    BlockSpec(3, 80, 184, 80, HS, false, 1),
    BlockSpec(3, 80, 184, 80, HS, false, 1),
    BlockSpec(3, 80, 480, 112, HS, true, 1),
    BlockSpec(3, 112, 672, 112, HS, true, 1),
    BlockSpec(5, 112, 672, 160, HS, true, 2),
    BlockSpec(5, 160, 672, 160, HS, true, 1),
    BlockSpec(5, 160, 960, 160, HS, true, 1),
];

/// `relu6(x + 3) / 6`, PyTorch's `Hardsigmoid`.
pub fn hardsigmoid(x: &Tensor) -> Result<Tensor> {
    (x + 3.0)?.clamp(0f32, 6f32)? / 6.0
}

/// `x * relu6(x + 3) / 6`, PyTorch's `Hardswish`.
pub fn hardswish(x: &Tensor) -> Result<Tensor> {
    x * hardsigmoid(x)?
}

impl Act {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::Relu => x.relu(),
            Act::Hardswish => hardswish(x),
        }
    }
}

fn bn(vb: VarBuilder, c: usize) -> Result<BatchNorm> {
    BatchNorm::new(vb, c, BN_EPS, BN_MOMENTUM)
}

/// A bias-free convolution with PyTorch's `padding = k // 2`.
fn conv(
    vb: VarBuilder,
    i: usize,
    o: usize,
    k: usize,
    stride: usize,
    groups: usize,
) -> Result<Conv2d> {
    Conv2d::new(
        vb,
        i,
        o,
        k,
        stride,
        Padding::Symmetric(k / 2),
        groups,
        false,
    )
}

/// `se.se = Sequential(AdaptiveAvgPool2d(1), Conv1x1, BN, ReLU, Conv1x1, Hardsigmoid)`.
struct SeModule {
    reduce: Conv2d,
    bn: BatchNorm,
    expand: Conv2d,
}

impl SeModule {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        let mid = (c / 4).max(8);
        Ok(Self {
            reduce: conv(vb.pp("1"), c, mid, 1, 1, 1)?,
            bn: bn(vb.pp("2"), mid)?,
            expand: conv(vb.pp("4"), mid, c, 1, 1, 1)?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let s = x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
        let s = self
            .bn
            .forward_t(&self.reduce.forward(&s)?, train)?
            .relu()?;
        let s = hardsigmoid(&self.expand.forward(&s)?)?;
        x.broadcast_mul(&s)
    }
}

/// The shortcut of a bottleneck, by the reference's three cases.
enum Skip {
    Identity,
    /// stride 1, channels change: 1×1 conv, BN.
    Pointwise(Conv2d, BatchNorm),
    /// stride 2, same channels: depthwise 3×3 stride-2 conv, BN.
    Depthwise(Conv2d, BatchNorm),
    /// stride 2, channels change: depthwise 3×3 stride-2 conv, BN, 1×1 conv with bias, BN.
    DepthwisePointwise(Conv2d, BatchNorm, Conv2d, BatchNorm),
}

impl Skip {
    fn new(vb: VarBuilder, i: usize, o: usize, stride: usize) -> Result<Self> {
        Ok(match (stride, i == o) {
            (1, true) => Skip::Identity,
            (1, false) => Skip::Pointwise(conv(vb.pp("0"), i, o, 1, 1, 1)?, bn(vb.pp("1"), o)?),
            (_, true) => Skip::Depthwise(conv(vb.pp("0"), i, i, 3, stride, i)?, bn(vb.pp("1"), i)?),
            (_, false) => Skip::DepthwisePointwise(
                conv(vb.pp("0"), i, i, 3, stride, i)?,
                bn(vb.pp("1"), i)?,
                Conv2d::new(vb.pp("2"), i, o, 1, 1, Padding::Symmetric(0), 1, true)?,
                bn(vb.pp("3"), o)?,
            ),
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Skip::Identity => Ok(x.clone()),
            Skip::Pointwise(c, b) | Skip::Depthwise(c, b) => b.forward_t(&c.forward(x)?, train),
            Skip::DepthwisePointwise(dw, b1, pw, b2) => {
                let y = b1.forward_t(&dw.forward(x)?, train)?;
                b2.forward_t(&pw.forward(&y)?, train)
            }
        }
    }
}

/// Expand (1×1) + depthwise + [SE] + project (1×1), then `act(out + skip)`.
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    se: Option<SeModule>,
    conv3: Conv2d,
    bn3: BatchNorm,
    act: Act,
    skip: Skip,
}

impl Block {
    fn new(vb: VarBuilder, s: &BlockSpec) -> Result<Self> {
        let &BlockSpec(k, i, e, o, act, se, stride) = s;
        Ok(Self {
            conv1: conv(vb.pp("conv1"), i, e, 1, 1, 1)?,
            bn1: bn(vb.pp("bn1"), e)?,
            conv2: conv(vb.pp("conv2"), e, e, k, stride, e)?,
            bn2: bn(vb.pp("bn2"), e)?,
            se: if se {
                Some(SeModule::new(vb.pp("se").pp("se"), e)?)
            } else {
                None
            },
            conv3: conv(vb.pp("conv3"), e, o, 1, 1, 1)?,
            bn3: bn(vb.pp("bn3"), o)?,
            act,
            skip: Skip::new(vb.pp("skip"), i, o, stride)?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = self
            .act
            .apply(&self.bn1.forward_t(&self.conv1.forward(x)?, train)?)?;
        let mut out = self
            .act
            .apply(&self.bn2.forward_t(&self.conv2.forward(&out)?, train)?)?;
        if let Some(se) = &self.se {
            out = se.forward_t(&out, train)?;
        }
        let out = self.bn3.forward_t(&self.conv3.forward(&out)?, train)?;
        self.act.apply(&(out + self.skip.forward_t(x, train)?)?)
    }
}

/// The ImageNet classifier (`linear3`, `bn3`, hardswish, dropout, `linear4`): unused by
/// Slot4ACir but part of the reference module, so that checkpoints round-trip.
struct Classifier {
    linear3: Linear,
    bn3: BatchNorm,
    linear4: Linear,
}

/// MobileNetV3 (xiaolai-sqlai naming: `conv1`, `bn1`, `bneck.N.*`, `conv2`, `bn2`, `linear3`,
/// `bn3`, `linear4`).
pub struct MobileNetV3 {
    conv1: Conv2d,
    bn1: BatchNorm,
    bneck: Vec<Block>,
    conv2: Conv2d,
    bn2: BatchNorm,
    classifier: Classifier,
    out_channels: usize,
}

impl MobileNetV3 {
    pub fn new(vb: VarBuilder, variant: Variant) -> Result<Self> {
        let specs: &[BlockSpec] = match variant {
            Variant::Small => &SMALL,
            Variant::Large => &LARGE,
        };
        let last_in = specs.last().map(|s| s.3).unwrap_or(16);
        let out_channels = match variant {
            Variant::Small => 576,
            Variant::Large => 960,
        };
        let bneck = specs
            .iter()
            .enumerate()
            .map(|(n, s)| Block::new(vb.pp("bneck").pp(n.to_string()), s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv1: conv(vb.pp("conv1"), 3, 16, 3, 2, 1)?,
            bn1: bn(vb.pp("bn1"), 16)?,
            bneck,
            conv2: conv(vb.pp("conv2"), last_in, out_channels, 1, 1, 1)?,
            bn2: bn(vb.pp("bn2"), out_channels)?,
            classifier: Classifier {
                linear3: candle_nn::linear_no_bias(out_channels, 1280, vb.pp("linear3"))?,
                bn3: bn(vb.pp("bn3"), 1280)?,
                linear4: candle_nn::linear(1280, 1000, vb.pp("linear4"))?,
            },
            out_channels,
        })
    }

    /// ImageNet logits (eval mode), for checking pretrained weights.
    pub fn classify(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.extract_features(x, false)?;
        let pooled = f.flatten_from(2)?.mean(D::Minus1)?;
        let c = &self.classifier;
        let h = hardswish(&c.bn3.forward_t(&c.linear3.forward(&pooled)?, false)?)?;
        c.linear4.forward(&h)
    }
}

impl LightEncoder for MobileNetV3 {
    /// Up to `hs2(bn2(conv2(...)))`: (B, 576 | 960, 7, 7) at 224.
    fn extract_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = hardswish(&self.bn1.forward_t(&self.conv1.forward(x)?, train)?)?;
        for block in &self.bneck {
            h = block.forward_t(&h, train)?;
        }
        hardswish(&self.bn2.forward_t(&self.conv2.forward(&h)?, train)?)
    }

    fn out_channels(&self) -> usize {
        self.out_channels
    }
}

/// Maps an xiaolai-sqlai checkpoint (a plain state dict, possibly saved from DataParallel with
/// `module.` prefixes, possibly inside `{"model": ...}`) to `light_visual_encoder.*`.
pub fn map_pretrained(state_dict: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    const TOP: [&str; 8] = [
        "conv1", "bn1", "bneck", "conv2", "bn2", "linear3", "bn3", "linear4",
    ];
    Ok(super::rename_pretrained(state_dict, &TOP))
}
