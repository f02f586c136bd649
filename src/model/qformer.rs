//! The Q-Former (`Qformer.bert.*`): a BERT encoder with a prefix of query embeddings (learned
//! query tokens, slots or anchors), cross-attention to image tokens in every
//! `cross_attention_freq`-th layer, and a separate feed-forward branch for the prefix positions
//! when image tokens are given (SPEC section 1).
//!
//! One forward serves the three passes the model needs:
//! - gallery: queries × image (`gallery`),
//! - joint: queries + text × image, queries and text attending to each other (`joint`),
//! - text-only with a prefix of slot/anchor embeddings and a mask (`text_with_prefix`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::layers::{dropout, softmax_last_dim, LayerNorm, Linear};
use crate::config::ModelConfig;

/// BERT's absolute position table size.
pub const MAX_POSITIONS: usize = 512;

/// Dropout of bert-base (`hidden_dropout_prob`, `attention_probs_dropout_prob`).
pub const BERT_DROPOUT: f64 = 0.1;

fn bert_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
    )?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// Splits (B,L,H·d) into (B,H,L,d), contiguous for the batched matrix products.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, w) = x.dims3()?;
    x.reshape((b, l, heads, w / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `BertAttention`: multi-head attention (self- or cross-) followed by `output.dense`,
/// dropout, residual and `output.LayerNorm`.
#[derive(Debug, Clone)]
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &ModelConfig, kv_width: usize) -> Result<Self> {
        let h = cfg.qformer_hidden;
        Ok(Self {
            query: bert_linear(h, h, vb.pp("self.query"))?,
            key: bert_linear(kv_width, h, vb.pp("self.key"))?,
            value: bert_linear(kv_width, h, vb.pp("self.value"))?,
            dense: bert_linear(h, h, vb.pp("output.dense"))?,
            norm: LayerNorm::new(vb.pp("output.LayerNorm"), h, cfg.qformer_ln_eps)?,
            heads: cfg.qformer_heads,
        })
    }

    /// `x` (B,Lq,H) attends to `source` (B,Lk,·); `mask` is additive, broadcastable to
    /// (B,heads,Lq,Lk).
    fn forward(
        &self,
        x: &Tensor,
        source: &Tensor,
        mask: Option<&Tensor>,
        p_drop: f64,
        train: bool,
    ) -> Result<Tensor> {
        let (b, lq, w) = x.dims3()?;
        let hd = w / self.heads;
        let q = split_heads(&self.query.forward(x)?, self.heads)?;
        let k = split_heads(&self.key.forward(source)?, self.heads)?;
        let v = split_heads(&self.value.forward(source)?, self.heads)?;
        let mut scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = dropout(&softmax_last_dim(&scores)?, p_drop, train)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, lq, w))?;
        let out = dropout(&self.dense.forward(&ctx)?, p_drop, train)?;
        self.norm.forward(&(out + x)?)
    }
}

/// `intermediate` + `output` (or their `_query` twins): dense, GELU, dense, dropout,
/// residual, LayerNorm.
#[derive(Debug, Clone)]
struct FeedForward {
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
}

impl FeedForward {
    fn new(vb: VarBuilder, cfg: &ModelConfig, suffix: &str) -> Result<Self> {
        let (h, i) = (cfg.qformer_hidden, cfg.qformer_intermediate);
        let out = vb.pp(format!("output{suffix}"));
        Ok(Self {
            intermediate: bert_linear(h, i, vb.pp(format!("intermediate{suffix}.dense")))?,
            output: bert_linear(i, h, out.pp("dense"))?,
            norm: LayerNorm::new(out.pp("LayerNorm"), h, cfg.qformer_ln_eps)?,
        })
    }

