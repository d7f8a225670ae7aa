//! DoRA on CUDA (PEFT `DoraLinearLayer`): row norms by the low-rank identity (no `[out, in]`
//! temporary), the `m / n` reweighting fused into the LoRA expand epilogue, and the backward's
//! `g'` and `dm` produced in one pass over dy and z.

use super::adapters::{linear, linear_backward_input, lora_grads, pu};
use super::blas::Mat;
use super::{Arg, Cuda, DType, blocks};
use crate::backend::{DoraGrads, DoraSaved, Tensor, check};
use crate::error::{Error, Result};

// ----------------------------------------------------------------------------------

pub(super) fn row_sq_norms(be: &Cuda, w: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
    let (dout, din) = w.dims2("w")?;
    let n = be.alloc(&[dout])?;
    be.launch(
        "dora",
        "row_sq_norms",
        (blocks(dout, 4), 1, 1),
        (128, 1, 1),
        0,
        &[
            be.rd("w", w)?,
            Arg::I(dout as i32),
            Arg::I(din as i32),
            be.rd("res", &n)?,
        ],
    )?;
    Ok(n)
}

/// `n` from `P = W0 A^T` (f32 `[out, r]`, already computed) by the low-rank identity.
pub(super) fn dora_norm_from_p(
    be: &Cuda,
    p: &Tensor<Cuda>,
    w0_row_sq: &Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
) -> Result<Tensor<Cuda>> {
    let (r, din) = a.dims2("lora_A")?;
    let dout = b.dim(0);
    // G = A A^T [r, r] (f32), Q = B G [out, r] (f32, B upcast).
    let g = be.alloc_typed(&[r, r], DType::F32)?;
    let ap = be.ptr("lora_A", a)?;
    let gp = pu(be.rd_f32("G", &g)?);
    be.gemm(
        r,
        r,
        din,
        1.0,
        Mat::n(ap, din),
        Mat::t(ap, din),
        0.0,
        gp,
        r,
        be.dtype,
        DType::F32,
    )?;
    let b32 = be.to_f32(b)?;
    let q = be.alloc_typed(&[dout, r], DType::F32)?;
    let qp = pu(be.rd_f32("Q", &q)?);
    let b32p = pu(be.rd_f32("B", &b32)?);
    be.gemm(
        dout,
        r,
        r,
        1.0,
        Mat::n(b32p, r),
        Mat::n(gp, r),
        0.0,
        qp,
        r,
        DType::F32,
        DType::F32,
    )?;
    let n = be.alloc(&[dout])?;
    be.launch(
        "dora",
        "dora_norm_finish",
        (blocks(dout, 128), 1, 1),
        (128, 1, 1),
        0,
        &[
            be.rd_f32("P", p)?,
            Arg::P(qp),
            be.rd("lora_B", b)?,
            be.rd("w0_row_sq", w0_row_sq)?,
            be.rd("n", &n)?,
            Arg::I(dout as i32),
            Arg::I(r as i32),
            Arg::F(s),
        ],
    )?;
    Ok(n)
}

impl Cuda {
    /// An f32 copy of a storage tensor.
    pub(crate) fn to_f32(&self, t: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
        let out = self.alloc_typed(t.shape(), DType::F32)?;
        let n = t.len();
        self.launch(
            "optim",
            "to_f32",
            (blocks(n, 256).min(65535), 1, 1),
            (256, 1, 1),
            0,
            &[
                self.rd("src", t)?,
                Arg::P(pu(self.rd_f32("dst", &out)?)),
                Arg::L(n as i64),
            ],
        )?;
        Ok(out)
    }
}

