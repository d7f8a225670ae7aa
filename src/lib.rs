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
//!
//! A Rust trainer that brings its own model uses the adapter types and the backend directly:
//!
//! ```
//! use lorafuse::adapter::{Linear, LoraConfig, LoraLayer};
//! use lorafuse::{Backend, Cpu};
//!
//! # fn main() -> lorafuse::Result<()> {
//! let be = Cpu;
//! let base = Linear::dense(be.upload(&vec![0.01; 64 * 32], &[64, 32])?)?; // W0 [out, in]
//! let cfg = LoraConfig { r: 4, ..Default::default() };
//! let lora = LoraLayer::init(&be, 32, 64, &cfg, 0)?; // A kaiming-uniform, B = 0
//! let x = be.upload(&vec![1.0; 3 * 32], &[3, 32])?; // [tokens, in]
//! let (y, h) = lora.forward(&be, &base, &x)?; // y [3, 64], h = x A^T [3, 4]
//! let dy = be.upload(&vec![1.0; 3 * 64], &[3, 64])?;
//! let (dx, (d_a, d_b)) = lora.backward(&be, &base, &x, &h, &dy)?;
//! assert_eq!((dx.shape(), d_a.shape(), d_b.shape()), (&[3, 32][..], &[4, 32][..], &[64, 4][..]));
//! # let _ = y;
//! # Ok(())
//! # }
//! ```

pub mod adapter;
pub mod backend;
#[cfg(feature = "candle")]
pub mod candle;
pub mod error;
pub mod instruct;
pub mod io;
pub mod model;
pub mod quant;
pub mod torch_cpu;
pub mod train;

#[cfg(feature = "wgpu")]
pub use backend::wgpu::{Wgpu, WgpuOptions};
pub use backend::{Backend, Tensor, cpu::Cpu};
pub use error::{Error, Result};
