//! The fused low-rank product on CUDA (`crate::backend::lowrank`), the same formula for every
//! method and base: `y = c ⊙ (x W^T + s o ⊙ (((x A^T) ⊙ ρ) B^T)) + bias` over a dense or NF4
//! W, with `h = x A^T` (before ρ) kept for the backward, and `z` before `c` under a column scale.
//! The CPU reference is `backend/cpu/lowrank.rs`; the scales absent from a term are null
//! pointers, which every kernel reads as 1.
//!
//! * Forward: `h` by `shrink_small` (`T <= 8`) or cuBLAS; then, for `T <= 8` without a column
//!   scale, one kernel that reads W once and adds bias and term (`linear_decode`, or `nf4_gemv`
//!   for an NF4 base and a term without rank or out scale); otherwise the base product (cuBLAS,
//!   or NF4 tiles, `dense::base_product`) and `adapter_expand`, one pass over y adding the term,
//!   the column scale (saving z) and the bias.
//! * Input gradient: `g' = dy ⊙ c` (`adapter_expand` with rank 0), `dx = g' W` (cuBLAS or NF4
//!   tiles), `g = g' (diag(o) B)` and `dx += s g (diag(ρ) A)` (cuBLAS, the factors scaled by
//!   `scale_rows`).
//! * Parameter gradients: `P = dy^T h` and `M = g^T x` by cuBLAS (in f32 when a scale follows,
//!   scaled and rounded once by `scale_rc_from_f32`, else straight into storage); `dρ` and `do`
//!   in one launch of `lowrank_scale_grads`; `dm` in one pass over dy and z (`dora_bwd_scale`).
//! * Merges: one in-place pass over W (`lowrank_merge`, modes for the column scale).
//! * Weight norm by the low-rank identity: `W A^T` (cuBLAS or NF4 tiles), `A A^T`, `B' G` in f32
//!   with `B' = diag(o) B diag(ρ)` (`scale_rc_to_f32`), finished by `dora_norm_finish` in f64.

use super::blas::Mat;
use super::dense::{DECODE_MAX_T, DecodeTerm, base_backward_into, base_product, linear_decode};
use super::nf4::{self, GemvTerm};
use super::{Arg, Cuda, DType, blocks, memory, pu};
use crate::backend::{Base, GradWants, LowRank, LowRankOut, ParamGrads, Tensor};
use crate::error::{Error, Result};

/// A term in device pointers (0 for an absent scale): `A = lora_a[:, :in]` with row stride
/// `lda`, `B = lora_b[:out, :]` with row stride r, `rank` = ρ, `out` = o, the column scale
/// `mag / norm`.
#[derive(Clone, Copy)]
struct Term {
    a: u64,
    lda: usize,
    b: u64,
    rank: u64,
    out: u64,
    mag: u64,
    norm: u64,
    r: usize,
    s: f32,
}

impl Term {
    fn new(be: &Cuda, term: &LowRank<'_, Cuda>) -> Result<Term> {
        let (mag, norm) = match &term.col_scale {
            Some(c) => {
                // `Backend` hands a column scale to a kernel with its norm; this only keeps a
                // direct call from reading a null pointer on the device.
                let n = c.weight_norm.ok_or_else(|| {
                    super::berr("a column scale reached a kernel without its norm")
                })?;
                (
                    be.ptr("lora_magnitude_vector", c.magnitude)?,
                    be.ptr("weight_norm", n)?,
                )
            }
            None => (0, 0),
        };
        Ok(Term {
            a: be.ptr("lora_A", term.lora_a)?,
            lda: term.lora_a.dim(1),
            b: be.ptr("lora_B", term.lora_b)?,
            rank: be.opt_ptr("rank_scale", term.rank_scale)?,
            out: be.opt_ptr("out_scale", term.out_scale)?,
            mag,
            norm,
            r: term.r(),
            s: term.scale,
        })
    }

    fn col(&self) -> bool {
        self.mag != 0
    }
}

