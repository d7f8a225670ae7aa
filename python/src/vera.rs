//! VeRA: the fused op with the model-wide shared projections, `lambda_d` per rank and
//! `lambda_b` per output.

use std::borrow::Cow;

use lorafuse::Backend;
use lorafuse::backend::{Base, GradWants, LowRank};
use pyo3::prelude::*;

use crate::args::{Arr, Dims, opt};
use crate::run::{Out, down, down_need, need, out, run};

/// VeRA's adapter arguments.
struct Vera {
    a: Arr,
    b: Arr,
    ld: Arr,
    lb: Arr,
}

impl Vera {
    /// The term of the fused op.
    fn term(&self) -> LowRank<'_, lorafuse::Cpu> {
        LowRank::vera(
            self.a.tensor(),
            self.b.tensor(),
            self.ld.tensor(),
            self.lb.tensor(),
        )
    }
}

/// Checks VeRA's adapter arguments (after `w`/`x` bound `out` and `in`).
fn vera_args(
    d: &mut Dims,
    vera_A: &Bound<'_, PyAny>,
    vera_B: &Bound<'_, PyAny>,
    lambda_d: &Bound<'_, PyAny>,
    lambda_b: &Bound<'_, PyAny>,
) -> PyResult<Vera> {
    let a = d.take(vera_A, "vera_A", &["r", "max_in"])?;
    let b = d.take(vera_B, "vera_B", &["max_out", "r"])?;
    d.at_most("vera_A", "in", "max_in")?;
    d.at_most("vera_B", "out", "max_out")?;
    let ld = d.take(lambda_d, "lambda_d", &["r"])?;
    let lb = d.take(lambda_b, "lambda_b", &["out"])?;
    Ok(Vera { a, b, ld, lb })
}

/// Fused VeRA forward (PEFT ``vera.Linear``, no alpha scaling):
/// ``y = x @ w0.T + bias + lambda_b * ((lambda_d * (x @ As.T)) @ Bs.T)`` with
/// ``As = vera_A[:, :in]`` and ``Bs = vera_B[:out, :]`` sliced inside.
///
/// Args:
///     x: float32 ``[T, in]``.
///     w0: float32 ``[out, in]``.
///     vera_A: float32 ``[r, max_in]``, the shared projection (``max_in >= in``).
///     vera_B: float32 ``[max_out, r]``, the shared projection (``max_out >= out``).
///     lambda_d: float32 ``[r]``.
///     lambda_b: float32 ``[out]``.
///     bias: optional float32 ``[out]``.
///
/// Returns:
///     y, float32 ``[T, out]``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
#[pyo3(signature = (x, w0, vera_A, vera_B, lambda_d, lambda_b, bias=None))]
pub(crate) fn vera_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w0: &Bound<'py, PyAny>,
    vera_A: &Bound<'py, PyAny>,
    vera_B: &Bound<'py, PyAny>,
    lambda_d: &Bound<'py, PyAny>,
    lambda_b: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Out<'py>> {
    let mut d = Dims::default();
    let x = d.take(x, "x", &["T", "in"])?;
    let w0 = d.take(w0, "w0", &["out", "in"])?;
    let v = vera_args(&mut d, vera_A, vera_B, lambda_d, lambda_b)?;
    let bias = d.take_opt(bias, "bias", &["out"])?;
    let y = run(py, |be| {
        let base = Base::Dense(w0.tensor());
        let o = be.linear_lowrank(x.tensor(), base, opt(&bias), Some(&v.term()))?;
        Ok(down(o.y))
    })?;
    out(py, y)
}

