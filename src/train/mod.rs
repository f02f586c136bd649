//! Training (SPEC section 3): optimizer and schedule, checkpoints, the training loop.

pub mod checkpoint;
pub mod gradcache;
pub mod init;
pub mod objective;
pub mod optim;
pub mod task;
pub mod trainer;
pub mod vit_cache;
