//! Model and optimizer ops of the CUDA backend: embedding gather/scatter, RMSNorm, RoPE,
//! attention, SwiGLU, cross-entropy, AdamW and the elementwise helpers.

use super::adapters::{pu, same};
use super::{Arg, Cuda, DType, blocks};
use crate::backend::{AdamWParams, AttentionSaved, SeqSpan, Tensor, check};
use crate::error::{Error, Result};

/// Grid of a grid-stride elementwise kernel over `n` elements (block 256).
fn grid(n: usize) -> u32 {
    blocks(n, 256).clamp(1, 4096)
}

fn idx_i32(idx: &[u32]) -> Vec<i32> {
    idx.iter().map(|&i| i as i32).collect()
}

pub(super) fn gather_rows(be: &Cuda, t: &Tensor<Cuda>, idx: &[u32]) -> Result<Tensor<Cuda>> {
    let (n, d) = t.dims2("table")?;
    check::row_indices(idx, n)?;
    let out = be.alloc(&[idx.len(), d])?;
    let di = be.upload_i32(&idx_i32(idx))?;
    be.launch(
        "model",
        "gather_rows",
        (blocks(idx.len() * d, 256), 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("table", t)?,
            Arg::P(be.slice_ptr(&di)),
            be.rd("out", &out)?,
            Arg::I(idx.len() as i32),
            Arg::I(d as i32),
        ],
    )?;
    Ok(out)
}

pub(super) fn scatter_add_rows(
    be: &Cuda,
    dst: &mut Tensor<Cuda>,
    idx: &[u32],
    src: &Tensor<Cuda>,
) -> Result<()> {
    let (n, d) = dst.dims2("dst")?;
    src.expect_shape("src", &[idx.len(), d])?;
    check::row_indices(idx, n)?;
    let di = be.upload_i32(&idx_i32(idx))?;
    let dp = be.wr("dst", dst)?;
    be.launch(
        "model",
        "scatter_add_rows",
        (blocks(idx.len() * d, 256), 1, 1),
        (256, 1, 1),
        0,
        &[
            dp,
            Arg::P(be.slice_ptr(&di)),
            be.rd("src", src)?,
            Arg::I(idx.len() as i32),
            Arg::I(d as i32),
        ],
    )
}

