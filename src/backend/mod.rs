//! The seam between math and hardware.
//!
//! [`Backend`] has one method per kernel. Each method's contract (shapes, layout, what is fused)
//! is written on the trait; the CPU implementation ([`cpu::Cpu`]) is the specification that every
//! other backend is tested against. Adapters, the model and the trainer are generic over
//! `B: Backend` and never branch on the device.
//!
//! All tensors are row-major. Weights use torch's `nn.Linear` layout `[out, in]`; activations
//! are `[tokens, features]`. Integer inputs (token ids, labels, sequence boundaries) are passed
//! as host slices: they are small and every backend uploads them as it needs.

pub mod bench;
pub mod check;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgpu;

use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Tensor;

/// A backend buffer with a row-major shape. Storage is f32 on the CPU reference; a backend may
/// store a frozen weight ([`Backend::upload_frozen`]) in a narrower type.
pub struct Tensor<B: Backend> {
    pub(crate) buf: B::Buf,
    pub(crate) shape: Vec<usize>,
}

impl<B: Backend> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Tensor {
            buf: self.buf.clone(),
            shape: self.shape.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

impl<B: Backend> Tensor<B> {
    /// The row-major shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Size of dimension `i` (panics never: out-of-range dims read as 1).
    pub fn dim(&self, i: usize) -> usize {
        self.shape.get(i).copied().unwrap_or(1)
    }
    /// The backend buffer.
    pub fn buf(&self) -> &B::Buf {
        &self.buf
    }
    /// Checks that the shape equals `expected`, naming the tensor in the error.
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::shape(name, format!("{expected:?}"), &self.shape));
        }
        Ok(())
    }
    /// Checks the tensor is 2-D and returns `(rows, cols)`.
    pub fn dims2(&self, name: &str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(Error::shape(name, "2-D [rows, cols]", &self.shape)),
        }
    }
}

/// A frozen NF4-quantized weight `[out, in]` resident on a backend (QLoRA's base weight): the
/// backend's [`Backend::Nf4Buf`] plus the logical shape and the stored size. Made by
/// [`Backend::upload_nf4`]; consumed by the `nf4_*` kernels, which dequantize it tile by tile
/// and never materialize the f32 `[out, in]` matrix.
pub struct Nf4Weight<B: Backend> {
    pub(crate) buf: B::Nf4Buf,
    pub(crate) out: usize,
    pub(crate) in_: usize,
    pub(crate) bytes: usize,
}

impl<B: Backend> Clone for Nf4Weight<B> {
    fn clone(&self) -> Self {
        Nf4Weight {
            buf: self.buf.clone(),
            out: self.out,
            in_: self.in_,
            bytes: self.bytes,
        }
    }
}

impl<B: Backend> std::fmt::Debug for Nf4Weight<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nf4Weight[{}, {}]", self.out, self.in_)
    }
}

impl<B: Backend> Nf4Weight<B> {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.in_)
    }
    /// Bytes of the quantized data as stored: packed 4-bit indices plus the absmax statistics
    /// ([`Nf4Tensor::bytes`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The backend buffer.
    pub fn buf(&self) -> &B::Nf4Buf {
        &self.buf
    }
}

/// Saved state of a causal attention forward pass, needed by its backward.
pub struct AttentionSaved<B: Backend> {
    /// Attention output `[T, Hq*hd]` (before the output projection).
    pub out: Tensor<B>,
    /// Log-sum-exp of each softmax row, `[Hq, T]`.
    pub lse: Tensor<B>,
}

/// Hyperparameters of one AdamW step, as `torch.optim.AdamW` (decoupled weight decay,
/// bias-corrected moments, `eps` added after the square root).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for the bias corrections.
    pub step: u64,
}

/// One packed sequence of a variable-length batch: rows `start..start+len` of the token axis.
///
/// Batches are packed without padding (the "varlen" layout of FlashAttention): attention is
/// causal within each sequence and never crosses sequences, so results equal those of a
/// right-padded batch at every real position, without computing the padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    pub start: usize,
    pub len: usize,
}

