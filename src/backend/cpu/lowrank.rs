//! CPU reference of the fused low-rank product (`crate::backend::lowrank`): forward, input
//! gradient, parameter gradients, merges and DoRA's weight norm, over a dense or NF4 base.
//! Plain loops around [`sgemm`]: every `[out, in]` product PEFT forms (`B A`, the full-weight
//! norm) is avoided except in the merges, and the per-output scales are folded into the
//! `[out, r]` factor rather than applied to `[T, out]` temporaries.

use super::bf16::Bf16Tiles;
use super::dense::{base_backward, base_product, scale_in_place, sum_sq_f64};
use super::gemm::{Op, sgemm, sgemm_serial};
use super::nf4::Nf4Tiles;
use super::{Cpu, new, tiled};
use crate::backend::{Base, GradWants, InputGrad, LowRank, LowRankOut, ParamGrads, Tensor};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::borrow::Cow;

/// The layer's factors of a term: `A [r, din]` (a contiguous copy of the leading columns of a
/// shared projection, else borrowed) and `B [dout, r]` (a prefix of a shared one).
pub(super) fn factors<'a>(
    term: &LowRank<'a, Cpu>,
    din: usize,
    dout: usize,
) -> (Cow<'a, [f32]>, &'a [f32], usize) {
    let r = term.r();
    let (a, b) = (term.lora_a, term.lora_b);
    let cols = a.dim(1);
    let a = if cols == din {
        Cow::Borrowed(a.data())
    } else {
        Cow::Owned(
            a.data()
                .chunks(cols.max(1))
                .flat_map(|row| &row[..din])
                .copied()
                .collect(),
        )
    };
    (a, &b.data()[..dout * r], r)
}

/// `x A^T` for x `[t, din]`, a `[r, din]` → `[t, r]`.
pub(super) fn shrink(x: &[f32], a: &[f32], t: usize, din: usize, r: usize) -> Vec<f32> {
    let mut h = vec![0.0f32; t * r];
    sgemm(Op::N, Op::T, t, r, din, 1.0, x, a, 0.0, &mut h);
    h
}

/// `v ⊙ s` per column of a row-major `[rows, s.len()]` matrix (`h ⊙ rank_scale`).
fn scale_cols(v: &[f32], s: &[f32]) -> Vec<f32> {
    let mut out = v.to_vec();
    for row in out.chunks_mut(s.len().max(1)) {
        row.iter_mut().zip(s).for_each(|(x, k)| *x *= k);
    }
    out
}

/// `diag(l) B` for `B [len(l), cols]` (row o scaled by `l[o]`).
fn scale_rows(b: &[f32], cols: usize, l: &[f32]) -> Vec<f32> {
    let mut out = b[..l.len() * cols].to_vec();
    for (row, l) in out.chunks_mut(cols.max(1)).zip(l) {
        row.iter_mut().for_each(|v| *v *= l);
    }
    out
}

/// The column scale `k = m / n` per output, if the term has one (its norm is given).
fn col_factor(term: &LowRank<'_, Cpu>) -> Option<Vec<f32>> {
    let c = term.col_scale.as_ref()?;
    let n = c.weight_norm?;
    Some(
        c.magnitude
            .data()
            .iter()
            .zip(n.data())
            .map(|(m, n)| m / n)
            .collect(),
    )
}

/// The per-output factor of B in the input gradient: `k ⊙ o` (column scale times out scale).
fn out_factor(term: &LowRank<'_, Cpu>, k: Option<&[f32]>, dout: usize) -> Option<Vec<f32>> {
    let os = term.out_scale.map(|t| t.data());
    match (k, os) {
        (None, None) => None,
        (Some(k), None) => Some(k.to_vec()),
        (None, Some(o)) => Some(o.to_vec()),
        (Some(k), Some(o)) => Some((0..dout).map(|i| k[i] * o[i]).collect()),
    }
}

