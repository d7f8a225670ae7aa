//! DoRA, VeRA and AdaLoRA on the wgpu backend, and the LoRA gradient products shared with
//! the base-agnostic adapter terms. Same contracts as the trait docs; same math as
//! `backend/cpu/adapters.rs`.
//!
//! Every product is the one matmul of `shaders/matmul.wgsl`, its epilogue carrying the
//! per-column and per-rank scales: AdaLoRA's `E` is the column scale of `h = x (A ⊙ E)^T` and
//! the rank scale (`jscale`) of `c gB (A ⊙ E)`; VeRA's `lambda_d` is `jscale` and `lambda_b`
//! `nscale`; `As = vera_A[:, :in]` and `Bs = vera_B[:out, :]` are strided views, never copied.
//! Merges that add a low-rank product into `W` run as `K = 0` matmuls (epilogue only). The rest
//! are the small kernels of `shaders/adapters.wgsl`: deterministic row and column reductions
//! (compensated f32 partial sums, where the CPU sums in f64, combined in a fixed order: the
//! row sums by the shared reduction prelude, i.e. subgroup sums where the device has them,
//! else a workgroup-memory tree), row scalings, and DoRA's norm from its low-rank terms.
//! Tensors wider than one storage binding are processed in bound ranges of rows.

use super::ctx::Bind;
use super::matmul::{LowRank, Matmul, Operand};
use super::{GpuBuf, Wgpu};
use crate::backend::{AdaLoraGrads, Backend, DoraGrads, DoraSaved, Tensor, check};
use crate::error::{Error, Result};

const SRC: &str = include_str!("../../../shaders/adapters.wgsl");

const F_V: u32 = 1;
const F_ACC: u32 = 2;
const F_DIV: u32 = 4;

fn backend_err(msg: String) -> Error {
    Error::Backend {
        backend: "wgpu".into(),
        msg,
    }
}

/// A 2-D view of a buffer: row `i`, column `c` is element `off + i * rs + c`, `w` columns.
#[derive(Clone, Copy)]
pub(super) struct Rows<'a> {
    pub buf: &'a GpuBuf,
    pub off: usize,
    pub rs: usize,
    pub w: usize,
}

impl<'a> Rows<'a> {
    /// A row-major `[rows, w]` tensor.
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

/// Storage binding limit and offset alignment, in 32-bit words.
pub(super) fn limits(be: &Wgpu) -> (usize, usize) {
    (
        (be.ctx.max_binding / 4) as usize,
        (be.ctx.offset_align / 4).max(1) as usize,
    )
}

/// A binding of words `lo..=hi` of `buf` from an aligned word at or before `lo`; returns it
/// with the index of its first word. Errors when the range exceeds one binding.
pub(super) fn bind_words<'a>(
    be: &Wgpu,
    buf: &'a GpuBuf,
    lo: usize,
    hi: usize,
) -> Result<(Bind<'a>, usize)> {
    let (limit, align) = limits(be);
    let start = lo / align * align;
    if hi + 1 - start > limit {
        return Err(backend_err(format!(
            "a range of {} words exceeds the {}-byte storage binding limit",
            hi + 1 - start,
            be.ctx.max_binding
        )));
    }
    Ok((
        Bind::range(buf, 4 * start as u64, 4 * (hi + 1 - start) as u64),
        start,
    ))
}

/// Elements of one storage binding and the offset alignment, in elements of `buf`'s storage
/// type (f32 or a frozen f16 weight).
fn elem_limits(be: &Wgpu, buf: &GpuBuf) -> (usize, usize) {
    let esz = buf.dtype.size();
    (
        be.ctx.max_binding as usize / esz,
        (be.ctx.offset_align as usize / esz).max(1),
    )
}

