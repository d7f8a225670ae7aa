//! The WGSL backend: every kernel in `shaders/*.wgsl`, run through wgpu on Vulkan, Metal or
//! DX12 (and in CI on Mesa's lavapipe, a Vulkan device on the CPU).
//!
//! Storage is f32, except frozen weights ([`Backend::upload_frozen`], [`Backend::freeze`]),
//! which are stored as f16 where the adapter has `SHADER_F16` and [`WgpuOptions::f16`] allows
//! it: half the memory and bandwidth of the base weights, arithmetic still in f32. The kernels
//! that read a frozen weight (the matmul's A and B operands, the row norms of DoRA) have f16
//! variants; the in-place kernels refuse one with an error; every other kernel refuses an f16
//! binding at dispatch rather than misread it. All dense products go through one tiled matmul whose epilogue adds the
//! adapter terms in the same pass over the output (`shaders/matmul.wgsl`, [`matmul`]); the
//! rest are small elementwise and reduction kernels. Dispatches are batched into few command
//! buffers and nothing is read back inside a step except what the caller asks for.
//! Results equal the CPU reference ([`crate::Cpu`]) up to f32 summation order; the tests in
//! `tests/wgpu_*.rs` check every kernel against it.

mod adalora;
mod adapters;
mod compose;
mod ctx;
mod matmul;
mod nf4;
mod ops;

use self::ctx::{Bind, Ctx, DType, GpuBuf};
use self::matmul::{LowRank, Matmul, Operand};
use super::{
    AdaLoraGrads, AdaLoraIpt, AdamWParams, AttentionSaved, Backend, DoraGrads, DoraSaved,
    Nf4Weight, SeqSpan, Tensor, check, same_shape,
};
use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Tensor;
use std::sync::Arc;

pub use self::nf4::Nf4Gpu;

const ELEMENTWISE: &str = include_str!("../../../shaders/elementwise.wgsl");

/// Settings of a [`Wgpu`] backend. The defaults use everything the adapter offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgpuOptions {
    /// Largest storage binding in bytes (at most the adapter's own limit); `None` for the
    /// adapter's. Tests set a small value to exercise the splitting of large buffers.
    pub max_binding: Option<u64>,
    /// Use subgroup operations in reductions where the adapter has `SUBGROUP` (else the
    /// workgroup-memory versions run). The row reductions (RMSNorm, cross-entropy, sum of
    /// squares, the adapters' row sums) then add within each subgroup with `subgroupAdd` and
    /// combine the subgroups' partials in a fixed order: deterministic for a fixed subgroup
    /// size (same device and driver), though not bit-identical to the workgroup-memory tree.
    pub subgroups: bool,
    /// Store frozen weights as f16 where the adapter has `SHADER_F16` (else f32).
    pub f16: bool,
}

impl Default for WgpuOptions {
    fn default() -> Self {
        WgpuOptions {
            max_binding: None,
            subgroups: true,
            f16: true,
        }
    }
}

/// The wgpu backend. Cloning shares the device.
#[derive(Clone)]
pub struct Wgpu {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for Wgpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wgpu({})", self.ctx.info.name)
    }
}

impl Wgpu {
    /// Opens the first Vulkan, Metal or DX12 adapter wgpu finds (hardware preferred; Mesa's
    /// lavapipe where it is the only one).
    ///
    /// Errors: [`Error::BackendUnavailable`] when no adapter or device can be had.
    pub fn new() -> Result<Wgpu> {
        Self::with_options(&WgpuOptions::default())
    }

    /// Like [`Wgpu::new`], with explicit [`WgpuOptions`].
    pub fn with_options(opts: &WgpuOptions) -> Result<Wgpu> {
        Ok(Wgpu {
            ctx: Ctx::new(opts)?,
        })
    }

