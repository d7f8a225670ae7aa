//! The bf16 base weight on the CPU (`--compute-dtype bf16`): the bf16 bits as uploaded, and the
//! tile decoder the products of `tiled.rs` read them through ([`Bf16Tiles`]). Widening a bf16
//! to f32 is exact (its 16 bits become the f32's top half), so a product over a bf16 base
//! equals the f32 product over the rounded weight up to summation order.

use super::gemm::{Op, bf16_takes, sgemm_bf16};
use super::tiled::Tiles;
use super::{Cpu, new};
use crate::backend::{Bf16Weight, Tensor};
use crate::error::Result;
use half::bf16;
use rayon::prelude::*;
use std::sync::Arc;

pub(super) fn upload(data: &[f32], out: usize, in_: usize) -> Result<Bf16Weight<Cpu>> {
    let bits: Vec<u16> = data
        .par_iter()
        .with_min_len(1 << 16)
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect();
    Ok(Bf16Weight {
        buf: Arc::new(bits),
        out,
        in_,
        bytes: 2 * out * in_,
    })
}

pub(super) fn to_f32(w: &Bf16Weight<Cpu>) -> Result<Tensor<Cpu>> {
    let mut data = vec![0.0f32; w.out * w.in_];
    widen(&w.buf, &mut data);
    Ok(new(data, &[w.out, w.in_]))
}

/// `x W^T (+ bias)` for x `[t, in]` straight from the bf16 bits ([`sgemm_bf16`]: the few-row
/// lane kernels, where the weight streams once at 2 bytes an element, or the packed kernels,
/// which widen it as they pack it); `None` where the caller should use the tiled product.
pub(super) fn linear_bits(
    x: &[f32],
    t: usize,
    w: &Bf16Weight<Cpu>,
    bias: Option<&Tensor<Cpu>>,
) -> Option<Vec<f32>> {
    let (dout, din) = w.dims();
    if !bf16_takes(Op::T, t, dout, din) {
        return None;
    }
    let mut y = vec![0.0f32; t * dout];
    if let Some(b) = bias {
        for row in y.chunks_mut(dout.max(1)) {
            row.copy_from_slice(b.data());
        }
    }
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    sgemm_bf16(Op::T, t, dout, din, 1.0, x, &w.buf, beta, &mut y).then_some(y)
}

/// `dx (+)= dy W` (`beta` 0 or 1) for dy `[t, out]` straight from the bf16 bits where
/// [`sgemm_bf16`] takes it; false, with dx untouched, where the caller should use the tiled
/// product.
pub(super) fn backward_bits(
    dy: &[f32],
    t: usize,
    w: &Bf16Weight<Cpu>,
    beta: f32,
    dx: &mut [f32],
) -> bool {
    let (dout, din) = w.dims();
    sgemm_bf16(Op::N, t, din, dout, 1.0, dy, &w.buf, beta, dx)
}

/// A bf16 weight as the tiled products read it.
pub(super) struct Bf16Tiles<'a>(&'a Bf16Weight<Cpu>);

impl<'a> Bf16Tiles<'a> {
    pub(super) fn new(w: &'a Bf16Weight<Cpu>) -> Self {
        Bf16Tiles(w)
    }
}

impl Tiles for Bf16Tiles<'_> {
    fn dims(&self) -> (usize, usize) {
        self.0.dims()
    }
    fn decode(&self, o0: usize, o1: usize, tile: &mut [f32]) {
        let cols = self.0.in_;
        widen(&self.0.buf[o0 * cols..o1 * cols], tile);
    }
}

/// `out[i] = f32 with bits bits[i] << 16`, 16 (AVX-512) or 8 (AVX2) at a time where the CPU
/// has them; `out` is exactly as long as `bits`.
fn widen(bits: &[u16], out: &mut [f32]) {
    debug_assert_eq!(bits.len(), out.len());
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        done = unsafe { widen_avx512(bits, out) };
    } else if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        done = unsafe { widen_avx2(bits, out) };
    }
    for (o, &b) in out[done..].iter_mut().zip(&bits[done..]) {
        *o = f32::from_bits((b as u32) << 16);
    }
}

