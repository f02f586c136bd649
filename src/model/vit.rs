//! EVA ViT (`visual_encoder.*`), the gallery side's frozen vision encoder (SPEC section 1).
//!
//! Any width/depth/heads: patch embedding (conv k=s=patch, done as one matrix product over
//! non-overlapping patches), class token, absolute position embedding, pre-norm blocks with
//! `qkv` (no bias of its own; `q_bias`/`v_bias` with zeros for k), optional layer scale
//! (`gamma_1`/`gamma_2`), exact-erf GELU MLP. No final norm.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::layers::{self, softmax_last_dim, LayerNorm, Linear};
use crate::config::ModelConfig;

#[derive(Debug, Clone)]
struct Attention {
    /// (3W, W)
    qkv_weight: Tensor,
    /// (3W,): `q_bias`, zeros, `v_bias`
    qkv_bias: Tensor,
    proj: Linear,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, width: usize, heads: usize) -> Result<Self> {
        let qkv_weight = vb.get_with_hints((3 * width, width), "qkv.weight", init_w())?;
        let q_bias = vb.get_with_hints(width, "q_bias", Init::Const(0.0))?;
        let v_bias = vb.get_with_hints(width, "v_bias", Init::Const(0.0))?;
        let qkv_bias = Tensor::cat(&[&q_bias, &q_bias.zeros_like()?, &v_bias], 0)?;
        let proj = layers::linear(width, width, vb.pp("proj"))?;
        Ok(Self {
            qkv_weight,
            qkv_bias,
            proj,
            heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, w) = x.dims3()?;
        let hd = w / self.heads;
        let qkv = x
            .reshape((b * n, w))?
            .matmul(&self.qkv_weight.t()?)?
            .broadcast_add(&self.qkv_bias)?
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?; // (3, B, H, N, hd)
        let q = (qkv.get(0)?.contiguous()? * (hd as f64).powf(-0.5))?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let attn = softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, w))?;
        self.proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    gamma_1: Option<Tensor>,
    gamma_2: Option<Tensor>,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (w, hidden) = (cfg.vit_width, cfg.vit_mlp_hidden());
        // Layer scale only when the checkpoint has it (BLIP-2's EVA ViT-g does not).
        let gamma = |name: &str| -> Result<Option<Tensor>> {
            if vb.contains_tensor(name) {
                Ok(Some(vb.get(w, name)?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), w, cfg.vit_ln_eps)?,
            attn: Attention::new(vb.pp("attn"), w, cfg.vit_heads)?,
            norm2: LayerNorm::new(vb.pp("norm2"), w, cfg.vit_ln_eps)?,
            fc1: layers::linear(w, hidden, vb.pp("mlp.fc1"))?,
            fc2: layers::linear(hidden, w, vb.pp("mlp.fc2"))?,
            gamma_1: gamma("gamma_1")?,
            gamma_2: gamma("gamma_2")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let scaled = |y: Tensor, g: &Option<Tensor>| match g {
            Some(g) => y.broadcast_mul(g),
            None => Ok(y),
        };
        let a = scaled(self.attn.forward(&self.norm1.forward(x)?)?, &self.gamma_1)?;
        let x = (x + a)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        let m = scaled(self.fc2.forward(&h)?, &self.gamma_2)?;
        x + m
    }
}

/// The EVA vision transformer. `forward` maps normalized pixels (B,3,S,S) to tokens
/// (B, (S/patch)²+1, width), class token first.
#[derive(Debug, Clone)]
pub struct EvaVit {
    /// `patch_embed.proj.weight` flattened to (W, 3·p·p)
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    patch: usize,
    width: usize,
}

impl EvaVit {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (w, p) = (cfg.vit_width, cfg.patch_size);
        let patch_weight = vb
            .get_with_hints((w, 3, p, p), "patch_embed.proj.weight", init_w())?
            .reshape((w, 3 * p * p))?;
        let patch_bias = vb.get_with_hints(w, "patch_embed.proj.bias", Init::Const(0.0))?;
        let cls_token = vb.get_with_hints((1, 1, w), "cls_token", init_w())?;
        let pos_embed = vb.get_with_hints((1, cfg.vit_tokens(), w), "pos_embed", init_w())?;
        let blocks = (0..cfg.vit_depth)
            .map(|i| Block::new(vb.pp(format!("blocks.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_weight,
            patch_bias,
            cls_token,
            pos_embed,
            blocks,
            patch: p,
            width: w,
        })
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        if c != 3 || gh * p != h || gw * p != w || gh * gw + 1 != self.pos_embed.dim(1)? {
            candle_core::bail!(
                "ViT expects (B,3,H,W) pixels making {} patches of {p}x{p}, got {:?}",
                self.pos_embed.dim(1)? - 1,
                pixels.dims()
            );
        }
        // Non-overlapping patches as rows (B·gh·gw, 3·p·p), in the conv weight's (c,ky,kx) order.
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let x = patches
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?
            .reshape((b, gh * gw, self.width))?;
        let cls = self.cls_token.broadcast_as((b, 1, self.width))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        Ok(x)
    }

    pub fn width(&self) -> usize {
        self.width
    }
}

fn init_w() -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    }
}
