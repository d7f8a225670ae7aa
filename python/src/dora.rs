//! DoRA: the fused op with the LoRA term under the column scale `magnitude / weight_norm`,
//! over a dense or NF4 base (QDoRA).

use lorafuse::backend::{GradWants, LowRank, LowRankOut};
use lorafuse::{Backend, Cpu};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::args::{Arr, Dims, T, opt, scalar};
use crate::base::W0;
use crate::run::{Out, down, down_need, need, out, run};

/// DoRA's weight norm `||W0 + s B A||_row` over either base, by the low-rank identity.
fn w0_norm(be: &Cpu, w0: &W0, a: &T, b: &T, s: f32) -> lorafuse::Result<T> {
    be.lowrank_row_norms(w0.base(), &*w0.row_sq(be)?, &LowRank::lora(a, b, s))
}

/// The norm `n` given by the caller, or computed from `w0` (which must then be the UNmerged base).
fn norm(be: &Cpu, w0: &W0, a: &T, b: &T, s: f32, given: &Option<Arr>) -> lorafuse::Result<T> {
    match opt(given) {
        Some(n) => Ok(n.clone()),
        None => w0_norm(be, w0, a, b, s),
    }
}

/// DoRA forward over either base: `(y, h, z, n)`, with `n` computed unless given (then its
/// pass over `w0` rides the forward's).
fn forward(
    be: &Cpu,
    x: &T,
    w0: &W0,
    bias: Option<&T>,
    a: &T,
    b: &T,
    s: f32,
    m: &T,
    n: Option<&T>,
) -> lorafuse::Result<(T, T, T, T)> {
    let (o, n): (LowRankOut<Cpu>, T) = match n {
        Some(n) => {
            let term = LowRank::dora(a, b, s, m, Some(n));
            (
                be.linear_lowrank(x, w0.base(), bias, Some(&term))?,
                n.clone(),
            )
        }
        None => {
            let term = LowRank::dora(a, b, s, m, None);
            let mut o = be.linear_lowrank_with_norm(x, w0.base(), &*w0.row_sq(be)?, bias, &term)?;
            let n = need(o.weight_norm.take(), "weight_norm")?;
            (o, n)
        }
    };
    Ok((o.y, need(o.h, "h")?, need(o.z, "z")?, n))
}

/// DoRA's weight norm ``n = ||w0 + scaling * lora_B @ lora_A||`` per output row (PEFT's
/// ``dim=1``), float32 ``[out]``, computed without forming ``lora_B @ lora_A``.
/// Shapes: w0 ``[out, in]`` (an array, FrozenWeight or Nf4Tensor), lora_A ``[r, in]``,
/// lora_B ``[out, r]``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
pub(crate) fn dora_weight_norm<'py>(
    py: Python<'py>,
    w0: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
) -> PyResult<Out<'py>> {
    let mut d = Dims::default();
    let w0 = d.take_w0(w0, "w0")?;
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let s = scalar(scaling, "scaling")?;
    let n = run(py, |be| {
        Ok(down(w0_norm(be, &w0, a.tensor(), b.tensor(), s)?))
    })?;
    out(py, n)
}

