//! CPU reference of the mixed-batch term ([`crate::backend::multi`]).
//!
//! With few ranks in all (R = sum of the ranks <= [`DENSE_MAX_R`]) the term is two GEMMs over
//! the whole batch: `H = x A^T [T, R]` against the stacked A of every adapter, the columns of
//! other adapters zeroed per row, then `y += H B_all^T` with `B_all [out, R]` the adapters'
//! B' side by side. The masked entries are exact zeros, so each row gets exactly its own
//! adapter's sums; the GEMMs do K times the term's work, which beats K pairs of small,
//! badly shaped GEMMs while the term is small next to the base product. Otherwise, per
//! adapter, its rows (wherever they are in the batch) are gathered, shrunk by `A_i` and
//! expanded by `B_i'` in two GEMMs, and added back: one GEMM pair per adapter, not per
//! segment, however a decode batch's rows interleave.

use super::Cpu;
use super::gemm::{Op, sgemm};
use crate::backend::{LowRankPool, Tensor};
use crate::error::Result;

/// Up to this total rank the whole batch runs as two masked GEMMs.
const DENSE_MAX_R: usize = 64;

/// `y[t] += (x[t] A_i^T) B_i'^T` for the rows of every adapter i with a term.
pub(super) fn add(
    x: &Tensor<Cpu>,
    pool: &LowRankPool<Cpu>,
    adapter_of_row: &[i32],
    y: &mut Tensor<Cpu>,
) -> Result<()> {
    let total_r: usize = pool.ranks().iter().sum();
    if total_r <= DENSE_MAX_R {
        add_dense(x, pool, adapter_of_row, y, total_r);
        return Ok(());
    }
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

/// The two-GEMM form over the whole batch (see the module docs).
fn add_dense(
    x: &Tensor<Cpu>,
    pool: &LowRankPool<Cpu>,
    adapter_of_row: &[i32],
    y: &mut Tensor<Cpu>,
    total_r: usize,
) {
    let (t, din, dout) = (x.dim(0), x.dim(1), y.dim(1));
    let mut h = vec![0.0f32; t * total_r];
    sgemm(
        Op::N,
        Op::T,
        t,
        total_r,
        din,
        1.0,
        x.data(),
        &pool.a().data()[..total_r * din],
        0.0,
        &mut h,
    );
    for (row, &i) in h.chunks_mut(total_r).zip(adapter_of_row) {
        let keep = (i >= 0).then(|| {
            let i = i as usize;
            pool.a_row(i)..pool.a_row(i) + pool.rank(i)
        });
        for (j, v) in row.iter_mut().enumerate() {
            if !keep.as_ref().is_some_and(|k| k.contains(&j)) {
                *v = 0.0;
            }
        }
    }
    let b = pool.b().data();
    let mut b_all = vec![0.0f32; dout * total_r];
    for i in 0..pool.len() {
        let (r, a0, b0) = (pool.rank(i), pool.a_row(i), pool.b_offset(i));
        for o in 0..dout {
            b_all[o * total_r + a0..o * total_r + a0 + r]
                .copy_from_slice(&b[b0 + o * r..b0 + (o + 1) * r]);
        }
    }
    sgemm(
        Op::N,
        Op::T,
        t,
        dout,
        total_r,
        1.0,
        &h,
        &b_all,
        1.0,
        y.data_mut(),
    );
}
