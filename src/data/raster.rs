//! Image decoding into the pixel modes Pillow would open the file in.
//!
//! The reference opens images with `PIL.Image.open`, so a PNG keeps its own mode: palette images
//! stay palette indices (padded with index 0, resized with nearest neighbour), greyscale stays one
//! channel, a tRNS chunk on an RGB or greyscale image is ignored, RGBA keeps its alpha until the
//! final `convert("RGB")`. The `image` crate would expand all of that on decode, so PNGs are read
//! with the `png` crate untransformed and unpacked here the way Pillow unpacks them.

use std::io::Cursor;

use anyhow::{bail, Context, Result};

/// The Pillow mode a decoded image corresponds to.
#[derive(Debug, Clone, PartialEq)]
pub enum PixelMode {
    /// "1": one channel holding 0 or 255; Pillow resizes it with nearest neighbour.
    Bilevel,
    /// "L"
    Gray,
    /// "LA"
    GrayAlpha,
    /// "RGB"
    Rgb,
    /// "RGBA"
    Rgba,
    /// "P": one channel of indices into this palette of RGB triples.
    Palette(Vec<[u8; 3]>),
}

impl PixelMode {
    /// Interleaved channels stored per pixel.
    pub fn channels(&self) -> usize {
        match self {
            Self::Bilevel | Self::Gray | Self::Palette(_) => 1,
            Self::GrayAlpha => 2,
            Self::Rgb => 3,
            Self::Rgba => 4,
        }
    }

    /// Whether the last channel is an alpha channel (premultiplied while resampling).
    pub fn has_alpha(&self) -> bool {
        matches!(self, Self::GrayAlpha | Self::Rgba)
    }

    /// Pillow resizes "1" and "P" images with nearest neighbour whatever filter is asked for.
    pub fn nearest_only(&self) -> bool {
        matches!(self, Self::Bilevel | Self::Palette(_))
    }
}

/// An 8-bit image, channels interleaved, rows contiguous.
#[derive(Debug, Clone)]
pub struct Raster {
    pub width: usize,
    pub height: usize,
    pub mode: PixelMode,
    pub data: Vec<u8>,
}

impl Raster {
    pub fn new(width: usize, height: usize, mode: PixelMode, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width * height * mode.channels());
        Self {
            width,
            height,
            mode,
            data,
        }
    }

    /// Converts to interleaved RGB, as Pillow's `convert("RGB")`: alpha dropped (not composited),
    /// grey replicated, palette indices looked up (out-of-range indices read as black).
    pub fn to_rgb(&self) -> Vec<u8> {
        let n = self.width * self.height;
        let mut out = Vec::with_capacity(n * 3);
        let c = self.mode.channels();
        match &self.mode {
            PixelMode::Rgb => out.extend_from_slice(&self.data),
            PixelMode::Rgba => {
                for p in self.data.chunks_exact(4) {
                    out.extend_from_slice(&p[..3]);
                }
            }
            PixelMode::Bilevel | PixelMode::Gray | PixelMode::GrayAlpha => {
                for p in self.data.chunks_exact(c) {
                    out.extend_from_slice(&[p[0]; 3]);
                }
            }
            PixelMode::Palette(pal) => {
                for &i in &self.data {
                    out.extend_from_slice(pal.get(i as usize).unwrap_or(&[0, 0, 0]));
                }
            }
        }
        out
    }
}

/// Decodes PNG (exactly as Pillow opens it) or, by content, any other format the `image` crate
/// reads (JPEG: decoder differences from libjpeg of a level or so are possible).
pub fn decode(bytes: &[u8]) -> Result<Raster> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return decode_png(bytes);
    }
    let img = image::load_from_memory(bytes).context("not a decodable image")?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok(match img.color() {
        image::ColorType::L8 | image::ColorType::L16 => {
            Raster::new(w, h, PixelMode::Gray, img.into_luma8().into_raw())
        }
        c if c.has_alpha() => Raster::new(w, h, PixelMode::Rgba, img.into_rgba8().into_raw()),
        _ => Raster::new(w, h, PixelMode::Rgb, img.into_rgb8().into_raw()),
    })
}

fn decode_png(bytes: &[u8]) -> Result<Raster> {
    use png::{BitDepth, ColorType};
    let decoder = png::Decoder::new(Cursor::new(bytes));
    let mut reader = decoder.read_info().context("bad PNG header")?;
    let size = reader
        .output_buffer_size()
        .context("PNG too large for memory")?;
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .context("PNG pixel data is corrupt or truncated")?;
    let (w, h) = (frame.width as usize, frame.height as usize);
    if w == 0 || h == 0 {
        bail!("PNG has an empty size {w}x{h}");
    }
    let line = frame.line_size;
    let depth = frame.bit_depth as u8;
    let info = reader.info();
    let (mode, channels) = match frame.color_type {
        ColorType::Grayscale if frame.bit_depth == BitDepth::One => (PixelMode::Bilevel, 1),
        ColorType::Grayscale => (PixelMode::Gray, 1),
        ColorType::GrayscaleAlpha => (PixelMode::GrayAlpha, 2),
        ColorType::Rgb => (PixelMode::Rgb, 3),
        ColorType::Rgba => (PixelMode::Rgba, 4),
        ColorType::Indexed => {
            let raw = info
                .palette
                .as_ref()
                .context("palette PNG without a PLTE chunk")?;
            let pal = raw.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect();
            (PixelMode::Palette(pal), 1)
        }
    };
    let is_palette = matches!(mode, PixelMode::Palette(_));
    let mut data = Vec::with_capacity(w * h * channels);
    for row in buf.chunks(line).take(h) {
        match depth {
            8 => data.extend_from_slice(&row[..w * channels]),
            // Pillow's "RGB;16B"-style raw modes keep the most significant byte. (Greyscale
            // 16-bit opens as "I;16" in Pillow; it is reduced the same way here.)
            16 => data.extend(row[..w * channels * 2].iter().step_by(2)),
            1 | 2 | 4 => {
                // Sub-byte samples, one channel: indices stay as they are, grey is scaled to
                // 0..255 as Pillow's "1", "L;2" and "L;4" unpackers do.
                let per_byte = 8 / depth as usize;
                let mask = (1u8 << depth) - 1;
                let scale = if is_palette { 1 } else { 255 / mask };
                for x in 0..w {
                    let byte = row[x / per_byte];
                    let shift = 8 - depth as usize * (x % per_byte + 1);
                    data.push(((byte >> shift) & mask) * scale);
                }
            }
            d => bail!("unsupported PNG bit depth {d}"),
        }
    }
    Ok(Raster::new(w, h, mode, data))
}