/// Fused DoRA forward (PEFT ``DoraLinearLayer``):
/// ``y = (magnitude / weight_norm) * (x @ w0.T + scaling * (x @ lora_A.T) @ lora_B.T) + bias``
/// (the bias is not scaled).
///
/// Args:
///     x: float32 ``[T, in]``.
///     w0: ``[out, in]``, as for ``lora_forward`` (an array, FrozenWeight or Nf4Tensor: QDoRA).
///     lora_A: float32 ``[r, in]``.
///     lora_B: float32 ``[out, r]``.
///     scaling: float.
///     magnitude: float32 ``[out]``, PEFT's ``lora_magnitude_vector``.
///     weight_norm: optional float32 ``[out]``; computed with ``dora_weight_norm`` when omitted.
///     bias: optional float32 ``[out]``.
///     return_saved: also return what ``dora_backward`` needs, so it need not recompute the
///         forward.
///
/// Returns:
///     y, float32 ``[T, out]``; with ``return_saved``, ``(y, h, z, weight_norm)``: ``h = x @
///     lora_A.T`` ``[T, r]``, ``z = x @ w0.T + scaling * h @ lora_B.T`` ``[T, out]`` (no bias)
///     and the norm used ``[out]``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
#[pyo3(signature = (x, w0, lora_A, lora_B, scaling, magnitude, weight_norm=None, bias=None, return_saved=false))]
pub(crate) fn dora_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w0: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    magnitude: &Bound<'py, PyAny>,
    weight_norm: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    return_saved: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let mut d = Dims::default();
    let x = d.take(x, "x", &["T", "in"])?;
    let w0 = d.take_w0(w0, "w0")?;
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let m = d.take(magnitude, "magnitude", &["out"])?;
    let n = d.take_opt(weight_norm, "weight_norm", &["out"])?;
    let bias = d.take_opt(bias, "bias", &["out"])?;
    let s = scalar(scaling, "scaling")?;
    let (y, h, z, n) = run(py, |be| {
        let (a, b, x, m) = (a.tensor(), b.tensor(), x.tensor(), m.tensor());
        let (y, h, z, n) = forward(be, x, &w0, opt(&bias), a, b, s, m, opt(&n))?;
        Ok((down(y), down(h), down(z), down(n)))
    })?;
    let y = out(py, y)?.into_any();
    if !return_saved {
        return Ok(y);
    }
    Ok(PyTuple::new(
        py,
        [
            y,
            out(py, h)?.into_any(),
            out(py, z)?.into_any(),
            out(py, n)?.into_any(),
        ],
    )?
    .into_any())
}

/// DoRA backward with the norm detached (as PEFT): with ``g = dy * magnitude / weight_norm``,
/// ``dx = g @ w0 + s * (g @ lora_B) @ lora_A``, ``d_lora_A = s * (g @ lora_B).T @ x``,
/// ``d_lora_B = s * g.T @ (x @ lora_A.T)``,
/// ``d_magnitude = sum_T(dy * (x @ w0.T + s * x @ lora_A.T @ lora_B.T)) / weight_norm``.
/// The forward's saved state is recomputed unless ``h`` and ``z`` (from ``dora_forward(...,
/// return_saved=True)``, with its ``weight_norm``) are given.
///
/// Args:
///     dy: float32 ``[T, out]``; the others as ``dora_forward``.
///     h, z: optional float32 ``[T, r]`` and ``[T, out]``, the forward's saved state; both or
///         neither, and with them ``weight_norm``.
///
/// Returns:
///     (dx ``[T, in]``, d_lora_A ``[r, in]``, d_lora_B ``[out, r]``, d_magnitude ``[out]``),
///     float32.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
#[pyo3(signature = (dy, x, w0, lora_A, lora_B, scaling, magnitude, weight_norm=None, h=None, z=None))]
pub(crate) fn dora_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    w0: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    magnitude: &Bound<'py, PyAny>,
    weight_norm: Option<&Bound<'py, PyAny>>,
    h: Option<&Bound<'py, PyAny>>,
    z: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Out<'py>, Out<'py>, Out<'py>, Out<'py>)> {
    let mut d = Dims::default();
    let x = d.take(x, "x", &["T", "in"])?;
    let w0 = d.take_w0(w0, "w0")?;
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let dy = d.take(dy, "dy", &["T", "out"])?;
    let m = d.take(magnitude, "magnitude", &["out"])?;
    let n = d.take_opt(weight_norm, "weight_norm", &["out"])?;
    let h = d.take_opt(h, "h", &["T", "r"])?;
    let z = d.take_opt(z, "z", &["T", "out"])?;
    let s = scalar(scaling, "scaling")?;
    if h.is_some() != z.is_some() || (h.is_some() && n.is_none()) {
        return Err(PyValueError::new_err(
            "`h` and `z` go together, and with the `weight_norm` of the same forward",
        ));
    }
    let g = run(py, |be| {
        let (x, a, b, m) = (x.tensor(), a.tensor(), b.tensor(), m.tensor());
        let fresh;
        let (h, z, n) = match (opt(&h), opt(&z), opt(&n)) {
            (Some(h), Some(z), Some(n)) => (h, z, n),
            (_, _, n) => {
                fresh = forward(be, x, &w0, None, a, b, s, m, n)?;
                (&fresh.1, &fresh.2, &fresh.3)
            }
        };
        let g = be.linear_lowrank_backward(
            dy.tensor(),
            x,
            h,
            Some(z),
            w0.base(),
            &LowRank::dora(a, b, s, m, Some(n)),
            GradWants::DORA,
        )?;
        Ok((
            down(g.dx),
            down_need(g.d_lora_a, "d_lora_A")?,
            down_need(g.d_lora_b, "d_lora_B")?,
            down_need(g.d_magnitude, "d_magnitude")?,
        ))
    })?;
    Ok((out(py, g.0)?, out(py, g.1)?, out(py, g.2)?, out(py, g.3)?))
}