/// Ranges of rows covering `0..rows` such that the rows of each view bind within one storage
/// binding. Errors when a single row does not fit.
pub(super) fn row_chunks(
    be: &Wgpu,
    rows: usize,
    views: &[Rows<'_>],
) -> Result<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < rows {
        let mut n = rows - r0;
        for v in views {
            let (limit, align) = elem_limits(be, v.buf);
            let pad = (v.off + r0 * v.rs) % align;
            let w = v.w.max(1);
            if pad + w > limit {
                return Err(backend_err(format!(
                    "a row of {w} values exceeds the {}-byte storage binding limit",
                    be.ctx.max_binding
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
fn bind_rows<'a>(be: &Wgpu, v: &Rows<'a>, r0: usize, r1: usize) -> Result<(Bind<'a>, u32)> {
    let lo = v.off + r0 * v.rs;
    let hi = v.off + (r1 - 1) * v.rs + v.w.max(1) - 1;
    let (b, start) = Bind::elems(&be.ctx, v.buf, lo, hi);
    if hi + 1 - start > elem_limits(be, v.buf).0 {
        return Err(backend_err(format!(
            "a range of {} values exceeds the {}-byte storage binding limit",
            hi + 1 - start,
            be.ctx.max_binding
        )));
    }
    Ok((b, (lo - start) as u32))
}

/// A 2-D grid of `n` workgroups within the per-dimension dispatch limit.
pub(super) fn grid(be: &Wgpu, n: usize) -> (u32, u32, u32) {
    let gx = n.clamp(1, be.ctx.max_groups as usize);
    (gx as u32, n.div_ceil(gx) as u32, 1)
}

/// The parameter block of `shaders/adapters.wgsl`.
#[derive(Default)]
struct Params {
    rows: usize,
    cols: usize,
    flags: u32,
    s: f32,
    x: (u32, usize),
    y: (u32, usize),
    z: (u32, usize),
    o: (u32, usize),
    v_off: u32,
}

impl Params {
    fn words(&self) -> Vec<u32> {
        vec![
            self.rows as u32,
            self.cols as u32,
            self.flags,
            self.s.to_bits(),
            self.x.0,
            self.x.1 as u32,
            self.y.0,
            self.y.1 as u32,
            self.z.0,
            self.z.1 as u32,
            self.o.0,
            self.o.1 as u32,
            self.v_off,
        ]
    }
}

/// Dispatches `entry`; where `x` (binding 1) or `y` (binding 2) is a frozen f16 weight, the
/// variant of the module that reads it as f16 (one cached pipeline per variant).
fn run(
    be: &Wgpu,
    entry: &str,
    p: &Params,
    binds: Vec<(u32, Bind<'_>)>,
    groups: (u32, u32, u32),
) -> Result<()> {
    let f16: Vec<(&str, u32)> = [("x", 1), ("y", 2)]
        .into_iter()
        .filter(|&(_, i)| binds.iter().any(|(j, b)| *j == i && b.f16))
        .collect();
    let kernel = be.ctx.reduce_kernel_f16("adapters", SRC, entry, &f16)?;
    be.ctx.dispatch(&kernel, &p.words(), &binds, groups)
}

/// `o[i] = sum_c x[i, c] y[i, c] (* v[c])` for `i < rows`, `c < cols` (o unchanged when
/// `cols = 0`).
pub(super) fn rowdot(
    be: &Wgpu,
    rows: usize,
    cols: usize,
    x: Rows<'_>,
    y: Rows<'_>,
    v: Option<&GpuBuf>,
    o: Rows<'_>,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    for (r0, r1) in row_chunks(be, rows, &[x, y, o])? {
        let (bx, xo) = bind_rows(be, &x, r0, r1)?;
        let (by, yo) = bind_rows(be, &y, r0, r1)?;
        let (bo, oo) = bind_rows(be, &o, r0, r1)?;
        let p = Params {
            rows: r1 - r0,
            cols,
            flags: if v.is_some() { F_V } else { 0 },
            x: (xo, x.rs),
            y: (yo, y.rs),
            o: (oo, o.rs),
            ..Default::default()
        };
        let bv = v.map(Bind::all).unwrap_or_else(|| be.ctx.dummy());
        let binds = vec![(1, bx), (2, by), (3, bv), (4, bo)];
        run(be, "rowdot", &p, binds, grid(be, r1 - r0))?;
    }
    Ok(())
}

/// `o[c] = sum_i x[i, c] y[i, c]` (then `/ v[c]`) for `i < rows`, `c < cols`; `o` is `[cols]`
/// (left as is when `rows = 0`).
pub(super) fn colsum(
    be: &Wgpu,
    rows: usize,
    cols: usize,
    x: Rows<'_>,
    y: Rows<'_>,
    v: Option<&GpuBuf>,
    o: &GpuBuf,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let chunks = row_chunks(be, rows, &[x, y])?;
    let last = chunks.len() - 1;
    for (ci, &(r0, r1)) in chunks.iter().enumerate() {
        let (bx, xo) = bind_rows(be, &x, r0, r1)?;
        let (by, yo) = bind_rows(be, &y, r0, r1)?;
        let mut flags = if ci > 0 { F_ACC } else { 0 };
        if ci == last && v.is_some() {
            flags |= F_V;
        }
        let p = Params {
            rows: r1 - r0,
            cols,
            flags,
            x: (xo, x.rs),
            y: (yo, y.rs),
            ..Default::default()
        };
        let bv = v.map(Bind::all).unwrap_or_else(|| be.ctx.dummy());
        let binds = vec![(1, bx), (2, by), (3, bv), (4, Bind::all(o))];
        run(be, "colsum", &p, binds, grid(be, cols.div_ceil(64)))?;
    }
    Ok(())
}

/// `o[i, c] = x[i, c] * v[i]` (or `/ v[i]` with `div`); in place when `x` is `None`.
fn row_scale(
    be: &Wgpu,
    rows: usize,
    cols: usize,
    x: Option<Rows<'_>>,
    v: Rows<'_>,
    o: Rows<'_>,
    div: bool,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let mut views = vec![v, o];
    views.extend(x);
    for (r0, r1) in row_chunks(be, rows, &views)? {
        let (bv, vo) = bind_rows(be, &v, r0, r1)?;
        let (bo, oo) = bind_rows(be, &o, r0, r1)?;
        let mut p = Params {
            rows: r1 - r0,
            cols,
            flags: if div { F_DIV } else { 0 },
            o: (oo, o.rs),
            v_off: vo,
            ..Default::default()
        };
        let mut binds = vec![(3, bv), (4, bo)];
        let entry = match &x {
            Some(x) => {
                let (bx, xo) = bind_rows(be, x, r0, r1)?;
                p.x = (xo, x.rs);
                binds.push((1, bx));
                "row_scale"
            }
            None => "row_scale_inplace",
        };
        run(
            be,
            entry,
            &p,
            binds,
            grid(be, ((r1 - r0) * cols).div_ceil(256)),
        )?;
    }
    Ok(())
}

/// DoRA's `k = m / n` per output row, `[out]`.
fn dora_k(be: &Wgpu, m: &Tensor<Wgpu>, n: &Tensor<Wgpu>, dout: usize) -> Result<Tensor<Wgpu>> {
    let k = be.alloc(&[dout]);
    row_scale(
        be,
        dout,
        1,
        Some(Rows::vec(&m.buf, 0)),
        Rows::vec(&n.buf, 0),
        Rows::vec(&k.buf, 0),
        true,
    )?;
    Ok(k)
}

/// `o [t, cols] = k[col] * x (+ bias[col])` (the existing elementwise `colscale_bias`).
fn colscale(
    be: &Wgpu,
    o: &GpuBuf,
    x: &GpuBuf,
    n: usize,
    cols: usize,
    k: &GpuBuf,
    bias: Option<&GpuBuf>,
) -> Result<()> {
    be.elementwise(
        "colscale_bias",
        n,
        &[(1, o), (2, x)],
        &[(3, k), (4, bias.unwrap_or(k))],
        cols,
        u32::from(bias.is_some()),
        &[],
    )
}

/// `W [rows, cols] += scale * sum_q js[q] H(i, q) G(j, q)` in one pass over W (a `K = 0`
/// matmul: only the epilogue runs).
fn add_lowrank_into(
    be: &Wgpu,
    w: &GpuBuf,
    rows: usize,
    cols: usize,
    lr: LowRank<'_>,
) -> Result<()> {
    let mut mm = Matmul::new(
        rows,
        cols,
        0,
        Operand::n(w, 1),
        Operand::n(w, 1),
        w,
        1.0,
        1.0,
    );
    mm.lowrank = Some(lr);
    be.matmul(&mm)
}

/// `dA = s g^T x [r, in]` and `dB = s dy^T h [out, r]` (the LoRA factor gradients).
pub(super) fn lora_grads(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    x: &Tensor<Wgpu>,
    h: &Tensor<Wgpu>,
    g: &Tensor<Wgpu>,
    s: f32,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    let (t, din) = x.dims2("x")?;
    let (_, dout) = dy.dims2("dy")?;
    let (_, r) = g.dims2("g")?;
    let da = be.gemm(r, din, t, Operand::t(&g.buf, r), Operand::n(&x.buf, din), s)?;
    let db = be.gemm(
        dout,
        r,
        t,
        Operand::t(&dy.buf, dout),
        Operand::n(&h.buf, r),
        s,
    )?;
    Ok((da, db))
}

/// `y [t, dout] += s h B^T` in one pass over y (the matmul with K = 0 runs only its epilogue).
#[allow(clippy::too_many_arguments)]
pub(super) fn add_lowrank(
    be: &Wgpu,
    y: &GpuBuf,
    t: usize,
    dout: usize,
    h: &Tensor<Wgpu>,
    lora_b: &Tensor<Wgpu>,
    r: usize,
    s: f32,
) -> Result<()> {
    let lowrank = LowRank {
        r,
        h: Operand::n(&h.buf, r),
        g: Operand::n(&lora_b.buf, r),
        scale: s,
        jscale: None,
        nscale: None,
    };
    add_lowrank_into(be, y, t, dout, lowrank)
}

// ---- DoRA --------------------------------------------------------------------------------------

pub(super) fn row_sq_norms(be: &Wgpu, w: &Tensor<Wgpu>) -> Result<Tensor<Wgpu>> {
    let (dout, din) = w.dims2("w")?;
    let out = be.alloc(&[dout]);
    let rows = Rows::new(&w.buf, din);
    rowdot(be, dout, din, rows, rows, None, Rows::vec(&out.buf, 0))?;
    Ok(out)
}

/// DoRA's norm from `P = W0 A^T` `[out, r]` (however W0 is stored): `G = A A^T`, `Q = B G`,
/// then one kernel per row `sqrt(max(||W0||^2 + 2 s rowdot(P, B) + s^2 rowdot(Q, B), 0))`.
pub(super) fn dora_norm_from_p(
    be: &Wgpu,
    p: &Tensor<Wgpu>,
    w0_row_sq: &Tensor<Wgpu>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    s: f32,
) -> Result<Tensor<Wgpu>> {
    let (r, din) = a.dims2("lora_A")?;
    let (dout, _) = b.dims2("lora_B")?;
    let g = be.gemm(
        r,
        r,
        din,
        Operand::n(&a.buf, din),
        Operand::t(&a.buf, din),
        1.0,
    )?;
    let q = be.gemm(
        dout,
        r,
        r,
        Operand::n(&b.buf, r),
        Operand::n(&g.buf, r),
        1.0,
    )?;
    let out = be.alloc(&[dout]);
    if dout == 0 {
        return Ok(out);
    }
    let (pv, qv, bv) = (
        Rows::new(&p.buf, r),
        Rows::new(&q.buf, r),
        Rows::new(&b.buf, r),
    );
    let (sv, ov) = (Rows::vec(&w0_row_sq.buf, 0), Rows::vec(&out.buf, 0));
    for (r0, r1) in row_chunks(be, dout, &[pv, qv, bv, sv, ov])? {
        let (bp, po) = bind_rows(be, &pv, r0, r1)?;
        let (bq, qo) = bind_rows(be, &qv, r0, r1)?;
        let (bb, bo) = bind_rows(be, &bv, r0, r1)?;
        let (bs, so) = bind_rows(be, &sv, r0, r1)?;
        let (bn, no) = bind_rows(be, &ov, r0, r1)?;
        let params = Params {
            rows: r1 - r0,
            cols: r,
            s,
            x: (po, r),
            y: (qo, r),
            z: (bo, r),
            o: (no, 1),
            v_off: so,
            ..Default::default()
        };
        let binds = vec![(1, bp), (2, bq), (3, bs), (4, bn), (5, bb)];
        run(
            be,
            "dora_norm",
            &params,
            binds,
            grid(be, (r1 - r0).div_ceil(256)),
        )?;
    }
    Ok(out)
}

pub(super) fn dora_weight_norm(
    be: &Wgpu,
    w0: &Tensor<Wgpu>,
    w0_row_sq: &Tensor<Wgpu>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    s: f32,
) -> Result<Tensor<Wgpu>> {
    let (dout, din) = w0.dims2("w0")?;
    let r = check::lora(din, dout, a, b)?;
    check::vector("w0_row_sq", w0_row_sq, dout)?;
    let p = be.gemm(
        dout,
        r,
        din,
        Operand::n(&w0.buf, din),
        Operand::t(&a.buf, din),
        1.0,
    )?;
    dora_norm_from_p(be, &p, w0_row_sq, a, b, s)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_forward_from_base(
    be: &Wgpu,
    base_out: Tensor<Wgpu>,
    x: &Tensor<Wgpu>,
    bias: Option<&Tensor<Wgpu>>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    s: f32,
    m: &Tensor<Wgpu>,
    n: &Tensor<Wgpu>,
) -> Result<(Tensor<Wgpu>, DoraSaved<Wgpu>)> {
    let (t, din, dout, r) = check::adapter(x, a, b, "base_out", &base_out)?;
    check::dora_vectors(m, n, dout)?;
    if let Some(bias) = bias {
        bias.expect_shape("bias", &[dout])?;
    }
    // h = x A^T; z = base + s h B^T in base_out's buffer (K = 0 pass); y = (m / n) ⊙ z + bias.
    let h = be.gemm(
        t,
        r,
        din,
        Operand::n(&x.buf, din),
        Operand::t(&a.buf, din),
        1.0,
    )?;
    add_lowrank(be, &base_out.buf, t, dout, &h, b, r, s)?;
    let k = dora_k(be, m, n, dout)?;
    let y = be.alloc(&[t, dout]);
    colscale(
        be,
        &y.buf,
        &base_out.buf,
        t * dout,
        dout,
        &k.buf,
        bias.map(|b| &b.buf),
    )?;
    Ok((y, DoraSaved { h, z: base_out }))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_backward_adapter(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    x: &Tensor<Wgpu>,
    saved: &DoraSaved<Wgpu>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    s: f32,
    m: &Tensor<Wgpu>,
    n: &Tensor<Wgpu>,
) -> Result<(DoraGrads<Wgpu>, Tensor<Wgpu>)> {
    let (t, din, dout, r) = check::adapter(x, a, b, "dy", dy)?;
    check::dora_vectors(m, n, dout)?;
    saved.h.expect_shape("saved.h", &[t, r])?;
    saved.z.expect_shape("saved.z", &[t, dout])?;
    // dm = sum_T(dy ⊙ z) / n, a deterministic column reduction.
    let dm = be.alloc(&[dout]);
    colsum(
        be,
        t,
        dout,
        Rows::new(&dy.buf, dout),
        Rows::new(&saved.z.buf, dout),
        Some(&n.buf),
        &dm.buf,
    )?;
    // g' = dy ⊙ k; gB = g' B; dx = s gB A; dA = s gB^T x; dB = s g'^T h.
    let k = dora_k(be, m, n, dout)?;
    let gk = be.alloc(&[t, dout]);
    colscale(be, &gk.buf, &dy.buf, t * dout, dout, &k.buf, None)?;
    let gb = be.gemm(
        t,
        r,
        dout,
        Operand::n(&gk.buf, dout),
        Operand::n(&b.buf, r),
        1.0,
    )?;
    let dx = be.gemm(
        t,
        din,
        r,
        Operand::n(&gb.buf, r),
        Operand::n(&a.buf, din),
        s,
    )?;
    let (da, db) = lora_grads(be, &gk, x, &saved.h, &gb, s)?;
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

/// Checks the merge inputs; returns `(out, in, r)`.
fn dora_merge_dims(
    w: &Tensor<Wgpu>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    m: &Tensor<Wgpu>,
    n: &Tensor<Wgpu>,
) -> Result<(usize, usize, usize)> {
    let (dout, din) = w.dims2("w")?;
    let r = check::lora(din, dout, a, b)?;
    check::dora_vectors(m, n, dout)?;
    Ok((dout, din, r))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_merge(
    be: &Wgpu,
    w: &mut Tensor<Wgpu>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    s: f32,
    m: &Tensor<Wgpu>,
    n: &Tensor<Wgpu>,
) -> Result<()> {
    let (dout, din, r) = dora_merge_dims(w, a, b, m, n)?;
    Wgpu::mutable("dora_merge", w)?;
    // W += s B A, then each row times k = m / n.
    be.gemm_into(
        dout,
        din,
        r,
        Operand::n(&b.buf, r),
        Operand::n(&a.buf, din),
        s,
        1.0,
        &w.buf,
    )?;
    let k = dora_k(be, m, n, dout)?;
    row_scale(
        be,
        dout,
        din,
        None,
        Rows::vec(&k.buf, 0),
        Rows::new(&w.buf, din),
        false,
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dora_unmerge(
    be: &Wgpu,
    w: &mut Tensor<Wgpu>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    s: f32,
    m: &Tensor<Wgpu>,
    n: &Tensor<Wgpu>,
) -> Result<()> {
    let (dout, din, r) = dora_merge_dims(w, a, b, m, n)?;
    Wgpu::mutable("dora_unmerge", w)?;
    // k on the host, as the CPU computes it, to check that it is invertible (merges are not on
    // the training path; this reads back 2 * out values).
    let (mh, nh) = (be.download(m)?, be.download(n)?);
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
    // PEFT: weight / dora_factor - delta_weight (a division, as PEFT does, not a reciprocal).
    let kd = be.ctx.upload(&k);
    row_scale(
        be,
        dout,
        din,
        None,
        Rows::vec(&kd, 0),
        Rows::new(&w.buf, din),
        true,
    )?;
    be.gemm_into(
        dout,
        din,
        r,
        Operand::n(&b.buf, r),
        Operand::n(&a.buf, din),
        -s,
        1.0,
        &w.buf,
    )
}

// ---- VeRA --------------------------------------------------------------------------------------

/// `lambda_b[:, None] ⊙ Bs` `[out, r]` (a small temporary; `Bs` is the first `out` rows of
/// vera_B).
fn vera_bl(
    be: &Wgpu,
    vera_b: &Tensor<Wgpu>,
    lambda_b: &Tensor<Wgpu>,
    dout: usize,
    r: usize,
) -> Result<Tensor<Wgpu>> {
    let bl = be.alloc(&[dout, r]);
    row_scale(
        be,
        dout,
        r,
        Some(Rows::new(&vera_b.buf, r)),
        Rows::vec(&lambda_b.buf, 0),
        Rows::new(&bl.buf, r),
        false,
    )?;
    Ok(bl)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vera_forward(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    w0: &Tensor<Wgpu>,
    bias: Option<&Tensor<Wgpu>>,
    vera_a: &Tensor<Wgpu>,
    vera_b: &Tensor<Wgpu>,
    lambda_d: &Tensor<Wgpu>,
    lambda_b: &Tensor<Wgpu>,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    let (t, din, dout) = check::linear(x, w0)?;
    let (r, max_in) = check::vera(din, dout, vera_a, vera_b, lambda_d, lambda_b)?;
    if let Some(b) = bias {
        check::vector("bias", b, dout)?;
    }
    // h = x As^T with As^T read through vera_A's row stride max_in.
    let h = be.gemm(
        t,
        r,
        din,
        Operand::n(&x.buf, din),
        Operand::t(&vera_a.buf, max_in),
        1.0,
    )?;
    // y = x W0^T + bias + lambda_b ⊙ ((lambda_d ⊙ h) Bs^T) in one pass.
    let y = be.linear_lowrank(
        x,
        w0,
        bias,
        Some(LowRank {
            r,
            h: Operand::n(&h.buf, r),
            g: Operand::n(&vera_b.buf, r),
            scale: 1.0,
            jscale: Some(&lambda_d.buf),
            nscale: Some(&lambda_b.buf),
        }),
    )?;
    Ok((y, h))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vera_backward(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    x: &Tensor<Wgpu>,
    h: &Tensor<Wgpu>,
    w0: &Tensor<Wgpu>,
    vera_a: &Tensor<Wgpu>,
    vera_b: &Tensor<Wgpu>,
    lambda_d: &Tensor<Wgpu>,
    lambda_b: &Tensor<Wgpu>,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>, Tensor<Wgpu>)> {
    let (t, din, dout) = check::linear(x, w0)?;
    let (r, max_in) = check::vera(din, dout, vera_a, vera_b, lambda_d, lambda_b)?;
    dy.expect_shape("dy", &[t, dout])?;
    h.expect_shape("h", &[t, r])?;
    // q = (dy ⊙ lambda_b) Bs = dy (lambda_b[:, None] ⊙ Bs)  [T, r]
    let bl = vera_bl(be, vera_b, lambda_b, dout, r)?;
    let q = be.gemm(
        t,
        r,
        dout,
        Operand::n(&dy.buf, dout),
        Operand::n(&bl.buf, r),
        1.0,
    )?;
    // dlambda_d = sum_T(q ⊙ h)
    let dld = be.alloc(&[r]);
    colsum(
        be,
        t,
        r,
        Rows::new(&q.buf, r),
        Rows::new(&h.buf, r),
        None,
        &dld.buf,
    )?;
    // dx = dy W0 + (q ⊙ lambda_d) As in one pass (lambda_d as the rank scale).
    let dx = be.backward_input_lowrank(
        dy,
        w0,
        LowRank {
            r,
            h: Operand::n(&q.buf, r),
            g: Operand::t(&vera_a.buf, max_in),
            scale: 1.0,
            jscale: Some(&lambda_d.buf),
            nscale: None,
        },
    )?;
    // dlambda_b[o] = sum_j (dy^T h)[o, j] Bs[o, j] lambda_d[j]
    let gh = be.gemm(
        dout,
        r,
        t,
        Operand::t(&dy.buf, dout),
        Operand::n(&h.buf, r),
        1.0,
    )?;
    let dlb = be.alloc(&[dout]);
    rowdot(
        be,
        dout,
        r,
        Rows::new(&gh.buf, r),
        Rows::new(&vera_b.buf, r),
        Some(&lambda_d.buf),
        Rows::vec(&dlb.buf, 0),
    )?;
    Ok((dx, dld, dlb))
}

pub(super) fn vera_merge(
    be: &Wgpu,
    w: &mut Tensor<Wgpu>,
    vera_a: &Tensor<Wgpu>,
    vera_b: &Tensor<Wgpu>,
    lambda_d: &Tensor<Wgpu>,
    lambda_b: &Tensor<Wgpu>,
    sign: f32,
) -> Result<()> {
    let (dout, din) = w.dims2("w")?;
    let (r, max_in) = check::vera(din, dout, vera_a, vera_b, lambda_d, lambda_b)?;
    Wgpu::mutable("vera_merge", w)?;
    // W += sign (lambda_b ⊙ Bs) diag(lambda_d) As: lambda_b scales W's rows, so it goes into
    // the [out, r] factor; lambda_d is the rank scale of a K = 0 pass over W.
    let bl = vera_bl(be, vera_b, lambda_b, dout, r)?;
    add_lowrank_into(
        be,
        &w.buf,
        dout,
        din,
        LowRank {
            r,
            h: Operand::n(&bl.buf, r),
            g: Operand::t(&vera_a.buf, max_in),
            scale: sign,
            jscale: Some(&lambda_d.buf),
            nscale: None,
        },
    )
}

// ---- AdaLoRA -----------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_forward(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    w0: &Tensor<Wgpu>,
    bias: Option<&Tensor<Wgpu>>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    e: &Tensor<Wgpu>,
    scaling: f32,
    ranknum: f32,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    let (t, din, dout) = check::linear(x, w0)?;
    let r = check::adalora(din, dout, a, b, e)?;
    let c = check::adalora_factor(scaling, ranknum)?;
    if let Some(b) = bias {
        check::vector("bias", b, dout)?;
    }
    // h = x (A ⊙ E)^T = E[j] (x A^T)[:, j]: E is h's column scale.
    let h = be.alloc(&[t, r]);
    let mut mh = Matmul::new(
        t,
        r,
        din,
        Operand::n(&x.buf, din),
        Operand::t(&a.buf, din),
        &h.buf,
        1.0,
        0.0,
    );
    mh.colscale = Some(&e.buf);
    be.matmul(&mh)?;
    // y = x W0^T + bias + c h B^T in one pass.
    let y = be.linear_lowrank(
        x,
        w0,
        bias,
        Some(LowRank {
            r,
            h: Operand::n(&h.buf, r),
            g: Operand::n(&b.buf, r),
            scale: c,
            jscale: None,
            nscale: None,
        }),
    )?;
    Ok((y, h))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_backward(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    x: &Tensor<Wgpu>,
    h: &Tensor<Wgpu>,
    w0: &Tensor<Wgpu>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    e: &Tensor<Wgpu>,
    scaling: f32,
    ranknum: f32,
) -> Result<AdaLoraGrads<Wgpu>> {
    let (t, din, dout) = check::linear(x, w0)?;
    let r = check::adalora(din, dout, a, b, e)?;
    let c = check::adalora_factor(scaling, ranknum)?;
    dy.expect_shape("dy", &[t, dout])?;
    h.expect_shape("h", &[t, r])?;
    // gB = dy B [T, r]
    let gb = be.gemm(
        t,
        r,
        dout,
        Operand::n(&dy.buf, dout),
        Operand::n(&b.buf, r),
        1.0,
    )?;
    // dx = dy W0 + c gB (A ⊙ E) in one pass (E as the rank scale).
    let dx = be.backward_input_lowrank(
        dy,
        w0,
        LowRank {
            r,
            h: Operand::n(&gb.buf, r),
            g: Operand::t(&a.buf, din),
            scale: c,
            jscale: Some(&e.buf),
            nscale: None,
        },
    )?;
    // dB = c dy^T h
    let db = be.gemm(
        dout,
        r,
        t,
        Operand::t(&dy.buf, dout),
        Operand::n(&h.buf, r),
        c,
    )?;
    // M = c gB^T x [r, in]; dE[j] = rowdot(M, A)[j]; dA = M ⊙ E (in place).
    let mmat = be.gemm(
        r,
        din,
        t,
        Operand::t(&gb.buf, r),
        Operand::n(&x.buf, din),
        c,
    )?;
    let de = be.alloc(&[r, 1]);
    rowdot(
        be,
        r,
        din,
        Rows::new(&mmat.buf, din),
        Rows::new(&a.buf, din),
        None,
        Rows::vec(&de.buf, 0),
    )?;
    row_scale(
        be,
        r,
        din,
        None,
        Rows::vec(&e.buf, 0),
        Rows::new(&mmat.buf, din),
        false,
    )?;
    Ok(AdaLoraGrads {
        dx,
        d_lora_a: mmat,
        d_lora_b: db,
        d_lora_e: de,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adalora_merge(
    be: &Wgpu,
    w: &mut Tensor<Wgpu>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    e: &Tensor<Wgpu>,
    scaling: f32,
    ranknum: f32,
    sign: f32,
) -> Result<()> {
    let (dout, din) = w.dims2("w")?;
    let r = check::adalora(din, dout, a, b, e)?;
    let c = check::adalora_factor(scaling, ranknum)?;
    Wgpu::mutable("adalora_merge", w)?;
    // W += sign c B diag(E) A: a K = 0 pass over W with E as the rank scale.
    add_lowrank_into(
        be,
        &w.buf,
        dout,
        din,
        LowRank {
            r,
            h: Operand::n(&b.buf, r),
            g: Operand::t(&a.buf, din),
            scale: sign * c,
            jscale: Some(&e.buf),
            nscale: None,
        },
    )
}
