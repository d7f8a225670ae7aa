//! The CPU reference backend: f32, row-major `Vec<f32>` buffers (frozen NF4 and bf16 bases in
//! their own stores), a fast GEMM ([`gemm`]) and
//! rayon for the rest. Every other backend is tested against these functions, so they favour
//! plain, obviously-correct loops around the GEMMs.

pub mod adalora;
mod bf16;
mod dense;
pub mod gemm;
mod lowrank;
mod memory;
mod multi;
mod nf4;
mod ops;
#[cfg(target_arch = "x86_64")]
mod packed;
mod pointwise;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod small_m;
mod tiled;

use super::check::{AdamWFactors, EmaCoefs};
use super::kernels::Checked;
use super::{
    Activation, AdaLoraIpt, AdamWParams, AttentionSaved, Axis, Base, Bf16Weight, GradWants,
    InputGrad, Kernels, LowRank, LowRankOut, LowRankPool, Nf4Weight, ParamGrads, SeqSpan, Tensor,
};
use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Tensor;
use std::sync::Arc;

/// The CPU reference backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    /// Wraps host data as a tensor (no copy).
    pub fn from_vec(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor<Cpu>> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::arg(
                "data",
                format!("{} values for shape {shape:?} ({n} elements)", data.len()),
            ));
        }
        Ok(Tensor {
            buf: data,
            shape: shape.to_vec(),
        })
    }
}

impl Tensor<Cpu> {
    /// The data of a CPU tensor.
    pub fn data(&self) -> &[f32] {
        &self.buf
    }
    /// The mutable data of a CPU tensor.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.buf
    }
    /// Consumes the tensor, returning its data.
    pub fn into_vec(self) -> Vec<f32> {
        self.buf
    }
}

fn new(data: Vec<f32>, shape: &[usize]) -> Tensor<Cpu> {
    Tensor {
        buf: data,
        shape: shape.to_vec(),
    }
}

impl Kernels for Cpu {
    type Buf = Vec<f32>;
    /// The quantized tensor itself, shared: uploading copies it once, clones are cheap.
    type Nf4Buf = Arc<Nf4Tensor>;
    /// The bf16 bits, row-major, shared.
    type Bf16Buf = Arc<Vec<u16>>;

