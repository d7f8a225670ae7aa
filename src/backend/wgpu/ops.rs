//! Model ops on the wgpu backend: embedding gather/scatter, RMSNorm, RoPE, causal GQA
//! attention, cross-entropy and reductions. Same contracts as the trait docs; same math as
//! `backend/cpu/ops.rs`.
//!
//! Kernels are in `shaders/{embed,norm,rope,attention,loss}.wgsl`; the row reductions (sum of
//! squares, RMSNorm forward/backward, cross-entropy's max and sum) share a reduction prelude:
//! subgroup sums (`shaders/reduce_subgroup.wgsl`) where the device has `SUBGROUP` and
//! [`super::WgpuOptions::subgroups`] allows, else a tree in workgroup memory
//! (`shaders/reduce.wgsl`). Integer side data (row lists, positions, sequence starts, labels)
//! is built on the host and uploaded as 32-bit words. Every kernel is deterministic: no float
//! atomics, each output element is written by one invocation that sums in a fixed order (with
//! subgroups, fixed for a given subgroup size: the same device and driver give the same bits,
//! though not the tree's bits). Buffers wider than one storage binding (an embedding table or
//! a logits matrix over a large vocabulary) are processed in row ranges, each bound on its own.

use super::Wgpu;
use super::ctx::{Bind, Ctx, GpuBuf, Kernel};
use crate::backend::{AttentionSaved, SeqSpan, Tensor, check};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

const EMBED: &str = include_str!("../../../shaders/embed.wgsl");
const NORM: &str = include_str!("../../../shaders/norm.wgsl");
const ROPE: &str = include_str!("../../../shaders/rope.wgsl");
const ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
const LOSS: &str = include_str!("../../../shaders/loss.wgsl");

/// Elements summed by one workgroup of `norm.wgsl`'s `sum_squares` (its `SQ_BLOCK`).
const SQ_BLOCK: usize = 4096;
/// Rows per attention block (`B` in attention.wgsl) and the largest head_dim it handles.
const ATT_BLOCK: usize = 16;
const MAX_HEAD_DIM: usize = 128;
/// `NONE` of attention.wgsl: a row in no sequence.
const NONE: u32 = u32::MAX;

fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "wgpu".into(),
        msg: msg.into(),
    }
}

fn kernel(
    ctx: &Ctx,
    module: &str,
    src: &str,
    entry: &str,
    reduce: bool,
) -> Result<std::sync::Arc<Kernel>> {
    if reduce {
        ctx.reduce_kernel(module, src, entry)
    } else {
        ctx.kernel(&format!("{module}.{entry}"), src, entry)
    }
}

/// Words of one storage binding, and the offset alignment in words.
fn limits(ctx: &Ctx) -> (usize, usize) {
    let align = (ctx.offset_align / 4).max(1) as usize;
    ((ctx.max_binding / 4) as usize, align)
}

/// Words a binding can hold when its start is aligned down to the offset alignment.
fn capacity(ctx: &Ctx) -> usize {
    let (limit, align) = limits(ctx);
    limit.saturating_sub(align - 1)
}

/// A binding of words `lo..lo + len` of `buf` from an aligned start; returns it and the index
/// of word `lo` inside it.
fn span<'b>(ctx: &Ctx, buf: &'b GpuBuf, lo: usize, len: usize) -> (Bind<'b>, u32) {
    let (_, align) = limits(ctx);
    let start = lo / align * align;
    let words = (lo + len - start).max(1);
    (
        Bind::range(buf, 4 * start as u64, 4 * words as u64),
        (lo - start) as u32,
    )
}

/// The whole of `buf` (its first `len` words), which must fit one binding.
pub(super) fn whole<'b>(ctx: &Ctx, what: &str, buf: &'b GpuBuf, len: usize) -> Result<Bind<'b>> {
    if len > limits(ctx).0 {
        return Err(err(format!(
            "{what}: {} MiB is more than one storage binding ({} MiB)",
            (4 * len) >> 20,
            ctx.max_binding >> 20
        )));
    }
    Ok(Bind::range(buf, 0, 4 * len.max(1) as u64))
}

