//! Model ops on the wgpu backend: RMSNorm, RoPE, causal GQA attention, SwiGLU, cross-entropy
//! and AdamW. Same contracts as the trait docs; same math as `backend/cpu/ops.rs`.
//!
//! Kernels are in `shaders/{norm,rope,attention,loss,elementwise}.wgsl`; the row reductions
//! (RMSNorm forward/backward, cross-entropy's max and sum) share a reduction prelude:
//! subgroup sums (`shaders/reduce_subgroup.wgsl`) where the device has `SUBGROUP` and
//! [`super::WgpuOptions::subgroups`] allows, else a tree in workgroup memory
//! (`shaders/reduce.wgsl`). Integer side data (positions, sequence starts, labels) is built on
//! the host and uploaded as 32-bit words. Every kernel is deterministic: no float atomics, each
//! output element is written by one invocation that sums in a fixed order (with subgroups,
//! fixed for a given subgroup size: the same device and driver give the same bits, though not
//! the tree's bits). Buffers wider than one storage binding (a logits matrix over a large
//! vocabulary) are processed in row ranges, each bound on its own.

use super::Wgpu;
use super::ctx::Bind;
use super::memory::{Words, capacity, err, grid, kernel, row_ranges, span, upload_words, whole};
use crate::backend::check::AdamWFactors;
use crate::backend::{AdamWParams, AttentionSaved, SeqSpan, Tensor};
use crate::error::Result;

const NORM: &str = include_str!("../../../shaders/norm.wgsl");
const ROPE: &str = include_str!("../../../shaders/rope.wgsl");
const ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
const LOSS: &str = include_str!("../../../shaders/loss.wgsl");

/// Rows per attention block (`B` in attention.wgsl) and the largest head_dim it handles.
const ATT_BLOCK: usize = 16;
const MAX_HEAD_DIM: usize = 128;
/// `NONE` of attention.wgsl: a row in no sequence.
const NONE: u32 = u32::MAX;

// ---- RMSNorm ------------------------------------------------------------------------------

pub(super) fn rmsnorm(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    weight: &Tensor<Wgpu>,
    eps: f32,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    let (t, d) = (x.dim(0), x.dim(1));
    let y = be.alloc(&[t, d]);
    let rstd = be.alloc(&[t]);
    if t == 0 || d == 0 {
        // mean of no values: the CPU's 0/0 gives NaN rstd; keep the CPU's result.
        if t > 0 {
            let nan = be.ctx.upload(&vec![f32::NAN; t]);
            return Ok((y, be.tensor(nan, &[t])));
        }
        return Ok((y, rstd));
    }
    let ctx = &*be.ctx;
    let kernel = kernel(ctx, "norm", NORM, "rmsnorm", true)?;
    for (r0, r1) in row_ranges(ctx, t, &[d, 1])? {
        let rows = r1 - r0;
        let (bx, xo) = span(ctx, &x.buf, r0 * d, rows * d);
        let (by, yo) = span(ctx, &y.buf, r0 * d, rows * d);
        let (br, ro) = span(ctx, &rstd.buf, r0, rows);
        let params = [rows as u32, d as u32, xo, yo, ro, 0, eps.to_bits(), 0];
        let bw = whole(ctx, "weight", &weight.buf, d)?;
        ctx.dispatch(
            &kernel,
            &params,
            &[(1, bx), (2, bw), (5, by), (6, br)],
            grid(ctx, rows),
        )?;
    }
    Ok((y, rstd))
}

