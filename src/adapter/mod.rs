//! Adapter math written once against [`Backend`]: forward, backward, merge and unmerge.
//!
//! A base layer is a [`Linear`] whose weight is a [`BaseWeight`]; adapters wrap it without
//! touching it (PEFT's injection model). Every adapter describes its term as one
//! [`LowRank`] and calls the backend's one fused op over the base
//! ([`Backend::linear_lowrank`] and its backward and merge), so each method is written once
//! and runs over every base format: QLoRA, QDoRA, QVeRA and QAdaLoRA are their methods over an
//! NF4 base, with no code of their own.

pub mod adalora;
pub mod beft;
pub mod bench;
pub mod bottleneck;
pub mod device_rank_allocator;
pub mod dora;
pub mod ia3;
pub mod ln_tuning;
pub mod lora;
pub mod method;
pub mod mlp;
pub mod rank_allocator;
pub mod rank_pattern;
pub mod soft_prompt;
pub mod vera;

pub use adalora::{AdaLoraGrads, AdaLoraLayer};
pub use beft::BeftLayer;
pub use bottleneck::{
    AdapterFusion, BnAdapter, BnLayer, Bottleneck, BottleneckConfig, BottleneckKind, FuseLayer,
};
pub use dora::{DoraGrads, DoraLayer, DoraLayerSaved, DoraSaved};
pub use ia3::{Ia3Layer, Ia3Saved};
pub use ln_tuning::LnTuning;
pub use lora::{LoraConfig, LoraLayer};
pub use method::{Adapter, AdapterSaved, MethodKind};
pub use mlp::Mlp;
pub use soft_prompt::{PromptMethod, SoftPrompt};
pub use vera::{VeraLayer, VeraShared};

use crate::backend::{Backend, Base, Bf16Weight, LowRank, Nf4Weight, Tensor};
use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Tensor;

/// A frozen base weight `[out, in]`: dense (f32, or narrower where the backend stores frozen
/// weights so, see [`Backend::freeze`]), NF4-quantized (QLoRA), or bf16 (`--compute-dtype
/// bf16`).
///
/// Every adapter works over both: the backend's fused op takes either ([`Base`]). An NF4 base
/// is never dequantized whole by the forward or the backward; see [`Linear::dequantized`] for
/// merging.
#[derive(Clone, Debug)]
pub enum BaseWeight<B: Backend> {
    /// Plain `[out, in]` weight.
    Dense(Tensor<B>),
    /// bitsandbytes NF4 `[out, in]` (with or without double quantization), dequantized tile by
    /// tile inside the matmuls.
    Nf4(Nf4Weight<B>),
    /// bf16 `[out, in]` (`--compute-dtype bf16`), widened to f32 tile by tile inside the
    /// matmuls (see [`Bf16Weight`]).
    Bf16(Bf16Weight<B>),
}

impl<B: Backend> BaseWeight<B> {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            BaseWeight::Dense(w) => (w.dim(0), w.dim(1)),
            BaseWeight::Nf4(w) => w.dims(),
            BaseWeight::Bf16(w) => w.dims(),
        }
    }

    /// Bytes the weight occupies on its backend: `4 out in` for dense f32 (`2 out in` for a
    /// frozen weight the backend stores as f16, [`Backend::stored_bytes`]); for NF4 the packed
    /// indices plus the absmax statistics ([`Nf4Tensor::bytes`]), about `0.5 + 4 / blocksize`
    /// bytes per parameter (0.5 + ~0.016 with double quant at blocksize 64).
    pub fn bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(w) => B::stored_bytes(w),
            BaseWeight::Nf4(w) => w.bytes(),
            BaseWeight::Bf16(w) => w.bytes(),
        }
    }

    /// Whether this is a quantized (NF4) weight.
    pub fn is_quantized(&self) -> bool {
        matches!(self, BaseWeight::Nf4(_))
    }

    /// The weight as the backend's fused op reads it.
    pub fn as_base(&self) -> Base<'_, B> {
        match self {
            BaseWeight::Dense(w) => Base::Dense(w),
            BaseWeight::Nf4(w) => Base::Nf4(w),
            BaseWeight::Bf16(w) => Base::Bf16(w),
        }
    }

    /// The dense weight, or an error naming `what` needs it (e.g. a merge over an NF4 base).
    pub fn dense_or_err(&self, what: &str) -> Result<&Tensor<B>> {
        match self {
            BaseWeight::Dense(w) => Ok(w),
            w => Err(not_dense(what, w)),
        }
    }

    /// [`BaseWeight::dense_or_err`], mutably.
    pub fn dense_mut_or_err(&mut self, what: &str) -> Result<&mut Tensor<B>> {
        match self {
            BaseWeight::Dense(w) => Ok(w),
            w => Err(not_dense(what, w)),
        }
    }
}

