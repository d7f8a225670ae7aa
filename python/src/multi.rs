//! Many adapters in one batch (Punica's SGMV/BGMV, S-LoRA, vLLM's multi-LoRA; PEFT's
//! `model(..., adapter_names=[...])`): every row of `x` adds the low-rank term of its own
//! adapter, or none, to ONE base product (`Backend::lowrank_pool`, `Backend::linear_multi`).
//!
//! An adapter's term on a projection is a dict (LoRA: `lora_A`, `lora_B`, `scaling`; VeRA:
//! `vera_A`, `vera_B`, `lambda_d`, `lambda_b`; AdaLoRA: `lora_A`, `lora_B`, `lora_E`,
//! `scaling`, `ranknum`) or `None` (the adapter leaves the projection alone). The terms are
//! packed once into a [`PyLoraPool`] (each term's scales folded into its B); DoRA is refused,
//! as in PEFT: its column scale rescales the base product per adapter.

use lorafuse::backend::{LowRank, LowRankPool, check};
use lorafuse::{Backend, Cpu, Error};
use numpy::{PyArray1, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::args::{Arr, Dims, fmt_shape, opt, scalar, type_name};
use crate::run::{Out, down, out, run};

/// The keys of each method's term, in the order they are checked.
const LORA_KEYS: &[&str] = &["lora_A", "lora_B", "scaling"];
const VERA_KEYS: &[&str] = &["vera_A", "vera_B", "lambda_d", "lambda_b"];
const ADALORA_KEYS: &[&str] = &["lora_A", "lora_B", "lora_E", "scaling", "ranknum"];

/// One adapter's term on the projection, checked and copied out of its dict.
enum Term {
    /// `scaling * (x A^T) B^T` (rsLoRA differs only in `scaling`).
    Lora { a: Arr, b: Arr, s: f32 },
    /// `lambda_b * ((lambda_d * (x As^T)) Bs^T)` over the shared projections.
    Vera { a: Arr, b: Arr, ld: Arr, lb: Arr },
    /// `(x (A * E)^T) B^T * c`, `c = scaling / (ranknum + 1e-5)`.
    AdaLora { a: Arr, b: Arr, e: Arr, c: f32 },
}

impl Term {
    fn low_rank(&self) -> LowRank<'_, Cpu> {
        match self {
            Term::Lora { a, b, s } => LowRank::lora(a.tensor(), b.tensor(), *s),
            Term::Vera { a, b, ld, lb } => {
                LowRank::vera(a.tensor(), b.tensor(), ld.tensor(), lb.tensor())
            }
            Term::AdaLora { a, b, e, c } => {
                LowRank::adalora(a.tensor(), b.tensor(), e.tensor(), *c)
            }
        }
    }

    fn method(&self) -> &'static str {
        match self {
            Term::Lora { .. } => "lora",
            Term::Vera { .. } => "vera",
            Term::AdaLora { .. } => "adalora",
        }
    }
}

/// A lorafuse error of the pool with the tensor it names renamed from the core's `terms[i]...`
/// to this API's `adapters[i]...` (the checks here normally catch everything first).
fn adapters_err(e: Error) -> Error {
    let rename = |n: String| match n.strip_prefix("terms[") {
        Some(rest) => format!("adapters[{rest}"),
        None => n,
    };
    match e {
        Error::Shape {
            name,
            expected,
            actual,
        } => Error::Shape {
            name: rename(name),
            expected,
            actual,
        },
        Error::InvalidArgument { name, msg } => Error::InvalidArgument {
            name: rename(name),
            msg,
        },
        e => e,
    }
}

/// A list or tuple argument's items.
fn items<'py>(obj: &Bound<'py, PyAny>, name: &str, what: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if let Ok(l) = obj.cast::<PyList>() {
        Ok(l.iter().collect())
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        Ok(t.iter().collect())
    } else {
        Err(PyTypeError::new_err(format!(
            "`{name}` must be a list {what}, got {}",
            type_name(obj)
        )))
    }
}

