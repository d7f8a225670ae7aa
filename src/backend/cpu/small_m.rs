//! Few-row GEMM (`m` tokens against a large weight `b`) that streams `b` once, unpacked.
//!
//! With m <= 32 each element of `b` is used only m times, so packing it (as the `gemm` crate
//! does) costs about as much as the product; here `b` is read straight from memory, once, by
//! register tiles. The output columns are split into disjoint blocks, one rayon task each; a
//! task writes the raw products of its block into its own part of a scratch buffer, and a final
//! serial pass forms `c = beta * c + alpha * product` (m x n, cheap next to n x k).
//!
//! One body per kernel, generic over the vector ISA ([`Simd`]: AVX-512F or AVX2 + FMA), entered
//! through [`FewRow`], whose methods carry each ISA's `#[target_feature]` and its register tile
//! sizes (32 registers on AVX-512, 16 on AVX2).

// The register tiles are indexed in lockstep over several arrays; index loops read plainest.
#![allow(clippy::needless_range_loop)]

use super::gemm::Op;
use super::simd::{Avx2, Avx512, Simd};
use rayon::prelude::*;

/// Largest m that takes this path (the `gemm` crate wins above it).
pub const MAX_M: usize = 32;
/// Smallest n and k that take this path: dense weights. The thin adapter products (n or k
/// = LoRA rank) stay on `gemm` (measured faster there: too few column blocks to split).
pub const MIN_NK_SIDE: usize = 256;
/// Op::T: k-tile length, so that 4 rows of `b` (16 KiB) stay in L1 across the row blocks of a.
const KC_T: usize = 1024;
/// Op::N: k-tile length, so that a 4-vector panel of `b` (at most 16 KiB) stays in L1.
const KC_N: usize = 64;
/// Capacity of the dot-product kernel's accumulators: up to 4 rows of w for each of MAX_M rows.
const NT_ACC: usize = 4 * MAX_M;

/// The kernels' entry points for one ISA: each is compiled with the ISA's target features and
/// calls the generic body with that ISA's tile sizes.
///
/// # Safety
/// Callable only where [`Simd::detected`] is true; the slices hold what each body asserts.
/// An Op::N block kernel: `(m, n, k, a, b, j0, nb, out)` as [`nn_block`] takes them.
pub(super) type NnBlock = unsafe fn(usize, usize, usize, &[f32], &[f32], usize, usize, &mut [f32]);

pub(super) trait FewRow: Simd {
    /// The Op::N block kernel ([`nn_block`] with this ISA's row tile), or `None` where Op::N
    /// takes the token-lane kernel at every m.
    const NN_BLOCK: Option<NnBlock>;
    /// Whether a product of `m` (<= MAX_M) tokens into `n` outputs is faster here than in
    /// `gemm` (measured per ISA).
    fn takes(tb: Op, m: usize, n: usize) -> bool;
    /// Most token registers of one pass of the token-lane kernel.
    const MAX_TOKEN_VECS: usize;
    /// [`lanes_rows`] with `tv` token registers (1..=MAX_TOKEN_VECS) and this ISA's row tile.
    unsafe fn lanes_rows_entry<E: Widen>(
        w: Weight<'_, E>,
        at: &[f32],
        tv: usize,
        j0: usize,
        rows: usize,
        out: &mut [f32],
    );
    /// [`nt_block`] with this ISA's `MR x NR` tile.
    unsafe fn nt_block_entry(m: usize, k: usize, a: &[f32], w: &[f32], nb: usize, out: &mut [f32]);
}

impl FewRow for Avx512 {
    // Measured on AVX-512 before the lane kernel took Op::N; not re-measured since.
    const NN_BLOCK: Option<NnBlock> = Some(nn_block_avx512);
    fn takes(_: Op, _: usize, _: usize) -> bool {
        true
    }
    // Two 16-lane groups in one pass over b measured slower than two passes (315 vs 181 µs at
    // 32 x 576 x 576).
    const MAX_TOKEN_VECS: usize = 1;
    #[target_feature(enable = "avx512f")]
    unsafe fn lanes_rows_entry<E: Widen>(
        w: Weight<'_, E>,
        at: &[f32],
        _: usize,
        j0: usize,
        rows: usize,
        out: &mut [f32],
    ) {
        // 16 accumulators; the weight broadcasts are memory operands of the FMAs.
        unsafe { lanes_rows::<Self, E, 16, 1>(w, at, j0, rows, out) }
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn nt_block_entry(m: usize, k: usize, a: &[f32], w: &[f32], nb: usize, out: &mut [f32]) {
        unsafe { nt_block::<Self, 4, 4>(m, k, a, w, nb, out) }
    }
}

/// [`nn_block`] on AVX-512, 4 x 4 accumulators.
///
/// # Safety
/// The CPU has AVX-512F; the slices hold what [`nn_block`] asserts.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn nn_block_avx512(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    j0: usize,
    nb: usize,
    out: &mut [f32],
) {
    unsafe { nn_block::<Avx512, 4>(m, n, k, a, b, j0, nb, out) }
}

