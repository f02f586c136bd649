//! Evaluation: the driver (gallery pass, queries, scores), metrics from score matrices, CIRR
//! test submissions.

pub mod driver;
pub mod metrics;
pub mod submission;
