//! The asymmetric deployment's gallery side: an index file encoded once by the large model
//! ([`format`], [`build`]), exact max-over-32 search over it ([`search`]), and queries encoded
//! by the light model alone against it ([`searcher`]). The model is reached through the
//! [`encoder::Encoder`] trait.

pub mod build;
pub mod encoder;
pub mod format;
pub mod model_encoder;
pub mod search;
pub mod searcher;

pub use build::{build_index, BuildOptions, BuildReport};
pub use encoder::{Encoder, ToyEncoder};
pub use format::{Dtype, GalleryImage, Index, Layout};
pub use search::{search, Hit};
pub use searcher::{Found, Query, QueryImage, Searcher};
