//! Quantized weight formats. [`nf4`]: bitsandbytes-compatible NF4 with double quantization;
//! [`torch_sum`]: torch's CPU summation order, which its double-quant offset depends on.

pub mod nf4;
pub mod torch_sum;

pub use nf4::{Absmax, NF4_CODE, Nf4Tensor, quantize_nf4};
