//! NF4 base weights on the wgpu backend: packed 4-bit indices as u32 words, the code table
//! in workgroup memory, double-quant absmax decoded in place (bitsandbytes' layout, see
//! `quant/nf4.rs`). Same contracts as the trait docs; same math as `backend/cpu/nf4.rs`.
//!
//! Design: as on the CPU, every kernel dequantizes a bounded tile of rows
//! (`shaders/nf4.wgsl`, bit for bit [`Nf4Tensor::dequantize`]) into one scratch buffer reused
//! by all the tiles of a call, and multiplies the tile with the one matmul of
//! `shaders/matmul.wgsl`. The f32 `[out, in]` weight is never materialized (a tile holds at most
//! [`TILE_ELEMS`] values and fits one storage binding). The low-rank term of the fused product
//! rides on the tiles' epilogues: in the forward each tile's matmul adds the term for its own
//! output columns (rows `o0..o1` of B), in the input gradient the first tile's matmul adds it
//! (every tile covers all of dx). Chosen over a dedicated matmul whose
//! B-tile loader decodes NF4 because the shared matmul already carries the epilogue (bias),
//! the strided views (`x W^T` and `dy W` read the same tile) and the splitting of operands wider
//! than a binding; the cost is one write and one read of the f32 tile per call, which is small
//! next to the product when `T` is a training batch (it is the dominant cost only for tiny `T`,
//! e.g. one-token decoding, where a fused decode-in-loader kernel would be the next step).
//!
//! Each dequantization dispatch binds only the words of `packed` and of the absmax statistics
//! that its rows use, so weights whose packed data exceed one storage binding work.

use super::ctx::GpuBuf;
use super::dense::rowdot;
use super::matmul::{LowRank, Matmul, Operand};
use super::memory::{Rows, bind_words, grid, limits};
use super::{Wgpu, lowrank};
use crate::backend::{Nf4Weight, Tensor};
use crate::error::{Error, Result};
use crate::quant::nf4::{Absmax, NF4_CODE, Nf4Tensor};
use std::sync::Arc;

const SRC: &str = include_str!("../../../shaders/nf4.wgsl");

/// Most values in one dequantized tile (16 MiB of f32), besides the binding limit.
const TILE_ELEMS: usize = 1 << 22;

/// An NF4 weight on the device (see [`crate::backend::Nf4Weight`]).
#[derive(Debug)]
pub struct Nf4Gpu {
    /// Packed indices, two per byte (high nibble first), as little-endian u32 words.
    pub(crate) packed: GpuBuf,
    /// The per-block scales.
    pub(crate) scales: Nf4Scales,
    /// Elements per quantization block.
    pub(crate) blocksize: usize,
}

/// The per-block absmax of an [`Nf4Gpu`], as stored by bitsandbytes.
#[derive(Debug)]
pub(crate) enum Nf4Scales {
    /// One f32 per block.
    F32(GpuBuf),
    /// Double quantization: `nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize]
    /// + offset`, decoded in the dequantization kernel.
    Double {
        /// One u8 code per block, four per little-endian u32 word.
        absmax_q: GpuBuf,
        nested_absmax: GpuBuf,
        /// The 256-entry nested code table.
        nested_code: GpuBuf,
        offset: f32,
        nested_blocksize: usize,
    },
}

