//! Dense linear algebra and LoRA on CUDA, and the low-rank machinery that DoRA, VeRA and AdaLoRA
//! reuse (dora.rs, adalora_vera.rs).
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
use super::{Arg, Cuda, blocks};
use crate::backend::{Tensor, check, same_shape};
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
    pub(super) fn adapter_forward(
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
    pub(super) fn merge(
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

    pub(super) fn lora_term(
        &self,
        a: &Tensor<Cuda>,
        b: &Tensor<Cuda>,
        r: usize,
        s: f32,
    ) -> Result<LowRank> {
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
pub(super) fn lora_grads(
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

/// Shape check of two same-shaped operands (re-exported for ops).
pub(super) fn same(name: &str, a: &Tensor<Cuda>, b: &Tensor<Cuda>) -> Result<()> {
    same_shape(name, a, b)
}
