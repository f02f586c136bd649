//! `slot4acir demo`: a composed-retrieval benchmark built from real object photographs, and
//! the report of a training run on it.

pub mod benchmark;
pub mod features;
pub mod objects;
pub mod report;
pub mod run;
pub mod scene;
pub mod task;