/// Returns a new merged weight ``(magnitude / weight_norm)[:, None] * (w0 + scaling * lora_B @ lora_A)``,
/// float32 ``[out, in]``. ``weight_norm`` (float32 ``[out]``) must be the norm of the UNmerged
/// weight; it is computed from ``w0`` when omitted. Keep it for ``dora_unmerge``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
#[pyo3(signature = (w0, lora_A, lora_B, scaling, magnitude, weight_norm=None))]
pub(crate) fn dora_merge<'py>(
    py: Python<'py>,
    w0: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    magnitude: &Bound<'py, PyAny>,
    weight_norm: Option<&Bound<'py, PyAny>>,
) -> PyResult<Out<'py>> {
    let mut d = Dims::default();
    let w0 = W0::Dense(d.take(w0, "w0", &["out", "in"])?);
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let m = d.take(magnitude, "magnitude", &["out"])?;
    let n = d.take_opt(weight_norm, "weight_norm", &["out"])?;
    let s = scalar(scaling, "scaling")?;
    let w = run(py, |be| {
        let (a, b) = (a.tensor(), b.tensor());
        let n = norm(be, &w0, a, b, s, &n)?;
        let mut w = w0.dense("dora_merge")?.clone();
        be.lowrank_merge(&mut w, &LowRank::dora(a, b, s, m.tensor(), Some(&n)), 1.0)?;
        Ok(down(w))
    })?;
    out(py, w)
}

/// Inverse of ``dora_merge`` (PEFT ``unmerge``): returns a new
/// ``w / (magnitude / weight_norm)[:, None] - scaling * lora_B @ lora_A``, float32 ``[out, in]``,
/// with the same ``weight_norm`` (float32 ``[out]``) that the merge used.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``; ValueError also when some
///     ``magnitude / weight_norm`` is zero or not finite.
#[pyfunction]
pub(crate) fn dora_unmerge<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    magnitude: &Bound<'py, PyAny>,
    weight_norm: &Bound<'py, PyAny>,
) -> PyResult<Out<'py>> {
    let mut d = Dims::default();
    let w = d.take(w, "w", &["out", "in"])?;
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let m = d.take(magnitude, "magnitude", &["out"])?;
    let n = d.take(weight_norm, "weight_norm", &["out"])?;
    let s = scalar(scaling, "scaling")?;
    let w = run(py, |be| {
        let mut w = w.tensor().clone();
        let term = LowRank::dora(a.tensor(), b.tensor(), s, m.tensor(), Some(n.tensor()));
        be.lowrank_merge(&mut w, &term, -1.0)?;
        Ok(down(w))
    })?;
    out(py, w)
}
