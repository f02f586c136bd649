//! The objects of the demo benchmark: real photographs (the cut-out stamps of the Debian
//! package `tuxpaint-stamps-default`, named after their files) when installed, else shapes
//! drawn here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{imageops, Rgba, RgbaImage};

/// Where Debian installs the stamps.
pub const TUXPAINT_STAMPS: &str = "/usr/share/tuxpaint/stamps";

/// Sprites are stored with this longest side (pixels), and scaled down when placed.
pub const SPRITE_SIZE: u32 = 128;

/// A cut-out object: its name (as captions say it) and its picture with transparency.
#[derive(Clone)]
pub struct ObjectSprite {
    pub name: String,
    pub image: RgbaImage,
    /// The file it comes from (empty for drawn shapes).
    pub source: PathBuf,
}

/// Where the objects came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectSource {
    Photographs(PathBuf),
    DrawnShapes,
}

pub struct ObjectLibrary {
    pub objects: Vec<ObjectSprite>,
    pub source: ObjectSource,
}

/// "apple_granny_smith2" → "apple granny smith".
pub fn name_from_file(stem: &str) -> String {
    let cleaned: String = stem
        .chars()
        .map(|c| {
            if c == '_' || c == '-' {
                ' '
            } else {
                c.to_ascii_lowercase()
            }
        })
        .filter(|c| !c.is_ascii_digit())
        .collect();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn collect_pngs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_pngs(&p, out);
        } else if p.extension().is_some_and(|x| x == "png") {
            out.push(p);
        }
    }
}

/// Stamp categories of everyday photographed things (others hold drawings, lettering, or
/// files whose names do not say what they show).
const PHOTO_CATEGORIES: &[&str] = &[
    "animals",
    "food",
    "plants",
    "household",
    "clothes",
    "hobbies",
    "sports",
    "vehicles",
];

fn is_excluded(rel: &Path) -> bool {
    let s = rel.to_string_lossy().to_ascii_lowercase();
    let top = s.split('/').next().unwrap_or("");
    s.contains("cartoon") || !PHOTO_CATEGORIES.contains(&top)
}

/// Crops the transparent border and scales so the longest side is `SPRITE_SIZE`.
fn normalize_sprite(img: RgbaImage) -> Option<RgbaImage> {
    let (w, h) = img.dimensions();
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    let mut opaque = 0usize;
    for (x, y, p) in img.enumerate_pixels() {
        if p[3] > 16 {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
            opaque += 1;
        }
    }
    // A cut-out must have transparency around it and enough of a body.
    if opaque < 64 || opaque as f64 > 0.97 * (w * h) as f64 {
        return None;
    }
    let cropped = imageops::crop_imm(&img, x0, y0, x1 - x0 + 1, y1 - y0 + 1).to_image();
    let (cw, ch) = cropped.dimensions();
    let scale = SPRITE_SIZE as f64 / cw.max(ch) as f64;
    let (nw, nh) = (
        ((cw as f64 * scale).round() as u32).max(1),
        ((ch as f64 * scale).round() as u32).max(1),
    );
    Some(imageops::resize(
        &cropped,
        nw,
        nh,
        imageops::FilterType::Triangle,
    ))
}

impl ObjectLibrary {
    /// Up to `max` photographed objects from the stamps folder, spread over its categories
    /// (round-robin over sub-folders, in sorted order, so the choice is reproducible); `None`
    /// when the folder is absent or holds too few usable stamps.
    pub fn photographs(dir: &Path, max: usize) -> Result<Option<Self>> {
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut files = Vec::new();
        collect_pngs(dir, &mut files);
        files.sort();
        let mut by_folder: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
        for f in files {
            let rel = f.strip_prefix(dir).unwrap_or(&f).to_path_buf();
            if is_excluded(&rel) {
                continue;
            }
            let folder = rel.parent().map(Path::to_path_buf).unwrap_or_default();
            by_folder.entry(folder).or_default().push(f);
        }
        let mut queues: Vec<std::vec::IntoIter<PathBuf>> =
            by_folder.into_values().map(Vec::into_iter).collect();
        let mut objects: Vec<ObjectSprite> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while objects.len() < max && !queues.is_empty() {
            queues.retain(|q| q.len() > 0);
            for q in queues.iter_mut() {
                if objects.len() >= max {
                    break;
                }
                let Some(path) = q.next() else { continue };
                let stem = path.file_stem().map(|s| s.to_string_lossy().to_string());
                let name = name_from_file(&stem.unwrap_or_default());
                let words = name.split(' ').count();
                if name.len() < 3 || words > 3 || seen.contains(&name) {
                    continue;
                }
                // A stamp that cannot be read is skipped, not fatal: the library has hundreds.
                let Ok(img) = image::open(&path) else {
                    tracing::warn!("skipping unreadable stamp {}", path.display());
                    continue;
                };
                let Some(image) = normalize_sprite(img.to_rgba8()) else {
                    continue;
                };
                seen.insert(name.clone());
                objects.push(ObjectSprite {
                    name,
                    image,
                    source: path,
                });
            }
        }
        if objects.len() < 8 {
            return Ok(None);
        }
        Ok(Some(Self {
            objects,
            source: ObjectSource::Photographs(dir.to_path_buf()),
        }))
    }

