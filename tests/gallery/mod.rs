//! A small synthetic gallery of PNG and JPEG files for index and server tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use image::{DynamicImage, Rgb, RgbImage};
use slot4acir::index::format::Layout;

pub const LAYOUT: Layout = Layout {
    vectors_per_image: 8,
    dim: 32,
    tokens_per_image: 4,
    token_dim: 16,
};

/// `n` images of assorted sizes, colours and formats under `<root>/gallery` (one subfolder).
pub fn write_gallery(root: &Path, n: usize) -> PathBuf {
    let dir = root.join("gallery");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..n {
        let (w, h) = (20 + 7 * (i as u32 % 5), 16 + 5 * (i as u32 % 4));
        let img = RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                ((x * 11 + i as u32 * 37) % 256) as u8,
                ((y * 13 + i as u32 * 71) % 256) as u8,
                ((x * y + i as u32 * 17) % 256) as u8,
            ])
        });
        let path = match i % 3 {
            0 => dir.join(format!("img{i:02}.png")),
            1 => dir.join("sub").join(format!("img{i:02}.png")),
            _ => dir.join(format!("img{i:02}.jpg")),
        };
        DynamicImage::ImageRgb8(img).save(&path).unwrap();
    }
    dir
}
