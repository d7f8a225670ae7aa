//! What a backend implements: one kernel (or a short fixed sequence of kernels) per op.
//!
//! Every kernel here has the contract of the [`Backend`](super::Backend) method of the same
//! name without `_kernel`, and receives its arguments already checked: `Backend`'s methods
//! are all provided, run the checks of [`super::check`] and then call these, and `Backend` is
//! implemented for every `Kernels` type by one blanket impl, so no backend can skip, reorder
//! or re-implement a check. Every kernel takes a [`Checked`] token, which only lorafuse can
//! make, so no caller outside the crate can reach a kernel around those checks. A kernel handed
//! arguments outside its contract (only possible from inside the crate) may return any error
//! but must not panic or write out of bounds.
//!
//! Kernels with a default body are compositions of others that a backend may fuse.

use super::lowrank::{Base, InputGrad, LowRank, LowRankOut, ParamGrads};
use super::multi::LowRankPool;
use super::{
    Activation, AdaLoraIpt, AdamWParams, AttentionSaved, Axis, Bf16Weight, Nf4Weight, SeqSpan,
    Tensor,
};
use crate::error::Result;
use crate::quant::nf4::Nf4Tensor;

/// Passed by every call of a [`Kernels`] method. Only lorafuse can make one (its field is
/// private to the crate), so code outside the crate can name these unchecked kernels but not
/// call them: it goes through [`Backend`](super::Backend)'s methods, which run the checks of
/// [`super::check`] first.
#[derive(Clone, Copy, Debug)]
pub struct Checked(pub(crate) ());