/// Saved state of a DoRA forward pass ([`Backend::dora_forward`]), needed by its backward.
pub struct DoraSaved<B: Backend> {
    /// `h = x A^T`, `[T, r]`.
    pub h: Tensor<B>,
    /// The unscaled adapted output `z = x W0^T + s h B^T`, `[T, out]` (no bias), so that
    /// `dm = sum_T(dy ⊙ z) / n` needs no recomputation of the base product.
    pub z: Tensor<B>,
}

/// Gradients of one DoRA layer ([`Backend::dora_backward`]).
pub struct DoraGrads<B: Backend> {
    /// `dL/dx`, `[T, in]`.
    pub dx: Tensor<B>,
    /// `dL/d lora_A`, `[r, in]`.
    pub d_lora_a: Tensor<B>,
    /// `dL/d lora_B`, `[out, r]`.
    pub d_lora_b: Tensor<B>,
    /// `dL/d lora_magnitude_vector`, `[out]`.
    pub d_magnitude: Tensor<B>,
}

/// Gradients of one AdaLoRA layer ([`Backend::adalora_backward`]).
pub struct AdaLoraGrads<B: Backend> {
    /// `dL/dx`, `[T, in]`.
    pub dx: Tensor<B>,
    /// `dL/d lora_A`, `[r, in]`.
    pub d_lora_a: Tensor<B>,
    /// `dL/d lora_B`, `[out, r]`.
    pub d_lora_b: Tensor<B>,
    /// `dL/d lora_E`, `[r, 1]`; non-zero for masked ranks too (masking zeroes E, not its
    /// gradient).
    pub d_lora_e: Tensor<B>,
}

/// The importance EMAs of one AdaLoRA layer (PEFT `RankAllocator.exp_avg_ipt` and
/// `exp_avg_unc` of its `lora_A`, `lora_B` and `lora_E`), each shaped like its parameter:
/// `[r, in]`, `[out, r]`, `[r, 1]`. Updated by [`Backend::adalora_update_ipt`], scored by
/// [`Backend::adalora_triplet_scores`].
pub struct AdaLoraIpt<B: Backend> {
    pub ipt_a: Tensor<B>,
    pub unc_a: Tensor<B>,
    pub ipt_b: Tensor<B>,
    pub unc_b: Tensor<B>,
    pub ipt_e: Tensor<B>,
    pub unc_e: Tensor<B>,
}

impl<B: Backend> AdaLoraIpt<B> {
    /// Zero EMAs for a layer of rank `r` over `[out, in]` (PEFT starts them at 0).
    pub fn zeros(be: &B, r: usize, in_features: usize, out_features: usize) -> Result<Self> {
        Ok(AdaLoraIpt {
            ipt_a: be.zeros(&[r, in_features])?,
            unc_a: be.zeros(&[r, in_features])?,
            ipt_b: be.zeros(&[out_features, r])?,
            unc_b: be.zeros(&[out_features, r])?,
            ipt_e: be.zeros(&[r, 1])?,
            unc_e: be.zeros(&[r, 1])?,
        })
    }
}

impl<B: Backend> Clone for AdaLoraIpt<B> {
    fn clone(&self) -> Self {
        AdaLoraIpt {
            ipt_a: self.ipt_a.clone(),
            unc_a: self.unc_a.clone(),
            ipt_b: self.ipt_b.clone(),
            unc_b: self.unc_b.clone(),
            ipt_e: self.ipt_e.clone(),
            unc_e: self.unc_e.clone(),
        }
    }
}

/// The summed cross-entropy from the per-row statistics of [`Backend::cross_entropy_stats`]
/// (`(max, sum of exp, logit of the label)` per counted row): `sum(max + ln(sum) - logit)`,
/// each term and the sum in f64, in row order (the same per-row value as
/// [`Backend::cross_entropy`] on the CPU). A trailing partial row is ignored.
pub fn cross_entropy_loss(stats: &[f32]) -> f64 {
    stats
        .chunks_exact(3)
        .map(|s| s[0] as f64 + (s[1] as f64).ln() - s[2] as f64)
        .sum()
}

