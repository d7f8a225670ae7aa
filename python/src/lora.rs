//! LoRA (and rsLoRA, which differs only in `scaling`): the fused op with the plain term
//! `scaling * (x A^T) B^T`, over a dense or NF4 base (QLoRA).

use std::borrow::Cow;

use lorafuse::Backend;
use lorafuse::backend::{GradWants, LowRank};
use pyo3::prelude::*;

use crate::args::{Dims, opt, scalar};
use crate::run::{Out, down, down_need, out, run};

/// Fused LoRA forward (PEFT ``lora.Linear``): ``y = x @ w0.T + bias + scaling * (x @ lora_A.T) @ lora_B.T``.
///
/// Args:
///     x: float32 ``[T, in]``.
///     w0: the frozen base weight ``[out, in]`` (torch ``nn.Linear`` layout): a float32 array, a
///         ``FrozenWeight``, or an ``nf4.Nf4Tensor`` (QLoRA: dequantized tile by tile inside the
///         products, bitsandbytes' values, never whole).
///     lora_A: float32 ``[r, in]``.
///     lora_B: float32 ``[out, r]``.
///     scaling: float, ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
///     bias: optional float32 ``[out]``.
///
/// Returns:
///     y, float32 ``[T, out]``.
///
/// Raises:
///     TypeError: an array argument is not a numpy array or not float32.
///     ValueError: wrong number of dims or shape, not C-contiguous, NaN/Inf values.
#[pyfunction]
#[pyo3(signature = (x, w0, lora_A, lora_B, scaling, bias=None))]
pub(crate) fn lora_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w0: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Out<'py>> {
    let mut d = Dims::default();
    let x = d.take(x, "x", &["T", "in"])?;
    let w0 = d.take_w0(w0, "w0")?;
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let bias = d.take_opt(bias, "bias", &["out"])?;
    let s = scalar(scaling, "scaling")?;
    let y = run(py, |be| {
        let term = LowRank::lora(a.tensor(), b.tensor(), s);
        let o = be.linear_lowrank(x.tensor(), w0.base(), opt(&bias), Some(&term))?;
        Ok(down(o.y))
    })?;
    out(py, y)
}

/// LoRA backward for a frozen base weight: ``dx = dy @ w0 + s * (dy @ lora_B) @ lora_A``,
/// ``d_lora_A = s * (dy @ lora_B).T @ x``, ``d_lora_B = s * dy.T @ h``.
///
/// Args:
///     dy: float32 ``[T, out]``, the gradient of the loss with respect to y.
///     x: float32 ``[T, in]``, the forward input.
///     w0: ``[out, in]``, as for ``lora_forward`` (an array, FrozenWeight or Nf4Tensor).
///     lora_A: float32 ``[r, in]``.
///     lora_B: float32 ``[out, r]``.
///     scaling: float.
///     h: optional float32 ``[T, r]``, ``x @ lora_A.T`` (recomputed when omitted).
///
/// Returns:
///     (dx ``[T, in]``, d_lora_A ``[r, in]``, d_lora_B ``[out, r]``), float32.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
#[pyo3(signature = (dy, x, w0, lora_A, lora_B, scaling, h=None))]
pub(crate) fn lora_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    w0: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    h: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Out<'py>, Out<'py>, Out<'py>)> {
    let mut d = Dims::default();
    let x = d.take(x, "x", &["T", "in"])?;
    let w0 = d.take_w0(w0, "w0")?;
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let dy = d.take(dy, "dy", &["T", "out"])?;
    let h = d.take_opt(h, "h", &["T", "r"])?;
    let s = scalar(scaling, "scaling")?;
    let (dx, da, db) = run(py, |be| {
        let (x, a) = (x.tensor(), a.tensor());
        let h = match opt(&h) {
            Some(h) => Cow::Borrowed(h),
            None => Cow::Owned(be.linear(x, a, None)?),
        };
        let term = LowRank::lora(a, b.tensor(), s);
        let g = be.linear_lowrank_backward(
            dy.tensor(),
            x,
            &h,
            None,
            w0.base(),
            &term,
            GradWants::LORA,
        )?;
        Ok((
            down(g.dx),
            down_need(g.d_lora_a, "d_lora_A")?,
            down_need(g.d_lora_b, "d_lora_B")?,
        ))
    })?;
    Ok((out(py, dx)?, out(py, da)?, out(py, db)?))
}

fn lora_merge_impl<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    wname: &str,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    sign: f32,
) -> PyResult<Out<'py>> {
    let mut d = Dims::default();
    let w = d.take(w, wname, &["out", "in"])?;
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let s = scalar(scaling, "scaling")?;
    let m = run(py, |be| {
        let mut w = w.tensor().clone();
        be.lowrank_merge(&mut w, &LowRank::lora(a.tensor(), b.tensor(), s), sign)?;
        Ok(down(w))
    })?;
    out(py, m)
}

/// Returns a new merged weight ``w0 + scaling * lora_B @ lora_A``, float32 ``[out, in]``
/// (``w0`` is not modified). Shapes: w0 ``[out, in]``, lora_A ``[r, in]``, lora_B ``[out, r]``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
pub(crate) fn lora_merge<'py>(
    py: Python<'py>,
    w0: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
) -> PyResult<Out<'py>> {
    lora_merge_impl(py, w0, "w0", lora_A, lora_B, scaling, 1.0)
}

/// Inverse of ``lora_merge``: returns a new ``w - scaling * lora_B @ lora_A``, float32
/// ``[out, in]``. Shapes: w ``[out, in]``, lora_A ``[r, in]``, lora_B ``[out, r]``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
pub(crate) fn lora_unmerge<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
) -> PyResult<Out<'py>> {
    lora_merge_impl(py, w, "w", lora_A, lora_B, scaling, -1.0)
}
