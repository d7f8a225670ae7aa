//! Argument checking: every array argument is checked (a numpy array or a [`PyFrozenWeight`],
//! dtype float32, C-contiguous, the expected number of dims, finite) and copied out before any
//! kernel runs, and [`Dims`] checks that the shapes of a call's arguments agree, naming the
//! argument that disagrees.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use lorafuse::backend::Base;
use lorafuse::{Backend, Cpu, Tensor};
use numpy::{
    PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::run::{Out, out};

/// The tensor type of the CPU reference backend, which every kernel here runs on.
pub(crate) type T = Tensor<Cpu>;

/// A validated float32 argument, copied out of its numpy array (the kernels copy into their own
/// tensors anyway), so that no Python object is touched while the GIL is released.
pub(crate) struct Arr {
    t: Held,
}

/// An argument's tensor: copied out of a numpy array, or shared with a [`PyFrozenWeight`].
enum Held {
    Owned(T),
    Shared(Arc<Frozen>),
}

/// The value in `cell`, computed by `make` the first time (two threads may both compute it; the
/// values are the same and one is kept). `OnceLock::get_or_try_init` is not stable yet.
pub(crate) fn once<V>(
    cell: &OnceLock<V>,
    make: impl FnOnce() -> lorafuse::Result<V>,
) -> lorafuse::Result<&V> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = make()?;
    Ok(cell.get_or_init(|| v))
}

/// A frozen weight and what is derived from it once (DoRA's `||W0||_row^2`, on first use).
struct Frozen {
    w: T,
    row_sq: OnceLock<T>,
}

impl Arr {
    /// The argument's tensor, borrowed (no copy).
    pub(crate) fn tensor(&self) -> &T {
        match &self.t {
            Held::Owned(t) => t,
            Held::Shared(f) => &f.w,
        }
    }
    /// `||W||_row^2` of a 2-D weight: computed once per [`PyFrozenWeight`], per call otherwise.
    pub(crate) fn row_sq(&self, be: &Cpu) -> lorafuse::Result<Cow<'_, T>> {
        match &self.t {
            Held::Owned(t) => Ok(Cow::Owned(be.row_sq_norms(Base::Dense(t))?)),
            Held::Shared(f) => Ok(Cow::Borrowed(once(&f.row_sq, || {
                be.row_sq_norms(Base::Dense(&f.w))
            })?)),
        }
    }
    pub(crate) fn shape(&self) -> &[usize] {
        self.tensor().shape()
    }
    pub(crate) fn data(&self) -> &[f32] {
        self.tensor().data()
    }
    pub(crate) fn into_parts(self) -> (Vec<usize>, Vec<f32>) {
        let shape = self.shape().to_vec();
        match self.t {
            Held::Owned(t) => (shape, t.into_vec()),
            Held::Shared(f) => (shape, f.w.data().to_vec()),
        }
    }
}

/// An optional argument's tensor, borrowed.
pub(crate) fn opt(a: &Option<Arr>) -> Option<&T> {
    a.as_ref().map(Arr::tensor)
}

/// A frozen weight checked and copied into lorafuse once, then passed to the kernels in place
/// of its array (``w0`` arguments) with no per-call copy or check: what a layer does with a
/// base weight that never changes.
///
/// Args:
///     w: float32 C-contiguous array, finite (checked once, here).
#[pyclass(module = "lorafuse", name = "FrozenWeight", frozen)]
pub(crate) struct PyFrozenWeight {
    inner: Arc<Frozen>,
}

#[pymethods]
impl PyFrozenWeight {
    #[new]
    fn new(w: &Bound<'_, PyAny>) -> PyResult<Self> {
        let a = array(w, "w", None)?;
        let f = match a.t {
            Held::Owned(w) => Arc::new(Frozen {
                w,
                row_sq: OnceLock::new(),
            }),
            Held::Shared(f) => f,
        };
        Ok(PyFrozenWeight { inner: f })
    }
    /// The weight's shape.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.inner.w.shape())
    }
    /// A new float32 array holding the weight.
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Out<'py>> {
        out(
            py,
            (self.inner.w.data().to_vec(), self.inner.w.shape().to_vec()),
        )
    }
}