/// VeRA backward: with ``q = (dy * lambda_b) @ Bs``, ``d_lambda_d = sum_T(q * h)``,
/// ``dx = dy @ w0 + (q * lambda_d) @ As``, ``d_lambda_b = sum_T(dy * ((lambda_d * h) @ Bs.T))``.
///
/// Args:
///     dy: float32 ``[T, out]``; the others as ``vera_forward``.
///     h: optional float32 ``[T, r]``, ``x @ As.T`` (recomputed when omitted).
///
/// Returns:
///     (dx ``[T, in]``, d_lambda_d ``[r]``, d_lambda_b ``[out]``), float32.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
#[pyo3(signature = (dy, x, w0, vera_A, vera_B, lambda_d, lambda_b, h=None))]
pub(crate) fn vera_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    w0: &Bound<'py, PyAny>,
    vera_A: &Bound<'py, PyAny>,
    vera_B: &Bound<'py, PyAny>,
    lambda_d: &Bound<'py, PyAny>,
    lambda_b: &Bound<'py, PyAny>,
    h: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Out<'py>, Out<'py>, Out<'py>)> {
    let mut d = Dims::default();
    let x = d.take(x, "x", &["T", "in"])?;
    let w0 = d.take(w0, "w0", &["out", "in"])?;
    let v = vera_args(&mut d, vera_A, vera_B, lambda_d, lambda_b)?;
    let dy = d.take(dy, "dy", &["T", "out"])?;
    let h = d.take_opt(h, "h", &["T", "r"])?;
    let (dx, dld, dlb) = run(py, |be| {
        let (x, base, term) = (x.tensor(), Base::Dense(w0.tensor()), v.term());
        let h = match opt(&h) {
            Some(h) => Cow::Borrowed(h),
            None => Cow::Owned(need(be.linear_lowrank(x, base, None, Some(&term))?.h, "h")?),
        };
        let g =
            be.linear_lowrank_backward(dy.tensor(), x, &h, None, base, &term, GradWants::VERA)?;
        Ok((
            down(g.dx),
            down_need(g.d_rank_scale, "d_lambda_d")?,
            down_need(g.d_out_scale, "d_lambda_b")?,
        ))
    })?;
    Ok((out(py, dx)?, out(py, dld)?, out(py, dlb)?))
}

fn vera_merge_impl<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    wname: &str,
    vera_A: &Bound<'py, PyAny>,
    vera_B: &Bound<'py, PyAny>,
    lambda_d: &Bound<'py, PyAny>,
    lambda_b: &Bound<'py, PyAny>,
    sign: f32,
) -> PyResult<Out<'py>> {
    let mut d = Dims::default();
    let w = d.take(w, wname, &["out", "in"])?;
    let v = vera_args(&mut d, vera_A, vera_B, lambda_d, lambda_b)?;
    let m = run(py, |be| {
        let mut w = w.tensor().clone();
        be.lowrank_merge(&mut w, &v.term(), sign)?;
        Ok(down(w))
    })?;
    out(py, m)
}

/// Returns a new ``w0 + (lambda_b[:, None] * Bs) @ (lambda_d[:, None] * As)``, float32
/// ``[out, in]``; shapes and slicing as ``vera_forward``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
pub(crate) fn vera_merge<'py>(
    py: Python<'py>,
    w0: &Bound<'py, PyAny>,
    vera_A: &Bound<'py, PyAny>,
    vera_B: &Bound<'py, PyAny>,
    lambda_d: &Bound<'py, PyAny>,
    lambda_b: &Bound<'py, PyAny>,
) -> PyResult<Out<'py>> {
    vera_merge_impl(py, w0, "w0", vera_A, vera_B, lambda_d, lambda_b, 1.0)
}

/// Inverse of ``vera_merge``: returns a new
/// ``w - (lambda_b[:, None] * Bs) @ (lambda_d[:, None] * As)``, float32 ``[out, in]``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
pub(crate) fn vera_unmerge<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    vera_A: &Bound<'py, PyAny>,
    vera_B: &Bound<'py, PyAny>,
    lambda_d: &Bound<'py, PyAny>,
    lambda_b: &Bound<'py, PyAny>,
) -> PyResult<Out<'py>> {
    vera_merge_impl(py, w, "w", vera_A, vera_B, lambda_d, lambda_b, -1.0)
}
