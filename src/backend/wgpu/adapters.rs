//! DoRA, VeRA and AdaLoRA on the wgpu backend, and the LoRA gradient products shared with
//! the base-agnostic adapter terms. Same contracts as the trait docs; same math as
//! `backend/cpu/adapters.rs`.

use super::matmul::{LowRank, Matmul, Operand};
use super::{GpuBuf, Wgpu};
use crate::backend::{AdaLoraGrads, DoraGrads, DoraSaved, Tensor, check};
use crate::error::{Error, Result};

fn todo(name: &str) -> Error {
    Error::Backend {
        backend: "wgpu".into(),
        msg: format!("{name} is not implemented yet"),
    }
}

/// `dA = s g^T x [r, in]` and `dB = s dy^T h [out, r]` (the LoRA factor gradients).
pub(super) fn lora_grads(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    x: &Tensor<Wgpu>,
    h: &Tensor<Wgpu>,
    g: &Tensor<Wgpu>,
    s: f32,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    let (t, din) = x.dims2("x")?;
    let (_, dout) = dy.dims2("dy")?;
    let (_, r) = g.dims2("g")?;
    let da = be.gemm(r, din, t, Operand::t(&g.buf, r), Operand::n(&x.buf, din), s)?;
    let db = be.gemm(
        dout,
        r,
        t,
        Operand::t(&dy.buf, dout),
        Operand::n(&h.buf, r),
        s,
    )?;
    Ok((da, db))
}

/// `y [t, dout] += s h B^T` in one pass over y (the matmul with K = 0 runs only its epilogue).
#[allow(clippy::too_many_arguments)]
pub(super) fn add_lowrank(
    be: &Wgpu,
    y: &GpuBuf,
    t: usize,
    dout: usize,
    h: &Tensor<Wgpu>,
    lora_b: &Tensor<Wgpu>,
    r: usize,
    s: f32,
) -> Result<()> {
    let mut mm = Matmul::new(t, dout, 0, Operand::n(y, 1), Operand::n(y, 1), y, 1.0, 1.0);
    mm.lowrank = Some(LowRank {
        r,
        h: Operand::n(&h.buf, r),
        g: Operand::n(&lora_b.buf, r),
        scale: s,
        jscale: None,
        nscale: None,
    });
    be.matmul(&mm)
}

pub(super) fn row_sq_norms(_be: &Wgpu, _w: &Tensor<Wgpu>) -> Result<Tensor<Wgpu>> {
    Err(todo("row_sq_norms"))
}

pub(super) fn dora_weight_norm(
    _be: &Wgpu,
    _w0: &Tensor<Wgpu>,
    _w0_row_sq: &Tensor<Wgpu>,
    _a: &Tensor<Wgpu>,
    _b: &Tensor<Wgpu>,
    _s: f32,
) -> Result<Tensor<Wgpu>> {
    Err(todo("dora_weight_norm"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_forward_from_base(
    _be: &Wgpu,
    _base_out: Tensor<Wgpu>,
    _x: &Tensor<Wgpu>,
    _bias: Option<&Tensor<Wgpu>>,
    _a: &Tensor<Wgpu>,
    _b: &Tensor<Wgpu>,
    _s: f32,
    _m: &Tensor<Wgpu>,
    _n: &Tensor<Wgpu>,
) -> Result<(Tensor<Wgpu>, DoraSaved<Wgpu>)> {
    Err(todo("dora_forward_from_base"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_backward_adapter(
    _be: &Wgpu,
    _dy: &Tensor<Wgpu>,
    _x: &Tensor<Wgpu>,
    _saved: &DoraSaved<Wgpu>,
    _a: &Tensor<Wgpu>,
    _b: &Tensor<Wgpu>,
    _s: f32,
    _m: &Tensor<Wgpu>,
    _n: &Tensor<Wgpu>,
) -> Result<(DoraGrads<Wgpu>, Tensor<Wgpu>)> {
    Err(todo("dora_backward_adapter"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_merge(
    _be: &Wgpu,
    _w: &mut Tensor<Wgpu>,
    _a: &Tensor<Wgpu>,
    _b: &Tensor<Wgpu>,
    _s: f32,
    _m: &Tensor<Wgpu>,
    _n: &Tensor<Wgpu>,
) -> Result<()> {
    Err(todo("dora_merge"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_unmerge(
    _be: &Wgpu,
    _w: &mut Tensor<Wgpu>,
    _a: &Tensor<Wgpu>,
    _b: &Tensor<Wgpu>,
    _s: f32,
    _m: &Tensor<Wgpu>,
    _n: &Tensor<Wgpu>,
) -> Result<()> {
    Err(todo("dora_unmerge"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vera_forward(
    _be: &Wgpu,
    _x: &Tensor<Wgpu>,
    _w0: &Tensor<Wgpu>,
    _bias: Option<&Tensor<Wgpu>>,
    _vera_a: &Tensor<Wgpu>,
    _vera_b: &Tensor<Wgpu>,
    _lambda_d: &Tensor<Wgpu>,
    _lambda_b: &Tensor<Wgpu>,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    Err(todo("vera_forward"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vera_backward(
    _be: &Wgpu,
    _dy: &Tensor<Wgpu>,
    _x: &Tensor<Wgpu>,
    _h: &Tensor<Wgpu>,
    _w0: &Tensor<Wgpu>,
    _vera_a: &Tensor<Wgpu>,
    _vera_b: &Tensor<Wgpu>,
    _lambda_d: &Tensor<Wgpu>,
    _lambda_b: &Tensor<Wgpu>,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>, Tensor<Wgpu>)> {
    Err(todo("vera_backward"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vera_merge(
    _be: &Wgpu,
    _w: &mut Tensor<Wgpu>,
    _vera_a: &Tensor<Wgpu>,
    _vera_b: &Tensor<Wgpu>,
    _lambda_d: &Tensor<Wgpu>,
    _lambda_b: &Tensor<Wgpu>,
    _sign: f32,
) -> Result<()> {
    Err(todo("vera_merge"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_forward(
    _be: &Wgpu,
    _x: &Tensor<Wgpu>,
    _w0: &Tensor<Wgpu>,
    _bias: Option<&Tensor<Wgpu>>,
    _a: &Tensor<Wgpu>,
    _b: &Tensor<Wgpu>,
    _e: &Tensor<Wgpu>,
    _scaling: f32,
    _ranknum: f32,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    Err(todo("adalora_forward"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_backward(
    _be: &Wgpu,
    _dy: &Tensor<Wgpu>,
    _x: &Tensor<Wgpu>,
    _h: &Tensor<Wgpu>,
    _w0: &Tensor<Wgpu>,
    _a: &Tensor<Wgpu>,
    _b: &Tensor<Wgpu>,
    _e: &Tensor<Wgpu>,
    _scaling: f32,
    _ranknum: f32,
) -> Result<AdaLoraGrads<Wgpu>> {
    Err(todo("adalora_backward"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_merge(
    _be: &Wgpu,
    _w: &mut Tensor<Wgpu>,
    _a: &Tensor<Wgpu>,
    _b: &Tensor<Wgpu>,
    _e: &Tensor<Wgpu>,
    _scaling: f32,
    _ranknum: f32,
    _sign: f32,
) -> Result<()> {
    let _ = check::adalora_factor;
    Err(todo("adalora_merge"))
}
