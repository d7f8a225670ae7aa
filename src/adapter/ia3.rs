//! IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
//! In-Context Learning", sec. 3.3), as PEFT's `ia3.Linear` computes it: a learned vector `l`
//! rescales a frozen projection, on its output for attention projections
//! (`y = (x W^T + b) ⊙ l`, `ia3_l [out, 1]`) or on its input for feed-forward ones
//! (`y = (x ⊙ l) W^T + b`, `ia3_l [1, in]`). PEFT initialises `l` to ones.

use super::Linear;
use crate::backend::{Axis, Backend, Tensor};
use crate::error::{Error, Result};

/// One IA3 vector on a linear layer: `ia3_l` (`[in]` for a feed-forward layer, `[out]`
/// otherwise; PEFT stores it as `[1, in]` / `[out, 1]`).
#[derive(Clone, Debug)]
pub struct Ia3Layer<B: Backend> {
    pub ia3_l: Tensor<B>,
    /// PEFT's `is_feedforward`: the vector scales the layer's input, not its output.
    pub feedforward: bool,
}

/// What an IA3 forward keeps: the unscaled output `x W^T + b` (output scaling only).
pub struct Ia3Saved<B: Backend>(pub Option<Tensor<B>>);

impl<B: Backend> Ia3Layer<B> {
    /// PEFT's init (`init_ia3_weights=True`): ones, sized for `base`.
    pub fn init(be: &B, base: &Linear<B>, feedforward: bool) -> Result<Self> {
        let n = if feedforward {
            base.in_features()
        } else {
            base.out_features()
        };
        Self::from_vector(be.upload(&vec![1.0; n], &[n])?, base, feedforward)
    }

    /// From a vector `[n]` (or PEFT's `[1, in]` / `[out, 1]`, reshaped). Errors: a length
    /// that is not `in` (feed-forward) or `out`.
    pub fn from_vector(ia3_l: Tensor<B>, base: &Linear<B>, feedforward: bool) -> Result<Self> {
        let n = if feedforward {
            base.in_features()
        } else {
            base.out_features()
        };
        let ia3_l = if ia3_l.shape().len() == 1 {
            ia3_l
        } else {
            {
                let n = ia3_l.len();
                ia3_l.into_shape(&[n])?
            }
        };
        ia3_l.expect_shape("ia3_l", &[n])?;
        Ok(Ia3Layer { ia3_l, feedforward })
    }

    /// The shape PEFT saves `ia3_l` with: `[1, in]` (feed-forward) or `[out, 1]`.
    pub fn peft_shape(&self) -> [usize; 2] {
        if self.feedforward {
            [1, self.ia3_l.len()]
        } else {
            [self.ia3_l.len(), 1]
        }
    }

    /// `y [T, out]` for x `[T, in]`.
    pub fn forward(
        &self,
        be: &B,
        base: &Linear<B>,
        x: &Tensor<B>,
    ) -> Result<(Tensor<B>, Ia3Saved<B>)> {
        if self.feedforward {
            let xs = be.mul_vector(x, &self.ia3_l, Axis::Cols)?;
            Ok((base.forward(be, &xs)?, Ia3Saved(None)))
        } else {
            let z = base.forward(be, x)?;
            let y = be.mul_vector(&z, &self.ia3_l, Axis::Cols)?;
            Ok((y, Ia3Saved(Some(z))))
        }
    }

    /// `(dx [T, in], d ia3_l [n])` from dy `[T, out]`: for input scaling
    /// `dl = sum_T(x ⊙ (dy W))`, `dx = (dy W) ⊙ l`; for output scaling `dl = sum_T(dy ⊙ z)`,
    /// `dx = (dy ⊙ l) W`.
    pub fn backward(
        &self,
        be: &B,
        base: &Linear<B>,
        x: &Tensor<B>,
        saved: &Ia3Saved<B>,
        dy: &Tensor<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        if self.feedforward {
            let dxs = base.backward_input(be, dy)?;
            let dl = be.sum_product(&dxs, Some(x), Axis::Cols)?;
            Ok((be.mul_vector(&dxs, &self.ia3_l, Axis::Cols)?, dl))
        } else {
            let z = saved
                .0
                .as_ref()
                .ok_or_else(|| Error::arg("saved", "IA3 output scaling needs its forward's z"))?;
            let dl = be.sum_product(dy, Some(z), Axis::Cols)?;
            let dz = be.mul_vector(dy, &self.ia3_l, Axis::Cols)?;
            Ok((base.backward_input(be, &dz)?, dl))
        }
    }

    /// PEFT `merge`: W's columns (feed-forward) or rows and the bias (output scaling) times l.
    /// Errors: an NF4 base (dequantize first).
    pub fn merge(&self, be: &B, base: &mut Linear<B>) -> Result<()> {
        self.apply(be, base, &self.ia3_l)
    }

    /// PEFT `unmerge`: divides by `l + 1e-8` as PEFT does. Errors: an NF4 base.
    pub fn unmerge(&self, be: &B, base: &mut Linear<B>) -> Result<()> {
        let inv: Vec<f32> = be
            .download(&self.ia3_l)?
            .iter()
            .map(|&v| 1.0 / (v + 1e-8))
            .collect();
        let inv = be.upload(&inv, &[inv.len()])?;
        self.apply(be, base, &inv)
    }

    fn apply(&self, be: &B, base: &mut Linear<B>, v: &Tensor<B>) -> Result<()> {
        let w = base.weight.dense_mut_or_err("IA3 merge")?;
        let axis = if self.feedforward {
            Axis::Cols
        } else {
            Axis::Rows
        };
        *w = be.mul_vector(w, v, axis)?;
        if !self.feedforward
            && let Some(b) = &mut base.bias
        {
            let n = b.len();
            let b2 = b.clone().into_shape(&[1, n])?;
            *b = be.mul_vector(&b2, v, Axis::Cols)?.into_shape(&[n])?;
        }
        Ok(())
    }
}
