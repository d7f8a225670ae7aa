//! The base products over a frozen weight stored narrower than f32 (NF4 for QLoRA, bf16 for
//! `--compute-dtype bf16`), read a tile of rows at a time; the low-rank terms they combine
//! with live in `lowrank.rs`.
//!
//! Such a weight `[out, in]` is never widened whole: each kernel cuts it into tiles of
//! [`tile_rows`] rows, decodes a tile to f32 into a scratch buffer (one per rayon worker,
//! ~256 KiB; up to 4 MiB in the products with many tokens, see [`gemm_tile_rows`]) with the
//! format's [`Tiles::decode`] and feeds it to the GEMM. So the layer holds its base at the
//! stored size (NF4 ~0.5 bytes per parameter, bf16 2) and the f32 weight exists only one tile
//! at a time.
//!
//! * Forward `y = x W^T`: tiles run in parallel, each writing its own columns of `y` (a strided
//!   GEMM on one thread; columns of different tiles never overlap).
//! * Backward `dx = dy W`: every tile adds into all of `dx`, so tiles go in waves: the tiles of
//!   a wave are decoded in parallel into one buffer, then one (parallel) GEMM adds the wave's
//!   contribution.

use super::{Cpu, lowrank, new};
use crate::backend::{LowRank, Tensor};
use crate::error::Result;
use gemm::Parallelism;
use rayon::prelude::*;

/// A frozen `[out, in]` weight in a stored format the products widen a tile at a time.
pub(super) trait Tiles: Sync {
    /// `(out, in)`.
    fn dims(&self) -> (usize, usize);
    /// Writes rows `o0..o1` as f32 into `tile` (exactly `(o1 - o0) * in` long, row-major).
    fn decode(&self, o0: usize, o1: usize, tile: &mut [f32]);
}

/// Target size of one decoded tile (f32), so that it stays in a core's L2 cache.
const TILE_BYTES: usize = 256 * 1024;

/// Below this many multiply-adds a GEMM runs on one thread (as in `sgemm`).
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Rows per decoded tile for a weight with `din` columns and `dout` rows: about
/// [`TILE_BYTES`] of f32, a multiple of 16 in 16..=256, at most `dout`.
pub(super) fn tile_rows(din: usize, dout: usize) -> usize {
    let rows = (TILE_BYTES / (4 * din.max(1))).clamp(16, 256) / 16 * 16;
    rows.min(dout).max(1)
}

/// From this many tokens on, the products use [`GEMM_TILE_BYTES`] tiles.
const MANY_TOKENS: usize = 64;

/// Largest decoded tile (f32) when the product has many tokens.
const GEMM_TILE_BYTES: usize = 4 << 20;

/// Rows per tile of a product with `t` tokens. Each tile is one GEMM call, and each call packs
/// its whole `[t, in]` (or `[t, rows]`) token operand again and, in the backward, reads and
/// writes all of dx: with many tokens that repacking dominates small tiles (at T 512 on a
/// 4096x4096 layer, 256 tiles of 16 rows moved about 2 GB per forward). So from
/// [`MANY_TOKENS`] on a tile is up to [`GEMM_TILE_BYTES`], but never more than a
/// `1 / (2 * threads)` share of the rows, so the tiles still spread over the threads and the
/// f32 weight is never whole (the scratch is at most half of it, in the backward's wave).
fn gemm_tile_rows(t: usize, din: usize, dout: usize) -> usize {
    let small = tile_rows(din, dout);
    if t < MANY_TOKENS {
        return small;
    }
    let share = dout.div_ceil(2 * rayon::current_num_threads()).div_ceil(16) * 16;
    let big = (GEMM_TILE_BYTES / (4 * din.max(1))) / 16 * 16;
    big.min(share).max(small).min(dout).max(1)
}

/// A raw pointer that may cross threads. Sound here because the threads that share it write
/// disjoint elements (see the SAFETY notes where it is used).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// A method, not a field access, so that closures capture the whole (Send) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

