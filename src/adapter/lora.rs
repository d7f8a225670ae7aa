//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) and
//! rsLoRA scaling (Kalajdzievski 2023), as PEFT's `lora.Linear` computes them:
//! `y = x W0^T + b + s (x A^T) B^T` with `s = lora_alpha / r` (or `lora_alpha / sqrt(r)`).

use super::Linear;
use crate::backend::{Backend, GradWants, LowRank, Tensor};
use crate::error::{Error, Result};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

/// LoRA hyperparameters, named as PEFT's `LoraConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r (>= 1).
    pub r: usize,
    /// `lora_alpha`; the scaling is `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub lora_alpha: f32,
    /// rsLoRA: scale by `lora_alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Module names to adapt, e.g. `q_proj`, `down_proj` (PEFT's `target_modules`).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// lorafuse's CLI defaults: r 8, alpha 16, all seven Llama projections.
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            use_rslora: false,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }
}

impl LoraConfig {
    /// The scaling `s` (PEFT `LoraLayer.update_layer`).
    pub fn scaling(&self) -> f32 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f32).sqrt()
        } else {
            self.lora_alpha / self.r as f32
        }
    }
    /// Errors: r = 0, non-finite alpha, or no target module.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::arg("r", "LoRA rank r must be at least 1"));
        }
        if !self.lora_alpha.is_finite() {
            return Err(Error::arg("lora_alpha", "must be finite"));
        }
        if self.target_modules.is_empty() {
            return Err(Error::arg("target_modules", "no module to adapt"));
        }
        Ok(())
    }
}

/// One LoRA adapter on a linear layer: `lora_A [r, in]`, `lora_B [out, r]`, `scaling`.
#[derive(Clone, Debug)]
pub struct LoraLayer<B: Backend> {
    pub lora_a: Tensor<B>,
    pub lora_b: Tensor<B>,
    pub scaling: f32,
}

/// Gradients of one LoRA layer: `(dA [r, in], dB [out, r])`.
pub type LoraGrads<B> = (Tensor<B>, Tensor<B>);

impl<B: Backend> LoraLayer<B> {
    /// PEFT's default init: `lora_A` kaiming-uniform with `a = sqrt(5)` (uniform in
    /// `±1/sqrt(in)`), `lora_B = 0`, so the adapted layer starts equal to the base.
    /// Deterministic for a given `seed` (ChaCha8), not torch's stream.
    pub fn init(
        be: &B,
        in_features: usize,
        out_features: usize,
        cfg: &LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (in_features as f32).sqrt();
        let a: Vec<f32> = (0..cfg.r * in_features)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(LoraLayer {
            lora_a: be.upload(&a, &[cfg.r, in_features])?,
            lora_b: be.zeros(&[out_features, cfg.r])?,
            scaling: cfg.scaling(),
        })
    }

    /// Wraps given factors, checking `lora_A [r, in]` and `lora_B [out, r]` against the base.
    pub fn from_factors(
        base: &Linear<B>,
        lora_a: Tensor<B>,
        lora_b: Tensor<B>,
        scaling: f32,
    ) -> Result<Self> {
        let (out, inp) = base.weight.dims();
        let (r, ain) = lora_a.dims2("lora_A")?;
        if r == 0 || ain != inp {
            return Err(Error::shape(
                "lora_A",
                format!("[r >= 1, {inp}]"),
                lora_a.shape(),
            ));
        }
        lora_b.expect_shape("lora_B", &[out, r])?;
        Ok(LoraLayer {
            lora_a,
            lora_b,
            scaling,
        })
    }

    /// Rank r.
    pub fn r(&self) -> usize {
        self.lora_a.dim(0)
    }

    /// The term this adapter adds: `s (x A^T) B^T`.
    pub fn term(&self) -> LowRank<'_, B> {
        LowRank::lora(&self.lora_a, &self.lora_b, self.scaling)
    }

    /// Fused forward over `base` (dense or NF4): returns `(y [T, out], h [T, r])`.
    pub fn forward(
        &self,
        be: &B,
        base: &Linear<B>,
        x: &Tensor<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let out = base.forward_lowrank(be, x, &self.term())?;
        Ok((out.y, saved_h(out.h)?))
    }

    /// Backward from `dy [T, out]` with the saved `x` and `h`: `(dx, (dA, dB))`.
    pub fn backward(
        &self,
        be: &B,
        base: &Linear<B>,
        x: &Tensor<B>,
        h: &Tensor<B>,
        dy: &Tensor<B>,
    ) -> Result<(Tensor<B>, LoraGrads<B>)> {
        let g = be.linear_lowrank_backward(
            dy,
            x,
            h,
            None,
            base.weight.as_base(),
            &self.term(),
            GradWants::LORA,
        )?;
        Ok((
            g.dx,
            (wanted(g.d_lora_a, "lora_A")?, wanted(g.d_lora_b, "lora_B")?),
        ))
    }

    /// `W0 += s B A` in place (PEFT `merge`). Errors over an NF4 base: merge into
    /// [`Linear::dequantized`] instead.
    pub fn merge(&self, be: &B, base: &mut Linear<B>) -> Result<()> {
        let w = base.weight.dense_mut_or_err("LoRA merge")?;
        be.lowrank_merge(w, &self.term(), 1.0)
    }

    /// `W0 -= s B A` in place (PEFT `unmerge`). Errors over an NF4 base.
    pub fn unmerge(&self, be: &B, base: &mut Linear<B>) -> Result<()> {
        let w = base.weight.dense_mut_or_err("LoRA unmerge")?;
        be.lowrank_merge(w, &self.term(), -1.0)
    }
}

/// The `h` a fused forward with a term always keeps.
pub(crate) fn saved_h<B: Backend>(h: Option<Tensor<B>>) -> Result<Tensor<B>> {
    h.ok_or_else(|| Error::arg("h", "the fused forward kept no h"))
}

/// A gradient the backward was asked for.
pub(crate) fn wanted<B: Backend>(g: Option<Tensor<B>>, what: &str) -> Result<Tensor<B>> {
    g.ok_or_else(|| {
        Error::arg(
            "grads",
            format!("the backward returned no gradient of {what}"),
        )
    })
}
