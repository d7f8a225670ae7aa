//! The values that cross the seam: tensors, NF4 weights, packed-sequence spans and the small
//! structs some ops take or return.

use super::Backend;
use super::Kernels;
use crate::error::{Error, Result};

/// A backend buffer with a row-major shape. Storage is f32 on the CPU reference; a backend may
/// store a frozen weight ([`Backend::upload_frozen`]) in a narrower type.
pub struct Tensor<B: Kernels> {
    pub(crate) buf: B::Buf,
    pub(crate) shape: Vec<usize>,
}

impl<B: Kernels> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Tensor {
            buf: self.buf.clone(),
            shape: self.shape.clone(),
        }
    }
}

impl<B: Kernels> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

impl<B: Kernels> Tensor<B> {
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
    /// The same data under another row-major shape of as many elements (no copy). Errors: a
    /// shape of another element count.
    pub fn into_shape(self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(Error::shape(
                "reshape",
                format!("{} elements", self.len()),
                shape,
            ));
        }
        Ok(Tensor {
            buf: self.buf,
            shape: shape.to_vec(),
        })
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
/// backend's [`Kernels::Nf4Buf`] plus the logical shape and the stored size. Made by
/// [`Backend::upload_nf4`]; consumed by the `nf4_*` kernels, which dequantize it tile by tile
/// and never materialize the f32 `[out, in]` matrix.
#[derive(Clone)]
pub struct Nf4Weight<B: Kernels> {
    pub(crate) buf: B::Nf4Buf,
    pub(crate) out: usize,
    pub(crate) in_: usize,
    pub(crate) bytes: usize,
}

impl<B: Kernels> std::fmt::Debug for Nf4Weight<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nf4Weight[{}, {}]", self.out, self.in_)
    }
}

impl<B: Kernels> Nf4Weight<B> {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.in_)
    }
    /// Bytes of the quantized data as stored: packed 4-bit indices plus the absmax statistics
    /// ([`Nf4Tensor::bytes`](crate::quant::nf4::Nf4Tensor::bytes)).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The backend buffer.
    pub fn buf(&self) -> &B::Nf4Buf {
        &self.buf
    }
}

/// A frozen base weight `[out, in]` stored as bfloat16 (`torch.bfloat16`: the top 16 bits of
/// the f32, rounded to nearest even), the storage of `--compute-dtype bf16`: half the bytes of
/// f32, products still accumulated in f32. Made by [`Backend::upload_bf16`]. The CPU holds the
/// bf16 bits and widens them a tile of rows at a time inside each product (exact: every bf16
/// is an f32); the GPU backends hold the rounded values in their frozen storage
/// ([`Backend::upload_frozen`]), so every backend computes with the same weight values.
#[derive(Clone)]
pub struct Bf16Weight<B: Kernels> {
    pub(crate) buf: B::Bf16Buf,
    pub(crate) out: usize,
    pub(crate) in_: usize,
    pub(crate) bytes: usize,
}

impl<B: Kernels> std::fmt::Debug for Bf16Weight<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Weight[{}, {}]", self.out, self.in_)
    }
}

impl<B: Kernels> Bf16Weight<B> {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.in_)
    }
    /// Bytes as stored on the backend: `2 out in` on the CPU (and on wgpu's f16 frozen
    /// storage), `4 out in` where a backend keeps frozen weights in f32.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The backend buffer.
    pub fn buf(&self) -> &B::Bf16Buf {
        &self.buf
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl<B: Backend + Kernels<Bf16Buf = Tensor<B>>> Bf16Weight<B> {
    /// A bf16 weight held as a frozen dense tensor of the rounded values, in the backend's
    /// frozen storage (the GPU backends' [`Kernels::Bf16Buf`]): every backend then multiplies
    /// the same weight values as the CPU's bf16 store.
    pub(crate) fn held_frozen(be: &B, data: &[f32], out: usize, in_: usize) -> Result<Self> {
        let rounded: Vec<f32> = data
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let t = be.upload_frozen(&rounded, &[out, in_])?;
        Ok(Bf16Weight {
            bytes: B::stored_bytes(&t),
            buf: t,
            out,
            in_,
        })
    }
    /// The held values as an f32 tensor (through the host: for merging and exporting only).
    pub(crate) fn held_to_f32(&self, be: &B) -> Result<Tensor<B>> {
        be.upload(&be.download(&self.buf)?, &[self.out, self.in_])
    }
}

/// Saved state of a causal attention forward pass, needed by its backward.
pub struct AttentionSaved<B: Kernels> {
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

/// The importance EMAs of one AdaLoRA layer (PEFT `RankAllocator.exp_avg_ipt` and
/// `exp_avg_unc` of its `lora_A`, `lora_B` and `lora_E`), each shaped like its parameter:
/// `[r, in]`, `[out, r]`, `[r, 1]`. Updated by [`Backend::adalora_update_ipt`], scored by
/// [`Backend::adalora_triplet_scores`].
pub struct AdaLoraIpt<B: Kernels> {
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

impl<B: Kernels> Clone for AdaLoraIpt<B> {
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
    cross_entropy_terms(stats).sum()
}

/// Each counted row's cross-entropy, `max + ln(sum of exp(logit - max)) - logit(label)` in f64,
/// from the statistics [`Backend::cross_entropy_stats`] returns (`[K, 3]` flattened), in order:
/// the negated log-probability of each target, which DPO sums per sequence.
pub fn cross_entropy_terms(stats: &[f32]) -> impl Iterator<Item = f64> + '_ {
    stats
        .chunks_exact(3)
        .map(|s| s[0] as f64 + (s[1] as f64).ln() - s[2] as f64)
}

/// Which axis of a 2-D tensor `[n, d]` a vector runs along in [`Backend::mul_vector`] and
/// [`Backend::sum_product`]: one value per column (`[d]`, broadcast over the rows) or one per
/// row (`[n]`, broadcast over the columns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// A vector of `d` values, one per column.
    Cols,
    /// A vector of `n` values, one per row.
    Rows,
}

/// The element-wise non-linearities of the additive methods: bottleneck adapters (the
/// `adapters` library's `non_linearity`: `relu`, `swish`), P-tuning's MLP encoder (ReLU) and
/// prefix tuning's projection (tanh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `max(x, 0)`; its derivative at 0 is taken as 0, as torch does.
    Relu,
    /// `x sigmoid(x)` (SiLU, the `adapters` library's `swish`).
    Silu,
    /// `tanh(x)`.
    Tanh,
}

impl Activation {
    /// The activation of a name as the `adapters` library and PEFT spell it (`relu`,
    /// `swish`/`silu`, `tanh`). Errors: any other name, listing the supported ones.
    pub fn from_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "relu" => Ok(Activation::Relu),
            "swish" | "silu" => Ok(Activation::Silu),
            "tanh" => Ok(Activation::Tanh),
            other => Err(Error::arg(
                "non_linearity",
                format!("`{other}` is not supported; use relu, swish (silu) or tanh"),
            )),
        }
    }
}
