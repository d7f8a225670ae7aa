//! The Llama block ops and AdamW on CUDA (`kernels/model.cu`, `kernels/optim.cu`): RMSNorm,
//! RoPE, attention, SwiGLU, cross-entropy, AdamW. Arguments arrive checked (`Backend`'s provided
//! methods); what is left here is the device's own limit (head dims up to 256).

use super::dense::grid;
use super::{Arg, Cuda, DType, blocks, pu};
use crate::backend::check::AdamWFactors;
use crate::backend::{AdamWParams, AttentionSaved, SeqSpan, Tensor, rope_inv_freq};
use crate::error::{Error, Result};

pub(super) fn rmsnorm(
    be: &Cuda,
    x: &Tensor<Cuda>,
    w: &Tensor<Cuda>,
    eps: f32,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
    let (t, d) = (x.dim(0), x.dim(1));
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
    let (t, d) = (x.dim(0), x.dim(1));
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
    let (t, width) = (x.dim(0), x.dim(1));
    // transformers' inv_freq, in f32 exactly as the CPU reference computes it.
    let f = be.upload_f32(&rope_inv_freq(head_dim, theta))?;
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
    let (t, hd) = (q.dim(0), q.dim(1).checked_div(n_heads).unwrap_or(0));
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
    let (t, hd) = (q.dim(0), q.dim(1).checked_div(n_heads).unwrap_or(0));
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

/// [`attention`] of each sequence's new tokens (`q_seqs`) over its whole context (`kv_seqs`,
/// the new tokens last): `attention_cached_fwd`, one CTA per 4 queries of a (sequence, head).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_cached(
    be: &Cuda,
    q: &Tensor<Cuda>,
    k: &Tensor<Cuda>,
    v: &Tensor<Cuda>,
    q_seqs: &[SeqSpan],
    kv_seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    scale: f32,
) -> Result<Tensor<Cuda>> {
    let (tq, hd) = (q.dim(0), q.dim(1).checked_div(n_heads).unwrap_or(0));
    let kt = att_kt(hd)?;
    let out = be.alloc(&[tq, n_heads * hd])?;
    let live: Vec<(&SeqSpan, &SeqSpan)> = q_seqs
        .iter()
        .zip(kv_seqs)
        .filter(|(qs, _)| qs.len > 0)
        .collect();
    let col = |f: fn(&(&SeqSpan, &SeqSpan)) -> usize| -> Vec<i32> {
        live.iter().map(|p| f(p) as i32).collect()
    };
    let (qst, qln) = (
        be.upload_i32(&col(|p| p.0.start))?,
        be.upload_i32(&col(|p| p.0.len))?,
    );
    let (kst, kln) = (
        be.upload_i32(&col(|p| p.1.start))?,
        be.upload_i32(&col(|p| p.1.len))?,
    );
    let maxq = live.iter().map(|p| p.0.len).max().unwrap_or(0);
    be.launch(
        "model",
        "attention_cached_fwd",
        (blocks(maxq, 4), n_heads as u32, live.len() as u32),
        (128, 1, 1),
        ((2 * kt * (hd + 1) + 4 * hd) * 4) as u32,
        &[
            be.rd("q", q)?,
            be.rd("k", k)?,
            be.rd("v", v)?,
            be.rd("out", &out)?,
            Arg::P(be.slice_ptr(&qst)),
            Arg::P(be.slice_ptr(&qln)),
            Arg::P(be.slice_ptr(&kst)),
            Arg::P(be.slice_ptr(&kln)),
            Arg::I(n_heads as i32),
            Arg::I(n_kv_heads as i32),
            Arg::I(hd as i32),
            Arg::F(scale),
            Arg::I(kt as i32),
        ],
    )?;
    Ok(out)
}

pub(super) fn swiglu(be: &Cuda, gate: &Tensor<Cuda>, up: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
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
    let (n, vocab) = (logits.dim(0), logits.dim(1));
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
    let (n, vocab) = (logits.dim(0), logits.dim(1));
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
    factors: &AdamWFactors,
    p: &AdamWParams,
) -> Result<()> {
    let AdamWFactors {
        step_size,
        bc2_sqrt,
        decay,
    } = *factors;
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