pub(super) fn axpy(be: &Cuda, a: &mut Tensor<Cuda>, alpha: f32, b: &Tensor<Cuda>) -> Result<()> {
    same("b", b, a)?;
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

pub(super) fn rmsnorm(
    be: &Cuda,
    x: &Tensor<Cuda>,
    w: &Tensor<Cuda>,
    eps: f32,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
    let (t, d) = x.dims2("x")?;
    w.expect_shape("weight", &[d])?;
    let y = be.alloc(&[t, d])?;
    let rstd = be.alloc_typed(&[t], DType::F32)?;
    be.launch(
        "model",
        "rmsnorm",
        (t as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("x", x)?,
            be.rd("weight", w)?,
            be.rd("y", &y)?,
            be.rd_f32("rstd", &rstd)?,
            Arg::I(d as i32),
            Arg::F(eps),
        ],
    )?;
    Ok((y, rstd))
}

pub(super) fn rmsnorm_backward(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    w: &Tensor<Cuda>,
    rstd: &Tensor<Cuda>,
    dweight: Option<&mut Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    let (t, d) = check::rmsnorm_backward(dy, x, w, rstd)?;
    let dx = be.alloc(&[t, d])?;
    be.launch(
        "model",
        "rmsnorm_bwd",
        (t as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("dy", dy)?,
            be.rd("x", x)?,
            be.rd("weight", w)?,
            be.rd_f32("rstd", rstd)?,
            be.rd("dx", &dx)?,
            Arg::I(d as i32),
        ],
    )?;
    if let Some(dw) = dweight {
        dw.expect_shape("dweight", &[d])?;
        let acc = be.alloc_typed(&[d], DType::F32)?;
        let accp = be.rd_f32("acc", &acc)?;
        be.launch(
            "model",
            "rmsnorm_dw",
            (blocks(d, 32), blocks(t, 64), 1),
            (32, 8, 1),
            0,
            &[
                be.rd("dy", dy)?,
                be.rd("x", x)?,
                be.rd_f32("rstd", rstd)?,
                accp,
                Arg::I(t as i32),
                Arg::I(d as i32),
            ],
        )?;
        let dwp = be.wr("dweight", dw)?;
        be.launch(
            "optim",
            "add_f32",
            (grid(d), 1, 1),
            (256, 1, 1),
            0,
            &[dwp, accp, Arg::L(d as i64)],
        )?;
    }
    Ok(dx)
}

pub(super) fn rope(
    be: &Cuda,
    x: &mut Tensor<Cuda>,
    positions: &[u32],
    head_dim: usize,
    theta: f32,
    inverse: bool,
) -> Result<()> {
    let (t, width) = x.dims2("x")?;
    check::rope(width, t, positions, head_dim)?;
    // transformers' inv_freq, in f32 exactly as the CPU reference computes it.
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let f = be.upload_f32(&inv_freq)?;
    let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
    let pd = be.upload_i32(&pos)?;
    let xp = be.wr("x", x)?;
    be.launch(
        "model",
        "rope",
        (blocks(t * width / 2, 256), 1, 1),
        (256, 1, 1),
        0,
        &[
            xp,
            Arg::P(be.slice_ptr(&pd)),
            Arg::P(be.slice_ptr(&f)),
            Arg::I(t as i32),
            Arg::I(width as i32),
            Arg::I(head_dim as i32),
            Arg::F(if inverse { -1.0 } else { 1.0 }),
        ],
    )
}

/// Keys per shared-memory tile for head dim `hd`. Errors: hd > 256.
fn att_kt(hd: usize) -> Result<usize> {
    match hd {
        0..=128 => Ok(32),
        129..=256 => Ok(16),
        _ => Err(Error::arg(
            "head_dim",
            format!("{hd}: the CUDA attention kernels support head dims up to 256"),
        )),
    }
}

/// Uploads the non-empty spans as (starts, lens); returns them with the longest length.
fn spans(
    be: &Cuda,
    seqs: &[SeqSpan],
) -> Result<(
    cudarc::driver::CudaSlice<i32>,
    cudarc::driver::CudaSlice<i32>,
    usize,
    usize,
)> {
    let live: Vec<&SeqSpan> = seqs.iter().filter(|s| s.len > 0).collect();
    let starts: Vec<i32> = live.iter().map(|s| s.start as i32).collect();
    let lens: Vec<i32> = live.iter().map(|s| s.len as i32).collect();
    let maxlen = live.iter().map(|s| s.len).max().unwrap_or(0);
    Ok((
        be.upload_i32(&starts)?,
        be.upload_i32(&lens)?,
        live.len(),
        maxlen,
    ))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    be: &Cuda,
    q: &Tensor<Cuda>,
    k: &Tensor<Cuda>,
    v: &Tensor<Cuda>,
    seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    scale: f32,
) -> Result<AttentionSaved<Cuda>> {
    let (t, hd, _) = check::attention(q, k, v, seqs, n_heads, n_kv_heads)?;
    let kt = att_kt(hd)?;
    let out = be.alloc(&[t, n_heads * hd])?;
    let lse = be.alloc_typed(&[n_heads, t], DType::F32)?;
    let (st, ln, nseq, maxlen) = spans(be, seqs)?;
    let smem = ((2 * kt * (hd + 1) + 4 * hd) * 4) as u32;
    be.launch(
        "model",
        "attention_fwd",
        (blocks(maxlen, 4), n_heads as u32, nseq as u32),
        (128, 1, 1),
        smem,
        &[
            be.rd("q", q)?,
            be.rd("k", k)?,
            be.rd("v", v)?,
            be.rd("out", &out)?,
            be.rd_f32("lse", &lse)?,
            Arg::P(be.slice_ptr(&st)),
            Arg::P(be.slice_ptr(&ln)),
            Arg::I(t as i32),
            Arg::I(n_heads as i32),
            Arg::I(n_kv_heads as i32),
            Arg::I(hd as i32),
            Arg::F(scale),
            Arg::I(kt as i32),
        ],
    )?;
    Ok(AttentionSaved { out, lse })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    be: &Cuda,
    d_out: &Tensor<Cuda>,
    q: &Tensor<Cuda>,
    k: &Tensor<Cuda>,
    v: &Tensor<Cuda>,
    saved: &AttentionSaved<Cuda>,
    seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    scale: f32,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>, Tensor<Cuda>)> {
    let (t, hd, _) = check::attention_backward(d_out, q, k, v, saved, seqs, n_heads, n_kv_heads)?;
    let kt = att_kt(hd)?;
    let delta = be.alloc_typed(&[n_heads, t], DType::F32)?;
    let deltap = be.rd_f32("delta", &delta)?;
    be.launch(
        "model",
        "attention_bwd_delta",
        (blocks(t * n_heads, 4), 1, 1),
        (128, 1, 1),
        0,
        &[
            be.rd("d_out", d_out)?,
            be.rd("saved.out", &saved.out)?,
            deltap,
            Arg::I(t as i32),
            Arg::I(n_heads as i32),
            Arg::I(hd as i32),
        ],
    )?;
    let dq = be.alloc(q.shape())?;
    let dk = be.alloc(k.shape())?;
    let dv = be.alloc(v.shape())?;
    let (st, ln, nseq, maxlen) = spans(be, seqs)?;
    let (sp, lp) = (Arg::P(be.slice_ptr(&st)), Arg::P(be.slice_ptr(&ln)));
    let lse = be.rd_f32("saved.lse", &saved.lse)?;
    let common = [
        be.rd("q", q)?,
        be.rd("k", k)?,
        be.rd("v", v)?,
        be.rd("d_out", d_out)?,
        lse,
        deltap,
    ];
    let tail = [
        sp,
        lp,
        Arg::I(t as i32),
        Arg::I(n_heads as i32),
        Arg::I(n_kv_heads as i32),
        Arg::I(hd as i32),
        Arg::F(scale),
        Arg::I(kt as i32),
    ];
    let mut args: Vec<Arg> = common.to_vec();
    args.push(be.rd("dq", &dq)?);
    args.extend(tail);
    be.launch(
        "model",
        "attention_bwd_dq",
        (blocks(maxlen, 4), n_heads as u32, nseq as u32),
        (128, 1, 1),
        ((2 * kt * (hd + 1) + 8 * hd) * 4) as u32,
        &args,
    )?;
    let mut args: Vec<Arg> = common.to_vec();
    args.push(be.rd("dk", &dk)?);
    args.push(be.rd("dv", &dv)?);
    args.extend(tail);
    be.launch(
        "model",
        "attention_bwd_dkdv",
        (blocks(maxlen, 4), n_kv_heads as u32, nseq as u32),
        (128, 1, 1),
        ((2 * kt * (hd + 1) + 2 * kt + 8 * hd) * 4) as u32,
        &args,
    )?;
    Ok((dq, dk, dv))
}

pub(super) fn swiglu(be: &Cuda, gate: &Tensor<Cuda>, up: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
    same("up", up, gate)?;
    let n = gate.len();
    let out = be.alloc(gate.shape())?;
    be.launch(
        "model",
        "swiglu",
        (grid(n), 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("gate", gate)?,
            be.rd("up", up)?,
            be.rd("out", &out)?,
            Arg::L(n as i64),
        ],
    )?;
    Ok(out)
}

pub(super) fn swiglu_backward(
    be: &Cuda,
    d: &Tensor<Cuda>,
    gate: &Tensor<Cuda>,
    up: &Tensor<Cuda>,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
    same("up", up, gate)?;
    same("d", d, gate)?;
    let n = gate.len();
    let dg = be.alloc(gate.shape())?;
    let du = be.alloc(gate.shape())?;
    be.launch(
        "model",
        "swiglu_bwd",
        (grid(n), 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("d", d)?,
            be.rd("gate", gate)?,
            be.rd("up", up)?,
            be.rd("dgate", &dg)?,
            be.rd("dup", &du)?,
            Arg::L(n as i64),
        ],
    )?;
    Ok((dg, du))
}

pub(super) fn cross_entropy(
    be: &Cuda,
    logits: &Tensor<Cuda>,
    labels: &[i32],
    grad_scale: f32,
) -> Result<(f64, Tensor<Cuda>)> {
    let (n, vocab) = logits.dims2("logits")?;
    check::labels(labels, n, vocab)?;
    let grad = be.alloc(&[n, vocab])?;
    if n == 0 {
        return Ok((0.0, grad));
    }
    let lab = be.upload_i32(labels)?;
    let loss = be.scratch_f64(n)?;
    be.launch(
        "model",
        "cross_entropy",
        (n as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("logits", logits)?,
            Arg::P(be.slice_ptr(&lab)),
            be.rd("dlogits", &grad)?,
            Arg::P(be.slice_ptr(&loss)),
            Arg::I(vocab as i32),
            Arg::F(grad_scale),
        ],
    )?;
    Ok((be.download_f64(&loss, n)?.iter().sum(), grad))
}

pub(super) fn cross_entropy_stats(
    be: &Cuda,
    logits: &Tensor<Cuda>,
    labels: &[i32],
    grad_scale: f32,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
    let (n, vocab) = logits.dims2("logits")?;
    check::labels(labels, n, vocab)?;
    let grad = be.alloc(&[n, vocab])?;
    // The counted rows in order; the others' gradient rows stay zero (as allocated).
    let rows: Vec<i32> = (0..n)
        .filter(|&r| labels[r] >= 0)
        .map(|r| r as i32)
        .collect();
    let stats = be.alloc_typed(&[rows.len(), 3], DType::F32)?;
    if rows.is_empty() {
        return Ok((stats, grad));
    }
    let lab = be.upload_i32(labels)?;
    let rp = be.upload_i32(&rows)?;
    be.launch(
        "model",
        "cross_entropy_stats",
        (rows.len() as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("logits", logits)?,
            Arg::P(be.slice_ptr(&rp)),
            Arg::P(be.slice_ptr(&lab)),
            be.rd("dlogits", &grad)?,
            be.rd_f32("stats", &stats)?,
            Arg::I(vocab as i32),
            Arg::F(grad_scale),
        ],
    )?;
    Ok((stats, grad))
}

pub(super) fn adamw_step(
    be: &Cuda,
    param: &mut Tensor<Cuda>,
    grad: &Tensor<Cuda>,
    m: &mut Tensor<Cuda>,
    v: &mut Tensor<Cuda>,
    p: &AdamWParams,
) -> Result<()> {
    let check::AdamWFactors {
        step_size,
        bc2_sqrt,
        decay,
    } = check::adamw(param, grad, m, v, p)?;
    let n = param.len();
    let gp = be.rd("grad", grad)?;
    let wp = pu(be.wr("param", param)?);
    let mp = pu(be.wr("exp_avg", m)?);
    let vp = pu(be.wr("exp_avg_sq", v)?);
    be.launch(
        "optim",
        "adamw",
        (grid(n), 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::P(wp),
            gp,
            Arg::P(mp),
            Arg::P(vp),
            Arg::L(n as i64),
            Arg::F(p.beta1),
            Arg::F(p.beta2),
            Arg::F(p.eps),
            Arg::F(decay),
            Arg::F(step_size),
            Arg::F(bc2_sqrt),
        ],
    )
}