pub(super) fn rmsnorm_backward(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    x: &Tensor<Wgpu>,
    weight: &Tensor<Wgpu>,
    rstd: &Tensor<Wgpu>,
    dweight: Option<&mut Tensor<Wgpu>>,
) -> Result<Tensor<Wgpu>> {
    let (t, d) = (x.dim(0), x.dim(1));
    if let Some(dw) = &dweight {
        Wgpu::mutable("rmsnorm_backward dweight", dw)?;
    }
    let dx = be.alloc(&[t, d]);
    if t == 0 || d == 0 {
        return Ok(dx);
    }
    let ctx = &*be.ctx;
    let k_dx = kernel(ctx, "norm", NORM, "rmsnorm_dx", true)?;
    let k_dw = kernel(ctx, "norm", NORM, "rmsnorm_dw", true)?;
    for (r0, r1) in row_ranges(ctx, t, &[d, 1])? {
        let rows = r1 - r0;
        let (bx, xo) = span(ctx, &x.buf, r0 * d, rows * d);
        let (bg, go) = span(ctx, &dy.buf, r0 * d, rows * d);
        let (by, yo) = span(ctx, &dx.buf, r0 * d, rows * d);
        let (br, ro) = span(ctx, &rstd.buf, r0, rows);
        let params = [rows as u32, d as u32, xo, yo, ro, go, 0, 0];
        ctx.dispatch(
            &k_dx,
            &params,
            &[
                (1, bx),
                (2, whole(ctx, "weight", &weight.buf, d)?),
                (3, bg),
                (4, br),
                (5, by),
            ],
            grid(ctx, rows),
        )?;
        if let Some(dw) = &dweight {
            let (bx, _) = span(ctx, &x.buf, r0 * d, rows * d);
            let (bg, _) = span(ctx, &dy.buf, r0 * d, rows * d);
            let (br, _) = span(ctx, &rstd.buf, r0, rows);
            ctx.dispatch(
                &k_dw,
                &params,
                &[
                    (1, bx),
                    (3, bg),
                    (4, br),
                    (7, whole(ctx, "dweight", &dw.buf, d)?),
                ],
                (d.div_ceil(16) as u32, 1, 1),
            )?;
        }
    }
    Ok(dx)
}

// ---- RoPE ---------------------------------------------------------------------------------

pub(super) fn rope(
    be: &Wgpu,
    x: &mut Tensor<Wgpu>,
    positions: &[u32],
    head_dim: usize,
    theta: f32,
    inverse: bool,
) -> Result<()> {
    let (t, width) = (x.dim(0), x.dim(1));
    Wgpu::mutable("rope", x)?;
    if t == 0 || width == 0 {
        return Ok(());
    }
    let ctx = &*be.ctx;
    let kernel = kernel(ctx, "rope", ROPE, "rope", false)?;
    let inv_freq = be
        .ctx
        .upload(&crate::backend::rope_inv_freq(head_dim, theta));
    let pos = upload_words(be, positions);
    let sign: f32 = if inverse { -1.0 } else { 1.0 };
    for (r0, r1) in row_ranges(ctx, t, &[width, 1])? {
        let rows = r1 - r0;
        let n = rows * width / 2;
        let (bx, xo) = span(ctx, &x.buf, r0 * width, rows * width);
        let (bp, po) = span(ctx, &pos, r0, rows);
        let params = [
            n as u32,
            width as u32,
            head_dim as u32,
            xo,
            po,
            sign.to_bits(),
        ];
        ctx.dispatch(
            &kernel,
            &params,
            &[(1, bx), (2, Bind::all(&inv_freq)), (3, bp)],
            grid(ctx, n.div_ceil(256)),
        )?;
    }
    Ok(())
}

// ---- attention ----------------------------------------------------------------------------

/// Per row, the first row of the sequence holding it (`NONE` outside every sequence). Later
/// spans win where spans overlap, as the CPU reference writes them in order.
fn row_starts(seqs: &[SeqSpan], t: usize) -> Vec<u32> {
    let mut starts = vec![NONE; t];
    for s in seqs.iter().filter(|s| s.len > 0 && s.start < t) {
        starts[s.start..(s.start + s.len).min(t)].fill(s.start as u32);
    }
    starts
}

/// Per key row j, one past the last query row that attends it (0 when none): the last row t
/// with `starts[t] <= j`, when that is `>= j`.
fn query_ends(starts: &[u32]) -> Vec<u32> {
    let t = starts.len();
    let mut last = vec![None::<usize>; t];
    for (row, &s) in starts.iter().enumerate() {
        if s != NONE {
            let l = &mut last[s as usize];
            *l = Some(l.map_or(row, |v: usize| v.max(row)));
        }
    }
    let mut run: Option<usize> = None;
    last.iter()
        .enumerate()
        .map(|(j, l)| {
            run = match (run, *l) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            match run {
                Some(r) if r >= j => (r + 1) as u32,
                _ => 0,
            }
        })
        .collect()
}

