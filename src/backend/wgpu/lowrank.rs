//! The fused low-rank product (`crate::backend::lowrank`) on the wgpu backend: forward, input
//! gradient, parameter gradients, merges and DoRA's weight norm, over a dense (f32 or frozen
//! f16) or NF4 base. Same math as `backend/cpu/lowrank.rs`.
//!
//! Every product is the one matmul of `shaders/matmul.wgsl`, whose epilogue carries the term:
//! `scale * ns[j] * sum_q js[q] H(i, q) G(j, q)` with the per-rank scale ρ as `js` and the
//! per-output scale o as `ns`. So
//!
//! * the forward is `h = x A^T`, then one pass over the output: `x W^T + bias + s o ⊙ ((h ⊙ ρ)
//!   B^T)` (LoRA, rsLoRA, VeRA, AdaLoRA); under a column scale the pass writes
//!   `z = x W^T + u` and one elementwise pass gives `y = (m / n) ⊙ z + bias` (DoRA);
//! * the input gradient is `g = (dy ⊙ k) (diag(o) B)`, then one pass over dx:
//!   `(dy ⊙ k) W + s (g ⊙ ρ) A` (`dy ⊙ k`, `k = m / n`, one elementwise pass under a column
//!   scale);
//! * merges are `K = 0` matmuls over W (epilogue only), row-scaled under a column scale;
//! * DoRA's weight norm is the low-rank identity from `P = W A^T`, which over NF4 the forward
//!   that takes its own norm computes from the same dequantized tiles as its product.
//!
//! A shared term's `A = lora_a[:, :in]` and `B = lora_b[:out, :]` (VeRA) are strided views,
//! never copied. The per-output factors that must scale B's rows (o in the input gradient and
//! the merges, `k ⊙ o` in dB) are folded into small `[out, r]` temporaries rather than applied
//! to a `[T, out]` one. Over NF4 each tile's matmul writes its own output columns and cannot index a
//! per-output vector, so the forward folds o into B there too. The gradients' reductions
//! (`dρ`, `do`, `dm`) are the compensated row and column sums of `dense.rs`.

use super::dense::{
    Params, add_lowrank_into, base_backward, base_product, colscale, colsum, row_scale, rowdot,
    run, scale_buf,
};
use super::matmul::{LowRank as Epilogue, Matmul, Operand};
use super::memory::{Rows, bind_rows, download_many, grid, view_chunks};
use super::{Wgpu, nf4};
use crate::backend::{Base, GradWants, LowRank, LowRankOut, ParamGrads, Tensor};
use crate::error::{Error, Result};

/// `A` read transposed: element `(k, j)` is `A[j, k]` (the leading `in` columns of a shared
/// projection, through its row stride).
pub(super) fn a_t<'a>(term: &LowRank<'a, Wgpu>) -> Operand<'a> {
    Operand::t(&term.lora_a.buf, term.lora_a.dim(1))
}

/// `A` as is (`[r, in]` through its row stride).
fn a_n<'a>(term: &LowRank<'a, Wgpu>) -> Operand<'a> {
    Operand::n(&term.lora_a.buf, term.lora_a.dim(1))
}

/// The leading `out` rows of `B [.., r]`.
fn b_rows<'a>(term: &LowRank<'a, Wgpu>) -> Rows<'a> {
    Rows::new(&term.lora_b.buf, term.r())
}

/// The folded temporary's buffer, or the term's B when there is none.
fn b_or<'a>(folded: &'a Option<Tensor<Wgpu>>, term: &LowRank<'a, Wgpu>) -> &'a super::GpuBuf {
    folded.as_ref().map_or(&term.lora_b.buf, |b| &b.buf)
}

/// The column scale `k = m / n [out]`, if the term has one.
fn col_factor(be: &Wgpu, term: &LowRank<'_, Wgpu>, dout: usize) -> Result<Option<Tensor<Wgpu>>> {
    let Some(c) = &term.col_scale else {
        return Ok(None);
    };
    let n = c
        .weight_norm
        .ok_or_else(|| Error::arg("weight_norm", "a column scale needs its weight norm here"))?;
    let k = be.alloc(&[dout]);
    row_scale(
        be,
        dout,
        1,
        Some(Rows::vec(&c.magnitude.buf, 0)),
        Rows::vec(&n.buf, 0),
        Rows::vec(&k.buf, 0),
        true,
    )?;
    Ok(Some(k))
}

