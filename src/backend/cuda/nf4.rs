//! NF4 (QLoRA) on CUDA: bitsandbytes' layout on the device, decoded bit for bit as
//! [`Nf4Tensor::dequantize`] (double-quant absmax decoded inside each kernel).
//!
//! These are the base products of a `Base::Nf4` (the low-rank term around them is `lowrank.rs`):
//!
//! * `T <= 8` tokens: `nf4_gemv` streams the packed weight once (4 bytes per lane per step,
//!   the code table in shared memory), optionally with a plain LoRA term fused ([`gemv`]).
//! * More tokens, `dx = dy W` and the weight norm's `W A^T`: tiles of rows are dequantized into
//!   one reused scratch buffer (at most [`SCRATCH_ELEMS`] elements) and multiplied by cuBLAS;
//!   the dense `[out, in]` weight never exists at once unless it fits in one tile.
//! * [`Cuda::quantize_nf4`] quantizes on the device with the bytes of
//!   [`crate::quant::nf4::quantize_nf4`] (absmax, packing and the nested 8-bit codes on the
//!   GPU; the one scalar `offset = mean(absmax)` on the host in torch's summation order).

use super::blas::Mat;
use super::dense::{DECODE_MAX_T, add_bias};
use super::{Arg, Cuda, CudaNf4, DType, berr, blocks};
use crate::backend::{Nf4Weight, Tensor};
use crate::error::{Error, Result};
use crate::quant::nf4::{Absmax, NF4_CODE, Nf4Tensor, check_blocksize, dynamic_lut, mean_f32};
use std::sync::Arc;

/// Elements of the reused dequantization tile (32 Mi: 64 MiB in bf16).
pub const SCRATCH_ELEMS: usize = 32 << 20;

fn q(w: &Nf4Weight<Cuda>) -> &CudaNf4 {
    &w.buf
}

impl Cuda {
    /// The nine NF4 kernel arguments (`NF4_ARGS_DECL` in kernels/nf4.cu).
    fn nf4_args(&self, w: &CudaNf4) -> Vec<Arg> {
        let (am, aq, nested, code2, offset, nbs) = match (&w.absmax, &w.double) {
            (Some(a), _) => (self.slice_ptr(&**a), 0, 0, 0, 0.0, 1),
            (None, Some((aq, nested, code2, offset, nbs))) => (
                0,
                self.slice_ptr(&**aq),
                self.slice_ptr(&**nested),
                self.slice_ptr(&**code2),
                *offset,
                *nbs,
            ),
            (None, None) => (0, 0, 0, 0, 0.0, 1),
        };
        vec![
            Arg::P(self.slice_ptr(&*w.packed)),
            Arg::P(am),
            Arg::P(aq),
            Arg::P(nested),
            Arg::P(code2),
            Arg::F(offset),
            Arg::I(nbs as i32),
            Arg::I(w.blocksize as i32),
            Arg::P(self.slice_ptr(&self.inner.nf4_code)),
        ]
    }

    /// Dequantizes elements `start..start + count` (row-major) into `out` (storage dtype).
    fn nf4_dequant_span(&self, w: &CudaNf4, start: usize, count: usize, out: u64) -> Result<()> {
        let mut args = self.nf4_args(w);
        args.extend([Arg::L(start as i64), Arg::L(count as i64), Arg::P(out)]);
        self.launch(
            "nf4",
            "nf4_dequantize",
            (blocks(count, 256 * 8), 1, 1),
            (256, 1, 1),
            0,
            &args,
        )
    }

    /// Rows per dequantized tile for a weight `[dout, din]`.
    fn nf4_tile_rows(din: usize, dout: usize) -> usize {
        (SCRATCH_ELEMS / din.max(1)).clamp(1, dout.max(1))
    }

