//! CUDA tensors: uploads and downloads (converting to and from the storage dtype), zeroed
//! allocations, device-to-device copies, row gathers and scatter-adds (`kernels/model.cu`).

use super::{Arg, Cuda, CudaBuf, berr, blocks, check_dims, decode};
use crate::backend::Tensor;
use crate::error::{Error, Result};
use std::sync::Arc;

pub(super) fn upload(be: &Cuda, data: &[f32], shape: &[usize]) -> Result<Tensor<Cuda>> {
    check_dims(shape)?;
    let bytes = be.encode(data);
    let mem = if bytes.is_empty() {
        be.raw_alloc(1)?
    } else {
        be.stream().clone_htod(&bytes).map_err(berr)?
    };
    Ok(Tensor {
        buf: CudaBuf {
            mem: Arc::new(mem),
            dtype: be.dtype,
            len: data.len(),
        },
        shape: shape.to_vec(),
    })
}

pub(super) fn stored_bytes(t: &Tensor<Cuda>) -> usize {
    t.buf.len * t.buf.dtype.size()
}

pub(super) fn download(be: &Cuda, t: &Tensor<Cuda>) -> Result<Vec<f32>> {
    let bytes = be.download_bytes(&t.buf.mem, t.buf.len * t.buf.dtype.size())?;
    Ok(decode(&bytes, t.buf.dtype))
}

/// One `memcpy_dtod`. Errors: a storage dtype (or buffer size) that differs from dst's.
pub(super) fn copy_into(be: &Cuda, src: &Tensor<Cuda>, dst: &mut Tensor<Cuda>) -> Result<()> {
    if src.buf.dtype != dst.buf.dtype || src.buf.mem.len() != dst.buf.mem.len() {
        return Err(Error::arg("src", "storage type differs from dst's"));
    }
    if Arc::get_mut(&mut dst.buf.mem).is_none() {
        // Shared with a clone, which keeps its values: copy into a buffer of dst's own.
        dst.buf.mem = Arc::new(be.raw_alloc(src.buf.mem.len())?);
    }
    let mem = Arc::get_mut(&mut dst.buf.mem).ok_or_else(|| berr("dst is shared"))?;
    be.stream().memcpy_dtod(&*src.buf.mem, mem).map_err(berr)
}

fn idx_i32(idx: &[u32]) -> Vec<i32> {
    idx.iter().map(|&i| i as i32).collect()
}

pub(super) fn gather_rows(be: &Cuda, t: &Tensor<Cuda>, idx: &[u32]) -> Result<Tensor<Cuda>> {
    let d = t.dim(1);
    let out = be.alloc(&[idx.len(), d])?;
    let di = be.upload_i32(&idx_i32(idx))?;
    be.launch(
        "model",
        "gather_rows",
        (blocks(idx.len() * d, 256), 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("table", t)?,
            Arg::P(be.slice_ptr(&di)),
            be.rd("out", &out)?,
            Arg::I(idx.len() as i32),
            Arg::I(d as i32),
        ],
    )?;
    Ok(out)
}

pub(super) fn scatter_add_rows(
    be: &Cuda,
    dst: &mut Tensor<Cuda>,
    idx: &[u32],
    src: &Tensor<Cuda>,
) -> Result<()> {
    let d = dst.dim(1);
    let di = be.upload_i32(&idx_i32(idx))?;
    let sp = be.rd("src", src)?;
    let dp = be.wr("dst", dst)?;
    be.launch(
        "model",
        "scatter_add_rows",
        (blocks(idx.len() * d, 256), 1, 1),
        (256, 1, 1),
        0,
        &[
            dp,
            Arg::P(be.slice_ptr(&di)),
            sp,
            Arg::I(idx.len() as i32),
            Arg::I(d as i32),
        ],
    )
}
