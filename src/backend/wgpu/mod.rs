//! The WGSL backend: every kernel in `shaders/*.wgsl`, run through wgpu on Vulkan, Metal or
//! DX12 (and in CI on Mesa's lavapipe, a Vulkan device on the CPU).
//!
//! [`Wgpu`] implements the unchecked [`Kernels`] (the trait's `Backend` methods check every
//! argument before they get here); the impl below only delegates, one file per concept as the
//! CPU reference has them: `memory.rs` (buffers, uploads, readbacks, bindings of buffer ranges,
//! row gathers), `dense.rs` (the base products over a dense or NF4 weight, elementwise updates,
//! row reductions), `lowrank.rs` (the fused low-rank product of every adapter method: forward,
//! gradients, merges, DoRA's weight norm), `nf4.rs` (QLoRA's quantized base, tile by tile),
//! `adalora.rs` (the rank allocator and regularizer), `ops.rs` (the Llama block ops and AdamW);
//! `ctx.rs` holds the device and the dispatch queue, `matmul.rs` the one tiled matmul.
//!
//! Storage is f32, except frozen weights ([`crate::Backend::upload_frozen`],
//! [`crate::Backend::freeze`]), which are stored as f16 where the adapter has `SHADER_F16` and
//! [`WgpuOptions::f16`] allows it: half the memory and bandwidth of the base weights,
//! arithmetic still in f32. The kernels that read a frozen weight (the matmul's A and B operands, the row norms of DoRA) have f16
//! variants; the in-place kernels refuse one with an error; every other kernel refuses an f16
//! binding at dispatch rather than misread it. All dense products go through one tiled matmul
//! whose epilogue adds the low-rank term in the same pass over the output
//! (`shaders/matmul.wgsl`, the `matmul` module); the rest are small elementwise and reduction kernels.
//! Dispatches are batched into few command buffers and nothing is read back inside a step
//! except what the caller asks for. Results equal the CPU reference ([`crate::Cpu`]) up to f32
//! summation order; the tests in `tests/wgpu_*.rs` check every kernel against it.

mod adalora;
mod compose;
mod ctx;
mod dense;
mod lowrank;
mod matmul;
mod memory;
mod multi;
mod nf4;
mod ops;
mod pointwise;

use self::ctx::{Ctx, DType, GpuBuf};
use super::check::{AdamWFactors, EmaCoefs};
use super::kernels::Checked;
use super::{
    Activation, AdaLoraIpt, AdamWParams, AttentionSaved, Axis, Base, Bf16Weight, GradWants,
    Kernels, LowRank, LowRankOut, LowRankPool, Nf4Weight, ParamGrads, SeqSpan, Tensor,
};
use crate::error::Result;
use crate::quant::nf4::Nf4Tensor;
use std::sync::Arc;

pub use self::nf4::Nf4Gpu;

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
    /// Errors: [`Error::BackendUnavailable`](crate::error::Error::BackendUnavailable) when no adapter or device can be had.
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
    /// wait for a mapped staging buffer: a [`crate::Backend::download`], one
    /// [`crate::Backend::download_many`], a loss or a sum of squares), shared by the clones of
    /// this backend. A statistic for tests and profiling: a training step reads back once, its
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
}

impl Kernels for Wgpu {
    type Buf = GpuBuf;
    /// Packed indices and absmax statistics on the device, shared between clones (frozen).
    /// A frozen dense tensor of the bf16-rounded values (see [`Bf16Weight`]).
    type Bf16Buf = Tensor<Self>;
    type Nf4Buf = Arc<Nf4Gpu>;