pub(super) fn upload(be: &Wgpu, w: &Nf4Tensor) -> Result<Nf4Weight<Wgpu>> {
    let (out, in_) = (w.shape()[0], w.shape()[1]);
    if w.n_elements() > u32::MAX as usize {
        return Err(Error::arg(
            "nf4 weight",
            format!(
                "{} elements; the wgpu kernels index at most 2^32 - 1",
                w.n_elements()
            ),
        ));
    }
    let ctx = &be.ctx;
    let packed = ctx.upload_bytes(w.packed(), w.packed().len().div_ceil(4));
    let scales = match w.absmax() {
        Absmax::F32(a) => Nf4Scales::F32(ctx.upload(a)),
        Absmax::Double {
            absmax_q,
            nested_absmax,
            nested_code,
            offset,
            nested_blocksize,
        } => Nf4Scales::Double {
            absmax_q: ctx.upload_bytes(absmax_q, absmax_q.len().div_ceil(4)),
            nested_absmax: ctx.upload(nested_absmax),
            nested_code: ctx.upload(nested_code),
            offset: *offset,
            nested_blocksize: *nested_blocksize,
        },
    };
    ctx.check()?;
    Ok(Nf4Weight {
        buf: Arc::new(Nf4Gpu {
            packed,
            scales,
            blocksize: w.blocksize(),
        }),
        out,
        in_,
        bytes: w.bytes(),
    })
}

/// Rows per dequantized tile of a weight with `din` columns: at most [`TILE_ELEMS`] values and
/// one storage binding (with room for the offset alignment), at least one row.
fn tile_rows(be: &Wgpu, din: usize, dout: usize) -> Result<usize> {
    let (limit, align) = limits(&be.ctx);
    let room = TILE_ELEMS.min(limit.saturating_sub(align + 2));
    if din > room {
        return Err(Error::Backend {
            backend: "wgpu".into(),
            msg: format!(
                "an NF4 row of {din} values exceeds the {}-byte storage binding limit",
                be.ctx.max_binding
            ),
        });
    }
    Ok((room / din.max(1)).clamp(1, dout.max(1)))
}

/// Dequantizes the elements `e0..e0 + len` of `w` into words `out_off..out_off + len` of
/// `out`, bit for bit [`Nf4Tensor::dequantize`].
fn dequant_range(
    be: &Wgpu,
    w: &Nf4Gpu,
    e0: usize,
    len: usize,
    out: &GpuBuf,
    out_off: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let e1 = e0 + len - 1;
    let (bp, pk_base) = bind_words(&be.ctx, &w.packed, e0 >> 3, e1 >> 3)?;
    let (bo, o_base) = bind_words(&be.ctx, out, out_off, out_off + len - 1)?;
    let bs = w.blocksize;
    let (b0, b1) = (e0 / bs, e1 / bs);
    let mut params: Vec<u32> = NF4_CODE.iter().map(|c| c.to_bits()).collect();
    let (entry, binds, am_base, nbs, na_base, offset) = match &w.scales {
        Nf4Scales::F32(a) => {
            let (ba, am_base) = bind_words(&be.ctx, a, b0, b1)?;
            (
                "dequant_f32",
                vec![(1, bp), (2, ba), (6, bo)],
                am_base,
                1,
                0,
                0.0,
            )
        }
        Nf4Scales::Double {
            absmax_q,
            nested_absmax,
            nested_code,
            offset,
            nested_blocksize,
        } => {
            let nbs = *nested_blocksize;
            let (bq, am_base) = bind_words(&be.ctx, absmax_q, b0 >> 2, b1 >> 2)?;
            let (bn, na_base) = bind_words(&be.ctx, nested_absmax, b0 / nbs, b1 / nbs)?;
            let binds = vec![
                (1, bp),
                (3, bq),
                (4, bn),
                (5, super::ctx::Bind::all(nested_code)),
                (6, bo),
            ];
            ("dequant_double", binds, am_base, nbs, na_base, *offset)
        }
    };
    params.extend([
        len as u32,
        e0 as u32,
        (out_off - o_base) as u32,
        pk_base as u32,
        bs as u32,
        am_base as u32,
        nbs as u32,
        na_base as u32,
        0, // zero
        offset.to_bits(),
    ]);
    let kernel = be.ctx.kernel(&format!("nf4.{entry}"), SRC, entry)?;
    be.ctx
        .dispatch(&kernel, &params, &binds, grid(&be.ctx, len.div_ceil(256)))
}