/// `diag(o) B [out, r]` (a small temporary), if the term has a per-output scale.
fn scaled_b(be: &Wgpu, term: &LowRank<'_, Wgpu>, dout: usize) -> Result<Option<Tensor<Wgpu>>> {
    let Some(os) = term.out_scale else {
        return Ok(None);
    };
    let r = term.r();
    let bo = be.alloc(&[dout, r]);
    row_scale(
        be,
        dout,
        r,
        Some(b_rows(term)),
        Rows::vec(&os.buf, 0),
        Rows::new(&bo.buf, r),
        false,
    )?;
    Ok(Some(bo))
}

/// `B' = diag(o) B diag(ρ) [out, r]`, the factor of `ΔW = s B' A` (None: B itself).
fn folded_b(be: &Wgpu, term: &LowRank<'_, Wgpu>, dout: usize) -> Result<Option<Tensor<Wgpu>>> {
    let bo = scaled_b(be, term, dout)?;
    let Some(rs) = term.rank_scale else {
        return Ok(bo);
    };
    let r = term.r();
    let bf = be.alloc(&[dout, r]);
    colscale(be, &bf.buf, b_or(&bo, term), dout * r, r, &rs.buf, None)?;
    Ok(Some(bf))
}

pub(super) fn forward(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    base: Base<'_, Wgpu>,
    bias: Option<&Tensor<Wgpu>>,
    term: Option<&LowRank<'_, Wgpu>>,
) -> Result<LowRankOut<Wgpu>> {
    let Some(term) = term else {
        return Ok(LowRankOut {
            y: base_product(be, x, base, bias, None)?,
            h: None,
            z: None,
            weight_norm: None,
        });
    };
    let (t, din) = (x.dim(0), x.dim(1));
    let dout = base.dims().0;
    let r = term.r();
    // h = x A^T, before the rank scale.
    let h = be.gemm(t, r, din, Operand::n(&x.buf, din), a_t(term), 1.0)?;
    let folded = match base {
        Base::Nf4(_) => scaled_b(be, term, dout)?,
        Base::Dense(_) | Base::Bf16(_) => None,
    };
    let epi = Epilogue {
        r,
        h: Operand::n(&h.buf, r),
        g: Operand::n(b_or(&folded, term), r),
        scale: term.scale,
        jscale: term.rank_scale.map(|v| &v.buf),
        nscale: match folded {
            Some(_) => None,
            None => term.out_scale.map(|v| &v.buf),
        },
    };
    let Some(k) = col_factor(be, term, dout)? else {
        let y = base_product(be, x, base, bias, Some(epi))?;
        return Ok(LowRankOut {
            y,
            h: Some(h),
            z: None,
            weight_norm: None,
        });
    };
    // z = x W^T + u (no bias), then y = k ⊙ z + bias.
    let z = base_product(be, x, base, None, Some(epi))?;
    let y = be.alloc(&[t, dout]);
    colscale(
        be,
        &y.buf,
        &z.buf,
        t * dout,
        dout,
        &k.buf,
        bias.map(|b| &b.buf),
    )?;
    Ok(LowRankOut {
        y,
        h: Some(h),
        z: Some(z),
        weight_norm: None,
    })
}

