//! Single-precision GEMM for the CPU reference.
//!
//! Choice of GEMM: the `gemm` crate (pure Rust, run-time dispatched AVX2/AVX-512/NEON
//! micro-kernels, rayon-parallel) with its `x86-v4` feature, so AVX-512 machines get the
//! AVX-512 kernels. Measured on the 2-core AVX-512 CI machine, on the shapes of a SmolLM2-135M
//! training step (m = 272 tokens; n, k in 192..1536) and against OpenBLAS 0.3 (Debian's
//! pthreads build, cblas_sgemm) in the same run: gemm 83-95 GFLOP/s, OpenBLAS 30-36 GFLOP/s;
//! for the 49152-wide LM head 77 vs 32. It also needs no system library, so the crate builds
//! anywhere with `cargo build` alone. Without `x86-v4` the same step was 1.4x slower.

use gemm::Parallelism;

/// Below this many multiply-adds a GEMM runs on one thread (thread hand-off costs more).
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// How an operand is read: as stored (row-major), or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// `c = beta * c + alpha * op(a) op(b)` with row-major `c [m, n]`.
///
/// `op(a)` is `[m, k]`: `a` is stored `[m, k]` (Op::N) or `[k, m]` (Op::T); likewise `op(b)` is
/// `[k, n]` from `b` stored `[k, n]` or `[n, k]`. `beta` is 0 or 1 (overwrite or accumulate).
/// The caller guarantees the slice lengths (checked with debug assertions).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    ta: Op,
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    sgemm_on(ta, tb, m, n, k, alpha, a, b, beta, c, true);
}

