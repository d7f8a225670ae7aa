//! NF4 (QLoRA) on CUDA: bitsandbytes' layout on the device, decoded bit for bit as
//! [`Nf4Tensor::dequantize`] (double-quant absmax decoded inside each kernel).
//!
//! * `T <= 8` tokens: `nf4_gemv` streams the packed weight once (4 bytes per lane per step,
//!   the code table in shared memory), optionally with the LoRA term fused
//!   ([`Cuda::nf4_lora_forward`]).
//! * More tokens, and `dx = dy W`: tiles of rows are dequantized into one reused scratch buffer
//!   (at most [`SCRATCH_ELEMS`] elements) and multiplied by cuBLAS; the dense `[out, in]`
//!   weight never exists at once unless it fits in one tile.
//! * [`Cuda::quantize_nf4`] quantizes on the device with the bytes of
//!   [`crate::quant::nf4::quantize_nf4`] (absmax, packing and the nested 8-bit codes on the
//!   GPU; the one scalar `offset = mean(absmax)` on the host in torch's summation order).

use super::adapters::{DECODE_MAX_T, lora_add, pu};
use super::blas::Mat;
use super::dora::dora_norm_from_p;
use super::{Arg, Cuda, CudaNf4, DType, berr, blocks};
use crate::backend::{Nf4Weight, Tensor, check};
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

    /// The fused QLoRA forward `y = x dequant(W)^T + bias + s (x A^T) B^T`, returning
    /// `(y [T, out], h [T, r])` like [`crate::backend::Backend::lora_forward`]. For `T <= 8` one kernel reads
    /// the packed weight once and adds the LoRA term; otherwise [`crate::backend::Backend::nf4_linear`] then
    /// [`crate::backend::Backend::lora_add`]. Errors: shapes as [`crate::backend::Backend::lora_forward`].
    pub fn nf4_lora_forward(
        &self,
        x: &Tensor<Cuda>,
        w: &Nf4Weight<Cuda>,
        bias: Option<&Tensor<Cuda>>,
        lora_a: &Tensor<Cuda>,
        lora_b: &Tensor<Cuda>,
        scaling: f32,
    ) -> Result<(Tensor<Cuda>, Tensor<Cuda>)> {
        let (t, din, dout) = check::linear_dims(x, w.dims())?;
        let r = check::lora(din, dout, lora_a, lora_b)?;
        if let Some(b) = bias {
            check::vector("bias", b, dout)?;
        }
        if t > DECODE_MAX_T {
            let mut y = linear(self, x, w, bias)?;
            let h = lora_add(self, &mut y, x, lora_a, lora_b, scaling)?;
            return Ok((y, h));
        }
        let h = {
            let lr = super::adapters::LowRank {
                a: self.ptr("lora_A", lora_a)?,
                lda: din,
                ascale: 0,
                b: 0,
                ldb: r,
                dscale: 0,
                bscale: 0,
                r,
                s: scaling,
            };
            self.shrink(x, &lr)?
        };
        let y = self.alloc(&[t, dout])?;
        self.nf4_gemv(x, w, bias, &y, Some((&h, lora_b, r, scaling)))?;
        Ok((y, h))
    }

    fn nf4_gemv(
        &self,
        x: &Tensor<Cuda>,
        w: &Nf4Weight<Cuda>,
        bias: Option<&Tensor<Cuda>>,
        y: &Tensor<Cuda>,
        lora: Option<(&Tensor<Cuda>, &Tensor<Cuda>, usize, f32)>,
    ) -> Result<()> {
        let (t, din) = x.dims2("x")?;
        let dout = w.out;
        let mut args = self.nf4_args(q(w));
        let (h, b, r, s) = match lora {
            Some((h, b, r, s)) => (self.rd("h", h)?, self.rd("lora_B", b)?, r, s),
            None => (Arg::P(0), Arg::P(0), 0, 0.0),
        };
        args.extend([
            self.rd("x", x)?,
            Arg::I(t as i32),
            Arg::I(din as i32),
            Arg::I(dout as i32),
            self.opt("bias", bias)?,
            self.rd("y", y)?,
            h,
            b,
            Arg::I(r as i32),
            Arg::F(s),
        ]);
        self.launch(
            "nf4",
            "nf4_gemv",
            (blocks(dout, 4), 1, 1),
            (128, 1, 1),
            0,
            &args,
        )
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

pub(super) fn upload(be: &Cuda, w: &Nf4Tensor) -> Result<Nf4Weight<Cuda>> {
    let &[out, in_] = w.shape() else {
        return Err(Error::shape("nf4 weight", "2-D [out, in]", w.shape()));
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

pub(super) fn linear(
    be: &Cuda,
    x: &Tensor<Cuda>,
    w: &Nf4Weight<Cuda>,
    bias: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    let (t, din, dout) = check::linear_dims(x, w.dims())?;
    if let Some(b) = bias {
        b.expect_shape("bias", &[dout])?;
    }
    let y = be.alloc(&[t, dout])?;
    if t == 0 {
        return Ok(y);
    }
    if t <= DECODE_MAX_T {
        be.nf4_gemv(x, w, bias, &y, None)?;
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
        be.add_bias(yp, be.opt("bias", bias)?, t, dout)?;
    }
    Ok(y)
}

pub(super) fn linear_backward_input(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    w: &Nf4Weight<Cuda>,
    acc: Option<&mut Tensor<Cuda>>,
) -> Result<Option<Tensor<Cuda>>> {
    let (t, dout, din) = check::backward_input_dims(dy, w.dims())?;
    let run = |dxp: u64, beta0: f32| -> Result<()> {
        let dyp = be.ptr("dy", dy)?;
        let tr = Cuda::nf4_tile_rows(din, dout);
        let tile = be.alloc(&[tr, din])?;
        let tp = be.ptr("tile", &tile)?;
        let es = be.dtype.size() as u64;
        let mut o0 = 0;
        let mut beta = beta0;
        while o0 < dout {
            let rows = tr.min(dout - o0);
            be.nf4_dequant_span(q(w), o0 * din, rows * din, tp)?;
            // dx += dy[:, o0..o0+rows] tile
            be.gemm_s(
                t,
                din,
                rows,
                1.0,
                Mat::n(dyp + o0 as u64 * es, dout),
                Mat::n(tp, din),
                beta,
                dxp,
                din,
            )?;
            beta = 1.0;
            o0 += rows;
        }
        Ok(())
    };
    match acc {
        Some(dx) => {
            dx.expect_shape("dx", &[t, din])?;
            let dxp = pu(be.wr("dx", dx)?);
            run(dxp, 1.0)?;
            Ok(None)
        }
        None => {
            let dx = be.alloc(&[t, din])?;
            run(be.ptr("dx", &dx)?, 0.0)?;
            Ok(Some(dx))
        }
    }
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

pub(super) fn dora_weight_norm(
    be: &Cuda,
    w0: &Nf4Weight<Cuda>,
    w0_row_sq: &Tensor<Cuda>,
    a: &Tensor<Cuda>,
    b: &Tensor<Cuda>,
    s: f32,
) -> Result<Tensor<Cuda>> {
    let (dout, din) = (w0.out, w0.in_);
    let r = check::lora(din, dout, a, b)?;
    w0_row_sq.expect_shape("w0_row_sq", &[dout])?;
    // P = dequant(W0) A^T, tile by tile, into f32.
    let p = be.alloc_typed(&[dout, r], DType::F32)?;
    let pp = pu(be.rd_f32("P", &p)?);
    let ap = be.ptr("lora_A", a)?;
    let tr = Cuda::nf4_tile_rows(din, dout);
    let tile = be.alloc(&[tr, din])?;
    let tp = be.ptr("tile", &tile)?;
    let mut o0 = 0;
    while o0 < dout {
        let rows = tr.min(dout - o0);
        be.nf4_dequant_span(q(w0), o0 * din, rows * din, tp)?;
        be.gemm(
            rows,
            r,
            din,
            1.0,
            Mat::n(tp, din),
            Mat::t(ap, din),
            0.0,
            pp + (o0 * r * 4) as u64,
            r,
            be.dtype,
            DType::F32,
        )?;
        o0 += rows;
    }
    dora_norm_from_p(be, &p, w0_row_sq, a, b, s)
}
