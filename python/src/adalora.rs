//! AdaLoRA: the fused op with `lora_E` per rank and the factor
//! `c = scaling / (ranknum + 1e-5)`.

use std::borrow::Cow;

use lorafuse::backend::{Base, GradWants, LowRank, check};
use lorafuse::{Backend, Cpu};
use pyo3::prelude::*;

use crate::args::{Arr, Dims, opt, scalar};
use crate::run::{Out, down, down_need, out, run};

/// AdaLoRA's adapter arrays.
struct AdaLora {
    a: Arr,
    b: Arr,
    e: Arr,
}

impl AdaLora {
    /// Checks the arrays (after `w`/`x` bound `out` and `in`).
    fn take(
        d: &mut Dims,
        lora_A: &Bound<'_, PyAny>,
        lora_B: &Bound<'_, PyAny>,
        lora_E: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let a = d.take(lora_A, "lora_A", &["r", "in"])?;
        let b = d.take(lora_B, "lora_B", &["out", "r"])?;
        let e = d.take(lora_E, "lora_E", &["r", "1"])?;
        Ok(AdaLora { a, b, e })
    }

    /// The term of the fused op. Errors: a `ranknum` that is not positive.
    fn term(&self, (scaling, ranknum): (f32, f32)) -> lorafuse::Result<LowRank<'_, Cpu>> {
        let c = check::adalora_factor(scaling, ranknum)?;
        Ok(LowRank::adalora(
            self.a.tensor(),
            self.b.tensor(),
            self.e.tensor(),
            c,
        ))
    }
}

/// `(scaling, ranknum)`, checked finite.
fn scalars(scaling: &Bound<'_, PyAny>, ranknum: &Bound<'_, PyAny>) -> PyResult<(f32, f32)> {
    Ok((scalar(scaling, "scaling")?, scalar(ranknum, "ranknum")?))
}

/// Fused AdaLoRA forward (PEFT ``adalora.SVDLinear``):
/// ``y = x @ w0.T + bias + (x @ (lora_A * lora_E).T) @ lora_B.T * scaling / (ranknum + 1e-5)``.
///
/// Args:
///     x: float32 ``[T, in]``.
///     w0: float32 ``[out, in]``.
///     lora_A: float32 ``[r, in]``.
///     lora_B: float32 ``[out, r]``.
///     lora_E: float32 ``[r, 1]`` (masked ranks hold 0).
///     scaling: float, PEFT's ``lora_alpha`` (not alpha / r).
///     ranknum: float, ``init_r`` (not changed by masking).
///     bias: optional float32 ``[out]``.
///
/// Returns:
///     y, float32 ``[T, out]``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
#[pyo3(signature = (x, w0, lora_A, lora_B, lora_E, scaling, ranknum, bias=None))]
pub(crate) fn adalora_forward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w0: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    lora_E: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    ranknum: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Out<'py>> {
    let mut d = Dims::default();
    let x = d.take(x, "x", &["T", "in"])?;
    let w0 = d.take(w0, "w0", &["out", "in"])?;
    let ada = AdaLora::take(&mut d, lora_A, lora_B, lora_E)?;
    let bias = d.take_opt(bias, "bias", &["out"])?;
    let sr = scalars(scaling, ranknum)?;
    let y = run(py, |be| {
        let base = Base::Dense(w0.tensor());
        let o = be.linear_lowrank(x.tensor(), base, opt(&bias), Some(&ada.term(sr)?))?;
        Ok(down(o.y))
    })?;
    out(py, y)
}

/// AdaLoRA backward: with ``c = scaling / (ranknum + 1e-5)``, ``gB = dy @ lora_B`` and
/// ``M = c * gB.T @ x``: ``dx = dy @ w0 + c * gB @ (lora_A * lora_E)``,
/// ``d_lora_A = M * lora_E``, ``d_lora_B = c * dy.T @ (h * lora_E.T)``,
/// ``d_lora_E[j] = sum_i M[j, i] * lora_A[j, i]`` (non-zero for masked ranks too).
///
/// Args:
///     dy: float32 ``[T, out]``; the others as ``adalora_forward``.
///     h: optional float32 ``[T, r]``, ``x @ lora_A.T`` (before ``lora_E``, as for
///         ``lora_backward``; recomputed when omitted).
///
/// Returns:
///     (dx ``[T, in]``, d_lora_A ``[r, in]``, d_lora_B ``[out, r]``, d_lora_E ``[r, 1]``), float32.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
#[pyo3(signature = (dy, x, w0, lora_A, lora_B, lora_E, scaling, ranknum, h=None))]
pub(crate) fn adalora_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    w0: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    lora_E: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    ranknum: &Bound<'py, PyAny>,
    h: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Out<'py>, Out<'py>, Out<'py>, Out<'py>)> {
    let mut d = Dims::default();
    let x = d.take(x, "x", &["T", "in"])?;
    let w0 = d.take(w0, "w0", &["out", "in"])?;
    let ada = AdaLora::take(&mut d, lora_A, lora_B, lora_E)?;
    let dy = d.take(dy, "dy", &["T", "out"])?;
    let h = d.take_opt(h, "h", &["T", "r"])?;
    let sr = scalars(scaling, ranknum)?;
    let g = run(py, |be| {
        let (x, term) = (x.tensor(), ada.term(sr)?);
        let h = match opt(&h) {
            Some(h) => Cow::Borrowed(h),
            None => Cow::Owned(be.linear(x, term.lora_a, None)?),
        };
        let base = Base::Dense(w0.tensor());
        let g =
            be.linear_lowrank_backward(dy.tensor(), x, &h, None, base, &term, GradWants::ADALORA)?;
        Ok((
            down(g.dx),
            down_need(g.d_lora_a, "d_lora_A")?,
            down_need(g.d_lora_b, "d_lora_B")?,
            down_need(g.d_rank_scale, "d_lora_E")?,
        ))
    })?;
    Ok((out(py, g.0)?, out(py, g.1)?, out(py, g.2)?, out(py, g.3)?))
}

fn adalora_merge_impl<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    wname: &str,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    lora_E: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    ranknum: &Bound<'py, PyAny>,
    sign: f32,
) -> PyResult<Out<'py>> {
    let mut d = Dims::default();
    let w = d.take(w, wname, &["out", "in"])?;
    let ada = AdaLora::take(&mut d, lora_A, lora_B, lora_E)?;
    let sr = scalars(scaling, ranknum)?;
    let m = run(py, |be| {
        let mut w = w.tensor().clone();
        be.lowrank_merge(&mut w, &ada.term(sr)?, sign)?;
        Ok(down(w))
    })?;
    out(py, m)
}

/// Returns a new ``w0 + lora_B @ (lora_A * lora_E) * scaling / (ranknum + 1e-5)``, float32
/// ``[out, in]``; shapes as ``adalora_forward``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
pub(crate) fn adalora_merge<'py>(
    py: Python<'py>,
    w0: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    lora_E: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    ranknum: &Bound<'py, PyAny>,
) -> PyResult<Out<'py>> {
    adalora_merge_impl(py, w0, "w0", lora_A, lora_B, lora_E, scaling, ranknum, 1.0)
}

/// Inverse of ``adalora_merge``: returns a new
/// ``w - lora_B @ (lora_A * lora_E) * scaling / (ranknum + 1e-5)``, float32 ``[out, in]``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
pub(crate) fn adalora_unmerge<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    lora_E: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
    ranknum: &Bound<'py, PyAny>,
) -> PyResult<Out<'py>> {
    adalora_merge_impl(py, w, "w", lora_A, lora_B, lora_E, scaling, ranknum, -1.0)
}