pub(super) fn dora_weight_norm(
    be: &Cuda,
    w0: &Tensor<Cuda>,
    w0_row_sq: &Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
) -> Result<Tensor<Cuda>> {
    let (dout, din) = w0.dims2("w0")?;
    let r = check::lora(din, dout, a, b)?;
    check::vector("w0_row_sq", w0_row_sq, dout)?;
    let p = be.alloc_typed(&[dout, r], DType::F32)?;
    let pp = pu(be.rd_f32("P", &p)?);
    let (wp, ap) = (be.ptr("w0", w0)?, be.ptr("lora_A", a)?);
    be.gemm(
        dout,
        r,
        din,
        1.0,
        Mat::n(wp, din),
        Mat::t(ap, din),
        0.0,
        pp,
        r,
        be.dtype,
        DType::F32,
    )?;
    dora_norm_from_p(be, &p, w0_row_sq, a, b, s)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_forward(
    be: &Cuda,
    x: &Tensor<Cuda>,
    w0: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
    m: &Tensor<Cuda>,
    n: &Tensor<Cuda>,
) -> Result<(Tensor<Cuda>, DoraSaved<Cuda>)> {
    let (_, din, dout) = check::linear(x, w0)?;
    check::lora(din, dout, a, b)?;
    check::dora_vectors(m, n, dout)?;
    if let Some(bias) = bias {
        check::vector("bias", bias, dout)?;
    }
    let base = linear(be, x, w0, None)?;
    dora_forward_from_base(be, base, x, bias, a, b, s, m, n)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_forward_from_base(
    be: &Cuda,
    mut base_out: Tensor<Cuda>,
    x: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
    m: &Tensor<Cuda>,
    n: &Tensor<Cuda>,
) -> Result<(Tensor<Cuda>, DoraSaved<Cuda>)> {
    let (t, _, dout, r) = check::adapter(x, a, b, "base_out", &base_out)?;
    check::dora_vectors(m, n, dout)?;
    if let Some(bias) = bias {
        bias.expect_shape("bias", &[dout])?;
    }
    let lr = be.lora_term(a, b, r, s)?;
    let h = be.shrink(x, &lr)?;
    let y = be.alloc(&[t, dout])?;
    let zp = pu(be.wr("base_out", &mut base_out)?);
    be.expand(
        zp,
        be.ptr("y", &y)?,
        zp,
        be.ptr("h", &h)?,
        &lr,
        be.opt("bias", bias)?,
        be.rd("lora_magnitude_vector", m)?,
        be.rd("weight_norm", n)?,
        t,
        dout,
    )?;
    Ok((y, DoraSaved { h, z: base_out }))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_backward_adapter(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    saved: &DoraSaved<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
    m: &Tensor<Cuda>,
    n: &Tensor<Cuda>,
) -> Result<(DoraGrads<Cuda>, Tensor<Cuda>)> {
    let (t, din, dout, r) = check::adapter(x, a, b, "dy", dy)?;
    check::dora_vectors(m, n, dout)?;
    saved.h.expect_shape("saved.h", &[t, r])?;
    saved.z.expect_shape("saved.z", &[t, dout])?;
    // One pass over dy and z: g' = dy ⊙ k and the dm sums.
    let gk = be.alloc(&[t, dout])?;
    let acc = be.scratch_f64(dout)?;
    let accp = be.slice_ptr(&acc);
    be.launch(
        "dora",
        "dora_bwd_scale",
        (blocks(dout, 32), blocks(t, 64), 1),
        (32, 8, 1),
        0,
        &[
            be.rd("dy", dy)?,
            be.rd("saved.z", &saved.z)?,
            be.rd("lora_magnitude_vector", m)?,
            be.rd("weight_norm", n)?,
            be.rd("g'", &gk)?,
            Arg::P(accp),
            Arg::I(t as i32),
            Arg::I(dout as i32),
        ],
    )?;
    let dm = be.alloc(&[dout])?;
    be.launch(
        "dora",
        "dora_dm_finish",
        (blocks(dout, 128), 1, 1),
        (128, 1, 1),
        0,
        &[
            Arg::P(accp),
            be.rd("weight_norm", n)?,
            be.rd("dm", &dm)?,
            Arg::I(dout as i32),
        ],
    )?;
    let lr = be.lora_term(a, b, r, s)?;
    let dx = be.alloc(&[t, din])?;
    let dxp = be.ptr("dx", &dx)?;
    let (da, db) = lora_grads(
        be,
        be.ptr("g'", &gk)?,
        be.ptr("x", x)?,
        be.ptr("saved.h", &saved.h)?,
        &lr,
        dxp,
        t,
        din,
        dout,
    )?;
    Ok((
        DoraGrads {
            dx,
            d_lora_a: da,
            d_lora_b: db,
            d_magnitude: dm,
        },
        gk,
    ))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_backward(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    saved: &DoraSaved<Cuda>,
    w0: &Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
    m: &Tensor<Cuda>,
    n: &Tensor<Cuda>,
) -> Result<DoraGrads<Cuda>> {
    let (t, din, dout) = check::linear(x, w0)?;
    check::lora(din, dout, a, b)?;
    check::dora_vectors(m, n, dout)?;
    dy.expect_shape("dy", &[t, dout])?;
    let (mut grads, gk) = dora_backward_adapter(be, dy, x, saved, a, b, s, m, n)?;
    linear_backward_input(be, &gk, w0, Some(&mut grads.dx))?;
    Ok(grads)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_merge(
    be: &Cuda,
    w: &mut Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
    m: &Tensor<Cuda>,
    n: &Tensor<Cuda>,
    unmerge: bool,
) -> Result<()> {
    let (dout, din) = w.dims2("w")?;
    let r = check::lora(din, dout, a, b)?;
    check::dora_vectors(m, n, dout)?;
    if unmerge {
        let (mh, nh) = (be.download_t(m)?, be.download_t(n)?);
        let k: Vec<f32> = mh.iter().zip(&nh).map(|(m, n)| m / n).collect();
        if let Some(o) = k.iter().position(|k| *k == 0.0 || !k.is_finite()) {
            return Err(Error::arg(
                "lora_magnitude_vector",
                format!(
                    "row {o}: m / weight_norm = {} is not invertible, cannot unmerge",
                    k[o]
                ),
            ));
        }
    }
    let lr = be.lora_term(a, b, r, s)?;
    let (mode, c) = if unmerge { (2, -s) } else { (1, s) };
    be.merge(
        w,
        &lr,
        be.rd("lora_magnitude_vector", m)?,
        be.rd("weight_norm", n)?,
        mode,
        c,
    )
}

impl Cuda {
    fn download_t(&self, t: &Tensor<Cuda>) -> Result<Vec<f32>> {
        crate::backend::Backend::download(self, t)
    }
}
