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
    if adapter_of_row.len() != t {
        return Err(Error::arg(
            "adapter_of_row",
            format!("{} indices for {t} rows of x", adapter_of_row.len()),
        ));
    }
    let k = pool.len() as i64;
    if let Some((row, &i)) = adapter_of_row
        .iter()
        .enumerate()
        .find(|(_, i)| !(-1..k).contains(&i64::from(**i)))
    {
        return Err(Error::arg(
            "adapter_of_row",
            format!("row {row}: adapter {i} is outside -1..{k} (-1: the base model only)"),
        ));
    }
    Ok((t, din, dout))
}
