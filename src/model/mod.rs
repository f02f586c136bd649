//! The Slot4ACir model: gallery side (ViT, Q-Former), query side (light backbone, slots).

pub mod backbone;
pub mod layers;
