//! EfficientViT (Liu et al., "EfficientViT: Memory Efficient Vision Transformer with Cascaded
//! Group Attention", CVPR 2023) as microsoft/Cream `EfficientViT/classification` defines it:
//! a 4-conv patch embedding (stride 16), three stages of sandwich blocks
//! (dw conv, FFN, local-window cascaded group attention, dw conv, FFN, each residual) joined by
//! subsample blocks (dw+FFN, PatchMerging with SE, dw+FFN).

use std::collections::HashMap;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

use super::LightEncoder;
use crate::model::layers::{self, BatchNorm, Conv2d, Padding};

/// PyTorch `BatchNorm2d` defaults.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// The model configuration of the reference's `build.py` (`EfficientViT_m*` dicts).
#[derive(Debug, Clone, PartialEq)]
pub struct EfficientVitConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub embed_dim: [usize; 3],
    pub key_dim: [usize; 3],
    pub depth: [usize; 3],
    pub num_heads: [usize; 3],
    pub window_size: [usize; 3],
    /// Kernel of the depthwise conv on each head's queries.
    pub kernels: [usize; 4],
}

impl EfficientVitConfig {
    pub fn m2() -> Self {
        Self {
            img_size: 224,
            patch_size: 16,
            embed_dim: [128, 192, 224],
            key_dim: [16, 16, 16],
            depth: [1, 2, 3],
            num_heads: [4, 3, 2],
            window_size: [7, 7, 7],
            kernels: [7, 5, 3, 3],
        }
    }

    pub fn m4() -> Self {
        Self {
            embed_dim: [128, 256, 384],
            num_heads: [4, 4, 4],
            ..Self::m2()
        }
    }
}

/// `Conv2d_BN`: a bias-free convolution (`c`) and its BatchNorm (`bn`), folded together for
/// inference when the weights are frozen (exact in eval mode).
struct ConvBn(layers::ConvBn);

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        a: usize,
        b: usize,
        ks: usize,
        stride: usize,
        pad: usize,
        groups: usize,
    ) -> Result<Self> {
        let c = Conv2d::new(
            vb.pp("c"),
            a,
            b,
            ks,
            stride,
            Padding::Symmetric(pad),
            groups,
            false,
        )?;
        let bn = BatchNorm::new(vb.pp("bn"), b, BN_EPS, BN_MOMENTUM)?;
        Ok(Self(layers::ConvBn::new(c, bn, true)?))
    }

    fn pointwise(vb: VarBuilder, a: usize, b: usize) -> Result<Self> {
        Self::new(vb, a, b, 1, 1, 0, 1)
    }

    /// Depthwise `k`×`k`, stride 1, same size.
    fn depthwise(vb: VarBuilder, c: usize, k: usize) -> Result<Self> {
        Self::new(vb, c, c, k, 1, k / 2, c)
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.0.forward_t(x, train)
    }
}

/// `FFN`: pointwise expand (×2), ReLU, pointwise project.
struct Ffn {
    pw1: ConvBn,
    pw2: ConvBn,
}

