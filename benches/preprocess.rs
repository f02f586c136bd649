//! Images per second of decoding and Pillow-exact preprocessing, one thread and in parallel.
//! `cargo bench --bench preprocess` (reads the fixture PNGs under ../shared or $SLOT4ACIR_SHARED).

use std::path::{Path, PathBuf};
use std::time::Instant;

use slot4acir::data::preprocess::{load_batch, preprocess, Transform};
use slot4acir::data::raster::decode;

fn main() -> anyhow::Result<()> {
    let shared = std::env::var_os("SLOT4ACIR_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let dir = shared.join("fixtures/parity-b0/images");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let bytes: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let t = Transform::default();
    let reps = 20;
    let n = (reps * files.len()) as f64;
    println!(
        "{} fixture PNGs ({}), {reps} repetitions",
        files.len(),
        dir.display()
    );

    let start = Instant::now();
    let mut decoded = Vec::new();
    for _ in 0..reps {
        decoded = bytes.iter().map(|b| decode(b)).collect::<Result<_, _>>()?;
    }
    let dt = start.elapsed().as_secs_f64();
    println!("decode, 1 thread:                  {:8.1} images/s", n / dt);

    let start = Instant::now();
    let mut sink = 0f32;
    for _ in 0..reps {
        for img in &decoded {
            sink += preprocess(img, &t, 224)[0];
        }
    }
    let dt = start.elapsed().as_secs_f64();
    println!(
        "pad+resize+crop+normalize, 1 thread: {:8.1} images/s",
        n / dt
    );
    for (f, img) in files.iter().zip(&decoded) {
        let start = Instant::now();
        for _ in 0..reps {
            sink += preprocess(img, &t, 224)[0];
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        let mode = format!("{:?}", img.mode);
        let mode = mode.split('(').next().unwrap_or_default();
        println!("  {name} {}x{} {mode}: {ms:.2} ms", img.width, img.height);
    }

    let paths: Vec<PathBuf> = (0..reps).flat_map(|_| files.iter().cloned()).collect();
    let start = Instant::now();
    let batch = load_batch(&paths, &t, 224)?;
    let dt = start.elapsed().as_secs_f64();
    anyhow::ensure!(batch.failed.is_empty(), "fixture images failed to load");
    println!(
        "load_batch (read+decode+transform), {} threads: {:8.1} images/s",
        rayon::current_num_threads(),
        n / dt
    );
    std::hint::black_box(sink);
    Ok(())
}