    /// Shapes × colours drawn here (`max` of them at most).
    pub fn drawn(max: usize) -> Self {
        let mut objects = Vec::new();
        'outer: for (cname, rgb) in COLORS {
            for shape in SHAPES {
                if objects.len() >= max {
                    break 'outer;
                }
                objects.push(ObjectSprite {
                    name: format!("{cname} {shape}"),
                    image: draw_shape(shape, *rgb),
                    source: PathBuf::new(),
                });
            }
        }
        Self {
            objects,
            source: ObjectSource::DrawnShapes,
        }
    }

    /// The photographs when installed, else drawn shapes.
    pub fn load_default(max: usize) -> Result<Self> {
        let dir = Path::new(TUXPAINT_STAMPS);
        Ok(Self::photographs(dir, max)
            .with_context(|| format!("reading stamps under {}", dir.display()))?
            .unwrap_or_else(|| Self::drawn(max)))
    }
}

const COLORS: &[(&str, [u8; 3])] = &[
    ("red", [220, 40, 40]),
    ("blue", [40, 80, 220]),
    ("green", [40, 170, 60]),
    ("yellow", [240, 210, 40]),
    ("purple", [140, 60, 190]),
    ("orange", [245, 140, 30]),
    ("black", [25, 25, 25]),
    ("white", [245, 245, 245]),
];

const SHAPES: &[&str] = &[
    "circle", "square", "triangle", "star", "ring", "cross", "diamond", "bar",
];

/// Inside-test of a shape on the unit square [-1,1]².
fn inside(shape: &str, x: f64, y: f64) -> bool {
    match shape {
        "circle" => x * x + y * y <= 0.9,
        "square" => x.abs() <= 0.8 && y.abs() <= 0.8,
        "triangle" => y <= 0.85 && y >= -0.85 + 2.0 * x.abs() * 0.95,
        "star" => {
            let (r, a) = ((x * x + y * y).sqrt(), y.atan2(x));
            r <= 0.45 + 0.5 * (0.5 + 0.5 * (5.0 * a).cos()).powf(3.0)
        }
        "ring" => {
            let r2 = x * x + y * y;
            (0.35..=0.9).contains(&r2)
        }
        "cross" => (x.abs() <= 0.28 && y.abs() <= 0.9) || (y.abs() <= 0.28 && x.abs() <= 0.9),
        "diamond" => x.abs() + y.abs() <= 0.95,
        _ => x.abs() <= 0.9 && y.abs() <= 0.3,
    }
}

fn draw_shape(shape: &str, rgb: [u8; 3]) -> RgbaImage {
    let n = SPRITE_SIZE;
    RgbaImage::from_fn(n, n, |px, py| {
        let x = 2.0 * (px as f64 + 0.5) / n as f64 - 1.0;
        let y = 2.0 * (py as f64 + 0.5) / n as f64 - 1.0;
        if inside(shape, x, y) {
            // A little shading so the shapes are not flat.
            let shade = 1.0 - 0.25 * (x + y + 2.0) / 4.0;
            let c = |v: u8| (v as f64 * shade).round() as u8;
            Rgba([c(rgb[0]), c(rgb[1]), c(rgb[2]), 255])
        } else {
            Rgba([0, 0, 0, 0])
        }
    })
}
