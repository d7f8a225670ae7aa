//! [`AdaLoraLinear`]: AdaLoRA's SVD-form layer.

use candle_core::{DType, Module};
use candle_nn::{Init, VarBuilder};

use super::frozen::{FrozenLinear, assign, check_vb, fused, merged_with};
use super::op::{CTensor, Method, host_tensor, lf};
use crate::Cpu;
use crate::adapter::AdaLoraLayer;
use crate::backend::LowRank;
use crate::backend::check::adalora_factor;

/// An AdaLoRA layer (PEFT `adalora.SVDLinear`, Zhang et al. 2023): `y = x W0^T + bias +
/// c (x (A ⊙ E)^T) B^T` with `c = scaling / (ranknum + 1e-5)`, `scaling = lora_alpha` (r when
/// `lora_alpha <= 0`), `ranknum = init_r`; `lora_A [r, in]`, `lora_B [out, r]`, `lora_E [r, 1]`
/// trainable. A masked rank has `E = 0` ([`AdaLoraLinear::apply_rank_mask`]).
#[derive(Clone, Debug)]
pub struct AdaLoraLinear {
    pub(super) base: FrozenLinear,
    /// `lora_A [r, in]`.
    pub lora_a: CTensor,
    /// `lora_B [out, r]`.
    pub lora_b: CTensor,
    /// `lora_E [r, 1]`.
    pub lora_e: CTensor,
    lora_alpha: f32,
}

impl AdaLoraLinear {
    /// An AdaLoRA layer over a copy of `linear` (see [`AdaLoraLinear::new`]).
    pub fn from_linear(
        linear: &candle_nn::Linear,
        init_r: usize,
        lora_alpha: f32,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Self::new(FrozenLinear::from_linear(linear)?, init_r, lora_alpha, vb)
    }

    /// PEFT's init: `lora_E = 0`, `lora_A` and `lora_B` normal(0, 0.02), so the layer starts
    /// equal to the base. Errors: `init_r = 0`, a non-finite alpha, the VarBuilder as
    /// [`LoraLinear::new`].
    pub fn new(
        base: FrozenLinear,
        init_r: usize,
        lora_alpha: f32,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if init_r == 0 || !lora_alpha.is_finite() {
            candle_core::bail!(
                "lorafuse AdaLoraLinear: needs init_r >= 1 and a finite lora_alpha, got {init_r}, \
                 {lora_alpha}"
            );
        }
        check_vb(&vb)?;
        let normal = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let a = vb.get_with_hints((init_r, base.in_features()), "lora_A", normal)?;
        let b = vb.get_with_hints((base.out_features(), init_r), "lora_B", normal)?;
        let e = vb.get_with_hints((init_r, 1), "lora_E", Init::Const(0.0))?;
        Ok(AdaLoraLinear {
            base,
            lora_a: a,
            lora_b: b,
            lora_e: e,
            lora_alpha,
        })
    }

    /// The frozen base.
    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }
    /// `init_r` (= PEFT's `ranknum`).
    pub fn r(&self) -> usize {
        self.lora_a.dim(0).unwrap_or(0)
    }
    /// `lora_alpha` as given.
    pub fn lora_alpha(&self) -> f32 {
        self.lora_alpha
    }
    /// The factor `c = scaling / (ranknum + 1e-5)`.
    pub fn factor(&self) -> candle_core::Result<f32> {
        let r = self.r();
        adalora_factor(
            AdaLoraLayer::<Cpu>::scaling_for(self.lora_alpha, r),
            r as f32,
        )
        .map_err(lf)
    }

    /// Zeroes `lora_E` of the ranks with `keep[i] = false` in place (PEFT's `mask_to_budget`;
    /// the gradient of a masked E is not zeroed, as in PEFT). Errors: `keep.len() != r`.
    pub fn apply_rank_mask(&self, keep: &[bool]) -> candle_core::Result<()> {
        let r = self.r();
        if keep.len() != r {
            candle_core::bail!(
                "lorafuse AdaLoraLinear: {} mask entries for rank {r}",
                keep.len()
            );
        }
        let mask: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let mask = CTensor::from_vec(mask, (r, 1), self.lora_e.device())?;
        assign(&self.lora_e, &self.lora_e.mul(&mask)?)
    }

    /// PEFT's orthogonal regularizer for this layer: `||A A^T - I||_F + ||B^T B - I||_F`
    /// (differentiable; PEFT adds `orth_reg_weight` times the mean over the A and B matrices
    /// of a model to the loss).
    pub fn orth_regularization(&self) -> candle_core::Result<CTensor> {
        let r = self.r();
        let eye = CTensor::eye(r, DType::F32, self.lora_a.device())?;
        let fro =
            |m: CTensor| -> candle_core::Result<CTensor> { (m - &eye)?.sqr()?.sum_all()?.sqrt() };
        let a = fro(self.lora_a.matmul(&self.lora_a.t()?)?)?;
        let b = fro(self.lora_b.t()?.matmul(&self.lora_b)?)?;
        a + b
    }

    /// PEFT's merge: `W0 + c B (A ⊙ E)` as a `candle_nn::Linear`.
    pub fn merged(&self) -> candle_core::Result<candle_nn::Linear> {
        let (a, b, e) = (
            host_tensor(&self.lora_a, "lora_A")?,
            host_tensor(&self.lora_b, "lora_B")?,
            host_tensor(&self.lora_e, "lora_E")?,
        );
        merged_with(&self.base, &LowRank::adalora(&a, &b, &e, self.factor()?))
    }
}

impl Module for AdaLoraLinear {
    fn forward(&self, x: &CTensor) -> candle_core::Result<CTensor> {
        let method = Method::AdaLora {
            factor: self.factor()?,
        };
        let packed = CTensor::cat(&[&self.lora_a, &self.lora_e], 1)?;
        fused(
            x,
            self.base.frozen(),
            method,
            &packed,
            &self.lora_b,
            "AdaLoraLinear",
        )
    }
}
