//! CUDA dense linear algebra: the base products `x W^T + bias` and `dy W` over a dense or NF4
//! weight, the weight gradient `dy^T x`, elementwise updates and row norms. A dense base goes to
//! cuBLAS, or for `T <= 8` tokens to `linear_decode` (`kernels/lora.cu`, W read once); an NF4
//! base goes through `nf4.rs`, tile by tile.

use super::blas::Mat;
use super::{Arg, Cuda, blocks, nf4, pu};
use crate::backend::{Base, Tensor};
use crate::error::Result;

/// Largest token count that takes the decode kernels (`linear_decode`, `nf4_gemv`).
pub(super) const DECODE_MAX_T: usize = 8;

/// Grid of a grid-stride elementwise kernel over `n` elements (block 256).
pub(super) fn grid(n: usize) -> u32 {
    blocks(n, 256).clamp(1, 4096)
}

/// The low-rank part that `linear_decode` fuses: `s · o ⊙ ((ρ ⊙ h) B^T)` in device pointers
/// (0 = an absent scale).
#[derive(Clone, Copy)]
pub(super) struct DecodeTerm {
    pub h: u64,
    pub b: u64,
    pub ldb: usize,
    pub dscale: u64,
    pub bscale: u64,
    pub r: usize,
    pub s: f32,
}

/// `linear_decode`: `y = x W^T + bias (+ the term)` for `t <= 8` tokens, W read once.
/// x `[t, din]`, w `[dout, din]`, y `[t, dout]` (raw pointers of the storage dtype).
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_decode(
    be: &Cuda,
    x: u64,
    w: u64,
    bias: u64,
    y: u64,
    term: Option<&DecodeTerm>,
    t: usize,
    din: usize,
    dout: usize,
) -> Result<()> {
    let none = DecodeTerm {
        h: 0,
        b: 0,
        ldb: 0,
        dscale: 0,
        bscale: 0,
        r: 0,
        s: 0.0,
    };
    let lr = term.unwrap_or(&none);
    be.launch(
        "lora",
        "linear_decode",
        (blocks(dout, 4), 1, 1),
        (128, 1, 1),
        0,
        &[
            Arg::P(x),
            Arg::P(w),
            Arg::P(bias),
            Arg::P(y),
            Arg::P(lr.h),
            Arg::P(lr.b),
            Arg::I(lr.ldb as i32),
            Arg::P(lr.dscale),
            Arg::P(lr.bscale),
            Arg::I(t as i32),
            Arg::I(din as i32),
            Arg::I(dout as i32),
            Arg::I(lr.r as i32),
            Arg::F(lr.s),
        ],
    )
}

/// `y[t, :] += bias` in one pass (`adapter_expand` with rank 0).
pub(super) fn add_bias(be: &Cuda, y: u64, bias: u64, t: usize, dout: usize) -> Result<()> {
    be.launch(
        "lora",
        "adapter_expand",
        (blocks(dout, 128), blocks(t, 8), 1),
        (128, 1, 1),
        0,
        &[
            Arg::P(y),
            Arg::P(y),
            Arg::P(0),
            Arg::P(0),
            Arg::P(0),
            Arg::I(0),
            Arg::P(bias),
            Arg::P(0),
            Arg::P(0),
            Arg::P(0),
            Arg::P(0),
            Arg::I(t as i32),
            Arg::I(dout as i32),
            Arg::I(0),
            Arg::F(0.0),
        ],
    )
}

/// `y = x W^T (+ bias)` for x `[t, in]` over a dense or NF4 base → `[t, out]`.
pub(super) fn base_product(
    be: &Cuda,
    x: &Tensor<Cuda>,
    base: Base<'_, Cuda>,
    bias: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    let w = match base {
        Base::Dense(w) => w,
        Base::Bf16(w) => &w.buf,
        Base::Nf4(w) => return nf4::linear(be, x, w, bias),
    };
    let (t, din, dout) = (x.dim(0), x.dim(1), w.dim(0));
    let bp = be.opt_ptr("bias", bias)?;
    let y = be.alloc(&[t, dout])?;
    let (xp, wp, yp) = (be.ptr("x", x)?, be.ptr("w", w)?, be.ptr("y", &y)?);
    if t <= DECODE_MAX_T {
        linear_decode(be, xp, wp, bp, yp, None, t, din, dout)?;
    } else {
        be.gemm_s(
            t,
            dout,
            din,
            1.0,
            Mat::n(xp, din),
            Mat::t(wp, din),
            0.0,
            yp,
            dout,
        )?;
        if bias.is_some() {
            add_bias(be, yp, bp, t, dout)?;
        }
    }
    Ok(y)
}

