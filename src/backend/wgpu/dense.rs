//! wgpu dense linear algebra: the base products `x W^T (+ epilogue)` and `dy W (+ epilogue)`
//! over a dense or NF4 weight, `dy^T x`, elementwise updates, sums of squares and row norms,
//! and the deterministic row/column reductions the low-rank gradients and the AdaLoRA scores
//! use. Same math as `backend/cpu/dense.rs`.
//!
//! Every product is the one tiled matmul of `shaders/matmul.wgsl` ([`super::matmul`]), whose
//! epilogue adds a low-rank term in the same pass over the output; the NF4 base goes through
//! `nf4.rs`, tile by tile. The reductions are the small kernels of `shaders/adapters.wgsl`
//! (compensated f32 partial sums, where the CPU sums in f64, combined in a fixed order: the row
//! sums by the shared reduction prelude, i.e. subgroup sums where the device has them, else a
//! workgroup-memory tree); tensors wider than one storage binding are processed in bound ranges
//! of rows.

use super::ctx::{Bind, GpuBuf};
use super::matmul::{self, LowRank, Matmul, Operand};
use super::memory::{Rows, bind_rows, capacity, grid, kernel, limits, span, view_chunks};
use super::{Wgpu, nf4};
use crate::backend::{Base, Tensor};
use crate::error::Result;

const ELEMENTWISE: &str = include_str!("../../../shaders/elementwise.wgsl");
const REDUCTIONS: &str = include_str!("../../../shaders/adapters.wgsl");
const NORM: &str = include_str!("../../../shaders/norm.wgsl");

/// Elements summed by one workgroup of `norm.wgsl`'s `sum_squares` (its `SQ_BLOCK`).
const SQ_BLOCK: usize = 4096;

const F_V: u32 = 1;
const F_ACC: u32 = 2;
const F_DIV: u32 = 4;
/// rowdot, colsum: y is all ones and not read (plain sums).
pub(super) const F_ONE_Y: u32 = 8;

impl Wgpu {
    /// Runs the elementwise kernel `entry` over `n` elements. `arrays` are `(binding, buffer)`
    /// pairs of n-element arrays, bound in matching ranges when `n` exceeds one binding;
    /// `vectors` are bound whole (per-column vectors). `f` are the scalar parameters.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn elementwise(
        &self,
        entry: &str,
        n: usize,
        arrays: &[(u32, &GpuBuf)],
        vectors: &[(u32, &GpuBuf)],
        cols: usize,
        flags: u32,
        f: &[f32],
    ) -> Result<()> {
        let kernel = self
            .ctx
            .kernel(&format!("elementwise.{entry}"), ELEMENTWISE, entry)?;
        let align = (self.ctx.offset_align / 4).max(1) as usize;
        let chunk = ((self.ctx.max_binding / 4) as usize / align * align).max(align);
        let mut e0 = 0;
        while e0 < n {
            let len = chunk.min(n - e0);
            let mut params = vec![len as u32, e0 as u32, cols.max(1) as u32, flags];
            params.extend(f.iter().map(|v| v.to_bits()));
            let mut binds: Vec<(u32, Bind<'_>)> = arrays
                .iter()
                .map(|&(i, b)| (i, Bind::range(b, 4 * e0 as u64, 4 * len as u64)))
                .collect();
            binds.extend(vectors.iter().map(|&(i, b)| (i, Bind::all(b))));
            let groups = len.div_ceil(256);
            let gx = groups.min(self.ctx.max_groups as usize);
            self.ctx.dispatch(
                &kernel,
                &params,
                &binds,
                (gx as u32, groups.div_ceil(gx) as u32, 1),
            )?;
            e0 += len;
        }
        Ok(())
    }

    pub(super) fn matmul(&self, mm: &Matmul<'_>) -> Result<()> {
        matmul::run(&self.ctx, mm)
    }

    /// `out [m, n] = alpha * A B (+ beta * out)` for row-major operands given as strided views.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_into(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Operand<'_>,
        b: Operand<'_>,
        alpha: f32,
        beta: f32,
        out: &GpuBuf,
    ) -> Result<()> {
        self.matmul(&Matmul::new(m, n, k, a, b, out, alpha, beta))
    }

    /// A new `[m, n]` tensor holding `alpha * A B`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Operand<'_>,
        b: Operand<'_>,
        alpha: f32,
    ) -> Result<Tensor<Wgpu>> {
        let out = self.alloc(&[m, n]);
        self.gemm_into(m, n, k, a, b, alpha, 0.0, &out.buf)?;
        Ok(out)
    }
}

// ---- the base products --------------------------------------------------------------------

