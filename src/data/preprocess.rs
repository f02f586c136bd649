//! The reference's image transform (SPEC section 4), Pillow-exact:
//! `TargetPad(ratio) | SquarePad` → `Resize(size, BICUBIC)` → `CenterCrop(size)` →
//! `convert("RGB")` → `ToTensor` → CLIP `Normalize`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::raster::{decode, Raster};
use super::resample::{resize_window, Window};

/// CLIP normalization constants (`Normalize(mean, std)` of the reference): Python floats
/// (doubles) that torch rounds to float32, so they are rounded the same way here.
pub const CLIP_MEAN: [f32; 3] = f64_to_f32([0.48145466, 0.4578275, 0.40821073]);
pub const CLIP_STD: [f32; 3] = f64_to_f32([0.26862954, 0.26130258, 0.27577711]);

const fn f64_to_f32(v: [f64; 3]) -> [f32; 3] {
    [v[0] as f32, v[1] as f32, v[2] as f32]
}

/// The padding step before the resize.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    /// Pad the short side with black so that long / short = ratio, when the image is more
    /// elongated than that (the reference's `TargetPad`, default ratio 1.25). The ratio is a
    /// double as in Python, so that its pad widths round the same.
    TargetPad(f64),
    /// Pad to a square (`SquarePad`).
    SquarePad,
}

impl Default for Transform {
    fn default() -> Self {
        Transform::TargetPad(1.25)
    }
}

impl Transform {
    /// Parses `targetpad`, `targetpad:<ratio>` or `squarepad`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "squarepad" => Ok(Self::SquarePad),
            None if s == "targetpad" => Ok(Self::default()),
            Some(("targetpad", r)) => {
                let r: f64 = r.parse().with_context(|| format!("bad ratio '{r}'"))?;
                anyhow::ensure!(r >= 1.0, "target pad ratio must be at least 1, got {r}");
                Ok(Self::TargetPad(r))
            }
            _ => anyhow::bail!("unknown transform '{s}' (targetpad[:ratio] or squarepad)"),
        }
    }

    /// Pixels added on each side: (left = right, top = bottom).
    pub fn padding(&self, w: usize, h: usize) -> (usize, usize) {
        let (wf, hf) = (w as f64, h as f64);
        let target = match *self {
            // SquarePad: int((max_wh - w) / 2).
            Transform::SquarePad => wf.max(hf),
            Transform::TargetPad(ratio) => {
                if wf.max(hf) / wf.min(hf) < ratio {
                    return (0, 0);
                }
                wf.max(hf) / ratio
            }
        };
        // Python's int() truncates toward zero; negative pads are clamped to 0.
        let side = |s: f64| ((target - s) / 2.0).max(0.0) as usize;
        (side(wf), side(hf))
    }
}

/// Zero padding in the image's own storage: black, transparent black, or palette index 0 (as
/// torchvision's `pad` with `fill=0` does for each mode).
fn pad(src: &Raster, px: usize, py: usize) -> Raster {
    if px == 0 && py == 0 {
        return src.clone();
    }
    let c = src.mode.channels();
    let (w, h) = (src.width + 2 * px, src.height + 2 * py);
    let mut data = vec![0u8; w * h * c];
    for y in 0..src.height {
        let dst = ((y + py) * w + px) * c;
        data[dst..dst + src.width * c]
            .copy_from_slice(&src.data[y * src.width * c..(y + 1) * src.width * c]);
    }
    Raster::new(w, h, src.mode.clone(), data)
}

/// torchvision's `Resize(size)` output: the shorter side becomes `size`, the longer
/// `int(size * long / short)`.
pub fn resized_size(w: usize, h: usize, size: usize) -> (usize, usize) {
    let long = |l: usize, s: usize| (size as f64 * l as f64 / s as f64) as usize;
    if w <= h {
        (size, long(h, w))
    } else {
        (long(w, h), size)
    }
}

/// torchvision's center-crop offset, `int(round((len - size) / 2))` with Python's
/// round-half-to-even.
fn crop_offset(len: usize, size: usize) -> usize {
    let d = len.saturating_sub(size);
    let k = d / 2;
    if d % 2 == 1 && k % 2 == 1 {
        k + 1
    } else {
        k
    }
}

