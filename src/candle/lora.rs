//! [`LoraLinear`]: LoRA and rsLoRA (QLoRA over an NF4 [`FrozenLinear`]).

use candle_core::Module;
use candle_nn::VarBuilder;

use super::frozen::{FrozenLinear, check_lora_config, check_vb, fused, lora_factors, merged_with};
use super::op::{CTensor, Method, host_tensor};
use crate::adapter::LoraConfig;
use crate::backend::LowRank;

/// A LoRA (or rsLoRA) layer over a frozen base (PEFT `lora.Linear`; QLoRA over an NF4
/// base): `y = x W0^T + bias + s (x A^T) B^T`, `s = lora_alpha / r` (`/ sqrt(r)` with rsLoRA),
/// `lora_A [r, in]`, `lora_B [out, r]` trainable, named `lora_A.weight` / `lora_B.weight` in
/// the VarBuilder (PEFT's keys under the module path).
#[derive(Clone, Debug)]
pub struct LoraLinear {
    pub(super) base: FrozenLinear,
    /// `lora_A [r, in]`.
    pub lora_a: CTensor,
    /// `lora_B [out, r]`.
    pub lora_b: CTensor,
    config: LoraConfig,
}

impl LoraLinear {
    /// A LoRA layer over a copy of `linear` (see [`LoraLinear::new`]).
    pub fn from_linear(
        linear: &candle_nn::Linear,
        config: &LoraConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Self::new(FrozenLinear::from_linear(linear)?, config, vb)
    }

    /// A LoRA layer over `base` with `lora_A`, `lora_B` from `vb` (PEFT's init where `vb`
    /// creates them). Errors: r = 0, a non-finite alpha, a VarBuilder that is not f32 on the
    /// CPU, or one holding tensors of other shapes.
    pub fn new(
        base: FrozenLinear,
        config: &LoraConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        check_lora_config(config)?;
        check_vb(&vb)?;
        let (lora_a, lora_b) = lora_factors(&base, config.r, &vb)?;
        Ok(LoraLinear {
            base,
            lora_a,
            lora_b,
            config: config.clone(),
        })
    }

    /// The frozen base.
    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }
    /// r, lora_alpha, use_rslora.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }
    /// `s`.
    pub fn scaling(&self) -> f32 {
        self.config.scaling()
    }

    /// PEFT's `merge_and_unload` for this layer: a `candle_nn::Linear` with `W0 + s B A`
    /// (an NF4 base is dequantized first) and the bias.
    pub fn merged(&self) -> candle_core::Result<candle_nn::Linear> {
        let (a, b) = (
            host_tensor(&self.lora_a, "lora_A")?,
            host_tensor(&self.lora_b, "lora_B")?,
        );
        merged_with(&self.base, &LowRank::lora(&a, &b, self.scaling()))
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &CTensor) -> candle_core::Result<CTensor> {
        let method = Method::Lora {
            scale: self.scaling(),
        };
        fused(
            x,
            self.base.frozen(),
            method,
            &self.lora_a,
            &self.lora_b,
            "LoraLinear",
        )
    }
}
