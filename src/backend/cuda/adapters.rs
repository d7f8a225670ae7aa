//! Dense linear algebra and the LoRA, DoRA, VeRA and AdaLoRA kernels of the CUDA backend.
//!
//! Every adapter forward is one of two fixed sequences:
//! * `T <= 8` tokens (decode): `shrink_small` (h = x A^T) then `linear_decode`, which streams
//!   W0 once and adds bias and the low-rank term in the same kernel;
//! * more tokens: cuBLAS `x W0^T` and `x A^T`, then `adapter_expand`, one pass over y that adds
//!   `s h B^T` (with VeRA's lambdas, AdaLoRA's factor or DoRA's `m / n`) and the bias.
//!
//! Backward passes are cuBLAS products around fused reductions (DoRA's g' and dm in one pass
//! over dy and z; VeRA's two lambda gradients in one launch; AdaLoRA's dA and dE in one pass
//! over M). Merges are one in-place pass over W (`lowrank_merge`).

use super::blas::Mat;
use super::{Arg, Cuda, DType, blocks};
use crate::backend::{AdaLoraGrads, DoraGrads, DoraSaved, Tensor, check, same_shape};
use crate::error::{Error, Result};

/// Largest token count that takes the decode path.
pub(crate) const DECODE_MAX_T: usize = 8;

pub(crate) fn pu(a: Arg) -> u64 {
    match a {
        Arg::P(p) => p,
        _ => 0,
    }
}

/// A low-rank adapter term `s · bscale ⊙ ((dscale ⊙ (x (ascale ⊙ A)^T)) B^T)` in device
/// pointers (0 = absent scale).
#[derive(Clone, Copy)]
pub(crate) struct LowRank {
    pub a: u64,
    pub lda: usize,
    pub ascale: u64,
    pub b: u64,
    pub ldb: usize,
    pub dscale: u64,
    pub bscale: u64,
    pub r: usize,
    pub s: f32,
}

impl Cuda {
    pub(crate) fn ptr(&self, name: &str, t: &Tensor<Cuda>) -> Result<u64> {
        Ok(pu(self.rd(name, t)?))
    }

    /// `h = x (ascale ⊙ A)^T`, `[t, r]`.
    pub(crate) fn shrink(&self, x: &Tensor<Cuda>, lr: &LowRank) -> Result<Tensor<Cuda>> {
        let (t, din) = x.dims2("x")?;
        let h = self.alloc(&[t, lr.r])?;
        let (xp, hp) = (self.ptr("x", x)?, self.ptr("h", &h)?);
        if t <= DECODE_MAX_T {
            self.launch(
                "lora",
                "shrink_small",
                (blocks(lr.r, 4), 1, 1),
                (128, 1, 1),
                0,
                &[
                    Arg::P(xp),
                    Arg::P(lr.a),
                    Arg::I(lr.lda as i32),
                    Arg::P(lr.ascale),
                    Arg::P(hp),
                    Arg::I(t as i32),
                    Arg::I(din as i32),
                    Arg::I(lr.r as i32),
                ],
            )?;
        } else if lr.ascale != 0 {
            let ae = self.scale_rows(lr.a, lr.lda, lr.ascale, lr.r, din)?;
            let aep = self.ptr("A ⊙ E", &ae)?;
            self.gemm_s(
                t,
                lr.r,
                din,
                1.0,
                Mat::n(xp, din),
                Mat::t(aep, din),
                0.0,
                hp,
                lr.r,
            )?;
        } else {
            self.gemm_s(
                t,
                lr.r,
                din,
                1.0,
                Mat::n(xp, din),
                Mat::t(lr.a, lr.lda),
                0.0,
                hp,
                lr.r,
            )?;
        }
        Ok(h)
    }

    /// `dst [rows, cols] = src[o, :cols] * scale[o]` (src row stride `lds`, scale 0 = none).
    pub(crate) fn scale_rows(
        &self,
        src: u64,
        lds: usize,
        scale: u64,
        rows: usize,
        cols: usize,
    ) -> Result<Tensor<Cuda>> {
        let dst = self.alloc(&[rows, cols])?;
        let dp = self.ptr("dst", &dst)?;
        self.launch(
            "lora",
            "scale_rows",
            (blocks(rows * cols, 256), 1, 1),
            (256, 1, 1),
            0,
            &[
                Arg::P(src),
                Arg::I(lds as i32),
                Arg::P(scale),
                Arg::P(dp),
                Arg::I(rows as i32),
                Arg::I(cols as i32),
            ],
        )?;
        Ok(dst)
    }