/// Adapter `i`'s term on a projection `[dout, din]`: `None`, or a dict whose keys say the
/// method (VeRA: `vera_A` ...; AdaLoRA: `lora_E` ...; else LoRA).
fn parse_term(obj: &Bound<'_, PyAny>, i: usize, din: usize, dout: usize) -> PyResult<Option<Term>> {
    if obj.is_none() {
        return Ok(None);
    }
    let name = format!("adapters[{i}]");
    let dict = obj.cast::<PyDict>().map_err(|_| {
        PyTypeError::new_err(format!(
            "`{name}` must be a dict (LoRA: lora_A, lora_B, scaling; VeRA: vera_A, vera_B, \
             lambda_d, lambda_b; AdaLoRA: lora_A, lora_B, lora_E, scaling, ranknum) or None, \
             got {}",
            type_name(obj)
        ))
    })?;
    let mut keys = Vec::new();
    for k in dict.keys() {
        let s: String = k.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "`{name}` must have str keys, got a key of type {}",
                type_name(&k)
            ))
        })?;
        keys.push(s);
    }
    let has = |k: &str| keys.iter().any(|x| x == k);
    if has("magnitude") || has("lora_magnitude_vector") {
        return Err(PyValueError::new_err(format!(
            "`{name}` is a DoRA term, which cannot join a mixed batch: its column scale \
             m / ||W + dW|| rescales the base product per adapter, so its rows cannot share one \
             x @ w0.T (PEFT's adapter_names refuses DoRA too); merge it, or serve it alone with \
             dora_forward"
        )));
    }
    let (method, spec) = if ["vera_A", "vera_B", "lambda_d", "lambda_b"]
        .iter()
        .any(|k| has(k))
    {
        ("VeRA", VERA_KEYS)
    } else if has("lora_E") || has("ranknum") {
        ("AdaLoRA", ADALORA_KEYS)
    } else {
        ("LoRA", LORA_KEYS)
    };
    if let Some(k) = keys.iter().find(|k| !spec.contains(&k.as_str())) {
        return Err(PyValueError::new_err(format!(
            "`{name}` has the unknown key '{k}' for a {method} term (its keys: {})",
            spec.join(", ")
        )));
    }
    if let Some(k) = spec.iter().find(|k| !has(k)) {
        return Err(PyValueError::new_err(format!(
            "`{name}` lacks the key '{k}' of a {method} term (its keys: {})",
            spec.join(", ")
        )));
    }
    let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
        dict.get_item(k)?
            .ok_or_else(|| PyValueError::new_err(format!("`{name}` lacks the key '{k}'")))
    };
    let n = |k: &str| format!("{name}.{k}");
    let mut d = Dims::default();
    // The projection's dims come first (a fresh Dims: this cannot fail).
    d.bind("w0", &[dout, din], &["out", "in"])?;
    let term = match method {
        "LoRA" => {
            let a = d.take(&get("lora_A")?, &n("lora_A"), &["r", "in"])?;
            let b = d.take(&get("lora_B")?, &n("lora_B"), &["out", "r"])?;
            let s = scalar(&get("scaling")?, &n("scaling"))?;
            Term::Lora { a, b, s }
        }
        "VeRA" => {
            let a = d.take(&get("vera_A")?, &n("vera_A"), &["r", "max_in"])?;
            let b = d.take(&get("vera_B")?, &n("vera_B"), &["max_out", "r"])?;
            d.at_most(&n("vera_A"), "in", "max_in")?;
            d.at_most(&n("vera_B"), "out", "max_out")?;
            let ld = d.take(&get("lambda_d")?, &n("lambda_d"), &["r"])?;
            let lb = d.take(&get("lambda_b")?, &n("lambda_b"), &["out"])?;
            Term::Vera { a, b, ld, lb }
        }
        _ => {
            let a = d.take(&get("lora_A")?, &n("lora_A"), &["r", "in"])?;
            let b = d.take(&get("lora_B")?, &n("lora_B"), &["out", "r"])?;
            let e = d.take(&get("lora_E")?, &n("lora_E"), &["r", "1"])?;
            let s = scalar(&get("scaling")?, &n("scaling"))?;
            let rn = scalar(&get("ranknum")?, &n("ranknum"))?;
            let c = check::adalora_factor(s, rn).map_err(|_| {
                PyValueError::new_err(format!(
                    "`{}` must be a positive number (init_r), got {rn}",
                    n("ranknum")
                ))
            })?;
            Term::AdaLora { a, b, e, c }
        }
    };
    if term.low_rank().r() == 0 {
        let a = if method == "VeRA" { "vera_A" } else { "lora_A" };
        return Err(PyValueError::new_err(format!(
            "`{}` has rank 0 (shape {}); pass None for an adapter that leaves this projection \
             alone",
            n(a),
            fmt_shape(term.low_rank().lora_a.shape())
        )));
    }
    Ok(Some(term))
}

