//! Pillow's `Image.resize` for 8-bit images, bit for bit.
//!
//! Bicubic (a = -0.5) follows `ImagingResample` (libImaging/Resample.c): a separable two-pass
//! convolution, horizontal first, whose support is widened by the downscale factor (antialias),
//! with coefficients normalized in double precision, then converted to 22-bit fixed point; each
//! pass rounds and clips to 8 bits, so the intermediate image is 8-bit too. Alpha images are
//! premultiplied first and unpremultiplied after, as `Image.resize` does ("RGBA" -> "RGBa").
//! Nearest (palette and bilevel images) follows `ImagingScaleAffine`, including its accumulated
//! source coordinate.
//!
//! Only a window of the output is computed (the center crop that follows): every output pixel
//! depends on its own coefficients alone, so the window is identical to cropping the full result.

use super::raster::Raster;

/// Fixed-point precision of the 8-bit coefficients (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A rectangle of the output image: columns `x..x+w`, rows `y..y+h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

/// Resizes `src` to `out_w`×`out_h` and returns the `win` part of the result, in `src`'s mode.
pub fn resize_window(src: &Raster, out_w: usize, out_h: usize, win: Window) -> Raster {
    assert!(win.x + win.w <= out_w && win.y + win.h <= out_h);
    let data = if (out_w, out_h) == (src.width, src.height) {
        // `Image.resize` returns a copy for an unchanged size (no premultiply round trip).
        crop(src, win)
    } else if src.mode.nearest_only() {
        nearest(src, out_w, out_h, win)
    } else if src.mode.has_alpha() {
        let pre = Raster {
            data: premultiply(&src.data, src.mode.channels()),
            ..src.clone()
        };
        let mut out = bicubic(&pre, out_w, out_h, win);
        unpremultiply(&mut out, src.mode.channels());
        out
    } else {
        bicubic(src, out_w, out_h, win)
    };
    Raster::new(win.w, win.h, src.mode.clone(), data)
}

fn crop(src: &Raster, win: Window) -> Vec<u8> {
    let c = src.mode.channels();
    let mut out = Vec::with_capacity(win.w * win.h * c);
    for y in win.y..win.y + win.h {
        let start = (y * src.width + win.x) * c;
        out.extend_from_slice(&src.data[start..start + win.w * c]);
    }
    out
}

