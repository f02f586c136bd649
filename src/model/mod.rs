//! The Slot4ACir model: gallery side (ViT, Q-Former), query side (light backbone, slots).

pub mod backbone;
pub mod layers;
pub mod qformer;
pub mod slot4acir;
pub mod slots;
pub mod vision;
pub mod vit;

pub use slot4acir::{
    LightInput, LossReps, LossWeights, Losses, Slot4ACir, TeacherReps, TokenLayout, TrainBatch,
    VitInput,
};
pub use slots::{KeepMode, SlotOutput};