/// The whole transform on a decoded image: normalized CHW values, `3 * size * size` of them.
pub fn preprocess(img: &Raster, t: &Transform, size: usize) -> Vec<f32> {
    let (px, py) = t.padding(img.width, img.height);
    let padded = pad(img, px, py);
    let (rw, rh) = resized_size(padded.width, padded.height, size);
    let win = Window {
        x: crop_offset(rw, size),
        y: crop_offset(rh, size),
        w: size.min(rw),
        h: size.min(rh),
    };
    let rgb = resize_window(&padded, rw, rh, win).to_rgb();
    // ToTensor then Normalize, in float32 as torchvision does: one table per channel.
    let lut: [[f32; 256]; 3] = std::array::from_fn(|ch| {
        std::array::from_fn(|v| (v as f32 / 255.0 - CLIP_MEAN[ch]) / CLIP_STD[ch])
    });
    let plane = size * size;
    let mut out = vec![0f32; 3 * plane];
    for (y, row) in rgb.chunks_exact(3 * win.w).enumerate() {
        for (ch, table) in lut.iter().enumerate() {
            let dst = &mut out[ch * plane + y * size..][..win.w];
            for (d, p) in dst.iter_mut().zip(row.chunks_exact(3)) {
                *d = table[p[ch] as usize];
            }
        }
    }
    out
}

/// Reads, decodes and transforms one image file into normalized CHW values.
pub fn load_image(path: &Path, t: &Transform, size: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    let img = decode(&bytes).with_context(|| format!("decoding image {}", path.display()))?;
    Ok(preprocess(&img, t, size))
}

/// One image as a (3, size, size) tensor on the CPU.
pub fn load_image_tensor(path: &Path, t: &Transform, size: usize) -> Result<Tensor> {
    let v = load_image(path, t, size)?;
    Ok(Tensor::from_vec(v, (3, size, size), &Device::Cpu)?)
}

/// A batch of images, decoded in parallel. Failed files are left out of `pixels` and listed in
/// `failed` with their error; `loaded[i]` is the input index of row `i` of `pixels`.
pub struct LoadedBatch {
    /// (loaded.len(), 3, size, size) on the CPU.
    pub pixels: Tensor,
    pub loaded: Vec<usize>,
    pub failed: Vec<(usize, anyhow::Error)>,
}

/// Loads `paths` in parallel (rayon); never stops at the first bad file.
pub fn load_batch(paths: &[PathBuf], t: &Transform, size: usize) -> Result<LoadedBatch> {
    let results: Vec<Result<Vec<f32>>> = paths.par_iter().map(|p| load_image(p, t, size)).collect();
    let mut loaded = Vec::with_capacity(paths.len());
    let mut failed = Vec::new();
    let mut flat = Vec::with_capacity(paths.len() * 3 * size * size);
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) => {
                flat.extend_from_slice(&v);
                loaded.push(i);
            }
            Err(e) => failed.push((i, e)),
        }
    }
    let pixels = Tensor::from_vec(flat, (loaded.len(), 3, size, size), &Device::Cpu)?;
    Ok(LoadedBatch {
        pixels,
        loaded,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_follows_the_reference_formulas() {
        let tp = Transform::TargetPad(1.25);
        // 300x200: ratio 1.5 >= 1.25, scaled max 240 → int((240-200)/2) = 20 rows top and bottom.
        assert_eq!(tp.padding(300, 200), (0, 20));
        // 97x131: ratio 1.35 → int((104.8 - 97) / 2) = 3 columns.
        assert_eq!(tp.padding(97, 131), (3, 0));
        // Below the target ratio: untouched.
        assert_eq!(tp.padding(224, 250), (0, 0));
        assert_eq!(Transform::SquarePad.padding(512, 128), (0, 192));
        assert_eq!(Transform::SquarePad.padding(97, 131), (17, 0));
    }

    #[test]
    fn resize_and_crop_rounding_match_torchvision() {
        assert_eq!(resized_size(300, 240, 224), (280, 224));
        assert_eq!(resized_size(97, 131, 224), (224, 302));
        // (225-224)/2 = 0.5 rounds to 0; (227-224)/2 = 1.5 rounds to 2.
        assert_eq!(crop_offset(225, 224), 0);
        assert_eq!(crop_offset(227, 224), 2);
        assert_eq!(crop_offset(302, 224), 39);
    }

    #[test]
    fn transform_names_parse() {
        assert_eq!(Transform::parse("squarepad").unwrap(), Transform::SquarePad);
        assert_eq!(
            Transform::parse("targetpad").unwrap(),
            Transform::TargetPad(1.25)
        );
        assert_eq!(
            Transform::parse("targetpad:1.5").unwrap(),
            Transform::TargetPad(1.5)
        );
        assert!(Transform::parse("targetpad:0.5").is_err());
        assert!(Transform::parse("pad").is_err());
    }
}
