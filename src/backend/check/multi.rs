//! Checks of the mixed-batch ops ([`crate::backend::multi`]).

use super::{base, lowrank_term};
use crate::backend::lowrank::{Base, LowRank};
use crate::backend::multi::LowRankPool;
use crate::backend::{Kernels as Backend, Tensor};
use crate::error::{Error, Result};

/// Checks the terms a pool packs for a projection `[dout, din]`: each present one as
/// [`lowrank_term`] does, named by its place (`terms[i]`).
pub fn lowrank_pool<B: Backend>(
    din: usize,
    dout: usize,
    terms: &[Option<LowRank<'_, B>>],
) -> Result<()> {
    for (i, t) in terms.iter().enumerate() {
        if let Some(t) = t {
            lowrank_term(din, dout, t).map_err(|e| in_term(i, e))?;
        }
    }
    Ok(())
}

/// Prefixes the tensor an error names with the term's place: `terms[2].lora_B`.
fn in_term(i: usize, e: Error) -> Error {
    match e {
        Error::Shape {
            name,
            expected,
            actual,
        } => Error::Shape {
            name: format!("terms[{i}].{name}"),
            expected,
            actual,
        },
        Error::InvalidArgument { name, msg } => Error::InvalidArgument {
            name: format!("terms[{i}].{name}"),
            msg,
        },
        e => e,
    }
}

/// Checks a mixed-batch product: `x [T, in]` against the base `[out, in]` and the pool's
/// `(out, in)`, `bias [out]`, and one adapter index per row in `-1..K`. Returns `(T, in, out)`.
pub fn linear_multi<B: Backend>(
    x: &Tensor<B>,
    base_w: Base<'_, B>,
    bias: Option<&Tensor<B>>,
    pool: &LowRankPool<B>,
    adapter_of_row: &[i32],
) -> Result<(usize, usize, usize)> {
    let (t, din) = x.dims2("x")?;
    let (dout, win) = base(base_w)?;
    if win != din {
        return Err(Error::shape("w", format!("[out, {din}]"), &[dout, win]));
    }
    if pool.dims() != (dout, din) {
        return Err(Error::shape(
            "pool",
            format!("terms of a [{dout}, {din}] projection"),
            &[pool.dims().0, pool.dims().1],
        ));
    }
    if let Some(b) = bias {
        b.expect_shape("bias", &[dout])?;
    }
    adapter_indices("adapter_of_row", "row", adapter_of_row, t, pool.len())?;
    Ok((t, din, dout))
}

/// Checks `idx`: one adapter index per `unit` (n of them), each in `-1..k` (-1: the base
/// model). Shared by the mixed-batch product (per row) and the model's mixed batch (per
/// sequence).
pub fn adapter_indices(name: &str, unit: &str, idx: &[i32], n: usize, k: usize) -> Result<()> {
    if idx.len() != n {
        return Err(Error::arg(
            name,
            format!("{} adapter indices for {n} {unit}s", idx.len()),
        ));
    }
    let k = k as i64;
    if let Some((s, i)) = idx
        .iter()
        .enumerate()
        .find(|(_, i)| !(-1..k).contains(&i64::from(**i)))
    {
        return Err(Error::arg(
            name,
            format!("{unit} {s}: adapter {i} is outside -1..{k} (-1: the base model)"),
        ));
    }
    Ok(())
}