/// One method per kernel. The CPU implementation is the reference.
///
/// Every method checks its inputs' shapes and returns [`Error::Shape`] naming the argument when
/// they do not agree; none panics on bad input.
pub trait Backend: Clone + Send + Sync + Sized + 'static {
    /// Device storage of one tensor.
    type Buf: Clone + Send + Sync;
    /// Device storage of one NF4-quantized weight (packed indices + absmax statistics, in
    /// bitsandbytes' layout); see [`Nf4Weight`].
    type Nf4Buf: Clone + Send + Sync;

    /// Short backend name (`cpu`, `cuda`, `wgpu`).
    fn name(&self) -> &'static str;

    /// Waits until every kernel queued so far has finished. GPU backends run asynchronously;
    /// code that times kernels calls this before reading the clock. Errors: a device failure
    /// reported while waiting. The CPU reference runs synchronously, so its default is a no-op.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    // ---- memory -------------------------------------------------------------------------------

    /// Copies host f32 data in. Errors: `data.len()` differs from the shape's element count.
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>>;
    /// Copies host f32 data in as a FROZEN weight: one that no kernel will modify in place (a
    /// base projection weight under an adapter, never a trained one or one an adapter is merged
    /// into). A backend may store it in a narrower type (wgpu: f16 where the adapter has
    /// `SHADER_F16`), so the values read back and used by every kernel are `data` rounded to
    /// that type; arithmetic stays f32. In-place kernels return an error for such a tensor.
    /// The default (CPU, CUDA) is [`Backend::upload`]. Errors: as [`Backend::upload`].
    fn upload_frozen(&self, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>> {
        self.upload(data, shape)
    }
    /// Turns a tensor already on the device into a frozen weight, as if it had been uploaded
    /// with [`Backend::upload_frozen`] (the values may round to a narrower storage type). Used
    /// when training is prepared and it is known which base weights stay frozen. The default
    /// returns `t` unchanged.
    fn freeze(&self, t: Tensor<Self>) -> Result<Tensor<Self>> {
        Ok(t)
    }
    /// Bytes `t` occupies on the device: 4 per element unless it is a frozen weight stored
    /// narrower (see [`Backend::upload_frozen`]).
    fn stored_bytes(t: &Tensor<Self>) -> usize {
        4 * t.len()
    }
    /// Copies a tensor back to the host.
    fn download(&self, t: &Tensor<Self>) -> Result<Vec<f32>>;
    /// Copies several tensors back to the host with one synchronization where the backend can
    /// (wgpu: one staging buffer, one wait; a training step reads its loss and regularizer
    /// together so). The default downloads them one by one (on CUDA the first waits for the
    /// queued work, the others find the stream idle). Returns one vector per tensor, in order.
    fn download_many(&self, ts: &[&Tensor<Self>]) -> Result<Vec<Vec<f32>>> {
        ts.iter().map(|t| self.download(t)).collect()
    }
    /// A zero-filled tensor.
    fn zeros(&self, shape: &[usize]) -> Result<Tensor<Self>>;
    /// `dst = src`, a copy within the device's memory (no host round trip); every byte of
    /// `src` read once and of `dst` written once. [`bench::measure_peak`] times it for the
    /// device's copy bandwidth. GPU backends copy into `dst`'s own buffer; the default (CPU)
    /// replaces `dst` with a clone of `src`, a deep copy there. Errors: shapes that differ, a
    /// storage type that differs (or a frozen `dst`, which no kernel modifies).
    fn copy_into(&self, src: &Tensor<Self>, dst: &mut Tensor<Self>) -> Result<()> {
        same_shape("dst", dst, src)?;
        *dst = src.clone();
        Ok(())
    }
    /// Rows `idx` of a 2-D tensor `[n, d]`, gathered into `[idx.len(), d]`.
    /// Also the embedding lookup. Errors: an index `>= n`.
    fn gather_rows(&self, t: &Tensor<Self>, idx: &[u32]) -> Result<Tensor<Self>>;
    /// `dst[idx[i]] += src[i]` row by row (the backward of [`Backend::gather_rows`]).
    fn scatter_add_rows(
        &self,
        dst: &mut Tensor<Self>,
        idx: &[u32],
        src: &Tensor<Self>,
    ) -> Result<()>;

    // ---- dense linear algebra -----------------------------------------------------------------

    /// `y = x W^T + bias`: x `[T, in]`, w `[out, in]`, bias `[out]` → y `[T, out]`.
    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>>;
    /// `dx = dy W`: dy `[T, out]`, w `[out, in]` → dx `[T, in]`; with `acc`, adds into it.
    fn linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Tensor<Self>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<Option<Tensor<Self>>>;
    /// `dW += dy^T x`: dy `[T, out]`, x `[T, in]`, dw `[out, in]` (weight gradient, accumulated).
    fn linear_backward_weight(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<()>;
    /// `a += alpha * b`, elementwise, same shapes.
    fn axpy(&self, a: &mut Tensor<Self>, alpha: f32, b: &Tensor<Self>) -> Result<()>;
    /// `a *= alpha`, elementwise.
    fn scale(&self, a: &mut Tensor<Self>, alpha: f32) -> Result<()>;
    /// Sum of squares of all elements (for gradient-norm reporting and clipping), in f64.
    fn sum_squares(&self, a: &Tensor<Self>) -> Result<f64>;

    // ---- LoRA (PEFT `lora.Linear`, paper: Hu et al. 2021, eq. 3) ------------------------------

    /// Fused LoRA forward `y = x W0^T + bias + s (x A^T) B^T`.
    ///
    /// x `[T, in]`, w0 `[out, in]`, bias `[out]`, lora_a `[r, in]`, lora_b `[out, r]`, scaling
    /// `s`. Returns `(y [T, out], h [T, r])`, `h = x A^T` kept for the backward. Never forms
    /// `B A` (which would cost `out*in*r` and an `[out, in]` temporary).
    fn lora_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;

    /// Fused LoRA backward for a frozen base weight, from `dy [T, out]` and the saved
    /// `x [T, in]`, `h [T, r]`. Returns `(dx [T, in], dA [r, in], dB [out, r])`:
    /// `g = dy B` `[T, r]`, `dx = dy W0 + s g A`, `dA = s g^T x`, `dB = s dy^T h`.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        w0: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)>;

    /// In place `W += sign * s * B A` (merge with `sign = 1`, unmerge with `sign = -1`);
    /// w `[out, in]`, lora_a `[r, in]`, lora_b `[out, r]`. This is the one place `B A` is formed,
    /// added straight into W.
    fn lora_merge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        sign: f32,
    ) -> Result<()>;

    // ---- DoRA (PEFT `DoraLinearLayer`, Liu et al. 2024) ---------------------------------------

    /// Squared L2 norm of each row of `w [out, in]` → `[out]`, accumulated in f64. For DoRA,
    /// `||W0||_row^2` is computed once per frozen base weight and passed to
    /// [`Backend::dora_weight_norm`].
    fn row_sq_norms(&self, w: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// DoRA's weight norm `n = ||W0 + s B A||_row` (one per OUTPUT row, PEFT's `dim=1`),
    /// `[out]`, by the low-rank identity
    /// `n^2 = ||W0||_row^2 + 2 s rowdot(W0 A^T, B) + s^2 rowdot(B (A A^T), B)`.
    ///
    /// w0 `[out, in]`, w0_row_sq `[out]` (= `row_sq_norms(w0)`), lora_a `[r, in]`, lora_b
    /// `[out, r]`. Never forms `B A` or any `[out, in]` temporary: one `[out,in]x[in,r]`
    /// product, memory `O(out r + r^2)`. The norm is a constant for autograd (PEFT detaches it).
    /// Numerics: the three terms are summed in f64 and clamped at 0 before the square root;
    /// the absolute error of `n^2` is about `eps_f32 * (||W0||^2 + s^2 ||B A||^2)`, so a row
    /// where `W0 + s B A` nearly cancels is known only to that absolute accuracy.
    fn dora_weight_norm(
        &self,
        w0: &Tensor<Self>,
        w0_row_sq: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>>;

    /// Fused DoRA forward `y = k ⊙ (x W0^T + s (x A^T) B^T) + bias`, `k = m / n` per output
    /// feature; the bias is NOT scaled by k (PEFT).
    ///
    /// x `[T, in]`, w0 `[out, in]`, bias `[out]`, lora_a `[r, in]`, lora_b `[out, r]`,
    /// magnitude `m [out]` (`lora_magnitude_vector`), weight_norm `n [out]` (from
    /// [`Backend::dora_weight_norm`], treated as a constant). Returns `(y [T, out], saved)`.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<(Tensor<Self>, DoraSaved<Self>)>;

    /// [`Backend::dora_forward`] that also computes the weight norm `n` it needs (as
    /// [`Backend::dora_weight_norm`], from `w0_row_sq = ||W0||_row^2 [out]`) and returns it:
    /// `(y [T, out], saved, n [out])`. The default makes the two calls; the CPU backend takes
    /// `W0 A^T` (the norm's only pass over W0) in the same W0 pass as `x W0^T`, by multiplying
    /// the stacked `[x; A]` `[T + r, in]`. Errors: as the two calls.
    #[allow(clippy::too_many_arguments)]
    fn dora_forward_with_norm(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        w0_row_sq: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, DoraSaved<Self>, Tensor<Self>)> {
        let n = self.dora_weight_norm(w0, w0_row_sq, lora_a, lora_b, scaling)?;
        let (y, saved) = self.dora_forward(x, w0, bias, lora_a, lora_b, scaling, magnitude, &n)?;
        Ok((y, saved, n))
    }

    /// DoRA backward from `dy [T, out]` (n detached, as PEFT): with `g' = dy ⊙ k`,
    /// `dx = g' W0 + s (g' B) A`, `dA = s (g' B)^T x`, `dB = s g'^T h`,
    /// `dm = sum_T(dy ⊙ z) / n`.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<DoraGrads<Self>>;

    /// DoRA merge in place: `W = (m / n)[:, None] ⊙ (W + s B A)`, where `n` must be the norm of
    /// the UNmerged `W + s B A` (keep it for [`Backend::dora_unmerge`]). w `[out, in]`.
    #[allow(clippy::too_many_arguments)]
    fn dora_merge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<()>;

    /// DoRA merge that also computes the weight norm, as PEFT's `merge` does: forms
    /// `W' = W + s B A`, takes `n = ||W'||_row` of the merged rows (not the low-rank identity the
    /// forward uses), writes `W = (m / n)[:, None] ⊙ W'` and returns `n [out]` (keep it for
    /// [`Backend::dora_unmerge`]). w `[out, in]`, `w_row_sq [out]` = `||W||_row^2` of the
    /// unmerged base (used by backends that take the norm through the low-rank identity
    /// instead). The default is [`Backend::dora_weight_norm`] then [`Backend::dora_merge`]; the
    /// CPU backend does it in one pass over `W`, row block by row block. Errors: shapes as for
    /// [`Backend::dora_merge`].
    #[allow(clippy::too_many_arguments)]
    fn dora_merge_with_norm(
        &self,
        w: &mut Tensor<Self>,
        w_row_sq: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        let n = self.dora_weight_norm(w, w_row_sq, lora_a, lora_b, scaling)?;
        self.dora_merge(w, lora_a, lora_b, scaling, magnitude, &n)?;
        Ok(n)
    }

    /// Inverse of [`Backend::dora_merge`] (PEFT `unmerge`): `W = W / (m / n)[:, None] - s B A`,
    /// with the same `n` that the merge used. Errors: an `m / n` that is zero or not finite
    /// (not invertible). Numerics: each row's rounding error is scaled by `n / m`; the round
    /// trip restores W0 to a few ulp of `max(|W0|, |s B A|)` when `m ≈ n`.
    #[allow(clippy::too_many_arguments)]
    fn dora_unmerge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<()>;

    // ---- VeRA (PEFT `vera.Linear`, Kopiczko et al. 2024) --------------------------------------

    /// Fused VeRA forward `y = x W0^T + bias + lambda_b ⊙ ((lambda_d ⊙ (x As^T)) Bs^T)`, no
    /// alpha scaling, with `As = vera_A[:, :in]` and `Bs = vera_B[:out, :]` sliced inside.
    ///
    /// x `[T, in]`, w0 `[out, in]`, bias `[out]`, vera_a `[r, max_in]` and vera_b
    /// `[max_out, r]` (the full shared projections, `max_in >= in`, `max_out >= out`),
    /// lambda_d `[r]`, lambda_b `[out]`. Returns `(y [T, out], h = x As^T [T, r])`.
    #[allow(clippy::too_many_arguments)]
    fn vera_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        vera_a: &Tensor<Self>,
        vera_b: &Tensor<Self>,
        lambda_d: &Tensor<Self>,
        lambda_b: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;

    /// VeRA backward from `dy [T, out]` and the saved `x`, `h`. Returns
    /// `(dx [T, in], dlambda_d [r], dlambda_b [out])`: `q = (dy ⊙ lambda_b) Bs`,
    /// `dlambda_d = sum_T(q ⊙ h)`, `dx = dy W0 + (q ⊙ lambda_d) As`,
    /// `dlambda_b[o] = sum_j (dy^T h)[o, j] Bs[o, j] lambda_d[j]` (no `[T, out]` temporary).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)>;

    /// In place `W += sign * (lambda_b[:, None] ⊙ Bs) (lambda_d[:, None] ⊙ As)` (merge with
    /// `sign = 1`, unmerge with `sign = -1`); w `[out, in]`, slicing as in
    /// [`Backend::vera_forward`].
    fn vera_merge(
        &self,
        w: &mut Tensor<Self>,
        vera_a: &Tensor<Self>,
        vera_b: &Tensor<Self>,
        lambda_d: &Tensor<Self>,
        lambda_b: &Tensor<Self>,
        sign: f32,
    ) -> Result<()>;

    // ---- AdaLoRA (PEFT `adalora.SVDLinear`, Zhang et al. 2023) --------------------------------

    /// Fused AdaLoRA forward `y = x W0^T + bias + ((x (A ⊙ E)^T) B^T) * c` with
    /// `c = scaling / (ranknum + 1e-5)` computed in f32 as PEFT does; `scaling` is PEFT's
    /// (`lora_alpha`, not alpha/r), `ranknum` is `init_r` (never changed by masking).
    ///
    /// x `[T, in]`, w0 `[out, in]`, bias `[out]`, lora_a `[r, in]`, lora_b `[out, r]`, lora_e
    /// `[r, 1]` (broadcast over A's rows). Returns `(y [T, out], h = x (A ⊙ E)^T [T, r])`.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;

    /// AdaLoRA backward from `dy [T, out]` and the saved `x`, `h`: with `gB = dy B` and
    /// `M = c gB^T x` `[r, in]`: `dx = dy W0 + c gB (A ⊙ E)`, `dB = c dy^T h`, `dA = M ⊙ E`,
    /// `dE[j] = sum_i M[j, i] A[j, i]` (non-zero for masked ranks).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<AdaLoraGrads<Self>>;

    /// In place `W += sign * c * B (A ⊙ E)` (PEFT `merge`/`unmerge`); w `[out, in]`.
    #[allow(clippy::too_many_arguments)]
    fn adalora_merge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        lora_e: &Tensor<Self>,
        scaling: f32,
        ranknum: f32,
        sign: f32,
    ) -> Result<()>;

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
    ) -> Result<()>;

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
    ) -> Result<()>;

    /// The masking threshold: `torch.kthvalue(scores, k)` for a 1-based `k`, the k-th smallest
    /// of `scores [n]` in the total order of [`f32::total_cmp`] (NaN above every number, as
    /// torch sorts it), returned as a `[1]` tensor (exact: one of the scores). PEFT's
    /// `k = init_bgt - budget`. Errors: scores not 1-D, `k` outside `1..=n`.
    fn adalora_threshold(&self, scores: &Tensor<Self>, k: usize) -> Result<Tensor<Self>>;

    /// The keep-mask of every rank at once: `keep [n]` with `0.0` where `scores[i] <=
    /// threshold[0]` (PEFT masks those) and `1.0` elsewhere; a NaN score or threshold compares
    /// false, so it keeps. This is PEFT's rank pattern as floats. Errors: scores not 1-D,
    /// threshold not `[1]`.
    fn adalora_rank_mask(
        &self,
        scores: &Tensor<Self>,
        threshold: &Tensor<Self>,
    ) -> Result<Tensor<Self>>;

    /// PEFT's `lora_E.masked_fill_(~keep, 0.0)` for one layer: `lora_e[i] = 0` where
    /// `keep[offset + i] == 0`, else unchanged. lora_e `[r, 1]`, keep `[n]` (from
    /// [`Backend::adalora_rank_mask`]) with `offset + r <= n`. Errors: those shapes.
    fn adalora_apply_mask(
        &self,
        lora_e: &mut Tensor<Self>,
        keep: &Tensor<Self>,
        offset: usize,
    ) -> Result<()>;

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
    ) -> Result<Tensor<Self>>;

    // ---- NF4 base weights (QLoRA, Dettmers et al. 2023) ---------------------------------------
    //
    // Every `nf4_*` kernel dequantizes the weight a tile of rows at a time (bitsandbytes'
    // `dequantize_4bit`, bit for bit) into a bounded scratch buffer and multiplies that tile: the
    // f32 `[out, in]` copy of the weight is never materialized. Results equal the dense kernel
    // applied to the dequantized weight up to f32 summation order.

    /// Uploads an NF4 tensor as a frozen linear weight `[out, in]` (its shape must be 2-D).
    fn upload_nf4(&self, w: &Nf4Tensor) -> Result<Nf4Weight<Self>>;

    /// Dequantizes the whole weight to a dense `[out, in]` tensor. This DOES materialize the f32
    /// weight; it is for merging and exporting, never for the forward or backward.
    fn nf4_dequantize(&self, w: &Nf4Weight<Self>) -> Result<Tensor<Self>>;

    /// `y = x dequant(W)^T + bias`: x `[T, in]`, w `[out, in]`, bias `[out]` → y `[T, out]`
    /// (the NF4 counterpart of [`Backend::linear`]).
    fn nf4_linear(
        &self,
        x: &Tensor<Self>,
        w: &Nf4Weight<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>>;

    /// `dx = dy dequant(W)`: dy `[T, out]`, w `[out, in]` → dx `[T, in]`; with `acc`, adds into
    /// it and returns `None` (the NF4 counterpart of [`Backend::linear_backward_input`]).
    fn nf4_linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Nf4Weight<Self>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<Option<Tensor<Self>>>;

    /// `||dequant(W)||_row^2` → `[out]`, accumulated in f64 (the NF4 counterpart of
    /// [`Backend::row_sq_norms`]; DoRA computes it once per frozen base).
    fn nf4_row_sq_norms(&self, w: &Nf4Weight<Self>) -> Result<Tensor<Self>>;

    /// DoRA's weight norm `||dequant(W0) + s B A||_row` → `[out]` with the contract and
    /// numerics of [`Backend::dora_weight_norm`]; `W0 A^T` is formed tile by tile.
    fn nf4_dora_weight_norm(
        &self,
        w0: &Nf4Weight<Self>,
        w0_row_sq: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>>;

    // ---- adapter terms over a base product computed elsewhere (any base format) ---------------
    //
    // The fused kernels above take a dense `w0`. Over any other base format (NF4) the adapter
    // layers compute the base product with that format's kernel and add the adapter term with
    // these, so the adapter math is written once per backend, not once per base format.

    /// LoRA term added in place: `h = x A^T`, `y += s h B^T`. x `[T, in]`, y `[T, out]` (the
    /// base output), lora_a `[r, in]`, lora_b `[out, r]`. Returns `h [T, r]` for the backward.
    fn lora_add(
        &self,
        y: &mut Tensor<Self>,
        x: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>>;

    /// The adapter part of [`Backend::lora_backward`]: with `g = dy B`, adds `s g A` into
    /// `dx [T, in]` (which holds, or will receive, the base's `dy W0`) and returns
    /// `(dA = s g^T x [r, in], dB = s dy^T h [out, r])`.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward_adapter(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        dx: &mut Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;

    /// [`Backend::dora_forward`] from the base product `base_out = x W0^T` `[T, out]` (no
    /// bias; consumed, its buffer becomes `z`): `z = base_out + s (x A^T) B^T`,
    /// `y = (m / n) ⊙ z + bias`. Returns `(y [T, out], saved)` as `dora_forward` does.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<(Tensor<Self>, DoraSaved<Self>)>;

    /// The adapter part of [`Backend::dora_backward`]: returns the grads with
    /// `dx = s (g' B) A` only, and `g' = dy ⊙ (m / n)` `[T, out]`, which the caller sends
    /// through the base (`dx += g' W0`).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<(DoraGrads<Self>, Tensor<Self>)>;

    // ---- Llama block ops ----------------------------------------------------------------------

    /// RMSNorm over the last dim: `y = x / sqrt(mean(x^2) + eps) * weight`.
    /// x `[T, d]`, weight `[d]` → `(y [T, d], rstd [T])`.
    fn rmsnorm(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;
    /// RMSNorm backward: returns `dx [T, d]` and adds `dweight [d]` into `dweight` if given.
    fn rmsnorm_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        rstd: &Tensor<Self>,
        dweight: Option<&mut Tensor<Self>>,
    ) -> Result<Tensor<Self>>;

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
    ) -> Result<()>;

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
    ) -> Result<AttentionSaved<Self>>;

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
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)>;

    /// SwiGLU: `silu(gate) * up`, elementwise, gate and up `[T, inter]`.
    fn swiglu(&self, gate: &Tensor<Self>, up: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// SwiGLU backward: `(dgate, dup)` from `d [T, inter]`.
    fn swiglu_backward(
        &self,
        d: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;

    /// Cross-entropy of `logits [N, V]` against `labels [N]`; label `-100` (or any negative)
    /// is ignored. Returns `(sum of CE over counted rows, dlogits [N, V])` where dlogits is the
    /// gradient of `grad_scale * sum` (`softmax - onehot`, zero on ignored rows): the softmax is
    /// computed once and reused for the gradient. Errors: a label `>= V`.
    fn cross_entropy(
        &self,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(f64, Tensor<Self>)>;

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
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;

    // ---- optimizer ----------------------------------------------------------------------------

    /// One AdamW step in place over `param`, with moments `m`, `v` (same shape as param).
    fn adamw_step(
        &self,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        p: &AdamWParams,
    ) -> Result<()>;
}

/// transformers' default RoPE frequencies `1 / theta^(2i/head_dim)` for `i < head_dim/2`,
/// computed in f32 as `LlamaRotaryEmbedding` does; every backend's RoPE uses these values.
pub(crate) fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Checks that `a` and `b` have equal shapes.
pub(crate) fn same_shape<B: Backend>(
    name: &str,
    a: &Tensor<B>,
    expected: &Tensor<B>,
) -> Result<()> {
    a.expect_shape(name, expected.shape())
}