/// [`sgemm`], on rayon's pool when `parallel` and the product is large enough, else serially.
#[allow(clippy::too_many_arguments)]
fn sgemm_on(
    ta: Op,
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
    parallel: bool,
) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if beta == 0.0 {
            c[..m * n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if parallel
        && ta == Op::N
        && m <= small_m::MAX_M
        && n >= small_m::MIN_NK_SIDE
        && k >= small_m::MIN_NK_SIDE
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        small_m::sgemm(tb, m, n, k, alpha, a, b, beta, c);
        return;
    }
    // Row-major strides: (row stride, col stride) of op(x).
    let (a_rs, a_cs) = match ta {
        Op::N => (k as isize, 1isize),
        Op::T => (1isize, m as isize),
    };
    let (b_rs, b_cs) = match tb {
        Op::N => (n as isize, 1isize),
        Op::T => (1isize, k as isize),
    };
    let par = if parallel && m * n * k >= PARALLEL_MIN_MACS {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // gemm computes dst = alpha_g * dst + beta_g * lhs * rhs (its names are swapped from BLAS).
    // SAFETY: all pointers come from slices that hold at least the strided extents checked
    // above; dst does not alias lhs or rhs (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// [`sgemm`] on the calling thread only: for callers that already split the work across
/// rayon tasks (a nested parallel GEMM would only add hand-offs).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_serial(
    ta: Op,
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    sgemm_on(ta, tb, m, n, k, alpha, a, b, beta, c, false);
}

/// Few-row GEMM (`m` tokens against a large weight `b`) that streams `b` once, unpacked.
///
/// With m <= 32 each element of `b` is used only m times, so packing it (as the `gemm` crate
/// does) costs about as much as the product; here `b` is read straight from memory, once, by
/// AVX-512 register tiles. The output columns are split into disjoint blocks, one rayon task
/// each; a task writes the raw products of its block into its own part of a scratch buffer,
/// and a final serial pass forms `c = beta * c + alpha * product` (m x n, cheap next to n x k).
#[cfg(target_arch = "x86_64")]
// The register tiles are indexed in lockstep over several arrays; index loops read plainest.
#[allow(clippy::needless_range_loop)]
mod small_m {
    use super::Op;
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Largest m that takes this path (the `gemm` crate wins above it).
    pub const MAX_M: usize = 32;
    /// Smallest n and k that take this path: dense weights. The thin adapter products (n or k
    /// = LoRA rank) stay on `gemm` (measured faster there: too few column blocks to split).
    pub const MIN_NK_SIDE: usize = 256;
    /// Op::T: k-tile length, so that 4 rows of `b` (16 KiB) stay in L1 across the row blocks of a.
    const KC_T: usize = 1024;
    /// Op::N: k-tile length, so that a 64-column panel of `b` (16 KiB) stays in L1.
    const KC_N: usize = 64;

    /// `c = beta * c + alpha * a op(b)` with `a [m, k]`, `op(b) [k, n]`, m <= MAX_M.
    /// The caller has checked that the CPU has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        tb: Op,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &[f32],
        b: &[f32],
        beta: f32,
        c: &mut [f32],
    ) {
        assert!(m <= MAX_M && a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
        if tb == Op::T && m >= LANE_MIN_M {
            // 8..=32 tokens: the token-lane kernel, 16 tokens a pass (two 16-lane groups in one
            // pass over b measured slower than two passes: 315 vs 181 µs at 32 x 576 x 576).
            for i0 in (0..m).step_by(16) {
                let mm = (m - i0).min(16);
                let (a, c) = (&a[i0 * k..(i0 + mm) * k], &mut c[i0 * n..(i0 + mm) * n]);
                if mm >= LANE_MIN_M {
                    nt_lanes(mm, n, k, alpha, a, b, beta, c);
                } else {
                    sgemm(tb, mm, n, k, alpha, a, b, beta, c);
                }
            }
            return;
        }
        let threads = rayon::current_num_threads().max(1);
        // Columns per task: several tasks per thread for balance; multiples of the kernel width.
        let (unit, max_bw) = match tb {
            Op::T => (4, 64),
            Op::N => (64, 512),
        };
        let bw = (n.div_ceil(4 * threads).div_ceil(unit) * unit).clamp(unit, max_bw);
        let mut prod = vec![0.0f32; m * n];
        prod.par_chunks_mut(m * bw)
            .enumerate()
            .for_each(|(blk, out)| {
                let j0 = blk * bw;
                let nb = out.len() / m;
                // SAFETY: the caller checked for AVX-512F; the slice bounds asserted above cover
                // every index the kernels touch (each kernel asserts its own).
                unsafe {
                    match tb {
                        Op::T => nt_block(m, k, a, &b[j0 * k..(j0 + nb) * k], nb, out),
                        Op::N => nn_block(m, n, k, a, b, j0, nb, out),
                    }
                }
            });
        // Scatter the blocks into c.
        for (blk, out) in prod.chunks(m * bw).enumerate() {
            let j0 = blk * bw;
            let nb = out.len() / m;
            for i in 0..m {
                let dst = &mut c[i * n + j0..i * n + j0 + nb];
                let src = &out[i * nb..(i + 1) * nb];
                if beta == 0.0 {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d = alpha * s);
                } else {
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(d, s)| *d = beta * *d + alpha * s);
                }
            }
        }
    }

    /// Fewest rows of a (tokens) that take [`nt_lanes`]: below, most of its 16 lanes would idle.
    const LANE_MIN_M: usize = 8;

    /// Rows of w per register tile of [`nt_lanes_rows`]: 16 accumulators.
    const LANE_ROWS: usize = 16;

    /// `c = beta * c + alpha * a w^T` for `a [m, k]`, `w = b [n, k]`, 1 <= m <= 16 (used from 8),
    /// with the tokens in the 16 lanes of a register: `a` is transposed once into `at [k, 16]`
    /// (lanes past m are 0), then each row of w gives one accumulator of all the tokens'
    /// outputs, `acc_j += w[j, p] * at[p]` (a broadcast and an FMA), so no horizontal sums are
    /// needed (the dot-product kernel [`nt_block`] reduces each output across lanes). Rows of w
    /// are split into blocks across the threads; each block's outputs come out transposed
    /// (`[rows, 16]`) and are scattered into c at the end. Measured on one thread against the
    /// dot-product kernel: 2.4x at 16 x 576 x 576 (L2-resident w), 2x at 16 x 576 x 1536; on
    /// two threads 1.3x at 576 x 576, level at 1536 x 576 (there w streams from L3 either way).
    #[allow(clippy::too_many_arguments)]
    fn nt_lanes(
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &[f32],
        b: &[f32],
        beta: f32,
        c: &mut [f32],
    ) {
        assert!((1..=16).contains(&m) && a.len() >= m * k && b.len() >= n * k);
        assert!(c.len() >= m * n);
        let lanes = 16;
        let mut at = vec![0.0f32; k * lanes];
        for (i, row) in a.chunks_exact(k.max(1)).take(m).enumerate() {
            for (p, &v) in row.iter().enumerate() {
                at[p * lanes + i] = v;
            }
        }
        let threads = rayon::current_num_threads().max(1);
        let bw = (n.div_ceil(4 * threads).div_ceil(LANE_ROWS) * LANE_ROWS).clamp(LANE_ROWS, 256);
        let mut prod = vec![0.0f32; n * lanes];
        prod.par_chunks_mut(bw * lanes)
            .enumerate()
            .for_each(|(blk, out)| {
                let j0 = blk * bw;
                let rows = out.len() / lanes;
                let w = &b[j0 * k..(j0 + rows) * k];
                // SAFETY: the caller checked for AVX-512F; `at` holds k * lanes floats, the
                // block holds rows j0..j0 + rows of w (each k long) and `out` rows * lanes.
                unsafe { nt_lanes_rows(k, &at, w, rows, out) };
            });
        for (j, acc) in prod.chunks_exact(lanes).enumerate() {
            for i in 0..m {
                let d = &mut c[i * n + j];
                *d = if beta == 0.0 {
                    alpha * acc[i]
                } else {
                    beta * *d + alpha * acc[i]
                };
            }
        }
    }

    /// `out[j, :] = sum_p w[j, p] * at[p, :]` for the `rows` rows of `w` (`[rows, k]`): tiles of
    /// [`LANE_ROWS`] rows, then single rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn nt_lanes_rows(k: usize, at: &[f32], w: &[f32], rows: usize, out: &mut [f32]) {
        assert!(at.len() >= k * 16 && w.len() >= rows * k && out.len() >= rows * 16);
        let mut j = 0;
        while j < rows {
            // SAFETY (both): rows j..j + R of w and of out exist (asserted above).
            if rows - j >= LANE_ROWS {
                unsafe { lanes_tile::<LANE_ROWS>(k, at, &w[j * k..], &mut out[j * 16..]) };
                j += LANE_ROWS;
            } else {
                unsafe { lanes_tile::<1>(k, at, &w[j * k..], &mut out[j * 16..]) };
                j += 1;
            }
        }
    }

    /// `out[r, :] = sum_p w[r, p] * at[p, :]`, r < R: R accumulators of 16 tokens each.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn lanes_tile<const R: usize>(k: usize, at: &[f32], w: &[f32], out: &mut [f32]) {
        assert!(at.len() >= k * 16 && w.len() >= R * k && out.len() >= R * 16);
        let mut acc = [_mm512_setzero_ps(); R];
        let (ap, wp) = (at.as_ptr(), w.as_ptr());
        // SAFETY: p < k, so at[p * 16..p * 16 + 16] and w[r * k + p] (r < R) are in bounds.
        unsafe {
            for p in 0..k {
                let x = _mm512_loadu_ps(ap.add(p * 16));
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*wp.add(r * k + p)), x, acc[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(out.as_mut_ptr().add(r * 16), acc[r]);
            }
        }
    }

    /// Mask of the first `cols` (clamped to 0..=16) lanes.
    #[inline]
    fn lanes(cols: usize) -> __mmask16 {
        if cols >= 16 {
            0xFFFF
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    }

    /// Op::T block: `out[i, jj] = sum_p a[i, p] * w[jj, p]` for `w = b rows [nb, k]`, `out [m, nb]`.
    ///
    /// Tiles of 4 rows of a by 4 rows of w, one 16-lane accumulator each, reduced at the end; k
    /// is cut into KC_T-long tiles so that the 4 rows of w stay in L1 while every row of a
    /// passes over them.
    #[target_feature(enable = "avx512f")]
    unsafe fn nt_block(m: usize, k: usize, a: &[f32], w: &[f32], nb: usize, out: &mut [f32]) {
        assert!(a.len() >= m * k && w.len() >= nb * k && out.len() >= m * nb);
        // Accumulators of the current 4 rows of w: acc[i * 4 + r].
        let mut acc = [_mm512_setzero_ps(); 4 * MAX_M];
        let mut j = 0;
        while j < nb {
            let nr = (nb - j).min(4);
            acc[..4 * m].fill(_mm512_setzero_ps());
            let wj = &w[j * k..(j + nr) * k];
            for p0 in (0..k).step_by(KC_T) {
                let p1 = (p0 + KC_T).min(k);
                let mut i = 0;
                while i < m {
                    // SAFETY (all four): rows i..i+MR of a and 0..NR of wj exist (i + MR <= m,
                    // NR <= nr), columns p0..p1 lie within k, and acc holds 4 * m entries.
                    match (m - i >= 4, nr == 4) {
                        (true, true) => unsafe { nt_tile::<4, 4>(a, wj, k, i, p0, p1, &mut acc) },
                        (false, true) => unsafe { nt_tile::<1, 4>(a, wj, k, i, p0, p1, &mut acc) },
                        (true, false) => {
                            for r in 0..nr {
                                unsafe {
                                    nt_tile::<4, 1>(a, &wj[r * k..], k, i, p0, p1, &mut acc[r..])
                                }
                            }
                        }
                        (false, false) => {
                            for r in 0..nr {
                                unsafe {
                                    nt_tile::<1, 1>(a, &wj[r * k..], k, i, p0, p1, &mut acc[r..])
                                }
                            }
                        }
                    }
                    i += if m - i >= 4 { 4 } else { 1 };
                }
            }
            for i in 0..m {
                for r in 0..nr {
                    out[i * nb + j + r] = _mm512_reduce_add_ps(acc[i * 4 + r]);
                }
            }
            j += nr;
        }
    }

    /// `acc[(i + ii) * 4 + r] += a[i + ii, p0..p1] * w[r, p0..p1]` lane-wise, ii < MR, r < NR.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn nt_tile<const MR: usize, const NR: usize>(
        a: &[f32],
        w: &[f32],
        k: usize,
        i: usize,
        p0: usize,
        p1: usize,
        acc: &mut [__m512],
    ) {
        assert!(p0 <= p1 && p1 <= k && a.len() >= (i + MR) * k && w.len() >= (NR - 1) * k + p1);
        assert!(acc.len() > (i + MR - 1) * 4 + NR - 1);
        let mut t = [[_mm512_setzero_ps(); NR]; MR];
        for ii in 0..MR {
            for r in 0..NR {
                t[ii][r] = acc[(i + ii) * 4 + r];
            }
        }
        let ap = a.as_ptr().wrapping_add(i * k);
        let wp = w.as_ptr();
        let mut p = p0;
        // SAFETY: every read is of a[(i + ii) * k + q] or w[r * k + q] with q < p1 <= k, in
        // bounds by the asserts; the masked tail reads only lanes q < p1.
        unsafe {
            while p + 16 <= p1 {
                let mut wv = [_mm512_setzero_ps(); NR];
                for r in 0..NR {
                    wv[r] = _mm512_loadu_ps(wp.add(r * k + p));
                }
                for ii in 0..MR {
                    let xv = _mm512_loadu_ps(ap.add(ii * k + p));
                    for r in 0..NR {
                        t[ii][r] = _mm512_fmadd_ps(xv, wv[r], t[ii][r]);
                    }
                }
                p += 16;
            }
            if p < p1 {
                let mask = lanes(p1 - p);
                let mut wv = [_mm512_setzero_ps(); NR];
                for r in 0..NR {
                    wv[r] = _mm512_maskz_loadu_ps(mask, wp.add(r * k + p));
                }
                for ii in 0..MR {
                    let xv = _mm512_maskz_loadu_ps(mask, ap.add(ii * k + p));
                    for r in 0..NR {
                        t[ii][r] = _mm512_fmadd_ps(xv, wv[r], t[ii][r]);
                    }
                }
            }
        }
        for ii in 0..MR {
            for r in 0..NR {
                acc[(i + ii) * 4 + r] = t[ii][r];
            }
        }
    }

    /// Op::N block: `out[i, jj] = sum_p a[i, p] * b[p, j0 + jj]` for `b [k, n]`, `out [m, nb]`.
    ///
    /// The block's columns are walked in 64-wide panels (4 vectors); k in KC_N-long tiles so the
    /// panel of b stays in L1 while the rows of a pass over it, 4 at a time, as axpys into
    /// register tiles that are kept in `out` between k-tiles.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn nn_block(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        j0: usize,
        nb: usize,
        out: &mut [f32],
    ) {
        assert!(a.len() >= m * k && b.len() >= k * n && j0 + nb <= n && out.len() >= m * nb);
        for p0 in (0..k).step_by(KC_N) {
            let p1 = (p0 + KC_N).min(k);
            for js in (0..nb).step_by(64) {
                let w = nb - js;
                let masks = [
                    lanes(w),
                    lanes(w.saturating_sub(16)),
                    lanes(w.saturating_sub(32)),
                    lanes(w.saturating_sub(48)),
                ];
                let mut i = 0;
                while i < m {
                    // SAFETY: rows i..i+MR of a and out exist; the masks limit every column
                    // access to js..nb of the block (j0 + js.. j0 + nb of b); p0..p1 lie in k.
                    if m - i >= 4 {
                        unsafe { nn_tile::<4>(a, b, n, k, j0 + js, js, nb, masks, i, p0, p1, out) };
                        i += 4;
                    } else {
                        unsafe { nn_tile::<1>(a, b, n, k, j0 + js, js, nb, masks, i, p0, p1, out) };
                        i += 1;
                    }
                }
            }
        }
    }

    /// `out[i + ii, js..js + 64] += sum_{p0 <= p < p1} a[i + ii, p] * b[p, col..col + 64]`,
    /// ii < MR, vector v of the 64 columns limited to the lanes in `masks[v]`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn nn_tile<const MR: usize>(
        a: &[f32],
        b: &[f32],
        n: usize,
        k: usize,
        col: usize,
        js: usize,
        ldo: usize,
        masks: [__mmask16; 4],
        i: usize,
        p0: usize,
        p1: usize,
        out: &mut [f32],
    ) {
        let ap = a.as_ptr().wrapping_add(i * k);
        let bp = b.as_ptr().wrapping_add(col);
        let op = out.as_mut_ptr().wrapping_add(i * ldo + js);
        let mut t = [[_mm512_setzero_ps(); 4]; MR];
        // SAFETY: the caller guarantees rows i..i+MR of a [.., k] and out [.., ldo], rows
        // p0..p1 of b [k, n], and that the lanes set in masks[v] are columns in bounds of both b
        // (from col) and out (from js); masked loads and stores touch only those lanes
        // (pointers are formed with wrapping_add since a fully masked vector may point past b).
        unsafe {
            for ii in 0..MR {
                for v in 0..4 {
                    t[ii][v] = _mm512_maskz_loadu_ps(masks[v], op.wrapping_add(ii * ldo + 16 * v));
                }
            }
            for p in p0..p1 {
                let mut wv = [_mm512_setzero_ps(); 4];
                for v in 0..4 {
                    wv[v] = _mm512_maskz_loadu_ps(masks[v], bp.wrapping_add(p * n + 16 * v));
                }
                for ii in 0..MR {
                    let xv = _mm512_set1_ps(*ap.add(ii * k + p));
                    for v in 0..4 {
                        t[ii][v] = _mm512_fmadd_ps(xv, wv[v], t[ii][v]);
                    }
                }
            }
            for ii in 0..MR {
                for v in 0..4 {
                    _mm512_mask_storeu_ps(op.wrapping_add(ii * ldo + 16 * v), masks[v], t[ii][v]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(ta: Op, tb: Op, m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta == Op::N {
                        a[i * k + p]
                    } else {
                        a[p * m + i]
                    };
                    let bv = if tb == Op::N {
                        b[p * n + j]
                    } else {
                        b[j * k + p]
                    };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn all_transposes_match_naive() {
        let (m, n, k) = (37, 29, 71);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
            .collect();
        for ta in [Op::N, Op::T] {
            for tb in [Op::N, Op::T] {
                let want = naive(ta, tb, m, n, k, &a, &b);
                let mut c = vec![1.0f32; m * n];
                sgemm(ta, tb, m, n, k, 2.0, &a, &b, 1.0, &mut c);
                for (x, w) in c.iter().zip(&want) {
                    assert!(
                        (x - (1.0 + 2.0 * w)).abs() < 1e-4,
                        "{ta:?}{tb:?}: {x} vs {w}"
                    );
                }
                sgemm(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c);
                for (x, w) in c.iter().zip(&want) {
                    assert!((x - w).abs() < 1e-4);
                }
            }
        }
    }

    /// The few-row path (m <= 32, large n * k) against the naive product on ragged shapes.
    #[test]
    fn small_m_path_matches_naive() {
        // n, k >= small_m::MIN_NK_SIDE so sgemm takes the few-row path on AVX-512 machines.
        for (n, k) in [(257, 1811), (1031, 263), (531, 1029)] {
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
                .collect();
            for m in 1..=33 {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                    .collect();
                for tb in [Op::N, Op::T] {
                    let want = naive(Op::N, tb, m, n, k, &a, &b);
                    let tol = 1e-5 * k as f32;
                    let mut c = vec![1.0f32; m * n];
                    sgemm(Op::N, tb, m, n, k, -1.5, &a, &b, 1.0, &mut c);
                    for (x, w) in c.iter().zip(&want) {
                        assert!(
                            (x - (1.0 - 1.5 * w)).abs() < tol,
                            "{m}x{n}x{k} {tb:?}: {x} vs {w}"
                        );
                    }
                    c.fill(f32::NAN);
                    sgemm(Op::N, tb, m, n, k, 0.5, &a, &b, 0.0, &mut c);
                    for (x, w) in c.iter().zip(&want) {
                        assert!((x - 0.5 * w).abs() < tol, "{m}x{n}x{k} {tb:?}: {x} vs {w}");
                    }
                }
            }
        }
    }
}