    /// Like [`Wgpu::new`], with storage bindings limited to `bytes` (at most the adapter's own
    /// limit). Tests use a small limit to exercise the splitting of large buffers.
    pub fn with_max_binding(bytes: u64) -> Result<Wgpu> {
        Self::with_options(&WgpuOptions {
            max_binding: Some(bytes),
            ..WgpuOptions::default()
        })
    }

    /// The adapter's name and driver, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub fn adapter_name(&self) -> String {
        format!("{} ({:?})", self.ctx.info.name, self.ctx.info.backend)
    }

    /// True when the adapter is a software rasterizer on the CPU (lavapipe, WARP, SwiftShader):
    /// correct, but slower than the CPU reference backend.
    pub fn is_software(&self) -> bool {
        self.ctx.info.device_type == wgpu::DeviceType::Cpu
    }

    /// True when frozen weights may be stored as f16: the adapter supports f16 in shaders
    /// (`SHADER_F16`) and the options allow it.
    pub fn has_f16(&self) -> bool {
        self.ctx.f16
    }

    /// True when reductions use subgroup operations: the adapter supports them (`SUBGROUP`)
    /// and the options allow it.
    pub fn has_subgroups(&self) -> bool {
        self.ctx.subgroups
    }

    /// The storage-binding limit in bytes that this backend splits work to respect.
    pub fn max_binding(&self) -> u64 {
        self.ctx.max_binding
    }

    /// How many times this device has read data back to the host so far (each a submit and a
    /// wait for a mapped staging buffer: a [`Backend::download`], one
    /// [`Backend::download_many`], a loss or a sum of squares), shared by the clones of this
    /// backend. A statistic for tests and profiling: a training step reads back once, its
    /// loss.
    pub fn readbacks(&self) -> u64 {
        self.ctx.readbacks()
    }

    fn tensor(&self, buf: GpuBuf, shape: &[usize]) -> Tensor<Wgpu> {
        Tensor {
            buf,
            shape: shape.to_vec(),
        }
    }

    fn alloc(&self, shape: &[usize]) -> Tensor<Wgpu> {
        self.tensor(self.ctx.alloc(shape.iter().product()), shape)
    }

    /// Errors when `t` is a frozen f16 weight, which `what` (an in-place kernel) would modify.
    fn mutable(what: &str, t: &Tensor<Wgpu>) -> Result<()> {
        if t.buf.dtype == DType::F16 {
            return Err(ctx::frozen_err(what));
        }
        Ok(())
    }

    /// True when `t` is stored as f16 (a frozen weight on an adapter with `SHADER_F16`).
    pub fn is_f16(t: &Tensor<Wgpu>) -> bool {
        t.buf.dtype == DType::F16
    }

    /// Runs the elementwise kernel `entry` over `n` elements. `arrays` are `(binding, buffer)`
    /// pairs of n-element arrays, bound in matching ranges when `n` exceeds one binding;
    /// `vectors` are bound whole (per-column vectors). `f` are the scalar parameters.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn elementwise(
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

    fn matmul(&self, mm: &Matmul<'_>) -> Result<()> {
        matmul::run(&self.ctx, mm)
    }

    /// `out [m, n] = alpha * A B (+ beta * out)` for row-major operands given as strided views.
    #[allow(clippy::too_many_arguments)]
    fn gemm_into(
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
    fn gemm(
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

impl Wgpu {
    /// `y = x W^T + bias (+ the low-rank term)` in one pass over y: x `[T, in]`, w `[out, in]`,
    /// bias `[out]` (checked here) → y `[T, out]`. The fused forward of every additive adapter
    /// (LoRA, VeRA, AdaLoRA) and, without a low-rank term, the plain linear layer.
    pub(crate) fn linear_lowrank(
        &self,
        x: &Tensor<Wgpu>,
        w: &Tensor<Wgpu>,
        bias: Option<&Tensor<Wgpu>>,
        lowrank: Option<LowRank<'_>>,
    ) -> Result<Tensor<Wgpu>> {
        let (t, din, dout) = check::linear(x, w)?;
        if let Some(b) = bias {
            check::vector("bias", b, dout)?;
        }
        let y = self.alloc(&[t, dout]);
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
        self.matmul(&mm)?;
        Ok(y)
    }

    /// `dx = dy W + (the low-rank term)` in one pass over dx: dy `[T, out]`, w `[out, in]` →
    /// dx `[T, in]`. The input gradient of every additive adapter over a dense base.
    pub(crate) fn backward_input_lowrank(
        &self,
        dy: &Tensor<Wgpu>,
        w: &Tensor<Wgpu>,
        lowrank: LowRank<'_>,
    ) -> Result<Tensor<Wgpu>> {
        let (t, dout) = dy.dims2("dy")?;
        let (_, din) = w.dims2("w")?;
        let dx = self.alloc(&[t, din]);
        let mut mm = Matmul::new(
            t,
            din,
            dout,
            Operand::n(&dy.buf, dout),
            Operand::n(&w.buf, din),
            &dx.buf,
            1.0,
            0.0,
        );
        mm.lowrank = Some(lowrank);
        self.matmul(&mm)?;
        Ok(dx)
    }
}

impl Backend for Wgpu {
    type Buf = GpuBuf;
    /// Packed indices and absmax statistics on the device, shared between clones (frozen).
    type Nf4Buf = Arc<Nf4Gpu>;

    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx.wait()
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::arg(
                "data",
                format!("{} values for shape {shape:?} ({n} elements)", data.len()),
            ));
        }
        let t = self.tensor(self.ctx.upload(data), shape);
        self.ctx.check()?;
        Ok(t)
    }

    /// With f16 enabled ([`Wgpu::has_f16`]), stores the values rounded to f16 (round to
    /// nearest even); else as [`Backend::upload`].
    fn upload_frozen(&self, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>> {
        if !self.ctx.f16 {
            return self.upload(data, shape);
        }
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::arg(
                "data",
                format!("{} values for shape {shape:?} ({n} elements)", data.len()),
            ));
        }
        let t = self.tensor(self.ctx.upload_f16(data), shape);
        self.ctx.check()?;
        Ok(t)
    }

    /// With f16 enabled, an f32 tensor is read back and uploaded again as f16 (done once per
    /// weight, when training is prepared); otherwise `t` is returned as is.
    fn freeze(&self, t: Tensor<Self>) -> Result<Tensor<Self>> {
        if !self.ctx.f16 || t.buf.dtype == DType::F16 {
            return Ok(t);
        }
        let data = self.download(&t)?;
        self.upload_frozen(&data, t.shape())
    }

    fn stored_bytes(t: &Tensor<Self>) -> usize {
        t.buf.dtype.size() * t.len()
    }

    fn download(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        Ok(self.download_many(&[t])?.pop().unwrap_or_default())
    }

    /// One staging buffer and one wait for all of `ts` (one readback).
    fn download_many(&self, ts: &[&Tensor<Self>]) -> Result<Vec<Vec<f32>>> {
        let words = |t: &Tensor<Self>| match t.buf.dtype {
            DType::F32 => t.buf.len,
            DType::F16 => t.buf.len.div_ceil(2),
        };
        let bufs: Vec<(&wgpu::Buffer, usize)> =
            ts.iter().map(|t| (&t.buf.buffer, words(t))).collect();
        let read = self.ctx.read_many(&bufs)?;
        Ok(ts
            .iter()
            .zip(read)
            .map(|(t, w)| match t.buf.dtype {
                DType::F32 => bytemuck::cast_slice::<u32, f32>(&w).to_vec(),
                DType::F16 => {
                    let halves: &[u16] = bytemuck::cast_slice(&w);
                    halves[..t.buf.len]
                        .iter()
                        .map(|&h| half::f16::from_bits(h).to_f32())
                        .collect::<Vec<f32>>()
                }
            })
            .collect())
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor<Self>> {
        let t = self.alloc(shape);
        self.ctx.check()?;
        Ok(t)
    }

    fn copy_into(&self, src: &Tensor<Self>, dst: &mut Tensor<Self>) -> Result<()> {
        same_shape("dst", dst, src)?;
        Self::mutable("copy_into", dst)?;
        if src.buf.dtype != dst.buf.dtype {
            return Err(Error::arg("src", "storage type differs from dst's"));
        }
        // A buffer-to-buffer copy in the pending encoder (each tensor owns its buffer).
        let bytes = src.buf.bytes().min(dst.buf.bytes());
        self.ctx.copy(&src.buf.buffer, 0, &dst.buf.buffer, 0, bytes);
        self.ctx.check()
    }

    fn gather_rows(&self, t: &Tensor<Self>, idx: &[u32]) -> Result<Tensor<Self>> {
        ops::gather_rows(self, t, idx)
    }

    fn scatter_add_rows(
        &self,
        dst: &mut Tensor<Self>,
        idx: &[u32],
        src: &Tensor<Self>,
    ) -> Result<()> {
        ops::scatter_add_rows(self, dst, idx, src)
    }

    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        self.linear_lowrank(x, w, bias, None)
    }

    fn linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Tensor<Self>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<Option<Tensor<Self>>> {
        let (t, dout) = dy.dims2("dy")?;
        let (wout, din) = w.dims2("w")?;
        if wout != dout {
            return Err(Error::shape("w", format!("[{dout}, in]"), w.shape()));
        }
        let (a, b) = (Operand::n(&dy.buf, dout), Operand::n(&w.buf, din));
        match acc {
            Some(dx) => {
                dx.expect_shape("dx", &[t, din])?;
                self.gemm_into(t, din, dout, a, b, 1.0, 1.0, &dx.buf)?;
                Ok(None)
            }
            None => Ok(Some(self.gemm(t, din, dout, a, b, 1.0)?)),
        }
    }

    fn linear_backward_weight(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<()> {
        let (t, dout) = dy.dims2("dy")?;
        let (tx, din) = x.dims2("x")?;
        if tx != t {
            return Err(Error::shape("x", format!("[{t}, in]"), x.shape()));
        }
        dw.expect_shape("dw", &[dout, din])?;
        Self::mutable("linear_backward_weight", dw)?;
        let (a, b) = (Operand::t(&dy.buf, dout), Operand::n(&x.buf, din));
        self.gemm_into(dout, din, t, a, b, 1.0, 1.0, &dw.buf)
    }

    fn axpy(&self, a: &mut Tensor<Self>, alpha: f32, b: &Tensor<Self>) -> Result<()> {
        same_shape("b", b, a)?;
        Self::mutable("axpy", a)?;
        self.elementwise(
            "axpy",
            a.len(),
            &[(1, &a.buf), (2, &b.buf)],
            &[],
            0,
            0,
            &[alpha],
        )
    }

    fn scale(&self, a: &mut Tensor<Self>, alpha: f32) -> Result<()> {
        Self::mutable("scale", a)?;
        self.elementwise("scale", a.len(), &[(1, &a.buf)], &[], 0, 0, &[alpha])
    }

    fn sum_squares(&self, a: &Tensor<Self>) -> Result<f64> {
        ops::sum_squares(self, a)
    }

    fn lora_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let (t, din, dout) = check::linear(x, w0)?;
        let r = check::lora(din, dout, lora_a, lora_b)?;
        if let Some(b) = bias {
            check::vector("bias", b, dout)?;
        }
        // h = x A^T, then one pass over y: x W0^T + bias + s h B^T.
        let h = self.gemm(
            t,
            r,
            din,
            Operand::n(&x.buf, din),
            Operand::t(&lora_a.buf, din),
            1.0,
        )?;
        let lowrank = LowRank {
            r,
            h: Operand::n(&h.buf, r),
            g: Operand::n(&lora_b.buf, r),
            scale: scaling,
            jscale: None,
            nscale: None,
        };
        let y = self.linear_lowrank(x, w0, bias, Some(lowrank))?;
        Ok((y, h))
    }

    fn lora_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        w0: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        let (t, din, dout) = check::linear(x, w0)?;
        let r = check::lora(din, dout, lora_a, lora_b)?;
        dy.expect_shape("dy", &[t, dout])?;
        h.expect_shape("h", &[t, r])?;
        // g = dy B [T, r]; dx = dy W0 + s g A in one pass; dA = s g^T x; dB = s dy^T h.
        let g = self.gemm(
            t,
            r,
            dout,
            Operand::n(&dy.buf, dout),
            Operand::n(&lora_b.buf, r),
            1.0,
        )?;
        let dx = self.backward_input_lowrank(
            dy,
            w0,
            LowRank {
                r,
                h: Operand::n(&g.buf, r),
                g: Operand::t(&lora_a.buf, din),
                scale: scaling,
                jscale: None,
                nscale: None,
            },
        )?;
        let (da, db) = adapters::lora_grads(self, dy, x, h, &g, scaling)?;
        Ok((dx, da, db))
    }

    fn lora_merge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        sign: f32,
    ) -> Result<()> {
        let (dout, din) = w.dims2("w")?;
        let r = check::lora(din, dout, lora_a, lora_b)?;
        Self::mutable("lora_merge", w)?;
        self.gemm_into(
            dout,
            din,
            r,
            Operand::n(&lora_b.buf, r),
            Operand::n(&lora_a.buf, din),
            sign * scaling,
            1.0,
            &w.buf,
        )
    }

    fn row_sq_norms(&self, w: &Tensor<Self>) -> Result<Tensor<Self>> {
        adapters::row_sq_norms(self, w)
    }

    fn dora_weight_norm(
        &self,
        w0: &Tensor<Self>,
        w0_row_sq: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>> {
        adapters::dora_weight_norm(self, w0, w0_row_sq, lora_a, lora_b, scaling)
    }

    fn dora_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, DoraSaved<Self>)> {
        let (_, din, dout) = check::linear(x, w0)?;
        check::lora(din, dout, lora_a, lora_b)?;
        let base = self.linear(x, w0, None)?;
        adapters::dora_forward_from_base(
            self,
            base,
            x,
            bias,
            lora_a,
            lora_b,
            scaling,
            magnitude,
            weight_norm,
        )
    }

    fn dora_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        saved: &DoraSaved<Self>,
        w0: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<DoraGrads<Self>> {
        check::linear(x, w0)?;
        let (mut grads, gk) = adapters::dora_backward_adapter(
            self,
            dy,
            x,
            saved,
            lora_a,
            lora_b,
            scaling,
            magnitude,
            weight_norm,
        )?;
        self.linear_backward_input(&gk, w0, Some(&mut grads.dx))?;
        Ok(grads)
    }

    fn dora_merge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<()> {
        adapters::dora_merge(self, w, lora_a, lora_b, scaling, magnitude, weight_norm)
    }

    fn dora_unmerge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<()> {
        adapters::dora_unmerge(self, w, lora_a, lora_b, scaling, magnitude, weight_norm)
    }

    fn vera_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        vera_a: &Tensor<Self>,
        vera_b: &Tensor<Self>,
        lambda_d: &Tensor<Self>,
        lambda_b: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        adapters::vera_forward(self, x, w0, bias, vera_a, vera_b, lambda_d, lambda_b)
    }

    fn vera_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        w0: &Tensor<Self>,
        vera_a: &Tensor<Self>,
        vera_b: &Tensor<Self>,
        lambda_d: &Tensor<Self>,
        lambda_b: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        adapters::vera_backward(self, dy, x, h, w0, vera_a, vera_b, lambda_d, lambda_b)
    }

    fn vera_merge(
        &self,
        w: &mut Tensor<Self>,
        vera_a: &Tensor<Self>,
        vera_b: &Tensor<Self>,
        lambda_d: &Tensor<Self>,
        lambda_b: &Tensor<Self>,
        sign: f32,
    ) -> Result<()> {
        adapters::vera_merge(self, w, vera_a, vera_b, lambda_d, lambda_b, sign)
    }

    fn adalora_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        lora_e: &Tensor<Self>,
        scaling: f32,
        ranknum: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        adapters::adalora_forward(self, x, w0, bias, lora_a, lora_b, lora_e, scaling, ranknum)
    }

    fn adalora_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        w0: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        lora_e: &Tensor<Self>,
        scaling: f32,
        ranknum: f32,
    ) -> Result<AdaLoraGrads<Self>> {
        adapters::adalora_backward(self, dy, x, h, w0, lora_a, lora_b, lora_e, scaling, ranknum)
    }

    fn adalora_merge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        lora_e: &Tensor<Self>,
        scaling: f32,
        ranknum: f32,
        sign: f32,
    ) -> Result<()> {
        adapters::adalora_merge(self, w, lora_a, lora_b, lora_e, scaling, ranknum, sign)
    }

    fn adalora_update_ipt(
        &self,
        param: &Tensor<Self>,
        grad: &Tensor<Self>,
        exp_avg_ipt: &mut Tensor<Self>,
        exp_avg_unc: &mut Tensor<Self>,
        beta1: f64,
        beta2: f64,
    ) -> Result<()> {
        adalora::update_ipt(self, param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2)
    }

    fn adalora_triplet_scores(
        &self,
        ema: &AdaLoraIpt<Self>,
        scores: &mut Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora::triplet_scores(self, ema, scores, offset)
    }

    fn adalora_threshold(&self, scores: &Tensor<Self>, k: usize) -> Result<Tensor<Self>> {
        adalora::threshold(self, scores, k)
    }

    fn adalora_rank_mask(
        &self,
        scores: &Tensor<Self>,
        threshold: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        adalora::rank_mask(self, scores, threshold)
    }

    fn adalora_apply_mask(
        &self,
        lora_e: &mut Tensor<Self>,
        keep: &Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora::apply_mask(self, lora_e, keep, offset)
    }

    fn adalora_orth_reg(
        &self,
        factors: &[(&Tensor<Self>, &Tensor<Self>)],
        grads: &mut [(&mut Tensor<Self>, &mut Tensor<Self>)],
        orth_reg_weight: f32,
    ) -> Result<Tensor<Self>> {
        adalora::orth_reg(self, factors, grads, orth_reg_weight)
    }

    fn upload_nf4(&self, w: &Nf4Tensor) -> Result<Nf4Weight<Self>> {
        nf4::upload(self, w)
    }

    fn nf4_dequantize(&self, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        nf4::dequantize(self, w)
    }

    fn nf4_linear(
        &self,
        x: &Tensor<Self>,
        w: &Nf4Weight<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        nf4::linear(self, x, w, bias)
    }

    fn nf4_linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Nf4Weight<Self>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<Option<Tensor<Self>>> {
        nf4::linear_backward_input(self, dy, w, acc)
    }

    fn nf4_row_sq_norms(&self, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        nf4::row_sq_norms(self, w)
    }

    fn nf4_dora_weight_norm(
        &self,
        w0: &Nf4Weight<Self>,
        w0_row_sq: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>> {
        nf4::dora_weight_norm(self, w0, w0_row_sq, lora_a, lora_b, scaling)
    }

    fn lora_add(
        &self,
        y: &mut Tensor<Self>,
        x: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>> {
        let (t, din, dout, r) = check::adapter(x, lora_a, lora_b, "y", y)?;
        let h = self.gemm(
            t,
            r,
            din,
            Operand::n(&x.buf, din),
            Operand::t(&lora_a.buf, din),
            1.0,
        )?;
        adapters::add_lowrank(self, &y.buf, t, dout, &h, lora_b, r, scaling)?;
        Ok(h)
    }

    fn lora_backward_adapter(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        dx: &mut Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let (t, din, dout, r) = check::adapter(x, lora_a, lora_b, "dy", dy)?;
        h.expect_shape("h", &[t, r])?;
        dx.expect_shape("dx", &[t, din])?;
        let g = self.gemm(
            t,
            r,
            dout,
            Operand::n(&dy.buf, dout),
            Operand::n(&lora_b.buf, r),
            1.0,
        )?;
        // dx += s g A
        self.gemm_into(
            t,
            din,
            r,
            Operand::n(&g.buf, r),
            Operand::n(&lora_a.buf, din),
            scaling,
            1.0,
            &dx.buf,
        )?;
        adapters::lora_grads(self, dy, x, h, &g, scaling)
    }

    fn dora_forward_from_base(
        &self,
        base_out: Tensor<Self>,
        x: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, DoraSaved<Self>)> {
        adapters::dora_forward_from_base(
            self,
            base_out,
            x,
            bias,
            lora_a,
            lora_b,
            scaling,
            magnitude,
            weight_norm,
        )
    }

    fn dora_backward_adapter(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        saved: &DoraSaved<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<(DoraGrads<Self>, Tensor<Self>)> {
        adapters::dora_backward_adapter(
            self,
            dy,
            x,
            saved,
            lora_a,
            lora_b,
            scaling,
            magnitude,
            weight_norm,
        )
    }

    fn rmsnorm(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::rmsnorm(self, x, weight, eps)
    }

    fn rmsnorm_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        rstd: &Tensor<Self>,
        dweight: Option<&mut Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        ops::rmsnorm_backward(self, dy, x, weight, rstd, dweight)
    }

    fn rope(
        &self,
        x: &mut Tensor<Self>,
        positions: &[u32],
        head_dim: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        ops::rope(self, x, positions, head_dim, theta, inverse)
    }

    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        seqs: &[SeqSpan],
        n_heads: usize,
        n_kv_heads: usize,
        scale: f32,
    ) -> Result<AttentionSaved<Self>> {
        ops::attention(self, q, k, v, seqs, n_heads, n_kv_heads, scale)
    }

    fn attention_backward(
        &self,
        d_out: &Tensor<Self>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        saved: &AttentionSaved<Self>,
        seqs: &[SeqSpan],
        n_heads: usize,
        n_kv_heads: usize,
        scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        ops::attention_backward(
            self, d_out, q, k, v, saved, seqs, n_heads, n_kv_heads, scale,
        )
    }

    fn swiglu(&self, gate: &Tensor<Self>, up: &Tensor<Self>) -> Result<Tensor<Self>> {
        same_shape("up", up, gate)?;
        let out = self.alloc(gate.shape());
        self.elementwise(
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

    fn swiglu_backward(
        &self,
        d: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        same_shape("up", up, gate)?;
        same_shape("d", d, gate)?;
        let dg = self.alloc(gate.shape());
        let du = self.alloc(gate.shape());
        self.elementwise(
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

    fn cross_entropy(
        &self,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(f64, Tensor<Self>)> {
        ops::cross_entropy(self, logits, labels, grad_scale)
    }

    fn cross_entropy_stats(
        &self,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::cross_entropy_stats(self, logits, labels, grad_scale)
    }

    fn adamw_step(
        &self,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        p: &AdamWParams,
    ) -> Result<()> {
        // The same f32 constants as the CPU reference (torch's single-tensor AdamW).
        let check::AdamWFactors {
            step_size,
            bc2_sqrt,
            decay,
        } = check::adamw(param, grad, m, v, p)?;
        Self::mutable("adamw_step", param)?;
        Self::mutable("adamw_step exp_avg", m)?;
        Self::mutable("adamw_step exp_avg_sq", v)?;
        self.elementwise(
            "adamw",
            param.len(),
            &[(1, &param.buf), (2, &grad.buf), (5, &m.buf), (6, &v.buf)],
            &[],
            0,
            0,
            &[p.lr, p.beta1, p.beta2, p.eps, decay, step_size, bc2_sqrt],
        )
    }
}
