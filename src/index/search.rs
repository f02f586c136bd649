//! Exact max-over-32 search (SPEC section 2, "Score"): for each query vector q and gallery
//! image g, `score = max_v ⟨q, g_v⟩` over the image's V gallery vectors; the k best images.
//!
//! One pass over the gallery for a whole batch of queries: each image's V×D block is read from
//! memory once (a single query streams it, converting float16 in registers; a batch converts it
//! once to float32 and scores it from cache in register blocks of 4 rows × 2 queries). AVX2 +
//! FMA with F16C conversion (runtime-detected, scalar fallback), all cores through rayon, and a
//! bounded heap per query and per work chunk instead of a full sort.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use half::f16;
use rayon::prelude::*;

use super::format::Vectors;

/// One result: gallery position and score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub index: usize,
    pub score: f32,
}

/// Ranking order: higher score first, then lower gallery position (deterministic ties).
fn better(a: &Hit, b: &Hit) -> Ordering {
    a.score
        .total_cmp(&b.score)
        .then_with(|| b.index.cmp(&a.index))
}

/// Heap entry ordered so that the heap's top is the *worst* kept hit.
struct Worst(Hit);
impl PartialEq for Worst {
    fn eq(&self, o: &Self) -> bool {
        better(&self.0, &o.0) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Worst {
    fn cmp(&self, o: &Self) -> Ordering {
        better(&o.0, &self.0)
    }
}

/// The k best hits seen so far.
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    #[inline]
    pub fn push(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(Worst(hit));
        } else if let Some(mut top) = self.heap.peek_mut() {
            if better(&hit, &top.0) == Ordering::Greater {
                *top = Worst(hit);
            }
        }
    }

    pub fn merge(mut self, other: TopK) -> TopK {
        for w in other.heap {
            self.push(w.0);
        }
        self
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<Hit> {
        let mut v: Vec<Hit> = self.heap.into_iter().map(|w| w.0).collect();
        v.sort_by(|a, b| better(b, a));
        v
    }
}

/// Which dot-product kernel this machine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Avx2Fma,
    Scalar,
}

impl Kernel {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Kernel::Avx2Fma;
            }
        }
        Kernel::Scalar
    }
}

/// Images per rayon task: large enough to amortize scheduling, small enough to balance.
const CHUNK_IMAGES: usize = 512;

/// The k best gallery images for each query. `queries` is Q×dim row-major (f32),
/// `vectors_per_image`×`dim` values per image in `gallery`. `k` is clamped to the gallery size.
pub fn search(
    gallery: Vectors<'_>,
    vectors_per_image: usize,
    dim: usize,
    queries: &[f32],
    k: usize,
) -> Vec<Vec<Hit>> {
    search_with(
        Kernel::detect(),
        gallery,
        vectors_per_image,
        dim,
        queries,
        k,
    )
}

/// [`search`] with an explicit kernel (for tests and benchmarks of the fallback).
pub fn search_with(
    kernel: Kernel,
    gallery: Vectors<'_>,
    vectors_per_image: usize,
    dim: usize,
    queries: &[f32],
    k: usize,
) -> Vec<Vec<Hit>> {
    let per = vectors_per_image * dim;
    assert!(dim > 0 && per > 0, "empty layout");
    assert_eq!(queries.len() % dim, 0, "queries are not rows of {dim}");
    let nq = queries.len() / dim;
    let n = match gallery {
        Vectors::F16(g) => g.len() / per,
        Vectors::F32(g) => g.len() / per,
    };
    let k = k.min(n);
    if nq == 0 || k == 0 {
        return vec![Vec::new(); nq];
    }
    // The SIMD path works on whole 8-lane vectors.
    let kernel = if dim.is_multiple_of(8) {
        kernel
    } else {
        Kernel::Scalar
    };
    let chunks = n.div_ceil(CHUNK_IMAGES);
    let tops = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let lo = c * CHUNK_IMAGES;
            let hi = (lo + CHUNK_IMAGES).min(n);
            let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
            let mut scores = vec![0f32; nq];
            let mut scratch = Vec::new();
            for i in lo..hi {
                match gallery {
                    Vectors::F16(g) => image_scores_f16(
                        kernel,
                        &g[i * per..(i + 1) * per],
                        dim,
                        queries,
                        &mut scores,
                        &mut scratch,
                    ),
                    Vectors::F32(g) => image_scores_f32(
                        kernel,
                        &g[i * per..(i + 1) * per],
                        dim,
                        queries,
                        &mut scores,
                    ),
                }
                for (t, &s) in tops.iter_mut().zip(&scores) {
                    t.push(Hit { index: i, score: s });
                }
            }
            tops
        })
        .reduce_with(|a, b| a.into_iter().zip(b).map(|(x, y)| x.merge(y)).collect())
        .unwrap_or_default();
    tops.into_iter().map(TopK::into_sorted).collect()
}

