//! Adapter math written once against [`Backend`]: forward, backward, merge and unmerge.
//!
//! A base layer is a [`Linear`] whose weight is a [`BaseWeight`]; adapters wrap it without
//! touching it (PEFT's injection model), so the same adapter code runs over every base format.

pub mod adalora;
pub mod dora;
pub mod lora;
pub mod rank_allocator;
pub mod method;
pub mod vera;

pub use adalora::AdaLoraLayer;
pub use dora::{DoraLayer, DoraLayerSaved};
pub use lora::{LoraConfig, LoraLayer};
pub use method::{Adapter, AdapterSaved, MethodKind};
pub use vera::{VeraLayer, VeraShared};

use crate::backend::{Backend, Tensor};
use crate::error::Result;

/// A frozen base weight `[out, in]`.
///
/// Dense f32 storage today; the NF4 (QLoRA) variant joins this enum so that every adapter
/// works over both without duplicated code.
#[derive(Clone, Debug)]
pub enum BaseWeight<B: Backend> {
    /// Plain `[out, in]` weight.
    Dense(Tensor<B>),
}

impl<B: Backend> BaseWeight<B> {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            BaseWeight::Dense(w) => (w.dim(0), w.dim(1)),
        }
    }
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
    /// `in_features`.
    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }
    /// `out_features`.
    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }
    /// `y = x W^T + bias` for x `[T, in]`.
    pub fn forward(&self, be: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        match &self.weight {
            BaseWeight::Dense(w) => be.linear(x, w, self.bias.as_ref()),
        }
    }
    /// `dx = dy W` for dy `[T, out]` (the base is frozen: no weight gradient).
    pub fn backward_input(&self, be: &B, dy: &Tensor<B>) -> Result<Tensor<B>> {
        match &self.weight {
            BaseWeight::Dense(w) => Ok(be
                .linear_backward_input(dy, w, None)?
                .expect("linear_backward_input without acc returns dx")),
        }
    }
}
