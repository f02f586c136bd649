//! A data root in a temporary directory, laid out as the reference expects, over the real
//! annotation files in `../shared/data` (linked), with one generated PNG per image name.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use slot4acir::data::preprocess::{CLIP_MEAN, CLIP_STD};

use crate::common;

pub fn annotations() -> PathBuf {
    let dir = common::shared_dir().join("data");
    assert!(
        dir.join("cirr").is_dir() && dir.join("fashioniq").is_dir(),
        "no annotations in {}",
        dir.display()
    );
    dir
}

/// `CIRR/cirr/{captions,image_splits}` and `FashionIQ/{captions,image_splits}` linked to the
/// shared annotation files; no images yet.
pub fn linked_root() -> tempfile::TempDir {
    let ann = annotations();
    // Thousands of small files: in memory where possible (a disk-backed /tmp is 10x slower).
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("slot4acir-data-")
            .tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let cirr = root.path().join("CIRR/cirr");
    let fiq = root.path().join("FashionIQ");
    std::fs::create_dir_all(&cirr).unwrap();
    std::fs::create_dir_all(fiq.join("images")).unwrap();
    for d in ["captions", "image_splits"] {
        std::os::unix::fs::symlink(ann.join("cirr").join(d), cirr.join(d)).unwrap();
        std::os::unix::fs::symlink(ann.join("fashioniq").join(d), fiq.join(d)).unwrap();
    }
    root
}

/// A colour that identifies an image name (FNV-1a hash).
pub fn name_colour(name: &str) -> [u8; 3] {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    [(h >> 16) as u8, (h >> 8) as u8, h as u8]
}

/// Side of the generated images; preprocessing them to this size is the identity.
pub const SIDE: usize = 4;

/// Writes a SIDE×SIDE PNG of one colour.
pub fn write_png(path: &Path, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut enc = png::Encoder::new(file, SIDE as u32, SIDE as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&rgb.repeat(SIDE * SIDE)).unwrap();
}

/// One PNG per (name, path), coloured by the name.
pub fn write_images<'a>(images: impl IntoIterator<Item = (&'a str, &'a Path)>) {
    for (name, path) in images {
        write_png(path, name_colour(name));
    }
}

/// The normalized values a correct read of `name`'s image gives (every pixel the same).
pub fn expected_pixels(name: &str) -> [f32; 3] {
    let c = name_colour(name);
    std::array::from_fn(|ch| (c[ch] as f32 / 255.0 - CLIP_MEAN[ch]) / CLIP_STD[ch])
}

/// Asserts a preprocessed image (CHW, SIDE×SIDE) shows `name`'s colour.
pub fn assert_is_image_of(pixels: &[f32], name: &str, what: &str) {
    let e = expected_pixels(name);
    let plane = SIDE * SIDE;
    assert_eq!(pixels.len(), 3 * plane, "{what}");
    for ch in 0..3 {
        assert!(
            pixels[ch * plane..(ch + 1) * plane]
                .iter()
                .all(|&v| v == e[ch]),
            "{what}: not the image of {name}"
        );
    }
}