/// Splits rows `0..n` into ranges in which every buffer (given by its words per row) fits one
/// binding. Errors: a single row wider than a binding.
fn row_chunks(ctx: &Ctx, n: usize, widths: &[usize]) -> Result<Vec<(usize, usize)>> {
    let cap = capacity(ctx);
    let per = widths
        .iter()
        .filter(|&&w| w > 0)
        .map(|&w| cap / w)
        .min()
        .unwrap_or(usize::MAX);
    if per == 0 {
        return Err(err(format!(
            "a row of {} floats is wider than the {} byte storage binding limit",
            widths.iter().max().copied().unwrap_or(0),
            ctx.max_binding
        )));
    }
    Ok((0..n)
        .step_by(per)
        .map(|r0| (r0, (r0 + per).min(n)))
        .collect())
}

/// A 2-D grid of `n` workgroups (x at most the adapter's limit per dimension).
fn grid(ctx: &Ctx, n: usize) -> (u32, u32, u32) {
    let gx = n.clamp(1, ctx.max_groups as usize);
    (gx as u32, n.div_ceil(gx) as u32, 1)
}

/// Host-built integer lists, concatenated into one upload: each segment starts at an aligned
/// word so that it can be bound on its own.
#[derive(Default)]
struct Words {
    data: Vec<u32>,
}

impl Words {
    /// Appends `words` at an aligned offset; returns that offset.
    fn push(&mut self, ctx: &Ctx, words: &[u32]) -> usize {
        let (_, align) = limits(ctx);
        self.data.resize(self.data.len().div_ceil(align) * align, 0);
        let off = self.data.len();
        self.data.extend_from_slice(words);
        off
    }
    fn upload(&self, be: &Wgpu) -> GpuBuf {
        be.ctx
            .upload_bytes(bytemuck::cast_slice(&self.data), self.data.len())
    }
}

/// Uploads 32-bit words (positions, sequence starts) as a buffer.
fn upload_words(be: &Wgpu, words: &[u32]) -> GpuBuf {
    be.ctx
        .upload_bytes(bytemuck::cast_slice(words), words.len())
}

// ---- embedding ----------------------------------------------------------------------------

/// The chunk (index into `chunks`) holding row `r`.
fn chunk_of(chunks: &[(usize, usize)], r: usize) -> usize {
    chunks.partition_point(|&(_, end)| end <= r)
}

pub(super) fn gather_rows(be: &Wgpu, t: &Tensor<Wgpu>, idx: &[u32]) -> Result<Tensor<Wgpu>> {
    let (n, d) = t.dims2("table")?;
    check::row_indices(idx, n)?;
    let out = be.alloc(&[idx.len(), d]);
    if idx.is_empty() || d == 0 {
        return Ok(out);
    }
    let ctx = &*be.ctx;
    let tab_chunks = row_chunks(ctx, n, &[d])?;
    let out_chunks = row_chunks(ctx, idx.len(), &[d])?;
    let per_batch = capacity(ctx) / 2;
    // (output chunk, table chunk) -> pairs (output row, table row), relative to the chunks.
    let mut groups: BTreeMap<(usize, usize), Vec<u32>> = BTreeMap::new();
    for (o, &i) in idx.iter().enumerate() {
        let (oc, tc) = (chunk_of(&out_chunks, o), chunk_of(&tab_chunks, i as usize));
        let pairs = groups.entry((oc, tc)).or_default();
        pairs.push((o - out_chunks[oc].0) as u32);
        pairs.push(i - tab_chunks[tc].0 as u32);
    }
    let mut words = Words::default();
    let mut batches = Vec::new();
    for (&(oc, tc), pairs) in &groups {
        for b in pairs.chunks(2 * per_batch) {
            batches.push((oc, tc, words.push(ctx, b), b.len() / 2));
        }
    }
    let list = words.upload(be);
    let kernel = kernel(ctx, "embed", EMBED, "gather", false)?;
    for (oc, tc, off, count) in batches {
        let (o0, o1) = out_chunks[oc];
        let (t0, t1) = tab_chunks[tc];
        let (bo, oo) = span(ctx, &out.buf, o0 * d, (o1 - o0) * d);
        let (bt, to) = span(ctx, &t.buf, t0 * d, (t1 - t0) * d);
        let (bl, lo) = span(ctx, &list, off, 2 * count);
        let params = [count as u32, d as u32, lo, oo, to];
        ctx.dispatch(
            &kernel,
            &params,
            &[(1, bo), (2, bt), (3, bl)],
            grid(ctx, count),
        )?;
    }
    Ok(out)
}