/// The Python type name of `obj`, for error messages.
pub(crate) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Checks that `obj` is a C-contiguous float32 numpy array with `ndim` dims (any if `None`)
/// and only finite values, and copies it out.
pub(crate) fn array(obj: &Bound<'_, PyAny>, name: &str, ndim: Option<usize>) -> PyResult<Arr> {
    let py = obj.py();
    if let Ok(f) = obj.cast::<PyFrozenWeight>() {
        let t = f.get().inner.clone();
        if let Some(nd) = ndim
            && t.w.shape().len() != nd
        {
            return Err(PyValueError::new_err(format!(
                "`{name}` must be a {nd}-D array, got shape {}",
                fmt_shape(t.w.shape())
            )));
        }
        return Ok(Arr { t: Held::Shared(t) });
    }
    let a = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "`{name}` must be a numpy.ndarray of dtype float32, got {}",
            type_name(obj)
        ))
    })?;
    let dt = a.dtype();
    if !dt.is_equiv_to(&numpy::dtype::<f32>(py)) {
        return Err(PyTypeError::new_err(format!(
            "`{name}` must have dtype float32 (native byte order), got {dt}; \
             convert with .astype(numpy.float32)"
        )));
    }
    let shape = a.shape().to_vec();
    if let Some(nd) = ndim
        && shape.len() != nd
    {
        return Err(PyValueError::new_err(format!(
            "`{name}` must be a {nd}-D array, got shape {}",
            fmt_shape(&shape)
        )));
    }
    if !a.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "`{name}` must be C-contiguous (row-major); pass numpy.ascontiguousarray({name})"
        )));
    }
    let typed = a
        .cast::<PyArrayDyn<f32>>()
        .map_err(|e| PyTypeError::new_err(format!("`{name}`: {e}")))?;
    let data = typed
        .to_vec()
        .map_err(|e| PyValueError::new_err(format!("`{name}`: {e}")))?;
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "`{name}` must be finite, got {} at flat index {i}",
            data[i]
        )));
    }
    // The one copy out of numpy becomes the kernel's tensor as it is.
    let t = Cpu
        .from_vec(data, &shape)
        .map_err(|e| PyValueError::new_err(format!("`{name}`: {e}")))?;
    Ok(Arr { t: Held::Owned(t) })
}

/// A shape as Python prints a tuple: `(2, 3)`.
pub(crate) fn fmt_shape(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("({})", parts.join(", "))
}

/// Symbolic dims (`T`, `in`, `out`, `r` ...) bound by the first argument that has them, so that
/// a later argument whose shape disagrees is the one named in the error.
#[derive(Default)]
pub(crate) struct Dims(Vec<(&'static str, usize)>);

impl Dims {
    fn get(&self, sym: &str) -> Option<usize> {
        self.0.iter().find(|(s, _)| *s == sym).map(|&(_, v)| v)
    }

    /// The size a dim must have: a literal (`"1"`), or a symbol's bound value.
    fn want(&self, sym: &str) -> Option<usize> {
        sym.parse().ok().or_else(|| self.get(sym))
    }

    /// Checks and copies array argument `name`, whose shape must be `spec` (dim symbols).
    pub(crate) fn take(
        &mut self,
        obj: &Bound<'_, PyAny>,
        name: &str,
        spec: &[&'static str],
    ) -> PyResult<Arr> {
        let a = array(obj, name, Some(spec.len()))?;
        self.bind(name, a.shape(), spec)?;
        Ok(a)
    }

    /// Checks `shape` of argument `name` against `spec` and binds its new symbols.
    pub(crate) fn bind(
        &mut self,
        name: &str,
        shape: &[usize],
        spec: &[&'static str],
    ) -> PyResult<()> {
        let mismatch = spec
            .iter()
            .zip(shape)
            .any(|(sym, &got)| self.want(sym).is_some_and(|want| want != got));
        if mismatch {
            let expected: Vec<String> = spec
                .iter()
                .map(|sym| match (sym.parse::<usize>(), self.get(sym)) {
                    (Ok(_), _) | (_, None) => sym.to_string(),
                    (_, Some(v)) => format!("{sym}={v}"),
                })
                .collect();
            return Err(PyValueError::new_err(format!(
                "`{name}` must have shape [{}], got {}",
                expected.join(", "),
                fmt_shape(shape)
            )));
        }
        for (sym, &got) in spec.iter().zip(shape) {
            if self.want(sym).is_none() {
                self.0.push((sym, got));
            }
        }
        Ok(())
    }

    /// An optional array argument: `None` (or absent) stays `None`.
    pub(crate) fn take_opt(
        &mut self,
        obj: Option<&Bound<'_, PyAny>>,
        name: &str,
        spec: &[&'static str],
    ) -> PyResult<Option<Arr>> {
        match obj {
            Some(o) if !o.is_none() => self.take(o, name, spec).map(Some),
            _ => Ok(None),
        }
    }

    /// `small <= big` for two bound dims (VeRA's slicing of the shared projections).
    pub(crate) fn at_most(&self, name: &str, small: &str, big: &str) -> PyResult<()> {
        match (self.get(small), self.get(big)) {
            (Some(s), Some(b)) if s > b => Err(PyValueError::new_err(format!(
                "`{name}` is too small: needs {big} >= {small} = {s}, got {big} = {b}"
            ))),
            _ => Ok(()),
        }
    }
}

/// A finite float argument (a Python float or int, or anything with `__float__`).
pub(crate) fn scalar(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<f32> {
    let v: f64 = obj.extract().map_err(|_| {
        PyTypeError::new_err(format!("`{name}` must be a float, got {}", type_name(obj)))
    })?;
    finite(name, v as f32)
}

fn finite(name: &str, v: f32) -> PyResult<f32> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(PyValueError::new_err(format!(
            "`{name}` must be a finite float, got {v}"
        )))
    }
}