/// Every adapter's term on a projection `[dout, din]`.
fn parse_terms(
    adapters: &Bound<'_, PyAny>,
    din: usize,
    dout: usize,
) -> PyResult<Vec<Option<Term>>> {
    items(
        adapters,
        "adapters",
        "(one entry per adapter: a dict or None)",
    )?
    .iter()
    .enumerate()
    .map(|(i, t)| parse_term(t, i, din, dout))
    .collect()
}

/// Packs the terms (on the CPU backend, GIL released).
fn pack(
    py: Python<'_>,
    terms: &[Option<Term>],
    din: usize,
    dout: usize,
) -> PyResult<LowRankPool<Cpu>> {
    run(py, |be| {
        let lr: Vec<Option<LowRank<'_, Cpu>>> = terms
            .iter()
            .map(|t| t.as_ref().map(Term::low_rank))
            .collect();
        be.lowrank_pool(din, dout, &lr).map_err(adapters_err)
    })
}

/// The adapter of each of `t` rows, in `-1..k` (-1: the base model only): a 1-D integer numpy
/// array or a list/tuple of ints.
fn indices(obj: &Bound<'_, PyAny>, t: usize, k: usize) -> PyResult<Vec<i32>> {
    const NAME: &str = "adapter_of_row";
    let vals: Vec<i64> = if let Ok(a) = obj.cast::<PyUntypedArray>() {
        if a.ndim() != 1 {
            return Err(PyValueError::new_err(format!(
                "`{NAME}` must be a 1-D array of T={t} adapter indices, got shape {}",
                fmt_shape(a.shape())
            )));
        }
        let dt = a.dtype();
        if !matches!(dt.kind(), b'i' | b'u') {
            return Err(PyTypeError::new_err(format!(
                "`{NAME}` must hold integers (adapter indices, -1: base only), got dtype {dt}"
            )));
        }
        let a64 = obj.call_method1("astype", ("int64",))?;
        let a64 = a64
            .cast::<PyArray1<i64>>()
            .map_err(|e| PyTypeError::new_err(format!("`{NAME}`: {e}")))?;
        a64.readonly().as_array().iter().copied().collect()
    } else if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "`{NAME}` must be a 1-D int array or a list of ints, got str"
        )));
    } else {
        obj.extract::<Vec<i64>>().map_err(|_| {
            PyTypeError::new_err(format!(
                "`{NAME}` must be a 1-D int array or a list of ints (adapter indices, -1: base \
                 only), got {}",
                type_name(obj)
            ))
        })?
    };
    if vals.len() != t {
        return Err(PyValueError::new_err(format!(
            "`{NAME}` must have one adapter index per row of x: {t}, got {}",
            vals.len()
        )));
    }
    let k = k as i64;
    if let Some((row, &i)) = vals.iter().enumerate().find(|(_, i)| !(-1..k).contains(*i)) {
        return Err(PyValueError::new_err(format!(
            "`{NAME}`[{row}] = {i} is outside -1..{k} (-1: the base model only; \
             0..{k}: an adapter of the {k} given)"
        )));
    }
    Ok(vals.into_iter().map(|i| i as i32).collect())
}

