//! # lorafuse
//!
//! Fused kernels for low-rank adaptation (LoRA and its family) of large language models, with a
//! CPU reference path (ndarray + a fast GEMM) that every GPU backend is checked against, a
//! Llama-architecture model loaded from GGUF, and a fine-tuning loop.
//!
//! The one seam between math and hardware is [`backend::Backend`]: adapters, the model and the
//! trainer call its methods and never branch on the device.
//!
//! Conventions follow PEFT and bitsandbytes: row-major, weights in torch `nn.Linear` layout
//! `[out, in]`, activations `[tokens, in]`, `y = x W0^T + b`; `lora_A [r, in]`, `lora_B [out, r]`.

pub mod adapter;
pub mod backend;
pub mod error;
pub mod io;
pub mod model;
pub mod train;

pub use backend::{Backend, Tensor, cpu::Cpu};
pub use error::{Error, Result};
