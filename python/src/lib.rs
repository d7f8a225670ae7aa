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
//!
//! Every method is one call of lorafuse's fused low-rank op (`Backend::linear_lowrank`, its
//! backward and merge) with the method's `LowRank` term. Modules: `args` (argument checking),
//! `run` (running kernels, errors, results), `base` (dense or NF4 `w0`), one per method
//! (`lora`, `dora`, `vera`, `adalora`), `multi` (many adapters in one batch:
//! `Backend::linear_multi` over a `LowRankPool`), `nf4`, `io` (PEFT adapter files) and
//! `finetune`; this file registers them.
#![allow(non_snake_case)]
#![allow(clippy::too_many_arguments)]

mod adalora;
mod args;
mod base;
mod dora;
mod finetune;
mod io;
mod lora;
mod multi;
mod nf4;
mod run;
mod vera;

use pyo3::prelude::*;

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
    m.add_class::<args::PyFrozenWeight>()?;
    m.add_function(wrap_pyfunction!(finetune::finetune, m)?)?;
    m.add_function(wrap_pyfunction!(io::load_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(io::save_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(lora::lora_forward, m)?)?;
    m.add_function(wrap_pyfunction!(lora::lora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(lora::lora_merge, m)?)?;
    m.add_function(wrap_pyfunction!(lora::lora_unmerge, m)?)?;
    m.add_function(wrap_pyfunction!(dora::dora_weight_norm, m)?)?;
    m.add_function(wrap_pyfunction!(dora::dora_forward, m)?)?;
    m.add_function(wrap_pyfunction!(dora::dora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(dora::dora_merge, m)?)?;
    m.add_function(wrap_pyfunction!(dora::dora_unmerge, m)?)?;
    m.add_function(wrap_pyfunction!(vera::vera_forward, m)?)?;
    m.add_function(wrap_pyfunction!(vera::vera_backward, m)?)?;
    m.add_function(wrap_pyfunction!(vera::vera_merge, m)?)?;
    m.add_function(wrap_pyfunction!(vera::vera_unmerge, m)?)?;
    m.add_function(wrap_pyfunction!(adalora::adalora_forward, m)?)?;
    m.add_function(wrap_pyfunction!(adalora::adalora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(adalora::adalora_merge, m)?)?;
    m.add_function(wrap_pyfunction!(adalora::adalora_unmerge, m)?)?;
    m.add_function(wrap_pyfunction!(multi::lora_forward_multi, m)?)?;
    m.add_class::<multi::PyLoraPool>()?;

    let nf4 = PyModule::new(py, "nf4")?;
    nf4.add(
        "__doc__",
        "bitsandbytes-compatible NF4 quantization: quantize(w) -> Nf4Tensor.",
    )?;
    nf4.add_function(wrap_pyfunction!(nf4::nf4_quantize, &nf4)?)?;
    nf4.add_class::<nf4::PyNf4>()?;
    m.add_submodule(&nf4)?;
    // Makes `import lorafuse.nf4` / `from lorafuse.nf4 import quantize` work too.
    py.import("sys")?
        .getattr("modules")?
        .set_item("lorafuse.nf4", &nf4)?;
    Ok(())
}