/// Calls `f(o0, o1, tile)` for consecutive tiles of rows `o0..o1` of `w`, each dequantized
/// into the same scratch buffer (row-major `[o1 - o0, in]`).
fn for_tiles(
    be: &Wgpu,
    w: &Nf4Weight<Wgpu>,
    mut f: impl FnMut(usize, usize, &GpuBuf) -> Result<()>,
) -> Result<()> {
    let (dout, din) = (w.out, w.in_);
    if dout == 0 || din == 0 {
        return Ok(());
    }
    let tr = tile_rows(be, din, dout)?;
    let scratch = be.ctx.alloc(tr * din);
    let mut o0 = 0;
    while o0 < dout {
        let o1 = (o0 + tr).min(dout);
        dequant_range(be, &w.buf, o0 * din, (o1 - o0) * din, &scratch, 0)?;
        f(o0, o1, &scratch)?;
        o0 = o1;
    }
    Ok(())
}

pub(super) fn dequantize(be: &Wgpu, w: &Nf4Weight<Wgpu>) -> Result<Tensor<Wgpu>> {
    let (dout, din) = (w.out, w.in_);
    let out = be.alloc(&[dout, din]);
    if dout == 0 || din == 0 {
        return Ok(out);
    }
    let tr = tile_rows(be, din, dout)?;
    let mut o0 = 0;
    while o0 < dout {
        let o1 = (o0 + tr).min(dout);
        dequant_range(be, &w.buf, o0 * din, (o1 - o0) * din, &out.buf, o0 * din)?;
        o0 = o1;
    }
    Ok(out)
}

