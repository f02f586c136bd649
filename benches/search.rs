//! Exact max-over-32 search speed on a synthetic gallery, against the machine's memory
//! bandwidth measured in the same run.
//! `cargo bench --bench search [-- N]` (N images, default 100000; 32 vectors × 256 each).

use std::time::Instant;

use half::f16;
use rayon::prelude::*;
use slot4acir::index::format::Vectors;
use slot4acir::index::search::{search_with, Kernel};

const V: usize = 32;
const D: usize = 256;
const K: usize = 10;

fn gb(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Best of `reps` timings of `f`, in seconds.
fn best<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn median<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Unit-norm-ish pseudo-random values, filled in parallel (xorshift per chunk).
fn fill_f16(n: usize) -> Vec<f16> {
    let mut v = vec![f16::ZERO; n];
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = 0x9E3779B97F4A7C15u64 ^ (c as u64).wrapping_mul(0xBF58476D1CE4E5B9);
            for x in chunk {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *x = f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.125);
            }
        });
    v
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let threads = rayon::current_num_threads();
    let kernel = Kernel::detect();
    println!(
        "gallery {n} images × {V} × {D} float16, k = {K}, {threads} threads, kernel {kernel:?}"
    );

    // Machine bandwidth: memcpy of a 1 GiB buffer (one thread, and split over all threads),
    // and a parallel read (what a search does).
    let len = 1usize << 30;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    let copy1 = best(3, || dst.copy_from_slice(&src));
    let chunk = len / threads;
    let copy_all = best(3, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s))
    });
    let read_all = best(3, || {
        let s: u64 = src
            .par_chunks(chunk)
            .map(|c| {
                c.chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                    .fold(0u64, u64::wrapping_add)
            })
            .sum();
        std::hint::black_box(s);
    });
    drop(dst);
    drop(src);
    println!(
        "memcpy 1 GiB: {:.2} GB/s one thread, {:.2} GB/s all threads (bytes copied; traffic is 2×); parallel read {:.2} GB/s",
        gb(len, copy1),
        gb(len, copy_all),
        gb(len, read_all)
    );

    let gallery = fill_f16(n * V * D);
    let bytes = gallery.len() * 2;
    let queries: Vec<f32> = (0..64 * D)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) / 8.0)
        .collect();
    let g = Vectors::F16(&gallery);
    // Warm-up: page in the gallery.
    std::hint::black_box(search_with(kernel, g, V, D, &queries[..D], K));

    let t1 = median(9, || {
        std::hint::black_box(search_with(kernel, g, V, D, &queries[..D], K));
    });
    println!(
        "one query: {:.1} ms latency (median of 9), {:.2} GB/s = {:.0}% of the all-thread memcpy rate, {:.0}% of the parallel read rate",
        t1 * 1e3,
        gb(bytes, t1),
        100.0 * gb(bytes, t1) / gb(len, copy_all),
        100.0 * gb(bytes, t1) / gb(len, read_all)
    );
    for b in [8usize, 32, 64] {
        let t = median(3, || {
            std::hint::black_box(search_with(kernel, g, V, D, &queries[..b * D], K));
        });
        println!(
            "batch of {b:>2} queries: {:.1} ms, {:.1} ms per query, {:.0} queries/s",
            t * 1e3,
            t * 1e3 / b as f64,
            b as f64 / t
        );
    }
    if kernel != Kernel::Scalar {
        let t = median(3, || {
            std::hint::black_box(search_with(Kernel::Scalar, g, V, D, &queries[..D], K));
        });
        println!(
            "scalar fallback, one query: {:.1} ms ({:.2} GB/s)",
            t * 1e3,
            gb(bytes, t)
        );
    }
    let g32: Vec<f32> = gallery.par_iter().map(|x| x.to_f32()).collect();
    drop(gallery);
    let g = Vectors::F32(&g32);
    std::hint::black_box(search_with(kernel, g, V, D, &queries[..D], K));
    let t = median(5, || {
        std::hint::black_box(search_with(kernel, g, V, D, &queries[..D], K));
    });
    println!(
        "float32 gallery, one query: {:.1} ms ({:.2} GB/s)",
        t * 1e3,
        gb(g32.len() * 4, t)
    );
}