/// The mixed-batch product of `pool` (checked against `x`, `w0`, `bias`, `adapter_of_row`).
fn forward_impl<'py>(
    py: Python<'py>,
    pool: Option<&LowRankPool<Cpu>>,
    x: &Bound<'py, PyAny>,
    w0: &Bound<'py, PyAny>,
    adapters: Option<&Bound<'py, PyAny>>,
    adapter_of_row: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Out<'py>> {
    let mut d = Dims::default();
    let x = d.take(x, "x", &["T", "in"])?;
    let w0 = d.take_w0(w0, "w0")?;
    let (dout, din) = w0.base().dims();
    let terms = match adapters {
        Some(a) => parse_terms(a, din, dout)?,
        None => Vec::new(),
    };
    let k = pool.map_or(terms.len(), LowRankPool::len);
    let rows = indices(adapter_of_row, x.shape()[0], k)?;
    let bias = d.take_opt(bias, "bias", &["out"])?;
    if let Some(p) = pool
        && p.dims() != (dout, din)
    {
        return Err(PyValueError::new_err(format!(
            "`w0` has shape {} but the pool holds terms of a (out, in) = {} projection",
            fmt_shape(&[dout, din]),
            fmt_shape(&[p.dims().0, p.dims().1])
        )));
    }
    let packed;
    let pool = match pool {
        Some(p) => p,
        None => {
            packed = pack(py, &terms, din, dout)?;
            &packed
        }
    };
    let y = run(py, |be| {
        let y = be.linear_multi(x.tensor(), w0.base(), opt(&bias), pool, &rows)?;
        Ok(down(y))
    })?;
    out(py, y)
}

/// Mixed-batch forward (many adapters in one batch; PEFT's ``model(..., adapter_names=[...])``
/// per row, Punica's SGMV/BGMV): row ``t`` of ``y`` is
/// ``x[t] @ w0.T + bias + term_i(x[t])`` with ``i = adapter_of_row[t]`` (no term where it is
/// -1, or where ``adapters[i]`` is None). The base product runs once for all rows; the rows of
/// one adapter need not be contiguous. Builds a ``LoraPool`` per call: serving code that reuses
/// the adapters builds one ``LoraPool`` and calls its ``forward``.
///
/// Args:
///     x: float32 ``[T, in]``.
///     w0: the frozen base weight ``[out, in]``: a float32 array, a ``FrozenWeight``, or an
///         ``nf4.Nf4Tensor`` (dequantized tile by tile inside the product, never whole).
///     adapters: a list with one entry per adapter (K in all), each ``None`` (the adapter leaves
///         this projection alone) or a dict of float32 arrays and floats whose keys say the
///         method, ranks free to differ:
///
///         * LoRA / rsLoRA: ``{"lora_A": [r, in], "lora_B": [out, r], "scaling": float}``,
///           term ``scaling * (x @ lora_A.T) @ lora_B.T``;
///         * VeRA: ``{"vera_A": [r, max_in], "vera_B": [max_out, r], "lambda_d": [r],
///           "lambda_b": [out]}``, term ``lambda_b * ((lambda_d * (x @ vera_A[:, :in].T)) @
///           vera_B[:out].T)``;
///         * AdaLoRA: ``{"lora_A": [r, in], "lora_B": [out, r], "lora_E": [r, 1],
///           "scaling": float (lora_alpha), "ranknum": float}``, term
///           ``(x @ (lora_A * lora_E).T) @ lora_B.T * scaling / (ranknum + 1e-5)``.
///
///         DoRA (a ``magnitude`` key) is refused: its column scale rescales the base product
///         per adapter (PEFT's ``adapter_names`` refuses it too).
///     adapter_of_row: ``T`` ints in ``-1..K`` (a 1-D integer array or a list): the adapter of
///         each row, -1 for the base model only.
///     bias: optional float32 ``[out]``.
///
/// Returns:
///     y, float32 ``[T, out]``.
///
/// Raises:
///     TypeError: an array is not a float32 numpy array, ``adapters`` not a list, an entry
///         neither a dict nor None, ``adapter_of_row`` not integers.
///     ValueError: shapes (named as ``adapters[i].lora_A`` ...), missing or unknown keys, a DoRA
///         term, rank 0, NaN/Inf, ``adapter_of_row`` of the wrong length or out of range.
#[pyfunction]
#[pyo3(signature = (x, w0, adapters, adapter_of_row, bias=None))]
pub(crate) fn lora_forward_multi<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w0: &Bound<'py, PyAny>,
    adapters: &Bound<'py, PyAny>,
    adapter_of_row: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Out<'py>> {
    forward_impl(py, None, x, w0, Some(adapters), adapter_of_row, bias)
}