impl FewRow for Avx2 {
    // An AVX2 nn_block (2 x 4 accumulators) ran 0.2 ms against `gemm`'s 0.08 at 1 x 1536 x 576
    // and half `gemm`'s speed at 16 tokens; the lane kernel does better at every m.
    const NN_BLOCK: Option<NnBlock> = None;
    /// On 2 Zen 3 cores, 1 <= m <= 32 (best of 5, ms, ours / `gemm`): Op::T wins everywhere
    /// (16 x 4096 x 4096: 3.9 / 14.6; 16 x 1536 x 576: 0.26 / 0.45; 3 x 1536 x 576 on the
    /// dot-product kernel: 0.09 / 0.26); Op::N with 16 tokens a pass (m > 8) wins or is level
    /// (16 x 576 x 49152: 11.8 / 17.5; 16 x 576 x 1536: 0.26 / 0.26), with 8 only into n >= 2048
    /// outputs (8 x 576 x 576: 0.070 / 0.066).
    fn takes(tb: Op, m: usize, n: usize) -> bool {
        tb == Op::T || m > Self::LANES || (m >= Self::LANES / 2 && n >= 2048)
    }
    // 16 registers, 8 accumulators: more rows alias in L1 when k is a multiple of 1024 (the
    // rows of w are then 4 KiB apart, in one set); 12 rows ran 1.8x slower at k = 4096.
    const MAX_TOKEN_VECS: usize = 2;
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lanes_rows_entry<E: Widen>(
        w: Weight<'_, E>,
        at: &[f32],
        tv: usize,
        j0: usize,
        rows: usize,
        out: &mut [f32],
    ) {
        // With 16 tokens a pass, 6 x 2 accumulators, 2 token registers and one broadcast.
        unsafe {
            match tv {
                1 => lanes_rows::<Self, E, 8, 1>(w, at, j0, rows, out),
                _ => lanes_rows::<Self, E, 6, 2>(w, at, j0, rows, out),
            }
        }
    }
    // 2 x 4 accumulators, 4 vectors of w and one of a.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nt_block_entry(m: usize, k: usize, a: &[f32], w: &[f32], nb: usize, out: &mut [f32]) {
        unsafe { nt_block::<Self, 2, 4>(m, k, a, w, nb, out) }
    }
}

