//! Model ops on the wgpu backend: embedding gather/scatter, RMSNorm, RoPE, causal GQA
//! attention, cross-entropy and reductions. Same contracts as the trait docs; same math as
//! `backend/cpu/ops.rs`.

use super::Wgpu;
use crate::backend::{AttentionSaved, SeqSpan, Tensor};
use crate::error::{Error, Result};

fn todo(name: &str) -> Error {
    Error::Backend {
        backend: "wgpu".into(),
        msg: format!("{name} is not implemented yet"),
    }
}

pub(super) fn gather_rows(_be: &Wgpu, _t: &Tensor<Wgpu>, _idx: &[u32]) -> Result<Tensor<Wgpu>> {
    Err(todo("gather_rows"))
}

pub(super) fn scatter_add_rows(
    _be: &Wgpu,
    _dst: &mut Tensor<Wgpu>,
    _idx: &[u32],
    _src: &Tensor<Wgpu>,
) -> Result<()> {
    Err(todo("scatter_add_rows"))
}

pub(super) fn sum_squares(_be: &Wgpu, _a: &Tensor<Wgpu>) -> Result<f64> {
    Err(todo("sum_squares"))
}

pub(super) fn rmsnorm(
    _be: &Wgpu,
    _x: &Tensor<Wgpu>,
    _weight: &Tensor<Wgpu>,
    _eps: f32,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>)> {
    Err(todo("rmsnorm"))
}

pub(super) fn rmsnorm_backward(
    _be: &Wgpu,
    _dy: &Tensor<Wgpu>,
    _x: &Tensor<Wgpu>,
    _weight: &Tensor<Wgpu>,
    _rstd: &Tensor<Wgpu>,
    _dweight: Option<&mut Tensor<Wgpu>>,
) -> Result<Tensor<Wgpu>> {
    Err(todo("rmsnorm_backward"))
}

pub(super) fn rope(
    _be: &Wgpu,
    _x: &mut Tensor<Wgpu>,
    _positions: &[u32],
    _head_dim: usize,
    _theta: f32,
    _inverse: bool,
) -> Result<()> {
    Err(todo("rope"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    _be: &Wgpu,
    _q: &Tensor<Wgpu>,
    _k: &Tensor<Wgpu>,
    _v: &Tensor<Wgpu>,
    _seqs: &[SeqSpan],
    _n_heads: usize,
    _n_kv_heads: usize,
    _scale: f32,
) -> Result<AttentionSaved<Wgpu>> {
    Err(todo("attention"))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    _be: &Wgpu,
    _d_out: &Tensor<Wgpu>,
    _q: &Tensor<Wgpu>,
    _k: &Tensor<Wgpu>,
    _v: &Tensor<Wgpu>,
    _saved: &AttentionSaved<Wgpu>,
    _seqs: &[SeqSpan],
    _n_heads: usize,
    _n_kv_heads: usize,
    _scale: f32,
) -> Result<(Tensor<Wgpu>, Tensor<Wgpu>, Tensor<Wgpu>)> {
    Err(todo("attention_backward"))
}

pub(super) fn cross_entropy(
    _be: &Wgpu,
    _logits: &Tensor<Wgpu>,
    _labels: &[i32],
    _grad_scale: f32,
) -> Result<(f64, Tensor<Wgpu>)> {
    Err(todo("cross_entropy"))
}