/// `y = x W^T (+ bias) (+ the low-rank term)` for x `[t, in]` over a dense, bf16 (held as
/// frozen f32/f16) or NF4 base, in one pass over y (an NF4 base: one per tile of W's rows, see [`nf4::linear`]; the term must then
/// have no per-output scale).
pub(super) fn base_product(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    base: Base<'_, Wgpu>,
    bias: Option<&Tensor<Wgpu>>,
    lowrank: Option<LowRank<'_>>,
) -> Result<Tensor<Wgpu>> {
    let (t, din) = (x.dim(0), x.dim(1));
    let dout = base.dims().0;
    let y = be.alloc(&[t, dout]);
    let w = match base {
        Base::Dense(w) => w,
        Base::Bf16(w) => &w.buf,
        Base::Nf4(w) => {
            nf4::linear(be, x, w, bias, lowrank, &y.buf, None)?;
            return Ok(y);
        }
    };
    let mut mm = Matmul::new(
        t,
        dout,
        din,
        Operand::n(&x.buf, din),
        Operand::t(&w.buf, din),
        &y.buf,
        1.0,
        0.0,
    );
    mm.bias = bias.map(|b| &b.buf);
    mm.lowrank = lowrank;
    be.matmul(&mm)?;
    Ok(y)
}

/// `dx (+)= dy W (+ the low-rank term)` for dy `[t, out]` over a dense, bf16 or NF4 base, in
/// one pass over dx per product (an NF4 base: one per tile, the term on the first); adds into
/// `acc` when given, else returns the new dx.
pub(super) fn base_backward(
    be: &Wgpu,
    dy: &GpuBuf,
    t: usize,
    base: Base<'_, Wgpu>,
    lowrank: Option<LowRank<'_>>,
    acc: Option<&mut Tensor<Wgpu>>,
) -> Result<Option<Tensor<Wgpu>>> {
    let (dout, din) = base.dims();
    let mut fresh = None;
    let (dx, beta) = match acc {
        Some(dx) => (&dx.buf, 1.0),
        None => (&fresh.insert(be.alloc(&[t, din])).buf, 0.0),
    };
    let w = match base {
        Base::Dense(w) => w,
        Base::Bf16(w) => &w.buf,
        Base::Nf4(w) => {
            nf4::backward_into(be, dy, t, w, lowrank, dx, beta)?;
            return Ok(fresh);
        }
    };
    let mut mm = Matmul::new(
        t,
        din,
        dout,
        Operand::n(dy, dout),
        Operand::n(&w.buf, din),
        dx,
        1.0,
        beta,
    );
    mm.lowrank = lowrank;
    be.matmul(&mm)?;
    Ok(fresh)
}

/// `dW += dy^T x` (a frozen dW is refused).
pub(super) fn backward_weight(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    x: &Tensor<Wgpu>,
    dw: &mut Tensor<Wgpu>,
) -> Result<()> {
    let (t, dout, din) = (dy.dim(0), dy.dim(1), x.dim(1));
    Wgpu::mutable("linear_backward_weight", dw)?;
    let (a, b) = (Operand::t(&dy.buf, dout), Operand::n(&x.buf, din));
    be.gemm_into(dout, din, t, a, b, 1.0, 1.0, &dw.buf)
}