/// `c = beta * c + alpha * a op(b)` with `a [m, k]`, `op(b) [k, n]`, m <= MAX_M, on the ISA
/// `S`.
///
/// # Safety
/// The CPU has `S` ([`Simd::detected`]).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm<S: FewRow>(
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
    let lane_min = S::LANES / 2;
    let nn_block = match tb {
        Op::T => None,
        Op::N => S::NN_BLOCK,
    };
    if (tb == Op::T && m >= lane_min) || (tb == Op::N && nn_block.is_none()) {
        // The token-lane kernel, up to MAX_TOKEN_VECS registers of tokens a pass.
        let per_pass = S::LANES * S::MAX_TOKEN_VECS;
        for i0 in (0..m).step_by(per_pass) {
            let mm = (m - i0).min(per_pass);
            let (a, c) = (&a[i0 * k..(i0 + mm) * k], &mut c[i0 * n..(i0 + mm) * n]);
            // SAFETY: the caller's guarantee is passed on.
            unsafe {
                if mm >= lane_min || tb == Op::N {
                    lanes::<S, f32>(tb, mm, n, k, alpha, a, b, beta, c);
                } else {
                    sgemm::<S>(tb, mm, n, k, alpha, a, b, beta, c);
                }
            }
        }
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // Columns per task: several tasks per thread for balance; multiples of the kernel width.
    let (unit, max_bw) = match tb {
        Op::T => (4, 64),
        Op::N => (4 * S::LANES, 512),
    };
    let bw = (n.div_ceil(4 * threads).div_ceil(unit) * unit).clamp(unit, max_bw);
    let mut prod = vec![0.0f32; m * n];
    prod.par_chunks_mut(m * bw)
        .enumerate()
        .for_each(|(blk, out)| {
            let j0 = blk * bw;
            let nb = out.len() / m;
            // SAFETY: the caller guarantees the ISA; the slice bounds asserted above cover every
            // index the kernels touch (each kernel asserts its own).
            unsafe {
                match nn_block {
                    None => S::nt_block_entry(m, k, a, &b[j0 * k..(j0 + nb) * k], nb, out),
                    Some(nn) => nn(m, n, k, a, b, j0, nb, out),
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

/// `op(b)` of a few-row product as the token-lane kernel reads it: output column j, inner
/// index p at `data[j * js + p * ps]` (`[n, k]` for Op::T: js = k, ps = 1; `[k, n]` for Op::N:
/// js = 1, ps = n).
#[derive(Clone, Copy)]
pub(super) struct Weight<'a, E: Widen = f32> {
    data: &'a [E],
    k: usize,
    js: usize,
    ps: usize,
}

/// A stored weight element that the token-lane kernel widens to f32 as it reads it: f32
/// itself, or `u16`, the bits of a bf16 (`half::bf16::to_bits`), whose widening is exact.
pub(super) trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// [`sgemm`] over a bf16 weight `b` (its bits, `[n, k]` for Op::T, `[k, n]` for Op::N), always
/// on the token-lane kernel, which widens each weight element as it broadcasts it: the weight
/// streams from memory at 2 bytes an element and is never copied to f32.
///
/// # Safety
/// The CPU has `S` ([`Simd::detected`]).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm_bf16<S: FewRow>(
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[u16],
    beta: f32,
    c: &mut [f32],
) {
    assert!(m <= MAX_M && a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    let per_pass = S::LANES * S::MAX_TOKEN_VECS;
    for i0 in (0..m).step_by(per_pass) {
        let mm = (m - i0).min(per_pass);
        let (a, c) = (&a[i0 * k..(i0 + mm) * k], &mut c[i0 * n..(i0 + mm) * n]);
        // SAFETY: the caller's guarantee is passed on; the slices hold what `lanes` asserts.
        unsafe { lanes::<S, u16>(tb, mm, n, k, alpha, a, b, beta, c) };
    }
}

/// `c = beta * c + alpha * a op(b)` for `a [m, k]`, 1 <= m <= `tv * LANES` with `tv` (token
/// registers, at most MAX_TOKEN_VECS) = `ceil(m / LANES)`, with the tokens in the lanes of
/// registers: `a` is transposed once into `at [k, tv * LANES]` (lanes past m are 0), then each
/// output column j gives `tv` accumulators of all the tokens' outputs,
/// `acc_j += op(b)[p, j] * at[p]` (one broadcast, `tv` FMAs), so no horizontal sums are needed
/// (the dot-product kernel [`nt_block`] reduces each output across lanes). Columns are split
/// into blocks across the threads; each block's outputs come out transposed
/// (`[cols, tv * LANES]`) and are scattered into c at the end. Measured on one AVX-512 thread
/// against the dot-product kernel (Op::T): 2.4x at 16 x 576 x 576 (L2-resident w), 2x at
/// 16 x 576 x 1536; on two threads 1.3x at 576 x 576, level at 1536 x 576 (there w streams from
/// L3 either way). On two AVX2 (Zen 3) cores against `gemm` (Op::T, 16 tokens in two
/// registers): 3.7x at 16 x 4096 x 4096, 1.7x at 16 x 576 x 1536.
///
/// # Safety
/// The CPU has `S`.
#[allow(clippy::too_many_arguments)]
unsafe fn lanes<S: FewRow, E: Widen>(
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[E],
    beta: f32,
    c: &mut [f32],
) {
    let tv = m.div_ceil(S::LANES);
    let l = S::LANES * tv;
    assert!(tv <= S::MAX_TOKEN_VECS && m >= 1 && a.len() >= m * k && b.len() >= n * k);
    assert!(c.len() >= m * n);
    let mut at = vec![0.0f32; k * l];
    for (i, row) in a.chunks_exact(k.max(1)).take(m).enumerate() {
        for (p, &v) in row.iter().enumerate() {
            at[p * l + i] = v;
        }
    }
    let (js, ps) = match tb {
        Op::T => (k, 1),
        Op::N => (1, n),
    };
    let w = Weight {
        data: &b[..n * k],
        k,
        js,
        ps,
    };
    let threads = rayon::current_num_threads().max(1);
    // Blocks of whole 48-column groups (a multiple of both ISAs' tiles, 16 and 12).
    let bw = (n.div_ceil(4 * threads).div_ceil(48) * 48).clamp(48, 240);
    let mut prod = vec![0.0f32; n * l];
    prod.par_chunks_mut(bw * l)
        .enumerate()
        .for_each(|(blk, out)| {
            let cols = out.len() / l;
            // SAFETY: the caller guarantees the ISA; `at` holds k * l floats, columns
            // blk * bw..blk * bw + cols are within op(b)'s n, `out` holds cols * l.
            unsafe { S::lanes_rows_entry(w, &at, tv, blk * bw, cols, out) };
        });
    for (j, acc) in prod.chunks_exact(l).enumerate() {
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

/// Length of the k-blocks of the lane kernel. Each block's sums start from zero and are added
/// to the output at its end, so a long k is summed in blocks (as `gemm` does), not in one
/// chain of k FMAs per output: the rounding error grows with the block length, not with k.
/// Over a `[k, n]` weight (Op::N) the blocks are also the outer loop, so that a block's rows
/// of a block of columns (256 x 240 floats, 240 KiB) stay in L2 while the column tiles pass;
/// over `[n, k]` (Op::T) each tile of rows streams its whole k (k-blocks as the outer loop
/// there ran 1.45x slower at 16 x 4096 x 11008).
const KC_LANES: usize = 256;

/// `out[j, :] = sum_p op(b)[p, j0 + j] * at[p, :]` for j < `cols`: tiles of `R` columns, then
/// single columns.
#[inline(always)]
unsafe fn lanes_rows<S: Simd, E: Widen, const R: usize, const TV: usize>(
    w: Weight<'_, E>,
    at: &[f32],
    j0: usize,
    cols: usize,
    out: &mut [f32],
) {
    let (l, k) = (S::LANES * TV, w.k);
    assert!(at.len() >= k * l && out.len() >= cols * l);
    assert!(k == 0 || (j0 + cols - 1) * w.js + (k - 1) * w.ps < w.data.len());
    if k == 0 {
        out[..cols * l].fill(0.0);
        return;
    }
    let kc = if w.ps == 1 { k } else { KC_LANES };
    for p0 in (0..k).step_by(kc) {
        let p1 = (p0 + kc).min(k);
        let mut j = 0;
        while j < cols {
            let base = (j0 + j) * w.js;
            // SAFETY (both): columns j0 + j..j0 + j + R (or 1) exist in op(b) and rows
            // j..j + R of out (asserted above); p0..p1 lie within k.
            if cols - j >= R {
                unsafe { lanes_tile::<S, E, R, TV>(w, base, at, p0, p1, &mut out[j * l..]) };
                j += R;
            } else {
                unsafe { lanes_tile::<S, E, 1, TV>(w, base, at, p0, p1, &mut out[j * l..]) };
                j += 1;
            }
        }
    }
}

/// `out[r, :] (+)= sum_{p0 <= p < p1} w.data[base + r * js + p * ps] * at[p, :]`, r < R, with
/// rows of `TV * LANES` tokens: R x TV accumulators, from zero for each [`KC_LANES`] block,
/// stored to `out` after the block at p = 0 and added to it after the others.
#[inline(always)]
unsafe fn lanes_tile<S: Simd, E: Widen, const R: usize, const TV: usize>(
    w: Weight<'_, E>,
    base: usize,
    at: &[f32],
    p0: usize,
    p1: usize,
    out: &mut [f32],
) {
    let (v, l) = (S::LANES, S::LANES * TV);
    assert!(p0 < p1 && at.len() >= p1 * l && out.len() >= R * l);
    assert!(base + (R - 1) * w.js + (p1 - 1) * w.ps < w.data.len());
    let (ap, wp, op) = (at.as_ptr(), w.data.as_ptr(), out.as_mut_ptr());
    // SAFETY: p0 <= p < p1 and r < R, so at[p * l..p * l + l], w.data[base + r * js + p * ps]
    // and out[r * l..r * l + l] are in bounds (asserted above).
    unsafe {
        let mut c0 = p0;
        while c0 < p1 {
            let c1 = (c0 + KC_LANES).min(p1);
            let mut acc = [[S::zero(); TV]; R];
            for p in c0..c1 {
                let mut x = [S::zero(); TV];
                for t in 0..TV {
                    x[t] = S::load(ap.add(p * l + t * v));
                }
                let wr = wp.add(base + p * w.ps);
                for r in 0..R {
                    let wv = S::splat((*wr.add(r * w.js)).widen());
                    for t in 0..TV {
                        acc[r][t] = S::fmadd(wv, x[t], acc[r][t]);
                    }
                }
            }
            for r in 0..R {
                for t in 0..TV {
                    let o = op.add(r * l + t * v);
                    S::store(
                        o,
                        if c0 > 0 {
                            S::add(S::load(o), acc[r][t])
                        } else {
                            acc[r][t]
                        },
                    );
                }
            }
            c0 = c1;
        }
    }
}

/// Op::T block: `out[i, jj] = sum_p a[i, p] * w[jj, p]` for `w = b rows [nb, k]`, `out [m, nb]`.
///
/// Tiles of MR rows of a by NR rows of w, one accumulator each, reduced at the end; k is cut
/// into KC_T-long tiles so that the NR rows of w stay in L1 while every row of a passes over
/// them.
#[inline(always)]
unsafe fn nt_block<S: Simd, const MR: usize, const NR: usize>(
    m: usize,
    k: usize,
    a: &[f32],
    w: &[f32],
    nb: usize,
    out: &mut [f32],
) {
    assert!(a.len() >= m * k && w.len() >= nb * k && out.len() >= m * nb);
    assert!(NR <= 4 && m <= MAX_M);
    // Accumulators of the current NR rows of w: acc[i * NR + r].
    // SAFETY: the caller guarantees the ISA.
    let mut acc = [unsafe { S::zero() }; NT_ACC];
    let mut j = 0;
    while j < nb {
        let nr = (nb - j).min(NR);
        acc[..NR * m].fill(unsafe { S::zero() });
        let wj = &w[j * k..(j + nr) * k];
        for p0 in (0..k).step_by(KC_T) {
            let p1 = (p0 + KC_T).min(k);
            let mut i = 0;
            while i < m {
                let full = m - i >= MR;
                // SAFETY (all four): rows i..i+MR (or i) of a and 0..NR of wj exist, columns
                // p0..p1 lie within k, and acc holds NR * m entries.
                unsafe {
                    match (full, nr == NR) {
                        (true, true) => nt_tile::<S, MR, NR, NR>(a, wj, k, i, p0, p1, &mut acc),
                        (false, true) => nt_tile::<S, 1, NR, NR>(a, wj, k, i, p0, p1, &mut acc),
                        (true, false) => {
                            for r in 0..nr {
                                let (wr, accr) = (&wj[r * k..], &mut acc[r..]);
                                nt_tile::<S, MR, 1, NR>(a, wr, k, i, p0, p1, accr)
                            }
                        }
                        (false, false) => {
                            for r in 0..nr {
                                let (wr, accr) = (&wj[r * k..], &mut acc[r..]);
                                nt_tile::<S, 1, 1, NR>(a, wr, k, i, p0, p1, accr)
                            }
                        }
                    }
                }
                i += if full { MR } else { 1 };
            }
        }
        for i in 0..m {
            for r in 0..nr {
                // SAFETY: the caller guarantees the ISA.
                out[i * nb + j + r] = unsafe { S::reduce_add(acc[i * NR + r]) };
            }
        }
        j += nr;
    }
}

/// `acc[(i + ii) * LD + r] += a[i + ii, p0..p1] * w[r, p0..p1]` lane-wise, ii < MR, r < NR.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn nt_tile<S: Simd, const MR: usize, const NR: usize, const LD: usize>(
    a: &[f32],
    w: &[f32],
    k: usize,
    i: usize,
    p0: usize,
    p1: usize,
    acc: &mut [S::V],
) {
    assert!(p0 <= p1 && p1 <= k && a.len() >= (i + MR) * k && w.len() >= (NR - 1) * k + p1);
    assert!(acc.len() > (i + MR - 1) * LD + NR - 1);
    let l = S::LANES;
    // SAFETY: every read is of a[(i + ii) * k + q] or w[r * k + q] with q < p1 <= k, in bounds
    // by the asserts; the masked tail reads only lanes q < p1.
    unsafe {
        let mut t = [[S::zero(); NR]; MR];
        for ii in 0..MR {
            for r in 0..NR {
                t[ii][r] = acc[(i + ii) * LD + r];
            }
        }
        let ap = a.as_ptr().add(i * k);
        let wp = w.as_ptr();
        let mut p = p0;
        while p + l <= p1 {
            let mut wv = [S::zero(); NR];
            for r in 0..NR {
                wv[r] = S::load(wp.add(r * k + p));
            }
            for ii in 0..MR {
                let xv = S::load(ap.add(ii * k + p));
                for r in 0..NR {
                    t[ii][r] = S::fmadd(xv, wv[r], t[ii][r]);
                }
            }
            p += l;
        }
        if p < p1 {
            let mask = S::first(p1 - p);
            let mut wv = [S::zero(); NR];
            for r in 0..NR {
                wv[r] = S::load_masked(mask, wp.add(r * k + p));
            }
            for ii in 0..MR {
                let xv = S::load_masked(mask, ap.add(ii * k + p));
                for r in 0..NR {
                    t[ii][r] = S::fmadd(xv, wv[r], t[ii][r]);
                }
            }
        }
        for ii in 0..MR {
            for r in 0..NR {
                acc[(i + ii) * LD + r] = t[ii][r];
            }
        }
    }
}

/// Op::N block: `out[i, jj] = sum_p a[i, p] * b[p, j0 + jj]` for `b [k, n]`, `out [m, nb]`.
///
/// The block's columns are walked in panels of 4 vectors; k in KC_N-long tiles so the panel of
/// b stays in L1 while the rows of a pass over it, MR at a time, as axpys into register tiles
/// that are kept in `out` between k-tiles.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn nn_block<S: Simd, const MR: usize>(
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
    let l = S::LANES;
    for p0 in (0..k).step_by(KC_N) {
        let p1 = (p0 + KC_N).min(k);
        for js in (0..nb).step_by(4 * l) {
            let w = nb - js;
            // SAFETY: the caller guarantees the ISA.
            let masks = unsafe {
                [
                    S::first(w),
                    S::first(w.saturating_sub(l)),
                    S::first(w.saturating_sub(2 * l)),
                    S::first(w.saturating_sub(3 * l)),
                ]
            };
            let mut i = 0;
            while i < m {
                // SAFETY: rows i..i+MR of a and out exist; the masks limit every column access
                // to js..nb of the block (j0 + js.. j0 + nb of b); p0..p1 lie in k.
                unsafe {
                    if m - i >= MR {
                        nn_tile::<S, MR>(a, b, n, k, j0 + js, js, nb, masks, i, p0, p1, out);
                        i += MR;
                    } else {
                        nn_tile::<S, 1>(a, b, n, k, j0 + js, js, nb, masks, i, p0, p1, out);
                        i += 1;
                    }
                }
            }
        }
    }
}

/// `out[i + ii, js..js + 4L] += sum_{p0 <= p < p1} a[i + ii, p] * b[p, col..col + 4L]`,
/// ii < MR, vector v of the 4 limited to the lanes in `masks[v]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn nn_tile<S: Simd, const MR: usize>(
    a: &[f32],
    b: &[f32],
    n: usize,
    k: usize,
    col: usize,
    js: usize,
    ldo: usize,
    masks: [S::Mask; 4],
    i: usize,
    p0: usize,
    p1: usize,
    out: &mut [f32],
) {
    let l = S::LANES;
    let ap = a.as_ptr().wrapping_add(i * k);
    let bp = b.as_ptr().wrapping_add(col);
    let op = out.as_mut_ptr().wrapping_add(i * ldo + js);
    // SAFETY: the caller guarantees rows i..i+MR of a [.., k] and out [.., ldo], rows p0..p1
    // of b [k, n], and that the lanes set in masks[v] are columns in bounds of both b (from
    // col) and out (from js); masked loads and stores touch only those lanes (pointers are
    // formed with wrapping_add since a fully masked vector may point past b).
    unsafe {
        let mut t = [[S::zero(); 4]; MR];
        for ii in 0..MR {
            for v in 0..4 {
                t[ii][v] = S::load_masked(masks[v], op.wrapping_add(ii * ldo + l * v));
            }
        }
        for p in p0..p1 {
            let mut wv = [S::zero(); 4];
            for v in 0..4 {
                wv[v] = S::load_masked(masks[v], bp.wrapping_add(p * n + l * v));
            }
            for ii in 0..MR {
                let xv = S::splat(*ap.add(ii * k + p));
                for v in 0..4 {
                    t[ii][v] = S::fmadd(xv, wv[v], t[ii][v]);
                }
            }
        }
        for ii in 0..MR {
            for v in 0..4 {
                S::store_masked(op.wrapping_add(ii * ldo + l * v), masks[v], t[ii][v]);
            }
        }
    }
}