/// `dx = dy W + beta dx` for dy `[t, out]` (raw pointer) over a dense or NF4 base, into the
/// `[t, in]` buffer at `dx`.
pub(super) fn base_backward_into(
    be: &Cuda,
    dy: u64,
    t: usize,
    base: Base<'_, Cuda>,
    dx: u64,
    beta: f32,
) -> Result<()> {
    let w = match base {
        Base::Dense(w) => w,
        Base::Bf16(w) => &w.buf,
        Base::Nf4(w) => return nf4::backward_into(be, dy, t, w, dx, beta),
    };
    let (dout, din) = (w.dim(0), w.dim(1));
    be.gemm_s(
        t,
        din,
        dout,
        1.0,
        Mat::n(dy, dout),
        Mat::n(be.ptr("w", w)?, din),
        beta,
        dx,
        din,
    )
}

/// `dW += dy^T x`.
pub(super) fn backward_weight(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    dw: &mut Tensor<Cuda>,
) -> Result<()> {
    let (t, dout, din) = (dy.dim(0), dy.dim(1), x.dim(1));
    let (dyp, xp) = (be.ptr("dy", dy)?, be.ptr("x", x)?);
    let dwp = pu(be.wr("dw", dw)?);
    be.gemm_s(
        dout,
        din,
        t,
        1.0,
        Mat::t(dyp, dout),
        Mat::n(xp, din),
        1.0,
        dwp,
        din,
    )
}

pub(super) fn axpy(be: &Cuda, a: &mut Tensor<Cuda>, alpha: f32, b: &Tensor<Cuda>) -> Result<()> {
    let n = a.len();
    let bp = be.rd("b", b)?;
    let ap = be.wr("a", a)?;
    be.launch(
        "optim",
        "axpy",
        (grid(n), 1, 1),
        (256, 1, 1),
        0,
        &[ap, Arg::F(alpha), bp, Arg::L(n as i64)],
    )
}

pub(super) fn scale(be: &Cuda, a: &mut Tensor<Cuda>, alpha: f32) -> Result<()> {
    let n = a.len();
    let ap = be.wr("a", a)?;
    be.launch(
        "optim",
        "scale",
        (grid(n), 1, 1),
        (256, 1, 1),
        0,
        &[ap, Arg::F(alpha), Arg::L(n as i64)],
    )
}

/// Per-block f64 partial sums on the device, added on the host in block order.
pub(super) fn sum_squares(be: &Cuda, a: &Tensor<Cuda>) -> Result<f64> {
    let n = a.len();
    if n == 0 {
        return Ok(0.0);
    }
    let g = blocks(n, 256).min(1024) as usize;
    let part = be.scratch_f64(g)?;
    be.launch(
        "optim",
        "sum_squares",
        (g as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("a", a)?,
            Arg::L(n as i64),
            Arg::P(be.slice_ptr(&part)),
        ],
    )?;
    Ok(be.download_f64(&part, g)?.iter().sum())
}

/// `||W||_row^2 [out]` of a dense or NF4 base, accumulated in f64 (`row_sq_norms` in
/// `kernels/dora.cu`, `nf4_row_sq_norms` in `kernels/nf4.cu`).
pub(super) fn row_sq_norms(be: &Cuda, base: Base<'_, Cuda>) -> Result<Tensor<Cuda>> {
    let w = match base {
        Base::Dense(w) => w,
        Base::Bf16(w) => &w.buf,
        Base::Nf4(w) => return nf4::row_sq_norms(be, w),
    };
    let (dout, din) = (w.dim(0), w.dim(1));
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