/// The forward of a column-scaled term whose weight norm is still to be computed. Over NF4 the
/// norm's `P = W A^T` is taken from the same dequantized tiles as the forward's `z`; over a
/// dense W the norm's product and the forward's are two passes over W.
pub(super) fn forward_with_norm(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    base: Base<'_, Wgpu>,
    base_row_sq: &Tensor<Wgpu>,
    bias: Option<&Tensor<Wgpu>>,
    term: &LowRank<'_, Wgpu>,
) -> Result<LowRankOut<Wgpu>> {
    let bare = term.without_col_scale();
    fn with_norm<'a>(term: &LowRank<'a, Wgpu>, n: &'a Tensor<Wgpu>) -> LowRank<'a, Wgpu> {
        let mut t = *term;
        if let Some(c) = &mut t.col_scale {
            c.weight_norm = Some(n);
        }
        t
    }
    let Base::Nf4(w) = base else {
        let n = row_norms(be, base, base_row_sq, &bare)?;
        let mut out = forward(be, x, base, bias, Some(&with_norm(term, &n)))?;
        out.weight_norm = Some(n);
        return Ok(out);
    };
    let (t, din, dout) = (x.dim(0), x.dim(1), w.dims().0);
    let r = term.r();
    let h = be.gemm(t, r, din, Operand::n(&x.buf, din), a_t(term), 1.0)?;
    let folded = scaled_b(be, term, dout)?;
    let epi = Epilogue {
        r,
        h: Operand::n(&h.buf, r),
        g: Operand::n(b_or(&folded, term), r),
        scale: term.scale,
        jscale: term.rank_scale.map(|v| &v.buf),
        nscale: None,
    };
    let z = be.alloc(&[t, dout]);
    let p = be.alloc(&[dout, r]);
    nf4::linear(
        be,
        x,
        w,
        None,
        Some(epi),
        &z.buf,
        Some((a_t(term), r, &p.buf)),
    )?;
    let n = norm_from_p(be, &p, base_row_sq, &bare, dout, din)?;
    let k = col_factor(be, &with_norm(term, &n), dout)?
        .ok_or_else(|| Error::arg("col_scale", "missing"))?;
    let y = be.alloc(&[t, dout]);
    colscale(
        be,
        &y.buf,
        &z.buf,
        t * dout,
        dout,
        &k.buf,
        bias.map(|b| &b.buf),
    )?;
    Ok(LowRankOut {
        y,
        h: Some(h),
        z: Some(z),
        weight_norm: Some(n),
    })
}

/// What an input gradient returns: dx (`None` when added into `acc`) and g (with a term).
type DxG = (Option<Tensor<Wgpu>>, Option<Tensor<Wgpu>>);