/// A positive int argument.
fn dim(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    let v: i64 = obj.extract().map_err(|_| {
        PyTypeError::new_err(format!("`{name}` must be an int, got {}", type_name(obj)))
    })?;
    if v < 1 {
        return Err(PyValueError::new_err(format!(
            "`{name}` must be a positive int, got {v}"
        )));
    }
    Ok(v as usize)
}

/// The low-rank terms of K adapters on one projection ``[out_features, in_features]``, packed
/// once for mixed batches (each term's scales folded into its B, ranks ragged, no padding):
/// build it when the adapters are loaded, then call ``forward`` for every batch.
///
/// Args:
///     adapters: one entry per adapter, each None or a LoRA / VeRA / AdaLoRA dict, exactly as
///         for ``lora_forward_multi`` (DoRA refused). The arrays are copied: later changes to
///         them do not reach the pool.
///     in_features: ``in`` of the projection.
///     out_features: ``out`` of the projection.
///
/// Raises:
///     TypeError, ValueError: as ``lora_forward_multi``; ``in_features``/``out_features`` not
///         positive ints.
#[pyclass(module = "lorafuse", name = "LoraPool", frozen)]
pub(crate) struct PyLoraPool {
    pool: LowRankPool<Cpu>,
    methods: Vec<Option<&'static str>>,
}

#[pymethods]
impl PyLoraPool {
    #[new]
    #[pyo3(signature = (adapters, in_features, out_features))]
    fn new(
        py: Python<'_>,
        adapters: &Bound<'_, PyAny>,
        in_features: &Bound<'_, PyAny>,
        out_features: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let din = dim(in_features, "in_features")?;
        let dout = dim(out_features, "out_features")?;
        let terms = parse_terms(adapters, din, dout)?;
        let pool = pack(py, &terms, din, dout)?;
        let methods = terms.iter().map(|t| t.as_ref().map(Term::method)).collect();
        Ok(PyLoraPool { pool, methods })
    }

    /// Mixed-batch forward: row ``t`` of ``y`` is ``x[t] @ w0.T + bias`` plus the term of
    /// adapter ``adapter_of_row[t]`` (none for -1 or an adapter whose entry was None).
    ///
    /// Args:
    ///     x: float32 ``[T, in_features]``.
    ///     w0: ``[out_features, in_features]``: a float32 array, ``FrozenWeight`` or
    ///         ``nf4.Nf4Tensor``.
    ///     adapter_of_row: ``T`` ints in ``-1..len(pool)``.
    ///     bias: optional float32 ``[out_features]``.
    ///
    /// Returns:
    ///     y, float32 ``[T, out_features]``.
    ///
    /// Raises:
    ///     TypeError, ValueError: as ``lora_forward_multi``; ``w0`` of another shape than the
    ///         pool's projection.
    #[pyo3(signature = (x, w0, adapter_of_row, bias=None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        w0: &Bound<'py, PyAny>,
        adapter_of_row: &Bound<'py, PyAny>,
        bias: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Out<'py>> {
        forward_impl(py, Some(&self.pool), x, w0, None, adapter_of_row, bias)
    }

    /// Rank of each adapter on this projection (0 where its entry was None).
    #[getter]
    fn ranks(&self) -> Vec<usize> {
        self.pool.ranks().to_vec()
    }

    /// Method of each adapter's term: ``"lora"``, ``"vera"``, ``"adalora"``, or None.
    #[getter]
    fn methods(&self) -> Vec<Option<&'static str>> {
        self.methods.clone()
    }

    /// ``in`` of the projection.
    #[getter]
    fn in_features(&self) -> usize {
        self.pool.dims().1
    }

    /// ``out`` of the projection.
    #[getter]
    fn out_features(&self) -> usize {
        self.pool.dims().0
    }

    /// Number of adapters K.
    fn __len__(&self) -> usize {
        self.pool.len()
    }

    fn __repr__(&self) -> String {
        let (dout, din) = self.pool.dims();
        format!(
            "LoraPool(in_features={din}, out_features={dout}, ranks={:?})",
            self.pool.ranks()
        )
    }
}