    fn forward(&self, x: &Tensor, p_drop: f64, train: bool) -> Result<Tensor> {
        let h = self.intermediate.forward(x)?.gelu_erf()?;
        let out = dropout(&self.output.forward(&h)?, p_drop, train)?;
        self.norm.forward(&(out + x)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attention: Attention,
    cross_attention: Option<Attention>,
    ffn: FeedForward,
    ffn_query: FeedForward,
}

impl Layer {
    fn new(vb: VarBuilder, cfg: &ModelConfig, index: usize) -> Result<Self> {
        let cross_attention = if index.is_multiple_of(cfg.cross_attention_freq) {
            Some(Attention::new(vb.pp("crossattention"), cfg, cfg.vit_width)?)
        } else {
            None
        };
        Ok(Self {
            attention: Attention::new(vb.pp("attention"), cfg, cfg.qformer_hidden)?,
            cross_attention,
            ffn: FeedForward::new(vb.clone(), cfg, "")?,
            ffn_query: FeedForward::new(vb, cfg, "_query")?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        image: Option<&Tensor>,
        prefix_len: usize,
        p_drop: f64,
        train: bool,
    ) -> Result<Tensor> {
        let attn = self.attention.forward(x, x, mask, p_drop, train)?;
        let Some(image) = image else {
            // No image tokens: every position (prefix included) takes the ordinary branch.
            return self.ffn.forward(&attn, p_drop, train);
        };
        let len = attn.dim(1)?;
        let mut queries = attn.narrow(1, 0, prefix_len)?;
        if let Some(cross) = &self.cross_attention {
            // The image mask is all ones: its additive form is zero.
            queries = cross.forward(&queries, image, None, p_drop, train)?;
        }
        let queries = self.ffn_query.forward(&queries, p_drop, train)?;
        if len == prefix_len {
            return Ok(queries);
        }
        let text = self.ffn.forward(
            &attn.narrow(1, prefix_len, len - prefix_len)?,
            p_drop,
            train,
        )?;
        Tensor::cat(&[&queries, &text], 1)
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct QFormer {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    hidden: usize,
    /// Dropout probability used when a pass runs with `train = true`.
    pub dropout: f64,
}

impl QFormer {
    /// Builds from `Qformer.bert` (pass `vb.pp("Qformer.bert")`).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.qformer_hidden;
        let emb = vb.pp("embeddings");
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let word_embeddings =
            emb.get_with_hints((cfg.vocab_size, h), "word_embeddings.weight", init)?;
        let position_embeddings =
            emb.get_with_hints((MAX_POSITIONS, h), "position_embeddings.weight", init)?;
        let embed_norm = LayerNorm::new(emb.pp("LayerNorm"), h, cfg.qformer_ln_eps)?;
        let layers = (0..cfg.qformer_layers)
            .map(|i| Layer::new(vb.pp(format!("encoder.layer.{i}")), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings,
            position_embeddings,
            embed_norm,
            layers,
            hidden: h,
            dropout: BERT_DROPOUT,
        })
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Word + position embeddings of the text (positions count from 0 at the text's first
    /// token), with the prefix prepended without position embedding; then LayerNorm, dropout.
    fn embed(
        &self,
        prefix: Option<&Tensor>,
        input_ids: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let x = match input_ids {
            Some(ids) => {
                let (b, l) = ids.dims2()?;
                if l > MAX_POSITIONS {
                    candle_core::bail!("text of {l} tokens exceeds {MAX_POSITIONS} positions");
                }
                let words = self
                    .word_embeddings
                    .index_select(&ids.flatten_all()?, 0)?
                    .reshape((b, l, self.hidden))?;
                let text = words.broadcast_add(&self.position_embeddings.narrow(0, 0, l)?)?;
                match prefix {
                    Some(p) => Tensor::cat(&[p, &text], 1)?,
                    None => text,
                }
            }
            None => match prefix {
                Some(p) => p.clone(),
                None => candle_core::bail!("Q-Former pass needs a prefix or text ids"),
            },
        };
        dropout(&self.embed_norm.forward(&x)?, self.dropout, train)
    }

    /// The general pass: `prefix` (B,P,H) query embeddings, `input_ids` (B,L) i64/u32,
    /// `attention_mask` (B,P+L) of ones/zeros (any float or integer dtype; a float mask keeps
    /// its gradient), `image` (B,N,vit_width) tokens. Returns the last hidden state (B,P+L,H).
    pub fn forward(
        &self,
        prefix: Option<&Tensor>,
        input_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        image: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let mut x = self.embed(prefix, input_ids, train)?;
        let (b, len, _) = x.dims3()?;
        let prefix_len = match prefix {
            Some(p) => p.dim(1)?,
            None => 0,
        };
        // Additive mask (1 − m)·−10000, broadcast over heads and query positions.
        let mask = match attention_mask {
            Some(m) => {
                if m.dims() != [b, len] {
                    candle_core::bail!(
                        "attention mask {:?} does not match the sequence ({b}, {len})",
                        m.dims()
                    );
                }
                let m = m.to_dtype(x.dtype())?;
                Some(m.affine(10000.0, -10000.0)?.reshape((b, 1, 1, len))?)
            }
            None => None,
        };
        if let Some(img) = image {
            if img.dim(0)? != b {
                candle_core::bail!("image tokens for {} items, sequence for {b}", img.dim(0)?);
            }
        }
        for layer in &self.layers {
            x = layer.forward(&x, mask.as_ref(), image, prefix_len, self.dropout, train)?;
        }
        Ok(x)
    }

    /// Gallery pass: the query tokens (B,Q,H) cross-attend the image tokens (B,N,W).
    pub fn gallery(&self, queries: &Tensor, image: &Tensor, train: bool) -> Result<Tensor> {
        self.forward(Some(queries), None, None, Some(image), train)
    }

    /// Joint pass (the RTC teacher): queries and text attend to each other, the queries
    /// cross-attend the image. `mask` covers queries and text, (B,Q+L).
    pub fn joint(
        &self,
        queries: &Tensor,
        input_ids: &Tensor,
        mask: &Tensor,
        image: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.forward(
            Some(queries),
            Some(input_ids),
            Some(mask),
            Some(image),
            train,
        )
    }

    /// Text-only pass with a prefix of slot or anchor embeddings (B,P,H); `mask` (B,P+L).
    pub fn text_with_prefix(
        &self,
        prefix: &Tensor,
        input_ids: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.forward(Some(prefix), Some(input_ids), Some(mask), None, train)
    }
}

/// The hidden state at `position` of every item: (B,L,H) → (B,H).
pub fn token_at(hidden: &Tensor, position: usize) -> Result<Tensor> {
    hidden.narrow(1, position, 1)?.squeeze(1)
}
