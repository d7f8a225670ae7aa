//! [`AdaptedLinear`]: one projection of a model, frozen or adapted by any of the methods.

use candle_core::Module;

use super::adalora::AdaLoraLinear;
use super::dora::DoraLinear;
use super::frozen::FrozenLinear;
use super::lora::LoraLinear;
use super::op::CTensor;
use super::vera::VeraLinear;

/// A projection of a model: frozen, or adapted by one of the methods (what
/// [`super::save_peft`] and [`super::load_peft`] walk).
#[derive(Clone, Debug)]
pub enum AdaptedLinear {
    Frozen(FrozenLinear),
    Lora(LoraLinear),
    Dora(DoraLinear),
    Vera(VeraLinear),
    AdaLora(AdaLoraLinear),
}

impl AdaptedLinear {
    /// The frozen base.
    pub fn base(&self) -> &FrozenLinear {
        match self {
            AdaptedLinear::Frozen(b) => b,
            AdaptedLinear::Lora(l) => &l.base,
            AdaptedLinear::Dora(l) => &l.lora.base,
            AdaptedLinear::Vera(l) => &l.base,
            AdaptedLinear::AdaLora(l) => &l.base,
        }
    }

    /// The trainable tensors under their PEFT names (`lora_A.weight`, ...; none when frozen).
    pub fn params(&self) -> Vec<(&'static str, &CTensor)> {
        match self {
            AdaptedLinear::Frozen(_) => vec![],
            AdaptedLinear::Lora(l) => {
                vec![("lora_A.weight", &l.lora_a), ("lora_B.weight", &l.lora_b)]
            }
            AdaptedLinear::Dora(l) => vec![
                ("lora_A.weight", &l.lora.lora_a),
                ("lora_B.weight", &l.lora.lora_b),
                ("lora_magnitude_vector", &l.lora_magnitude_vector),
            ],
            AdaptedLinear::Vera(l) => vec![
                ("vera_lambda_b", &l.vera_lambda_b),
                ("vera_lambda_d", &l.vera_lambda_d),
            ],
            AdaptedLinear::AdaLora(l) => vec![
                ("lora_A", &l.lora_a),
                ("lora_B", &l.lora_b),
                ("lora_E", &l.lora_e),
            ],
        }
    }

    /// The merged layer (the base itself when frozen), as `candle_nn::Linear`.
    pub fn merged(&self) -> candle_core::Result<candle_nn::Linear> {
        match self {
            AdaptedLinear::Frozen(b) => {
                let (w, bias) = b.to_candle()?;
                Ok(candle_nn::Linear::new(w, bias))
            }
            AdaptedLinear::Lora(l) => l.merged(),
            AdaptedLinear::Dora(l) => l.merged(),
            AdaptedLinear::Vera(l) => l.merged(),
            AdaptedLinear::AdaLora(l) => l.merged(),
        }
    }
}

impl Module for AdaptedLinear {
    fn forward(&self, x: &CTensor) -> candle_core::Result<CTensor> {
        match self {
            AdaptedLinear::Frozen(l) => l.forward(x),
            AdaptedLinear::Lora(l) => l.forward(x),
            AdaptedLinear::Dora(l) => l.forward(x),
            AdaptedLinear::Vera(l) => l.forward(x),
            AdaptedLinear::AdaLora(l) => l.forward(x),
        }
    }
}

impl From<FrozenLinear> for AdaptedLinear {
    fn from(l: FrozenLinear) -> Self {
        AdaptedLinear::Frozen(l)
    }
}
impl From<LoraLinear> for AdaptedLinear {
    fn from(l: LoraLinear) -> Self {
        AdaptedLinear::Lora(l)
    }
}
impl From<DoraLinear> for AdaptedLinear {
    fn from(l: DoraLinear) -> Self {
        AdaptedLinear::Dora(l)
    }
}
impl From<VeraLinear> for AdaptedLinear {
    fn from(l: VeraLinear) -> Self {
        AdaptedLinear::Vera(l)
    }
}
impl From<AdaLoraLinear> for AdaptedLinear {
    fn from(l: AdaLoraLinear) -> Self {
        AdaptedLinear::AdaLora(l)
    }
}