fn image_scores_f16(
    kernel: Kernel,
    block: &[f16],
    dim: usize,
    queries: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    scratch.resize(block.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2Fma {
        // SAFETY: Avx2Fma is only chosen after runtime detection of avx2, fma and f16c, and
        // `dim` is a multiple of 8.
        unsafe {
            if out.len() == 1 {
                // One query: stream the rows, converting in registers.
                simd::one_query_f16(block, dim, queries, out);
            } else {
                // A batch: convert the block once (it stays in L1/L2), then a register-blocked
                // product of rows × queries.
                simd::convert_f16(block, scratch);
                simd::batch_f32(scratch, dim, queries, out);
            }
        }
        return;
    }
    let _ = kernel;
    use half::slice::HalfFloatSliceExt;
    block.convert_to_f32_slice(scratch);
    image_scores_scalar(scratch, dim, queries, out);
}

fn image_scores_f32(kernel: Kernel, block: &[f32], dim: usize, queries: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2Fma {
        // SAFETY: as above.
        unsafe { simd::batch_f32(block, dim, queries, out) };
        return;
    }
    let _ = kernel;
    image_scores_scalar(block, dim, queries, out);
}

/// max over the block's rows of ⟨row, q⟩ for every query q.
fn image_scores_scalar(block: &[f32], dim: usize, queries: &[f32], out: &mut [f32]) {
    for (q, o) in queries.chunks_exact(dim).zip(out.iter_mut()) {
        *o = block
            .chunks_exact(dim)
            .map(|row| row.iter().zip(q).map(|(a, b)| a * b).sum::<f32>())
            .fold(f32::NEG_INFINITY, f32::max);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use half::f16;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// One query against a block of float16 rows: four independent accumulators per row
    /// (32 values per step) to hide the FMA latency.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn one_query_f16(block: &[f16], dim: usize, query: &[f32], out: &mut [f32]) {
        let q = query.as_ptr();
        let mut best = f32::NEG_INFINITY;
        for row in block.chunks_exact(dim) {
            let r = row.as_ptr();
            let mut a = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c + 32 <= dim {
                for (j, acc) in a.iter_mut().enumerate() {
                    let o = c + 8 * j;
                    *acc = _mm256_fmadd_ps(load_f16(r.add(o)), _mm256_loadu_ps(q.add(o)), *acc);
                }
                c += 32;
            }
            while c < dim {
                a[0] = _mm256_fmadd_ps(load_f16(r.add(c)), _mm256_loadu_ps(q.add(c)), a[0]);
                c += 8;
            }
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            best = best.max(hsum(s));
        }
        out[0] = best;
    }

    /// float16 → float32, 8 values per instruction (`src.len()` is a multiple of 8).
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn convert_f16(src: &[f16], dst: &mut [f32]) {
        let mut i = 0;
        while i + 8 <= src.len() {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), load_f16(src.as_ptr().add(i)));
            i += 8;
        }
    }

    /// Rows × queries in register blocks of 4 rows × 2 queries (eight accumulators, six loads
    /// per eight FMAs), then the max over rows.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn batch_f32(block: &[f32], dim: usize, queries: &[f32], out: &mut [f32]) {
        let rows = block.len() / dim;
        let nq = out.len();
        let mut qi = 0;
        while qi < nq {
            let two = qi + 1 < nq;
            let q0 = queries.as_ptr().add(qi * dim);
            let q1 = if two { q0.add(dim) } else { q0 };
            let (mut m0, mut m1) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            let mut r = 0;
            while r + 4 <= rows {
                let p = block.as_ptr().add(r * dim);
                let mut a = [_mm256_setzero_ps(); 4];
                let mut b = [_mm256_setzero_ps(); 4];
                let mut c = 0;
                while c < dim {
                    let x0 = _mm256_loadu_ps(q0.add(c));
                    let x1 = _mm256_loadu_ps(q1.add(c));
                    for j in 0..4 {
                        let row = _mm256_loadu_ps(p.add(j * dim + c));
                        a[j] = _mm256_fmadd_ps(row, x0, a[j]);
                        b[j] = _mm256_fmadd_ps(row, x1, b[j]);
                    }
                    c += 8;
                }
                for j in 0..4 {
                    m0 = m0.max(hsum(a[j]));
                    m1 = m1.max(hsum(b[j]));
                }
                r += 4;
            }
            while r < rows {
                let p = block.as_ptr().add(r * dim);
                let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut c = 0;
                while c < dim {
                    let row = _mm256_loadu_ps(p.add(c));
                    a = _mm256_fmadd_ps(row, _mm256_loadu_ps(q0.add(c)), a);
                    b = _mm256_fmadd_ps(row, _mm256_loadu_ps(q1.add(c)), b);
                    c += 8;
                }
                m0 = m0.max(hsum(a));
                m1 = m1.max(hsum(b));
                r += 1;
            }
            out[qi] = m0;
            if two {
                out[qi + 1] = m1;
            }
            qi += 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_keeps_the_best_in_order_with_index_tiebreak() {
        let mut t = TopK::new(3);
        for (i, s) in [0.1, 0.5, 0.3, 0.5, 0.9, -1.0].iter().enumerate() {
            t.push(Hit {
                index: i,
                score: *s,
            });
        }
        let v: Vec<(usize, f32)> = t.into_sorted().iter().map(|h| (h.index, h.score)).collect();
        assert_eq!(v, vec![(4, 0.9), (1, 0.5), (3, 0.5)]);
    }
}
