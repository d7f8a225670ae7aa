//! CPU reference of the NF4 (QLoRA) base products; the low-rank terms they combine with live
//! in `lowrank.rs`.
//!
//! An NF4 weight `[out, in]` is never dequantized whole: each kernel cuts it into tiles of
//! [`tile_rows`] rows, dequantizes a tile into a scratch buffer (one per rayon worker, ~256 KiB;
//! up to 4 MiB in the products with many tokens, see [`gemm_tile_rows`]) with
//! [`Nf4Tensor::dequantize_rows`] (bitsandbytes' values, bit for bit) and feeds it to the GEMM. So a QLoRA layer holds its base at the NF4 size (~0.5 bytes per parameter)
//! and the f32 weight exists only one tile at a time.
//!
//! * Forward `y = x W^T`: tiles run in parallel, each writing its own columns of `y` (a strided
//!   GEMM on one thread; columns of different tiles never overlap).
//! * Backward `dx = dy W`: every tile adds into all of `dx`, so tiles go in waves: the tiles of
//!   a wave are dequantized in parallel into one buffer, then one (parallel) GEMM adds the
//!   wave's contribution.

use super::{Cpu, lowrank, new};
use crate::backend::{LowRank, Nf4Weight, Tensor};
use crate::error::Result;
use crate::quant::nf4::{NF4_CODE, Nf4Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::Arc;

/// Target size of one dequantized tile (f32), so that it stays in a core's L2 cache.
const TILE_BYTES: usize = 256 * 1024;

/// Below this many multiply-adds a GEMM runs on one thread (as in `sgemm`).
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Rows per dequantized tile for a weight with `din` columns and `dout` rows: about
/// [`TILE_BYTES`] of f32, a multiple of 16 in 16..=256, at most `dout`.
pub(super) fn tile_rows(din: usize, dout: usize) -> usize {
    let rows = (TILE_BYTES / (4 * din.max(1))).clamp(16, 256) / 16 * 16;
    rows.min(dout).max(1)
}

/// From this many tokens on, the products use [`GEMM_TILE_BYTES`] tiles.
const MANY_TOKENS: usize = 64;

/// Largest dequantized tile (f32) when the product has many tokens.
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

fn quant(w: &Nf4Weight<Cpu>) -> &Nf4Tensor {
    &w.buf
}

pub(super) fn upload(w: &Nf4Tensor) -> Result<Nf4Weight<Cpu>> {
    let (out, in_) = (w.shape()[0], w.shape()[1]);
    Ok(Nf4Weight {
        buf: Arc::new(w.clone()),
        out,
        in_,
        bytes: w.bytes(),
    })
}

pub(super) fn dequantize(w: &Nf4Weight<Cpu>) -> Result<Tensor<Cpu>> {
    Ok(new(quant(w).dequantize(), &[w.out, w.in_]))
}

/// Dequantizes rows `o0..o1` into `tile` (exactly `(o1 - o0) * in` long), equal bit for bit to
/// [`Nf4Tensor::dequantize_rows`] (`out[j] = NF4_CODE[q[j]] * absmax[j / blocksize]`, one f32
/// product), but a whole byte (two elements) at a time when the rows start at an even element,
/// with the block absmax decoded once per call (`absmax = q.absmax_f32()`).
fn dequant_tile(q: &Nf4Tensor, absmax: &[f32], o0: usize, o1: usize, tile: &mut [f32]) {
    let cols = q.shape()[1];
    let start = o0 * cols;
    if start % 2 == 1 {
        q.dequantize_rows(o0, o1, tile)
            .expect("tile rows lie within the weight and the tile is sized to them");
        return;
    }
    debug_assert_eq!(tile.len(), (o1 - o0) * cols);
    let (bs, packed) = (q.blocksize(), q.packed());
    let end = start + tile.len();
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    // Blocks start at multiples of the (even) blocksize, so every segment starts even.
    let mut j = start;
    while j < end {
        let b = j / bs;
        let seg_end = ((b + 1) * bs).min(end);
        let table: [f32; 16] = std::array::from_fn(|k| NF4_CODE[k] * absmax[b]);
        let out = &mut tile[j - start..seg_end - start];
        let bytes = &packed[j / 2..seg_end.div_ceil(2)];
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: the CPU has AVX-512F (checked above); `bytes` holds the segment's bytes.
            done = unsafe { dequant_segment_avx512(&table, bytes, out) };
        } else if avx2 {
            // SAFETY: the CPU has AVX2 (checked above); `bytes` holds the segment's bytes.
            done = unsafe { dequant_segment_avx2(&table, bytes, out) };
        }
        let (out, bytes) = (&mut out[done..], &bytes[done / 2..]);
        let pairs = out.len() / 2;
        for (o, &byte) in out.chunks_exact_mut(2).zip(&bytes[..pairs]) {
            o[0] = table[(byte >> 4) as usize];
            o[1] = table[(byte & 0x0f) as usize];
        }
        if out.len() % 2 == 1 {
            out[out.len() - 1] = table[(bytes[pairs] >> 4) as usize];
        }
        j = seg_end;
    }
}

