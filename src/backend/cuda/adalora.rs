//! AdaLoRA's rank allocator and orthogonal regularizer on CUDA (the allocator kernels of
//! `kernels/adalora.cu`): the EMA update rounds each operation as torch's f32 ops, the triplet
//! scores and the regularizer's norms sum in f64 (as the CPU reference), `torch.kthvalue` counts
//! ranks in shared-memory tiles, and the Gram products `A A^T`, `B^T B`, `G' A`, `B G'` go
//! through cuBLAS. Nothing is read back.

use super::blas::Mat;
use super::{Arg, Cuda, DType, blocks, pu};
use crate::backend::check::EmaCoefs;
use crate::backend::{AdaLoraIpt, Tensor};
use crate::error::{Error, Result};

/// Kernels index with 32-bit ints: errors when `n` does not fit (the device's limit, not an
/// argument contract).
fn int(what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::arg(what, format!("{n} exceeds 2^31 - 1")))
}

pub(super) fn update_ipt(
    be: &Cuda,
    param: &Tensor<Cuda>,
    grad: &Tensor<Cuda>,
    ipt: &mut Tensor<Cuda>,
    unc: &mut Tensor<Cuda>,
    c: &EmaCoefs,
) -> Result<()> {
    let n = param.len();
    let (pp, gp) = (be.rd("param", param)?, be.rd("grad", grad)?);
    let ip = be.wr("exp_avg_ipt", ipt)?;
    let up = be.wr("exp_avg_unc", unc)?;
    be.launch(
        "adalora",
        "adalora_update_ipt",
        (blocks(n, 256).clamp(1, 4096), 1, 1),
        (256, 1, 1),
        0,
        &[
            pp,
            gp,
            ip,
            up,
            Arg::L(n as i64),
            Arg::F(c.b1),
            Arg::F(c.one_minus_b1),
            Arg::F(c.b2),
            Arg::F(c.one_minus_b2),
        ],
    )
}

pub(super) fn triplet_scores(
    be: &Cuda,
    ema: &AdaLoraIpt<Cuda>,
    scores: &mut Tensor<Cuda>,
    offset: usize,
) -> Result<()> {
    let (r, din, dout) = (ema.ipt_a.dim(0), ema.ipt_a.dim(1), ema.ipt_b.dim(0));
    let args = [
        be.rd("exp_avg_ipt[lora_A]", &ema.ipt_a)?,
        be.rd("exp_avg_unc[lora_A]", &ema.unc_a)?,
        be.rd("exp_avg_ipt[lora_B]", &ema.ipt_b)?,
        be.rd("exp_avg_unc[lora_B]", &ema.unc_b)?,
        be.rd("exp_avg_ipt[lora_E]", &ema.ipt_e)?,
        be.rd("exp_avg_unc[lora_E]", &ema.unc_e)?,
        be.wr("scores", scores)?,
        Arg::I(int("offset", offset)?),
        Arg::I(int("r", r)?),
        Arg::I(int("in", din)?),
        Arg::I(int("out", dout)?),
    ];
    be.launch(
        "adalora",
        "adalora_triplet_scores",
        (r as u32, 1, 1),
        (256, 1, 1),
        0,
        &args,
    )
}

pub(super) fn threshold(be: &Cuda, scores: &Tensor<Cuda>, k: usize) -> Result<Tensor<Cuda>> {
    let n = scores.dim(0);
    let out = be.alloc(&[1])?;
    be.launch(
        "adalora",
        "adalora_kthvalue",
        (blocks(n, 256), 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("scores", scores)?,
            Arg::I(int("scores", n)?),
            Arg::I(int("k", k)?),
            be.rd("threshold", &out)?,
        ],
    )?;
    Ok(out)
}

pub(super) fn rank_mask(
    be: &Cuda,
    scores: &Tensor<Cuda>,
    threshold: &Tensor<Cuda>,
) -> Result<Tensor<Cuda>> {
    let n = scores.dim(0);
    let keep = be.alloc(&[n])?;
    be.launch(
        "adalora",
        "adalora_rank_mask",
        (blocks(n, 256), 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("scores", scores)?,
            be.rd("threshold", threshold)?,
            be.rd("keep", &keep)?,
            Arg::I(int("scores", n)?),
        ],
    )?;
    Ok(keep)
}

