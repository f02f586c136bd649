//! Slot4ACir: asymmetric composed image retrieval with slot inversion.
//!
//! See `../shared/SPEC.md` for the computation. Module layout follows the paper:
//! the gallery side (`model::vit`, `model::qformer`), the query side
//! (`model::backbone`, `model::slots`), and the whole model (`model::slot4acir`).

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod demo;
pub mod eval;
pub mod index;
pub mod llm;
pub mod model;
pub mod ops;
pub mod serve;
pub mod text;
pub mod train;
pub mod weights;