/// `(dx, g)`: `dx (+)= (dy ⊙ k) W + s ((g ⊙ ρ) A)` in one pass over dx, with
/// `g = (dy ⊙ k) (diag(o) B)`.
pub(super) fn backward_input(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    base: Base<'_, Wgpu>,
    term: Option<&LowRank<'_, Wgpu>>,
    acc: Option<&mut Tensor<Wgpu>>,
) -> Result<DxG> {
    let (t, dout) = (dy.dim(0), dy.dim(1));
    let k = match term {
        Some(term) => col_factor(be, term, dout)?,
        None => None,
    };
    // Under a column scale every part reads dy ⊙ k.
    let dyk = match &k {
        Some(k) => {
            let gk = be.alloc(&[t, dout]);
            colscale(be, &gk.buf, &dy.buf, t * dout, dout, &k.buf, None)?;
            Some(gk)
        }
        None => None,
    };
    let dyb = dyk.as_ref().map_or(&dy.buf, |g| &g.buf);
    let Some(term) = term else {
        return Ok((base_backward(be, dyb, t, base, None, acc)?, None));
    };
    let r = term.r();
    let bo = scaled_b(be, term, dout)?;
    let g = be.gemm(
        t,
        r,
        dout,
        Operand::n(dyb, dout),
        Operand::n(b_or(&bo, term), r),
        1.0,
    )?;
    let epi = Epilogue {
        r,
        h: Operand::n(&g.buf, r),
        g: a_t(term),
        scale: term.scale,
        jscale: term.rank_scale.map(|v| &v.buf),
        nscale: None,
    };
    let dx = base_backward(be, dyb, t, base, Some(epi), acc)?;
    Ok((dx, Some(g)))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn grads(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    x: &Tensor<Wgpu>,
    h: &Tensor<Wgpu>,
    z: Option<&Tensor<Wgpu>>,
    g: &Tensor<Wgpu>,
    term: &LowRank<'_, Wgpu>,
    wants: GradWants,
) -> Result<ParamGrads<Wgpu>> {
    let (t, din, dout) = (x.dim(0), x.dim(1), dy.dim(1));
    let r = term.r();
    let s = term.scale;
    // The column scale enters only dB and do.
    let k = if wants.lora_b || wants.out_scale {
        col_factor(be, term, dout)?
    } else {
        None
    };
    let mut out = ParamGrads {
        d_lora_a: None,
        d_lora_b: None,
        d_rank_scale: None,
        d_out_scale: None,
        d_magnitude: None,
    };
    // P = s dy^T (h ⊙ ρ) [out, r] (ρ the product's column scale): dB = diag(k ⊙ o) P,
    // do = k ⊙ rowdot(P, B).
    if wants.lora_b || wants.out_scale {
        let p = be.alloc(&[dout, r]);
        let mut mm = Matmul::new(
            dout,
            r,
            t,
            Operand::t(&dy.buf, dout),
            Operand::n(&h.buf, r),
            &p.buf,
            s,
            0.0,
        );
        mm.colscale = term.rank_scale.map(|v| &v.buf);
        be.matmul(&mm)?;
        if wants.out_scale {
            let d = be.alloc(&[dout]);
            rowdot(
                be,
                dout,
                r,
                Rows::new(&p.buf, r),
                b_rows(term),
                None,
                Rows::vec(&d.buf, 0),
            )?;
            if let Some(k) = &k {
                let kv = Rows::vec(&k.buf, 0);
                row_scale(be, dout, 1, None, kv, Rows::vec(&d.buf, 0), false)?;
            }
            out.d_out_scale = Some(d);
        }
        if wants.lora_b {
            let factors = [term.out_scale.map(|o| &o.buf), k.as_ref().map(|k| &k.buf)];
            for v in factors.into_iter().flatten() {
                row_scale(
                    be,
                    dout,
                    r,
                    None,
                    Rows::vec(v, 0),
                    Rows::new(&p.buf, r),
                    false,
                )?;
            }
            out.d_lora_b = Some(p);
        }
    }
    // dA = s diag(ρ) (g^T x) [r, in].
    if wants.lora_a {
        let q = be.gemm(r, din, t, Operand::t(&g.buf, r), Operand::n(&x.buf, din), s)?;
        if let Some(rs) = term.rank_scale {
            let v = Rows::vec(&rs.buf, 0);
            row_scale(be, r, din, None, v, Rows::new(&q.buf, din), false)?;
        }
        out.d_lora_a = Some(q);
    }
    // dρ = s sum_T(g ⊙ h), shaped like ρ.
    if wants.rank_scale {
        let shape = term.rank_scale.map_or(vec![r], |v| v.shape().to_vec());
        let d = be.alloc(&shape);
        colsum(
            be,
            t,
            r,
            Rows::new(&g.buf, r),
            Rows::new(&h.buf, r),
            None,
            &d.buf,
        )?;
        if s != 1.0 {
            scale_buf(be, &d.buf, r, s)?;
        }
        out.d_rank_scale = Some(d);
    }
    // dm = sum_T(dy ⊙ z) / n.
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
        let dm = be.alloc(&[dout]);
        colsum(
            be,
            t,
            dout,
            Rows::new(&dy.buf, dout),
            Rows::new(&z.buf, dout),
            Some(&n.buf),
            &dm.buf,
        )?;
        out.d_magnitude = Some(dm);
    }
    Ok(out)
}

/// `W += sign s diag(o) B diag(ρ) A` as one `K = 0` pass over W (ρ the epilogue's rank scale,
/// o folded into B); under a column scale `W = k ⊙ (W + ΔW)` (merge) or `W = W / k - ΔW`
/// (unmerge, PEFT's division), each a row scaling of W.
pub(super) fn merge(
    be: &Wgpu,
    w: &mut Tensor<Wgpu>,
    term: &LowRank<'_, Wgpu>,
    sign: f32,
) -> Result<()> {
    Wgpu::mutable("lowrank_merge", w)?;
    let (dout, din) = (w.dim(0), w.dim(1));
    let r = term.r();
    let bo = scaled_b(be, term, dout)?;
    let epi = Epilogue {
        r,
        h: Operand::n(b_or(&bo, term), r),
        g: a_t(term),
        scale: sign * term.scale,
        jscale: term.rank_scale.map(|v| &v.buf),
        nscale: None,
    };
    let Some(c) = &term.col_scale else {
        return add_lowrank_into(be, &w.buf, dout, din, epi);
    };
    let wrows = Rows::new(&w.buf, din);
    if sign > 0.0 {
        let k = col_factor(be, term, dout)?.ok_or_else(|| Error::arg("weight_norm", "missing"))?;
        add_lowrank_into(be, &w.buf, dout, din, epi)?;
        return row_scale(be, dout, din, None, Rows::vec(&k.buf, 0), wrows, false);
    }
    // k on the host, as the CPU computes it, to check that it is invertible (merges are not on
    // the training path; this reads back 2 * out values).
    let n = c
        .weight_norm
        .ok_or_else(|| Error::arg("weight_norm", "missing"))?;
    let mn = download_many(be, &[c.magnitude, n])?;
    let k: Vec<f32> = mn[0].iter().zip(&mn[1]).map(|(m, n)| m / n).collect();
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
    let kd = be.ctx.upload(&k);
    row_scale(be, dout, din, None, Rows::vec(&kd, 0), wrows, true)?;
    add_lowrank_into(be, &w.buf, dout, din, epi)
}