    fn name_kernel(&self, _: Checked) -> &'static str {
        "wgpu"
    }
    fn synchronize_kernel(&self, _: Checked) -> Result<()> {
        self.ctx.wait()
    }

    fn upload_kernel(&self, _: Checked, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>> {
        memory::upload(self, data, shape)
    }
    /// With f16 enabled ([`Wgpu::has_f16`]), stores the values rounded to f16 (round to
    /// nearest even); else as an ordinary upload.
    fn upload_frozen_kernel(
        &self,
        _: Checked,
        data: &[f32],
        shape: &[usize],
    ) -> Result<Tensor<Self>> {
        memory::upload_frozen(self, data, shape)
    }
    /// With f16 enabled, an f32 tensor is read back and uploaded again as f16 (done once per
    /// weight, when training is prepared); otherwise `t` is returned as is.
    fn freeze_kernel(&self, _: Checked, t: Tensor<Self>) -> Result<Tensor<Self>> {
        memory::freeze(self, t)
    }
    fn stored_bytes_kernel(_: Checked, t: &Tensor<Self>) -> usize {
        memory::stored_bytes(t)
    }
    fn download_kernel(&self, _: Checked, t: &Tensor<Self>) -> Result<Vec<f32>> {
        Ok(memory::download_many(self, &[t])?.pop().unwrap_or_default())
    }
    /// One staging buffer and one wait for all of `ts` (one readback).
    fn download_many_kernel(&self, _: Checked, ts: &[&Tensor<Self>]) -> Result<Vec<Vec<f32>>> {
        memory::download_many(self, ts)
    }
    fn zeros_kernel(&self, _: Checked, shape: &[usize]) -> Result<Tensor<Self>> {
        memory::zeros(self, shape)
    }
    fn copy_into_kernel(
        &self,
        _: Checked,
        src: &Tensor<Self>,
        dst: &mut Tensor<Self>,
    ) -> Result<()> {
        memory::copy_into(self, src, dst)
    }
    fn gather_rows_kernel(
        &self,
        _: Checked,
        t: &Tensor<Self>,
        idx: &[u32],
    ) -> Result<Tensor<Self>> {
        memory::gather_rows(self, t, idx)
    }
    fn scatter_add_rows_kernel(
        &self,
        _: Checked,
        dst: &mut Tensor<Self>,
        idx: &[u32],
        src: &Tensor<Self>,
    ) -> Result<()> {
        memory::scatter_add_rows(self, dst, idx, src)
    }

    fn linear_lowrank_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        base: Base<'_, Self>,
        bias: Option<&Tensor<Self>>,
        term: Option<&LowRank<'_, Self>>,
    ) -> Result<LowRankOut<Self>> {
        lowrank::forward(self, x, base, bias, term)
    }
    fn linear_lowrank_with_norm_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        base: Base<'_, Self>,
        base_row_sq: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        term: &LowRank<'_, Self>,
    ) -> Result<LowRankOut<Self>> {
        lowrank::forward_with_norm(self, x, base, base_row_sq, bias, term)
    }
    fn backward_input_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        base: Base<'_, Self>,
        term: Option<&LowRank<'_, Self>>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<(Option<Tensor<Self>>, Option<Tensor<Self>>)> {
        lowrank::backward_input(self, dy, base, term, acc)
    }
    fn lowrank_grads_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        z: Option<&Tensor<Self>>,
        g: &Tensor<Self>,
        term: &LowRank<'_, Self>,
        wants: GradWants,
    ) -> Result<ParamGrads<Self>> {
        lowrank::grads(self, dy, x, h, z, g, term, wants)
    }
    fn lowrank_merge_kernel(
        &self,
        _: Checked,
        w: &mut Tensor<Self>,
        term: &LowRank<'_, Self>,
        sign: f32,
    ) -> Result<()> {
        lowrank::merge(self, w, term, sign)
    }
    fn row_sq_norms_kernel(&self, _: Checked, base: Base<'_, Self>) -> Result<Tensor<Self>> {
        dense::row_sq_norms(self, base)
    }
    fn lowrank_row_norms_kernel(
        &self,
        _: Checked,
        base: Base<'_, Self>,
        base_row_sq: &Tensor<Self>,
        term: &LowRank<'_, Self>,
    ) -> Result<Tensor<Self>> {
        lowrank::row_norms(self, base, base_row_sq, term)
    }
    fn linear_backward_weight_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<()> {
        dense::backward_weight(self, dy, x, dw)
    }
    fn lowrank_multi_add_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        pool: &LowRankPool<Self>,
        adapter_of_row: &[i32],
        y: &mut Tensor<Self>,
    ) -> Result<()> {
        multi::add(self, x, pool, adapter_of_row, y)
    }
    fn axpy_kernel(
        &self,
        _: Checked,
        a: &mut Tensor<Self>,
        alpha: f32,
        b: &Tensor<Self>,
    ) -> Result<()> {
        dense::axpy(self, a, alpha, b)
    }
    fn scale_kernel(&self, _: Checked, a: &mut Tensor<Self>, alpha: f32) -> Result<()> {
        dense::scale(self, a, alpha)
    }
    fn sum_squares_kernel(&self, _: Checked, a: &Tensor<Self>) -> Result<f64> {
        dense::sum_squares(self, a)
    }

    fn upload_nf4_kernel(&self, _: Checked, w: &Nf4Tensor) -> Result<Nf4Weight<Self>> {
        nf4::upload(self, w)
    }
    fn nf4_dequantize_kernel(&self, _: Checked, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        nf4::dequantize(self, w)
    }
    fn upload_bf16_kernel(
        &self,
        _: Checked,
        data: &[f32],
        out: usize,
        in_: usize,
    ) -> Result<Bf16Weight<Self>> {
        Bf16Weight::held_frozen(self, data, out, in_)
    }
    fn bf16_to_f32_kernel(&self, _: Checked, w: &Bf16Weight<Self>) -> Result<Tensor<Self>> {
        w.held_to_f32(self)
    }

    fn adalora_update_ipt_kernel(
        &self,
        _: Checked,
        param: &Tensor<Self>,
        grad: &Tensor<Self>,
        exp_avg_ipt: &mut Tensor<Self>,
        exp_avg_unc: &mut Tensor<Self>,
        coefs: &EmaCoefs,
    ) -> Result<()> {
        adalora::update_ipt(self, param, grad, exp_avg_ipt, exp_avg_unc, coefs)
    }
    fn adalora_triplet_scores_kernel(
        &self,
        _: Checked,
        ema: &AdaLoraIpt<Self>,
        scores: &mut Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora::triplet_scores(self, ema, scores, offset)
    }
    fn adalora_threshold_kernel(
        &self,
        _: Checked,
        scores: &Tensor<Self>,
        k: usize,
    ) -> Result<Tensor<Self>> {
        adalora::threshold(self, scores, k)
    }
    fn adalora_rank_mask_kernel(
        &self,
        _: Checked,
        scores: &Tensor<Self>,
        threshold: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        adalora::rank_mask(self, scores, threshold)
    }
    fn adalora_apply_mask_kernel(
        &self,
        _: Checked,
        lora_e: &mut Tensor<Self>,
        keep: &Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora::apply_mask(self, lora_e, keep, offset)
    }
    fn adalora_orth_reg_kernel(
        &self,
        _: Checked,
        factors: &[(&Tensor<Self>, &Tensor<Self>)],
        grads: &mut [(&mut Tensor<Self>, &mut Tensor<Self>)],
        orth_reg_weight: f32,
    ) -> Result<Tensor<Self>> {
        adalora::orth_reg(self, factors, grads, orth_reg_weight)
    }

    fn rmsnorm_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::rmsnorm(self, x, weight, eps)
    }
    fn rmsnorm_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        rstd: &Tensor<Self>,
        dweight: Option<&mut Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        ops::rmsnorm_backward(self, dy, x, weight, rstd, dweight)
    }
    fn rope_kernel(
        &self,
        _: Checked,
        x: &mut Tensor<Self>,
        positions: &[u32],
        head_dim: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        ops::rope(self, x, positions, head_dim, theta, inverse)
    }
    fn attention_kernel(
        &self,
        _: Checked,
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
    fn attention_backward_kernel(
        &self,
        _: Checked,
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
    fn attention_cached_kernel(
        &self,
        _: Checked,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        q_seqs: &[SeqSpan],
        kv_seqs: &[SeqSpan],
        n_heads: usize,
        n_kv_heads: usize,
        scale: f32,
    ) -> Result<Tensor<Self>> {
        ops::attention_cached(self, q, k, v, q_seqs, kv_seqs, n_heads, n_kv_heads, scale)
    }
    fn mul_vector_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        v: &Tensor<Self>,
        axis: Axis,
    ) -> Result<Tensor<Self>> {
        pointwise::mul_vector(self, x, v, axis)
    }
    fn sum_product_kernel(
        &self,
        _: Checked,
        a: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        axis: Axis,
    ) -> Result<Tensor<Self>> {
        pointwise::sum_product(self, a, b, axis)
    }
    fn activation_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        act: Activation,
    ) -> Result<Tensor<Self>> {
        pointwise::activation(self, x, act)
    }
    fn activation_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        act: Activation,
    ) -> Result<Tensor<Self>> {
        pointwise::activation_backward(self, dy, x, act)
    }
    fn softmax_rows_kernel(&self, _: Checked, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        pointwise::softmax_rows(self, x)
    }
    fn softmax_rows_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        p: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        pointwise::softmax_rows_backward(self, dy, p)
    }
    fn swiglu_kernel(
        &self,
        _: Checked,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        ops::swiglu(self, gate, up)
    }
    fn swiglu_backward_kernel(
        &self,
        _: Checked,
        d: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::swiglu_backward(self, d, gate, up)
    }
    fn cross_entropy_kernel(
        &self,
        _: Checked,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(f64, Tensor<Self>)> {
        ops::cross_entropy(self, logits, labels, grad_scale)
    }
    fn cross_entropy_stats_kernel(
        &self,
        _: Checked,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::cross_entropy_stats(self, logits, labels, grad_scale)
    }

    fn adamw_step_kernel(
        &self,
        _: Checked,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        factors: &AdamWFactors,
        p: &AdamWParams,
    ) -> Result<()> {
        ops::adamw_step(self, param, grad, m, v, factors, p)
    }
}