pub trait Kernels: Clone + Send + Sync + Sized + 'static {
    /// Device storage of one tensor.
    type Buf: Clone + Send + Sync;
    /// Device storage of one NF4-quantized weight (packed indices + absmax statistics, in
    /// bitsandbytes' layout); see [`Nf4Weight`].
    type Nf4Buf: Clone + Send + Sync;
    /// Device storage of one bf16 frozen weight; see [`Bf16Weight`].
    type Bf16Buf: Clone + Send + Sync;

    /// Short backend name (`cpu`, `cuda`, `wgpu`).
    fn name_kernel(&self, _: Checked) -> &'static str;

    /// Waits until every queued kernel has finished (a no-op on synchronous backends).
    fn synchronize_kernel(&self, _: Checked) -> Result<()> {
        Ok(())
    }

    // ---- memory ---------------------------------------------------------------------------------

    fn upload_kernel(&self, _: Checked, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>>;
    fn upload_frozen_kernel(
        &self,
        _: Checked,
        data: &[f32],
        shape: &[usize],
    ) -> Result<Tensor<Self>> {
        self.upload_kernel(Checked(()), data, shape)
    }
    fn freeze_kernel(&self, _: Checked, t: Tensor<Self>) -> Result<Tensor<Self>> {
        Ok(t)
    }
    /// Bytes `t` occupies on the device.
    fn stored_bytes_kernel(_: Checked, t: &Tensor<Self>) -> usize {
        4 * t.len()
    }
    fn download_kernel(&self, _: Checked, t: &Tensor<Self>) -> Result<Vec<f32>>;
    fn download_many_kernel(&self, _: Checked, ts: &[&Tensor<Self>]) -> Result<Vec<Vec<f32>>> {
        ts.iter()
            .map(|t| self.download_kernel(Checked(()), t))
            .collect()
    }
    fn zeros_kernel(&self, _: Checked, shape: &[usize]) -> Result<Tensor<Self>>;
    fn copy_into_kernel(
        &self,
        _: Checked,
        src: &Tensor<Self>,
        dst: &mut Tensor<Self>,
    ) -> Result<()> {
        *dst = src.clone();
        Ok(())
    }
    fn gather_rows_kernel(&self, _: Checked, t: &Tensor<Self>, idx: &[u32])
    -> Result<Tensor<Self>>;
    fn scatter_add_rows_kernel(
        &self,
        _: Checked,
        dst: &mut Tensor<Self>,
        idx: &[u32],
        src: &Tensor<Self>,
    ) -> Result<()>;

    // ---- the fused product over a dense or NF4 base ------------------------------------------------

    /// A column scale, if present, comes with its `weight_norm`.
    fn linear_lowrank_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        base: Base<'_, Self>,
        bias: Option<&Tensor<Self>>,
        term: Option<&LowRank<'_, Self>>,
    ) -> Result<LowRankOut<Self>>;

    /// The forward of a term whose column scale has no `weight_norm` yet: computes it
    /// (`base_row_sq = ||W||_row^2`) and returns it in the output. The default takes the norm
    /// ([`Kernels::lowrank_row_norms_kernel`]) and then runs the forward; a backend may take
    /// the norm's pass over W in the forward's.
    fn linear_lowrank_with_norm_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        base: Base<'_, Self>,
        base_row_sq: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        term: &LowRank<'_, Self>,
    ) -> Result<LowRankOut<Self>> {
        let n = self.lowrank_row_norms_kernel(
            Checked(()),
            base,
            base_row_sq,
            &term.without_col_scale(),
        )?;
        let mut t = *term;
        if let Some(c) = &mut t.col_scale {
            c.weight_norm = Some(&n);
        }
        let mut out = self.linear_lowrank_kernel(Checked(()), x, base, bias, Some(&t))?;
        out.weight_norm = Some(n);
        Ok(out)
    }

    /// Returns `(dx, g)`: dx (`None` when added into `acc`) and, with a term,
    /// `g = ((dy ⊙ col_scale) ⊙ out_scale) B` `[T, r]`, which the gradients reuse.
    fn backward_input_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        base: Base<'_, Self>,
        term: Option<&LowRank<'_, Self>>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<InputGrad<Self>>;

    /// The parameter gradients of the fused product from `dy`, the saved `x`, `h` (and `z`
    /// with a column scale) and `g` from [`Kernels::backward_input_kernel`].
    #[allow(clippy::too_many_arguments)]
    fn lowrank_grads_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        z: Option<&Tensor<Self>>,
        g: &Tensor<Self>,
        term: &LowRank<'_, Self>,
        wants: super::lowrank::GradWants,
    ) -> Result<ParamGrads<Self>>;

    /// `W ± ΔW` (with a column scale: `W = c ⊙ (W + ΔW)`, or its inverse for `sign = -1`);
    /// a column scale comes with its `weight_norm`.
    fn lowrank_merge_kernel(
        &self,
        _: Checked,
        w: &mut Tensor<Self>,
        term: &LowRank<'_, Self>,
        sign: f32,
    ) -> Result<()>;

    /// The merge of a term whose column scale has no `weight_norm`: takes PEFT's
    /// `n = ||W + ΔW||_row` of the merged rows, merges and returns n. The default takes n by
    /// the low-rank identity and then merges; a backend may do it in one pass over W.
    fn lowrank_merge_with_norm_kernel(
        &self,
        _: Checked,
        w: &mut Tensor<Self>,
        w_row_sq: &Tensor<Self>,
        term: &LowRank<'_, Self>,
    ) -> Result<Tensor<Self>> {
        let n = self.lowrank_row_norms_kernel(
            Checked(()),
            Base::Dense(w),
            w_row_sq,
            &term.without_col_scale(),
        )?;
        let mut t = *term;
        if let Some(c) = &mut t.col_scale {
            c.weight_norm = Some(&n);
        }
        self.lowrank_merge_kernel(Checked(()), w, &t, 1.0)?;
        Ok(n)
    }

    fn row_sq_norms_kernel(&self, _: Checked, base: Base<'_, Self>) -> Result<Tensor<Self>>;

    /// `||W + ΔW||_row` of a term without column scale.
    fn lowrank_row_norms_kernel(
        &self,
        _: Checked,
        base: Base<'_, Self>,
        base_row_sq: &Tensor<Self>,
        term: &LowRank<'_, Self>,
    ) -> Result<Tensor<Self>>;

    fn linear_backward_weight_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<()>;
    /// `y[t] += (x[t] A_i^T) B_i'^T` for every row t with `i = adapter_of_row[t] >= 0` and
    /// `pool.rank(i) > 0` (checked: `x [T, in]`, `y [T, out]`, the pool's dims, indices in
    /// `-1..K`). Rows of -1 or of a rank-0 adapter are left as they are.
    fn lowrank_multi_add_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        pool: &LowRankPool<Self>,
        adapter_of_row: &[i32],
        y: &mut Tensor<Self>,
    ) -> Result<()>;

    fn axpy_kernel(
        &self,
        _: Checked,
        a: &mut Tensor<Self>,
        alpha: f32,
        b: &Tensor<Self>,
    ) -> Result<()>;
    fn scale_kernel(&self, _: Checked, a: &mut Tensor<Self>, alpha: f32) -> Result<()>;
    fn sum_squares_kernel(&self, _: Checked, a: &Tensor<Self>) -> Result<f64>;

    // ---- NF4 --------------------------------------------------------------------------------------

    fn upload_nf4_kernel(&self, _: Checked, w: &Nf4Tensor) -> Result<Nf4Weight<Self>>;
    fn nf4_dequantize_kernel(&self, _: Checked, w: &Nf4Weight<Self>) -> Result<Tensor<Self>>;

    // ---- bf16 frozen weights --------------------------------------------------------------------

    fn upload_bf16_kernel(
        &self,
        _: Checked,
        data: &[f32],
        out: usize,
        in_: usize,
    ) -> Result<Bf16Weight<Self>>;
    fn bf16_to_f32_kernel(&self, _: Checked, w: &Bf16Weight<Self>) -> Result<Tensor<Self>>;

    // ---- AdaLoRA's rank allocator and orthogonal regularizer ----------------------------------------

    fn adalora_update_ipt_kernel(
        &self,
        _: Checked,
        param: &Tensor<Self>,
        grad: &Tensor<Self>,
        exp_avg_ipt: &mut Tensor<Self>,
        exp_avg_unc: &mut Tensor<Self>,
        coefs: &super::check::EmaCoefs,
    ) -> Result<()>;
    fn adalora_triplet_scores_kernel(
        &self,
        _: Checked,
        ema: &AdaLoraIpt<Self>,
        scores: &mut Tensor<Self>,
        offset: usize,
    ) -> Result<()>;
    fn adalora_threshold_kernel(
        &self,
        _: Checked,
        scores: &Tensor<Self>,
        k: usize,
    ) -> Result<Tensor<Self>>;
    fn adalora_rank_mask_kernel(
        &self,
        _: Checked,
        scores: &Tensor<Self>,
        threshold: &Tensor<Self>,
    ) -> Result<Tensor<Self>>;
    fn adalora_apply_mask_kernel(
        &self,
        _: Checked,
        lora_e: &mut Tensor<Self>,
        keep: &Tensor<Self>,
        offset: usize,
    ) -> Result<()>;
    fn adalora_orth_reg_kernel(
        &self,
        _: Checked,
        factors: &[(&Tensor<Self>, &Tensor<Self>)],
        grads: &mut [(&mut Tensor<Self>, &mut Tensor<Self>)],
        orth_reg_weight: f32,
    ) -> Result<Tensor<Self>>;

    // ---- Llama block ops ----------------------------------------------------------------------------

    fn rmsnorm_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;
    fn rmsnorm_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        rstd: &Tensor<Self>,
        dweight: Option<&mut Tensor<Self>>,
    ) -> Result<Tensor<Self>>;
    fn rope_kernel(
        &self,
        _: Checked,
        x: &mut Tensor<Self>,
        positions: &[u32],
        head_dim: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<AttentionSaved<Self>>;
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)>;
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<Tensor<Self>>;
    fn swiglu_kernel(
        &self,
        _: Checked,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<Tensor<Self>>;
    fn swiglu_backward_kernel(
        &self,
        _: Checked,
        d: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;
    fn cross_entropy_kernel(
        &self,
        _: Checked,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(f64, Tensor<Self>)>;
    fn cross_entropy_stats_kernel(
        &self,
        _: Checked,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;

    // ---- per-axis scales and sums, activations, small softmaxes ----------------------------

    fn mul_vector_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        v: &Tensor<Self>,
        axis: Axis,
    ) -> Result<Tensor<Self>>;
    fn sum_product_kernel(
        &self,
        _: Checked,
        a: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        axis: Axis,
    ) -> Result<Tensor<Self>>;
    fn activation_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        act: Activation,
    ) -> Result<Tensor<Self>>;
    fn activation_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        act: Activation,
    ) -> Result<Tensor<Self>>;
    fn softmax_rows_kernel(&self, _: Checked, x: &Tensor<Self>) -> Result<Tensor<Self>>;
    fn softmax_rows_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        p: &Tensor<Self>,
    ) -> Result<Tensor<Self>>;
    // ---- optimizer ---------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn adamw_step_kernel(
        &self,
        _: Checked,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        factors: &super::check::AdamWFactors,
        p: &AdamWParams,
    ) -> Result<()>;
}