/// `||W + ΔW||_row` of a term without column scale, by the low-rank identity.
pub(super) fn row_norms(
    be: &Wgpu,
    base: Base<'_, Wgpu>,
    base_row_sq: &Tensor<Wgpu>,
    term: &LowRank<'_, Wgpu>,
) -> Result<Tensor<Wgpu>> {
    let w = match base {
        Base::Dense(w) => w,
        Base::Bf16(w) => &w.buf,
        Base::Nf4(w) => return nf4::lowrank_row_norms(be, w, base_row_sq, term),
    };
    let (dout, din) = (w.dim(0), w.dim(1));
    // P = W A^T [out, r]: W (f32 or frozen f16) is the matmul's A operand.
    let p = be.gemm(dout, term.r(), din, Operand::n(&w.buf, din), a_t(term), 1.0)?;
    norm_from_p(be, &p, base_row_sq, term, dout, din)
}

/// DoRA's norm from `P = W A^T [out, r]` (however W is stored): with `B' = diag(o) B diag(ρ)`,
/// `G = A A^T` and `Q = B' G`, one kernel per row gives
/// `sqrt(max(||W||^2 + 2 s rowdot(P, B') + s^2 rowdot(Q, B'), 0))`.
pub(super) fn norm_from_p(
    be: &Wgpu,
    p: &Tensor<Wgpu>,
    row_sq: &Tensor<Wgpu>,
    term: &LowRank<'_, Wgpu>,
    dout: usize,
    din: usize,
) -> Result<Tensor<Wgpu>> {
    let r = term.r();
    let bf = folded_b(be, term, dout)?;
    let bbuf = b_or(&bf, term);
    let g = be.gemm(r, r, din, a_n(term), a_t(term), 1.0)?;
    let q = be.gemm(dout, r, r, Operand::n(bbuf, r), Operand::n(&g.buf, r), 1.0)?;
    let out = be.alloc(&[dout]);
    if dout == 0 {
        return Ok(out);
    }
    let ctx = &*be.ctx;
    let (pv, qv, bv) = (
        Rows::new(&p.buf, r),
        Rows::new(&q.buf, r),
        Rows::new(bbuf, r),
    );
    let (sv, ov) = (Rows::vec(&row_sq.buf, 0), Rows::vec(&out.buf, 0));
    for (r0, r1) in view_chunks(ctx, dout, &[pv, qv, bv, sv, ov])? {
        let (bp, po) = bind_rows(ctx, &pv, r0, r1)?;
        let (bq, qo) = bind_rows(ctx, &qv, r0, r1)?;
        let (bb, bo) = bind_rows(ctx, &bv, r0, r1)?;
        let (bs, so) = bind_rows(ctx, &sv, r0, r1)?;
        let (bn, no) = bind_rows(ctx, &ov, r0, r1)?;
        let params = Params {
            rows: r1 - r0,
            cols: r,
            s: term.scale,
            x: (po, r),
            y: (qo, r),
            z: (bo, r),
            o: (no, 1),
            v_off: so,
            ..Default::default()
        };
        let binds = vec![(1, bp), (2, bq), (3, bs), (4, bn), (5, bb)];
        run(
            be,
            "dora_norm",
            &params,
            binds,
            grid(ctx, (r1 - r0).div_ceil(256)),
        )?;
    }
    Ok(out)
}
