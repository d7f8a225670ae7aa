//! NF4 (QLoRA's base-weight format): bitsandbytes-compatible quantization and the
//! `lorafuse.nf4.Nf4Tensor` class, which the kernels take as a `w0` and dequantize tile by tile.

use std::sync::OnceLock;

use lorafuse::backend::Nf4Weight;
use lorafuse::io::bnb;
use lorafuse::quant::nf4::{Absmax, NF4_CODE, Nf4Tensor as RsNf4, quantize_nf4_in_order};
use lorafuse::torch_cpu::sum::TorchCpuOrder;
use lorafuse::{Backend, Cpu};
use numpy::{
    PyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::args::{T, array, fmt_shape, once, type_name};
use crate::run::{Out, down, file_err, out, run};

/// An NF4-quantized tensor in bitsandbytes' layout, made by ``lorafuse.nf4.quantize``.
///
/// Fields are named as bitsandbytes' ``QuantState`` (``as_dict(packed=True)``): ``packed``
/// (uint8 ``[(n + 1) // 2, 1]``, element 2k in the high nibble), ``absmax`` (uint8 ``[nblocks]``
/// under double quant, else float32), ``quant_map`` (float32 ``[16]``), ``nested_absmax``,
/// ``nested_quant_map`` (float32 ``[256]``), ``offset`` (the last three ``None`` without
/// double quant), ``blocksize``, ``nested_blocksize`` and ``shape``.
#[pyclass(module = "lorafuse.nf4", name = "Nf4Tensor", frozen)]
pub(crate) struct PyNf4 {
    pub(crate) inner: RsNf4,
    /// The weight as the kernels take it (an `Arc` of `inner`'s bytes), made on first use.
    weight: OnceLock<Nf4Weight<Cpu>>,
    /// `||W||_row^2` of the dequantized weight (DoRA's cached base norm), on first use.
    pub(crate) row_sq: OnceLock<T>,
}

impl PyNf4 {
    fn new(inner: RsNf4) -> Self {
        PyNf4 {
            inner,
            weight: OnceLock::new(),
            row_sq: OnceLock::new(),
        }
    }

    pub(crate) fn weight(&self) -> lorafuse::Result<Nf4Weight<Cpu>> {
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
                Ok(down(be.nf4_dequantize(&be.upload_nf4(w)?)?))
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
///     torch_threads: the ``torch.get_num_threads()`` of the torch to match. The double-quant
///         offset is torch's float32 ``absmax.mean()``, whose summation order depends on torch's
///         thread count from 32768 blocks on, and on its CPU capability (AVX-512 or not) at any
///         size. Default: when torch is already imported, its own ``get_num_threads()`` and
///         ``backends.cpu.get_cpu_capability()``; else what torch would start with here (the
///         physical cores, ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, ``ATEN_CPU_CAPABILITY``).
///
/// Returns:
///     Nf4Tensor.
///
/// Raises:
///     TypeError: ``w`` is not a float32 numpy array.
///     ValueError: bad blocksize, empty, non-contiguous or non-finite ``w``.
#[pyfunction(name = "quantize")]
#[pyo3(signature = (w, blocksize=64, double_quant=true, torch_threads=None))]
pub(crate) fn nf4_quantize(
    py: Python<'_>,
    w: &Bound<'_, PyAny>,
    blocksize: usize,
    double_quant: bool,
    torch_threads: Option<usize>,
) -> PyResult<PyNf4> {
    if torch_threads == Some(0) {
        return Err(PyValueError::new_err(
            "`torch_threads` must be at least 1, got 0",
        ));
    }
    let order = torch_order(py, torch_threads)?;
    let w = array(w, "w", None)?;
    if w.shape().is_empty() || w.data().is_empty() {
        return Err(PyValueError::new_err(format!(
            "`w` must have at least one dim and one element, got shape {}",
            fmt_shape(w.shape())
        )));
    }
    let inner = run(py, |_| {
        quantize_nf4_in_order(w.data(), w.shape(), blocksize, double_quant, order)
    })?;
    Ok(PyNf4::new(inner))
}

/// The summation order of the torch in this process if it is imported (its thread count and
/// CPU capability), else of the torch that would start here; `threads` overrides the count.
fn torch_order(py: Python<'_>, threads: Option<usize>) -> PyResult<TorchCpuOrder> {
    let detected = TorchCpuOrder::detected();
    let modules = py.import("sys")?.getattr("modules")?;
    let Some(torch) = modules.get_item("torch").ok().filter(|t| !t.is_none()) else {
        return Ok(TorchCpuOrder {
            threads: threads.unwrap_or(detected.threads),
            ..detected
        });
    };
    let threads = match threads {
        Some(t) => t,
        None => torch.call_method0("get_num_threads")?.extract()?,
    };
    let capability: String = torch
        .getattr("backends")?
        .getattr("cpu")?
        .call_method0("get_cpu_capability")?
        .extract()?;
    Ok(TorchCpuOrder::for_torch(&capability, threads))
}
