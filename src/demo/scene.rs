//! Scenes of the demo benchmark: objects on a 2×2 grid over a coloured background, the
//! modifications a caption describes, and their rendering.

use image::{imageops, Rgb, RgbImage, Rgba, RgbaImage};
use rand::{rngs::StdRng, Rng};

use super::objects::ObjectLibrary;

/// Grid cells, row-major, with the words captions use.
pub const CELLS: [&str; 4] = ["top left", "top right", "bottom left", "bottom right"];

/// Backgrounds: (name, top colour, bottom colour).
pub const BACKGROUNDS: &[(&str, [u8; 3], [u8; 3])] = &[
    ("blue", [70, 120, 220], [170, 200, 250]),
    ("green", [40, 130, 60], [150, 210, 140]),
    ("yellow", [230, 200, 60], [250, 240, 170]),
    ("gray", [90, 90, 90], [190, 190, 190]),
    ("pink", [230, 120, 170], [250, 200, 225]),
    ("purple", [100, 60, 150], [190, 160, 220]),
    ("orange", [230, 120, 40], [250, 200, 150]),
    ("teal", [30, 130, 130], [140, 210, 200]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Placed {
    pub object: usize,
    pub cell: usize,
    pub large: bool,
}

/// A background and up to three objects in distinct cells.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scene {
    pub background: usize,
    pub objects: Vec<Placed>,
}

/// One edit of a scene, as a caption describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modification {
    Add(Placed),
    Remove(usize),
    Replace { from: usize, to: usize },
    Resize { object: usize, bigger: bool },
    Move { object: usize, to_cell: usize },
    Background(usize),
}

impl Scene {
    pub fn random(rng: &mut StdRng, n_objects: usize, library_len: usize) -> Scene {
        let mut cells: Vec<usize> = (0..CELLS.len()).collect();
        let mut objects = Vec::new();
        while objects.len() < n_objects.min(CELLS.len()) {
            let object = rng.gen_range(0..library_len);
            if objects.iter().any(|p: &Placed| p.object == object) {
                continue;
            }
            let cell = cells.remove(rng.gen_range(0..cells.len()));
            objects.push(Placed {
                object,
                cell,
                large: rng.gen_bool(0.5),
            });
        }
        Scene {
            background: rng.gen_range(0..BACKGROUNDS.len()),
            objects,
        }
    }

    fn free_cells(&self) -> Vec<usize> {
        (0..CELLS.len())
            .filter(|c| self.objects.iter().all(|p| p.cell != *c))
            .collect()
    }

    fn has(&self, object: usize) -> bool {
        self.objects.iter().any(|p| p.object == object)
    }

    /// A random modification that applies to this scene.
    pub fn random_modification(&self, rng: &mut StdRng, library_len: usize) -> Modification {
        loop {
            let pick = |rng: &mut StdRng| self.objects[rng.gen_range(0..self.objects.len())];
            let m = match rng.gen_range(0..100) {
                0..=29 => {
                    let free = self.free_cells();
                    let object = rng.gen_range(0..library_len);
                    if free.is_empty() || self.has(object) {
                        continue;
                    }
                    Modification::Add(Placed {
                        object,
                        cell: free[rng.gen_range(0..free.len())],
                        large: rng.gen_bool(0.5),
                    })
                }
                30..=44 if self.objects.len() >= 2 => Modification::Remove(pick(rng).object),
                45..=69 => {
                    let to = rng.gen_range(0..library_len);
                    if self.has(to) {
                        continue;
                    }
                    Modification::Replace {
                        from: pick(rng).object,
                        to,
                    }
                }
                70..=79 => {
                    let p = pick(rng);
                    Modification::Resize {
                        object: p.object,
                        bigger: !p.large,
                    }
                }
                80..=91 => {
                    let free = self.free_cells();
                    if free.is_empty() {
                        continue;
                    }
                    Modification::Move {
                        object: pick(rng).object,
                        to_cell: free[rng.gen_range(0..free.len())],
                    }
                }
                92..=99 => {
                    let b = rng.gen_range(0..BACKGROUNDS.len());
                    if b == self.background {
                        continue;
                    }
                    Modification::Background(b)
                }
                _ => continue,
            };
            return m;
        }
    }

    pub fn apply(&self, m: &Modification) -> Scene {
        let mut s = self.clone();
        match *m {
            Modification::Add(p) => s.objects.push(p),
            Modification::Remove(o) => s.objects.retain(|p| p.object != o),
            Modification::Replace { from, to } => {
                s.objects
                    .iter_mut()
                    .filter(|p| p.object == from)
                    .for_each(|p| p.object = to);
            }
            Modification::Resize { object, bigger } => {
                s.objects
                    .iter_mut()
                    .filter(|p| p.object == object)
                    .for_each(|p| p.large = bigger);
            }
            Modification::Move { object, to_cell } => {
                s.objects
                    .iter_mut()
                    .filter(|p| p.object == object)
                    .for_each(|p| p.cell = to_cell);
            }
            Modification::Background(b) => s.background = b,
        }
        s
    }

