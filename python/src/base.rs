//! Base weights, dense or NF4: a `w0` argument as the fused op takes it ([`Base`]).

use std::borrow::Cow;

use lorafuse::backend::{Base, Nf4Weight};
use lorafuse::{Backend, Cpu, Error};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::args::{Arr, Dims, T, fmt_shape, once};
use crate::nf4::PyNf4;
use crate::run::to_py;

/// A `w0` argument as the kernels take it.
pub(crate) enum W0 {
    Dense(Arr),
    /// An NF4 weight (the Python object, which caches its `||W||_row^2`, and the weight).
    Nf4(Py<PyNf4>, Nf4Weight<Cpu>),
}

impl W0 {
    /// The base of the fused op: an NF4 weight is dequantized tile by tile inside the products.
    pub(crate) fn base(&self) -> Base<'_, Cpu> {
        match self {
            W0::Dense(a) => Base::Dense(a.tensor()),
            W0::Nf4(_, w) => Base::Nf4(w),
        }
    }
    /// The dense weight, for the ops that need one (`what` names the op in the error).
    pub(crate) fn dense(&self, what: &str) -> lorafuse::Result<&T> {
        match self {
            W0::Dense(a) => Ok(a.tensor()),
            W0::Nf4(..) => Err(Error::arg(
                "w0",
                format!("{what} needs a float32 weight; dequantize the Nf4Tensor first"),
            )),
        }
    }
    /// `||W||_row^2`: computed once per FrozenWeight or Nf4Tensor, per call for an array.
    pub(crate) fn row_sq(&self, be: &Cpu) -> lorafuse::Result<Cow<'_, T>> {
        match self {
            W0::Dense(a) => a.row_sq(be),
            // A frozen pyclass: readable without the GIL.
            W0::Nf4(q, w) => Ok(Cow::Borrowed(once(&q.get().row_sq, || {
                be.row_sq_norms(Base::Nf4(w))
            })?)),
        }
    }
}

impl Dims {
    /// A base weight argument `[out, in]`: a float32 array, a `FrozenWeight`, or an
    /// `nf4.Nf4Tensor` (then the products dequantize it tile by tile, QLoRA's way).
    pub(crate) fn take_w0(&mut self, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<W0> {
        let Ok(q) = obj.cast::<PyNf4>() else {
            return self.take(obj, name, &["out", "in"]).map(W0::Dense);
        };
        let handle = q.clone().unbind();
        let q = q.get();
        if q.inner.shape().len() != 2 {
            return Err(PyValueError::new_err(format!(
                "`{name}` must be a 2-D Nf4Tensor [out, in], got shape {}",
                fmt_shape(q.inner.shape())
            )));
        }
        self.bind(name, q.inner.shape(), &["out", "in"])?;
        Ok(W0::Nf4(handle, q.weight().map_err(to_py)?))
    }
}
