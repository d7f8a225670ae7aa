//! wgpu tensors: uploads (f32, or f16 for frozen weights), readbacks, device copies, row
//! gathers and scatter-adds, and the binding of buffer ranges that every other kernel file
//! uses (a storage binding holds at most [`Ctx::max_binding`] bytes from an aligned offset, so
//! tensors wider than one binding are processed in ranges of rows, each bound on its own).
//!
//! The gather and scatter kernels are in `shaders/embed.wgsl`. Integer side data (row lists) is
//! built on the host and uploaded as 32-bit words. No float atomics: every destination row is
//! written by one workgroup, which adds its sources in the CPU's order.

use super::Wgpu;
use super::ctx::{Bind, Ctx, DType, GpuBuf, Kernel};
use crate::backend::Tensor;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::sync::Arc;

const EMBED: &str = include_str!("../../../shaders/embed.wgsl");

pub(super) fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "wgpu".into(),
        msg: msg.into(),
    }
}

// ---- tensors ------------------------------------------------------------------------------

pub(super) fn upload(be: &Wgpu, data: &[f32], shape: &[usize]) -> Result<Tensor<Wgpu>> {
    let t = be.tensor(be.ctx.upload(data), shape);
    be.ctx.check()?;
    Ok(t)
}

/// With f16 enabled ([`Wgpu::has_f16`]), stores the values rounded to f16 (round to nearest
/// even); else as [`upload`].
pub(super) fn upload_frozen(be: &Wgpu, data: &[f32], shape: &[usize]) -> Result<Tensor<Wgpu>> {
    if !be.ctx.f16 {
        return upload(be, data, shape);
    }
    let t = be.tensor(be.ctx.upload_f16(data), shape);
    be.ctx.check()?;
    Ok(t)
}

/// With f16 enabled, an f32 tensor is read back and uploaded again as f16 (done once per
/// weight, when training is prepared); otherwise `t` is returned as is.
pub(super) fn freeze(be: &Wgpu, t: Tensor<Wgpu>) -> Result<Tensor<Wgpu>> {
    if !be.ctx.f16 || t.buf.dtype == DType::F16 {
        return Ok(t);
    }
    let data = download_many(be, &[&t])?.pop().unwrap_or_default();
    upload_frozen(be, &data, t.shape())
}

pub(super) fn stored_bytes(t: &Tensor<Wgpu>) -> usize {
    t.buf.dtype.size() * t.len()
}

/// One staging buffer and one wait for all of `ts` (one readback).
pub(super) fn download_many(be: &Wgpu, ts: &[&Tensor<Wgpu>]) -> Result<Vec<Vec<f32>>> {
    let words = |t: &Tensor<Wgpu>| match t.buf.dtype {
        DType::F32 => t.buf.len,
        DType::F16 => t.buf.len.div_ceil(2),
    };
    let bufs: Vec<(&wgpu::Buffer, usize)> = ts.iter().map(|t| (&t.buf.buffer, words(t))).collect();
    let read = be.ctx.read_many(&bufs)?;
    Ok(ts
        .iter()
        .zip(read)
        .map(|(t, w)| match t.buf.dtype {
            DType::F32 => bytemuck::cast_slice::<u32, f32>(&w).to_vec(),
            DType::F16 => {
                let halves: &[u16] = bytemuck::cast_slice(&w);
                halves[..t.buf.len.min(halves.len())]
                    .iter()
                    .map(|&h| half::f16::from_bits(h).to_f32())
                    .collect::<Vec<f32>>()
            }
        })
        .collect())
}

pub(super) fn zeros(be: &Wgpu, shape: &[usize]) -> Result<Tensor<Wgpu>> {
    let t = be.alloc(shape);
    be.ctx.check()?;
    Ok(t)
}

/// A buffer-to-buffer copy in the pending encoder (each tensor owns its buffer). Errors: a
/// frozen `dst`, or storage types that differ.
pub(super) fn copy_into(be: &Wgpu, src: &Tensor<Wgpu>, dst: &mut Tensor<Wgpu>) -> Result<()> {
    Wgpu::mutable("copy_into", dst)?;
    if src.buf.dtype != dst.buf.dtype {
        return Err(Error::arg("src", "storage type differs from dst's"));
    }
    let bytes = src.buf.bytes().min(dst.buf.bytes());
    be.ctx.copy(&src.buf.buffer, 0, &dst.buf.buffer, 0, bytes);
    be.ctx.check()
}

// ---- bindings of word ranges --------------------------------------------------------------

/// Words of one storage binding, and the offset alignment in words.
pub(super) fn limits(ctx: &Ctx) -> (usize, usize) {
    let align = (ctx.offset_align / 4).max(1) as usize;
    ((ctx.max_binding / 4) as usize, align)
}

