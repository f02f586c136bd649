//! The real Slot4ACir model behind the [`Encoder`] trait: gallery vectors and light tokens
//! from the large model (SPEC section 1), query vectors from the light model, the slot
//! inversion and the Q-Former text pass (section 2), with the reference's preprocessing and
//! text processing.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};

use super::encoder::Encoder;
use super::format::{Index, Layout};
use crate::config::ModelConfig;
use crate::data::preprocess::{preprocess, Transform};
use crate::data::raster::decode;
use crate::model::slot4acir::Slot4ACir;
use crate::model::slots::KeepMode;
use crate::text::{process_caption, Tokenizer};
use crate::train::vit_cache::VitCache;
use crate::weights::ParamStore;

pub struct ModelEncoder {
    model: Arc<Slot4ACir>,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    /// The weights' fingerprint, computed on first use (training validation never needs it).
    fingerprint: OnceLock<String>,
    store: ParamStore,
    layout: Layout,
    transform: Transform,
    device: Device,
    /// The frozen ViT's outputs by image, when training keeps them.
    vit_cache: Option<Arc<VitCache>>,
}

impl ModelEncoder {
    /// Loads the weights for `cfg` (every missing key reported, naming the file) on the GPU
    /// when built with `cuda` and one is present, else the CPU.
    pub fn load(cfg: &ModelConfig, weights: &Path) -> Result<Self> {
        let device = Device::cuda_if_available(0)?;
        let (model, store) = Slot4ACir::load(cfg, weights, &device)?;
        let enc = Self::from_model(Arc::new(model), store)?;
        // Fingerprint now, so a bad file is reported here, naming it.
        let fp = crate::weights::fingerprint(&enc.store.state_dict())
            .with_context(|| format!("fingerprinting {}", weights.display()))?;
        let _ = enc.fingerprint.set(fp);
        Ok(enc)
    }

    /// An encoder over a model that is shared with its owner (the trainer validates through
    /// one): it sees the current weights at every call. `store` holds the model's parameters.
    pub fn from_model(model: Arc<Slot4ACir>, store: ParamStore) -> Result<Self> {
        let cfg = model.cfg.clone();
        let device = model.query_tokens.device().clone();
        // T and C of the light tokens depend on the backbone: ask it once.
        let probe = Tensor::zeros((1, 3, cfg.img_size, cfg.img_size), DType::F32, &device)?;
        let (_, t, c) = model.light_tokens(&probe, false)?.dims3()?;
        let layout = Layout {
            vectors_per_image: cfg.num_query_token,
            dim: cfg.embed_dim,
            tokens_per_image: t,
            token_dim: c,
        };
        Ok(Self {
            model,
            cfg,
            tokenizer: Tokenizer::bert_uncased()?,
            fingerprint: OnceLock::new(),
            store,
            layout,
            transform: Transform::default(),
            device,
            vit_cache: None,
        })
    }

    /// The model an index was built with: its configuration from the index header, the
    /// weights from `weights` (their fingerprint is checked by [`super::Searcher::new`]).
    pub fn for_index(index: &Index, weights: &Path) -> Result<Self> {
        let cfg = ModelConfig::from_json(&index.header().model_config.to_string())
            .with_context(|| format!("model configuration in index {}", index.path().display()))?;
        Self::load(&cfg, weights)
    }

    /// Gallery images through `cache` (the frozen ViT's outputs computed once).
    pub fn with_vit_cache(mut self, cache: Option<Arc<VitCache>>) -> Self {
        self.vit_cache = cache;
        self
    }

    /// Preprocessing of image files (default: TargetPad 1.25).
    pub fn with_transform(mut self, transform: Transform) -> Self {
        self.transform = transform;
        self
    }

    /// How adaptive models choose their slots at inference (the reference samples).
    /// Has no effect on a model shared with another owner ([`Self::from_model`]); set the
    /// mode on the model before sharing it.
    pub fn set_keep_mode(&mut self, mode: KeepMode) {
        if let Some(m) = Arc::get_mut(&mut self.model) {
            m.keep_mode = mode;
        }
    }

    /// Detached: while training shares the model, an output would otherwise keep its whole
    /// autograd graph alive (a validation pass over a gallery ran out of memory).
    fn to_cpu(t: Tensor) -> Result<Tensor> {
        Ok(t.detach().to_device(&Device::Cpu)?)
    }
}

impl Encoder for ModelEncoder {
    fn layout(&self) -> Layout {
        self.layout
    }

    fn model_config(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("a configuration serializes")
    }

    fn fingerprint(&self) -> String {
        self.fingerprint
            .get_or_init(|| {
                crate::weights::fingerprint(&self.store.state_dict())
                    .expect("fingerprinting tensors already in memory")
            })
            .clone()
    }

    fn preprocess(&self, encoded: &[u8]) -> Result<Tensor> {
        let s = self.cfg.img_size;
        let raster = decode(encoded)?;
        let v = preprocess(&raster, &self.transform, s);
        Ok(Tensor::from_vec(v, (3, s, s), &Device::Cpu)?)
    }

    fn encode_gallery(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        let pixels = pixels.to_device(&self.device)?;
        let vectors = match &self.vit_cache {
            Some(cache) => {
                let f = cache.features(&self.model, &pixels)?;
                self.model
                    .gallery_feats_from_embeds(&self.model.ln_vision.forward(&f)?)?
            }
            None => self.model.gallery_feats(&pixels)?,
        };
        let tokens = self.model.light_tokens(&pixels, false)?;
        Ok((Self::to_cpu(vectors)?, Self::to_cpu(tokens)?))
    }

    fn light_tokens(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = pixels.to_device(&self.device)?;
        Self::to_cpu(self.model.light_tokens(&pixels, false)?)
    }

    fn encode_query(&self, tokens: &Tensor, texts: &[String]) -> Result<Tensor> {
        let processed: Vec<String> = texts.iter().map(|t| process_caption(t)).collect();
        let (ids, mask) = self
            .tokenizer
            .encode_batch_longest(&processed, self.cfg.max_txt_len)?;
        let q = self.model.query_feats(
            &tokens.to_device(&self.device)?,
            &ids.to_device(&self.device)?,
            &mask.to_device(&self.device)?,
            false,
        )?;
        Self::to_cpu(q)
    }
}
