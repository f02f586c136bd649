//! The data layer: image files and annotation files in, normalized pixels and triplets out.

pub mod preprocess;
pub mod raster;
pub mod resample;
