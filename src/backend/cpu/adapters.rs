//! CPU reference of the DoRA, VeRA and AdaLoRA kernels (PEFT 0.21 formulas, see
//! `tests/golden/README.md` sections 2-4). Plain loops around [`sgemm`]; every `[out, in]`
//! product that PEFT forms (`B A`, the full-weight norm) is avoided except in the merges.

use super::gemm::{Op, sgemm, sgemm_serial};
use super::{Cpu, new};
use crate::backend::{AdaLoraGrads, Backend, DoraGrads, DoraSaved, Tensor, check};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// `x A^T` for x `[t, din]`, a `[r, din]` → `[t, r]`.
fn shrink(x: &[f32], a: &[f32], t: usize, din: usize, r: usize) -> Vec<f32> {
    let mut h = vec![0.0f32; t * r];
    sgemm(Op::N, Op::T, t, r, din, 1.0, x, a, 0.0, &mut h);
    h
}

// ---- DoRA --------------------------------------------------------------------------------------

/// `v *= k`, with AVX-512 where the CPU has it.
fn scale_in_place(v: &mut [f32], k: f32) {
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
fn sum_sq_f64(v: &[f32]) -> f64 {
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

pub(super) fn row_sq_norms(w: &Tensor<Cpu>) -> Result<Tensor<Cpu>> {
    let (dout, din) = w.dims2("w")?;
    let out: Vec<f32> = (0..dout)
        .map(|o| sum_sq_f64(&w.data()[o * din..(o + 1) * din]) as f32)
        .collect();
    Ok(new(out, &[dout]))
}

pub(super) fn dora_weight_norm(
    w0: &Tensor<Cpu>,
    w0_row_sq: &Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
) -> Result<Tensor<Cpu>> {
    let (dout, din) = w0.dims2("w0")?;
    let r = check::lora(din, dout, a, b)?;
    check::vector("w0_row_sq", w0_row_sq, dout)?;
    // P = W0 A^T [out, r].
    let p = shrink(w0.data(), a.data(), dout, din, r);
    Ok(norm_from_p(&p, (r, 1), w0_row_sq, a, b, s))
}

/// The low-rank identity `n_o^2 = ||W0_o||^2 + 2 s (P B^T)_oo + s^2 (B G B^T)_oo` with
/// `P = W0 A^T [out, r]` (element `(o, j)` at `p[o * p_strides.0 + j * p_strides.1]`),
/// `G = A A^T [r, r]`, in f64 (cancellation between the terms stays small). Shapes checked by
/// the caller.
fn norm_from_p(
    p: &[f32],
    p_strides: (usize, usize),
    w0_row_sq: &Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
) -> Tensor<Cpu> {
    let (r, din) = (a.dim(0), a.dim(1));
    let dout = b.dim(0);
    // G = A A^T [r, r]; Q = B G [out, r].
    let mut g = vec![0.0f32; r * r];
    sgemm(
        Op::N,
        Op::T,
        r,
        r,
        din,
        1.0,
        a.data(),
        a.data(),
        0.0,
        &mut g,
    );
    let mut q = vec![0.0f32; dout * r];
    sgemm(Op::N, Op::N, dout, r, r, 1.0, b.data(), &g, 0.0, &mut q);
    let s = s as f64;
    let (ps_o, ps_j) = p_strides;
    let n: Vec<f32> = (0..dout)
        .map(|o| {
            let br = &b.data()[o * r..(o + 1) * r];
            let (mut cross, mut quad) = (0.0f64, 0.0f64);
            for j in 0..r {
                cross += p[o * ps_o + j * ps_j] as f64 * br[j] as f64;
                quad += q[o * r + j] as f64 * br[j] as f64;
            }
            let sq = w0_row_sq.data()[o] as f64 + 2.0 * s * cross + s * s * quad;
            sq.max(0.0).sqrt() as f32
        })
        .collect();
    new(n, &[dout])
}

/// [`dora_forward`] with its weight norm, one pass over W0 for both: `[x; A] W0^T` gives the base
/// product (first T rows) and `P^T = A W0^T` (last r rows) of [`dora_weight_norm`].
#[allow(clippy::too_many_arguments)]
pub(super) fn dora_forward_with_norm(
    x: &Tensor<Cpu>,
    w0: &Tensor<Cpu>,
    w0_row_sq: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
    m: &Tensor<Cpu>,
) -> Result<(Tensor<Cpu>, DoraSaved<Cpu>, Tensor<Cpu>)> {
    let (t, din, dout) = check::linear(x, w0)?;
    let r = check::lora(din, dout, a, b)?;
    check::vector("w0_row_sq", w0_row_sq, dout)?;
    check::vector("lora_magnitude_vector", m, dout)?;
    if let Some(bias) = bias {
        check::vector("bias", bias, dout)?;
    }
    let mut stacked = Vec::with_capacity((t + r) * din);
    stacked.extend_from_slice(x.data());
    stacked.extend_from_slice(a.data());
    let mut prod = vec![0.0f32; (t + r) * dout];
    sgemm(
        Op::N,
        Op::T,
        t + r,
        dout,
        din,
        1.0,
        &stacked,
        w0.data(),
        0.0,
        &mut prod,
    );
    let n = norm_from_p(&prod[t * dout..], (1, dout), w0_row_sq, a, b, s);
    prod.truncate(t * dout);
    let (y, saved) = dora_forward_from_base(new(prod, &[t, dout]), x, bias, a, b, s, m, &n)?;
    Ok((y, saved, n))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_forward(
    x: &Tensor<Cpu>,
    w0: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
    m: &Tensor<Cpu>,
    n: &Tensor<Cpu>,
) -> Result<(Tensor<Cpu>, DoraSaved<Cpu>)> {
    let (t, din, dout) = check::linear(x, w0)?;
    check::lora(din, dout, a, b)?;
    check::vector("lora_magnitude_vector", m, dout)?;
    check::vector("weight_norm", n, dout)?;
    if let Some(bias) = bias {
        check::vector("bias", bias, dout)?;
    }
    // The base product, then the format-agnostic DoRA term on top of it.
    let mut base = vec![0.0f32; t * dout];
    sgemm(
        Op::N,
        Op::T,
        t,
        dout,
        din,
        1.0,
        x.data(),
        w0.data(),
        0.0,
        &mut base,
    );
    dora_forward_from_base(new(base, &[t, dout]), x, bias, a, b, s, m, n)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_backward(
    dy: &Tensor<Cpu>,
    x: &Tensor<Cpu>,
    saved: &DoraSaved<Cpu>,
    w0: &Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
    m: &Tensor<Cpu>,
    n: &Tensor<Cpu>,
) -> Result<DoraGrads<Cpu>> {
    let (t, din, dout) = check::linear(x, w0)?;
    check::lora(din, dout, a, b)?;
    check::vector("lora_magnitude_vector", m, dout)?;
    check::vector("weight_norm", n, dout)?;
    dy.expect_shape("dy", &[t, dout])?;
    // The adapter's gradients and s (g' B) A, then dx += g' W0 for the dense base.
    let (mut grads, gk) = dora_backward_adapter(dy, x, saved, a, b, s, m, n)?;
    sgemm(
        Op::N,
        Op::N,
        t,
        din,
        dout,
        1.0,
        gk.data(),
        w0.data(),
        1.0,
        grads.dx.data_mut(),
    );
    Ok(grads)
}

/// Checks the merge inputs and returns `k = m / n` per row.
fn dora_merge_factor(
    w: &Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    m: &Tensor<Cpu>,
    n: &Tensor<Cpu>,
) -> Result<(usize, usize, usize, Vec<f32>)> {
    let (dout, din) = w.dims2("w")?;
    let r = check::lora(din, dout, a, b)?;
    check::vector("lora_magnitude_vector", m, dout)?;
    check::vector("weight_norm", n, dout)?;
    let k = m.data().iter().zip(n.data()).map(|(m, n)| m / n).collect();
    Ok((dout, din, r, k))
}

pub(super) fn dora_merge(
    w: &mut Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
    m: &Tensor<Cpu>,
    n: &Tensor<Cpu>,
) -> Result<()> {
    let (dout, din, r, k) = dora_merge_factor(w, a, b, m, n)?;
    sgemm(
        Op::N,
        Op::N,
        dout,
        din,
        r,
        s,
        b.data(),
        a.data(),
        1.0,
        w.data_mut(),
    );
    for (row, k) in w.data_mut().chunks_mut(din.max(1)).zip(&k) {
        row.iter_mut().for_each(|v| *v *= k);
    }
    Ok(())
}

/// Rows per task of [`dora_merge_with_norm`]: a block of `W` (64 x 4096 f32 = 1 MiB at most for
/// Llama widths) is updated, measured and scaled while it sits in the core's cache.
const MERGE_ROWS: usize = 64;

/// PEFT's DoRA merge in one pass over `W`: per block of rows, `W' = W + s B A` (a serial GEMM on
/// the block), `n = ||W'||_row`, `W = (m / n) W'`. Returns n.
/// `w_row_sq` is only checked: the norm is taken from the merged rows, as PEFT's `merge` does.
/// Sums of squares in f64, as [`row_sq_norms`].
pub(super) fn dora_merge_with_norm(
    w: &mut Tensor<Cpu>,
    w_row_sq: &Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
    m: &Tensor<Cpu>,
) -> Result<Tensor<Cpu>> {
    let (dout, din) = w.dims2("w")?;
    let r = check::lora(din, dout, a, b)?;
    check::vector("w0_row_sq", w_row_sq, dout)?;
    check::vector("lora_magnitude_vector", m, dout)?;
    let mut n = vec![0.0f32; dout];
    if din == 0 {
        return Ok(new(n, &[dout]));
    }
    let (a, b, m) = (a.data(), b.data(), m.data());
    w.data_mut()
        .par_chunks_mut(MERGE_ROWS * din)
        .zip(n.par_chunks_mut(MERGE_ROWS))
        .enumerate()
        .for_each(|(blk, (wc, nc))| {
            let o0 = blk * MERGE_ROWS;
            let rows = nc.len();
            sgemm_serial(
                Op::N,
                Op::N,
                rows,
                din,
                r,
                s,
                &b[o0 * r..(o0 + rows) * r],
                a,
                1.0,
                wc,
            );
            for ((row, nv), mv) in wc.chunks_mut(din).zip(nc.iter_mut()).zip(&m[o0..]) {
                *nv = sum_sq_f64(row).sqrt() as f32;
                scale_in_place(row, mv / *nv);
            }
        });
    Ok(new(n, &[dout]))
}

pub(super) fn dora_unmerge(
    w: &mut Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
    m: &Tensor<Cpu>,
    n: &Tensor<Cpu>,
) -> Result<()> {
    let (dout, din, r, k) = dora_merge_factor(w, a, b, m, n)?;
    if let Some(o) = k.iter().position(|k| *k == 0.0 || !k.is_finite()) {
        return Err(Error::arg(
            "lora_magnitude_vector",
            format!(
                "row {o}: m / weight_norm = {} is not invertible, cannot unmerge",
                k[o]
            ),
        ));
    }
    // PEFT: weight / dora_factor - delta_weight (a division, as PEFT does, not a reciprocal).
    for (row, k) in w.data_mut().chunks_mut(din.max(1)).zip(&k) {
        row.iter_mut().for_each(|v| *v /= k);
    }
    sgemm(
        Op::N,
        Op::N,
        dout,
        din,
        r,
        -s,
        b.data(),
        a.data(),
        1.0,
        w.data_mut(),
    );
    Ok(())
}

// ---- VeRA --------------------------------------------------------------------------------------

/// Checks the shared projections and lambdas against `(din, dout)`; returns r, the contiguous
/// copy of `As = vera_A[:, :din]` (`[r, din]`) and `Bs = vera_B[:dout, :]` (a prefix slice).
fn vera_slices<'a>(
    din: usize,
    dout: usize,
    vera_a: &Tensor<Cpu>,
    vera_b: &'a Tensor<Cpu>,
    lambda_d: &Tensor<Cpu>,
    lambda_b: &Tensor<Cpu>,
) -> Result<(usize, Vec<f32>, &'a [f32])> {
    let (r, max_in) = vera_a.dims2("vera_A")?;
    if r == 0 || max_in < din {
        return Err(Error::shape(
            "vera_A",
            format!("[r >= 1, max_in >= {din}]"),
            vera_a.shape(),
        ));
    }
    let (max_out, br) = vera_b.dims2("vera_B")?;
    if br != r || max_out < dout {
        return Err(Error::shape(
            "vera_B",
            format!("[max_out >= {dout}, {r}]"),
            vera_b.shape(),
        ));
    }
    check::vector("vera_lambda_d", lambda_d, r)?;
    check::vector("vera_lambda_b", lambda_b, dout)?;
    let a_s: Vec<f32> = vera_a
        .data()
        .chunks(max_in)
        .flat_map(|row| &row[..din])
        .copied()
        .collect();
    Ok((r, a_s, &vera_b.data()[..dout * r]))
}

/// `diag(l) B` for `B [len(l), cols]` (row o scaled by `l[o]`): VeRA's `lambda_b` folded into
/// `Bs`, AdaLoRA's `E` into `A`.
fn scale_rows(b: &[f32], cols: usize, l: &[f32]) -> Vec<f32> {
    let mut out = b[..l.len() * cols].to_vec();
    for (row, l) in out.chunks_mut(cols.max(1)).zip(l) {
        row.iter_mut().for_each(|v| *v *= l);
    }
    out
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vera_forward(
    x: &Tensor<Cpu>,
    w0: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
    vera_a: &Tensor<Cpu>,
    vera_b: &Tensor<Cpu>,
    lambda_d: &Tensor<Cpu>,
    lambda_b: &Tensor<Cpu>,
) -> Result<(Tensor<Cpu>, Tensor<Cpu>)> {
    let (t, din, dout) = check::linear(x, w0)?;
    let (r, a_s, b_s) = vera_slices(din, dout, vera_a, vera_b, lambda_d, lambda_b)?;
    let mut y = Cpu.linear(x, w0, bias)?.into_vec();
    let h = shrink(x.data(), &a_s, t, din, r);
    // hd = lambda_d ⊙ h; y += lambda_b ⊙ (hd Bs^T) = hd (lambda_b ⊙ Bs)^T, accumulated straight
    // into y (lambda_b scales the [out, r] factor, not a [T, out] temporary).
    let mut hd = h.clone();
    for row in hd.chunks_mut(r) {
        row.iter_mut()
            .zip(lambda_d.data())
            .for_each(|(v, l)| *v *= l);
    }
    let b_l = scale_rows(b_s, r, lambda_b.data());
    sgemm(Op::N, Op::T, t, dout, r, 1.0, &hd, &b_l, 1.0, &mut y);
    Ok((new(y, &[t, dout]), new(h, &[t, r])))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vera_backward(
    dy: &Tensor<Cpu>,
    x: &Tensor<Cpu>,
    h: &Tensor<Cpu>,
    w0: &Tensor<Cpu>,
    vera_a: &Tensor<Cpu>,
    vera_b: &Tensor<Cpu>,
    lambda_d: &Tensor<Cpu>,
    lambda_b: &Tensor<Cpu>,
) -> Result<(Tensor<Cpu>, Tensor<Cpu>, Tensor<Cpu>)> {
    let (t, din, dout) = check::linear(x, w0)?;
    let (r, a_s, b_s) = vera_slices(din, dout, vera_a, vera_b, lambda_d, lambda_b)?;
    dy.expect_shape("dy", &[t, dout])?;
    h.expect_shape("h", &[t, r])?;
    // q = (dy ⊙ lambda_b) Bs = dy (lambda_b ⊙ Bs)  [T, r]
    let b_l = scale_rows(b_s, r, lambda_b.data());
    let mut q = vec![0.0f32; t * r];
    sgemm(Op::N, Op::N, t, r, dout, 1.0, dy.data(), &b_l, 0.0, &mut q);
    // dlambda_d = sum_T(q ⊙ h)
    let mut dld = vec![0.0f64; r];
    for (qr, hr) in q.chunks(r).zip(h.data().chunks(r)) {
        for j in 0..r {
            dld[j] += qr[j] as f64 * hr[j] as f64;
        }
    }
    // dx = dy W0 + (q ⊙ lambda_d) As
    for row in q.chunks_mut(r) {
        row.iter_mut()
            .zip(lambda_d.data())
            .for_each(|(v, l)| *v *= l);
    }
    let mut dx = vec![0.0f32; t * din];
    sgemm(
        Op::N,
        Op::N,
        t,
        din,
        dout,
        1.0,
        dy.data(),
        w0.data(),
        0.0,
        &mut dx,
    );
    sgemm(Op::N, Op::N, t, din, r, 1.0, &q, &a_s, 1.0, &mut dx);
    // dlambda_b[o] = sum_j (dy^T h)[o, j] Bs[o, j] lambda_d[j]
    let mut gh = vec![0.0f32; dout * r];
    sgemm(
        Op::T,
        Op::N,
        dout,
        r,
        t,
        1.0,
        dy.data(),
        h.data(),
        0.0,
        &mut gh,
    );
    let dlb: Vec<f32> = (0..dout)
        .map(|o| {
            (0..r)
                .map(|j| gh[o * r + j] as f64 * b_s[o * r + j] as f64 * lambda_d.data()[j] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    Ok((
        new(dx, &[t, din]),
        new(dld.iter().map(|&v| v as f32).collect(), &[r]),
        new(dlb, &[dout]),
    ))
}

pub(super) fn vera_merge(
    w: &mut Tensor<Cpu>,
    vera_a: &Tensor<Cpu>,
    vera_b: &Tensor<Cpu>,
    lambda_d: &Tensor<Cpu>,
    lambda_b: &Tensor<Cpu>,
    sign: f32,
) -> Result<()> {
    let (dout, din) = w.dims2("w")?;
    let (r, mut a_s, b_s) = vera_slices(din, dout, vera_a, vera_b, lambda_d, lambda_b)?;
    // (lambda_b[:, None] ⊙ Bs) [out, r] and (lambda_d[:, None] ⊙ As) [r, in], then one GEMM.
    let mut bl = b_s.to_vec();
    for (row, l) in bl.chunks_mut(r).zip(lambda_b.data()) {
        row.iter_mut().for_each(|v| *v *= l);
    }
    for (row, l) in a_s.chunks_mut(din.max(1)).zip(lambda_d.data()) {
        row.iter_mut().for_each(|v| *v *= l);
    }
    sgemm(
        Op::N,
        Op::N,
        dout,
        din,
        r,
        sign,
        &bl,
        &a_s,
        1.0,
        w.data_mut(),
    );
    Ok(())
}

// ---- AdaLoRA -----------------------------------------------------------------------------------

/// Checks AdaLoRA factor shapes; returns `(r, A ⊙ E)`.
fn adalora_ae(
    din: usize,
    dout: usize,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    e: &Tensor<Cpu>,
) -> Result<(usize, Vec<f32>)> {
    let r = check::lora(din, dout, a, b)?;
    e.expect_shape("lora_E", &[r, 1])?;
    Ok((r, scale_rows(a.data(), din, e.data())))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_forward(
    x: &Tensor<Cpu>,
    w0: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    e: &Tensor<Cpu>,
    scaling: f32,
    ranknum: f32,
) -> Result<(Tensor<Cpu>, Tensor<Cpu>)> {
    let (t, din, dout) = check::linear(x, w0)?;
    let (r, ae) = adalora_ae(din, dout, a, b, e)?;
    let c = check::adalora_factor(scaling, ranknum)?;
    let mut y = Cpu.linear(x, w0, bias)?.into_vec();
    let h = shrink(x.data(), &ae, t, din, r);
    sgemm(Op::N, Op::T, t, dout, r, c, &h, b.data(), 1.0, &mut y);
    Ok((new(y, &[t, dout]), new(h, &[t, r])))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_backward(
    dy: &Tensor<Cpu>,
    x: &Tensor<Cpu>,
    h: &Tensor<Cpu>,
    w0: &Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    e: &Tensor<Cpu>,
    scaling: f32,
    ranknum: f32,
) -> Result<AdaLoraGrads<Cpu>> {
    let (t, din, dout) = check::linear(x, w0)?;
    let (r, ae) = adalora_ae(din, dout, a, b, e)?;
    let c = check::adalora_factor(scaling, ranknum)?;
    dy.expect_shape("dy", &[t, dout])?;
    h.expect_shape("h", &[t, r])?;
    // gB = dy B [T, r]
    let mut gb = vec![0.0f32; t * r];
    sgemm(
        Op::N,
        Op::N,
        t,
        r,
        dout,
        1.0,
        dy.data(),
        b.data(),
        0.0,
        &mut gb,
    );
    // dx = dy W0 + c gB (A ⊙ E)
    let mut dx = vec![0.0f32; t * din];
    sgemm(
        Op::N,
        Op::N,
        t,
        din,
        dout,
        1.0,
        dy.data(),
        w0.data(),
        0.0,
        &mut dx,
    );
    sgemm(Op::N, Op::N, t, din, r, c, &gb, &ae, 1.0, &mut dx);
    // dB = c dy^T h
    let mut db = vec![0.0f32; dout * r];
    sgemm(
        Op::T,
        Op::N,
        dout,
        r,
        t,
        c,
        dy.data(),
        h.data(),
        0.0,
        &mut db,
    );
    // M = c gB^T x [r, in]; dA = M ⊙ E; dE[j] = rowdot(M, A)[j]
    let mut mm = vec![0.0f32; r * din];
    sgemm(Op::T, Op::N, r, din, t, c, &gb, x.data(), 0.0, &mut mm);
    let de: Vec<f32> = (0..r)
        .map(|j| {
            let (mr, ar) = (
                &mm[j * din..(j + 1) * din],
                &a.data()[j * din..(j + 1) * din],
            );
            mr.iter()
                .zip(ar)
                .map(|(m, a)| *m as f64 * *a as f64)
                .sum::<f64>() as f32
        })
        .collect();
    for (row, e) in mm.chunks_mut(din.max(1)).zip(e.data()) {
        row.iter_mut().for_each(|v| *v *= e);
    }
    Ok(AdaLoraGrads {
        dx: new(dx, &[t, din]),
        d_lora_a: new(mm, &[r, din]),
        d_lora_b: new(db, &[dout, r]),
        d_lora_e: new(de, &[r, 1]),
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_merge(
    w: &mut Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    e: &Tensor<Cpu>,
    scaling: f32,
    ranknum: f32,
    sign: f32,
) -> Result<()> {
    let (dout, din) = w.dims2("w")?;
    let (r, ae) = adalora_ae(din, dout, a, b, e)?;
    let c = check::adalora_factor(scaling, ranknum)?;
    sgemm(
        Op::N,
        Op::N,
        dout,
        din,
        r,
        sign * c,
        b.data(),
        &ae,
        1.0,
        w.data_mut(),
    );
    Ok(())
}

// ---- adapter terms over a precomputed base product (any base format) ---------------------------------------------

pub(super) fn lora_add(
    y: &mut Tensor<Cpu>,
    x: &Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
) -> Result<Tensor<Cpu>> {
    let (t, din, dout, r) = check::adapter(x, a, b, "y", y)?;
    let h = shrink(x.data(), a.data(), t, din, r);
    sgemm(Op::N, Op::T, t, dout, r, s, &h, b.data(), 1.0, y.data_mut());
    Ok(new(h, &[t, r]))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn lora_backward_adapter(
    dy: &Tensor<Cpu>,
    x: &Tensor<Cpu>,
    h: &Tensor<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
    dx: &mut Tensor<Cpu>,
) -> Result<(Tensor<Cpu>, Tensor<Cpu>)> {
    let (t, din, dout, r) = check::adapter(x, a, b, "dy", dy)?;
    h.expect_shape("h", &[t, r])?;
    dx.expect_shape("dx", &[t, din])?;
    // g = dy B [T, r]; dx += s g A; dA = s g^T x; dB = s dy^T h.
    let mut g = vec![0.0f32; t * r];
    sgemm(
        Op::N,
        Op::N,
        t,
        r,
        dout,
        1.0,
        dy.data(),
        b.data(),
        0.0,
        &mut g,
    );
    sgemm(Op::N, Op::N, t, din, r, s, &g, a.data(), 1.0, dx.data_mut());
    let mut da = vec![0.0f32; r * din];
    sgemm(Op::T, Op::N, r, din, t, s, &g, x.data(), 0.0, &mut da);
    let mut db = vec![0.0f32; dout * r];
    sgemm(
        Op::T,
        Op::N,
        dout,
        r,
        t,
        s,
        dy.data(),
        h.data(),
        0.0,
        &mut db,
    );
    Ok((new(da, &[r, din]), new(db, &[dout, r])))
}

/// `k = m / n` per output row, after checking both are `[out]`.
fn dora_k(m: &Tensor<Cpu>, n: &Tensor<Cpu>, dout: usize) -> Result<Vec<f32>> {
    m.expect_shape("lora_magnitude_vector", &[dout])?;
    n.expect_shape("weight_norm", &[dout])?;
    Ok(m.data().iter().zip(n.data()).map(|(m, n)| m / n).collect())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_forward_from_base(
    base_out: Tensor<Cpu>,
    x: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
    m: &Tensor<Cpu>,
    n: &Tensor<Cpu>,
) -> Result<(Tensor<Cpu>, DoraSaved<Cpu>)> {
    let (t, din, dout, r) = check::adapter(x, a, b, "base_out", &base_out)?;
    let k = dora_k(m, n, dout)?;
    if let Some(bias) = bias {
        bias.expect_shape("bias", &[dout])?;
    }
    // z = x W0^T + s h B^T (unscaled, no bias); y = k ⊙ z + bias.
    let h = shrink(x.data(), a.data(), t, din, r);
    let mut z = base_out.into_vec();
    sgemm(Op::N, Op::T, t, dout, r, s, &h, b.data(), 1.0, &mut z);
    let mut y = z.clone();
    for row in y.chunks_mut(dout.max(1)) {
        for (o, v) in row.iter_mut().enumerate() {
            *v *= k[o];
            if let Some(bias) = bias {
                *v += bias.data()[o];
            }
        }
    }
    Ok((
        new(y, &[t, dout]),
        DoraSaved {
            h: new(h, &[t, r]),
            z: new(z, &[t, dout]),
        },
    ))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_backward_adapter(
    dy: &Tensor<Cpu>,
    x: &Tensor<Cpu>,
    saved: &DoraSaved<Cpu>,
    a: &Tensor<Cpu>,
    b: &Tensor<Cpu>,
    s: f32,
    m: &Tensor<Cpu>,
    n: &Tensor<Cpu>,
) -> Result<(DoraGrads<Cpu>, Tensor<Cpu>)> {
    let (t, din, dout, r) = check::adapter(x, a, b, "dy", dy)?;
    let k = dora_k(m, n, dout)?;
    saved.h.expect_shape("saved.h", &[t, r])?;
    saved.z.expect_shape("saved.z", &[t, dout])?;
    // dm = sum_T(dy ⊙ z) / n, in f64 (as the dense kernel).
    let mut dm = vec![0.0f64; dout];
    for (gr, zr) in dy
        .data()
        .chunks(dout.max(1))
        .zip(saved.z.data().chunks(dout.max(1)))
    {
        for o in 0..dout {
            dm[o] += gr[o] as f64 * zr[o] as f64;
        }
    }
    let dm: Vec<f32> = dm
        .iter()
        .zip(n.data())
        .map(|(d, &n)| (d / n as f64) as f32)
        .collect();
    // g' = dy ⊙ k; dx = s (g' B) A (the caller adds g' W0); dA = s (g' B)^T x; dB = s g'^T h.
    let mut gk = dy.data().to_vec();
    for row in gk.chunks_mut(dout.max(1)) {
        for (v, k) in row.iter_mut().zip(&k) {
            *v *= k;
        }
    }
    let mut gb = vec![0.0f32; t * r];
    sgemm(Op::N, Op::N, t, r, dout, 1.0, &gk, b.data(), 0.0, &mut gb);
    let mut dx = vec![0.0f32; t * din];
    sgemm(Op::N, Op::N, t, din, r, s, &gb, a.data(), 0.0, &mut dx);
    let mut da = vec![0.0f32; r * din];
    sgemm(Op::T, Op::N, r, din, t, s, &gb, x.data(), 0.0, &mut da);
    let mut db = vec![0.0f32; dout * r];
    sgemm(
        Op::T,
        Op::N,
        dout,
        r,
        t,
        s,
        &gk,
        saved.h.data(),
        0.0,
        &mut db,
    );
    Ok((
        DoraGrads {
            dx: new(dx, &[t, din]),
            d_lora_a: new(da, &[r, din]),
            d_lora_b: new(db, &[dout, r]),
            d_magnitude: new(dm, &[dout]),
        },
        new(gk, &[t, dout]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward that takes `W0 A^T` in its own W0 pass gives the two-call result: the same n
    /// (to rounding: the dot products are summed by another kernel) and the same y, h, z.
    #[test]
    fn dora_forward_with_norm_matches_the_two_calls() {
        let val = |i: usize, salt: usize| ((i * 7919 + salt * 104729) % 211) as f32 / 211.0 - 0.5;
        for (t, dout, din, r) in [
            (1, 1, 1, 1),
            (5, 63, 37, 3),
            (16, 300, 257, 16),
            (40, 33, 300, 8),
        ] {
            let x = new((0..t * din).map(|i| val(i, 1)).collect(), &[t, din]);
            let w0 = new((0..dout * din).map(|i| val(i, 2)).collect(), &[dout, din]);
            let a = new((0..r * din).map(|i| val(i, 3)).collect(), &[r, din]);
            let b = new((0..dout * r).map(|i| val(i, 4)).collect(), &[dout, r]);
            let m = new((0..dout).map(|i| 0.5 + val(i, 5).abs()).collect(), &[dout]);
            let bias = new((0..dout).map(|i| val(i, 6)).collect(), &[dout]);
            let sq = row_sq_norms(&w0).unwrap();
            let (y, saved, n) =
                dora_forward_with_norm(&x, &w0, &sq, Some(&bias), &a, &b, 0.5, &m).unwrap();
            let n2 = dora_weight_norm(&w0, &sq, &a, &b, 0.5).unwrap();
            let (y2, saved2) = dora_forward(&x, &w0, Some(&bias), &a, &b, 0.5, &m, &n2).unwrap();
            let close = |what: &str, u: &[f32], v: &[f32]| {
                assert_eq!(u.len(), v.len());
                for (i, (p, q)) in u.iter().zip(v).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                        "{what}[{i}]: {p} vs {q}"
                    );
                }
            };
            close("n", n.data(), n2.data());
            close("y", y.data(), y2.data());
            close("h", saved.h.data(), saved2.h.data());
            close("z", saved.z.data(), saved2.z.data());
        }
    }

    /// The one-pass merge against its definition, computed step by step in f64: `W' = W0 + s B A`,
    /// `n = ||W'||_row`, `W = (m / n) W'`. Row counts straddle the row blocks.
    #[test]
    fn dora_merge_with_norm_matches_its_definition() {
        for (dout, din, r) in [(1, 1, 1), (63, 5, 3), (130, 77, 8), (200, 33, 16)] {
            let val =
                |i: usize, salt: usize| ((i * 7919 + salt * 104729) % 211) as f32 / 211.0 - 0.5;
            let w0: Vec<f32> = (0..dout * din).map(|i| val(i, 1)).collect();
            let a: Vec<f32> = (0..r * din).map(|i| val(i, 2)).collect();
            let b: Vec<f32> = (0..dout * r).map(|i| val(i, 3)).collect();
            let m: Vec<f32> = (0..dout).map(|i| 0.5 + val(i, 4).abs()).collect();
            let s = 0.75f32;
            let mut w = new(w0.clone(), &[dout, din]);
            let row_sq = row_sq_norms(&w).unwrap();
            let n = dora_merge_with_norm(
                &mut w,
                &row_sq,
                &new(a.clone(), &[r, din]),
                &new(b.clone(), &[dout, r]),
                s,
                &new(m.clone(), &[dout]),
            )
            .unwrap();
            for o in 0..dout {
                let row: Vec<f64> = (0..din)
                    .map(|i| {
                        w0[o * din + i] as f64
                            + s as f64
                                * (0..r)
                                    .map(|j| b[o * r + j] as f64 * a[j * din + i] as f64)
                                    .sum::<f64>()
                    })
                    .collect();
                let nn = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                assert!(
                    (n.data()[o] as f64 - nn).abs() <= 1e-5 * nn,
                    "{dout}x{din} row {o}"
                );
                for (i, rv) in row.iter().enumerate() {
                    let want = m[o] as f64 / nn * rv;
                    let got = w.data()[o * din + i] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5,
                        "{dout}x{din} [{o}, {i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