    fn name_kernel(&self, _: Checked) -> &'static str {
        "cpu"
    }

    fn upload_kernel(&self, _: Checked, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>> {
        Ok(new(data.to_vec(), shape))
    }
    fn download_kernel(&self, _: Checked, t: &Tensor<Self>) -> Result<Vec<f32>> {
        Ok(t.buf.clone())
    }
    fn zeros_kernel(&self, _: Checked, shape: &[usize]) -> Result<Tensor<Self>> {
        Ok(new(vec![0.0; shape.iter().product()], shape))
    }
    fn gather_rows_kernel(
        &self,
        _: Checked,
        t: &Tensor<Self>,
        idx: &[u32],
    ) -> Result<Tensor<Self>> {
        Ok(memory::gather_rows(t, idx))
    }
    fn scatter_add_rows_kernel(
        &self,
        _: Checked,
        dst: &mut Tensor<Self>,
        idx: &[u32],
        src: &Tensor<Self>,
    ) -> Result<()> {
        memory::scatter_add_rows(dst, idx, src);
        Ok(())
    }

    fn linear_lowrank_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        base: Base<'_, Self>,
        bias: Option<&Tensor<Self>>,
        term: Option<&LowRank<'_, Self>>,
    ) -> Result<LowRankOut<Self>> {
        lowrank::forward(x, base, bias, term)
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
        lowrank::forward_with_norm(x, base, base_row_sq, bias, term)
    }
    fn backward_input_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        base: Base<'_, Self>,
        term: Option<&LowRank<'_, Self>>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<InputGrad<Self>> {
        lowrank::backward_input(dy, base, term, acc)
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
        lowrank::grads(dy, x, h, z, g, term, wants)
    }
    fn lowrank_merge_kernel(
        &self,
        _: Checked,
        w: &mut Tensor<Self>,
        term: &LowRank<'_, Self>,
        sign: f32,
    ) -> Result<()> {
        lowrank::merge(w, term, sign)
    }
    fn lowrank_merge_with_norm_kernel(
        &self,
        _: Checked,
        w: &mut Tensor<Self>,
        _w_row_sq: &Tensor<Self>,
        term: &LowRank<'_, Self>,
    ) -> Result<Tensor<Self>> {
        lowrank::merge_with_norm(w, term)
    }
    fn row_sq_norms_kernel(&self, _: Checked, base: Base<'_, Self>) -> Result<Tensor<Self>> {
        dense::row_sq_norms(base)
    }
    fn lowrank_row_norms_kernel(
        &self,
        _: Checked,
        base: Base<'_, Self>,
        base_row_sq: &Tensor<Self>,
        term: &LowRank<'_, Self>,
    ) -> Result<Tensor<Self>> {
        lowrank::row_norms(base, base_row_sq, term)
    }
    fn linear_backward_weight_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<()> {
        dense::backward_weight(dy, x, dw);
        Ok(())
    }
    fn lowrank_multi_add_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        pool: &LowRankPool<Self>,
        adapter_of_row: &[i32],
        y: &mut Tensor<Self>,
    ) -> Result<()> {
        multi::add(x, pool, adapter_of_row, y)
    }
    fn axpy_kernel(
        &self,
        _: Checked,
        a: &mut Tensor<Self>,
        alpha: f32,
        b: &Tensor<Self>,
    ) -> Result<()> {
        dense::axpy(a, alpha, b);
        Ok(())
    }
    fn scale_kernel(&self, _: Checked, a: &mut Tensor<Self>, alpha: f32) -> Result<()> {
        dense::scale(a, alpha);
        Ok(())
    }
    fn sum_squares_kernel(&self, _: Checked, a: &Tensor<Self>) -> Result<f64> {
        Ok(dense::sum_squares(a))
    }

    fn upload_nf4_kernel(&self, _: Checked, w: &Nf4Tensor) -> Result<Nf4Weight<Self>> {
        nf4::upload(w)
    }
    fn nf4_dequantize_kernel(&self, _: Checked, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        nf4::dequantize(w)
    }
    fn upload_bf16_kernel(
        &self,
        _: Checked,
        data: &[f32],
        out: usize,
        in_: usize,
    ) -> Result<Bf16Weight<Self>> {
        bf16::upload(data, out, in_)
    }
    fn bf16_to_f32_kernel(&self, _: Checked, w: &Bf16Weight<Self>) -> Result<Tensor<Self>> {
        bf16::to_f32(w)
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
        adalora::update_ipt_kernel(param, grad, exp_avg_ipt, exp_avg_unc, coefs);
        Ok(())
    }
    fn adalora_triplet_scores_kernel(
        &self,
        _: Checked,
        ema: &AdaLoraIpt<Self>,
        scores: &mut Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora::triplet_scores_kernel(ema, scores, offset);
        Ok(())
    }
    fn adalora_threshold_kernel(
        &self,
        _: Checked,
        scores: &Tensor<Self>,
        k: usize,
    ) -> Result<Tensor<Self>> {
        Ok(adalora::threshold_kernel(scores, k))
    }
    fn adalora_rank_mask_kernel(
        &self,
        _: Checked,
        scores: &Tensor<Self>,
        threshold: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        Ok(adalora::rank_mask_kernel(scores, threshold))
    }
    fn adalora_apply_mask_kernel(
        &self,
        _: Checked,
        lora_e: &mut Tensor<Self>,
        keep: &Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora::apply_mask_kernel(lora_e, keep, offset);
        Ok(())
    }
    fn adalora_orth_reg_kernel(
        &self,
        _: Checked,
        factors: &[(&Tensor<Self>, &Tensor<Self>)],
        grads: &mut [(&mut Tensor<Self>, &mut Tensor<Self>)],
        orth_reg_weight: f32,
    ) -> Result<Tensor<Self>> {
        adalora::orth_reg_kernel(factors, grads, orth_reg_weight)
    }

    fn rmsnorm_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        Ok(ops::rmsnorm(x, weight, eps))
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
        Ok(ops::rmsnorm_backward(dy, x, weight, rstd, dweight))
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
        ops::rope(x, positions, head_dim, theta, inverse);
        Ok(())
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
        Ok(ops::attention(q, k, v, seqs, n_heads, n_kv_heads, scale))
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
        Ok(ops::attention_backward(
            d_out, q, k, v, saved, seqs, n_heads, n_kv_heads, scale,
        ))
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
        Ok(ops::attention_cached(
            q, k, v, q_seqs, kv_seqs, n_heads, n_kv_heads, scale,
        ))
    }
    fn mul_vector_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        v: &Tensor<Self>,
        axis: Axis,
    ) -> Result<Tensor<Self>> {
        Ok(pointwise::mul_vector(x, v, axis))
    }
    fn sum_product_kernel(
        &self,
        _: Checked,
        a: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        axis: Axis,
    ) -> Result<Tensor<Self>> {
        Ok(pointwise::sum_product(a, b, axis))
    }
    fn activation_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        act: Activation,
    ) -> Result<Tensor<Self>> {
        Ok(pointwise::activation(x, act))
    }
    fn activation_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        act: Activation,
    ) -> Result<Tensor<Self>> {
        Ok(pointwise::activation_backward(dy, x, act))
    }
    fn softmax_rows_kernel(&self, _: Checked, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        Ok(pointwise::softmax_rows(x))
    }
    fn softmax_rows_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        p: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        Ok(pointwise::softmax_rows_backward(dy, p))
    }
    fn swiglu_kernel(
        &self,
        _: Checked,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        Ok(ops::swiglu(gate, up))
    }
    fn swiglu_backward_kernel(
        &self,
        _: Checked,
        d: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        Ok(ops::swiglu_backward(d, gate, up))
    }
    fn cross_entropy_kernel(
        &self,
        _: Checked,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(f64, Tensor<Self>)> {
        Ok(ops::cross_entropy(logits, labels, grad_scale))
    }
    fn cross_entropy_stats_kernel(
        &self,
        _: Checked,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        Ok(ops::cross_entropy_stats(logits, labels, grad_scale))
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
        ops::adamw_step(param, grad, m, v, factors, p);
        Ok(())
    }
}