pub(super) fn linear(
    x: &Tensor<Cpu>,
    w: &impl Tiles,
    bias: Option<&Tensor<Cpu>>,
) -> Result<Tensor<Cpu>> {
    let ((dout, din), t) = (w.dims(), x.dim(0));
    let mut y = vec![0.0f32; t * dout];
    if let Some(b) = bias {
        for row in y.chunks_mut(dout.max(1)) {
            row.copy_from_slice(b.data());
        }
    }
    if t == 0 || dout == 0 || din == 0 {
        return Ok(new(y, &[t, dout]));
    }
    let tr = gemm_tile_rows(t, din, dout);
    let n_tiles = dout.div_ceil(tr);
    // Few tiles (a small `out`) but a large product: let the GEMM use the threads instead.
    let par = if n_tiles < rayon::current_num_threads() && t * tr * din >= PARALLEL_MIN_MACS {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    let yp = SendPtr(y.as_mut_ptr());
    let xd = x.data();
    (0..n_tiles).into_par_iter().for_each_init(
        || vec![0.0f32; tr * din],
        |scratch, i| {
            let (o0, o1) = (i * tr, ((i + 1) * tr).min(dout));
            let rows = o1 - o0;
            let tile = &mut scratch[..rows * din];
            w.decode(o0, o1, tile);
            // y[:, o0..o1] (+)= x tile^T: dst [t, rows] with row stride dout; lhs x [t, din];
            // rhs tile^T [din, rows], i.e. element (p, j) at tile[j * din + p].
            // SAFETY: `y` holds t * dout elements and this call touches only the columns
            // o0..o1 (< dout) of rows 0..t, which no other tile touches; x and the tile are
            // read within their lengths (t * din and rows * din).
            unsafe {
                gemm::gemm(
                    t,
                    rows,
                    din,
                    yp.get().add(o0),
                    1,
                    dout as isize,
                    bias.is_some(),
                    xd.as_ptr(),
                    1,
                    din as isize,
                    tile.as_ptr(),
                    din as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        },
    );
    Ok(new(y, &[t, dout]))
}

/// `dx += dy W` with dy `[t, out]`, dx `[t, in]`, tile wave by tile wave.
pub(super) fn backward_into(dy: &[f32], w: &impl Tiles, t: usize, dx: &mut [f32]) {
    let (dout, din) = w.dims();
    if t == 0 || dout == 0 || din == 0 {
        return;
    }
    let tr = gemm_tile_rows(t, din, dout);
    let wave = (tr * rayon::current_num_threads()).min(dout);
    let mut scratch = vec![0.0f32; wave * din];
    let mut o0 = 0;
    while o0 < dout {
        let o1 = (o0 + wave).min(dout);
        let rows = o1 - o0;
        let buf = &mut scratch[..rows * din];
        buf.par_chunks_mut(tr * din)
            .enumerate()
            .for_each(|(i, tile)| {
                let a = o0 + i * tr;
                w.decode(a, a + tile.len() / din, tile);
            });
        let par = if t * rows * din >= PARALLEL_MIN_MACS {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        };
        // dx += dy[:, o0..o1] buf: lhs [t, rows] with row stride dout; rhs buf [rows, din].
        // SAFETY: dy holds t * dout elements and is read at rows 0..t, columns o0..o1; buf holds
        // rows * din; dx (t * din) is written by this call alone and aliases neither.
        unsafe {
            gemm::gemm(
                t,
                din,
                rows,
                dx.as_mut_ptr(),
                1,
                din as isize,
                true,
                dy.as_ptr().add(o0),
                1,
                dout as isize,
                buf.as_ptr(),
                1,
                din as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        o0 = o1;
    }
}

pub(super) fn row_sq_norms(w: &impl Tiles) -> Result<Tensor<Cpu>> {
    let (dout, din) = w.dims();
    let tr = tile_rows(din, dout);
    let mut out = vec![0.0f32; dout];
    out.par_chunks_mut(tr).enumerate().for_each_init(
        || vec![0.0f32; tr * din],
        |scratch, (i, norms)| {
            let o0 = i * tr;
            let tile = &mut scratch[..norms.len() * din];
            w.decode(o0, o0 + norms.len(), tile);
            // Same order and precision as the dense `row_sq_norms`.
            for (n, row) in norms.iter_mut().zip(tile.chunks(din.max(1))) {
                *n = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32;
            }
        },
    );
    Ok(new(out, &[dout]))
}

/// `||W + ΔW||_row` (W decoded) by the low-rank identity, tile by tile: the identity is
/// row-separable, so each decoded tile of rows runs the dense computation with the
/// matching rows of `B'` and of `||W||^2`. Tiles of at least 4r rows keep the per-tile
/// `A A^T` (`r^2 in`) small next to the tile's `W A^T` (`rows r in`).
pub(super) fn lowrank_row_norms(
    w0: &impl Tiles,
    w0_row_sq: &Tensor<Cpu>,
    term: &LowRank<'_, Cpu>,
) -> Result<Tensor<Cpu>> {
    let (dout, din) = w0.dims();
    let (a, b, r) = lowrank::factors(term, din, dout);
    let bf = lowrank::folded_b(term, b, r);
    let tr = tile_rows(din, dout).max(4 * r).min(dout.max(1));
    let tiles: Vec<Vec<f32>> = (0..dout.div_ceil(tr))
        .into_par_iter()
        .map(|i| {
            let (o0, o1) = (i * tr, ((i + 1) * tr).min(dout));
            let rows = o1 - o0;
            let mut tile = vec![0.0f32; rows * din];
            w0.decode(o0, o1, &mut tile);
            let p = lowrank::shrink(&tile, &a, rows, din, r);
            lowrank::norm_from_p(
                &p,
                (r, 1),
                &w0_row_sq.data()[o0..o1],
                &tile,
                &a,
                &bf[o0 * r..o1 * r],
                term.scale,
                din,
                r,
            )
        })
        .collect();
    Ok(new(tiles.concat(), &[dout]))
}
