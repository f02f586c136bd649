//! Evaluation: metrics from score matrices, CIRR test submissions.

pub mod metrics;
pub mod submission;
