//! Running kernels: on the CPU backend with the GIL released, a panic caught as
//! `RuntimeError`, lorafuse's errors mapped to Python exceptions, results handed to numpy.

use std::panic::{AssertUnwindSafe, catch_unwind};

use lorafuse::{Cpu, Error};
use numpy::{PyArray, PyArrayDyn, PyArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::args::T;

/// A dense result on its way back to Python: row-major data and shape.
pub(crate) type Host = (Vec<f32>, Vec<usize>);
/// A float32 numpy array returned to Python.
pub(crate) type Out<'py> = Bound<'py, PyArrayDyn<f32>>;

/// A lorafuse error as Python sees it: a bad argument is a `ValueError`, an I/O error an
/// `OSError` (`FileNotFoundError`, `PermissionError`, ... by its kind), anything else a
/// `RuntimeError`.
pub(crate) fn to_py(e: Error) -> PyErr {
    match e {
        Error::Shape { .. } | Error::InvalidArgument { .. } | Error::NonFinite { .. } => {
            PyValueError::new_err(e.to_string())
        }
        Error::Io { ref source, .. } => io_err(source.kind(), e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// An I/O error as Python's OSError subclass of its kind (as `open()` raises them), the message
/// naming the path.
fn io_err(kind: std::io::ErrorKind, msg: String) -> PyErr {
    use pyo3::exceptions::{
        PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyNotADirectoryError,
        PyOSError, PyPermissionError,
    };
    use std::io::ErrorKind as K;
    match kind {
        K::NotFound => PyFileNotFoundError::new_err(msg),
        K::PermissionDenied => PyPermissionError::new_err(msg),
        K::AlreadyExists => PyFileExistsError::new_err(msg),
        K::IsADirectory => PyIsADirectoryError::new_err(msg),
        K::NotADirectory => PyNotADirectoryError::new_err(msg),
        _ => PyOSError::new_err(msg),
    }
}

/// Errors of the adapter files: malformed content is a `ValueError`, I/O a `RuntimeError`.
pub(crate) fn file_err(e: Error) -> PyErr {
    match e {
        Error::Format { .. } | Error::Missing { .. } | Error::Json { .. } => {
            PyValueError::new_err(e.to_string())
        }
        other => to_py(other),
    }
}

/// Runs `f` on the CPU backend with the GIL released; a panic becomes `RuntimeError`.
pub(crate) fn run<R: Send>(
    py: Python<'_>,
    f: impl FnOnce(&Cpu) -> lorafuse::Result<R> + Send,
) -> PyResult<R> {
    py.detach(|| catch_unwind(AssertUnwindSafe(|| f(&Cpu))))
        .map_err(|_| {
            PyRuntimeError::new_err("internal error: a lorafuse kernel panicked (please report it)")
        })?
        .map_err(to_py)
}

/// A part of a fused op's result that the op promises for the arguments it was given (`h` with
/// a term, a gradient that was asked for); its absence is lorafuse's bug, a `RuntimeError`.
pub(crate) fn need(t: Option<T>, what: &str) -> lorafuse::Result<T> {
    t.ok_or_else(|| Error::Backend {
        backend: "cpu".into(),
        msg: format!("internal error: the fused op returned no `{what}` (please report it)"),
    })
}

/// A result tensor handed to numpy: its buffer moves, it is not copied.
pub(crate) fn down(t: T) -> Host {
    let shape = t.shape().to_vec();
    (t.into_vec(), shape)
}

/// [`down`] of a part of a fused op's result ([`need`]).
pub(crate) fn down_need(t: Option<T>, what: &str) -> lorafuse::Result<Host> {
    need(t, what).map(down)
}

/// A host result as a new float32 numpy array.
pub(crate) fn out<'py>(py: Python<'py>, (data, shape): Host) -> PyResult<Out<'py>> {
    PyArray::from_vec(py, data).reshape(shape.as_slice())
}
