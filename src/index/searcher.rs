//! Composed queries against an open index: light tokens (from an uploaded image, or taken from
//! the index for a gallery reference) and a modification text, encoded in one model call per
//! batch, then one pass of [`super::search`] over the gallery for the whole batch.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::encoder::Encoder;
use super::format::Index;
use super::search::search;

/// The image half of a composed query.
#[derive(Debug, Clone)]
pub enum QueryImage {
    /// A preprocessed image (3, S, S), encoded by the light model.
    Pixels(Tensor),
    /// A gallery image by position: its light tokens come from the index, and it is left out
    /// of its own results (as CIRR evaluation removes the reference).
    Reference(usize),
}

#[derive(Debug, Clone)]
pub struct Query {
    pub image: QueryImage,
    pub text: String,
    pub k: usize,
}

/// One ranked result.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Found {
    pub name: String,
    pub score: f32,
    #[serde(skip)]
    pub index: usize,
}

/// An index and the model that built it (checked on construction).
pub struct Searcher {
    index: Index,
    encoder: Arc<dyn Encoder>,
}

impl Searcher {
    /// Refuses an encoder other than the index's (configuration, fingerprint, layout).
    pub fn new(index: Index, encoder: Arc<dyn Encoder>) -> Result<Self> {
        index.check_model(
            &encoder.model_config(),
            &encoder.fingerprint(),
            encoder.layout(),
        )?;
        Ok(Self { index, encoder })
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn encoder(&self) -> &Arc<dyn Encoder> {
        &self.encoder
    }

    /// The query vectors (B, D) of a batch: one light-model call for the uploaded images, one
    /// query-encoder call for all.
    pub fn query_vectors(&self, queries: &[Query]) -> Result<Vec<f32>> {
        let layout = self.index.layout();
        let pixels: Vec<Tensor> = queries
            .iter()
            .filter_map(|q| match &q.image {
                QueryImage::Pixels(p) => Some(p.clone()),
                QueryImage::Reference(_) => None,
            })
            .collect();
        let mut uploaded = if pixels.is_empty() {
            None
        } else {
            let t = self
                .encoder
                .light_tokens(&Tensor::stack(&pixels, 0)?)
                .context("encoding query images")?;
            Some(t.to_dtype(DType::F32)?)
        };
        let mut next_upload = 0;
        let mut rows = Vec::with_capacity(queries.len());
        for q in queries {
            rows.push(match &q.image {
                QueryImage::Pixels(_) => {
                    let t = uploaded.as_mut().expect("counted above");
                    next_upload += 1;
                    t.get(next_upload - 1)?
                }
                QueryImage::Reference(i) => {
                    ensure!(*i < self.index.len(), "reference {i} is not in the gallery");
                    Tensor::from_vec(
                        self.index.tokens_f32(*i),
                        (layout.tokens_per_image, layout.token_dim),
                        &Device::Cpu,
                    )?
                }
            });
        }
        let tokens = Tensor::stack(&rows, 0)?;
        let texts: Vec<String> = queries.iter().map(|q| q.text.clone()).collect();
        let v = self
            .encoder
            .encode_query(&tokens, &texts)
            .context("encoding queries")?;
        ensure!(
            v.dims() == [queries.len(), layout.dim],
            "query encoder gave shape {:?}, expected ({}, {})",
            v.dims(),
            queries.len(),
            layout.dim
        );
        Ok(v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Ranked results for a batch of queries, best first.
    pub fn search(&self, queries: &[Query]) -> Result<Vec<Vec<Found>>> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let vectors = self.query_vectors(queries)?;
        let k_max = queries.iter().map(|q| q.k + 1).max().unwrap_or(1);
        let layout = self.index.layout();
        let hits = search(
            self.index.vectors(),
            layout.vectors_per_image,
            layout.dim,
            &vectors,
            k_max,
        );
        Ok(queries
            .iter()
            .zip(hits)
            .map(|(q, hits)| {
                let exclude = match q.image {
                    QueryImage::Reference(i) => Some(i),
                    QueryImage::Pixels(_) => None,
                };
                hits.into_iter()
                    .filter(|h| Some(h.index) != exclude)
                    .take(q.k)
                    .map(|h| Found {
                        name: self.index.images()[h.index].name.clone(),
                        score: h.score,
                        index: h.index,
                    })
                    .collect()
            })
            .collect())
    }
}