/// The whole 16-element chunks of [`widen`]; returns how many elements it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512(bits: &[u16], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let chunks = bits.len().min(out.len()) / 16;
    // SAFETY: chunk c reads bits[16c..16c + 16] and writes out[16c..16c + 16], in bounds since
    // c < chunks.
    unsafe {
        for c in 0..chunks {
            let b = _mm256_loadu_si256(bits.as_ptr().add(16 * c) as *const __m256i);
            let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b));
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), _mm512_castsi512_ps(w));
        }
    }
    16 * chunks
}

/// The whole 8-element chunks of [`widen`]; returns how many elements it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_avx2(bits: &[u16], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let chunks = bits.len().min(out.len()) / 8;
    // SAFETY: chunk c reads bits[8c..8c + 8] and writes out[8c..8c + 8], in bounds since
    // c < chunks.
    unsafe {
        for c in 0..chunks {
            let b = _mm_loadu_si128(bits.as_ptr().add(8 * c) as *const __m128i);
            let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(b));
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), _mm256_castsi256_ps(w));
        }
    }
    8 * chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits that cover every class: zeros of both signs, subnormals, normals, infinities, NaNs.
    fn all_classes() -> Vec<u16> {
        (0..=u16::MAX)
            .step_by(7)
            .chain([0x8000, 0x7f80, 0xff80, 0x7fc1, 0x0001])
            .collect()
    }

    /// Each ISA's widening against the scalar rule, bit for bit, at lengths around its chunk
    /// (called directly, so an AVX-512 machine also checks the AVX2 one).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn widen_matches_scalar_on_every_isa() {
        let bits = all_classes();
        type Widen = unsafe fn(&[u16], &mut [f32]) -> usize;
        let mut isas: Vec<(&str, Widen, usize)> = Vec::new();
        if std::arch::is_x86_feature_detected!("avx2") {
            isas.push(("avx2", widen_avx2, 8));
        } else {
            eprintln!("SKIP avx2 bf16 widening: this CPU has no AVX2");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            isas.push(("avx512", widen_avx512, 16));
        } else {
            eprintln!("SKIP avx512 bf16 widening: this CPU has no AVX-512F");
        }
        for (name, f, chunk) in isas {
            for len in [0, 7, 8, 9, 15, 16, 17, 33, bits.len()] {
                let mut out = vec![f32::from_bits(0xdead_beef); len];
                // SAFETY: the CPU has the ISA (detected above).
                let done = unsafe { f(&bits[..len], &mut out) };
                assert_eq!(done, len / chunk * chunk, "{name} len {len}");
                for (i, v) in out[..done].iter().enumerate() {
                    let want = (bits[i] as u32) << 16;
                    assert_eq!(v.to_bits(), want, "{name} len {len} element {i}");
                }
                assert!(
                    out[done..].iter().all(|v| v.to_bits() == 0xdead_beef),
                    "{name} wrote past {done}"
                );
            }
        }
    }

    /// Upload rounds as `half::bf16::from_f32` (nearest, ties to even) and the tile decoder
    /// gives those values back for any row range.
    #[test]
    fn upload_rounds_to_nearest_even_and_tiles_decode_it() {
        // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties to even gives 1.0; just
        // above the tie rounds up.
        let tie = 1.0 + f32::powi(2.0, -8);
        let above = f32::from_bits(tie.to_bits() + 1);
        let (out, in_) = (5, 7);
        let mut data: Vec<f32> = (0..out * in_).map(|i| (i as f32 * 0.37).sin()).collect();
        data[0] = tie;
        data[1] = above;
        let w = upload(&data, out, in_).unwrap();
        assert_eq!(w.bytes(), 2 * out * in_);
        let full = to_f32(&w).unwrap();
        assert_eq!(full.data()[0], 1.0);
        assert_eq!(full.data()[1], 1.0 + f32::powi(2.0, -7));
        for (g, v) in full.data().iter().zip(&data) {
            assert_eq!(g.to_bits(), bf16::from_f32(*v).to_f32().to_bits());
            assert!((g - v).abs() <= v.abs() * f32::powi(2.0, -8));
        }
        let tiles = Bf16Tiles::new(&w);
        assert_eq!(tiles.dims(), (out, in_));
        let mut tile = vec![0.0f32; 2 * in_];
        tiles.decode(2, 4, &mut tile);
        assert_eq!(tile, full.data()[2 * in_..4 * in_]);
    }
}
