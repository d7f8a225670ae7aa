//! PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, read and written
//! as PEFT's `from_pretrained` / `save_pretrained` do.

use std::panic::{AssertUnwindSafe, catch_unwind};

use lorafuse::io::peft;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::args::{array, type_name};
use crate::run::{file_err, out};

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
///     OSError: an I/O error (``FileNotFoundError``: the folder or a file missing).
#[pyfunction]
pub(crate) fn load_adapter<'py>(
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
///     OSError: an I/O error.
#[pyfunction]
pub(crate) fn save_adapter(
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