/// `y += scale * ((h ⊙ ρ) (diag(o) B)^T)` for y `[t, dout]`.
fn add_term(
    y: &mut [f32],
    h: &[f32],
    b: &[f32],
    term: &LowRank<'_, Cpu>,
    t: usize,
    dout: usize,
    r: usize,
) {
    let hs = match term.rank_scale {
        Some(rs) => Cow::Owned(scale_cols(h, rs.data())),
        None => Cow::Borrowed(h),
    };
    let bs = match term.out_scale {
        Some(os) => Cow::Owned(scale_rows(b, r, os.data())),
        None => Cow::Borrowed(b),
    };
    sgemm(Op::N, Op::T, t, dout, r, term.scale, &hs, &bs, 1.0, y);
}

/// The rest of the forward once the base product `prod = x W^T` (with the bias when there is
/// no column scale) is known.
fn finish_forward(
    mut y: Vec<f32>,
    x: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
    term: &LowRank<'_, Cpu>,
    dout: usize,
) -> LowRankOut<Cpu> {
    let (t, din) = (x.dim(0), x.dim(1));
    let (a, b, r) = factors(term, din, dout);
    let h = shrink(x.data(), &a, t, din, r);
    add_term(&mut y, &h, b, term, t, dout, r);
    let h = Some(new(h, &[t, r]));
    let Some(k) = col_factor(term) else {
        return LowRankOut {
            y: new(y, &[t, dout]),
            h,
            z: None,
            weight_norm: None,
        };
    };
    // z = x W^T + u (unscaled, no bias); y = k ⊙ z + bias.
    let z = y.clone();
    for row in y.chunks_mut(dout.max(1)) {
        for (o, v) in row.iter_mut().enumerate() {
            *v *= k[o];
            if let Some(bias) = bias {
                *v += bias.data()[o];
            }
        }
    }
    LowRankOut {
        y: new(y, &[t, dout]),
        h,
        z: Some(new(z, &[t, dout])),
        weight_norm: None,
    }
}

pub(super) fn forward(
    x: &Tensor<Cpu>,
    base: Base<'_, Cpu>,
    bias: Option<&Tensor<Cpu>>,
    term: Option<&LowRank<'_, Cpu>>,
) -> Result<LowRankOut<Cpu>> {
    let (t, dout) = (x.dim(0), base.dims().0);
    let Some(term) = term else {
        return Ok(LowRankOut {
            y: new(base_product(x, base, bias)?, &[t, dout]),
            h: None,
            z: None,
            weight_norm: None,
        });
    };
    let prod_bias = if term.col_scale.is_some() { None } else { bias };
    let y = base_product(x, base, prod_bias)?;
    Ok(finish_forward(y, x, bias, term, dout))
}

/// The forward with its weight norm, one pass over a dense W for both: `[x; A] W^T` gives the
/// base product (first T rows) and `P^T = A W^T` (last r rows) of [`row_norms`]. Over NF4 or bf16,
/// the norm's tiles and then the forward.
pub(super) fn forward_with_norm(
    x: &Tensor<Cpu>,
    base: Base<'_, Cpu>,
    base_row_sq: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
    term: &LowRank<'_, Cpu>,
) -> Result<LowRankOut<Cpu>> {
    let (t, din, dout) = (x.dim(0), x.dim(1), base.dims().0);
    let bare = term.without_col_scale();
    let (prod, n) = match base {
        Base::Dense(w) => {
            let (a, b, r) = factors(term, din, dout);
            let bf = folded_b(&bare, b, r);
            let mut stacked = Vec::with_capacity((t + r) * din);
            stacked.extend_from_slice(x.data());
            stacked.extend_from_slice(&a);
            let mut prod = vec![0.0f32; (t + r) * dout];
            sgemm(
                Op::N,
                Op::T,
                t + r,
                dout,
                din,
                1.0,
                &stacked,
                w.data(),
                0.0,
                &mut prod,
            );
            let n = norm_from_p(
                &prod[t * dout..],
                (1, dout),
                base_row_sq.data(),
                w.data(),
                &a,
                &bf,
                term.scale,
                din,
                r,
            );
            prod.truncate(t * dout);
            (prod, n)
        }
        Base::Nf4(_) | Base::Bf16(_) => (
            base_product(x, base, None)?,
            row_norms(base, base_row_sq, &bare)?.into_vec(),
        ),
    };
    let n = new(n, &[dout]);
    let mut with_n = *term;
    if let Some(c) = &mut with_n.col_scale {
        c.weight_norm = Some(&n);
    }
    let mut out = finish_forward(prod, x, bias, &with_n, dout);
    out.weight_norm = Some(n);
    Ok(out)
}

