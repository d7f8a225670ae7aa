//! The mixed-batch low-rank term ([`crate::backend::multi`]) on the wgpu backend: every row t of
//! a batch whose adapter `i = adapter_of_row[t]` has a term adds `(x[t] A_i^T) B_i'^T` to the
//! base product already in y, whatever the ranks (ragged, as the pool stores them), in two
//! dispatches of `shaders/multi_lora.wgsl` for the whole batch (per range of rows, where the
//! batch is wider than one storage binding):
//!
//! * the host lists the rows that have a term, each as `(row, a_row, b_off, r, h_off)` (five
//!   words; `h_off` the running sum of the ranks before it), and uploads the list once;
//! * `shrink`, one workgroup per listed row, writes `h = x[t] A_i^T` into a ragged f32 scratch
//!   (r values per row at `h_off`);
//! * `expand`, one workgroup per (listed row, 64 outputs), adds `h B_i'^T` to `y[t]`.
//!
//! Prefill segments (runs of rows of one adapter) and decode steps (one row per sequence,
//! adapters interleaved) are the same list. Rows without a term (index -1, or an adapter of rank
//! 0 here) are not listed: no workgroup runs for them.
//!
//! Storage bindings: the pool's `a` and `b` are bound whole; x, y, h and the list are bound per
//! range of listed rows, each range as many rows as fit one binding (one dispatch pair per
//! range). A pool wider than one binding takes the per-adapter path of the CPU reference
//! instead (`by_adapter`: rows gathered, shrunk and expanded by two matmuls that split their
//! operands as needed, scattered back), so any pool runs; a single row of x or y wider than one
//! binding is an error naming the limit. The pool is f32 (`upload_kernel`); an f16 `a` or `b`
//! (never made so by `lowrank_pool`) is read through the shader's f16 variant. x and y are f32.

use super::Wgpu;
use super::ctx::{Bind, DType, GpuBuf, f16_variant};
use super::matmul::Operand;
use super::memory::{Words, capacity, err, gather_rows, grid, scatter_add_rows, span};
use crate::backend::{LowRankPool, Tensor};
use crate::error::Result;

const SRC: &str = include_str!("../../../shaders/multi_lora.wgsl");

/// Words per listed row (the shader's `ENT`).
const ENT: usize = 5;
/// Outputs per `expand` workgroup (the shader's `JB`).
const OUT_BLOCK: usize = 64;

/// `y[t] += (x[t] A_i^T) B_i'^T` for every row t with a term (see the module docs).
pub(super) fn add(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    pool: &LowRankPool<Wgpu>,
    adapter_of_row: &[i32],
    y: &mut Tensor<Wgpu>,
) -> Result<()> {
    Wgpu::mutable("linear_multi", y)?;
    let (din, dout) = (x.dim(1), y.dim(1));
    // The listed rows: (row, a_row, b_off, r, h_off), h_off the running sum of the ranks.
    let mut list: Vec<[usize; ENT]> = Vec::new();
    let mut h_len = 0;
    for (t, &i) in adapter_of_row.iter().enumerate() {
        let Ok(i) = usize::try_from(i) else {
            continue;
        };
        let r = pool.rank(i);
        if r > 0 {
            list.push([t, pool.a_row(i), pool.b_offset(i), r, h_len]);
            h_len += r;
        }
    }
    if list.is_empty() || dout == 0 {
        return Ok(());
    }
    let ctx = &*be.ctx;
    let cap = capacity(ctx);
    if din > cap || dout > cap {
        return Err(err(format!(
            "linear_multi: a row of {} floats is wider than the {}-byte storage binding limit",
            din.max(dout),
            ctx.max_binding
        )));
    }
    let fits_whole = |b: &GpuBuf| b.bytes() <= ctx.max_binding;
    let r_max = list.iter().map(|e| e[3]).max().unwrap_or(0);
    if !fits_whole(&pool.a().buf) || !fits_whole(&pool.b().buf) || r_max > cap || cap < ENT {
        return by_adapter(be, x, pool, adapter_of_row, y);
    }
    let (a16, b16) = (is_f16(pool.a()), is_f16(pool.b()));
    let shrink = kernel(be, "shrink", a16, b16)?;
    let expand = kernel(be, "expand", a16, b16)?;
    let oblocks = dout.div_ceil(OUT_BLOCK);
    // Ranges of listed rows in which x, y, h and the list each fit one binding, and the
    // expand grid stays within u32 workgroups.
    let max_wg = (ctx.max_groups as usize).pow(2).min(u32::MAX as usize);
    let mut ranges = Vec::new();
    let mut e0 = 0;
    while e0 < list.len() {
        let first = list[e0];
        let mut e1 = e0 + 1;
        while e1 < list.len() {
            let last = list[e1];
            let rows = last[0] + 1 - first[0];
            let hs = last[4] + last[3] - first[4];
            let n = e1 + 1 - e0;
            if rows * din > cap || rows * dout > cap || hs > cap || n * ENT > cap {
                break;
            }
            if n * oblocks > max_wg {
                break;
            }
            e1 += 1;
        }
        ranges.push((e0, e1));
        e0 = e1;
    }
    // One upload of every range's list, rows and h offsets relative to the range's first.
    let mut words = Words::default();
    let offsets: Vec<usize> = ranges
        .iter()
        .map(|&(e0, e1)| {
            let (t0, h0) = (list[e0][0], list[e0][4]);
            let w: Vec<u32> = list[e0..e1]
                .iter()
                .flat_map(|&[t, a_row, b_off, r, h_off]| [t - t0, a_row, b_off, r, h_off - h0])
                .map(|v| v as u32)
                .collect();
            words.push(ctx, &w)
        })
        .collect();
    let tab = words.upload(be);
    let h = be.ctx.alloc(h_len);
    for (&(e0, e1), &tab_at) in ranges.iter().zip(&offsets) {
        let (first, last) = (list[e0], list[e1 - 1]);
        let rows = last[0] + 1 - first[0];
        let n = e1 - e0;
        let (bx, x_off) = span(ctx, &x.buf, first[0] * din, rows * din);
        let (by, y_off) = span(ctx, &y.buf, first[0] * dout, rows * dout);
        // Each dispatch binds the list's and h's ranges anew (bindings are not Copy).
        let hs = last[4] + last[3] - first[4];
        let bh = || span(ctx, &h, first[4], hs);
        let bt = || span(ctx, &tab, tab_at, n * ENT);
        let (h_off, tab_off) = (bh().1, bt().1);
        let params = [
            n as u32,
            din as u32,
            dout as u32,
            oblocks as u32,
            x_off,
            y_off,
            h_off,
            tab_off,
        ];
        let shrink_binds = [
            (1, bx),
            (2, Bind::all(&pool.a().buf)),
            (4, bt().0),
            (5, bh().0),
        ];
        ctx.dispatch(&shrink, &params, &shrink_binds, grid(ctx, n))?;
        let expand_binds = [
            (3, Bind::all(&pool.b().buf)),
            (4, bt().0),
            (5, bh().0),
            (6, by),
        ];
        ctx.dispatch(&expand, &params, &expand_binds, grid(ctx, n * oblocks))?;
    }
    ctx.check()
}

