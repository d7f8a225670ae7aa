//! NF4 base weights on the wgpu backend: packed 4-bit indices as u32 words, the code table
//! in workgroup memory, double-quant absmax decoded in place (bitsandbytes' layout, see
//! `quant/nf4.rs`). Same contracts as the trait docs; same math as `backend/cpu/nf4.rs`.

use super::{GpuBuf, Wgpu};
use crate::backend::{Nf4Weight, Tensor};
use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Tensor;

fn todo(name: &str) -> Error {
    Error::Backend {
        backend: "wgpu".into(),
        msg: format!("{name} is not implemented yet"),
    }
}

/// An NF4 weight on the device (see [`crate::backend::Nf4Weight`]).
#[derive(Debug)]
pub struct Nf4Gpu {
    /// Packed indices, two per byte (high nibble first), as little-endian u32 words.
    pub(crate) packed: GpuBuf,
}

pub(super) fn upload(_be: &Wgpu, _w: &Nf4Tensor) -> Result<Nf4Weight<Wgpu>> {
    Err(todo("upload_nf4"))
}

pub(super) fn dequantize(_be: &Wgpu, _w: &Nf4Weight<Wgpu>) -> Result<Tensor<Wgpu>> {
    Err(todo("nf4_dequantize"))
}

pub(super) fn linear(
    _be: &Wgpu,
    _x: &Tensor<Wgpu>,
    _w: &Nf4Weight<Wgpu>,
    _bias: Option<&Tensor<Wgpu>>,
) -> Result<Tensor<Wgpu>> {
    Err(todo("nf4_linear"))
}

pub(super) fn linear_backward_input(
    _be: &Wgpu,
    _dy: &Tensor<Wgpu>,
    _w: &Nf4Weight<Wgpu>,
    _acc: Option<&mut Tensor<Wgpu>>,
) -> Result<Option<Tensor<Wgpu>>> {
    Err(todo("nf4_linear_backward_input"))
}

pub(super) fn row_sq_norms(_be: &Wgpu, _w: &Nf4Weight<Wgpu>) -> Result<Tensor<Wgpu>> {
    Err(todo("nf4_row_sq_norms"))
}

pub(super) fn dora_weight_norm(
    _be: &Wgpu,
    _w0: &Nf4Weight<Wgpu>,
    _w0_row_sq: &Tensor<Wgpu>,
    _a: &Tensor<Wgpu>,
    _b: &Tensor<Wgpu>,
    _s: f32,
) -> Result<Tensor<Wgpu>> {
    Err(todo("nf4_dora_weight_norm"))
}
