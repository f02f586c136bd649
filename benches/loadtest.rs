//! Load test of the search service on loopback: a bounded number of `POST /search` requests
//! from concurrent local clients; prints requests/second, p50/p99 latency and the failures
//! (the run fails if any request fails).
//! `cargo bench --bench loadtest [-- N REQUESTS CLIENTS]` (defaults 100000 images, 2000
//! requests, 32 clients). The gallery is synthetic (32 × 256 float16 vectors per image) and
//! queries go through the toy encoder, so the figures are those of the service and the gallery
//! scan, not of the light model.

#[path = "../tests/http_client/mod.rs"]
mod http_client;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use half::f16;
use http_client::{multipart, Part};
use rayon::prelude::*;
use slot4acir::index::format::{names_blob, write_index, Dtype, GalleryImage, IndexHeader, Layout};
use slot4acir::index::{Encoder, Index, Searcher, ToyEncoder};
use slot4acir::serve::{App, BatchOptions, Limits, Server};

const LAYOUT: Layout = Layout {
    vectors_per_image: 32,
    dim: 256,
    tokens_per_image: 16,
    token_dim: 64,
};

fn random_f16_bytes(n: usize, salt: u64) -> Vec<u8> {
    let mut v = vec![0u8; n * 2];
    v.par_chunks_mut(1 << 17)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s =
                (0x9E3779B97F4A7C15u64 ^ salt) ^ (c as u64).wrapping_mul(0xBF58476D1CE4E5B9);
            for x in chunk.chunks_exact_mut(2) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let f = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.125;
                x.copy_from_slice(&f16::from_f32(f).to_le_bytes());
            }
        });
    v
}

fn main() -> anyhow::Result<()> {
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = nums.first().copied().unwrap_or(100_000);
    let requests = nums.get(1).copied().unwrap_or(2000);
    let clients = nums.get(2).copied().unwrap_or(32);

    let tmp = tempfile::tempdir()?;
    let enc = Arc::new(ToyEncoder::new(1, 8, LAYOUT)?);
    let images: Vec<GalleryImage> = (0..n)
        .map(|i| GalleryImage {
            name: format!("img{i:06}"),
            path: format!("img{i:06}.png"),
        })
        .collect();
    let names = names_blob(&images)?;
    let header = IndexHeader::new(
        enc.model_config(),
        enc.fingerprint(),
        Dtype::F16,
        n,
        LAYOUT,
        None,
        names.len() as u64,
    );
    let path = tmp.path().join("synthetic.s4idx");
    let t = Instant::now();
    write_index(
        &path,
        &header,
        &random_f16_bytes(n * LAYOUT.vector_elems(), 1),
        &random_f16_bytes(n * LAYOUT.token_elems(), 2),
        &names,
    )?;
    println!(
        "synthetic index: {n} images, {:.2} GB, written in {:.1} s",
        header.file_len() as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let searcher = Searcher::new(Index::open(&path)?, enc)?;
    // Page the gallery in, as a long-running server has it.
    searcher.search(&[slot4acir::index::Query {
        image: slot4acir::index::QueryImage::Reference(0),
        text: "warm up".into(),
        k: 1,
    }])?;
    let batch = BatchOptions {
        max_batch: 64,
        max_wait: Duration::from_millis(2),
        queue: 4096,
    };
    let app = App::new(searcher, None, Limits::default(), &batch)?;
    let server = Server::start(app, "127.0.0.1:0")?;
    let addr = server.addr;

    // A small PNG for the upload queries (one in four).
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([x as u8 * 3, y as u8 * 5, 90])
    }))
    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let png = Arc::new(png);

    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (next, failed, png) = (next.clone(), failed.clone(), png.clone());
            std::thread::spawn(move || {
                let c = http_client::Client::new(addr);
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        break;
                    }
                    let reference = format!("img{:06}", (i * 7919) % n);
                    let (ct, body) = if i % 4 == 3 {
                        multipart(&[
                            ("image", Part::File("q.png", &png)),
                            ("text", Part::Text("make it red")),
                            ("k", Part::Text("10")),
                        ])
                    } else {
                        multipart(&[
                            ("reference", Part::Text(&reference)),
                            ("text", Part::Text("same but with a dog")),
                            ("k", Part::Text("10")),
                        ])
                    };
                    let t = Instant::now();
                    let (status, _, out) = c.post("/search", &ct, &body);
                    lat.push(t.elapsed().as_secs_f64());
                    if status != 200 || !out.contains("\"results\"") {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("request {i} failed: {status} {out}");
                    }
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<f64> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("client thread"))
        .collect();
    let wall = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize] * 1e3;
    let health = http_client::Client::new(addr).get("/healthz").2;
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "{requests} requests from {clients} clients in {wall:.2} s: {:.1} requests/s, \
         latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {failed} failed",
        requests as f64 / wall,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!("server counters: {health}");
    drop(server);
    anyhow::ensure!(failed == 0, "{failed} requests failed");
    Ok(())
}
