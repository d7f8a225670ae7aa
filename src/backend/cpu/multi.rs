//! CPU reference of the mixed-batch term ([`crate::backend::multi`]): per adapter, its rows
//! (wherever they are in the batch) are gathered, shrunk by `A_i` and expanded by `B_i'` in two
//! GEMMs, and added back. One GEMM pair per adapter, not per segment: a decode batch's rows
//! of one adapter make one product however they interleave.

use super::Cpu;
use super::gemm::{Op, sgemm};
use crate::backend::{LowRankPool, Tensor};
use crate::error::Result;

/// `y[t] += (x[t] A_i^T) B_i'^T` for the rows of every adapter i with a term.
pub(super) fn add(
    x: &Tensor<Cpu>,
    pool: &LowRankPool<Cpu>,
    adapter_of_row: &[i32],
    y: &mut Tensor<Cpu>,
) -> Result<()> {
    let (din, dout) = (x.dim(1), y.dim(1));
    let (a, b) = (pool.a().data(), pool.b().data());
    for i in 0..pool.len() {
        let r = pool.rank(i);
        let rows: Vec<usize> = (0..adapter_of_row.len())
            .filter(|&t| adapter_of_row[t] == i as i32)
            .collect();
        if r == 0 || rows.is_empty() {
            continue;
        }
        let n = rows.len();
        let xi: Vec<f32> = rows
            .iter()
            .flat_map(|&t| &x.data()[t * din..(t + 1) * din])
            .copied()
            .collect();
        let ai = &a[pool.a_row(i) * din..(pool.a_row(i) + r) * din];
        let bi = &b[pool.b_offset(i)..pool.b_offset(i) + dout * r];
        let mut h = vec![0.0f32; n * r];
        sgemm(Op::N, Op::T, n, r, din, 1.0, &xi, ai, 0.0, &mut h);
        let mut u = vec![0.0f32; n * dout];
        sgemm(Op::N, Op::T, n, dout, r, 1.0, &h, bi, 0.0, &mut u);
        let yd = y.data_mut();
        for (k, &t) in rows.iter().enumerate() {
            yd[t * dout..(t + 1) * dout]
                .iter_mut()
                .zip(&u[k * dout..(k + 1) * dout])
                .for_each(|(y, u)| *y += u);
        }
    }
    Ok(())
}