    /// Quantizes a 2-D tensor `w [out, in]` to NF4 on the device, with the bytes of
    /// [`crate::quant::nf4::quantize_nf4`]`(w, [out, in], blocksize, double_quant)` (bitsandbytes
    /// 0.50 `quantize_4bit(quant_type="nf4")`). With f16/bf16 storage the stored values are
    /// quantized (as bitsandbytes does for a half-precision weight).
    ///
    /// Errors: `blocksize` not a power of two in 32..=4096; a non-2-D or empty `w`; a NaN or
    /// Inf in `w` (`Error::NonFinite` with the first flat index).
    pub fn quantize_nf4(
        &self,
        w: &Tensor<Cuda>,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Nf4Weight<Cuda>> {
        check_blocksize(blocksize)?;
        let (out, in_) = w.dims2("w")?;
        let n = out * in_;
        if n == 0 {
            return Err(Error::arg("w", "cannot quantize an empty tensor"));
        }
        let nblocks = n.div_ceil(blocksize);
        let stream = self.stream();
        let packed = self.raw_alloc(n.div_ceil(2))?;
        let absmax = stream.alloc_zeros::<f32>(nblocks).map_err(berr)?;
        let bad = stream.clone_htod(&[n as i64][..]).map_err(berr)?;
        let bounds: Vec<f32> = (0..15)
            .map(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
            .collect();
        let bounds = self.upload_f32(&bounds)?;
        self.launch(
            "nf4",
            "nf4_quantize",
            (blocks(nblocks, 4), 1, 1),
            (128, 1, 1),
            0,
            &[
                self.rd("w", w)?,
                Arg::L(n as i64),
                Arg::I(blocksize as i32),
                Arg::P(self.slice_ptr(&bounds)),
                Arg::P(self.slice_ptr(&packed)),
                Arg::P(self.slice_ptr(&absmax)),
                Arg::P(self.slice_ptr(&bad)),
            ],
        )?;
        let bad = stream.clone_dtoh(&bad).map_err(berr)?[0];
        if (bad as usize) < n {
            return Err(Error::NonFinite {
                name: "w".into(),
                index: bad as usize,
            });
        }
        let bytes_of = |absmax_bytes: usize| n.div_ceil(2) + absmax_bytes;
        if !double_quant {
            return Ok(Nf4Weight {
                buf: CudaNf4 {
                    packed: Arc::new(packed),
                    absmax: Some(Arc::new(absmax)),
                    double: None,
                    blocksize,
                },
                out,
                in_,
                bytes: bytes_of(4 * nblocks),
            });
        }
        // offset = mean(absmax) in torch's order (host; one scalar), then the nested 8-bit
        // quantization of absmax - offset on the device.
        let host_absmax = stream.clone_dtoh(&absmax).map_err(berr)?;
        let offset = mean_f32(&host_absmax);
        let nb = crate::quant::nf4::NESTED_BLOCKSIZE;
        let nn = nblocks.div_ceil(nb);
        let lut = stream.clone_htod(&dynamic_lut()[..]).map_err(berr)?;
        let aq = self.raw_alloc(nblocks)?;
        let nested = stream.alloc_zeros::<f32>(nn).map_err(berr)?;
        self.launch_raw(
            "nf4",
            "nf4_double_quant",
            (nn as u32, 1, 1),
            (256, 1, 1),
            0,
            &[
                Arg::P(self.slice_ptr(&absmax)),
                Arg::L(nblocks as i64),
                Arg::F(offset),
                Arg::P(self.slice_ptr(&lut)),
                Arg::P(self.slice_ptr(&aq)),
                Arg::P(self.slice_ptr(&nested)),
            ],
        )?;
        let code2 = self.upload_f32(&crate::quant::nf4::dynamic_map()[..])?;
        Ok(Nf4Weight {
            buf: CudaNf4 {
                packed: Arc::new(packed),
                absmax: None,
                double: Some((Arc::new(aq), Arc::new(nested), Arc::new(code2), offset, nb)),
                blocksize,
            },
            out,
            in_,
            bytes: bytes_of(nblocks + 4 * nn + 4 * 256 + 4),
        })
    }

    /// Copies an NF4 weight back to the host as an [`Nf4Tensor`] of shape `[out, in]`
    /// (bitsandbytes' layout, e.g. to save it). Errors: device failures.
    pub fn download_nf4(&self, w: &Nf4Weight<Cuda>) -> Result<Nf4Tensor> {
        let s = self.stream();
        let qw = q(w);
        let n = w.out * w.in_;
        let packed = self.download_bytes(&qw.packed, n.div_ceil(2))?;
        let absmax = match (&qw.absmax, &qw.double) {
            (Some(a), _) => Absmax::F32(s.clone_dtoh(&**a).map_err(berr)?),
            (None, Some((aq, nested, code2, offset, nbs))) => Absmax::Double {
                absmax_q: self.download_bytes(aq, n.div_ceil(qw.blocksize))?,
                nested_absmax: s.clone_dtoh(&**nested).map_err(berr)?,
                nested_code: s.clone_dtoh(&**code2).map_err(berr)?,
                offset: *offset,
                nested_blocksize: *nbs,
            },
            (None, None) => return Err(berr("NF4 weight without absmax")),
        };
        Nf4Tensor::from_parts(packed, absmax, vec![w.out, w.in_], qw.blocksize)
    }
}

/// Copies the quantized data to the device as stored. Errors: a dim beyond the kernels' 32-bit
/// indices; device failures.
pub(super) fn upload(be: &Cuda, w: &Nf4Tensor) -> Result<Nf4Weight<Cuda>> {
    // 2-D is `Backend::upload_nf4`'s check; this only keeps a direct call from panicking.
    let &[out, in_] = w.shape() else {
        return Err(berr("upload_nf4_kernel needs a 2-D weight"));
    };
    if out > i32::MAX as usize || in_ > i32::MAX as usize {
        return Err(Error::arg("nf4 weight", "dims exceed 2^31 - 1"));
    }
    let s = be.stream();
    let packed = s.clone_htod(w.packed()).map_err(berr)?;
    let (absmax, double) = match w.absmax() {
        Absmax::F32(a) => (Some(Arc::new(s.clone_htod(&a[..]).map_err(berr)?)), None),
        Absmax::Double {
            absmax_q,
            nested_absmax,
            nested_code,
            offset,
            nested_blocksize,
        } => (
            None,
            Some((
                Arc::new(s.clone_htod(&absmax_q[..]).map_err(berr)?),
                Arc::new(s.clone_htod(&nested_absmax[..]).map_err(berr)?),
                Arc::new(s.clone_htod(&nested_code[..]).map_err(berr)?),
                *offset,
                *nested_blocksize,
            )),
        ),
    };
    Ok(Nf4Weight {
        buf: CudaNf4 {
            packed: Arc::new(packed),
            absmax,
            double,
            blocksize: w.blocksize(),
        },
        out,
        in_,
        bytes: w.bytes(),
    })
}

pub(super) fn dequantize(be: &Cuda, w: &Nf4Weight<Cuda>) -> Result<Tensor<Cuda>> {
    let y = be.alloc(&[w.out, w.in_])?;
    be.nf4_dequant_span(q(w), 0, w.out * w.in_, be.ptr("out", &y)?)?;
    Ok(y)
}

/// A plain LoRA term for [`gemv`] to fuse: `s h B^T` with h `[T, r]`, B `[>= out, r]`.
pub(super) struct GemvTerm<'a> {
    pub h: &'a Tensor<Cuda>,
    pub b: &'a Tensor<Cuda>,
    pub r: usize,
    pub s: f32,
}

/// `nf4_gemv` for `T <= 8` tokens: `y = x W^T + bias (+ s h B^T)`, the packed W read once.
pub(super) fn gemv(
    be: &Cuda,
    x: &Tensor<Cuda>,
    w: &Nf4Weight<Cuda>,
    bias: Option<&Tensor<Cuda>>,
    y: &Tensor<Cuda>,
    term: Option<&GemvTerm<'_>>,
) -> Result<()> {
    let (t, din, dout) = (x.dim(0), x.dim(1), w.out);
    let mut args = be.nf4_args(q(w));
    let (h, b, r, s) = match term {
        Some(lr) => (be.rd("h", lr.h)?, be.rd("lora_B", lr.b)?, lr.r, lr.s),
        None => (Arg::P(0), Arg::P(0), 0, 0.0),
    };
    args.extend([
        be.rd("x", x)?,
        Arg::I(t as i32),
        Arg::I(din as i32),
        Arg::I(dout as i32),
        be.opt("bias", bias)?,
        be.rd("y", y)?,
        h,
        b,
        Arg::I(r as i32),
        Arg::F(s),
    ]);
    be.launch(
        "nf4",
        "nf4_gemv",
        (blocks(dout, 4), 1, 1),
        (128, 1, 1),
        0,
        &args,
    )
}

/// `y = x dequant(W)^T + bias`: [`gemv`] for `T <= 8`, else dequantized tiles of rows times
/// cuBLAS (each tile writes its columns of y), then the bias.
pub(super) fn linear(
    be: &Cuda,
    x: &Tensor<Cuda>,
    w: &Nf4Weight<Cuda>,
    bias: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    let (t, din, dout) = (x.dim(0), x.dim(1), w.out);
    let y = be.alloc(&[t, dout])?;
    if t == 0 {
        return Ok(y);
    }
    if t <= DECODE_MAX_T {
        gemv(be, x, w, bias, &y, None)?;
        return Ok(y);
    }
    let (xp, yp) = (be.ptr("x", x)?, be.ptr("y", &y)?);
    let tr = Cuda::nf4_tile_rows(din, dout);
    let tile = be.alloc(&[tr, din])?;
    let tp = be.ptr("tile", &tile)?;
    let es = be.dtype.size() as u64;
    let mut o0 = 0;
    while o0 < dout {
        let rows = tr.min(dout - o0);
        be.nf4_dequant_span(q(w), o0 * din, rows * din, tp)?;
        // y[:, o0..o0+rows] = x tile^T
        be.gemm_s(
            t,
            rows,
            din,
            1.0,
            Mat::n(xp, din),
            Mat::t(tp, din),
            0.0,
            yp + o0 as u64 * es,
            dout,
        )?;
        o0 += rows;
    }
    if bias.is_some() {
        add_bias(be, yp, be.opt_ptr("bias", bias)?, t, dout)?;
    }
    Ok(y)
}

/// `dx = dy dequant(W) + beta dx` for dy `[t, out]` and dx `[t, in]` (raw pointers), tile by
/// tile (the first tile with `beta`, the others adding).
pub(super) fn backward_into(
    be: &Cuda,
    dy: u64,
    t: usize,
    w: &Nf4Weight<Cuda>,
    dx: u64,
    beta: f32,
) -> Result<()> {
    let (dout, din) = (w.out, w.in_);
    let tr = Cuda::nf4_tile_rows(din, dout);
    let tile = be.alloc(&[tr, din])?;
    let tp = be.ptr("tile", &tile)?;
    let es = be.dtype.size() as u64;
    let mut o0 = 0;
    let mut beta = beta;
    while o0 < dout {
        let rows = tr.min(dout - o0);
        be.nf4_dequant_span(q(w), o0 * din, rows * din, tp)?;
        // dx (+)= dy[:, o0..o0+rows] tile
        be.gemm_s(
            t,
            din,
            rows,
            1.0,
            Mat::n(dy + o0 as u64 * es, dout),
            Mat::n(tp, din),
            beta,
            dx,
            din,
        )?;
        beta = 1.0;
        o0 += rows;
    }
    Ok(())
}

pub(super) fn row_sq_norms(be: &Cuda, w: &Nf4Weight<Cuda>) -> Result<Tensor<Cuda>> {
    let res = be.alloc(&[w.out])?;
    let mut args = be.nf4_args(q(w));
    args.extend([
        Arg::I(w.out as i32),
        Arg::I(w.in_ as i32),
        be.rd("res", &res)?,
    ]);
    be.launch(
        "nf4",
        "nf4_row_sq_norms",
        (blocks(w.out, 4), 1, 1),
        (128, 1, 1),
        0,
        &args,
    )?;
    Ok(res)
}

/// `P = dequant(W) A^T` `[out, r]` in f32, tile by tile, for A `[r, lda]` (its first `in`
/// columns, raw pointer of the storage dtype): the weight norm's one pass over W.
pub(super) fn project_f32(
    be: &Cuda,
    w: &Nf4Weight<Cuda>,
    a: u64,
    lda: usize,
    r: usize,
) -> Result<Tensor<Cuda>> {
    let (dout, din) = (w.out, w.in_);
    let p = be.alloc_typed(&[dout, r], DType::F32)?;
    let pp = be.ptr_f32("P", &p)?;
    let tr = Cuda::nf4_tile_rows(din, dout);
    let tile = be.alloc(&[tr, din])?;
    let tp = be.ptr("tile", &tile)?;
    let mut o0 = 0;
    while o0 < dout {
        let rows = tr.min(dout - o0);
        be.nf4_dequant_span(q(w), o0 * din, rows * din, tp)?;
        be.gemm(
            rows,
            r,
            din,
            1.0,
            Mat::n(tp, din),
            Mat::t(a, lda),
            0.0,
            pp + (o0 * r * 4) as u64,
            r,
            be.dtype,
            DType::F32,
        )?;
        o0 += rows;
    }
    Ok(p)
}
