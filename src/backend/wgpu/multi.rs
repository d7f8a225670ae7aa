//! PLACEHOLDER (being written): the mixed-batch term on wgpu.

use super::Wgpu;
use crate::backend::{LowRankPool, Tensor};
use crate::error::{Error, Result};

pub(super) fn add(
    _be: &Wgpu,
    _x: &Tensor<Wgpu>,
    _pool: &LowRankPool<Wgpu>,
    _adapter_of_row: &[i32],
    _y: &mut Tensor<Wgpu>,
) -> Result<()> {
    Err(Error::Backend {
        backend: "wgpu".into(),
        msg: "mixed-batch kernel not written yet".into(),
    })
}
