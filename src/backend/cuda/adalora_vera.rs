//! VeRA and AdaLoRA on CUDA (PEFT `vera.Linear`, `adalora.SVDLinear`): the scaled low-rank
//! terms go through the LoRA kernels with their per-rank/per-row scales; the backward reduces
//! both VeRA lambda gradients in one launch and AdaLoRA's dA and dE in one pass over M.

use super::adapters::{LowRank, pu};
use super::blas::Mat;
use super::{Arg, Cuda, DType, blocks};
use crate::backend::{AdaLoraGrads, Tensor, check};
use crate::error::Result;

// ---- VeRA ----------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn vera_term(
    be: &Cuda,
    din: usize,
    dout: usize,
    vera_a: &Tensor<Cuda>,
    vera_b: &Tensor<Cuda>,
    ld: &Tensor<Cuda>,
    lb: &Tensor<Cuda>,
) -> Result<LowRank> {
    let (r, max_in) = check::vera(din, dout, vera_a, vera_b, ld, lb)?;
    Ok(LowRank {
        a: be.ptr("vera_A", vera_a)?,
        lda: max_in,
        ascale: 0,
        b: be.ptr("vera_B", vera_b)?,
        ldb: r,
        dscale: be.ptr("vera_lambda_d", ld)?,
        bscale: be.ptr("vera_lambda_b", lb)?,
        r,
        s: 1.0,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vera_forward(
    be: &Cuda,
    x: &Tensor<Cuda>,
    w0: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
    vera_a: &Tensor<Cuda>,
    vera_b: &Tensor<Cuda>,
    ld: &Tensor<Cuda>,
    lb: &Tensor<Cuda>,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
    let (_, din, dout) = check::linear(x, w0)?;
    let lr = vera_term(be, din, dout, vera_a, vera_b, ld, lb)?;
    if let Some(bias) = bias {
        check::vector("bias", bias, dout)?;
    }
    be.adapter_forward(x, w0, bias, &lr)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vera_backward(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    h: &Tensor<Cuda>,
    w0: &Tensor<Cuda>,
    vera_a: &Tensor<Cuda>,
    vera_b: &Tensor<Cuda>,
    ld: &Tensor<Cuda>,
    lb: &Tensor<Cuda>,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>, Tensor<Cuda>)> {
    let (t, din, dout) = check::linear(x, w0)?;
    let lr = vera_term(be, din, dout, vera_a, vera_b, ld, lb)?;
    let r = lr.r;
    dy.expect_shape("dy", &[t, dout])?;
    h.expect_shape("h", &[t, r])?;
    let (dyp, hp) = (be.ptr("dy", dy)?, be.ptr("h", h)?);
    // q = dy (lambda_b ⊙ Bs) [T, r]; gh = dy^T h [out, r] (f32).
    let bl = be.scale_rows(lr.b, r, lr.bscale, dout, r)?;
    let q = be.alloc(&[t, r])?;
    let qp = be.ptr("q", &q)?;
    be.gemm_s(
        t,
        r,
        dout,
        1.0,
        Mat::n(dyp, dout),
        Mat::n(be.ptr("Bl", &bl)?, r),
        0.0,
        qp,
        r,
    )?;
    let gh = be.alloc_typed(&[dout, r], DType::F32)?;
    let ghp = pu(be.rd_f32("gh", &gh)?);
    be.gemm(
        dout,
        r,
        t,
        1.0,
        Mat::t(dyp, dout),
        Mat::n(hp, r),
        0.0,
        ghp,
        r,
        be.dtype,
        DType::F32,
    )?;
    let dld = be.alloc(&[r])?;
    let dlb = be.alloc(&[dout])?;
    be.launch(
        "vera",
        "vera_lambda_grads",
        (r as u32 + blocks(dout, 256), 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::P(qp),
            Arg::P(hp),
            Arg::I(t as i32),
            Arg::I(r as i32),
            Arg::P(ghp),
            Arg::P(lr.b),
            Arg::P(lr.dscale),
            Arg::I(dout as i32),
            be.rd("dlambda_d", &dld)?,
            be.rd("dlambda_b", &dlb)?,
        ],
    )?;
    // dx = dy W0 + q (lambda_d ⊙ As).
    let al = be.scale_rows(lr.a, lr.lda, lr.dscale, r, din)?;
    let dx = be.alloc(&[t, din])?;
    let dxp = be.ptr("dx", &dx)?;
    let wp = be.ptr("w0", w0)?;
    be.gemm_s(
        t,
        din,
        dout,
        1.0,
        Mat::n(dyp, dout),
        Mat::n(wp, din),
        0.0,
        dxp,
        din,
    )?;
    be.gemm_s(
        t,
        din,
        r,
        1.0,
        Mat::n(qp, r),
        Mat::n(be.ptr("Al", &al)?, din),
        1.0,
        dxp,
        din,
    )?;
    Ok((dx, dld, dlb))
}

pub(super) fn vera_merge(
    be: &Cuda,
    w: &mut Tensor<Cuda>,
    vera_a: &Tensor<Cuda>,
    vera_b: &Tensor<Cuda>,
    ld: &Tensor<Cuda>,
    lb: &Tensor<Cuda>,
    sign: f32,
) -> Result<()> {
    let (dout, din) = w.dims2("w")?;
    let mut lr = vera_term(be, din, dout, vera_a, vera_b, ld, lb)?;
    // In the merge the lambdas scale the factors: ascale = lambda_d (rank j), bscale = lambda_b.
    lr.ascale = lr.dscale;
    be.merge(w, &lr, Arg::P(0), Arg::P(0), 0, sign)
}

// ---- AdaLoRA -------------------------------------------------------------------------------

fn adalora_term(
    be: &Cuda,
    din: usize,
    dout: usize,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    e: &Tensor<Cuda>,
    c: f32,
) -> Result<LowRank> {
    let r = check::adalora(din, dout, a, b, e)?;
    let mut lr = be.lora_term(a, b, r, c)?;
    lr.ascale = be.ptr("lora_E", e)?;
    Ok(lr)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_forward(
    be: &Cuda,
    x: &Tensor<Cuda>,
    w0: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    e: &Tensor<Cuda>,
    scaling: f32,
    ranknum: f32,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
    let (_, din, dout) = check::linear(x, w0)?;
    let c = check::adalora_factor(scaling, ranknum)?;
    let lr = adalora_term(be, din, dout, a, b, e, c)?;
    if let Some(bias) = bias {
        check::vector("bias", bias, dout)?;
    }
    be.adapter_forward(x, w0, bias, &lr)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_backward(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    h: &Tensor<Cuda>,
    w0: &Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    e: &Tensor<Cuda>,
    scaling: f32,
    ranknum: f32,
) -> Result<AdaLoraGrads<Cuda>> {
    let (t, din, dout) = check::linear(x, w0)?;
    let c = check::adalora_factor(scaling, ranknum)?;
    let lr = adalora_term(be, din, dout, a, b, e, c)?;
    let r = lr.r;
    dy.expect_shape("dy", &[t, dout])?;
    h.expect_shape("h", &[t, r])?;
    let (dyp, xp, hp) = (be.ptr("dy", dy)?, be.ptr("x", x)?, be.ptr("h", h)?);
    // gB = dy B [T, r]; AE = A ⊙ E; dx = dy W0 + c gB AE; dB = c dy^T h; M = c gB^T x (f32).
    let gb = be.alloc(&[t, r])?;
    let gbp = be.ptr("gB", &gb)?;
    be.gemm_s(
        t,
        r,
        dout,
        1.0,
        Mat::n(dyp, dout),
        Mat::n(lr.b, r),
        0.0,
        gbp,
        r,
    )?;
    let ae = be.scale_rows(lr.a, din, lr.ascale, r, din)?;
    let dx = be.alloc(&[t, din])?;
    let dxp = be.ptr("dx", &dx)?;
    let wp = be.ptr("w0", w0)?;
    be.gemm_s(
        t,
        din,
        dout,
        1.0,
        Mat::n(dyp, dout),
        Mat::n(wp, din),
        0.0,
        dxp,
        din,
    )?;
    be.gemm_s(
        t,
        din,
        r,
        c,
        Mat::n(gbp, r),
        Mat::n(be.ptr("AE", &ae)?, din),
        1.0,
        dxp,
        din,
    )?;
    let db = be.alloc(&[dout, r])?;
    be.gemm_s(
        dout,
        r,
        t,
        c,
        Mat::t(dyp, dout),
        Mat::n(hp, r),
        0.0,
        be.ptr("dB", &db)?,
        r,
    )?;
    let mm = be.alloc_typed(&[r, din], DType::F32)?;
    let mp = pu(be.rd_f32("M", &mm)?);
    be.gemm(
        r,
        din,
        t,
        c,
        Mat::t(gbp, r),
        Mat::n(xp, din),
        0.0,
        mp,
        din,
        be.dtype,
        DType::F32,
    )?;
    let da = be.alloc(&[r, din])?;
    let de = be.alloc(&[r, 1])?;
    be.launch(
        "adalora",
        "adalora_grads",
        (r as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::P(mp),
            be.rd("lora_A", a)?,
            be.rd("lora_E", e)?,
            be.rd("dA", &da)?,
            be.rd("dE", &de)?,
            Arg::I(r as i32),
            Arg::I(din as i32),
        ],
    )?;
    Ok(AdaLoraGrads {
        dx,
        d_lora_a: da,
        d_lora_b: db,
        d_lora_e: de,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_merge(
    be: &Cuda,
    w: &mut Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    e: &Tensor<Cuda>,
    scaling: f32,
    ranknum: f32,
    sign: f32,
) -> Result<()> {
    let (dout, din) = w.dims2("w")?;
    let c = check::adalora_factor(scaling, ranknum)?;
    let lr = adalora_term(be, din, dout, a, b, e, c)?;
    be.merge(w, &lr, Arg::P(0), Arg::P(0), 0, sign * c)
}
