//! CPU tensors: host `Vec<f32>` buffers, row gathers and scatter-adds.

use super::{Cpu, new};
use crate::backend::Tensor;

pub(super) fn gather_rows(t: &Tensor<Cpu>, idx: &[u32]) -> Tensor<Cpu> {
    let d = t.dim(1);
    let mut out = vec![0.0f32; idx.len() * d];
    for (row, &i) in out.chunks_mut(d.max(1)).zip(idx) {
        let i = i as usize;
        row.copy_from_slice(&t.buf[i * d..(i + 1) * d]);
    }
    new(out, &[idx.len(), d])
}

pub(super) fn scatter_add_rows(dst: &mut Tensor<Cpu>, idx: &[u32], src: &Tensor<Cpu>) {
    let d = dst.dim(1);
    for (row, &i) in src.buf.chunks(d.max(1)).zip(idx) {
        let i = i as usize;
        for (o, s) in dst.buf[i * d..(i + 1) * d].iter_mut().zip(row) {
            *o += s;
        }
    }
}