/// `h = x A^T` `[t, r]`: `shrink_small` for `t <= 8` (one warp per rank), else cuBLAS.
fn shrink(be: &Cuda, x: &Tensor<Cuda>, lr: &Term) -> Result<Tensor<Cuda>> {
    let (t, din) = (x.dim(0), x.dim(1));
    let h = be.alloc(&[t, lr.r])?;
    let (xp, hp) = (be.ptr("x", x)?, be.ptr("h", &h)?);
    if t <= DECODE_MAX_T {
        be.launch(
            "lora",
            "shrink_small",
            (blocks(lr.r, 4), 1, 1),
            (128, 1, 1),
            0,
            &[
                Arg::P(xp),
                Arg::P(lr.a),
                Arg::I(lr.lda as i32),
                Arg::P(0),
                Arg::P(hp),
                Arg::I(t as i32),
                Arg::I(din as i32),
                Arg::I(lr.r as i32),
            ],
        )?;
    } else {
        be.gemm_s(
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

/// `adapter_expand`: `y = c ⊙ z + bias`, `z = base + s o ⊙ ((ρ ⊙ h) B^T)` (z stored when
/// `z != 0`; base may alias y or z), y `[t, dout]`.
#[allow(clippy::too_many_arguments)]
fn expand(
    be: &Cuda,
    base: u64,
    y: u64,
    z: u64,
    h: u64,
    lr: &Term,
    bias: u64,
    t: usize,
    dout: usize,
) -> Result<()> {
    be.launch(
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
            Arg::I(lr.r as i32),
            Arg::P(bias),
            Arg::P(lr.rank),
            Arg::P(lr.out),
            Arg::P(lr.mag),
            Arg::P(lr.norm),
            Arg::I(t as i32),
            Arg::I(dout as i32),
            Arg::I(lr.r as i32),
            Arg::F(lr.s),
        ],
    )
}

/// `dy ⊙ c` `[t, dout]` under the column scale (`adapter_expand` with rank 0).
fn col_scaled(be: &Cuda, dy: &Tensor<Cuda>, lr: &Term) -> Result<Tensor<Cuda>> {
    let (t, dout) = (dy.dim(0), dy.dim(1));
    let gk = be.alloc(&[t, dout])?;
    let bare = Term {
        b: 0,
        rank: 0,
        out: 0,
        r: 0,
        s: 0.0,
        ..*lr
    };
    expand(
        be,
        be.ptr("dy", dy)?,
        be.ptr("g'", &gk)?,
        0,
        0,
        &bare,
        0,
        t,
        dout,
    )?;
    Ok(gk)
}

/// `scale_rows`: `dst [rows, cols] = src[o, :cols] * scale[o]` (src row stride `lds`).
fn scale_rows(
    be: &Cuda,
    src: u64,
    lds: usize,
    scale: u64,
    rows: usize,
    cols: usize,
) -> Result<Tensor<Cuda>> {
    let dst = be.alloc(&[rows, cols])?;
    be.launch(
        "lora",
        "scale_rows",
        (blocks(rows * cols, 256), 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::P(src),
            Arg::I(lds as i32),
            Arg::P(scale),
            Arg::P(be.ptr("dst", &dst)?),
            Arg::I(rows as i32),
            Arg::I(cols as i32),
        ],
    )?;
    Ok(dst)
}

/// The row and column scales of `scale_rc_*`: `rs[o] (mag[o] / norm[o])` per row, `cs[j]` per
/// column (0 = none).
#[derive(Clone, Copy)]
struct Rc {
    rs: u64,
    mag: u64,
    norm: u64,
    cs: u64,
}

/// `scale_rc_{from,to}_f32`: `dst [rows, cols] = s src[o, :cols] rs[o] (mag[o] / norm[o])
/// cs[j]`, src row stride `lds`; `from_f32`: f32 src into storage, else storage into f32.
#[allow(clippy::too_many_arguments)]
fn scale_rc(
    be: &Cuda,
    from_f32: bool,
    src: u64,
    lds: usize,
    rows: usize,
    cols: usize,
    sc: Rc,
    s: f32,
) -> Result<Tensor<Cuda>> {
    let (name, dst) = if from_f32 {
        ("scale_rc_from_f32", be.alloc(&[rows, cols])?)
    } else {
        (
            "scale_rc_to_f32",
            be.alloc_typed(&[rows, cols], DType::F32)?,
        )
    };
    let dp = pu(if from_f32 {
        be.rd("dst", &dst)?
    } else {
        be.rd_f32("dst", &dst)?
    });
    be.launch(
        "lora",
        name,
        (blocks(rows * cols, 256), 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::P(src),
            Arg::I(lds as i32),
            Arg::P(dp),
            Arg::I(rows as i32),
            Arg::I(cols as i32),
            Arg::P(sc.rs),
            Arg::P(sc.mag),
            Arg::P(sc.norm),
            Arg::P(sc.cs),
            Arg::F(s),
        ],
    )?;
    Ok(dst)
}

pub(super) fn forward(
    be: &Cuda,
    x: &Tensor<Cuda>,
    base: Base<'_, Cuda>,
    bias: Option<&Tensor<Cuda>>,
    term: Option<&LowRank<'_, Cuda>>,
) -> Result<LowRankOut<Cuda>> {
    // A bf16 base is a frozen dense tensor here: the dense kernels (and their decode path) take it.
    let base = match base {
        Base::Bf16(w) => Base::Dense(&w.buf),
        b => b,
    };
    let Some(term) = term else {
        return Ok(LowRankOut {
            y: base_product(be, x, base, bias)?,
            h: None,
            z: None,
            weight_norm: None,
        });
    };
    let (t, din, dout) = (x.dim(0), x.dim(1), base.dims().0);
    let lr = Term::new(be, term)?;
    let h = shrink(be, x, &lr)?;
    let (hp, bp) = (be.ptr("h", &h)?, be.opt_ptr("bias", bias)?);
    if lr.col() {
        // z = x W^T + u (no bias), y = c ⊙ z + bias: the base product into z, then one pass.
        let z = base_product(be, x, base, None)?;
        let y = be.alloc(&[t, dout])?;
        let zp = be.ptr("z", &z)?;
        expand(be, zp, be.ptr("y", &y)?, zp, hp, &lr, bp, t, dout)?;
        return Ok(LowRankOut {
            y,
            h: Some(h),
            z: Some(z),
            weight_norm: None,
        });
    }
    let decode = t <= DECODE_MAX_T;
    let y = match base {
        Base::Dense(w) if decode => {
            let y = be.alloc(&[t, dout])?;
            let dt = DecodeTerm {
                h: hp,
                b: lr.b,
                ldb: lr.r,
                dscale: lr.rank,
                bscale: lr.out,
                r: lr.r,
                s: lr.s,
            };
            let (xp, wp, yp) = (be.ptr("x", x)?, be.ptr("w", w)?, be.ptr("y", &y)?);
            linear_decode(be, xp, wp, bp, yp, Some(&dt), t, din, dout)?;
            y
        }
        Base::Nf4(w) if decode && lr.rank == 0 && lr.out == 0 => {
            let y = be.alloc(&[t, dout])?;
            let gt = GemvTerm {
                h: &h,
                b: term.lora_b,
                r: lr.r,
                s: lr.s,
            };
            nf4::gemv(be, x, w, bias, &y, Some(&gt))?;
            y
        }
        _ => {
            let y = base_product(be, x, base, None)?;
            let yp = be.ptr("y", &y)?;
            expand(be, yp, yp, 0, hp, &lr, bp, t, dout)?;
            y
        }
    };
    Ok(LowRankOut {
        y,
        h: Some(h),
        z: None,
        weight_norm: None,
    })
}

/// `(dx, g)` of [`backward_input`]: dx `None` when added into an accumulator; g with a term.
type InputGrads = (Option<Tensor<Cuda>>, Option<Tensor<Cuda>>);

/// `(dx, g)`: `dx (+)= g' W + s ((g ⊙ ρ) A)` with `g' = dy ⊙ c` and `g = g' (diag(o) B)`.
pub(super) fn backward_input(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    base: Base<'_, Cuda>,
    term: Option<&LowRank<'_, Cuda>>,
    acc: Option<&mut Tensor<Cuda>>,
) -> Result<InputGrads> {
    let (t, dout, din) = (dy.dim(0), dy.dim(1), base.dims().1);
    let lr = term.map(|tm| Term::new(be, tm)).transpose()?;
    // The base part, on dy ⊙ c under a column scale.
    let gk = match &lr {
        Some(lr) if lr.col() => Some(col_scaled(be, dy, lr)?),
        _ => None,
    };
    let gkp = be.ptr("dy", gk.as_ref().unwrap_or(dy))?;
    let (fresh, dxp) = match acc {
        Some(a) => (None, pu(be.wr("acc", a)?)),
        None => {
            let d = be.alloc(&[t, din])?;
            let p = be.ptr("dx", &d)?;
            (Some(d), p)
        }
    };
    let beta = if fresh.is_some() { 0.0 } else { 1.0 };
    base_backward_into(be, gkp, t, base, dxp, beta)?;
    let Some(lr) = lr else {
        return Ok((fresh, None));
    };
    let r = lr.r;
    // g = g' (diag(o) B) [t, r].
    let bo = match lr.out {
        0 => None,
        o => Some(scale_rows(be, lr.b, r, o, dout, r)?),
    };
    let bop = match &bo {
        Some(b) => be.ptr("o ⊙ B", b)?,
        None => lr.b,
    };
    let g = be.alloc(&[t, r])?;
    let gp = be.ptr("g", &g)?;
    be.gemm_s(
        t,
        r,
        dout,
        1.0,
        Mat::n(gkp, dout),
        Mat::n(bop, r),
        0.0,
        gp,
        r,
    )?;
    // dx += s (g ⊙ ρ) A = s g (diag(ρ) A).
    let ar = match lr.rank {
        0 => None,
        rho => Some(scale_rows(be, lr.a, lr.lda, rho, r, din)?),
    };
    let (ap, lda) = match &ar {
        Some(a) => (be.ptr("ρ ⊙ A", a)?, din),
        None => (lr.a, lr.lda),
    };
    be.gemm_s(
        t,
        din,
        r,
        lr.s,
        Mat::n(gp, r),
        Mat::n(ap, lda),
        1.0,
        dxp,
        din,
    )?;
    Ok((fresh, Some(g)))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn grads(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    h: &Tensor<Cuda>,
    z: Option<&Tensor<Cuda>>,
    g: &Tensor<Cuda>,
    term: &LowRank<'_, Cuda>,
    wants: GradWants,
) -> Result<ParamGrads<Cuda>> {
    let (t, din, dout) = (x.dim(0), x.dim(1), dy.dim(1));
    let lr = Term::new(be, term)?;
    let (r, s) = (lr.r, lr.s);
    let (dyp, xp, hp, gp) = (
        be.ptr("dy", dy)?,
        be.ptr("x", x)?,
        be.ptr("h", h)?,
        be.ptr("g", g)?,
    );
    let mut out = ParamGrads {
        d_lora_a: None,
        d_lora_b: None,
        d_rank_scale: None,
        d_out_scale: None,
        d_magnitude: None,
    };
    // P = dy^T h [out, r]: dB = s diag(c ⊙ o) P diag(ρ), do = s c ⊙ rowdot(P diag(ρ), B).
    let plain = lr.rank == 0 && lr.out == 0 && !lr.col();
    if wants.lora_b && plain {
        // LoRA: dB = s dy^T h, straight into storage.
        let db = be.alloc(&[dout, r])?;
        be.gemm_s(
            dout,
            r,
            t,
            s,
            Mat::t(dyp, dout),
            Mat::n(hp, r),
            0.0,
            be.ptr("dB", &db)?,
            r,
        )?;
        out.d_lora_b = Some(db);
    }
    let p = if (wants.lora_b && !plain) || wants.out_scale {
        let p = be.alloc_typed(&[dout, r], DType::F32)?;
        let pp = be.ptr_f32("P", &p)?;
        be.gemm(
            dout,
            r,
            t,
            1.0,
            Mat::t(dyp, dout),
            Mat::n(hp, r),
            0.0,
            pp,
            r,
            be.dtype,
            DType::F32,
        )?;
        if wants.lora_b {
            let sc = Rc {
                rs: lr.out,
                mag: lr.mag,
                norm: lr.norm,
                cs: lr.rank,
            };
            out.d_lora_b = Some(scale_rc(be, true, pp, r, dout, r, sc, s)?);
        }
        Some(p)
    } else {
        None
    };
    // dA = s diag(ρ) (g^T x) [r, in].
    if wants.lora_a {
        if lr.rank == 0 {
            let da = be.alloc(&[r, din])?;
            be.gemm_s(
                r,
                din,
                t,
                s,
                Mat::t(gp, r),
                Mat::n(xp, din),
                0.0,
                be.ptr("dA", &da)?,
                din,
            )?;
            out.d_lora_a = Some(da);
        } else {
            let m = be.alloc_typed(&[r, din], DType::F32)?;
            let mp = be.ptr_f32("M", &m)?;
            be.gemm(
                r,
                din,
                t,
                1.0,
                Mat::t(gp, r),
                Mat::n(xp, din),
                0.0,
                mp,
                din,
                be.dtype,
                DType::F32,
            )?;
            let sc = Rc {
                rs: lr.rank,
                mag: 0,
                norm: 0,
                cs: 0,
            };
            out.d_lora_a = Some(scale_rc(be, true, mp, din, r, din, sc, s)?);
        }
    }
    // dρ = s sum_T(g ⊙ h) (shaped like ρ) and do, in f64, one launch.
    if wants.rank_scale || wants.out_scale {
        let d_rank = match wants.rank_scale {
            true => Some(be.alloc(&term.rank_scale.map_or(vec![r], |t| t.shape().to_vec()))?),
            false => None,
        };
        let d_out = match wants.out_scale {
            true => Some(be.alloc(&[dout])?),
            false => None,
        };
        let nr = if d_rank.is_some() { r } else { 0 };
        let nout = if d_out.is_some() {
            blocks(dout, 256)
        } else {
            0
        };
        let pp = match &p {
            Some(p) => be.ptr_f32("P", p)?,
            None => 0,
        };
        be.launch(
            "vera",
            "lowrank_scale_grads",
            (nr as u32 + nout, 1, 1),
            (256, 1, 1),
            0,
            &[
                Arg::P(gp),
                Arg::P(hp),
                Arg::I(t as i32),
                Arg::I(r as i32),
                Arg::P(pp),
                Arg::P(lr.b),
                Arg::P(lr.rank),
                Arg::P(lr.mag),
                Arg::P(lr.norm),
                Arg::I(dout as i32),
                be.opt("d_rank_scale", d_rank.as_ref())?,
                be.opt("d_out_scale", d_out.as_ref())?,
                Arg::F(s),
            ],
        )?;
        out.d_rank_scale = d_rank;
        out.d_out_scale = d_out;
    }
    // dm = sum_T(dy ⊙ z) / n, in f64.
    if wants.magnitude {
        let Some(z) = z.filter(|_| lr.col()) else {
            return Err(Error::arg(
                "z",
                "the magnitude's gradient needs z and the column scale",
            ));
        };
        let acc = be.scratch_f64(dout)?;
        let accp = be.slice_ptr(&acc);
        be.launch(
            "dora",
            "dora_bwd_scale",
            (blocks(dout, 32), blocks(t, 64), 1),
            (32, 8, 1),
            0,
            &[
                Arg::P(dyp),
                be.rd("z", z)?,
                Arg::P(lr.mag),
                Arg::P(lr.norm),
                Arg::P(0),
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
                Arg::P(lr.norm),
                be.rd("dm", &dm)?,
                Arg::I(dout as i32),
            ],
        )?;
        out.d_magnitude = Some(dm);
    }
    Ok(out)
}

/// In place `W += sign s ΔW` (`lowrank_merge`, one pass over W); under a column scale
/// `W = c ⊙ (W + s ΔW)` or its inverse `W = W / c - s ΔW`, which first reads `m` and `n`
/// back to refuse a `c` that is 0 or not finite (as the CPU, in f32).
pub(super) fn merge(
    be: &Cuda,
    w: &mut Tensor<Cuda>,
    term: &LowRank<'_, Cuda>,
    sign: f32,
) -> Result<()> {
    let (dout, din) = (w.dim(0), w.dim(1));
    let lr = Term::new(be, term)?;
    if sign < 0.0
        && let Some(c) = &term.col_scale
        && let Some(n) = c.weight_norm
    {
        let (m, n) = (memory::download(be, c.magnitude)?, memory::download(be, n)?);
        let k: Vec<f32> = m.iter().zip(&n).map(|(m, n)| m / n).collect();
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
    let mode = match (lr.col(), sign > 0.0) {
        (false, _) => 0,
        (true, true) => 1,
        (true, false) => 2,
    };
    let wp = pu(be.wr("w", w)?);
    be.launch(
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
            Arg::I(lr.r as i32),
            Arg::I(lr.r as i32),
            Arg::P(lr.rank),
            Arg::P(lr.out),
            Arg::P(lr.mag),
            Arg::P(lr.norm),
            Arg::I(mode),
            Arg::F(sign * lr.s),
        ],
    )
}

/// `||W + ΔW||_row` of a term without column scale, by the low-rank identity
/// `n^2 = ||W||^2 + 2 s rowdot(W A^T, B') + s^2 rowdot(B' (A A^T), B')`,
/// `B' = diag(o) B diag(ρ)`: the products in f32, the rows finished in f64.
pub(super) fn row_norms(
    be: &Cuda,
    base: Base<'_, Cuda>,
    base_row_sq: &Tensor<Cuda>,
    term: &LowRank<'_, Cuda>,
) -> Result<Tensor<Cuda>> {
    let (dout, din) = base.dims();
    let lr = Term::new(be, term)?;
    let r = lr.r;
    // P = W A^T [out, r] (f32): W's one pass.
    let dense_p = |w: &Tensor<Cuda>| -> Result<Tensor<Cuda>> {
        let p = be.alloc_typed(&[dout, r], DType::F32)?;
        be.gemm(
            dout,
            r,
            din,
            1.0,
            Mat::n(be.ptr("w", w)?, din),
            Mat::t(lr.a, lr.lda),
            0.0,
            be.ptr_f32("P", &p)?,
            r,
            be.dtype,
            DType::F32,
        )?;
        Ok(p)
    };
    let p = match base {
        Base::Dense(w) => dense_p(w)?,
        Base::Bf16(w) => dense_p(&w.buf)?,
        Base::Nf4(w) => nf4::project_f32(be, w, lr.a, lr.lda, r)?,
    };
    // G = A A^T [r, r], B' [out, r], Q = B' G [out, r], all f32.
    let g = be.alloc_typed(&[r, r], DType::F32)?;
    let gp = be.ptr_f32("G", &g)?;
    be.gemm(
        r,
        r,
        din,
        1.0,
        Mat::n(lr.a, lr.lda),
        Mat::t(lr.a, lr.lda),
        0.0,
        gp,
        r,
        be.dtype,
        DType::F32,
    )?;
    let sc = Rc {
        rs: lr.out,
        mag: 0,
        norm: 0,
        cs: lr.rank,
    };
    let bf = scale_rc(be, false, lr.b, r, dout, r, sc, 1.0)?;
    let bfp = be.ptr_f32("B'", &bf)?;
    let q = be.alloc_typed(&[dout, r], DType::F32)?;
    let qp = be.ptr_f32("Q", &q)?;
    be.gemm(
        dout,
        r,
        r,
        1.0,
        Mat::n(bfp, r),
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
            Arg::P(be.ptr_f32("P", &p)?),
            Arg::P(qp),
            Arg::P(bfp),
            be.rd("base_row_sq", base_row_sq)?,
            be.rd("n", &n)?,
            Arg::I(dout as i32),
            Arg::I(r as i32),
            Arg::F(lr.s),
        ],
    )?;
    Ok(n)
}