fn is_f16(t: &Tensor<Wgpu>) -> bool {
    t.buf.dtype == DType::F16
}

/// The kernel `entry` of `multi_lora.wgsl`, in the variant that reads `a` (binding 2) or `b`
/// (binding 3) as f16 where the pool stores it so.
fn kernel(
    be: &Wgpu,
    entry: &str,
    a16: bool,
    b16: bool,
) -> Result<std::sync::Arc<super::ctx::Kernel>> {
    let names: Vec<&str> = [("a", a16), ("b", b16)]
        .into_iter()
        .filter_map(|(n, f)| f.then_some(n))
        .collect();
    if names.is_empty() {
        return be.ctx.kernel(&format!("multi_lora.{entry}"), SRC, entry);
    }
    let mask = (u32::from(a16) << 2) | (u32::from(b16) << 3);
    be.ctx.kernel_f16(
        &format!("multi_lora.{entry}+f16:{}", names.join(",")),
        || f16_variant(SRC, &names),
        entry,
        mask,
    )
}

/// The per-adapter path, for a pool wider than one storage binding: per adapter with rows, as
/// the CPU reference does, its rows gathered, `h = x_i A_i^T` and `u = h B_i'^T` by the matmul
/// (which splits any operand wider than a binding), and u added back into its rows of y.
fn by_adapter(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    pool: &LowRankPool<Wgpu>,
    adapter_of_row: &[i32],
    y: &mut Tensor<Wgpu>,
) -> Result<()> {
    let (din, dout) = (x.dim(1), y.dim(1));
    for i in 0..pool.len() {
        let r = pool.rank(i);
        let rows: Vec<u32> = (0..adapter_of_row.len())
            .filter(|&t| adapter_of_row[t] == i as i32)
            .map(|t| t as u32)
            .collect();
        if r == 0 || rows.is_empty() {
            continue;
        }
        let n = rows.len();
        let xi = gather_rows(be, x, &rows)?;
        // A_i read transposed: element (k, j) is a[(a_row + j) * in + k].
        let a_t = Operand {
            buf: &pool.a().buf,
            off: pool.a_row(i) * din,
            rs: 1,
            cs: din,
        };
        let h = be.gemm(n, r, din, Operand::n(&xi.buf, din), a_t, 1.0)?;
        // B_i' [out, r] read transposed: element (j, o) is b[b_off + o * r + j].
        let b_t = Operand {
            buf: &pool.b().buf,
            off: pool.b_offset(i),
            rs: 1,
            cs: r,
        };
        let u = be.gemm(n, dout, r, Operand::n(&h.buf, r), b_t, 1.0)?;
        scatter_add_rows(be, y, &rows, &u)?;
    }
    be.ctx.check()
}