pub(super) fn scatter_add_rows(
    be: &Wgpu,
    dst: &mut Tensor<Wgpu>,
    idx: &[u32],
    src: &Tensor<Wgpu>,
) -> Result<()> {
    let (n, d) = dst.dims2("dst")?;
    src.expect_shape("src", &[idx.len(), d])?;
    check::row_indices(idx, n)?;
    if idx.is_empty() || d == 0 {
        return Ok(());
    }
    let ctx = &*be.ctx;
    let dst_chunks = row_chunks(ctx, n, &[d])?;
    let src_chunks = row_chunks(ctx, idx.len(), &[d])?;
    let cap = capacity(ctx);
    if cap < 4 {
        return Err(err("storage binding limit too small for a scatter list"));
    }
    // CSR per (destination chunk, source chunk): destination rows ascending, each with its
    // source rows in ascending order, so the sum order equals the CPU's (src row 0 first).
    let mut csr: BTreeMap<(usize, usize), BTreeMap<u32, Vec<u32>>> = BTreeMap::new();
    for (s, &i) in idx.iter().enumerate() {
        let (dc, sc) = (chunk_of(&dst_chunks, i as usize), chunk_of(&src_chunks, s));
        csr.entry((dc, sc))
            .or_default()
            .entry(i - dst_chunks[dc].0 as u32)
            .or_default()
            .push((s - src_chunks[sc].0) as u32);
    }
    // Segments of at most `cap` words: headers (row, first, end) then sources. A row whose
    // sources do not fit continues in the next segment (dispatched after this one).
    let mut words = Words::default();
    let mut batches = Vec::new();
    for (&(dc, sc), rows) in &csr {
        let mut heads: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut used = 0;
        let mut flush = |heads: &mut Vec<(u32, Vec<u32>)>, words: &mut Words| {
            if heads.is_empty() {
                return;
            }
            let nh = heads.len();
            let mut seg = Vec::with_capacity(cap);
            let mut first = 3 * nh;
            for (row, srcs) in heads.iter() {
                seg.extend([*row, first as u32, (first + srcs.len()) as u32]);
                first += srcs.len();
            }
            for (_, srcs) in heads.iter() {
                seg.extend_from_slice(srcs);
            }
            batches.push((dc, sc, words.push(ctx, &seg), nh, seg.len()));
            heads.clear();
        };
        for (&row, srcs) in rows {
            let mut rest = &srcs[..];
            while !rest.is_empty() {
                if used + 4 > cap {
                    flush(&mut heads, &mut words);
                    used = 0;
                }
                let take = rest.len().min(cap - used - 3);
                heads.push((row, rest[..take].to_vec()));
                used += 3 + take;
                rest = &rest[take..];
            }
        }
        flush(&mut heads, &mut words);
    }
    let list = words.upload(be);
    let kernel = kernel(ctx, "embed", EMBED, "scatter_add", false)?;
    for (dc, sc, off, count, len) in batches {
        let (d0, d1) = dst_chunks[dc];
        let (s0, s1) = src_chunks[sc];
        let (bd, dof) = span(ctx, &dst.buf, d0 * d, (d1 - d0) * d);
        let (bs, sof) = span(ctx, &src.buf, s0 * d, (s1 - s0) * d);
        let (bl, lof) = span(ctx, &list, off, len);
        let params = [count as u32, d as u32, lof, dof, sof];
        ctx.dispatch(
            &kernel,
            &params,
            &[(1, bd), (2, bs), (3, bl)],
            grid(ctx, count),
        )?;
    }
    Ok(())
}

// ---- reductions and RMSNorm ---------------------------------------------------------------

