//! The seam between math and hardware.
//!
//! [`Backend`] describes op families, not variants: every adapter that adds a low-rank term
//! (with per-rank, per-output or per-column scales) to a base product is ONE fused op over a
//! dense, NF4 or bf16 base ([`lowrank`]: LoRA, rsLoRA, DoRA, VeRA, AdaLoRA, and their quantized
//! twins). Each method's contract (shapes, layout, what is fused) is written on the trait and
//! its arguments are checked there, once ([`check`]); a backend implements the unchecked
//! [`Kernels`], and the blanket `impl<K: Kernels> Backend for K` is the only implementation of
//! `Backend`, so no backend can skip a check. The CPU kernels ([`cpu::Cpu`]) are the
//! specification that every other backend is tested against. Adapters, the model and the
//! trainer are generic over `B: Backend` and never branch on the device.
//!
//! All tensors are row-major. Weights use torch's `nn.Linear` layout `[out, in]`; activations
//! are `[tokens, features]`. Integer inputs (token ids, labels, sequence boundaries) are passed
//! as host slices: they are small and every backend uploads them as it needs.

pub mod check;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod kernels;
pub mod lowrank;
pub mod multi;
pub mod tensor;
#[cfg(feature = "wgpu")]
pub mod wgpu;

use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Tensor;

pub use kernels::{Checked, Kernels};
pub use lowrank::{
    Base, ColScale, GradWants, InputGrad, LowRank, LowRankGrads, LowRankOut, ParamGrads,
};
pub use multi::LowRankPool;
pub use tensor::{
    Activation, AdaLoraIpt, AdamWParams, AttentionSaved, Axis, Bf16Weight, Nf4Weight, SeqSpan,
    Tensor, cross_entropy_loss, cross_entropy_terms,
};

