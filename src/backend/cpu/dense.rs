//! CPU dense linear algebra: the base products `x W^T + bias`, `dy W`, `dy^T x` over a dense, NF4
//! or bf16 weight, elementwise updates and row norms. Plain calls of [`sgemm`]; the NF4 and bf16
//! bases go through `tiled.rs`, tile by tile.

use super::bf16::{self, Bf16Tiles};
use super::gemm::{Op, sgemm};
use super::nf4::Nf4Tiles;
use super::{Cpu, new, tiled};
use crate::backend::{Base, Tensor};
use crate::error::Result;
use rayon::prelude::*;

/// `x W^T (+ bias)` for x `[t, in]` over a base → `[t, out]` data.
pub(super) fn base_product(
    x: &Tensor<Cpu>,
    base: Base<'_, Cpu>,
    bias: Option<&Tensor<Cpu>>,
) -> Result<Vec<f32>> {
    match base {
        Base::Dense(w) => Ok(linear(x.data(), w, bias, x.dim(0))),
        Base::Nf4(w) => Ok(tiled::linear(x, &Nf4Tiles::new(w), bias)?.into_vec()),
        Base::Bf16(w) => match bf16::linear_bits(x.data(), x.dim(0), w, bias) {
            Some(y) => Ok(y),
            None => Ok(tiled::linear(x, &Bf16Tiles::new(w), bias)?.into_vec()),
        },
    }
}

/// `x W^T + bias` for a dense `w [out, in]`, `x` holding `t` rows.
pub(super) fn linear(x: &[f32], w: &Tensor<Cpu>, bias: Option<&Tensor<Cpu>>, t: usize) -> Vec<f32> {
    let (dout, din) = (w.dim(0), w.dim(1));
    let mut y = vec![0.0f32; t * dout];
    if let Some(b) = bias {
        for row in y.chunks_mut(dout.max(1)) {
            row.copy_from_slice(b.data());
        }
    }
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    sgemm(Op::N, Op::T, t, dout, din, 1.0, x, w.data(), beta, &mut y);
    y
}

/// `dx (+)= dy W` for dy `[t, out]` over a base; adds into `acc` when given,
/// else returns the new dx.
pub(super) fn base_backward(
    dy: &[f32],
    t: usize,
    base: Base<'_, Cpu>,
    acc: Option<&mut Tensor<Cpu>>,
) -> Option<Tensor<Cpu>> {
    let (dout, din) = base.dims();
    let mut fresh = None;
    let (dx, beta) = match acc {
        Some(dx) => (dx.data_mut(), 1.0),
        None => (fresh.insert(vec![0.0f32; t * din]).as_mut_slice(), 0.0),
    };
    match base {
        Base::Dense(w) => sgemm(Op::N, Op::N, t, din, dout, 1.0, dy, w.data(), beta, dx),
        Base::Nf4(w) => tiled::backward_into(dy, &Nf4Tiles::new(w), t, dx),
        Base::Bf16(w) => {
            if !bf16::backward_bits(dy, t, w, beta, dx) {
                tiled::backward_into(dy, &Bf16Tiles::new(w), t, dx)
            }
        }
    }
    fresh.map(|v| new(v, &[t, din]))
}

/// `dW += dy^T x`.
pub(super) fn backward_weight(dy: &Tensor<Cpu>, x: &Tensor<Cpu>, dw: &mut Tensor<Cpu>) {
    let (t, dout, din) = (dy.dim(0), dy.dim(1), x.dim(1));
    sgemm(
        Op::T,
        Op::N,
        dout,
        din,
        t,
        1.0,
        dy.data(),
        x.data(),
        1.0,
        dw.data_mut(),
    );
}

pub(super) fn axpy(a: &mut Tensor<Cpu>, alpha: f32, b: &Tensor<Cpu>) {
    a.data_mut()
        .par_iter_mut()
        .with_min_len(1 << 14)
        .zip(b.data().par_iter())
        .for_each(|(x, y)| *x += alpha * y);
}

pub(super) fn scale(a: &mut Tensor<Cpu>, alpha: f32) {
    a.data_mut().iter_mut().for_each(|x| *x *= alpha);
}

pub(super) fn sum_squares(a: &Tensor<Cpu>) -> f64 {
    a.data().iter().map(|&x| (x as f64) * (x as f64)).sum()
}

/// `||W||_row^2 [out]` of a dense or NF4 base, in f64.
pub(super) fn row_sq_norms(base: Base<'_, Cpu>) -> Result<Tensor<Cpu>> {
    match base {
        Base::Dense(w) => {
            let (dout, din) = (w.dim(0), w.dim(1));
            let out: Vec<f32> = (0..dout)
                .map(|o| sum_sq_f64(&w.data()[o * din..(o + 1) * din]) as f32)
                .collect();
            Ok(new(out, &[dout]))
        }
        Base::Nf4(w) => tiled::row_sq_norms(&Nf4Tiles::new(w)),
        Base::Bf16(w) => tiled::row_sq_norms(&Bf16Tiles::new(w)),
    }
}

/// `v *= k`, with AVX-512 where the CPU has it.
pub(super) fn scale_in_place(v: &mut [f32], k: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(v: &mut [f32], k: f32) {
            v.iter_mut().for_each(|x| *x *= k);
        }
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { avx512(v, k) };
    }
    v.iter_mut().for_each(|x| *x *= k);
}

/// `sum(v^2)` accumulated in f64 (its rounding error is far below f32's, whatever the order):
/// AVX-512 with four 8-lane accumulators where the CPU has it, else 8 interleaved partial sums.
/// (A single running f64 sum would be one serial chain of adds.)
pub(super) fn sum_sq_f64(v: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { sum_sq_f64_avx512(v) };
    }
    let mut acc = [0.0f64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64 * x as f64;
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += x as f64 * x as f64;
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_sq_f64_avx512(v: &[f32]) -> f64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_pd(); 4];
    let mut chunks = v.chunks_exact(32);
    for c in &mut chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: c holds 32 floats; lanes 8j..8j+8 are in bounds.
            let x = _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * j)) });
            *a = _mm512_fmadd_pd(x, x, *a);
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| x as f64 * x as f64)
        .sum();
    let sum = _mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3]));
    _mm512_reduce_add_pd(sum) + tail
}
