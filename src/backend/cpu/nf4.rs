//! The NF4 (QLoRA) base weight on the CPU: upload, whole dequantization (for merging) and the
//! tile decoder the products of `tiled.rs` read it through ([`Nf4Tiles`]): bitsandbytes'
//! `dequantize_4bit` values, bit for bit.

use super::tiled::Tiles;
use super::{Cpu, new};
use crate::backend::{Nf4Weight, Tensor};
use crate::error::Result;
use crate::quant::nf4::{NF4_CODE, Nf4Tensor};
use std::sync::Arc;

/// An NF4 weight as the tiled products read it, with its block absmax decoded once per call.
pub(super) struct Nf4Tiles<'a> {
    q: &'a Nf4Tensor,
    absmax: Vec<f32>,
}

impl<'a> Nf4Tiles<'a> {
    pub(super) fn new(w: &'a Nf4Weight<Cpu>) -> Self {
        let q = quant(w);
        Nf4Tiles {
            q,
            absmax: q.absmax_f32(),
        }
    }
}

impl Tiles for Nf4Tiles<'_> {
    fn dims(&self) -> (usize, usize) {
        (self.q.shape()[0], self.q.shape()[1])
    }
    fn decode(&self, o0: usize, o1: usize, tile: &mut [f32]) {
        dequant_tile(self.q, &self.absmax, o0, o1, tile);
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