/// The error of an op that needs a dense base weight, naming the format `w` has.
fn not_dense<B: Backend>(what: &str, w: &BaseWeight<B>) -> Error {
    let (format, way) = match w {
        BaseWeight::Nf4(_) => ("NF4", "or re-quantize the merged result"),
        _ => ("bf16", "or train with --compute-dtype f32"),
    };
    Error::arg(
        "base",
        format!(
            "{what} needs a dense base weight but it is {format}; widen it first \
             (Linear::dequantized), {way}"
        ),
    )
}

/// An `nn.Linear`-shaped layer: `y = x W^T + bias`, weight `[out, in]`, bias `[out]`.
#[derive(Clone, Debug)]
pub struct Linear<B: Backend> {
    pub weight: BaseWeight<B>,
    pub bias: Option<Tensor<B>>,
}

impl<B: Backend> Linear<B> {
    /// A dense layer without bias. Errors: `weight` is not 2-D.
    pub fn dense(weight: Tensor<B>) -> Result<Self> {
        weight.dims2("weight")?;
        Ok(Linear {
            weight: BaseWeight::Dense(weight),
            bias: None,
        })
    }
    /// An NF4 (QLoRA) layer without bias, uploading `weight` (shape `[out, in]`, e.g. from
    /// [`crate::quant::quantize_nf4`] or a bitsandbytes checkpoint). Errors: not 2-D.
    pub fn nf4(be: &B, weight: &Nf4Tensor) -> Result<Self> {
        Ok(Linear {
            weight: BaseWeight::Nf4(be.upload_nf4(weight)?),
            bias: None,
        })
    }
    /// `in_features`.
    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }
    /// `out_features`.
    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }
    /// Bytes of the base weight on its backend (the bias not counted); see
    /// [`BaseWeight::bytes`].
    pub fn bytes(&self) -> usize {
        self.weight.bytes()
    }
    /// `y = x W^T + bias` for x `[T, in]`.
    pub fn forward(&self, be: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        Ok(be
            .linear_lowrank(x, self.weight.as_base(), self.bias.as_ref(), None)?
            .y)
    }
    /// `dx = dy W` for dy `[T, out]` (the base is frozen: no weight gradient).
    pub fn backward_input(&self, be: &B, dy: &Tensor<B>) -> Result<Tensor<B>> {
        be.backward_input(dy, self.weight.as_base(), None, None)?
            .0
            .ok_or_else(|| Error::arg("dx", "backward_input without acc returned no tensor"))
    }
    /// `y = x W^T + bias + term(x)` (the adapter's fused forward): `(y, h = x A^T, z)`, `z`
    /// only under a column scale.
    pub fn forward_lowrank(
        &self,
        be: &B,
        x: &Tensor<B>,
        term: &LowRank<'_, B>,
    ) -> Result<crate::backend::LowRankOut<B>> {
        be.linear_lowrank(x, self.weight.as_base(), self.bias.as_ref(), Some(term))
    }
    /// A dense copy of this layer: itself for a dense base; for a bf16 base its values in f32;
    /// for an NF4 base the dequantized
    /// weight (bitsandbytes' `dequantize_4bit`, bit for bit). This materializes the f32 weight:
    /// use it to merge an adapter into a quantized base (merge, then keep f32/bf16 or
    /// re-quantize), never in training.
    pub fn dequantized(&self, be: &B) -> Result<Self> {
        let weight = match &self.weight {
            BaseWeight::Dense(w) => w.clone(),
            BaseWeight::Nf4(w) => be.nf4_dequantize(w)?,
            BaseWeight::Bf16(w) => be.bf16_to_f32(w)?,
        };
        Ok(Linear {
            weight: BaseWeight::Dense(weight),
            bias: self.bias.clone(),
        })
    }
}