/// Pillow's bicubic kernel (`bicubic_filter`, a = -0.5), support 2.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Coefficients of one output position: the first input index and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the output positions `range`.
fn coefficients(in_size: usize, out_size: usize, range: std::ops::Range<usize>) -> Vec<Taps> {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ss = 1.0 / filterscale;
    range
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero; the clamps then bound the result.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let k: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic_filter((x as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().sum();
            let one = (1u32 << PRECISION_BITS) as f64;
            let weights = k
                .iter()
                .map(|&w| {
                    let w = if ww != 0.0 { w / ww } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps {
                start: xmin,
                weights,
            }
        })
        .collect()
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

fn bicubic(src: &Raster, out_w: usize, out_h: usize, win: Window) -> Vec<u8> {
    let c = src.mode.channels();
    let (in_w, in_h) = (src.width, src.height);
    let vert = (out_h != in_h).then(|| coefficients(in_h, out_h, win.y..win.y + win.h));
    // Input rows the vertical pass reads (all of the window's rows when it is skipped).
    let (row0, row1) = match &vert {
        Some(taps) => (
            taps.iter().map(|t| t.start).min().unwrap_or(0),
            taps.iter()
                .map(|t| t.start + t.weights.len())
                .max()
                .unwrap_or(0),
        ),
        None => (win.y, win.y + win.h),
    };

    // Horizontal pass over the needed rows: (row1 - row0) rows of win.w pixels.
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut tmp = Vec::with_capacity((row1 - row0) * win.w * c);
    if out_w != in_w {
        let horiz = coefficients(in_w, out_w, win.x..win.x + win.w);
        let rows = &src.data[row0 * in_w * c..row1 * in_w * c];
        match c {
            1 => horizontal::<1>(rows, in_w, &horiz, &mut tmp),
            2 => horizontal::<2>(rows, in_w, &horiz, &mut tmp),
            3 => horizontal::<3>(rows, in_w, &horiz, &mut tmp),
            _ => horizontal::<4>(rows, in_w, &horiz, &mut tmp),
        }
    } else {
        for y in row0..row1 {
            let start = (y * in_w + win.x) * c;
            tmp.extend_from_slice(&src.data[start..start + win.w * c]);
        }
    }

    let Some(vert) = vert else {
        return tmp;
    };
    // Vertical pass: rows of `tmp` are input rows row0.., each win.w * c values.
    let stride = win.w * c;
    let mut out = Vec::with_capacity(win.h * stride);
    let mut acc = vec![0i32; stride];
    for t in &vert {
        acc.fill(half);
        for (j, &k) in t.weights.iter().enumerate() {
            let r = t.start + j - row0;
            for (a, &v) in acc.iter_mut().zip(&tmp[r * stride..(r + 1) * stride]) {
                *a += v as i32 * k;
            }
        }
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    out
}

/// The horizontal pass over whole rows of `C`-channel pixels, appending to `out`.
fn horizontal<const C: usize>(rows: &[u8], in_w: usize, taps: &[Taps], out: &mut Vec<u8>) {
    let half = 1i32 << (PRECISION_BITS - 1);
    for row in rows.chunks_exact(in_w * C) {
        for t in taps {
            let mut acc = [half; C];
            let px = &row[t.start * C..(t.start + t.weights.len()) * C];
            for (p, &k) in px.chunks_exact(C).zip(&t.weights) {
                for ch in 0..C {
                    acc[ch] += p[ch] as i32 * k;
                }
            }
            out.extend(acc.map(clip8));
        }
    }
}

/// Source index of each output position, accumulated as `ImagingScaleAffine` does.
fn nearest_table(in_size: usize, out_size: usize) -> Vec<usize> {
    let step = in_size as f64 / out_size as f64;
    let mut pos = step * 0.5;
    (0..out_size)
        .map(|_| {
            let i = if pos < 0.0 { 0 } else { pos as usize };
            pos += step;
            i.min(in_size - 1)
        })
        .collect()
}

fn nearest(src: &Raster, out_w: usize, out_h: usize, win: Window) -> Vec<u8> {
    let c = src.mode.channels();
    let xs = nearest_table(src.width, out_w);
    let ys = nearest_table(src.height, out_h);
    let mut out = Vec::with_capacity(win.w * win.h * c);
    for &y in &ys[win.y..win.y + win.h] {
        let row = &src.data[y * src.width * c..(y + 1) * src.width * c];
        for &x in &xs[win.x..win.x + win.w] {
            out.extend_from_slice(&row[x * c..(x + 1) * c]);
        }
    }
    out
}

/// `rgbA2rgba` / `LA2La`: colour channels times alpha / 255, rounded (`MULDIV255`).
fn premultiply(data: &[u8], c: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    for p in out.chunks_exact_mut(c) {
        let a = p[c - 1] as u32;
        for v in &mut p[..c - 1] {
            let t = *v as u32 * a + 128;
            *v = (((t >> 8) + t) >> 8) as u8;
        }
    }
    out
}

/// `rgba2rgbA` / `La2LA`: colour channels times 255 / alpha (integer division, clipped);
/// untouched where alpha is 0 or 255.
fn unpremultiply(data: &mut [u8], c: usize) {
    for p in data.chunks_exact_mut(c) {
        let a = p[c - 1] as u32;
        if a != 0 && a != 255 {
            for v in &mut p[..c - 1] {
                *v = (255 * *v as u32 / a).min(255) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::raster::PixelMode;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 224), (224, 640), (97, 224), (300, 299)] {
            for t in coefficients(i, o, 0..o) {
                let s: i32 = t.weights.iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i32,
                    "{i}->{o}"
                );
            }
        }
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let (w, h) = (37, 23);
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let src = Raster::new(w, h, PixelMode::Rgb, data);
        let full = Window {
            x: 0,
            y: 0,
            w: 50,
            h: 17,
        };
        let all = resize_window(&src, 50, 17, full);
        let win = Window {
            x: 5,
            y: 3,
            w: 30,
            h: 10,
        };
        let part = resize_window(&src, 50, 17, win);
        for y in 0..win.h {
            for x in 0..win.w * 3 {
                assert_eq!(
                    part.data[y * win.w * 3 + x],
                    all.data[(y + 3) * 150 + 15 + x]
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = Raster::new(31, 17, PixelMode::Gray, vec![200; 31 * 17]);
        let out = resize_window(
            &src,
            12,
            7,
            Window {
                x: 0,
                y: 0,
                w: 12,
                h: 7,
            },
        );
        assert!(out.data.iter().all(|&v| v == 200));
    }
}
