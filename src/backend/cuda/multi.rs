//! PLACEHOLDER (being written): the mixed-batch term on cuda.

use super::Cuda;
use crate::backend::{LowRankPool, Tensor};
use crate::error::{Error, Result};

pub(super) fn add(
    _be: &Cuda,
    _x: &Tensor<Cuda>,
    _pool: &LowRankPool<Cuda>,
    _adapter_of_row: &[i32],
    _y: &mut Tensor<Cuda>,
) -> Result<()> {
    Err(Error::Backend {
        backend: "cuda".into(),
        msg: "mixed-batch kernel not written yet".into(),
    })
}