/// Words a binding can hold when its start is aligned down to the offset alignment.
pub(super) fn capacity(ctx: &Ctx) -> usize {
    let (limit, align) = limits(ctx);
    limit.saturating_sub(align - 1)
}

/// A binding of words `lo..lo + len` of `buf` from an aligned start; returns it and the index
/// of word `lo` inside it.
pub(super) fn span<'b>(ctx: &Ctx, buf: &'b GpuBuf, lo: usize, len: usize) -> (Bind<'b>, u32) {
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

/// A binding of words `lo..=hi` of `buf` from an aligned word at or before `lo`; returns it
/// with the index of its first word. Errors when the range exceeds one binding.
pub(super) fn bind_words<'a>(
    ctx: &Ctx,
    buf: &'a GpuBuf,
    lo: usize,
    hi: usize,
) -> Result<(Bind<'a>, usize)> {
    let (limit, align) = limits(ctx);
    let start = lo / align * align;
    if hi + 1 - start > limit {
        return Err(err(format!(
            "a range of {} words exceeds the {}-byte storage binding limit",
            hi + 1 - start,
            ctx.max_binding
        )));
    }
    Ok((
        Bind::range(buf, 4 * start as u64, 4 * (hi + 1 - start) as u64),
        start,
    ))
}

/// Splits rows `0..n` into ranges in which every buffer (given by its words per row) fits one
/// binding. Errors: a single row wider than a binding.
pub(super) fn row_ranges(ctx: &Ctx, n: usize, widths: &[usize]) -> Result<Vec<(usize, usize)>> {
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

/// A 2-D grid of `n` workgroups within the per-dimension dispatch limit.
pub(super) fn grid(ctx: &Ctx, n: usize) -> (u32, u32, u32) {
    let gx = n.clamp(1, ctx.max_groups as usize);
    (gx as u32, n.div_ceil(gx) as u32, 1)
}

/// The kernel `entry` of `src`, behind a reduction prelude when `reduce`.
pub(super) fn kernel(
    ctx: &Ctx,
    module: &str,
    src: &str,
    entry: &str,
    reduce: bool,
) -> Result<Arc<Kernel>> {
    if reduce {
        ctx.reduce_kernel(module, src, entry)
    } else {
        ctx.kernel(&format!("{module}.{entry}"), src, entry)
    }
}

/// Host-built integer lists, concatenated into one upload: each segment starts at an aligned
/// word so that it can be bound on its own.
#[derive(Default)]
pub(super) struct Words {
    data: Vec<u32>,
}

impl Words {
    /// Appends `words` at an aligned offset; returns that offset.
    pub(super) fn push(&mut self, ctx: &Ctx, words: &[u32]) -> usize {
        let (_, align) = limits(ctx);
        self.data.resize(self.data.len().div_ceil(align) * align, 0);
        let off = self.data.len();
        self.data.extend_from_slice(words);
        off
    }
    pub(super) fn upload(&self, be: &Wgpu) -> GpuBuf {
        be.ctx
            .upload_bytes(bytemuck::cast_slice(&self.data), self.data.len())
    }
}

/// Uploads 32-bit words (positions, sequence starts) as a buffer.
pub(super) fn upload_words(be: &Wgpu, words: &[u32]) -> GpuBuf {
    be.ctx
        .upload_bytes(bytemuck::cast_slice(words), words.len())
}

// ---- bindings of 2-D views ----------------------------------------------------------------

/// A 2-D view of a buffer: row `i`, column `c` is element `off + i * rs + c`, `w` columns.
#[derive(Clone, Copy)]
pub(super) struct Rows<'a> {
    pub buf: &'a GpuBuf,
    pub off: usize,
    pub rs: usize,
    pub w: usize,
}

impl<'a> Rows<'a> {
    /// A row-major `[rows, w]` tensor (or the leading rows of one).
    pub fn new(buf: &'a GpuBuf, w: usize) -> Self {
        Rows {
            buf,
            off: 0,
            rs: w,
            w,
        }
    }
    /// A vector seen as one value per row, starting at element `off`.
    pub fn vec(buf: &'a GpuBuf, off: usize) -> Self {
        Rows {
            buf,
            off,
            rs: 1,
            w: 1,
        }
    }
}

/// Elements of one storage binding and the offset alignment, in elements of `buf`'s storage
/// type (f32 or a frozen f16 weight).
fn elem_limits(ctx: &Ctx, buf: &GpuBuf) -> (usize, usize) {
    let esz = buf.dtype.size();
    (
        ctx.max_binding as usize / esz,
        (ctx.offset_align as usize / esz).max(1),
    )
}