impl Ffn {
    fn new(vb: VarBuilder, ed: usize) -> Result<Self> {
        Ok(Self {
            pw1: ConvBn::pointwise(vb.pp("pw1"), ed, 2 * ed)?,
            pw2: ConvBn::pointwise(vb.pp("pw2"), 2 * ed, ed)?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.pw2
            .forward_t(&self.pw1.forward_t(x, train)?.relu()?, train)
    }
}

/// The reference's `attention_bias_idxs` for a `res`×`res` window: for each pair of positions
/// (row-major), the index of their offset `(|dy|, |dx|)` in order of first appearance. Returns
/// the N×N indices, flattened, and the number of distinct offsets.
pub fn attention_bias_idxs(res: usize) -> (Vec<u32>, usize) {
    let points: Vec<(usize, usize)> = (0..res)
        .flat_map(|i| (0..res).map(move |j| (i, j)))
        .collect();
    let mut offsets: HashMap<(usize, usize), u32> = HashMap::new();
    let mut idxs = Vec::with_capacity(points.len() * points.len());
    for p1 in &points {
        for p2 in &points {
            let off = (p1.0.abs_diff(p2.0), p1.1.abs_diff(p2.1));
            let next = offsets.len() as u32;
            idxs.push(*offsets.entry(off).or_insert(next));
        }
    }
    (idxs, offsets.len())
}

/// `CascadedGroupAttention` over one window (B, C, r, r): head i sees the i-th channel chunk
/// plus head i-1's output; its queries pass a depthwise conv; a learned bias per relative
/// offset is added to the scaled logits.
struct CascadedGroupAttention {
    qkvs: Vec<ConvBn>,
    dws: Vec<ConvBn>,
    proj: ConvBn,
    attention_biases: Tensor,
    bias_idxs: Tensor,
    key_dim: usize,
    d: usize,
    scale: f64,
    resolution: usize,
}

impl CascadedGroupAttention {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        dim: usize,
        key_dim: usize,
        num_heads: usize,
        attn_ratio: f64,
        resolution: usize,
        kernels: &[usize; 4],
    ) -> Result<Self> {
        let d = (attn_ratio * key_dim as f64) as usize;
        let mut qkvs = Vec::with_capacity(num_heads);
        let mut dws = Vec::with_capacity(num_heads);
        if num_heads > kernels.len() {
            candle_core::bail!("{num_heads} heads but only {} query kernels", kernels.len());
        }
        for (i, &k) in kernels.iter().take(num_heads).enumerate() {
            let i = i.to_string();
            qkvs.push(ConvBn::pointwise(
                vb.pp("qkvs").pp(&i),
                dim / num_heads,
                2 * key_dim + d,
            )?);
            dws.push(ConvBn::depthwise(vb.pp("dws").pp(&i), key_dim, k)?);
        }
        let proj = ConvBn::pointwise(vb.pp("proj").pp("1"), d * num_heads, dim)?;
        let (idxs, n_offsets) = attention_bias_idxs(resolution);
        let n = resolution * resolution;
        let attention_biases =
            vb.get_with_hints((num_heads, n_offsets), "attention_biases", Init::Const(0.0))?;
        // A buffer of the reference; when a checkpoint carries it, it must be ours.
        if vb.contains_tensor("attention_bias_idxs") {
            let stored = vb.get((n, n), "attention_bias_idxs")?;
            let stored: Vec<f32> = stored.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            if stored.iter().zip(&idxs).any(|(&s, &c)| s != c as f32) {
                candle_core::bail!(
                    "{}.attention_bias_idxs does not match a {resolution}x{resolution} window",
                    vb.prefix()
                );
            }
        }
        let bias_idxs = Tensor::from_vec(idxs, n * n, vb.device())?;
        Ok(Self {
            qkvs,
            dws,
            proj,
            attention_biases,
            bias_idxs,
            key_dim,
            d,
            scale: (key_dim as f64).powf(-0.5),
            resolution,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, _c, h, w) = x.dims4()?;
        let n = h * w;
        if h != self.resolution || w != self.resolution {
            candle_core::bail!(
                "cascaded group attention expects {0}x{0} windows, got {h}x{w}",
                self.resolution
            );
        }
        let heads = self.qkvs.len();
        // `attention_biases[:, attention_bias_idxs]`: (heads, N, N).
        let ab = self
            .attention_biases
            .index_select(&self.bias_idxs, 1)?
            .reshape((heads, n, n))?;
        let feats_in = x.chunk(heads, 1)?;
        let (kd, d) = (self.key_dim, self.d);
        let mut feats_out = Vec::with_capacity(heads);
        let mut feat = feats_in[0].clone();
        for (i, (qkv, dw)) in self.qkvs.iter().zip(&self.dws).enumerate() {
            if i > 0 {
                feat = (feat + &feats_in[i])?;
            }
            let f = qkv.forward_t(&feat.contiguous()?, train)?;
            let q = dw.forward_t(&f.narrow(1, 0, kd)?.contiguous()?, train)?;
            let q = q.reshape((b, kd, n))?;
            let k = f.narrow(1, kd, kd)?.contiguous()?.reshape((b, kd, n))?;
            let v = f.narrow(1, 2 * kd, d)?.contiguous()?.reshape((b, d, n))?;
            let logits =
                (q.transpose(1, 2)?.matmul(&k)? * self.scale)?.broadcast_add(&ab.get(i)?)?;
            let attn = candle_nn::ops::softmax(&logits, D::Minus1)?;
            feat = v.matmul(&attn.transpose(1, 2)?)?.reshape((b, d, h, w))?;
            feats_out.push(feat.clone());
        }
        self.proj
            .forward_t(&Tensor::cat(&feats_out, 1)?.relu()?, train)
    }
}

/// `LocalWindowAttention`: cascaded group attention within non-overlapping windows (the map
/// zero-padded at the bottom/right to a multiple of the window), or over the whole map when it
/// fits in one window.
struct LocalWindowAttention {
    attn: CascadedGroupAttention,
    resolution: usize,
    window: usize,
}

impl LocalWindowAttention {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let r = self.resolution;
        if h != r || w != r {
            candle_core::bail!("EfficientViT stage expects a {r}x{r} feature map, got {h}x{w}");
        }
        let win = self.window;
        if h <= win && w <= win {
            return self.attn.forward_t(x, train);
        }
        let (pad_b, pad_r) = ((win - h % win) % win, (win - w % win) % win);
        let xp = x.pad_with_zeros(2, 0, pad_b)?.pad_with_zeros(3, 0, pad_r)?;
        let (nh, nw) = ((h + pad_b) / win, (w + pad_r) / win);
        // (B, C, nH·win, nW·win) -> (B·nH·nW, C, win, win)
        let windows = xp
            .reshape(vec![b, c, nh, win, nw, win])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b * nh * nw, c, win, win))?;
        let y = self.attn.forward_t(&windows, train)?;
        let y = y
            .reshape(vec![b, nh, nw, c, win, win])?
            .permute(vec![0, 3, 1, 4, 2, 5])?
            .contiguous()?
            .reshape((b, c, nh * win, nw * win))?;
        if pad_b > 0 || pad_r > 0 {
            y.narrow(2, 0, h)?.narrow(3, 0, w)?.contiguous()
        } else {
            Ok(y)
        }
    }
}