/// `W [rows, cols] += scale * sum_q js[q] H(i, q) G(j, q)` in one pass over W (a `K = 0`
/// matmul: only the epilogue runs).
pub(super) fn add_lowrank_into(
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

// ---- elementwise --------------------------------------------------------------------------

pub(super) fn axpy(be: &Wgpu, a: &mut Tensor<Wgpu>, alpha: f32, b: &Tensor<Wgpu>) -> Result<()> {
    Wgpu::mutable("axpy", a)?;
    be.elementwise(
        "axpy",
        a.len(),
        &[(1, &a.buf), (2, &b.buf)],
        &[],
        0,
        0,
        &[alpha],
    )
}

pub(super) fn scale(be: &Wgpu, a: &mut Tensor<Wgpu>, alpha: f32) -> Result<()> {
    Wgpu::mutable("scale", a)?;
    scale_buf(be, &a.buf, a.len(), alpha)
}

/// `v[..n] *= alpha`.
pub(super) fn scale_buf(be: &Wgpu, v: &GpuBuf, n: usize, alpha: f32) -> Result<()> {
    be.elementwise("scale", n, &[(1, v)], &[], 0, 0, &[alpha])
}

/// `o [n / cols, cols] = k[col] * x (+ bias[col])`: a column scale of a row-major matrix
/// (DoRA's `y = (m / n) ⊙ z + bias`, `dy ⊙ (m / n)`, `B diag(ρ)`).
pub(super) fn colscale(
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

/// The sum of squares of every element, partial sums per block on the device and their total
/// in f64 on the host (one readback).
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

/// `||W||_row^2 [out]` of a dense (f32 or frozen f16), bf16 or NF4 base.
pub(super) fn row_sq_norms(be: &Wgpu, base: Base<'_, Wgpu>) -> Result<Tensor<Wgpu>> {
    let w = match base {
        Base::Dense(w) => w,
        Base::Bf16(w) => &w.buf,
        Base::Nf4(w) => return nf4::row_sq_norms(be, w),
    };
    let (dout, din) = (w.dim(0), w.dim(1));
    let out = be.alloc(&[dout]);
    let rows = Rows::new(&w.buf, din);
    rowdot(be, dout, din, rows, rows, None, Rows::vec(&out.buf, 0))?;
    Ok(out)
}

// ---- reductions and row scalings (shaders/adapters.wgsl) ----------------------------------

/// The parameter block of `shaders/adapters.wgsl`.
#[derive(Default)]
pub(super) struct Params {
    pub rows: usize,
    pub cols: usize,
    pub flags: u32,
    pub s: f32,
    pub x: (u32, usize),
    pub y: (u32, usize),
    pub z: (u32, usize),
    pub o: (u32, usize),
    pub v_off: u32,
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

/// Dispatches `entry` of `shaders/adapters.wgsl`; where `x` (binding 1) or `y` (binding 2) is
/// a frozen f16 weight, the variant of the module that reads it as f16 (one cached pipeline
/// per variant).
pub(super) fn run(
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
    let kernel = be
        .ctx
        .reduce_kernel_f16("adapters", REDUCTIONS, entry, &f16)?;
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
    rowdot_flags(be, rows, cols, x, y, v, o, 0)
}

/// [`rowdot`] with extra shader flags ([`F_ONE_Y`]: y is not read).
#[allow(clippy::too_many_arguments)]
pub(super) fn rowdot_flags(
    be: &Wgpu,
    rows: usize,
    cols: usize,
    x: Rows<'_>,
    y: Rows<'_>,
    v: Option<&GpuBuf>,
    o: Rows<'_>,
    extra: u32,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let ctx = &*be.ctx;
    for (r0, r1) in view_chunks(ctx, rows, &[x, y, o])? {
        let (bx, xo) = bind_rows(ctx, &x, r0, r1)?;
        let (by, yo) = bind_rows(ctx, &y, r0, r1)?;
        let (bo, oo) = bind_rows(ctx, &o, r0, r1)?;
        let p = Params {
            rows: r1 - r0,
            cols,
            flags: extra | if v.is_some() { F_V } else { 0 },
            x: (xo, x.rs),
            y: (yo, y.rs),
            o: (oo, o.rs),
            ..Default::default()
        };
        let bv = v.map(Bind::all).unwrap_or_else(|| ctx.dummy());
        let binds = vec![(1, bx), (2, by), (3, bv), (4, bo)];
        run(be, "rowdot", &p, binds, grid(ctx, r1 - r0))?;
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
    colsum_flags(be, rows, cols, x, y, v, o, 0)
}

/// [`colsum`] with extra shader flags ([`F_ONE_Y`]: y is not read).
#[allow(clippy::too_many_arguments)]
pub(super) fn colsum_flags(
    be: &Wgpu,
    rows: usize,
    cols: usize,
    x: Rows<'_>,
    y: Rows<'_>,
    v: Option<&GpuBuf>,
    o: &GpuBuf,
    extra: u32,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let ctx = &*be.ctx;
    let chunks = view_chunks(ctx, rows, &[x, y])?;
    let last = chunks.len() - 1;
    for (ci, &(r0, r1)) in chunks.iter().enumerate() {
        let (bx, xo) = bind_rows(ctx, &x, r0, r1)?;
        let (by, yo) = bind_rows(ctx, &y, r0, r1)?;
        let mut flags = extra | if ci > 0 { F_ACC } else { 0 };
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
        let bv = v.map(Bind::all).unwrap_or_else(|| ctx.dummy());
        let binds = vec![(1, bx), (2, by), (3, bv), (4, Bind::all(o))];
        run(be, "colsum", &p, binds, grid(ctx, cols.div_ceil(64)))?;
    }
    Ok(())
}

/// `o[i, c] = x[i, c] * v[i]` (or `/ v[i]` with `div`); in place when `x` is `None`.
pub(super) fn row_scale(
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
    let ctx = &*be.ctx;
    let mut views = vec![v, o];
    views.extend(x);
    for (r0, r1) in view_chunks(ctx, rows, &views)? {
        let (bv, vo) = bind_rows(ctx, &v, r0, r1)?;
        let (bo, oo) = bind_rows(ctx, &o, r0, r1)?;
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
                let (bx, xo) = bind_rows(ctx, x, r0, r1)?;
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
            grid(ctx, ((r1 - r0) * cols).div_ceil(256)),
        )?;
    }
    Ok(())
}
