//! What the index, search and server need from a model, as a trait: the real Slot4ACir model
//! ([`super::model_encoder`]) and a small deterministic toy ([`ToyEncoder`], for tests and
//! benchmarks of the deployment machinery) both implement it.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::format::Layout;

/// The asymmetric model, as the deployment sees it.
pub trait Encoder: Send + Sync {
    /// Shapes of the gallery vectors and light tokens per image.
    fn layout(&self) -> Layout;
    /// The configuration stored in (and checked against) an index.
    fn model_config(&self) -> serde_json::Value;
    /// [`crate::weights::fingerprint`] of the weights.
    fn fingerprint(&self) -> String;
    /// An encoded image file (PNG, JPEG) to model input (3, S, S), float32. Takes the file's
    /// bytes, not a decoded image, because preprocessing depends on the stored pixel mode
    /// (SPEC section 4: palette images are resized with nearest neighbour).
    fn preprocess(&self, encoded: &[u8]) -> Result<Tensor>;
    /// Gallery side, (B,3,S,S) → (gallery vectors (B,V,D) L2-normalized, light tokens (B,T,C)).
    fn encode_gallery(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)>;
    /// Query side, image part: (B,3,S,S) → light tokens (B,T,C).
    fn light_tokens(&self, pixels: &Tensor) -> Result<Tensor>;
    /// Query side: light tokens (B,T,C) and raw modification texts → query vectors (B,D),
    /// L2-normalized.
    fn encode_query(&self, tokens: &Tensor, texts: &[String]) -> Result<Tensor>;
}

/// A cheap deterministic stand-in for the model: random linear maps of a small thumbnail
/// (gallery vectors, light tokens) and of the tokens plus hashed words (query vector). It
/// exercises every path of indexing, search and serving without model weights.
pub struct ToyEncoder {
    seed: u64,
    image_size: usize,
    layout: Layout,
    w_gallery: Tensor,
    w_tokens: Tensor,
    w_query: Tensor,
    fingerprint: String,
}

impl ToyEncoder {
    /// `image_size` is the thumbnail side; the layout sets V, D, T and C.
    pub fn new(seed: u64, image_size: usize, layout: Layout) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let pix = 3 * image_size * image_size;
        let mut mat = |r: usize, c: usize| -> Result<Tensor> {
            let scale = (1.0 / r as f32).sqrt();
            let v: Vec<f32> = (0..r * c)
                .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
                .collect();
            Ok(Tensor::from_vec(v, (r, c), &Device::Cpu)?)
        };
        let w_gallery = mat(pix, layout.vector_elems())?;
        let w_tokens = mat(pix, layout.token_elems())?;
        let w_query = mat(layout.token_elems(), layout.dim)?;
        let mut dict = BTreeMap::new();
        dict.insert("toy.gallery".to_string(), w_gallery.clone());
        dict.insert("toy.tokens".to_string(), w_tokens.clone());
        dict.insert("toy.query".to_string(), w_query.clone());
        let fingerprint = crate::weights::fingerprint(&dict)?;
        Ok(Self {
            seed,
            image_size,
            layout,
            w_gallery,
            w_tokens,
            w_query,
            fingerprint,
        })
    }

    /// A hashed bag-of-words embedding of the text (D values).
    fn text_vector(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.layout.dim];
        for word in text.split_whitespace() {
            let mut h: u64 = 0xcbf29ce484222325 ^ self.seed;
            for b in word.to_lowercase().bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100000001b3);
            }
            let mut rng = StdRng::seed_from_u64(h);
            for x in v.iter_mut() {
                *x += rng.gen_range(-1.0f32..1.0);
            }
        }
        v
    }
}

fn l2_normalize(t: &Tensor) -> candle_core::Result<Tensor> {
    let n = t
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f32::MAX)?;
    t.broadcast_div(&n)
}

impl Encoder for ToyEncoder {
    fn layout(&self) -> Layout {
        self.layout
    }

    fn model_config(&self) -> serde_json::Value {
        serde_json::json!({
            "toy_encoder": { "seed": self.seed, "image_size": self.image_size, "layout": self.layout }
        })
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn preprocess(&self, encoded: &[u8]) -> Result<Tensor> {
        let s = self.image_size as u32;
        let rgb = image::load_from_memory(encoded)?
            .resize_exact(s, s, image::imageops::FilterType::Triangle)
            .to_rgb8();
        let (s, hw) = (self.image_size, self.image_size * self.image_size);
        let mut chw = vec![0f32; 3 * hw];
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                chw[c * hw + i] = p[c] as f32 / 255.0 - 0.5;
            }
        }
        Ok(Tensor::from_vec(chw, (3, s, s), &Device::Cpu)?)
    }

    fn encode_gallery(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = pixels.dim(0)?;
        let x = pixels.flatten_from(1)?;
        let l = self.layout;
        let g = x
            .matmul(&self.w_gallery)?
            .reshape((b, l.vectors_per_image, l.dim))?;
        Ok((l2_normalize(&g)?, self.light_tokens(pixels)?))
    }

    fn light_tokens(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let l = self.layout;
        let t = pixels.flatten_from(1)?.matmul(&self.w_tokens)?;
        Ok(t.reshape((b, l.tokens_per_image, l.token_dim))?)
    }

    fn encode_query(&self, tokens: &Tensor, texts: &[String]) -> Result<Tensor> {
        let b = tokens.dim(0)?;
        ensure!(b == texts.len(), "{b} token rows for {} texts", texts.len());
        let img = tokens
            .to_dtype(DType::F32)?
            .flatten_from(1)?
            .matmul(&self.w_query)?;
        let words: Vec<f32> = texts.iter().flat_map(|t| self.text_vector(t)).collect();
        let words = Tensor::from_vec(words, (b, self.layout.dim), &Device::Cpu)?;
        Ok(l2_normalize(&(img + (words * 0.3)?)?)?)
    }
}
