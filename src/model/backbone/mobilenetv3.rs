//! MobileNetV3-Small and -Large as the xiaolai-sqlai `mobilenetv3` PyTorch repository (2021
//! version) defines them: every bottleneck has a residual (`skip` branch when the shape
//! changes) followed by the block's activation, and the SE module (pool, 1×1 conv, BN, ReLU,
//! 1×1 conv, hardsigmoid) acts on the expanded features after the depthwise convolution.

use std::collections::HashMap;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::LightEncoder;
use crate::model::layers::{BatchNorm, Conv2d, ConvBn, Padding};

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

/// A bias-free convolution at `vb.pp(c)` and its BatchNorm at `vb.pp(b)`, folded together for
/// inference when the weights are frozen (exact in eval mode).
fn conv_bn(
    vb: &VarBuilder,
    c: &str,
    b: &str,
    spec: (usize, usize, usize, usize, usize),
) -> Result<ConvBn> {
    let (i, o, k, stride, groups) = spec;
    ConvBn::new(
        conv(vb.pp(c), i, o, k, stride, groups)?,
        bn(vb.pp(b), o)?,
        true,
    )
}

/// `se.se = Sequential(AdaptiveAvgPool2d(1), Conv1x1, BN, ReLU, Conv1x1, Hardsigmoid)`.
struct SeModule {
    reduce: ConvBn,
    expand: Conv2d,
}

impl SeModule {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        let mid = (c / 4).max(8);
        Ok(Self {
            reduce: conv_bn(&vb, "1", "2", (c, mid, 1, 1, 1))?,
            expand: conv(vb.pp("4"), mid, c, 1, 1, 1)?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let s = x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
        let s = self.reduce.forward_t(&s, train)?.relu()?;
        let s = hardsigmoid(&self.expand.forward(&s)?)?;
        x.broadcast_mul(&s)
    }
}

/// The shortcut of a bottleneck, by the reference's three cases.
enum Skip {
    Identity,
    /// stride 1, channels change: 1×1 conv, BN.
    Pointwise(ConvBn),
    /// stride 2, same channels: depthwise 3×3 stride-2 conv, BN.
    Depthwise(ConvBn),
    /// stride 2, channels change: depthwise 3×3 stride-2 conv, BN, 1×1 conv with bias, BN.
    DepthwisePointwise(ConvBn, ConvBn),
}

impl Skip {
    fn new(vb: VarBuilder, i: usize, o: usize, stride: usize) -> Result<Self> {
        Ok(match (stride, i == o) {
            (1, true) => Skip::Identity,
            (1, false) => Skip::Pointwise(conv_bn(&vb, "0", "1", (i, o, 1, 1, 1))?),
            (_, true) => Skip::Depthwise(conv_bn(&vb, "0", "1", (i, i, 3, stride, i))?),
            (_, false) => Skip::DepthwisePointwise(
                conv_bn(&vb, "0", "1", (i, i, 3, stride, i))?,
                ConvBn::new(
                    Conv2d::new(vb.pp("2"), i, o, 1, 1, Padding::Symmetric(0), 1, true)?,
                    bn(vb.pp("3"), o)?,
                    true,
                )?,
            ),
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Skip::Identity => Ok(x.clone()),
            Skip::Pointwise(c) | Skip::Depthwise(c) => c.forward_t(x, train),
            Skip::DepthwisePointwise(dw, pw) => pw.forward_t(&dw.forward_t(x, train)?, train),
        }
    }
}

/// Expand (1×1) + depthwise + [SE] + project (1×1), then `act(out + skip)`.
struct Block {
    expand: ConvBn,
    depthwise: ConvBn,
    se: Option<SeModule>,
    project: ConvBn,
    act: Act,
    skip: Skip,
}

impl Block {
    fn new(vb: VarBuilder, s: &BlockSpec) -> Result<Self> {
        let &BlockSpec(k, i, e, o, act, se, stride) = s;
        Ok(Self {
            expand: conv_bn(&vb, "conv1", "bn1", (i, e, 1, 1, 1))?,
            depthwise: conv_bn(&vb, "conv2", "bn2", (e, e, k, stride, e))?,
            se: if se {
                Some(SeModule::new(vb.pp("se").pp("se"), e)?)
            } else {
                None
            },
            project: conv_bn(&vb, "conv3", "bn3", (e, o, 1, 1, 1))?,
            act,
            skip: Skip::new(vb.pp("skip"), i, o, stride)?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = self.act.apply(&self.expand.forward_t(x, train)?)?;
        let mut out = self.act.apply(&self.depthwise.forward_t(&out, train)?)?;
        if let Some(se) = &self.se {
            out = se.forward_t(&out, train)?;
        }
        let out = self.project.forward_t(&out, train)?;
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
    stem: ConvBn,
    bneck: Vec<Block>,
    last: ConvBn,
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
            stem: conv_bn(&vb, "conv1", "bn1", (3, 16, 3, 2, 1))?,
            bneck,
            last: conv_bn(&vb, "conv2", "bn2", (last_in, out_channels, 1, 1, 1))?,
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
        let mut h = hardswish(&self.stem.forward_t(x, train)?)?;
        for block in &self.bneck {
            h = block.forward_t(&h, train)?;
        }
        hardswish(&self.last.forward_t(&h, train)?)
    }

    fn out_channels(&self) -> usize {
        self.out_channels
    }

    fn is_fused(&self) -> bool {
        self.stem.is_fused()
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
