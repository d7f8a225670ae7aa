//! Bias tuning. BitFit (Ben Zaken et al. 2022, sec. 2) trains only a model's bias terms; on
//! bias-free layers such as Llama's projections PEFT's BEFT adds one: `y = x W^T + b0 + b`
//! with `beft_bias [1, out]` initialised to zero. PEFT merges it only into a layer that has a
//! bias of its own.

use super::Linear;
use crate::backend::{Axis, Backend, Tensor};
use crate::error::{Error, Result};

/// The trained bias of one layer, `[out]` (PEFT stores `[1, out]`).
#[derive(Clone, Debug)]
pub struct BeftLayer<B: Backend> {
    pub beft_bias: Tensor<B>,
}

impl<B: Backend> BeftLayer<B> {
    /// PEFT's init: zeros `[out]`.
    pub fn init(be: &B, base: &Linear<B>) -> Result<Self> {
        Ok(BeftLayer {
            beft_bias: be.zeros(&[base.out_features()])?,
        })
    }

    /// From a bias `[out]` or `[1, out]`. Errors: a length other than `out`.
    pub fn from_bias(bias: Tensor<B>, base: &Linear<B>) -> Result<Self> {
        let n = bias.len();
        let bias = if bias.shape().len() == 1 {
            bias
        } else {
            bias.into_shape(&[n])?
        };
        bias.expect_shape("beft_bias", &[base.out_features()])?;
        Ok(BeftLayer { beft_bias: bias })
    }

    /// `y = x W^T + b0 + b` for x `[T, in]`.
    pub fn forward(&self, be: &B, base: &Linear<B>, x: &Tensor<B>) -> Result<Tensor<B>> {
        let bias = match &base.bias {
            Some(b0) => {
                let mut b = b0.clone();
                be.axpy(&mut b, 1.0, &self.beft_bias)?;
                b
            }
            None => self.beft_bias.clone(),
        };
        Ok(be
            .linear_lowrank(x, base.weight.as_base(), Some(&bias), None)?
            .y)
    }

    /// `(dx = dy W, db = sum_T dy)` from dy `[T, out]`.
    pub fn backward(
        &self,
        be: &B,
        base: &Linear<B>,
        dy: &Tensor<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let db = be.sum_product(dy, None, Axis::Cols)?;
        Ok((base.backward_input(be, dy)?, db))
    }

    /// Adds the bias into the layer's own (`sign` 1 merges, -1 unmerges). Errors: a layer
    /// without a bias, as PEFT refuses it (there is nothing to merge into; keep the adapter).
    pub fn merge_sign(&self, be: &B, base: &mut Linear<B>, sign: f32) -> Result<()> {
        match &mut base.bias {
            Some(b) => be.axpy(b, sign, &self.beft_bias),
            None => Err(Error::arg(
                "beft_bias",
                "bias tuning (BEFT) cannot be merged into a layer without a bias (Llama's \
                 projections have none): keep the adapter, or export the model with the bias \
                 as a separate tensor",
            )),
        }
    }
}