/// `(dx, g)`: `dx (+)= (dy ⊙ k) W + scale ((g ⊙ ρ) A)` with `g = dy (diag(k ⊙ o) B)`.
pub(super) fn backward_input(
    dy: &Tensor<Cpu>,
    base: Base<'_, Cpu>,
    term: Option<&LowRank<'_, Cpu>>,
    mut acc: Option<&mut Tensor<Cpu>>,
) -> Result<InputGrad<Cpu>> {
    let (t, dout) = (dy.dim(0), dy.dim(1));
    let din = base.dims().1;
    let k = term.and_then(col_factor);
    // The base part, on dy ⊙ k under a column scale.
    let gk = match &k {
        Some(k) => Cow::Owned(scale_cols(dy.data(), k)),
        None => Cow::Borrowed(dy.data()),
    };
    let fresh = base_backward(&gk, t, base, acc.as_deref_mut());
    let Some(term) = term else {
        return Ok((fresh, None));
    };
    let (a, b, r) = factors(term, din, dout);
    let bk = match out_factor(term, k.as_deref(), dout) {
        Some(f) => Cow::Owned(scale_rows(b, r, &f)),
        None => Cow::Borrowed(b),
    };
    let mut g = vec![0.0f32; t * r];
    sgemm(Op::N, Op::N, t, r, dout, 1.0, dy.data(), &bk, 0.0, &mut g);
    let gs = match term.rank_scale {
        Some(rs) => Cow::Owned(scale_cols(&g, rs.data())),
        None => Cow::Borrowed(g.as_slice()),
    };
    let mut fresh = fresh;
    let dx = match (fresh.as_mut(), acc) {
        (Some(d), _) => d.data_mut(),
        (None, Some(d)) => d.data_mut(),
        (None, None) => return Err(Error::arg("dx", "no dx to add the term's part into")),
    };
    sgemm(Op::N, Op::N, t, din, r, term.scale, &gs, &a, 1.0, dx);
    Ok((fresh, Some(new(g, &[t, r]))))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn grads(
    dy: &Tensor<Cpu>,
    x: &Tensor<Cpu>,
    h: &Tensor<Cpu>,
    z: Option<&Tensor<Cpu>>,
    g: &Tensor<Cpu>,
    term: &LowRank<'_, Cpu>,
    wants: GradWants,
) -> Result<ParamGrads<Cpu>> {
    let (t, din, dout) = (x.dim(0), x.dim(1), dy.dim(1));
    let (_, b, r) = factors(term, din, dout);
    let s = term.scale;
    let k = col_factor(term);
    let rs = term.rank_scale.map(|t| t.data());
    let mut out = ParamGrads {
        d_lora_a: None,
        d_lora_b: None,
        d_rank_scale: None,
        d_out_scale: None,
        d_magnitude: None,
    };
    // P = dy^T (h ⊙ ρ) [out, r]: dB = s diag(k ⊙ o) P, do = s k ⊙ rowdot(P, B).
    if wants.lora_b || wants.out_scale {
        let hs = match rs {
            Some(rs) => Cow::Owned(scale_cols(h.data(), rs)),
            None => Cow::Borrowed(h.data()),
        };
        let alpha = if wants.out_scale { 1.0 } else { s };
        let mut p = vec![0.0f32; dout * r];
        sgemm(Op::T, Op::N, dout, r, t, alpha, dy.data(), &hs, 0.0, &mut p);
        if wants.out_scale {
            let d_os: Vec<f32> = (0..dout)
                .map(|o| {
                    let dot: f64 = (0..r)
                        .map(|j| p[o * r + j] as f64 * b[o * r + j] as f64)
                        .sum();
                    (dot * s as f64 * k.as_ref().map_or(1.0, |k| k[o] as f64)) as f32
                })
                .collect();
            out.d_out_scale = Some(new(d_os, &[dout]));
        }
        if wants.lora_b {
            if wants.out_scale {
                p.iter_mut().for_each(|v| *v *= s);
            }
            if let Some(f) = out_factor(term, k.as_deref(), dout) {
                p = scale_rows(&p, r, &f);
            }
            out.d_lora_b = Some(new(p, &[dout, r]));
        }
    }
    // dA = s diag(ρ) (g^T x) [r, in].
    if wants.lora_a {
        let mut q = vec![0.0f32; r * din];
        sgemm(Op::T, Op::N, r, din, t, s, g.data(), x.data(), 0.0, &mut q);
        if let Some(rs) = rs {
            q = scale_rows(&q, din, rs);
        }
        out.d_lora_a = Some(new(q, &[r, din]));
    }
    // dρ = s sum_T(g ⊙ h), in f64, shaped like ρ.
    if wants.rank_scale {
        let mut d = vec![0.0f64; r];
        for (gr, hr) in g.data().chunks(r).zip(h.data().chunks(r)) {
            for j in 0..r {
                d[j] += gr[j] as f64 * hr[j] as f64;
            }
        }
        let shape = term.rank_scale.map_or(vec![r], |t| t.shape().to_vec());
        out.d_rank_scale = Some(new(
            d.iter().map(|&v| (v * s as f64) as f32).collect(),
            &shape,
        ));
    }
    // dm = sum_T(dy ⊙ z) / n, in f64.
    if wants.magnitude {
        let (Some(z), Some(c)) = (z, term.col_scale.as_ref()) else {
            return Err(Error::arg(
                "z",
                "the magnitude's gradient needs z and the column scale",
            ));
        };
        let n = c
            .weight_norm
            .ok_or_else(|| Error::arg("weight_norm", "missing"))?;
        let mut dm = vec![0.0f64; dout];
        for (gr, zr) in dy
            .data()
            .chunks(dout.max(1))
            .zip(z.data().chunks(dout.max(1)))
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
        out.d_magnitude = Some(new(dm, &[dout]));
    }
    Ok(out)
}

/// `B' = diag(o) B diag(ρ)` `[dout, r]`: B with the per-output and per-rank scales of ΔW
/// folded in (`ΔW = scale B' A`).
pub(super) fn folded_b(term: &LowRank<'_, Cpu>, b: &[f32], r: usize) -> Vec<f32> {
    let mut bf = match term.out_scale {
        Some(os) => scale_rows(b, r, os.data()),
        None => b.to_vec(),
    };
    if let Some(rs) = term.rank_scale {
        bf = scale_cols(&bf, rs.data());
    }
    bf
}

pub(super) fn merge(w: &mut Tensor<Cpu>, term: &LowRank<'_, Cpu>, sign: f32) -> Result<()> {
    let (dout, din) = (w.dim(0), w.dim(1));
    let (a, b, r) = factors(term, din, dout);
    let bf = match (term.out_scale, term.rank_scale) {
        (None, None) => Cow::Borrowed(b),
        _ => Cow::Owned(folded_b(term, b, r)),
    };
    let k = col_factor(term);
    if sign < 0.0
        && let Some(k) = &k
    {
        // PEFT: weight / dora_factor - delta_weight (a division, as PEFT does).
        if let Some(o) = k.iter().position(|k| *k == 0.0 || !k.is_finite()) {
            return Err(Error::arg(
                "lora_magnitude_vector",
                format!(
                    "row {o}: m / weight_norm = {} is not invertible, cannot unmerge",
                    k[o]
                ),
            ));
        }
        for (row, k) in w.data_mut().chunks_mut(din.max(1)).zip(k) {
            row.iter_mut().for_each(|v| *v /= k);
        }
    }
    sgemm(
        Op::N,
        Op::N,
        dout,
        din,
        r,
        sign * term.scale,
        &bf,
        &a,
        1.0,
        w.data_mut(),
    );
    if sign > 0.0
        && let Some(k) = &k
    {
        for (row, k) in w.data_mut().chunks_mut(din.max(1)).zip(k) {
            row.iter_mut().for_each(|v| *v *= k);
        }
    }
    Ok(())
}

/// Rows per task of [`merge_with_norm`]: a block of `W` (64 x 4096 f32 = 1 MiB at most for
/// Llama widths) is updated, measured and scaled while it sits in the core's cache.
const MERGE_ROWS: usize = 64;

/// PEFT's DoRA merge in one pass over `W`: per block of rows, `W' = W + ΔW` (a serial GEMM on
/// the block), `n = ||W'||_row`, `W = (m / n) W'`. Returns n. The norm is taken from the
/// merged rows, as PEFT's `merge` does (`w_row_sq` is not needed). Sums of squares in f64.
pub(super) fn merge_with_norm(w: &mut Tensor<Cpu>, term: &LowRank<'_, Cpu>) -> Result<Tensor<Cpu>> {
    let (dout, din) = (w.dim(0), w.dim(1));
    let mut n = vec![0.0f32; dout];
    if din == 0 {
        return Ok(new(n, &[dout]));
    }
    let (a, b, r) = factors(term, din, dout);
    let bf = folded_b(term, b, r);
    let s = term.scale;
    let m = term
        .col_scale
        .as_ref()
        .ok_or_else(|| Error::arg("col_scale", "missing"))?
        .magnitude
        .data();
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
                &bf[o0 * r..(o0 + rows) * r],
                &a,
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

/// `||W + ΔW||_row` of a term without column scale, by the low-rank identity.
pub(super) fn row_norms(
    base: Base<'_, Cpu>,
    base_row_sq: &Tensor<Cpu>,
    term: &LowRank<'_, Cpu>,
) -> Result<Tensor<Cpu>> {
    let (dout, din) = base.dims();
    match base {
        Base::Dense(w) => {
            let (a, b, r) = factors(term, din, dout);
            let bf = folded_b(term, b, r);
            // P = W A^T [out, r].
            let p = shrink(w.data(), &a, dout, din, r);
            let n = norm_from_p(
                &p,
                (r, 1),
                base_row_sq.data(),
                w.data(),
                &a,
                &bf,
                term.scale,
                din,
                r,
            );
            Ok(new(n, &[dout]))
        }
        Base::Nf4(w) => tiled::lowrank_row_norms(&Nf4Tiles::new(w), base_row_sq, term),
        Base::Bf16(w) => tiled::lowrank_row_norms(&Bf16Tiles::new(w), base_row_sq, term),
    }
}

/// The low-rank identity `n_o^2 = ||W_o||^2 + 2 s (P B'^T)_oo + s^2 (B' G B'^T)_oo` with
/// `P = W A^T [rows, r]` (element `(o, j)` at `p[o * p_strides.0 + j * p_strides.1]`),
/// `B' = diag(o) B diag(ρ)` (`bf`, `[rows, r]`), `G = A A^T [r, r]` (A `[r, din]`), combined in
/// f64. `row_sq` holds `||W_o||^2` of the rows and `w` the rows themselves (`[rows, din]`).
///
/// P and G come from f32 products, so their rounding is relative to the terms, not to n^2: a
/// row whose terms cancel (`n_o^2` below a quarter of `||W_o||^2 + 2|s| |P_o| |B'_o| + s^2
/// |Q_o| |B'_o|`, which a trained adapter rarely reaches but a large random B at a small `din`
/// does) would lose digits in proportion. Such rows are summed directly instead, `||W_o + s
/// B'_o A||` in f64 from the f32 values (`O(r din)` per row), which is at least as accurate as
/// PEFT's `torch.linalg.norm(W0 + s B A, dim=1)` in f32.
#[allow(clippy::too_many_arguments)]
pub(super) fn norm_from_p(
    p: &[f32],
    p_strides: (usize, usize),
    row_sq: &[f32],
    w: &[f32],
    a: &[f32],
    bf: &[f32],
    s: f32,
    din: usize,
    r: usize,
) -> Vec<f32> {
    let rows = row_sq.len();
    // G = A A^T [r, r]; Q = B' G [rows, r].
    let mut g = vec![0.0f32; r * r];
    sgemm(Op::N, Op::T, r, r, din, 1.0, a, a, 0.0, &mut g);
    let mut q = vec![0.0f32; rows * r];
    sgemm(Op::N, Op::N, rows, r, r, 1.0, bf, &g, 0.0, &mut q);
    let s = s as f64;
    let (ps_o, ps_j) = p_strides;
    (0..rows)
        .map(|o| {
            let br = &bf[o * r..(o + 1) * r];
            let (mut cross, mut quad, mut cross_abs, mut quad_abs) = (0.0f64, 0.0, 0.0, 0.0);
            for j in 0..r {
                let pc = p[o * ps_o + j * ps_j] as f64 * br[j] as f64;
                let qc = q[o * r + j] as f64 * br[j] as f64;
                cross += pc;
                quad += qc;
                cross_abs += pc.abs();
                quad_abs += qc.abs();
            }
            let sq = row_sq[o] as f64 + 2.0 * s * cross + s * s * quad;
            let size = row_sq[o] as f64 + 2.0 * s.abs() * cross_abs + s * s * quad_abs;
            if 4.0 * sq >= size {
                return sq.max(0.0).sqrt() as f32;
            }
            let wo = &w[o * din..(o + 1) * din];
            let direct: f64 = (0..din)
                .map(|i| {
                    let ba: f64 = (0..r).map(|j| br[j] as f64 * a[j * din + i] as f64).sum();
                    let v = wo[i] as f64 + s * ba;
                    v * v
                })
                .sum();
            direct.sqrt() as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `||W_o + s B_o A||` in f64 from the f32 values.
    fn direct(w: &[f32], a: &[f32], b: &[f32], s: f32, din: usize, r: usize) -> Vec<f64> {
        w.chunks(din)
            .zip(b.chunks(r))
            .map(|(wo, bo)| {
                (0..din)
                    .map(|i| {
                        let ba: f64 = (0..r).map(|j| bo[j] as f64 * a[j * din + i] as f64).sum();
                        (wo[i] as f64 + s as f64 * ba).powi(2)
                    })
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    }

    #[test]
    fn row_norms_stay_accurate_where_base_and_term_cancel() {
        // Rows o < 6 nearly cancel (W_o = -s B_o A + a tiny part); rows 6.. do not.
        let (dout, din, r, s) = (10usize, 3usize, 2usize, 1.5f32);
        let a: Vec<f32> = (0..r * din).map(|i| 0.3 + 0.17 * i as f32).collect();
        let b: Vec<f32> = (0..dout * r).map(|i| 0.9 - 0.13 * i as f32).collect();
        let mut w = vec![0.0f32; dout * din];
        for o in 0..dout {
            for i in 0..din {
                let ba: f32 = (0..r).map(|j| b[o * r + j] * a[j * din + i]).sum();
                let tiny = 1e-3 * (1.0 + (o * din + i) as f32 * 0.37).sin();
                w[o * din + i] = if o < 6 {
                    -s * ba + tiny
                } else {
                    0.5 - 0.1 * i as f32
                };
            }
        }
        let row_sq: Vec<f32> = w
            .chunks(din)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        let (wt, at, bt) = (
            new(w.clone(), &[dout, din]),
            new(a.clone(), &[r, din]),
            new(b.clone(), &[dout, r]),
        );
        let term = LowRank::lora(&at, &bt, s);
        let n = row_norms(Base::Dense(&wt), &new(row_sq, &[dout]), &term).unwrap();
        for (o, (&got, want)) in n
            .data()
            .iter()
            .zip(direct(&w, &a, &b, s, din, r))
            .enumerate()
        {
            let rel = (got as f64 - want).abs() / want;
            assert!(
                rel < 1e-6,
                "row {o}: {got} vs {want} (relative error {rel:e})"
            );
        }
    }
}
