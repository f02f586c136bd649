//! Exact max-over-32 search against a naive implementation.

use half::f16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use slot4acir::index::format::Vectors;
use slot4acir::index::search::{search_with, Kernel};

/// Every image's max dot product in f64, fully sorted (score desc, index asc).
fn naive(gallery: &[f32], v: usize, d: usize, q: &[f32], k: usize) -> Vec<(usize, f64)> {
    let mut all: Vec<(usize, f64)> = gallery
        .chunks_exact(v * d)
        .enumerate()
        .map(|(i, img)| {
            let s = img
                .chunks_exact(d)
                .map(|row| {
                    row.iter()
                        .zip(q)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                })
                .fold(f64::NEG_INFINITY, f64::max);
            (i, s)
        })
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

fn random(n: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

#[test]
fn search_equals_naive_for_both_dtypes_kernels_and_batch_sizes() {
    let mut rng = StdRng::seed_from_u64(7);
    // (images, vectors per image, dim): multiples of 8 take the SIMD path (24: its tail loop),
    // 20 the scalar one; 3 and 5 rows per image exercise the row-block tail;
    // 1100 images span three work chunks.
    for &(n, v, d) in &[(1100, 4, 32), (300, 32, 256), (200, 3, 24), (150, 5, 20)] {
        let g32 = random(n * v * d, &mut rng);
        let g16: Vec<f16> = g32.iter().map(|x| f16::from_f32(*x)).collect();
        let g16_as_f32: Vec<f32> = g16.iter().map(|x| x.to_f32()).collect();
        for nq in [1, 2, 5] {
            let q = random(nq * d, &mut rng);
            for &k in &[1, 10, n + 5] {
                for kernel in [Kernel::detect(), Kernel::Scalar] {
                    for (gallery, exact) in [
                        (Vectors::F32(&g32), &g32),
                        (Vectors::F16(&g16), &g16_as_f32),
                    ] {
                        let got = search_with(kernel, gallery, v, d, &q, k);
                        assert_eq!(got.len(), nq);
                        for (qi, hits) in got.iter().enumerate() {
                            let want = naive(exact, v, d, &q[qi * d..(qi + 1) * d], k);
                            assert_eq!(hits.len(), want.len(), "n={n} k={k}");
                            for (h, (wi, ws)) in hits.iter().zip(&want) {
                                assert_eq!(h.index, *wi, "n={n} d={d} q={qi} k={k} {kernel:?}");
                                assert!(
                                    (h.score as f64 - ws).abs() < 1e-4,
                                    "score {} vs {ws}",
                                    h.score
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn empty_inputs_give_empty_results() {
    let g = vec![0.5f32; 4 * 16];
    assert!(search_with(Kernel::detect(), Vectors::F32(&g), 4, 16, &[], 3).is_empty());
    let r = search_with(Kernel::detect(), Vectors::F32(&g), 4, 16, &[1.0; 16], 0);
    assert_eq!(r, vec![vec![]]);
    let r = search_with(Kernel::detect(), Vectors::F32(&[]), 4, 16, &[1.0; 16], 5);
    assert_eq!(r, vec![vec![]]);
}
