//! Quantized weight formats. [`nf4`]: bitsandbytes-compatible NF4 with double quantization.

pub mod nf4;

pub use nf4::{Absmax, NF4_CODE, Nf4Tensor, quantize_nf4};
