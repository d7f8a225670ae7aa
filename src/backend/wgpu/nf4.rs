//! NF4 base weights on the wgpu backend: packed 4-bit indices as u32 words, the code table
//! in workgroup memory, double-quant absmax decoded in place (bitsandbytes' layout, see
//! `quant/nf4.rs`). Same contracts as the trait docs; same math as `backend/cpu/nf4.rs`.
//!
//! Design: as on the CPU, every kernel dequantizes a bounded tile of rows
//! (`shaders/nf4.wgsl`, bit for bit [`Nf4Tensor::dequantize`]) into one scratch buffer reused
//! by all the tiles of a call, and multiplies the tile with the one matmul of
//! `shaders/matmul.wgsl`. The f32 `[out, in]` weight is never materialized (a tile holds at most
//! [`TILE_ELEMS`] values and fits one storage binding). Chosen over a dedicated matmul whose
//! B-tile loader decodes NF4 because the shared matmul already carries the epilogue (bias),
//! the strided views (`x W^T` and `dy W` read the same tile) and the splitting of operands wider
//! than a binding; the cost is one write and one read of the f32 tile per call, which is small
//! next to the product when `T` is a training batch (it is the dominant cost only for tiny `T`,
//! e.g. one-token decoding, where a fused decode-in-loader kernel would be the next step).
//!
//! Each dequantization dispatch binds only the words of `packed` and of the absmax statistics
//! that its rows use, so weights whose packed data exceed one storage binding work.

use super::adapters::{Rows, bind_words, dora_norm_from_p, grid, limits, rowdot};
use super::matmul::{Matmul, Operand};
use super::{GpuBuf, Wgpu};
use crate::backend::{Nf4Weight, Tensor, check};
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
    let &[out, in_] = w.shape() else {
        return Err(Error::shape("nf4 weight", "2-D [out, in]", w.shape()));
    };
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
    let (limit, align) = limits(be);
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
    let (bp, pk_base) = bind_words(be, &w.packed, e0 >> 3, e1 >> 3)?;
    let (bo, o_base) = bind_words(be, out, out_off, out_off + len - 1)?;
    let bs = w.blocksize;
    let (b0, b1) = (e0 / bs, e1 / bs);
    let mut params: Vec<u32> = NF4_CODE.iter().map(|c| c.to_bits()).collect();
    let (entry, binds, am_base, nbs, na_base, offset) = match &w.scales {
        Nf4Scales::F32(a) => {
            let (ba, am_base) = bind_words(be, a, b0, b1)?;
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
            let (bq, am_base) = bind_words(be, absmax_q, b0 >> 2, b1 >> 2)?;
            let (bn, na_base) = bind_words(be, nested_absmax, b0 / nbs, b1 / nbs)?;
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
        .dispatch(&kernel, &params, &binds, grid(be, len.div_ceil(256)))
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

pub(super) fn linear(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    w: &Nf4Weight<Wgpu>,
    bias: Option<&Tensor<Wgpu>>,
) -> Result<Tensor<Wgpu>> {
    let (t, din, dout) = check::linear_dims(x, w.dims())?;
    if let Some(b) = bias {
        b.expect_shape("bias", &[dout])?;
    }
    let y = be.alloc(&[t, dout]);
    if t == 0 {
        return Ok(y);
    }
    // y[:, o0..o1] = x tile^T, tile by tile; the bias rides on the matmul's epilogue when one
    // tile covers all of `out`, else one K = 0 pass adds it at the end.
    let mut tiles = 0;
    for_tiles(be, w, |o0, o1, tile| {
        let mut mm = Matmul::new(
            t,
            o1 - o0,
            din,
            Operand::n(&x.buf, din),
            Operand::t(tile, din),
            &y.buf,
            1.0,
            0.0,
        );
        mm.c_off = o0;
        mm.c_rs = dout;
        if o0 == 0 && o1 == dout {
            mm.bias = bias.map(|b| &b.buf);
        }
        tiles += 1;
        be.matmul(&mm)
    })?;
    if let (Some(b), true) = (bias, tiles > 1) {
        let mut mm = Matmul::new(
            t,
            dout,
            0,
            Operand::n(&y.buf, 1),
            Operand::n(&y.buf, 1),
            &y.buf,
            1.0,
            1.0,
        );
        mm.bias = Some(&b.buf);
        be.matmul(&mm)?;
    }
    Ok(y)
}

pub(super) fn linear_backward_input(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    w: &Nf4Weight<Wgpu>,
    acc: Option<&mut Tensor<Wgpu>>,
) -> Result<Option<Tensor<Wgpu>>> {
    let (t, dout, din) = check::backward_input_dims(dy, w.dims())?;
    // dx (+)= dy[:, o0..o1] tile, tile by tile, accumulating after the first.
    let run = |dx: &GpuBuf, mut first: bool| {
        if t == 0 {
            return Ok(());
        }
        for_tiles(be, w, |o0, o1, tile| {
            let a = Operand {
                buf: &dy.buf,
                off: o0,
                rs: dout,
                cs: 1,
            };
            let beta = if first { 0.0 } else { 1.0 };
            first = false;
            be.gemm_into(t, din, o1 - o0, a, Operand::n(tile, din), 1.0, beta, dx)
        })
    };
    match acc {
        Some(dx) => {
            dx.expect_shape("dx", &[t, din])?;
            run(&dx.buf, false)?;
            Ok(None)
        }
        None => {
            let dx = be.alloc(&[t, din]);
            run(&dx.buf, true)?;
            Ok(Some(dx))
        }
    }
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

pub(super) fn dora_weight_norm(
    be: &Wgpu,
    w0: &Nf4Weight<Wgpu>,
    w0_row_sq: &Tensor<Wgpu>,
    a: &Tensor<Wgpu>,
    b: &Tensor<Wgpu>,
    s: f32,
) -> Result<Tensor<Wgpu>> {
    let (dout, din) = (w0.out, w0.in_);
    let r = check::lora(din, dout, a, b)?;
    w0_row_sq.expect_shape("w0_row_sq", &[dout])?;
    // P = W0 A^T [out, r], tile by tile; then the dense kernel's low-rank terms.
    let p = be.alloc(&[dout, r]);
    for_tiles(be, w0, |o0, o1, tile| {
        let mut mm = Matmul::new(
            o1 - o0,
            r,
            din,
            Operand::n(tile, din),
            Operand::t(&a.buf, din),
            &p.buf,
            1.0,
            0.0,
        );
        mm.c_off = o0 * r;
        be.matmul(&mm)
    })?;
    dora_norm_from_p(be, &p, w0_row_sq, a, b, s)
}
