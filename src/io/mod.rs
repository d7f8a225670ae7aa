//! File formats: GGUF model files, transformers model folders, PEFT adapter folders,
//! safetensors helpers.

pub mod adapters_lib;
pub mod atomic;
pub mod bnb;
pub mod export;
pub mod fetch;
pub mod gguf;
pub mod hf;
pub mod llama_cpp;
pub mod load;
pub mod peft;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::inject::AdapterSet;
use crate::model::llama::Llama;
use std::path::Path;

/// The library that wrote an adapter folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterFolder {
    /// PEFT (`adapter_config.json` with a `peft_type`).
    Peft,
    /// The `adapters` library's bottleneck adapter (`adapter_config.json` with its `config`).
    Bottleneck,
    /// The `adapters` library's AdapterFusion (`adapter_fusion_config.json`).
    Fusion,
}

/// Which library wrote the adapter folder `dir`. Errors: not a folder, no config file, a
/// config that is not JSON or names neither library's layout.
pub fn adapter_folder_kind(dir: &Path) -> Result<AdapterFolder> {
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "not a folder; expected an adapter folder",
        ));
    }
    if dir.join(adapters_lib::FUSION_CONFIG_FILE).is_file() {
        return Ok(AdapterFolder::Fusion);
    }
    let cfg = dir.join(adapters_lib::CONFIG_FILE);
    if !cfg.is_file() {
        return Err(Error::Missing {
            path: dir.to_path_buf(),
            name: adapters_lib::CONFIG_FILE.into(),
        });
    }
    let v = adapters_lib::read_json(&cfg)?;
    if v.get("peft_type").is_some() {
        Ok(AdapterFolder::Peft)
    } else if v.get("config").is_some_and(|c| c.is_object()) {
        Ok(AdapterFolder::Bottleneck)
    } else {
        Err(Error::format(
            &cfg,
            "neither a PEFT config (no `peft_type`) nor an adapters-library config (no \
             `config` object)",
        ))
    }
}

/// Loads the adapter folder `dir`, whichever library wrote it (PEFT: every `peft_type`
/// [`peft::apply_adapter`] takes; the `adapters` library: a bottleneck adapter or a fusion),
/// onto `model`. Errors, the model untouched: those of [`adapter_folder_kind`] and of the
/// loader of its kind.
pub fn apply_adapter_folder<B: Backend>(be: &B, model: &mut Llama<B>, dir: &Path) -> Result<()> {
    match adapter_folder_kind(dir)? {
        AdapterFolder::Peft => {
            let (cfg, tensors) = peft::load_adapter(dir)?;
            peft::apply_adapter(be, model, &cfg, &tensors)
        }
        AdapterFolder::Bottleneck => adapters_lib::load_bottleneck(be, model, dir),
        AdapterFolder::Fusion => adapters_lib::load_fusion(be, model, dir),
    }
}

/// Loads named adapter folders for a mixed batch ([`crate::model::multi::MultiAdapters`]):
/// each one onto `model` ([`apply_adapter_folder`]) and taken off again, so `model` ends as it
/// began. Errors: a model that already has adapters, a folder's loader errors (named by the
/// adapter's name).
pub fn load_adapter_sets<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    named: &[(String, std::path::PathBuf)],
) -> Result<Vec<(String, AdapterSet<B>)>> {
    let own = model.take_adapters();
    if !own.is_empty() {
        model.put_adapters(own)?;
        return Err(Error::arg(
            "model",
            "load the adapters of a mixed batch onto a model without adapters",
        ));
    }
    let mut sets = Vec::with_capacity(named.len());
    for (name, dir) in named {
        if let Err(e) = apply_adapter_folder(be, model, dir) {
            model.take_adapters();
            return Err(Error::arg(format!("adapter `{name}`"), e.to_string()));
        }
        sets.push((name.clone(), model.take_adapters()));
    }
    Ok(sets)
}