/// `EfficientViTBlock`: residual dw0, ffn0, mixer, dw1, ffn1 (`<name>.m.*`).
struct EfficientVitBlock {
    dw0: ConvBn,
    ffn0: Ffn,
    mixer: LocalWindowAttention,
    dw1: ConvBn,
    ffn1: Ffn,
}

impl EfficientVitBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = (x + self.dw0.forward_t(x, train)?)?;
        let x = (&x + self.ffn0.forward_t(&x, train)?)?;
        let x = (&x + self.mixer.forward_t(&x, train)?)?;
        let x = (&x + self.dw1.forward_t(&x, train)?)?;
        &x + self.ffn1.forward_t(&x, train)?
    }
}

/// timm's `SqueezeExcite` (`fc1`, ReLU, `fc2`, sigmoid gate; both 1×1 convs with bias).
struct SqueezeExcite {
    fc1: Conv2d,
    fc2: Conv2d,
}

impl SqueezeExcite {
    fn new(vb: VarBuilder, c: usize, rd_ratio: f64) -> Result<Self> {
        // timm `make_divisible(c * rd_ratio, 8, round_limit=0)`.
        let v = c as f64 * rd_ratio;
        let rd = 8usize.max(((v + 4.0) as usize) / 8 * 8);
        let pw = |vb, i, o| Conv2d::new(vb, i, o, 1, 1, Padding::Symmetric(0), 1, true);
        Ok(Self {
            fc1: pw(vb.pp("fc1"), c, rd)?,
            fc2: pw(vb.pp("fc2"), rd, c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
        let s = self.fc2.forward(&self.fc1.forward(&s)?.relu()?)?;
        x.broadcast_mul(&candle_nn::ops::sigmoid(&s)?)
    }
}

/// `PatchMerging`: 1×1 expand (×4), ReLU, depthwise 3×3 stride 2, ReLU, SE, 1×1 project.
struct PatchMerging {
    conv1: ConvBn,
    conv2: ConvBn,
    se: SqueezeExcite,
    conv3: ConvBn,
}

impl PatchMerging {
    fn new(vb: VarBuilder, dim: usize, out_dim: usize) -> Result<Self> {
        let hid = 4 * dim;
        Ok(Self {
            conv1: ConvBn::pointwise(vb.pp("conv1"), dim, hid)?,
            conv2: ConvBn::new(vb.pp("conv2"), hid, hid, 3, 2, 1, hid)?,
            se: SqueezeExcite::new(vb.pp("se"), hid, 0.25)?,
            conv3: ConvBn::pointwise(vb.pp("conv3"), hid, out_dim)?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.conv1.forward_t(x, train)?.relu()?;
        let x = self.conv2.forward_t(&x, train)?.relu()?;
        self.conv3.forward_t(&self.se.forward(&x)?, train)
    }
}

/// One entry of a `blocksN` Sequential.
enum Layer {
    Block(Box<EfficientVitBlock>),
    /// `Sequential(Residual(dw 3×3), Residual(FFN))` around a PatchMerging (`.0.m`, `.1.m`).
    DwFfn(ConvBn, Ffn),
    PatchMerging(PatchMerging),
}

impl Layer {
    fn dw_ffn(vb: VarBuilder, ed: usize) -> Result<Self> {
        Ok(Layer::DwFfn(
            ConvBn::depthwise(vb.pp("0").pp("m"), ed, 3)?,
            Ffn::new(vb.pp("1").pp("m"), ed)?,
        ))
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Layer::Block(b) => b.forward_t(x, train),
            Layer::DwFfn(dw, ffn) => {
                let x = (x + dw.forward_t(x, train)?)?;
                &x + ffn.forward_t(&x, train)?
            }
            Layer::PatchMerging(pm) => pm.forward_t(x, train),
        }
    }
}

/// EfficientViT (reference naming: `patch_embed.{0,2,4,6}`, `blocks1..3`, `head.{bn,l}`).
pub struct EfficientVit {
    patch_embed: [ConvBn; 4],
    stages: [Vec<Layer>; 3],
    head_bn: BatchNorm,
    head_l: Linear,
    out_channels: usize,
}

impl EfficientVit {
    pub fn new(vb: VarBuilder, cfg: &EfficientVitConfig) -> Result<Self> {
        let ed = cfg.embed_dim;
        let pe = vb.pp("patch_embed");
        let chans = [3, ed[0] / 8, ed[0] / 4, ed[0] / 2, ed[0]];
        let conv = |i: usize| {
            ConvBn::new(
                pe.pp((2 * i).to_string()),
                chans[i],
                chans[i + 1],
                3,
                2,
                1,
                1,
            )
        };
        let patch_embed = [conv(0)?, conv(1)?, conv(2)?, conv(3)?];

        let mut resolution = cfg.img_size / cfg.patch_size;
        let mut stages: [Vec<Layer>; 3] = Default::default();
        for i in 0..3 {
            let svb = vb.pp(format!("blocks{}", i + 1));
            let (kd, nh, win) = (cfg.key_dim[i], cfg.num_heads[i], cfg.window_size[i]);
            let attn_ratio = ed[i] as f64 / (kd * nh) as f64;
            for _ in 0..cfg.depth[i] {
                let bvb = svb.pp(stages[i].len().to_string());
                let attn = CascadedGroupAttention::new(
                    bvb.pp("mixer").pp("m").pp("attn"),
                    ed[i],
                    kd,
                    nh,
                    attn_ratio,
                    win.min(resolution),
                    &cfg.kernels,
                )?;
                stages[i].push(Layer::Block(Box::new(EfficientVitBlock {
                    dw0: ConvBn::depthwise(bvb.pp("dw0").pp("m"), ed[i], 3)?,
                    ffn0: Ffn::new(bvb.pp("ffn0").pp("m"), ed[i])?,
                    mixer: LocalWindowAttention {
                        attn,
                        resolution,
                        window: win,
                    },
                    dw1: ConvBn::depthwise(bvb.pp("dw1").pp("m"), ed[i], 3)?,
                    ffn1: Ffn::new(bvb.pp("ffn1").pp("m"), ed[i])?,
                })));
            }
            // Subsample (stride 2) into the next stage, at the head of its Sequential.
            if i < 2 {
                let nvb = vb.pp(format!("blocks{}", i + 2));
                stages[i + 1].push(Layer::dw_ffn(nvb.pp("0"), ed[i])?);
                stages[i + 1].push(Layer::PatchMerging(PatchMerging::new(
                    nvb.pp("1"),
                    ed[i],
                    ed[i + 1],
                )?));
                stages[i + 1].push(Layer::dw_ffn(nvb.pp("2"), ed[i + 1])?);
                resolution = (resolution - 1) / 2 + 1;
            }
        }
        let c = ed[2];
        Ok(Self {
            patch_embed,
            stages,
            head_bn: BatchNorm::new(vb.pp("head").pp("bn"), c, BN_EPS, BN_MOMENTUM)?,
            head_l: candle_nn::linear(c, 1000, vb.pp("head").pp("l"))?,
            out_channels: c,
        })
    }

    /// ImageNet logits (eval mode), for checking pretrained weights.
    pub fn classify(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.extract_features(x, false)?;
        let pooled = f.flatten_from(2)?.mean(D::Minus1)?;
        self.head_l
            .forward(&self.head_bn.forward_t(&pooled, false)?)
    }
}

impl LightEncoder for EfficientVit {
    /// The output of `blocks3`: (B, 224 | 384, 4, 4) at 224.
    fn extract_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, conv) in self.patch_embed.iter().enumerate() {
            h = conv.forward_t(&h, train)?;
            if i < 3 {
                h = h.relu()?;
            }
        }
        for layer in self.stages.iter().flatten() {
            h = layer.forward_t(&h, train)?;
        }
        Ok(h)
    }

    fn out_channels(&self) -> usize {
        self.out_channels
    }

    fn is_fused(&self) -> bool {
        self.patch_embed[0].0.is_fused()
    }
}

/// Maps a microsoft/Cream EfficientViT release (`{"model": state_dict}`) to
/// `light_visual_encoder.*`. As the reference's `build.py` does, 2-d convolution weights
/// (SE layers saved as linear weights) get two trailing unit dimensions.
pub fn map_pretrained(state_dict: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    const TOP: [&str; 6] = [
        "patch_embed",
        "blocks1",
        "blocks2",
        "blocks3",
        "head",
        "head_dist",
    ];
    let head = format!("{}.head", super::PREFIX);
    super::rename_pretrained(state_dict, &TOP)
        .into_iter()
        .map(|(k, t)| {
            let is_conv = k.ends_with(".weight") && !k.starts_with(&head);
            let t = if is_conv && t.rank() == 2 {
                t.unsqueeze(2)?.unsqueeze(3)?
            } else {
                t
            };
            Ok((k, t))
        })
        .collect()
}