/// The whole 32-element chunks of one absmax block's segment: `out[2i] = table[bytes[i] >> 4]`,
/// `out[2i + 1] = table[bytes[i] & 15]`, 32 at a time (16 bytes split into nibbles and
/// interleaved, widened to 32-bit indices, looked up in the 16-entry table held in one
/// register). The same table values as the scalar loop, so the same bits. Returns how many
/// elements it wrote (a multiple of 32); the caller does the rest.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dequant_segment_avx512(table: &[f32; 16], bytes: &[u8], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let chunks = (out.len() / 32).min(bytes.len() / 16);
    // SAFETY: chunk c reads bytes[16c..16c + 16] and writes out[32c..32c + 32], both in bounds
    // since c < chunks.
    unsafe {
        let t = _mm512_loadu_ps(table.as_ptr());
        let low = _mm_set1_epi8(0x0f);
        for c in 0..chunks {
            let b = _mm_loadu_si128(bytes.as_ptr().add(16 * c) as *const __m128i);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), low);
            let lo = _mm_and_si128(b, low);
            let first = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
            let second = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
            let o = out.as_mut_ptr().add(32 * c);
            _mm512_storeu_ps(o, _mm512_permutexvar_ps(first, t));
            _mm512_storeu_ps(o.add(16), _mm512_permutexvar_ps(second, t));
        }
    }
    32 * chunks
}

/// [`dequant_segment_avx512`] with AVX2: the 16-entry table in two 8-lane registers, each
/// index looked up in both (`vpermps` reads its low 3 bits) and the pair blended on bit 3.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequant_segment_avx2(table: &[f32; 16], bytes: &[u8], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let chunks = (out.len() / 32).min(bytes.len() / 16);
    // SAFETY: chunk c reads bytes[16c..16c + 16] and writes out[32c..32c + 32], both in bounds
    // since c < chunks.
    unsafe {
        let (t_lo, t_hi) = (
            _mm256_loadu_ps(table.as_ptr()),
            _mm256_loadu_ps(table.as_ptr().add(8)),
        );
        let look = |idx: __m256i| {
            let pick_hi = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
            _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(t_lo, idx),
                _mm256_permutevar8x32_ps(t_hi, idx),
                pick_hi,
            )
        };
        let low = _mm_set1_epi8(0x0f);
        for c in 0..chunks {
            let b = _mm_loadu_si128(bytes.as_ptr().add(16 * c) as *const __m128i);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), low);
            let lo = _mm_and_si128(b, low);
            let o = out.as_mut_ptr().add(32 * c);
            for (h, u) in [_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)]
                .into_iter()
                .enumerate()
            {
                let first = _mm256_cvtepu8_epi32(u);
                let second = _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(u));
                _mm256_storeu_ps(o.add(16 * h), look(first));
                _mm256_storeu_ps(o.add(16 * h + 8), look(second));
            }
        }
    }
    32 * chunks
}