pub(super) fn sum_squares(be: &Wgpu, a: &Tensor<Wgpu>) -> Result<f64> {
    let n = a.len();
    if n == 0 {
        return Ok(0.0);
    }
    let ctx = &*be.ctx;
    let (_, align) = limits(ctx);
    // Element ranges that fit one binding, whole blocks each (so partials never straddle).
    let cap = capacity(ctx);
    let per = if cap >= SQ_BLOCK {
        cap / SQ_BLOCK * SQ_BLOCK
    } else {
        cap
    };
    let ranges: Vec<(usize, usize)> = (0..n).step_by(per).map(|e| (e, (e + per).min(n))).collect();
    // Partials of each range at an aligned offset.
    let mut offs = Vec::with_capacity(ranges.len());
    let mut total = 0;
    for &(e0, e1) in &ranges {
        offs.push(total);
        total += (e1 - e0).div_ceil(SQ_BLOCK).div_ceil(align) * align;
    }
    let partials = be.ctx.alloc(total);
    let kernel = kernel(ctx, "norm", NORM, "sum_squares", true)?;
    for (&(e0, e1), &off) in ranges.iter().zip(&offs) {
        let len = e1 - e0;
        let groups = len.div_ceil(SQ_BLOCK);
        let (bx, xo) = span(ctx, &a.buf, e0, len);
        let (by, yo) = span(ctx, &partials, off, groups);
        let params = [groups as u32, 0, xo, yo, 0, 0, 0, len as u32];
        ctx.dispatch(&kernel, &params, &[(1, bx), (5, by)], grid(ctx, groups))?;
    }
    let words = ctx.read(&partials.buffer, total)?;
    Ok(bytemuck::cast_slice::<u32, f32>(&words)
        .iter()
        .map(|&v| v as f64)
        .sum())
}

pub(super) fn rmsnorm(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    weight: &Tensor<Wgpu>,
    eps: f32,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    let (t, d) = x.dims2("x")?;
    weight.expect_shape("weight", &[d])?;
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
    for (r0, r1) in row_chunks(ctx, t, &[d, 1])? {
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
    let (t, d) = check::rmsnorm_backward(dy, x, weight, rstd)?;
    if let Some(dw) = &dweight {
        dw.expect_shape("dweight", &[d])?;
    }
    let dx = be.alloc(&[t, d]);
    if t == 0 || d == 0 {
        return Ok(dx);
    }
    let ctx = &*be.ctx;
    let k_dx = kernel(ctx, "norm", NORM, "rmsnorm_dx", true)?;
    let k_dw = kernel(ctx, "norm", NORM, "rmsnorm_dw", true)?;
    for (r0, r1) in row_chunks(ctx, t, &[d, 1])? {
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
    let (t, width) = x.dims2("x")?;
    check::rope(width, t, positions, head_dim)?;
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
    for (r0, r1) in row_chunks(ctx, t, &[width, 1])? {
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
    for s in seqs.iter().filter(|s| s.len > 0) {
        starts[s.start..s.start + s.len].fill(s.start as u32);
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

fn attention_params(t: usize, hd: usize, n_heads: usize, n_kv: usize, scale: f32) -> [u32; 7] {
    [
        t as u32,
        hd as u32,
        (n_heads * hd) as u32,
        (n_kv * hd) as u32,
        (n_heads / n_kv) as u32,
        scale.to_bits(),
        n_heads as u32,
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
    let (t, hd, _) = check::attention(q, k, v, seqs, n_heads, n_kv_heads)?;
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
    let params = attention_params(t, hd, n_heads, n_kv_heads, scale);
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
    let (t, hd, _) = check::attention_backward(d_out, q, k, v, saved, seqs, n_heads, n_kv_heads)?;
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
    let params = attention_params(t, hd, n_heads, n_kv_heads, scale);
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
    let (n, vocab) = logits.dims2("logits")?;
    check::labels(labels, n, vocab)?;
    let grad = be.alloc(&[n, vocab]);
    let counted = labels.iter().filter(|&&l| l >= 0).count();
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
    for (r0, r1) in row_chunks(ctx, n, &[vocab])? {
        let list: Vec<u32> = (r0..r1)
            .filter(|&r| labels[r] >= 0)
            .flat_map(|r| [(r - r0) as u32, labels[r] as u32])
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
