//! lorafuse's fused adapter layers as candle modules (feature `candle`; candle-core and
//! candle-nn 0.11).
//!
//! Each layer is a [`candle_nn::Module`] over a frozen base held once in lorafuse's storage
//! ([`FrozenLinear`]: f32, or bitsandbytes NF4 for QLoRA), built from an existing
//! `candle_nn::Linear` with `from_linear(&linear, config, vb)`. Its forward is one candle
//! custom op running lorafuse's fused kernel (`y = x W0^T + bias + term(x)` in one product,
//! the base never copied per call), and the op's `bwd` gives candle's autograd the gradients
//! of lorafuse's fused backward. The trainable tensors come from the `VarBuilder` under PEFT's
//! names (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`, `vera_lambda_d`, ...), so
//! a `VarMap`-backed builder makes them `Var`s that candle-nn's optimizers train, and
//! [`save_peft`] / [`load_peft`] read and write PEFT's adapter folders.
//!
//! - [`LoraLinear`]: LoRA / rsLoRA (PEFT `lora.Linear`), QLoRA over [`FrozenLinear::nf4`];
//! - [`DoraLinear`]: DoRA (`use_dora=True`), the weight norm detached as in PEFT;
//! - [`VeraLinear`] over shared [`VeraProjections`]: VeRA;
//! - [`AdaLoraLinear`]: AdaLoRA's SVD-form layer with rank masking;
//! - [`Llama`]: a Llama causal LM in candle whose projections take these layers (loaded from
//!   transformers weights, or from the model lorafuse fetches: [`load_llama`]).
//!
//! Tensors are f32 on the CPU (candle's `Device::Cpu`); another dtype or device is refused
//! with an error naming it. Inputs may have any leading dims (`[batch, seq, in]`), as for
//! `candle_nn::Linear`.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
//! use lorafuse::adapter::LoraConfig;
//! use lorafuse::candle::LoraLinear;
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 0.02, (64, 32), &dev)?; // W0 [out, in]
//! let base = candle_nn::Linear::new(w, None);
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let cfg = LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() };
//! let layer = LoraLinear::from_linear(&base, &cfg, vb.pp("q_proj"))?;
//! let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: 1e-3, ..Default::default() })?;
//! let x = Tensor::randn(0f32, 1.0, (2, 5, 32), &dev)?; // [batch, seq, in]
//! let loss = layer.forward(&x)?.sqr()?.mean_all()?;
//! opt.backward_step(&loss)?;
//! assert_eq!(layer.forward(&x)?.dims(), &[2, 5, 64]);
//! # Ok(())
//! # }
//! ```

mod adalora;
mod adapted;
mod dora;
mod frozen;
mod llama;
mod lora;
mod op;
mod peft;
mod vera;

pub use adalora::AdaLoraLinear;
pub use adapted::AdaptedLinear;
pub use dora::DoraLinear;
pub use frozen::FrozenLinear;
pub use llama::{Llama, causal_lm_loss, load_llama};
pub use lora::LoraLinear;
pub use peft::{load_peft, save_peft};
pub use vera::{VeraLinear, VeraProjections};