/// The parameter block of attention.wgsl: `t` query rows over `tk` kv rows.
fn attention_params(
    t: usize,
    tk: usize,
    hd: usize,
    n_heads: usize,
    n_kv: usize,
    scale: f32,
) -> [u32; 8] {
    [
        t as u32,
        hd as u32,
        (n_heads * hd) as u32,
        (n_kv * hd) as u32,
        (n_heads / n_kv.max(1)) as u32,
        scale.to_bits(),
        n_heads as u32,
        tk as u32,
    ]
}

fn check_head_dim(hd: usize) -> Result<()> {
    if hd > MAX_HEAD_DIM {
        return Err(err(format!(
            "attention: head_dim {hd} is larger than the {MAX_HEAD_DIM} the kernel supports"
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    be: &Wgpu,
    q: &Tensor<Wgpu>,
    k: &Tensor<Wgpu>,
    v: &Tensor<Wgpu>,
    seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    scale: f32,
) -> Result<AttentionSaved<Wgpu>> {
    let (t, hd) = (q.dim(0), q.dim(1) / n_heads.max(1));
    check_head_dim(hd)?;
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    let out = be.alloc(&[t, qw]);
    let lse = be.alloc(&[n_heads, t]);
    if t == 0 || hd == 0 {
        return Ok(AttentionSaved { out, lse });
    }
    let ctx = &*be.ctx;
    let starts = upload_words(be, &row_starts(seqs, t));
    let kernel = kernel(ctx, "attention", ATTENTION, "attn_fwd", false)?;
    let params = attention_params(t, t, hd, n_heads, n_kv_heads, scale);
    ctx.dispatch(
        &kernel,
        &params,
        &[
            (1, whole(ctx, "q", &q.buf, t * qw)?),
            (2, whole(ctx, "k", &k.buf, t * kw)?),
            (3, whole(ctx, "v", &v.buf, t * kw)?),
            (4, Bind::all(&starts)),
            (5, whole(ctx, "out", &out.buf, t * qw)?),
            (6, whole(ctx, "lse", &lse.buf, n_heads * t)?),
        ],
        (t.div_ceil(ATT_BLOCK) as u32, n_heads as u32, 1),
    )?;
    Ok(AttentionSaved { out, lse })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    be: &Wgpu,
    d_out: &Tensor<Wgpu>,
    q: &Tensor<Wgpu>,
    k: &Tensor<Wgpu>,
    v: &Tensor<Wgpu>,
    saved: &AttentionSaved<Wgpu>,
    seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    scale: f32,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>, Tensor<Wgpu>)> {
    let (t, hd) = (q.dim(0), q.dim(1) / n_heads.max(1));
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    check_head_dim(hd)?;
    let dq = be.alloc(&[t, qw]);
    let dk = be.alloc(&[t, kw]);
    let dv = be.alloc(&[t, kw]);
    if t == 0 || hd == 0 {
        return Ok((dq, dk, dv));
    }
    let ctx = &*be.ctx;
    let starts_host = row_starts(seqs, t);
    let starts = upload_words(be, &starts_host);
    let qend = upload_words(be, &query_ends(&starts_host));
    let delta = be.ctx.alloc(n_heads * t);
    let params = attention_params(t, t, hd, n_heads, n_kv_heads, scale);
    let k_delta = kernel(ctx, "attention", ATTENTION, "attn_delta", false)?;
    let k_dq = kernel(ctx, "attention", ATTENTION, "attn_dq", false)?;
    let k_dkv = kernel(ctx, "attention", ATTENTION, "attn_dkv", false)?;
    let hl = n_heads * t;
    ctx.dispatch(
        &k_delta,
        &params,
        &[
            (7, whole(ctx, "d_out", &d_out.buf, t * qw)?),
            (8, whole(ctx, "saved.out", &saved.out.buf, t * qw)?),
            (10, whole(ctx, "delta", &delta, hl)?),
        ],
        grid(ctx, hl.div_ceil(256)),
    )?;
    ctx.dispatch(
        &k_dq,
        &params,
        &[
            (1, whole(ctx, "q", &q.buf, t * qw)?),
            (2, whole(ctx, "k", &k.buf, t * kw)?),
            (3, whole(ctx, "v", &v.buf, t * kw)?),
            (4, Bind::all(&starts)),
            (7, whole(ctx, "d_out", &d_out.buf, t * qw)?),
            (9, whole(ctx, "saved.lse", &saved.lse.buf, hl)?),
            (11, whole(ctx, "delta", &delta, hl)?),
            (12, whole(ctx, "dq", &dq.buf, t * qw)?),
        ],
        (t.div_ceil(ATT_BLOCK) as u32, n_heads as u32, 1),
    )?;
    ctx.dispatch(
        &k_dkv,
        &params,
        &[
            (1, whole(ctx, "q", &q.buf, t * qw)?),
            (2, whole(ctx, "k", &k.buf, t * kw)?),
            (3, whole(ctx, "v", &v.buf, t * kw)?),
            (4, Bind::all(&starts)),
            (7, whole(ctx, "d_out", &d_out.buf, t * qw)?),
            (9, whole(ctx, "saved.lse", &saved.lse.buf, hl)?),
            (11, whole(ctx, "delta", &delta, hl)?),
            (13, whole(ctx, "dk", &dk.buf, t * kw)?),
            (14, whole(ctx, "dv", &dv.buf, t * kw)?),
            (15, Bind::all(&qend)),
        ],
        (t.div_ceil(ATT_BLOCK) as u32, n_kv_heads as u32, 1),
    )?;
    Ok((dq, dk, dv))
}

/// [`attention`] of each sequence's new rows `q_seqs[i]` of q over its context `kv_seqs[i]` of
/// k, v (new tokens last): q row `q.start + j` attends kv rows `kv.start..=kv.start + past + j`
/// with `past = kv.len - q.len`. One workgroup per (block of 16 query rows, query head), the
/// kv range of every query row built on the host (rows in no sequence stay zero; where spans
/// overlap the later wins, as the CPU writes them in order).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_cached(
    be: &Wgpu,
    q: &Tensor<Wgpu>,
    k: &Tensor<Wgpu>,
    v: &Tensor<Wgpu>,
    q_seqs: &[SeqSpan],
    kv_seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    scale: f32,
) -> Result<Tensor<Wgpu>> {
    let (tq, hd, tk) = (q.dim(0), q.dim(1) / n_heads.max(1), k.dim(0));
    check_head_dim(hd)?;
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    let out = be.alloc(&[tq, qw]);
    if tq == 0 || hd == 0 {
        return Ok(out);
    }
    let mut range: Vec<u32> = (0..tq).flat_map(|_| [NONE, 0]).collect();
    for (qs, ks) in q_seqs.iter().zip(kv_seqs).filter(|(qs, _)| qs.len > 0) {
        let past = ks.len.saturating_sub(qs.len);
        for j in 0..qs.len.min(tq.saturating_sub(qs.start)) {
            let row = qs.start + j;
            range[2 * row] = ks.start as u32;
            range[2 * row + 1] = (ks.start + past + j + 1).min(tk) as u32;
        }
    }
    let ctx = &*be.ctx;
    let qrange = upload_words(be, &range);
    let kernel = kernel(ctx, "attention", ATTENTION, "attn_cached", false)?;
    let params = attention_params(tq, tk, hd, n_heads, n_kv_heads, scale);
    ctx.dispatch(
        &kernel,
        &params,
        &[
            (1, whole(ctx, "q", &q.buf, tq * qw)?),
            (2, whole(ctx, "k", &k.buf, tk * kw)?),
            (3, whole(ctx, "v", &v.buf, tk * kw)?),
            (5, whole(ctx, "out", &out.buf, tq * qw)?),
            (16, Bind::all(&qrange)),
        ],
        (tq.div_ceil(ATT_BLOCK) as u32, n_heads as u32, 1),
    )?;
    Ok(out)
}

// ---- loss ---------------------------------------------------------------------------------

pub(super) fn cross_entropy(
    be: &Wgpu,
    logits: &Tensor<Wgpu>,
    labels: &[i32],
    grad_scale: f32,
) -> Result<(f64, Tensor<Wgpu>)> {
    let (stats, grad) = cross_entropy_stats(be, logits, labels, grad_scale)?;
    // The step's one readback: per counted row (max, sum of exp, logit of the label).
    let words = be.ctx.read(&stats.buf.buffer, stats.len())?;
    let loss = crate::backend::cross_entropy_loss(bytemuck::cast_slice::<u32, f32>(&words));
    Ok((loss, grad))
}

pub(super) fn cross_entropy_stats(
    be: &Wgpu,
    logits: &Tensor<Wgpu>,
    labels: &[i32],
    grad_scale: f32,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    let (n, vocab) = (logits.dim(0), logits.dim(1));
    let grad = be.alloc(&[n, vocab]);
    let counted = labels.iter().take(n).filter(|&&l| l >= 0).count();
    if counted == 0 || vocab == 0 {
        return Ok((be.alloc(&[0, 3]), grad));
    }
    let ctx = &*be.ctx;
    let per_batch = (capacity(ctx) / 3).max(1);
    // Per row range: batches of (row, label) for the counted rows, each with its slot of
    // (max, sum, logit of the label) in `stats`.
    let mut words = Words::default();
    let mut batches = Vec::new();
    let mut stat_off = 0;
    for (r0, r1) in row_ranges(ctx, n, &[vocab])? {
        let list: Vec<u32> = (r0..r1)
            .zip(&labels[r0.min(labels.len())..r1.min(labels.len())])
            .filter(|&(_, &l)| l >= 0)
            .flat_map(|(r, &l)| [(r - r0) as u32, l as u32])
            .collect();
        for b in list.chunks(2 * per_batch) {
            batches.push((r0, r1, words.push(ctx, b), b.len() / 2, stat_off));
            stat_off += 3 * (b.len() / 2);
        }
    }
    let list = words.upload(be);
    let stats = be.alloc(&[counted, 3]);
    let kernel = kernel(ctx, "loss", LOSS, "cross_entropy", true)?;
    for &(r0, r1, off, count, st) in &batches {
        let (bx, xo) = span(ctx, &logits.buf, r0 * vocab, (r1 - r0) * vocab);
        let (bd, dof) = span(ctx, &grad.buf, r0 * vocab, (r1 - r0) * vocab);
        let (bl, lo) = span(ctx, &list, off, 2 * count);
        let (bs, so) = span(ctx, &stats.buf, st, 3 * count);
        let params = [
            count as u32,
            vocab as u32,
            xo,
            dof,
            lo,
            so,
            grad_scale.to_bits(),
        ];
        ctx.dispatch(
            &kernel,
            &params,
            &[(1, bx), (2, bd), (3, bl), (4, bs)],
            grid(ctx, count),
        )?;
    }
    debug_assert_eq!(stat_off, 3 * counted);
    Ok((stats, grad))
}

// ---- SwiGLU -------------------------------------------------------------------------------

pub(super) fn swiglu(be: &Wgpu, gate: &Tensor<Wgpu>, up: &Tensor<Wgpu>) -> Result<Tensor<Wgpu>> {
    let out = be.alloc(gate.shape());
    be.elementwise(
        "swiglu",
        gate.len(),
        &[(1, &out.buf), (2, &gate.buf), (3, &up.buf)],
        &[],
        0,
        0,
        &[],
    )?;
    Ok(out)
}

pub(super) fn swiglu_backward(
    be: &Wgpu,
    d: &Tensor<Wgpu>,
    gate: &Tensor<Wgpu>,
    up: &Tensor<Wgpu>,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    let dg = be.alloc(gate.shape());
    let du = be.alloc(gate.shape());
    be.elementwise(
        "swiglu_backward",
        gate.len(),
        &[
            (1, &dg.buf),
            (2, &gate.buf),
            (3, &up.buf),
            (4, &d.buf),
            (5, &du.buf),
        ],
        &[],
        0,
        0,
        &[],
    )?;
    Ok((dg, du))
}

// ---- optimizer ----------------------------------------------------------------------------

/// torch's single-tensor AdamW with the f32 constants the trait computed (the CPU's).
pub(super) fn adamw_step(
    be: &Wgpu,
    param: &mut Tensor<Wgpu>,
    grad: &Tensor<Wgpu>,
    m: &mut Tensor<Wgpu>,
    v: &mut Tensor<Wgpu>,
    factors: &AdamWFactors,
    p: &AdamWParams,
) -> Result<()> {
    Wgpu::mutable("adamw_step", param)?;
    Wgpu::mutable("adamw_step exp_avg", m)?;
    Wgpu::mutable("adamw_step exp_avg_sq", v)?;
    let AdamWFactors {
        step_size,
        bc2_sqrt,
        decay,
    } = *factors;
    be.elementwise(
        "adamw",
        param.len(),
        &[(1, &param.buf), (2, &grad.buf), (5, &m.buf), (6, &v.buf)],
        &[],
        0,
        0,
        &[p.lr, p.beta1, p.beta2, p.eps, decay, step_size, bc2_sqrt],
    )
}