pub(super) fn apply_mask(
    be: &Cuda,
    lora_e: &mut Tensor<Cuda>,
    keep: &Tensor<Cuda>,
    offset: usize,
) -> Result<()> {
    let r = lora_e.dim(0);
    let kp = be.rd("keep", keep)?;
    let ep = be.wr("lora_E", lora_e)?;
    be.launch(
        "adalora",
        "adalora_apply_mask",
        (blocks(r, 256), 1, 1),
        (256, 1, 1),
        0,
        &[ep, kp, Arg::I(int("offset", offset)?), Arg::I(int("r", r)?)],
    )
}

pub(super) fn orth_reg(
    be: &Cuda,
    factors: &[(&Tensor<Cuda>, &Tensor<Cuda>)],
    grads: &mut [(&mut Tensor<Cuda>, &mut Tensor<Cuda>)],
    orth_reg_weight: f32,
) -> Result<Tensor<Cuda>> {
    let loss = be.alloc(&[1])?;
    if factors.is_empty() {
        return Ok(loss);
    }
    // PEFT averages over the lora_A and lora_B parameters: w = weight / (2 n_layers).
    let n_params = 2 * factors.len();
    let coef = (2.0 * orth_reg_weight as f64 / n_params as f64) as f32;
    let norms = be.alloc_typed(&[n_params], DType::F32)?;
    let np = pu(be.rd_f32("norms", &norms)?);
    // G [r, r] minus I, its norm into norms[slot], then scaled by 2 w / norm.
    let gram = |g: &Tensor<Cuda>, r: usize, slot: usize| -> Result<()> {
        be.launch(
            "adalora",
            "adalora_orth_gram",
            (1, 1, 1),
            (256, 1, 1),
            0,
            &[
                be.rd("Gram matrix", g)?,
                Arg::I(int("r", r)?),
                Arg::F(coef),
                Arg::P(np),
                Arg::I(int("norms", slot)?),
            ],
        )
    };
    for (l, (&(a, b), (ga, gb))) in factors.iter().zip(grads.iter_mut()).enumerate() {
        let (r, din, dout) = (a.dim(0), a.dim(1), b.dim(0));
        let (ap, bp) = (be.ptr("lora_A", a)?, be.ptr("lora_B", b)?);
        // ||A A^T - I||: G = A A^T; grad_A += G' A.
        let g = be.alloc(&[r, r])?;
        let gp = be.ptr("G", &g)?;
        be.gemm_s(r, r, din, 1.0, Mat::n(ap, din), Mat::t(ap, din), 0.0, gp, r)?;
        gram(&g, r, 2 * l)?;
        let gap = pu(be.wr("grad_A", ga)?);
        be.gemm_s(
            r,
            din,
            r,
            1.0,
            Mat::n(gp, r),
            Mat::n(ap, din),
            1.0,
            gap,
            din,
        )?;
        // ||B^T B - I||: G = B^T B; grad_B += B G' (G' is symmetric).
        let g = be.alloc(&[r, r])?;
        let gp = be.ptr("G", &g)?;
        be.gemm_s(r, r, dout, 1.0, Mat::t(bp, r), Mat::n(bp, r), 0.0, gp, r)?;
        gram(&g, r, 2 * l + 1)?;
        let gbp = pu(be.wr("grad_B", gb)?);
        be.gemm_s(dout, r, r, 1.0, Mat::n(bp, r), Mat::n(gp, r), 1.0, gbp, r)?;
    }
    be.launch(
        "adalora",
        "adalora_orth_total",
        (1, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::P(np),
            Arg::I(int("norms", n_params)?),
            Arg::F(orth_reg_weight),
            be.rd("loss", &loss)?,
        ],
    )?;
    Ok(loss)
}