pub(super) fn linear(
    x: &Tensor<Cpu>,
    w: &Nf4Weight<Cpu>,
    bias: Option<&Tensor<Cpu>>,
) -> Result<Tensor<Cpu>> {
    let (t, din, dout) = (x.dim(0), w.in_, w.out);
    let mut y = vec![0.0f32; t * dout];
    if let Some(b) = bias {
        for row in y.chunks_mut(dout.max(1)) {
            row.copy_from_slice(b.data());
        }
    }
    if t == 0 || dout == 0 || din == 0 {
        return Ok(new(y, &[t, dout]));
    }
    let q = quant(w);
    let absmax = q.absmax_f32();
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
            dequant_tile(q, &absmax, o0, o1, tile);
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
pub(super) fn backward_into(dy: &[f32], w: &Nf4Weight<Cpu>, t: usize, dx: &mut [f32]) {
    let (dout, din) = (w.out, w.in_);
    if t == 0 || dout == 0 || din == 0 {
        return;
    }
    let q = quant(w);
    let absmax = q.absmax_f32();
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
                dequant_tile(q, &absmax, a, a + tile.len() / din, tile);
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

pub(super) fn row_sq_norms(w: &Nf4Weight<Cpu>) -> Result<Tensor<Cpu>> {
    let (dout, din) = (w.out, w.in_);
    let q = quant(w);
    let absmax = q.absmax_f32();
    let tr = tile_rows(din, dout);
    let mut out = vec![0.0f32; dout];
    out.par_chunks_mut(tr).enumerate().for_each_init(
        || vec![0.0f32; tr * din],
        |scratch, (i, norms)| {
            let o0 = i * tr;
            let tile = &mut scratch[..norms.len() * din];
            dequant_tile(q, &absmax, o0, o0 + norms.len(), tile);
            // Same order and precision as the dense `row_sq_norms`.
            for (n, row) in norms.iter_mut().zip(tile.chunks(din.max(1))) {
                *n = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32;
            }
        },
    );
    Ok(new(out, &[dout]))
}

/// `||dequant(W) + ΔW||_row` by the low-rank identity, tile by tile: the identity is
/// row-separable, so each dequantized tile of rows runs the dense computation with the
/// matching rows of `B'` and of `||W||^2`. Tiles of at least 4r rows keep the per-tile
/// `A A^T` (`r^2 in`) small next to the tile's `W A^T` (`rows r in`).
pub(super) fn lowrank_row_norms(
    w0: &Nf4Weight<Cpu>,
    w0_row_sq: &Tensor<Cpu>,
    term: &LowRank<'_, Cpu>,
) -> Result<Tensor<Cpu>> {
    let (dout, din) = (w0.out, w0.in_);
    let (a, b, r) = lowrank::factors(term, din, dout);
    let bf = lowrank::folded_b(term, b, r);
    let q = quant(w0);
    let absmax = q.absmax_f32();
    let tr = tile_rows(din, dout).max(4 * r).min(dout.max(1));
    let tiles: Vec<Vec<f32>> = (0..dout.div_ceil(tr))
        .into_par_iter()
        .map(|i| {
            let (o0, o1) = (i * tr, ((i + 1) * tr).min(dout));
            let rows = o1 - o0;
            let mut tile = vec![0.0f32; rows * din];
            dequant_tile(q, &absmax, o0, o1, &mut tile);
            let p = lowrank::shrink(&tile, &a, rows, din, r);
            lowrank::norm_from_p(
                &p,
                (r, 1),
                &w0_row_sq.data()[o0..o1],
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::nf4::quantize_nf4;

    /// The tile dequantizer (vectorized where the CPU has AVX-512 or AVX2) gives the reference
    /// `dequantize_rows` bit for bit: every blocksize class, rows starting at odd elements
    /// (the scalar fallback), segments shorter than, equal to and longer than 32.
    #[test]
    fn dequant_tile_is_bit_exact() {
        for (rows, cols, bs, dq) in [
            (9, 37, 64, true),
            (7, 64, 32, false),
            (5, 100, 128, true),
            (3, 4096, 4096, true),
            (33, 18, 256, false),
        ] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.45)
                .collect();
            let q = quantize_nf4(&w, &[rows, cols], bs, dq).unwrap();
            let absmax = q.absmax_f32();
            for (o0, o1) in [(0, rows), (1, rows), (rows / 2, rows / 2 + 1), (0, 1)] {
                let mut want = vec![0.0f32; (o1 - o0) * cols];
                q.dequantize_rows(o0, o1, &mut want).unwrap();
                let mut got = vec![f32::NAN; want.len()];
                dequant_tile(&q, &absmax, o0, o1, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{rows}x{cols} blocksize {bs} rows {o0}..{o1} element {i}"
                    );
                }
            }
        }
    }

    /// Each ISA's segment dequantizer against the scalar lookup, bit for bit, called directly
    /// so that an AVX-512 machine also checks the AVX2 one: lengths around the 32-element
    /// chunk, every byte value.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dequant_segments_match_scalar_on_every_isa() {
        let table: [f32; 16] = std::array::from_fn(|k| NF4_CODE[k] * 0.37);
        let bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        type Segment = unsafe fn(&[f32; 16], &[u8], &mut [f32]) -> usize;
        let mut isas: Vec<(&str, Segment)> = Vec::new();
        if std::arch::is_x86_feature_detected!("avx2") {
            isas.push(("avx2", dequant_segment_avx2));
        } else {
            eprintln!("SKIP avx2 NF4 dequantizer: this CPU has no AVX2");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            isas.push(("avx512", dequant_segment_avx512));
        } else {
            eprintln!("SKIP avx512 NF4 dequantizer: this CPU has no AVX-512F");
        }
        for (name, f) in isas {
            for len in [0, 31, 32, 33, 64, 95, 512] {
                let mut out = vec![f32::NAN; len];
                // SAFETY: the CPU has the ISA (detected above).
                let done = unsafe { f(&table, &bytes, &mut out) };
                assert_eq!(done, len / 32 * 32, "{name} len {len}");
                for (i, v) in out[..done].iter().enumerate() {
                    let b = bytes[i / 2];
                    let want = table[if i % 2 == 0 { b >> 4 } else { b & 15 } as usize];
                    assert_eq!(v.to_bits(), want.to_bits(), "{name} len {len} element {i}");
                }
                assert!(
                    out[done..].iter().all(|v| v.is_nan()),
                    "{name} wrote past {done}"
                );
            }
        }
    }
}