/// Ranges of rows covering `0..rows` such that the rows of each view bind within one storage
/// binding. Errors when a single row does not fit.
pub(super) fn view_chunks(
    ctx: &Ctx,
    rows: usize,
    views: &[Rows<'_>],
) -> Result<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < rows {
        let mut n = rows - r0;
        for v in views {
            let (limit, align) = elem_limits(ctx, v.buf);
            let pad = (v.off + r0 * v.rs) % align;
            let w = v.w.max(1);
            if pad + w > limit {
                return Err(err(format!(
                    "a row of {w} values exceeds the {}-byte storage binding limit",
                    ctx.max_binding
                )));
            }
            if let Some(more) = (limit - pad - w).checked_div(v.rs) {
                n = n.min(1 + more);
            }
        }
        out.push((r0, r0 + n));
        r0 += n;
    }
    Ok(out)
}

/// The binding of rows `r0..r1` of a view and the view's offset within it (in elements of
/// the view's storage type).
pub(super) fn bind_rows<'a>(
    ctx: &Ctx,
    v: &Rows<'a>,
    r0: usize,
    r1: usize,
) -> Result<(Bind<'a>, u32)> {
    let lo = v.off + r0 * v.rs;
    let hi = v.off + (r1 - 1) * v.rs + v.w.max(1) - 1;
    let (b, start) = Bind::elems(ctx, v.buf, lo, hi);
    if hi + 1 - start > elem_limits(ctx, v.buf).0 {
        return Err(err(format!(
            "a range of {} values exceeds the {}-byte storage binding limit",
            hi + 1 - start,
            ctx.max_binding
        )));
    }
    Ok((b, (lo - start) as u32))
}

// ---- embedding ----------------------------------------------------------------------------

/// The chunk (index into `chunks`) holding row `r`.
fn chunk_of(chunks: &[(usize, usize)], r: usize) -> usize {
    chunks.partition_point(|&(_, end)| end <= r)
}

pub(super) fn gather_rows(be: &Wgpu, t: &Tensor<Wgpu>, idx: &[u32]) -> Result<Tensor<Wgpu>> {
    let (n, d) = (t.dim(0), t.dim(1));
    let out = be.alloc(&[idx.len(), d]);
    if idx.is_empty() || d == 0 {
        return Ok(out);
    }
    let ctx = &*be.ctx;
    let tab_chunks = row_ranges(ctx, n, &[d])?;
    let out_chunks = row_ranges(ctx, idx.len(), &[d])?;
    let per_batch = capacity(ctx) / 2;
    // (output chunk, table chunk) -> pairs (output row, table row), relative to the chunks.
    let mut groups: BTreeMap<(usize, usize), Vec<u32>> = BTreeMap::new();
    for (o, &i) in idx.iter().enumerate() {
        let (oc, tc) = (chunk_of(&out_chunks, o), chunk_of(&tab_chunks, i as usize));
        let (Some(&(o0, _)), Some(&(t0, _))) = (out_chunks.get(oc), tab_chunks.get(tc)) else {
            return Err(Error::arg(
                "idx",
                format!("row index {i} out of range 0..{n}"),
            ));
        };
        let pairs = groups.entry((oc, tc)).or_default();
        pairs.push((o - o0) as u32);
        pairs.push(i - t0 as u32);
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
    let (n, d) = (dst.dim(0), dst.dim(1));
    Wgpu::mutable("scatter_add_rows", dst)?;
    if idx.is_empty() || d == 0 {
        return Ok(());
    }
    let ctx = &*be.ctx;
    let dst_chunks = row_ranges(ctx, n, &[d])?;
    let src_chunks = row_ranges(ctx, idx.len(), &[d])?;
    let cap = capacity(ctx);
    if cap < 4 {
        return Err(err("storage binding limit too small for a scatter list"));
    }
    // CSR per (destination chunk, source chunk): destination rows ascending, each with its
    // source rows in ascending order, so the sum order equals the CPU's (src row 0 first).
    let mut csr: BTreeMap<(usize, usize), BTreeMap<u32, Vec<u32>>> = BTreeMap::new();
    for (s, &i) in idx.iter().enumerate() {
        let (dc, sc) = (chunk_of(&dst_chunks, i as usize), chunk_of(&src_chunks, s));
        let (Some(&(d0, _)), Some(&(s0, _))) = (dst_chunks.get(dc), src_chunks.get(sc)) else {
            return Err(Error::arg(
                "idx",
                format!("row index {i} out of range 0..{n}"),
            ));
        };
        csr.entry((dc, sc))
            .or_default()
            .entry(i - d0 as u32)
            .or_default()
            .push((s - s0) as u32);
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