/// `y = x W^T (+ bias) (+ the low-rank term)` into `y [t, out]`, tile by tile: each tile's
/// matmul writes columns `o0..o1` of y with the term's rows `o0..o1` of `G` in its epilogue.
/// The matmul's epilogue vectors are indexed from the first column of its output, so the bias
/// rides on it only when one tile covers all of `out` (else one `K = 0` pass adds it at the
/// end), and a per-output scale of the term must already be folded into `G` (an error
/// otherwise). With `shrink = (a_t, r, p)`, each tile also gives its rows of `P = W A^T`
/// (`[out, r]` into `p`, `a_t` the operand `A^T`), so that DoRA's weight norm costs no second
/// dequantization of W.
pub(super) fn linear(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    w: &Nf4Weight<Wgpu>,
    bias: Option<&Tensor<Wgpu>>,
    lowrank: Option<LowRank<'_>>,
    y: &GpuBuf,
    shrink: Option<(Operand<'_>, usize, &GpuBuf)>,
) -> Result<()> {
    let (t, din, dout) = (x.dim(0), w.in_, w.out);
    if lowrank.is_some_and(|l| l.nscale.is_some()) {
        return Err(Error::Backend {
            backend: "wgpu".into(),
            msg: "nf4 linear: fold the per-output scale into the term's [out, r] factor".into(),
        });
    }
    if dout == 0 || (t == 0 && shrink.is_none()) {
        return Ok(());
    }
    let mut tiles = 0;
    if din == 0 {
        // No tile to dequantize: the product is 0, only the epilogue terms remain.
        let mut mm = Matmul::new(t, dout, 0, Operand::n(y, 1), Operand::n(y, 1), y, 1.0, 0.0);
        mm.bias = bias.map(|b| &b.buf);
        mm.lowrank = lowrank;
        return be.matmul(&mm);
    }
    for_tiles(be, w, |o0, o1, tile| {
        if let Some((a_t, r, p)) = shrink {
            let mut mm = Matmul::new(o1 - o0, r, din, Operand::n(tile, din), a_t, p, 1.0, 0.0);
            mm.c_off = o0 * r;
            be.matmul(&mm)?;
        }
        let mut mm = Matmul::new(
            t,
            o1 - o0,
            din,
            Operand::n(&x.buf, din),
            Operand::t(tile, din),
            y,
            1.0,
            0.0,
        );
        mm.c_off = o0;
        mm.c_rs = dout;
        if o0 == 0 && o1 == dout {
            mm.bias = bias.map(|b| &b.buf);
        }
        mm.lowrank = lowrank.map(|l| LowRank {
            g: Operand {
                off: l.g.off + o0 * l.g.rs,
                ..l.g
            },
            ..l
        });
        tiles += 1;
        be.matmul(&mm)
    })?;
    if let (Some(b), true) = (bias, tiles > 1) {
        let mut mm = Matmul::new(t, dout, 0, Operand::n(y, 1), Operand::n(y, 1), y, 1.0, 1.0);
        mm.bias = Some(&b.buf);
        be.matmul(&mm)?;
    }
    Ok(())
}

/// `dx = dy W (+ the low-rank term) (+ beta dx)` for dy `[t, out]`, dx `[t, in]`: one matmul per
/// tile of W's rows (`dy[:, o0..o1] tile`), the first with `beta` and the term in its epilogue
/// (every tile covers all of dx), the rest accumulating.
pub(super) fn backward_into(
    be: &Wgpu,
    dy: &GpuBuf,
    t: usize,
    w: &Nf4Weight<Wgpu>,
    lowrank: Option<LowRank<'_>>,
    dx: &GpuBuf,
    beta: f32,
) -> Result<()> {
    let (dout, din) = (w.out, w.in_);
    if t == 0 || din == 0 {
        return Ok(());
    }
    let mut first = true;
    for_tiles(be, w, |o0, o1, tile| {
        let a = Operand {
            buf: dy,
            off: o0,
            rs: dout,
            cs: 1,
        };
        let mut mm = Matmul::new(t, din, o1 - o0, a, Operand::n(tile, din), dx, 1.0, 1.0);
        if first {
            mm.beta = beta;
            mm.lowrank = lowrank;
        }
        first = false;
        be.matmul(&mm)
    })?;
    // With no rows (out = 0) nothing ran: the product and the term (g = dy B) are 0, and a
    // fresh dx is already zero.
    Ok(())
}

pub(super) fn row_sq_norms(be: &Wgpu, w: &Nf4Weight<Wgpu>) -> Result<Tensor<Wgpu>> {
    let din = w.in_;
    let out = be.alloc(&[w.out]);
    for_tiles(be, w, |o0, o1, tile| {
        let rows = Rows::new(tile, din);
        rowdot(be, o1 - o0, din, rows, rows, None, Rows::vec(&out.buf, o0))
    })?;
    Ok(out)
}

/// `P = W A^T [out, r]` tile by tile (`a`: the term's `A` operand read transposed), for the
/// weight norm's low-rank identity ([`lowrank::norm_from_p`]).
pub(super) fn shrink_weight(
    be: &Wgpu,
    w: &Nf4Weight<Wgpu>,
    a_t: Operand<'_>,
    r: usize,
) -> Result<Tensor<Wgpu>> {
    let din = w.in_;
    let p = be.alloc(&[w.out, r]);
    for_tiles(be, w, |o0, o1, tile| {
        let mut mm = Matmul::new(
            o1 - o0,
            r,
            din,
            Operand::n(tile, din),
            a_t,
            &p.buf,
            1.0,
            0.0,
        );
        mm.c_off = o0 * r;
        be.matmul(&mm)
    })?;
    Ok(p)
}

/// `||dequant(W) + ΔW||_row` by the low-rank identity: `P = W A^T` tile by tile, then the
/// dense kernel's low-rank terms.
pub(super) fn lowrank_row_norms(
    be: &Wgpu,
    w: &Nf4Weight<Wgpu>,
    w_row_sq: &Tensor<Wgpu>,
    term: &crate::backend::LowRank<'_, Wgpu>,
) -> Result<Tensor<Wgpu>> {
    let r = term.r();
    let p = shrink_weight(be, w, lowrank::a_t(term), r)?;
    lowrank::norm_from_p(be, &p, w_row_sq, term, w.out, w.in_)
}