    /// The modification that undoes `m` applied to `self` (for the reverse queries).
    pub fn inverse(&self, m: &Modification) -> Modification {
        match *m {
            Modification::Add(p) => Modification::Remove(p.object),
            Modification::Remove(o) => Modification::Add(
                *self
                    .objects
                    .iter()
                    .find(|p| p.object == o)
                    .expect("present"),
            ),
            Modification::Replace { from, to } => Modification::Replace { from: to, to: from },
            Modification::Resize { object, bigger } => Modification::Resize {
                object,
                bigger: !bigger,
            },
            Modification::Move { object, .. } => Modification::Move {
                object,
                to_cell: self
                    .objects
                    .iter()
                    .find(|p| p.object == object)
                    .expect("present")
                    .cell,
            },
            Modification::Background(_) => Modification::Background(self.background),
        }
    }

    /// The scene as an RGB picture of `size`×`size` pixels. `jitter` (from the scene's own
    /// random stream) shifts objects a little inside their cells so that renders differ.
    pub fn render(&self, lib: &ObjectLibrary, size: u32, jitter: &mut StdRng) -> RgbImage {
        let (_, top, bottom) = BACKGROUNDS[self.background];
        let mut canvas = RgbaImage::from_fn(size, size, |_, y| {
            let t = y as f64 / (size.max(2) - 1) as f64;
            let c = |i: usize| (top[i] as f64 * (1.0 - t) + bottom[i] as f64 * t).round() as u8;
            Rgba([c(0), c(1), c(2), 255])
        });
        let cell = size / 2;
        for p in &self.objects {
            let sprite = &lib.objects[p.object].image;
            let target = (cell as f64 * if p.large { 0.92 } else { 0.55 }) as u32;
            let (w, h) = sprite.dimensions();
            let scale = target as f64 / w.max(h) as f64;
            let (nw, nh) = (
                ((w as f64 * scale).round() as u32).max(1),
                ((h as f64 * scale).round() as u32).max(1),
            );
            let small = imageops::resize(sprite, nw, nh, imageops::FilterType::Triangle);
            let (cx, cy) = ((p.cell % 2) as u32 * cell, (p.cell / 2) as u32 * cell);
            let slack_x = cell.saturating_sub(nw);
            let slack_y = cell.saturating_sub(nh);
            let ox = cx + slack_x / 2 + jitter.gen_range(0..=slack_x / 4);
            let oy = cy + slack_y / 2 + jitter.gen_range(0..=slack_y / 4);
            imageops::overlay(&mut canvas, &small, ox as i64, oy as i64);
        }
        RgbImage::from_fn(size, size, |x, y| {
            let p = canvas.get_pixel(x, y);
            Rgb([p[0], p[1], p[2]])
        })
    }
}

/// A caption for `m` applied to `scene`, in one of a few phrasings.
pub fn caption(m: &Modification, lib: &ObjectLibrary, rng: &mut StdRng) -> String {
    let name = |o: usize| lib.objects[o].name.as_str();
    let pick =
        |rng: &mut StdRng, options: Vec<String>| options[rng.gen_range(0..options.len())].clone();
    match *m {
        Modification::Add(p) => pick(
            rng,
            vec![
                format!("add a {}", name(p.object)),
                format!("add a {} in the {}", name(p.object), CELLS[p.cell]),
                format!("put a {} in the {}", name(p.object), CELLS[p.cell]),
            ],
        ),
        Modification::Remove(o) => pick(
            rng,
            vec![
                format!("remove the {}", name(o)),
                format!("take away the {}", name(o)),
            ],
        ),
        Modification::Replace { from, to } => pick(
            rng,
            vec![
                format!("replace the {} with a {}", name(from), name(to)),
                format!("change the {} into a {}", name(from), name(to)),
            ],
        ),
        Modification::Resize { object, bigger } => {
            let word = if bigger { "bigger" } else { "smaller" };
            pick(
                rng,
                vec![
                    format!("make the {} {word}", name(object)),
                    format!("the {} should be {word}", name(object)),
                ],
            )
        }
        Modification::Move { object, to_cell } => pick(
            rng,
            vec![
                format!("move the {} to the {}", name(object), CELLS[to_cell]),
                format!("put the {} in the {}", name(object), CELLS[to_cell]),
            ],
        ),
        Modification::Background(b) => pick(
            rng,
            vec![
                format!("change the background to {}", BACKGROUNDS[b].0),
                format!("make the background {}", BACKGROUNDS[b].0),
            ],
        ),
    }
}