/// The ops every part of lorafuse computes with. Every method is provided: it checks its
/// arguments ([`check`]: shapes, ranges, the same error on every backend) and then runs the
/// backend's kernel ([`Kernels`], same name with `_kernel`). The CPU kernels are the reference.
///
/// None panics on bad input: a shape that does not agree is an [`Error::Shape`] naming the
/// argument, a value outside its range an [`Error::InvalidArgument`].
pub trait Backend: Kernels {
    /// Short backend name (`cpu`, `cuda`, `wgpu`).
    fn name(&self) -> &'static str {
        self.name_kernel(Checked(()))
    }

    /// Waits until every kernel queued so far has finished. GPU backends run asynchronously;
    /// code that times kernels calls this before reading the clock. Errors: a device failure
    /// reported while waiting. The CPU reference runs synchronously (a no-op).
    fn synchronize(&self) -> Result<()> {
        self.synchronize_kernel(Checked(()))
    }

    /// Bytes `t` occupies on its backend: `4 len` for f32, `2 len` for a frozen weight the
    /// backend stores as f16.
    fn stored_bytes(t: &Tensor<Self>) -> usize {
        Self::stored_bytes_kernel(Checked(()), t)
    }

    // ---- memory ---------------------------------------------------------------------------------

    /// Uploads host data of `shape` (row-major). Errors: `data.len()` differs from the shape's
    /// element count.
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>> {
        check::upload(data.len(), shape)?;
        self.upload_kernel(Checked(()), data, shape)
    }
    /// Uploads a frozen weight: a backend may store it in a narrower type (the wgpu backend
    /// stores f16 where the device has SHADER_F16), which only read-only kernels accept.
    /// Errors: as [`Backend::upload`].
    fn upload_frozen(&self, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>> {
        check::upload(data.len(), shape)?;
        self.upload_frozen_kernel(Checked(()), data, shape)
    }
    /// The tensor as a frozen weight (see [`Backend::upload_frozen`]); a no-op on the CPU.
    fn freeze(&self, t: Tensor<Self>) -> Result<Tensor<Self>> {
        self.freeze_kernel(Checked(()), t)
    }
    /// Downloads a tensor as f32, row-major.
    fn download(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        self.download_kernel(Checked(()), t)
    }
    /// Downloads several tensors at once (one readback on GPU backends).
    fn download_many(&self, ts: &[&Tensor<Self>]) -> Result<Vec<Vec<f32>>> {
        self.download_many_kernel(Checked(()), ts)
    }
    /// A zero tensor of `shape`.
    fn zeros(&self, shape: &[usize]) -> Result<Tensor<Self>> {
        self.zeros_kernel(Checked(()), shape)
    }
    /// `dst = src`, a copy within the device's memory (no host round trip); every byte of
    /// `src` read once and of `dst` written once (`adapter::bench::measure_peak` times it for the
    /// device's copy bandwidth). Errors: shapes that differ, a storage type that differs (or a
    /// frozen `dst`, which no kernel modifies).
    fn copy_into(&self, src: &Tensor<Self>, dst: &mut Tensor<Self>) -> Result<()> {
        same_shape("dst", dst, src)?;
        self.copy_into_kernel(Checked(()), src, dst)
    }
    /// Rows `idx` of a 2-D tensor `[n, d]`, gathered into `[idx.len(), d]` (also the embedding
    /// lookup). Errors: not 2-D, an index `>= n`.
    fn gather_rows(&self, t: &Tensor<Self>, idx: &[u32]) -> Result<Tensor<Self>> {
        let (n, _) = t.dims2("t")?;
        check::row_indices(idx, n)?;
        self.gather_rows_kernel(Checked(()), t, idx)
    }
    /// `dst[idx[i]] += src[i]` row by row (the backward of [`Backend::gather_rows`]); nothing
    /// is written when an argument is bad. Errors: `src` not `[idx.len(), d]` for `dst [n, d]`,
    /// an index `>= n`.
    fn scatter_add_rows(
        &self,
        dst: &mut Tensor<Self>,
        idx: &[u32],
        src: &Tensor<Self>,
    ) -> Result<()> {
        check::scatter_add_rows(dst, idx, src)?;
        self.scatter_add_rows_kernel(Checked(()), dst, idx, src)
    }

    // ---- the fused product: x W^T + bias + low-rank term, W dense or NF4 -----------------------------

    /// `y = x W^T + bias`: x `[T, in]`, w `[out, in]`, bias `[out]` → y `[T, out]`.
    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        Ok(self.linear_lowrank(x, Base::Dense(w), bias, None)?.y)
    }

    /// The fused product of [`lowrank`]: `y = c ⊙ (x W^T + s o ⊙ (((x A^T) ⊙ ρ) B^T)) + bias`
    /// over a dense or NF4 `base [out, in]`, x `[T, in]`, bias `[out]`; without `term`, the plain
    /// `x W^T + bias`. Never forms `B A` (which would cost `out in r` and an `[out, in]`
    /// temporary); an NF4 base is dequantized tile by tile, never whole. Returns `y [T, out]`
    /// with `h = x A^T [T, r]` and, under a column scale, `z = x W^T + u` (see
    /// [`LowRankOut`]) for the backward. Errors: shapes (see [`LowRank`]); a column scale
    /// without its `weight_norm` (use [`Backend::linear_lowrank_with_norm`]).
    fn linear_lowrank(
        &self,
        x: &Tensor<Self>,
        base: Base<'_, Self>,
        bias: Option<&Tensor<Self>>,
        term: Option<&LowRank<'_, Self>>,
    ) -> Result<LowRankOut<Self>> {
        check::linear_lowrank(x, base, bias, term, true)?;
        self.linear_lowrank_kernel(Checked(()), x, base, bias, term)
    }

    /// [`Backend::linear_lowrank`] for a term whose column scale has no `weight_norm`: also
    /// computes DoRA's `n = ||W + ΔW||_row` (as [`Backend::lowrank_row_norms`], from
    /// `base_row_sq = ||W||_row^2 [out]`) and returns it in [`LowRankOut::weight_norm`]. The
    /// CPU takes the norm's only pass over W (`W A^T`) in the same pass as `x W^T`, by
    /// multiplying the stacked `[x; A]`. Errors: as the two ops; a term without column scale.
    fn linear_lowrank_with_norm(
        &self,
        x: &Tensor<Self>,
        base: Base<'_, Self>,
        base_row_sq: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        term: &LowRank<'_, Self>,
    ) -> Result<LowRankOut<Self>> {
        check::linear_lowrank(x, base, bias, Some(term), false)?;
        check::col_norm_wanted(term)?;
        base_row_sq.expect_shape("w0_row_sq", &[base.dims().0])?;
        self.linear_lowrank_with_norm_kernel(Checked(()), x, base, base_row_sq, bias, term)
    }

    /// `dx = dy W` for a dense w `[out, in]`, dy `[T, out]` → dx `[T, in]`; with `acc`, adds
    /// into it and returns `None`.
    fn linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Tensor<Self>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<Option<Tensor<Self>>> {
        Ok(self.backward_input(dy, Base::Dense(w), None, acc)?.0)
    }

    /// The input gradient of the fused product, `dx = g' W + s ((g ⊙ ρ) A)` with
    /// `g' = dy ⊙ c` and `g = (g' ⊙ o) B [T, r]` (the one formula of every method's `dx`),
    /// over a dense or NF4 base; dy `[T, out]` → dx `[T, in]`. Returns `(dx, g)`: dx is `None`
    /// when added into `acc`; g (with a term) is what [`Backend::linear_lowrank_backward`]
    /// reuses. Errors: shapes; a column scale without `weight_norm`.
    fn backward_input(
        &self,
        dy: &Tensor<Self>,
        base: Base<'_, Self>,
        term: Option<&LowRank<'_, Self>>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<InputGrad<Self>> {
        check::backward_input(dy, base, term, acc.as_deref())?;
        self.backward_input_kernel(Checked(()), dy, base, term, acc)
    }

    /// Backward of [`Backend::linear_lowrank`] from `dy [T, out]` and what the forward kept
    /// (`x`, `h`, and `z` under a column scale): `dx` and the gradients `wants` asks for, by
    /// the chain rule through the one formula (module [`lowrank`]):
    /// `dA = s ρ ⊙ (g^T x)`, `dB = s (c o) ⊙ (dy^T (h ⊙ ρ))` (row-scaled),
    /// `dρ = s sum_T(g ⊙ h)`, `do = s c ⊙ rowdot(dy^T (h ⊙ ρ), B)`, `dm = sum_T(dy ⊙ z) / n`
    /// (n detached, as PEFT). LoRA: `dA = s g^T x`, `dB = s dy^T h`; AdaLoRA's dE is non-zero
    /// for masked ranks (masking zeroes E, not its gradient). Errors: shapes; a gradient asked
    /// for a part the term does not have.
    #[allow(clippy::too_many_arguments)]
    fn linear_lowrank_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        z: Option<&Tensor<Self>>,
        base: Base<'_, Self>,
        term: &LowRank<'_, Self>,
        wants: GradWants,
    ) -> Result<LowRankGrads<Self>> {
        check::linear_lowrank_backward(dy, x, h, z, base, term, wants)?;
        let (dx, g) = self.backward_input_kernel(Checked(()), dy, base, Some(term), None)?;
        let dx = dx.ok_or_else(|| Error::arg("dx", "backward_input returned no dx"))?;
        let g = g.ok_or_else(|| Error::arg("g", "backward_input returned no g"))?;
        Ok(self
            .lowrank_grads_kernel(Checked(()), dy, x, h, z, &g, term, wants)?
            .with_dx(dx))
    }

    /// In place `W += sign ΔW`, `ΔW = s diag(o) B diag(ρ) A` (PEFT `merge` with `sign = 1`,
    /// `unmerge` with `-1`); the one place `B A` is formed, added straight into w `[out, in]`.
    /// Under a column scale, merge is `W = c ⊙ (W + ΔW)` and unmerge `W = W / c - ΔW`, with
    /// the `weight_norm` of the UNmerged weight. Errors: shapes; a column scale without
    /// `weight_norm` (use [`Backend::lowrank_merge_with_norm`] to merge); an unmerge whose
    /// `c` is zero or not finite (not invertible). Numerics: the unmerge restores W to a few
    /// ulp of `max(|W0|, |ΔW|)` when `c ≈ 1`.
    fn lowrank_merge(
        &self,
        w: &mut Tensor<Self>,
        term: &LowRank<'_, Self>,
        sign: f32,
    ) -> Result<()> {
        check::lowrank_merge(w, term, sign)?;
        self.lowrank_merge_kernel(Checked(()), w, term, sign)
    }

    /// DoRA's merge as PEFT's `merge` does it: forms `W' = W + ΔW`, takes `n = ||W'||_row` of
    /// the merged rows (not the low-rank identity the forward uses), writes `W = (m / n) ⊙ W'`
    /// and returns `n [out]` (keep it for the unmerge). `w_row_sq = ||W||_row^2` of the
    /// unmerged weight (for backends that take n by the identity). The CPU does it in one
    /// pass over W, block of rows by block. Errors: shapes; a term without column scale.
    fn lowrank_merge_with_norm(
        &self,
        w: &mut Tensor<Self>,
        w_row_sq: &Tensor<Self>,
        term: &LowRank<'_, Self>,
    ) -> Result<Tensor<Self>> {
        check::lowrank_merge(w, term, 1.0)?;
        check::col_norm_wanted(term)?;
        w_row_sq.expect_shape("w_row_sq", &[w.dim(0)])?;
        self.lowrank_merge_with_norm_kernel(Checked(()), w, w_row_sq, term)
    }

    /// Squared L2 norm of each row of a dense or NF4 weight `[out, in]` → `[out]`,
    /// accumulated in f64. DoRA computes `||W0||_row^2` once per frozen base.
    fn row_sq_norms(&self, base: Base<'_, Self>) -> Result<Tensor<Self>> {
        check::base(base)?;
        self.row_sq_norms_kernel(Checked(()), base)
    }

    /// DoRA's weight norm `n = ||W + ΔW||_row` (one per OUTPUT row, PEFT's `dim=1`) `[out]`
    /// for a term without column scale, by the low-rank identity
    /// `n^2 = ||W||_row^2 + 2 rowdot(W A^T, B') + rowdot(B' (A A^T), B')`, `B' = s diag(o) B
    /// diag(ρ)`, from `base_row_sq = ||W||_row^2 [out]` ([`Backend::row_sq_norms`]). One
    /// `[out, in] x [in, r]` product, memory `O(out r + r^2)`, no `[out, in]` temporary (an
    /// NF4 base is read tile by tile). The norm is a constant for autograd (PEFT detaches
    /// it). Numerics: the three terms are summed in f64 and clamped at 0 before the square
    /// root, so a row where `W + ΔW` nearly cancels is known to about
    /// `eps_f32 (||W||^2 + ||ΔW||^2)` absolute. Errors: shapes; a term with a column scale.
    fn lowrank_row_norms(
        &self,
        base: Base<'_, Self>,
        base_row_sq: &Tensor<Self>,
        term: &LowRank<'_, Self>,
    ) -> Result<Tensor<Self>> {
        let (dout, din) = check::base(base)?;
        check::lowrank_term(din, dout, term)?;
        if term.col_scale.is_some() {
            return Err(Error::arg(
                "col_scale",
                "the weight norm is of W + ΔW without the column scale (LowRank::without_col_scale)",
            ));
        }
        base_row_sq.expect_shape("w0_row_sq", &[dout])?;
        self.lowrank_row_norms_kernel(Checked(()), base, base_row_sq, term)
    }

    /// `dW += dy^T x`: dy `[T, out]`, x `[T, in]`, dw `[out, in]` (full fine-tuning's weight
    /// gradient, accumulated).
    fn linear_backward_weight(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<()> {
        check::linear_backward_weight(dy, x, dw)?;
        self.linear_backward_weight_kernel(Checked(()), dy, x, dw)
    }
    // ---- many adapters in one batch (SGMV / BGMV, [`multi`]) ---------------------------------------

    /// Packs the low-rank terms of K adapters on one projection `[dout, din]` into a
    /// [`LowRankPool`] (term i, or `None` where adapter i leaves the projection alone), each
    /// term's scales folded into its B. Built once per loaded adapter set (it reads the terms
    /// back to the host). Errors: a term's shapes (named `terms[i].lora_A`, ...); a term with a
    /// column scale (DoRA cannot share the base product of a mixed batch).
    fn lowrank_pool(
        &self,
        din: usize,
        dout: usize,
        terms: &[Option<LowRank<'_, Self>>],
    ) -> Result<LowRankPool<Self>> {
        check::lowrank_pool(din, dout, terms)?;
        let (a, b, ranks, a_rows, b_offsets) =
            multi::fold_terms(din, dout, terms, |t| self.download_kernel(Checked(()), t))?;
        let rows = a.len() / din.max(1);
        let a = if a.is_empty() {
            self.zeros_kernel(Checked(()), &[1, din.max(1)])?
        } else {
            self.upload_kernel(Checked(()), &a, &[rows, din])?
        };
        let b = if b.is_empty() {
            self.zeros_kernel(Checked(()), &[1])?
        } else {
            let n = b.len();
            self.upload_kernel(Checked(()), &b, &[n])?
        };
        Ok(multi::pool_from_parts(
            a,
            b,
            ranks,
            a_rows,
            b_offsets,
            (dout, din),
        ))
    }

    /// The mixed-batch product: `y[t] = x[t] W^T + bias + (x[t] A_i^T) B_i'^T` with
    /// `i = adapter_of_row[t]` (no term where it is -1 or adapter i has rank 0 here), over a
    /// dense or NF4 `base [out, in]`; x `[T, in]`, bias `[out]`, `adapter_of_row` T indices
    /// in `-1..K` → y `[T, out]`. The base product runs once for all rows; each adapter's
    /// rows (one run per sequence in a prefill, one row per sequence in a decode step, in any
    /// order) are shrunk by its A and expanded by its B' in the same launch, whatever the
    /// ranks. Row t equals [`Backend::linear_lowrank`] of that row with adapter i's term
    /// alone. Errors: shapes, a pool of another projection, indices out of range.
    fn linear_multi(
        &self,
        x: &Tensor<Self>,
        base: Base<'_, Self>,
        bias: Option<&Tensor<Self>>,
        pool: &LowRankPool<Self>,
        adapter_of_row: &[i32],
    ) -> Result<Tensor<Self>> {
        check::linear_multi(x, base, bias, pool, adapter_of_row)?;
        let mut y = self
            .linear_lowrank_kernel(Checked(()), x, base, bias, None)?
            .y;
        if multi::any_term(pool, adapter_of_row) {
            self.lowrank_multi_add_kernel(Checked(()), x, pool, adapter_of_row, &mut y)?;
        }
        Ok(y)
    }

    /// `a += alpha * b`, elementwise. Errors: shapes that differ.
    fn axpy(&self, a: &mut Tensor<Self>, alpha: f32, b: &Tensor<Self>) -> Result<()> {
        same_shape("b", b, a)?;
        self.axpy_kernel(Checked(()), a, alpha, b)
    }
    /// `a *= alpha`, elementwise.
    fn scale(&self, a: &mut Tensor<Self>, alpha: f32) -> Result<()> {
        self.scale_kernel(Checked(()), a, alpha)
    }
    /// Sum of squares of all elements (gradient-norm reporting and clipping), in f64.
    fn sum_squares(&self, a: &Tensor<Self>) -> Result<f64> {
        self.sum_squares_kernel(Checked(()), a)
    }

    // ---- NF4 base weights (QLoRA, Dettmers et al. 2023) ----------------------------------------------
    //
    // An NF4 base is a `Base::Nf4` of the fused product: every kernel dequantizes it a tile of
    // rows at a time (bitsandbytes' `dequantize_4bit`, bit for bit) into a bounded scratch
    // buffer and multiplies that tile, so results equal the dense product on the dequantized
    // weight up to f32 summation order.

    /// Uploads an NF4 tensor as a frozen linear weight `[out, in]`. Errors: not 2-D.
    fn upload_nf4(&self, w: &Nf4Tensor) -> Result<Nf4Weight<Self>> {
        check::nf4_weight(w)?;
        self.upload_nf4_kernel(Checked(()), w)
    }
    /// Dequantizes the whole weight to a dense `[out, in]` tensor. This DOES materialize the
    /// f32 weight: it is for merging and exporting, never for the forward or backward.
    fn nf4_dequantize(&self, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        self.nf4_dequantize_kernel(Checked(()), w)
    }
    // ---- bf16 frozen base weights (`--compute-dtype bf16`) ----------------------------------------
    //
    // A bf16 base is a `Base::Bf16` of the fused product: the products read the bf16 values
    // (exactly representable in f32) and accumulate in f32, so results equal the dense product
    // on the rounded weight up to f32 summation order.

    /// Uploads `data` (`[out, in]` row-major f32) as a frozen bf16 weight, each value rounded
    /// to the nearest bf16, ties to even (`torch.Tensor.to(torch.bfloat16)`, `half::bf16`;
    /// NaN stays NaN). A checkpoint published in bf16 (SmolLM2 is) is held exactly. Errors:
    /// `shape` not 2-D, or `data.len()` differs from its element count.
    fn upload_bf16(&self, data: &[f32], shape: &[usize]) -> Result<Bf16Weight<Self>> {
        let (out, in_) = check::bf16_weight(data.len(), shape)?;
        self.upload_bf16_kernel(Checked(()), data, out, in_)
    }
    /// The weight as a dense f32 `[out, in]` tensor (each value exactly its bf16). This
    /// materializes f32: for merging and exporting, not for the forward or backward.
    fn bf16_to_f32(&self, w: &Bf16Weight<Self>) -> Result<Tensor<Self>> {
        self.bf16_to_f32_kernel(Checked(()), w)
    }

    // ---- AdaLoRA's rank allocator and orthogonal regularizer (PEFT `RankAllocator`) ----------
    //
    // The pieces of `RankAllocator.update_and_allocate` and of the regularizer of
    // `AdaLoraModel.forward`, so that the allocator runs on the device with nothing read back
    // (see `adapter::device_rank_allocator`). The CPU implementations are the host allocator's
    // own functions (`adapter::rank_allocator`), so a device allocator on the CPU backend is
    // bit-identical to it. GPU backends may sum in a different order or precision, as each
    // method says.

    /// PEFT `RankAllocator.update_ipt` for one parameter, in place and elementwise, in f32 as
    /// torch computes it: `I = |p * g|`, `ipt = b1 ipt + (1 - b1) I`,
    /// `unc = b2 unc + (1 - b2) |I - ipt|` (with the new `ipt`), where `b1`, `1 - b1`, `b2`,
    /// `1 - b2` are computed in f64 from `beta1`, `beta2` and rounded to f32 (torch's Python
    /// float scalars). param, grad, exp_avg_ipt, exp_avg_unc: one shape. A GPU may fuse a
    /// multiply and an add (one rounding fewer). Errors: shapes that differ; a beta outside
    /// the open interval (0, 1).
    fn adalora_update_ipt(
        &self,
        param: &Tensor<Self>,
        grad: &Tensor<Self>,
        exp_avg_ipt: &mut Tensor<Self>,
        exp_avg_unc: &mut Tensor<Self>,
        beta1: f64,
        beta2: f64,
    ) -> Result<()> {
        let coefs = check::adalora_update_ipt(param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2)?;
        self.adalora_update_ipt_kernel(Checked(()), param, grad, exp_avg_ipt, exp_avg_unc, &coefs)
    }

    /// The triplet scores of one layer (PEFT `mask_to_budget` + `_combine_ipt`), written to
    /// `scores[offset..offset + r]`: with `s = exp_avg_ipt * exp_avg_unc` per entry,
    /// `score_i = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki))`. ema: see [`AdaLoraIpt`];
    /// scores `[n]` with `offset + r <= n` (one buffer for every layer, so that
    /// [`Backend::adalora_threshold`] sees them all). The CPU accumulates the means in f64;
    /// wgpu in compensated f32 and CUDA in f64, each rounded once to f32, so a GPU score may
    /// differ from the CPU's in the last bits (ties between nearly equal scores may then
    /// break differently). A mean over no entries (`in` or `out` 0) is NaN. Errors: EMA
    /// shapes that disagree, a range outside `scores`.
    fn adalora_triplet_scores(
        &self,
        ema: &AdaLoraIpt<Self>,
        scores: &mut Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        check::adalora_triplet_scores(ema, scores, offset)?;
        self.adalora_triplet_scores_kernel(Checked(()), ema, scores, offset)
    }

    /// The masking threshold: `torch.kthvalue(scores, k)` for a 1-based `k`, the k-th smallest
    /// of `scores [n]` in the total order of [`f32::total_cmp`] (NaN above every number, as
    /// torch sorts it), returned as a `[1]` tensor (exact: one of the scores). PEFT's
    /// `k = init_bgt - budget`. Errors: scores not 1-D, `k` outside `1..=n`.
    fn adalora_threshold(&self, scores: &Tensor<Self>, k: usize) -> Result<Tensor<Self>> {
        check::adalora_threshold(scores, k)?;
        self.adalora_threshold_kernel(Checked(()), scores, k)
    }

    /// The keep-mask of every rank at once: `keep [n]` with `0.0` where `scores[i] <=
    /// threshold[0]` (PEFT masks those) and `1.0` elsewhere; a NaN score or threshold compares
    /// false, so it keeps. This is PEFT's rank pattern as floats. Errors: scores not 1-D,
    /// threshold not `[1]`.
    fn adalora_rank_mask(
        &self,
        scores: &Tensor<Self>,
        threshold: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        check::adalora_rank_mask(scores, threshold)?;
        self.adalora_rank_mask_kernel(Checked(()), scores, threshold)
    }

    /// PEFT's `lora_E.masked_fill_(~keep, 0.0)` for one layer: `lora_e[i] = 0` where
    /// `keep[offset + i] == 0`, else unchanged. lora_e `[r, 1]`, keep `[n]` (from
    /// [`Backend::adalora_rank_mask`]) with `offset + r <= n`. Errors: those shapes.
    fn adalora_apply_mask(
        &self,
        lora_e: &mut Tensor<Self>,
        keep: &Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        check::adalora_apply_mask(lora_e, keep, offset)?;
        self.adalora_apply_mask_kernel(Checked(()), lora_e, keep, offset)
    }

    /// AdaLoRA's orthogonal regularizer over every layer, as `AdaLoraModel.forward` adds it to
    /// the loss: with `n_A = ||A A^T - I||_F`, `n_B = ||B^T B - I||_F` (Frobenius norms, NOT
    /// squared: PEFT's `torch.norm(p="fro")`) and `w = orth_reg_weight / (2 n_layers)` (the
    /// mean over the `lora_A` and `lora_B` parameters), returns the loss
    /// `w * sum_layers (n_A + n_B)` as a `[1]` tensor and adds its gradient into each layer's
    /// gradients: `grad_A += w * 2 (A A^T - I) A / n_A`, `grad_B += w * 2 B (B^T B - I) / n_B`
    /// (nothing where a norm is 0, as torch's). Every rank counts, masked or not. The norms
    /// stay on the device; nothing is read back. factors: `(lora_A [r, in], lora_B [out, r])`
    /// per layer; grads: `(grad_A, grad_B)` shaped alike, per layer. No layers give 0. The
    /// CPU computes in f64 and rounds as `rank_allocator::orth_reg_total`; wgpu in f32; CUDA
    /// forms the Gram matrices in f32 (cuBLAS) and sums the norms in f64. Errors: lists of
    /// different lengths, shapes that disagree, a weight that is negative or not finite.
    fn adalora_orth_reg(
        &self,
        factors: &[(&Tensor<Self>, &Tensor<Self>)],
        grads: &mut [(&mut Tensor<Self>, &mut Tensor<Self>)],
        orth_reg_weight: f32,
    ) -> Result<Tensor<Self>> {
        check::adalora_orth_reg(factors, grads, orth_reg_weight)?;
        self.adalora_orth_reg_kernel(Checked(()), factors, grads, orth_reg_weight)
    }

    // ---- Llama block ops ---------------------------------------------------------------------------

    /// RMSNorm over the last dim: `y = x / sqrt(mean(x^2) + eps) * weight`.
    /// x `[T, d]`, weight `[d]` → `(y [T, d], rstd [T])`.
    fn rmsnorm(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        check::rmsnorm(x, weight)?;
        self.rmsnorm_kernel(Checked(()), x, weight, eps)
    }

    /// RMSNorm backward: returns `dx [T, d]` and adds `dweight [d]` into `dweight` if given.
    fn rmsnorm_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        rstd: &Tensor<Self>,
        dweight: Option<&mut Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        check::rmsnorm_backward(dy, x, weight, rstd)?;
        if let Some(dw) = dweight.as_deref() {
            same_shape("dweight", dw, weight)?;
        }
        self.rmsnorm_backward_kernel(Checked(()), dy, x, weight, rstd, dweight)
    }

    /// Rotary embedding in place, transformers' `rotate_half` convention: within each head of
    /// `head_dim`, the pair `(i, i + head_dim/2)` is rotated by angle `pos * theta^(-2i/head_dim)`.
    /// x `[T, n_heads*head_dim]`, `positions[t]` the position of row t. `inverse` rotates by the
    /// negative angle, which is the backward (rotation matrices are orthogonal).
    fn rope(
        &self,
        x: &mut Tensor<Self>,
        positions: &[u32],
        head_dim: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        let (t, width) = x.dims2("x")?;
        check::rope(width, t, positions, head_dim)?;
        self.rope_kernel(Checked(()), x, positions, head_dim, theta, inverse)
    }

    /// Causal grouped-query attention over packed sequences, online softmax, no `T x T` matrix
    /// kept. q `[T, Hq*hd]`, k and v `[T, Hkv*hd]` (`Hq` a multiple of `Hkv`; query head `h`
    /// reads kv head `h / (Hq/Hkv)`), `scale` usually `1/sqrt(hd)`.
    #[allow(clippy::too_many_arguments)]
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
        check::attention(q, k, v, seqs, n_heads, n_kv_heads)?;
        self.attention_kernel(Checked(()), q, k, v, seqs, n_heads, n_kv_heads, scale)
    }

    /// Backward of [`Backend::attention`] from `d_out [T, Hq*hd]`; recomputes the softmax from
    /// the saved log-sum-exp. Returns `(dq, dk, dv)` shaped like q, k, v.
    #[allow(clippy::too_many_arguments)]
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
        check::attention_backward(d_out, q, k, v, saved, seqs, n_heads, n_kv_heads)?;
        self.attention_backward_kernel(
            Checked(()),
            d_out,
            q,
            k,
            v,
            saved,
            seqs,
            n_heads,
            n_kv_heads,
            scale,
        )
    }

    /// Attention of each sequence's NEW tokens over its whole context (the KV cache of
    /// generation, or prefix tuning's virtual keys and values, then the new tokens): sequence
    /// i's queries are rows `q_seqs[i]` of q `[Tq, Hq*hd]`, its keys and values rows
    /// `kv_seqs[i]` of k, v `[Tk, Hkv*hd]` with the new tokens' rows last, so query j sits at
    /// position `p = kv_len - q_len + j` and attends to kv rows `0..=p` (causal). With
    /// `q_seqs == kv_seqs` over the same rows this is [`Backend::attention`]'s output. GQA
    /// grouping and `scale` as there. Returns `[Tq, Hq*hd]`. Errors: shapes; a pair list of
    /// different lengths; a span outside its tensor; a sequence with more queries than
    /// context.
    #[allow(clippy::too_many_arguments)]
    fn attention_cached(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        q_seqs: &[SeqSpan],
        kv_seqs: &[SeqSpan],
        n_heads: usize,
        n_kv_heads: usize,
        scale: f32,
    ) -> Result<Tensor<Self>> {
        check::attention_cached(q, k, v, q_seqs, kv_seqs, n_heads, n_kv_heads)?;
        self.attention_cached_kernel(
            Checked(()),
            q,
            k,
            v,
            q_seqs,
            kv_seqs,
            n_heads,
            n_kv_heads,
            scale,
        )
    }

    /// SwiGLU: `silu(gate) * up`, elementwise, gate and up `[T, inter]`.
    fn swiglu(&self, gate: &Tensor<Self>, up: &Tensor<Self>) -> Result<Tensor<Self>> {
        check::swiglu(gate, up, None)?;
        self.swiglu_kernel(Checked(()), gate, up)
    }

    /// SwiGLU backward: `(dgate, dup)` from `d [T, inter]`.
    fn swiglu_backward(
        &self,
        d: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        check::swiglu(gate, up, Some(d))?;
        self.swiglu_backward_kernel(Checked(()), d, gate, up)
    }

    /// Cross-entropy of `logits [N, V]` against `labels [N]`; label `-100` (or any negative)
    /// is ignored. Returns `(sum of CE over counted rows, dlogits [N, V])` where dlogits is the
    /// gradient of `grad_scale * sum` (`softmax - onehot`, zero on ignored rows): the softmax is
    /// computed once and reused for the gradient. Errors: a label `>= V`.
    fn cross_entropy(
        &self,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(f64, Tensor<Self>)> {
        let (n, vocab) = logits.dims2("logits")?;
        check::labels(labels, n, vocab)?;
        self.cross_entropy_kernel(Checked(()), logits, labels, grad_scale)
    }

    /// [`Backend::cross_entropy`] with the loss left on the device: returns
    /// `(stats [K, 3], dlogits [N, V])` where K is the number of counted rows (label >= 0) and
    /// row k of `stats` holds, for the k-th counted row in order, `(max of its logits, sum of
    /// exp(logit - max), the logit of its label)` in f32, from which [`cross_entropy_loss`]
    /// forms the summed loss in f64 (the CPU's per-row value exactly). dlogits as
    /// `cross_entropy`'s. A training step reads `stats` back once, together with any
    /// regularizer ([`Backend::download_many`]). Errors: as [`Backend::cross_entropy`].
    fn cross_entropy_stats(
        &self,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let (n, vocab) = logits.dims2("logits")?;
        check::labels(labels, n, vocab)?;
        self.cross_entropy_stats_kernel(Checked(()), logits, labels, grad_scale)
    }

    // ---- per-axis scales and sums, activations, small softmaxes ----------------------------------
    //
    // The pieces of the additive and selective methods that are not a low-rank term: IA3's
    // learned vectors (a scale of a projection's input columns or output columns), bias
    // tuning's bias gradient, bottleneck adapters' non-linearity and AdapterFusion's softmax
    // over adapters.

    /// `y = x ⊙ v` with v broadcast along `axis`: x `[n, d]`, v `[d]` for [`Axis::Cols`]
    /// (`y[i, j] = x[i, j] v[j]`: IA3 on a projection's input, or on its output rows) or `[n]`
    /// for [`Axis::Rows`] (`y[i, j] = x[i, j] v[i]`: IA3 merged into W's rows, AdapterFusion's
    /// per-token weights). Returns `[n, d]`. Errors: x not 2-D, v of the wrong length.
    fn mul_vector(&self, x: &Tensor<Self>, v: &Tensor<Self>, axis: Axis) -> Result<Tensor<Self>> {
        check::axis_vector(x, v, axis)?;
        self.mul_vector_kernel(Checked(()), x, v, axis)
    }

    /// Sum of `a ⊙ b` (of `a` alone when `b` is `None`) down the other axis: `[d]` with
    /// `out[j] = sum_i a[i, j] b[i, j]` for [`Axis::Cols`] (IA3's and a bias's gradient), `[n]`
    /// with `out[i] = sum_j a[i, j] b[i, j]` for [`Axis::Rows`] (row dot products:
    /// AdapterFusion's scores). a and b `[n, d]`. The CPU sums in f64; other backends in f32
    /// with compensated or tree sums. Errors: a not 2-D, b of another shape.
    fn sum_product(
        &self,
        a: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        axis: Axis,
    ) -> Result<Tensor<Self>> {
        a.dims2("a")?;
        if let Some(b) = b {
            same_shape("b", b, a)?;
        }
        self.sum_product_kernel(Checked(()), a, b, axis)
    }

    /// `y = act(x)` element-wise, any shape ([`Activation`]).
    fn activation(&self, x: &Tensor<Self>, act: Activation) -> Result<Tensor<Self>> {
        self.activation_kernel(Checked(()), x, act)
    }

    /// `dx = dy ⊙ act'(x)` from the activation's INPUT x (same shape as dy). Errors: shapes
    /// that differ.
    fn activation_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        act: Activation,
    ) -> Result<Tensor<Self>> {
        same_shape("x", x, dy)?;
        self.activation_backward_kernel(Checked(()), dy, x, act)
    }

    /// Softmax of each row of x `[n, k]` (max-subtracted, f32): AdapterFusion's weights over
    /// its k adapters for every token. Errors: x not 2-D or with no column.
    fn softmax_rows(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        check::softmax_rows(x)?;
        self.softmax_rows_kernel(Checked(()), x)
    }

    /// Backward of [`Backend::softmax_rows`] from its output `p [n, k]`:
    /// `dx = p ⊙ (dy - rowdot(dy, p))`. Errors: shapes that differ.
    fn softmax_rows_backward(&self, dy: &Tensor<Self>, p: &Tensor<Self>) -> Result<Tensor<Self>> {
        check::softmax_rows(p)?;
        same_shape("dy", dy, p)?;
        self.softmax_rows_backward_kernel(Checked(()), dy, p)
    }

    // ---- optimizer ---------------------------------------------------------------------------------

    /// One AdamW step in place over `param`, with moments `m`, `v` (same shape as param).
    fn adamw_step(
        &self,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        p: &AdamWParams,
    ) -> Result<()> {
        let factors = check::adamw(param, grad, m, v, p)?;
        self.adamw_step_kernel(Checked(()), param, grad, m, v, &factors, p)
    }
}

impl<K: Kernels> Backend for K {}

/// transformers' default RoPE frequencies `1 / theta^(2i/head_dim)` for `i < head_dim/2`,
/// computed in f32 as `LlamaRotaryEmbedding` does; every backend's RoPE uses these values.
pub(crate) fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Checks that `a` and `b` have equal shapes.
pub(crate) fn same_shape<B: Kernels>(
    name: &str,
    a: &Tensor<B>,
    expected: &Tensor<B>,
) -> Result<()> {
    a.expect_shape(name, expected.shape())
}