    /// The fused epilogue `y = k ⊙ (base + s bscale ⊙ ((dscale ⊙ h) B^T)) + bias` (and `z` =
    /// the value before `k` and bias when `z != 0`); `k = mag / norm` when given, else 1.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn expand(
        &self,
        base: u64,
        y: u64,
        z: u64,
        h: u64,
        lr: &LowRank,
        bias: Arg,
        mag: Arg,
        norm: Arg,
        t: usize,
        dout: usize,
    ) -> Result<()> {
        self.launch(
            "lora",
            "adapter_expand",
            (blocks(dout, 128), blocks(t, 8), 1),
            (128, 1, 1),
            (8 * lr.r * 4) as u32,
            &[
                Arg::P(base),
                Arg::P(y),
                Arg::P(z),
                Arg::P(h),
                Arg::P(lr.b),
                Arg::I(lr.ldb as i32),
                bias,
                Arg::P(lr.dscale),
                Arg::P(lr.bscale),
                mag,
                norm,
                Arg::I(t as i32),
                Arg::I(dout as i32),
                Arg::I(lr.r as i32),
                Arg::F(lr.s),
            ],
        )
    }

    /// The decode kernel: `y = x W^T + bias (+ s bscale ⊙ ((dscale ⊙ h) B^T))`, W read once.
    #[allow(clippy::too_many_arguments)]
    fn linear_decode(
        &self,
        x: u64,
        w: u64,
        bias: Arg,
        y: u64,
        h: u64,
        lr: Option<&LowRank>,
        t: usize,
        din: usize,
        dout: usize,
    ) -> Result<()> {
        let none = LowRank {
            a: 0,
            lda: 0,
            ascale: 0,
            b: 0,
            ldb: 0,
            dscale: 0,
            bscale: 0,
            r: 0,
            s: 0.0,
        };
        let lr = lr.unwrap_or(&none);
        self.launch(
            "lora",
            "linear_decode",
            (blocks(dout, 4), 1, 1),
            (128, 1, 1),
            0,
            &[
                Arg::P(x),
                Arg::P(w),
                bias,
                Arg::P(y),
                Arg::P(h),
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

    /// A dense-base adapter forward (LoRA, VeRA, AdaLoRA): `(y, h)`.
    fn adapter_forward(
        &self,
        x: &Tensor<Cuda>,
        w0: &Tensor<Cuda>,
        bias: Option<&Tensor<Cuda>>,
        lr: &LowRank,
    ) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
        let (t, din, dout) = check::linear(x, w0)?;
        let bias_a = self.opt("bias", bias)?;
        let y = self.alloc(&[t, dout])?;
        let (xp, wp, yp) = (self.ptr("x", x)?, self.ptr("w0", w0)?, self.ptr("y", &y)?);
        let h = self.shrink(x, lr)?;
        let hp = self.ptr("h", &h)?;
        if t <= DECODE_MAX_T {
            self.linear_decode(xp, wp, bias_a, yp, hp, Some(lr), t, din, dout)?;
        } else {
            self.gemm_s(
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
            self.expand(yp, yp, 0, hp, lr, bias_a, Arg::P(0), Arg::P(0), t, dout)?;
        }
        Ok((y, h))
    }

    /// In place `W = post ⊙ (pre(W) + c (bscale ⊙ B)(ascale ⊙ A))` (see `lowrank_merge`).
    #[allow(clippy::too_many_arguments)]
    fn merge(
        &self,
        w: &mut Tensor<Cuda>,
        lr: &LowRank,
        mag: Arg,
        norm: Arg,
        mode: i32,
        c: f32,
    ) -> Result<()> {
        let (dout, din) = w.dims2("w")?;
        let wp = pu(self.wr("w", w)?);
        self.launch(
            "lora",
            "lowrank_merge",
            (blocks(din, 256), blocks(dout, 16), 1),
            (256, 1, 1),
            (16 * lr.r * 4) as u32,
            &[
                Arg::P(wp),
                Arg::I(dout as i32),
                Arg::I(din as i32),
                Arg::P(lr.a),
                Arg::I(lr.lda as i32),
                Arg::P(lr.b),
                Arg::I(lr.ldb as i32),
                Arg::I(lr.r as i32),
                Arg::P(lr.ascale),
                Arg::P(lr.bscale),
                mag,
                norm,
                Arg::I(mode),
                Arg::F(c),
            ],
        )
    }

    fn lora_term(&self, a: &Tensor<Cuda>, b: &Tensor<Cuda>, r: usize, s: f32) -> Result<LowRank> {
        let din = a.dim(1);
        Ok(LowRank {
            a: self.ptr("lora_A", a)?,
            lda: din,
            ascale: 0,
            b: self.ptr("lora_B", b)?,
            ldb: r,
            dscale: 0,
            bscale: 0,
            r,
            s,
        })
    }
}

// ---- dense ---------------------------------------------------------------------------------

pub(super) fn linear(
    be: &Cuda,
    x: &Tensor<Cuda>,
    w: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    let (t, din, dout) = check::linear(x, w)?;
    if let Some(b) = bias {
        b.expect_shape("bias", &[dout])?;
    }
    let bias_a = be.opt("bias", bias)?;
    let y = be.alloc(&[t, dout])?;
    let (xp, wp, yp) = (be.ptr("x", x)?, be.ptr("w", w)?, be.ptr("y", &y)?);
    if t <= DECODE_MAX_T {
        be.linear_decode(xp, wp, bias_a, yp, 0, None, t, din, dout)?;
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
            be.add_bias(yp, bias_a, t, dout)?;
        }
    }
    Ok(y)
}

impl Cuda {
    /// `y[t, :] += bias` in one pass (the expand epilogue with rank 0).
    pub(crate) fn add_bias(&self, y: u64, bias: Arg, t: usize, dout: usize) -> Result<()> {
        let lr = LowRank {
            a: 0,
            lda: 0,
            ascale: 0,
            b: 0,
            ldb: 0,
            dscale: 0,
            bscale: 0,
            r: 0,
            s: 0.0,
        };
        self.expand(y, y, 0, 0, &lr, bias, Arg::P(0), Arg::P(0), t, dout)
    }
}

pub(super) fn linear_backward_input(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    w: &Tensor<Cuda>,
    acc: Option<&mut Tensor<Cuda>>,
) -> Result<Option<Tensor<Cuda>>> {
    let (t, dout) = dy.dims2("dy")?;
    let (wout, din) = w.dims2("w")?;
    if wout != dout {
        return Err(Error::shape("w", format!("[{dout}, in]"), w.shape()));
    }
    let (dyp, wp) = (be.ptr("dy", dy)?, be.ptr("w", w)?);
    match acc {
        Some(dx) => {
            dx.expect_shape("dx", &[t, din])?;
            let dxp = pu(be.wr("dx", dx)?);
            be.gemm_s(
                t,
                din,
                dout,
                1.0,
                Mat::n(dyp, dout),
                Mat::n(wp, din),
                1.0,
                dxp,
                din,
            )?;
            Ok(None)
        }
        None => {
            let dx = be.alloc(&[t, din])?;
            let dxp = be.ptr("dx", &dx)?;
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
            Ok(Some(dx))
        }
    }
}

pub(super) fn linear_backward_weight(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    dw: &mut Tensor<Cuda>,
) -> Result<()> {
    let (t, dout) = dy.dims2("dy")?;
    let (tx, din) = x.dims2("x")?;
    if tx != t {
        return Err(Error::shape("x", format!("[{t}, in]"), x.shape()));
    }
    dw.expect_shape("dw", &[dout, din])?;
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

// ---- LoRA ----------------------------------------------------------------------------------

pub(super) fn lora_forward(
    be: &Cuda,
    x: &Tensor<Cuda>,
    w0: &Tensor<Cuda>,
    bias: Option<&Tensor<Cuda>>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
    let (_, din, dout) = check::linear(x, w0)?;
    let r = check::lora(din, dout, a, b)?;
    if let Some(bias) = bias {
        check::vector("bias", bias, dout)?;
    }
    let lr = be.lora_term(a, b, r, s)?;
    be.adapter_forward(x, w0, bias, &lr)
}

/// The adapter part of the LoRA backward: `dx (+)= s g A` (beta 1 into `dx`), returns (dA, dB).
#[allow(clippy::too_many_arguments)]
fn lora_grads(
    be: &Cuda,
    dyp: u64,
    xp: u64,
    hp: u64,
    lr: &LowRank,
    dxp: u64,
    t: usize,
    din: usize,
    dout: usize,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
    let r = lr.r;
    let s = lr.s;
    // g = dy B [T, r]
    let g = be.alloc(&[t, r])?;
    let gp = be.ptr("g", &g)?;
    be.gemm_s(
        t,
        r,
        dout,
        1.0,
        Mat::n(dyp, dout),
        Mat::n(lr.b, r),
        0.0,
        gp,
        r,
    )?;
    be.gemm_s(
        t,
        din,
        r,
        s,
        Mat::n(gp, r),
        Mat::n(lr.a, din),
        1.0,
        dxp,
        din,
    )?;
    let da = be.alloc(&[r, din])?;
    let db = be.alloc(&[dout, r])?;
    let (dap, dbp) = (be.ptr("dA", &da)?, be.ptr("dB", &db)?);
    be.gemm_s(r, din, t, s, Mat::t(gp, r), Mat::n(xp, din), 0.0, dap, din)?;
    be.gemm_s(dout, r, t, s, Mat::t(dyp, dout), Mat::n(hp, r), 0.0, dbp, r)?;
    Ok((da, db))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn lora_backward(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    h: &Tensor<Cuda>,
    w0: &Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>, Tensor<Cuda>)> {
    let (t, din, dout) = check::linear(x, w0)?;
    let r = check::lora(din, dout, a, b)?;
    dy.expect_shape("dy", &[t, dout])?;
    h.expect_shape("h", &[t, r])?;
    let lr = be.lora_term(a, b, r, s)?;
    let dx = be.alloc(&[t, din])?;
    let (dyp, wp, dxp) = (be.ptr("dy", dy)?, be.ptr("w0", w0)?, be.ptr("dx", &dx)?);
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
    let (da, db) = lora_grads(
        be,
        dyp,
        be.ptr("x", x)?,
        be.ptr("h", h)?,
        &lr,
        dxp,
        t,
        din,
        dout,
    )?;
    Ok((dx, da, db))
}

pub(super) fn lora_merge(
    be: &Cuda,
    w: &mut Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
    sign: f32,
) -> Result<()> {
    let (dout, din) = w.dims2("w")?;
    let r = check::lora(din, dout, a, b)?;
    let lr = be.lora_term(a, b, r, s)?;
    be.merge(w, &lr, Arg::P(0), Arg::P(0), 0, sign * s)
}

pub(super) fn lora_add(
    be: &Cuda,
    y: &mut Tensor<Cuda>,
    x: &Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
) -> Result<Tensor<Cuda>> {
    let (t, _, dout, r) = check::adapter(x, a, b, "y", y)?;
    let lr = be.lora_term(a, b, r, s)?;
    let h = be.shrink(x, &lr)?;
    let hp = be.ptr("h", &h)?;
    let yp = pu(be.wr("y", y)?);
    be.expand(yp, yp, 0, hp, &lr, Arg::P(0), Arg::P(0), Arg::P(0), t, dout)?;
    Ok(h)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn lora_backward_adapter(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    h: &Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
    dx: &mut Tensor<Cuda>,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
    let (t, din, dout, r) = check::adapter(x, a, b, "dy", dy)?;
    h.expect_shape("h", &[t, r])?;
    dx.expect_shape("dx", &[t, din])?;
    let lr = be.lora_term(a, b, r, s)?;
    let dxp = pu(be.wr("dx", dx)?);
    lora_grads(
        be,
        be.ptr("dy", dy)?,
        be.ptr("x", x)?,
        be.ptr("h", h)?,
        &lr,
        dxp,
        t,
        din,
        dout,
    )
}

// ---- DoRA ----------------------------------------------------------------------------------

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

/// Shape check of two same-shaped operands (re-exported for ops).
pub(super) fn same(name: &str, a: &Tensor<Cuda>, b: &Tensor<Cuda>) -> Result<()> {
    same_shape(name, a, b)
}
