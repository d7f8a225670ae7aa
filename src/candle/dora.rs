//! [`DoraLinear`]: DoRA over a [`LoraLinear`]'s factors.

use std::sync::Arc;

use candle_core::Module;
use candle_nn::{Init, VarBuilder};

use super::frozen::{FrozenLinear, assign, fused, merged_by};
use super::lora::LoraLinear;
use super::op::{CTensor, Method, host_tensor, lf, to_candle};
use crate::Cpu;
use crate::adapter::LoraConfig;
use crate::backend::{Backend, LowRank};

/// A DoRA layer (PEFT `lora.Linear` with `use_dora=True`, Liu et al. 2024):
/// `y = (m / n) ⊙ (x W0^T + s (x A^T) B^T) + bias` with `n = ||W0 + s B A||_row` detached
/// (paper sec. 4.3), `m = lora_magnitude_vector [out]` trainable with A and B.
#[derive(Clone, Debug)]
pub struct DoraLinear {
    pub(super) lora: LoraLinear,
    /// `lora_magnitude_vector [out]`.
    pub lora_magnitude_vector: CTensor,
    /// `||W0||_row^2 [out]`, computed once.
    row_sq: Arc<crate::Tensor<Cpu>>,
}

impl DoraLinear {
    /// A DoRA layer over a copy of `linear` (see [`DoraLinear::new`]).
    pub fn from_linear(
        linear: &candle_nn::Linear,
        config: &LoraConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Self::new(FrozenLinear::from_linear(linear)?, config, vb)
    }

    /// A DoRA layer over `base`: A and B as [`LoraLinear::new`], and where `vb` creates the
    /// magnitude as a `Var`, PEFT's creation-time value `m = ||W0 + s B A||_row` of those
    /// factors (`||W0||_row` for a fresh `B = 0`); a magnitude `vb` only reads (pretrained) is
    /// kept. Errors: as [`LoraLinear::new`].
    pub fn new(
        base: FrozenLinear,
        config: &LoraConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let lora = LoraLinear::new(base, config, vb.clone())?;
        let row_sq = Cpu
            .row_sq_norms(lora.base.base.weight.as_base())
            .map_err(lf)?;
        let m = vb.get_with_hints(
            lora.base.out_features(),
            "lora_magnitude_vector",
            Init::Const(1.0),
        )?;
        let layer = DoraLinear {
            lora,
            lora_magnitude_vector: m,
            row_sq: Arc::new(row_sq),
        };
        if layer.lora_magnitude_vector.is_variable() {
            assign(&layer.lora_magnitude_vector, &layer.weight_norm()?)?;
        }
        Ok(layer)
    }

    /// The LoRA part (base, `lora_A`, `lora_B`, scaling).
    pub fn lora(&self) -> &LoraLinear {
        &self.lora
    }

    /// `n = ||W0 + s B A||_row [out]` for the current factors (detached).
    pub fn weight_norm(&self) -> candle_core::Result<CTensor> {
        let (a, b) = (
            host_tensor(&self.lora.lora_a, "lora_A")?,
            host_tensor(&self.lora.lora_b, "lora_B")?,
        );
        let n = Cpu
            .lowrank_row_norms(
                self.lora.base.base.weight.as_base(),
                &self.row_sq,
                &LowRank::lora(&a, &b, self.lora.scaling()),
            )
            .map_err(lf)?;
        to_candle(n)
    }

    /// PEFT's merge: `(m / n)[:, None] ⊙ (W0 + s B A)` (n of the merged rows) as a
    /// `candle_nn::Linear`, with the unscaled bias.
    pub fn merged(&self) -> candle_core::Result<candle_nn::Linear> {
        let (a, b, m) = (
            host_tensor(&self.lora.lora_a, "lora_A")?,
            host_tensor(&self.lora.lora_b, "lora_B")?,
            host_tensor(&self.lora_magnitude_vector, "lora_magnitude_vector")?,
        );
        let term = LowRank::dora(&a, &b, self.lora.scaling(), &m, None);
        merged_by(&self.lora.base, |w| {
            Cpu.lowrank_merge_with_norm(w, &self.row_sq, &term)
                .map(drop)
        })
    }
}

impl Module for DoraLinear {
    fn forward(&self, x: &CTensor) -> candle_core::Result<CTensor> {
        let mut frozen = self.lora.base.frozen();
        frozen.row_sq = Some(self.row_sq.clone());
        let method = Method::Dora {
            scale: self.lora.scaling(),
        };
        let packed = CTensor::cat(
            &[&self.lora.lora_b, &self.lora_magnitude_vector.unsqueeze(1)?],
            1,
        )?;
        fused(x, frozen, method, &self.lora.lora_a, &packed, "DoraLinear")
    }
}
