//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`, in and out.
//!
//! The layout is the one `PeftModel.save_pretrained` writes (PEFT 0.21.2), so an adapter saved
//! by lorafuse loads in PEFT and one saved by PEFT loads in lorafuse:
//!
//! * `adapter_config.json`: the config as `json.dumps(config, indent=2, sort_keys=True)`, with
//!   every key PEFT writes for a `LoraConfig` ([`AdapterConfig::to_peft_json`]).
//! * `adapter_model.safetensors`: the adapter tensors under their state-dict keys with the adapter
//!   name removed, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
//!   (`lora_A` is `[r, in]`, `lora_B` is `[out, r]`, torch `nn.Linear` layout), and the
//!   safetensors metadata `{"format": "pt"}`.
//!
//! Every method PEFT saves for `nn.Linear` layers that lorafuse trains is supported in and out:
//! LoRA, rsLoRA, DoRA (`use_dora`), VeRA and AdaLoRA (key layouts in `methods.rs`;
//! [`apply_adapter`], [`adapter_layers_from_adapter`], [`save_adapter`],
//! [`adapter_config_for_method`], [`llama_adapter_export`]). Settings that would change what
//! the adapter computes and that lorafuse does not implement (`fan_in_fan_out`, trained biases,
//! LoRA `rank_pattern`/`alpha_pattern`, PiSSA-style inits that rewrite the base weights, VeRA
//! saved without its projections ...) are read and kept on a round trip, but applying them
//! gives a clear error ([`AdapterConfig::check_supported`]), never a silently different model.
//!
//! ```no_run
//! # fn main() -> lorafuse::Result<()> {
//! use lorafuse::Cpu;
//! use lorafuse::io::peft::{apply_adapter, load_adapter};
//! # let mut model: lorafuse::model::llama::Llama<Cpu> = unimplemented!();
//! let (cfg, tensors) = load_adapter("my-adapter".as_ref())?;
//! apply_adapter(&Cpu, &mut model, &cfg, &tensors)?;
//! # Ok(()) }
//! ```

pub mod additive;
mod config;
mod config_for;

mod methods;

pub(crate) use config::py_json;
pub use config::{AdapterConfig, SEQ_CLS, TargetModules};
pub use config_for::{
    AdaLoraOptions, MethodOptions, VeraOptions, adapter_config_for, adapter_config_for_method,
    rank_pattern_json,
};
#[cfg(feature = "candle")]
pub(crate) use methods::drop_masked_ranks;
pub use methods::{
    AdaLoraMask, AdapterExport, AdapterLayers, VERA_A_KEY, VERA_B_KEY, adapter_layers_from_adapter,
    apply_adapter, llama_adapter_export, save_adapter,
};

use crate::adapter::{Linear, LoraLayer};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::llama::{Llama, proj_path};
use config::suffix_match;
use safetensors::{Dtype, SafeTensorError, SafeTensors, tensor::TensorView};
use serde_json::Value;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the adapter config in an adapter folder (PEFT `CONFIG_NAME`).
pub const CONFIG_NAME: &str = "adapter_config.json";
/// File name of the adapter weights in an adapter folder (PEFT `SAFETENSORS_WEIGHTS_NAME`).
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The PEFT version whose file layout lorafuse writes; saved as `peft_version`.
pub const PEFT_VERSION: &str = "0.21.2";
/// Prefix of every key in a saved adapter (`PeftModel` → `LoraModel` → the wrapped model).
pub const KEY_PREFIX: &str = "base_model.model.";

/// The file key of a reward model's `score` head (PEFT saves `modules_to_save` without its
/// `modules_to_save.default` wrapper).
pub const SCORE_KEY: &str = "base_model.model.score.weight";

/// One adapter tensor as stored in a file: `(key, shape, row-major f32 data)`.
pub type AdapterTensor = (String, Vec<usize>, Vec<f32>);

// ---- saving ------------------------------------------------------------------------------------

/// Writes a LoRA adapter folder at `dir`, the way `PeftModel.save_pretrained` does:
/// `adapter_config.json` ([`AdapterConfig::to_peft_json`], with `inference_mode: true` as PEFT
/// forces on save) and `adapter_model.safetensors` (every tensor f32 under its key as given,
/// metadata `{"format": "pt"}`). Each tensor is `(key, shape, row-major data)`; PEFT's keys are
/// `base_model.model.<module path>.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`).
///
/// Atomic: both files are written and fsynced in a sibling temporary folder `.DIR.tmp-PID`,
/// which is then renamed to `dir`. An existing adapter folder at `dir` is moved aside
/// (`.DIR.old-PID`) only once the new one is complete, and removed after the swap, so an error
/// or an interruption never leaves a half-written adapter at `dir` (a crash between the two
/// renames leaves the old adapter in `.DIR.old-PID`). Parent folders are created as needed.
///
/// Errors, all before anything is written: `peft_type` not `LORA`, an invalid r or
/// `lora_alpha`, no tensor, an empty or repeated key, a data length that disagrees with the
/// shape, a non-finite value, a `lora_A`/`lora_B` whose rank disagrees with r (when
/// `rank_pattern` is empty), or an existing `dir` that is a file or a non-empty folder without
/// `adapter_config.json`/`adapter_model.safetensors` (lorafuse never replaces unrelated data).
/// Then any I/O error, naming the path.
pub fn save_lora_adapter(dir: &Path, cfg: &AdapterConfig, tensors: &[AdapterTensor]) -> Result<()> {
    if cfg.peft_type != "LORA" {
        return Err(Error::arg(
            "peft_type",
            format!(
                "save_lora_adapter writes LORA adapters, got peft_type `{}`",
                cfg.peft_type
            ),
        ));
    }
    methods::save_checked(dir, cfg, tensors)
}

/// Serializes f32 tensors to safetensors bytes with PEFT's metadata `{"format": "pt"}`.
fn serialize_f32(dir: &Path, tensors: &[AdapterTensor]) -> Result<Vec<u8>> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    serialize_f32_meta(&dir.join(WEIGHTS_NAME), tensors, Some(meta))
}

/// Serializes f32 tensors to safetensors bytes with the given header metadata (`file` names
/// the file in errors).
pub(crate) fn serialize_f32_meta(
    file: &Path,
    tensors: &[AdapterTensor],
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((key, shape, _), b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, shape.clone(), b)
            .map_err(|e| Error::shape(key.as_str(), format!("consistent shape ({e})"), shape))?;
        views.push((key.as_str(), view));
    }
    safetensors::serialize(views, meta)
        .map_err(|e| Error::format(file, format!("serializing: {e}")))
}

/// `parent/.{name}.{tag}-{pid}` beside `dir`.
fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| {
        Error::arg(
            "dir",
            format!(
                "{} has no folder name to save an adapter under",
                dir.display()
            ),
        )
    })?;
    let mut s = std::ffi::OsString::from(".");
    s.push(name);
    s.push(format!(".{tag}-{}", std::process::id()));
    Ok(parent_of(dir).join(s))
}

/// The parent folder of `dir` (`.` for a bare name).
fn parent_of(dir: &Path) -> &Path {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsyncs a folder so that renames and new entries in it are durable (unix; a no-op elsewhere).
fn sync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Refuses to replace anything but an adapter folder or an empty folder.
fn check_replaceable(dir: &Path) -> Result<bool> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(dir, e)),
    };
    if !meta.is_dir() {
        return Err(Error::arg(
            "dir",
            format!(
                "{} exists and is not a folder (a file or a symlink); not replacing it",
                dir.display()
            ),
        ));
    }
    let is_adapter = [CONFIG_NAME, WEIGHTS_NAME, "adapter_fusion_config.json"]
        .iter()
        .any(|f| dir.join(f).exists());
    let is_empty = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .next()
        .is_none();
    if !is_adapter && !is_empty {
        return Err(Error::arg(
            "dir",
            format!(
                "{} exists and is not a PEFT adapter folder (no {CONFIG_NAME} or {WEIGHTS_NAME}); \
                 not replacing it",
                dir.display()
            ),
        ));
    }
    Ok(true)
}

/// Writes `files` (names relative to `dir`, `sub/name` in a subfolder) into a fresh temporary
/// sibling of `dir`, fsyncs them, then swaps it in. Refuses to replace a folder that is not an
/// adapter folder (none of `adapter_config.json`, `adapter_model.safetensors`,
/// `adapter_fusion_config.json`) and not empty.
pub(crate) fn write_dir_atomically(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let exists = check_replaceable(dir)?;
    let parent = parent_of(dir);
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = sibling(dir, "tmp")?;
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let result = (|| -> Result<()> {
        fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        for (name, bytes) in files {
            let p = tmp.join(name);
            if let Some(sub) = p.parent().filter(|d| *d != tmp) {
                fs::create_dir_all(sub).map_err(|e| Error::io(sub, e))?;
            }
            let mut f = fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
            f.write_all(bytes).map_err(|e| Error::io(&p, e))?;
            f.sync_all().map_err(|e| Error::io(&p, e))?;
        }
        sync_dir(&tmp)?;
        if exists {
            let old = sibling(dir, "old")?;
            if old.exists() {
                fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
            }
            fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
            if let Err(e) = fs::rename(&tmp, dir) {
                // Put the old adapter back; the new one stays in tmp and is removed below.
                let _ = fs::rename(&old, dir);
                return Err(Error::io(dir, e));
            }
            sync_dir(parent)?;
            // The new adapter is in place; a leftover old copy is only clutter.
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        }
        sync_dir(parent)
    })();
    if result.is_err() && tmp.exists() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

// ---- loading -----------------------------------------------------------------------------------

/// Reads a PEFT adapter folder: the parsed `adapter_config.json` and every tensor of
/// `adapter_model.safetensors` as `(key, shape, f32 data)`, sorted by key. f32, f16, bf16 and
/// f64 tensors are converted to f32 (f16/bf16 exactly, with `half`; f64 rounded).
///
/// Any PEFT method loads (LoRA, DoRA, VeRA, AdaLoRA ...); whether lorafuse can apply it is
/// [`apply_lora_adapter`]'s question.
///
/// Errors: `dir` missing or not a folder ([`Error::Io`]/[`Error::Format`]), a missing
/// `adapter_config.json` or `adapter_model.safetensors` ([`Error::Missing`]; a folder holding
/// only the pickle `adapter_model.bin` says so), JSON that does not parse or lacks `peft_type`
/// ([`Error::Json`]), a truncated or malformed safetensors file, or a tensor of another dtype
/// ([`Error::Format`]).
pub fn load_adapter(dir: &Path) -> Result<(AdapterConfig, Vec<AdapterTensor>)> {
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::format(
            dir,
            "not a folder; expected a PEFT adapter folder",
        ));
    }
    let cfg_path = dir.join(CONFIG_NAME);
    if !cfg_path.is_file() {
        return Err(Error::Missing {
            path: dir.to_path_buf(),
            name: CONFIG_NAME.into(),
        });
    }
    let text = fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|e| Error::Json {
        context: cfg_path.display().to_string(),
        msg: e.to_string(),
    })?;
    let st_path = dir.join(WEIGHTS_NAME);
    if !st_path.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            return Err(Error::format(
                dir,
                format!(
                    "holds adapter_model.bin (a pickle); lorafuse reads only {WEIGHTS_NAME} \
                     (re-save with safe_serialization=True)"
                ),
            ));
        }
        return Err(Error::Missing {
            path: dir.to_path_buf(),
            name: WEIGHTS_NAME.into(),
        });
    }
    let tensors = read_safetensors_f32(&st_path)?;
    Ok((cfg, tensors))
}

/// Reads every tensor of a safetensors file as `(key, shape, f32 data)`, sorted by key.
/// f32, f16, bf16 and f64 are converted to f32. Errors: I/O, a truncated or malformed file, or
/// another dtype (naming the tensor).
pub fn read_safetensors_f32(path: &Path) -> Result<Vec<AdapterTensor>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = parse_safetensors(path, &bytes)?;
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let data = to_f32(view.dtype(), view.data()).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}; expected F32, F16, BF16 or F64",
                    view.dtype()
                ),
            )
        })?;
        out.push((name, view.shape().to_vec(), data));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Little-endian bytes of one dtype to f32; `None` for an unsupported dtype.
pub(crate) fn to_f32(dtype: Dtype, b: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        _ => return None,
    })
}

/// Parses a safetensors buffer, turning the crate's errors into messages that say whether the
/// file is truncated.
pub(crate) fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    let len = bytes.len();
    if len < 8 {
        return Err(Error::format(
            path,
            format!("truncated safetensors file: {len} bytes, less than the 8-byte header size"),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > (len - 8) as u64 {
        return Err(Error::format(
            path,
            format!(
                "truncated safetensors file: the header says {n} bytes of JSON follow, the file \
                 has {} after the size field",
                len - 8
            ),
        ));
    }
    SafeTensors::deserialize(bytes).map_err(|e| match e {
        SafeTensorError::MetadataIncompleteBuffer => {
            let end = data_end(&bytes[8..8 + n as usize]);
            match end {
                Some(end) if 8 + n as usize + end > len => Error::format(
                    path,
                    format!(
                        "truncated safetensors file: the tensors need {} bytes, the file has {len}",
                        8 + n as usize + end
                    ),
                ),
                _ => Error::format(
                    path,
                    format!(
                        "malformed safetensors file: tensor data does not end at the end of the \
                         file ({len} bytes)"
                    ),
                ),
            }
        }
        e => Error::format(path, format!("malformed safetensors file: {e}")),
    })
}

/// The largest `data_offsets` end in a safetensors JSON header.
fn data_end(header: &[u8]) -> Option<usize> {
    let v: Value = serde_json::from_slice(header).ok()?;
    v.as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .map(|e| e as usize)
}

// ---- applying ----------------------------------------------------------------------------------

/// Which LoRA factor a key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Factor {
    A,
    B,
}

/// Splits `base_model.model.<path>.lora_A.weight` into `(<path>, A)`.
fn lora_factor(key: &str) -> Option<(&str, Factor)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    if let Some(p) = rest.strip_suffix(".lora_A.weight") {
        Some((p, Factor::A))
    } else {
        rest.strip_suffix(".lora_B.weight").map(|p| (p, Factor::B))
    }
}

/// Builds the LoRA layers of a PEFT adapter for a model of one's own: `modules` lists the
/// model's adaptable layers by module path (the key minus `base_model.model.` and
/// `.lora_A.weight`, e.g. `model.layers.0.self_attn.q_proj` or `fc1`). Returns one
/// `(module path, LoraLayer)` per adapted module, in the order of `modules`, with the factors
/// uploaded to `be` and the scaling of [`AdapterConfig::scaling`]. This is PEFT's
/// `set_peft_model_state_dict` for LoRA on `nn.Linear` layers.
///
/// Errors (the model is not touched; each names the key): as
/// [`AdapterConfig::check_lora_supported`]; no tensor; a key that is not
/// `base_model.model.<path>.lora_{A,B}.weight` (e.g. DoRA's `lora_magnitude_vector` or an
/// embedding's `lora_embedding_A`); a path not in `modules`; a module that a list
/// `target_modules` does not name (PEFT would ignore the tensor) or that `exclude_modules`
/// names; a key given twice; a module with only one of A and B; a shape other than
/// `lora_A [r, in]`, `lora_B [out, r]` with r from the config; a non-finite value.
pub fn lora_layers_from_adapter<B: Backend>(
    be: &B,
    cfg: &AdapterConfig,
    tensors: &[AdapterTensor],
    modules: &[(String, &Linear<B>)],
) -> Result<Vec<(String, LoraLayer<B>)>> {
    cfg.check_lora_supported()?;
    let r = cfg.rank();
    let scaling = cfg.scaling()?;
    if tensors.is_empty() {
        return Err(Error::arg("tensors", "the adapter holds no tensor"));
    }
    let index: HashMap<&str, usize> = modules
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.as_str(), i))
        .collect();
    // A list `exclude_modules` is checked like `target_modules`; a regex one is kept, unchecked.
    let excluded: Vec<&str> = match cfg.extra.get("exclude_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    // Per module: (A, B) as indices into `tensors`.
    let mut pairs: Vec<[Option<usize>; 2]> = vec![[None, None]; modules.len()];
    for (ti, (key, shape, data)) in tensors.iter().enumerate() {
        let (path, factor) = lora_factor(key).ok_or_else(|| {
            Error::arg(
                key.as_str(),
                format!(
                    "unexpected tensor: not a LoRA factor `{KEY_PREFIX}<module>.lora_A.weight` \
                     or `.lora_B.weight`"
                ),
            )
        })?;
        let &mi = index.get(path).ok_or_else(|| {
            let example = modules.first().map_or("", |(p, _)| p.as_str());
            Error::arg(
                key.as_str(),
                format!(
                    "no module `{path}` in this model to apply it to ({} adaptable modules, \
                     e.g. `{example}`)",
                    modules.len()
                ),
            )
        })?;
        if let Some(t) = &cfg.target_modules
            && t.matches(path) == Some(false)
        {
            return Err(Error::arg(
                key.as_str(),
                format!(
                    "module `{path}` is not in target_modules {} of {CONFIG_NAME} (PEFT would \
                     not load this tensor)",
                    serde_json::to_string(t).unwrap_or_default()
                ),
            ));
        }
        if excluded.iter().any(|n| suffix_match(path, n)) {
            return Err(Error::arg(
                key.as_str(),
                format!("module `{path}` is in exclude_modules of {CONFIG_NAME}"),
            ));
        }
        let slot = &mut pairs[mi][factor as usize];
        if slot.is_some() {
            return Err(Error::arg(key.as_str(), "tensor key given twice"));
        }
        *slot = Some(ti);
        let base = modules[mi].1;
        let (inp, out) = (base.in_features(), base.out_features());
        let expected = match factor {
            Factor::A => [r, inp],
            Factor::B => [out, r],
        };
        if shape[..] != expected {
            let what = match factor {
                Factor::A => format!("lora_A [r, in_features] with in_features {inp} of `{path}`"),
                Factor::B => {
                    format!("lora_B [out_features, r] with out_features {out} of `{path}`")
                }
            };
            return Err(Error::shape(
                key.as_str(),
                format!("{expected:?} ({what} and rank r = {r} from {CONFIG_NAME})"),
                shape,
            ));
        }
        if data.len() != expected[0] * expected[1] {
            return Err(Error::arg(
                key.as_str(),
                format!(
                    "{} values for shape {shape:?}, which needs {}",
                    data.len(),
                    expected[0] * expected[1]
                ),
            ));
        }
        if let Some(index) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                name: key.clone(),
                index,
            });
        }
    }
    let mut out = Vec::new();
    for ((path, base), pair) in modules.iter().zip(&pairs) {
        let (a, b) = match *pair {
            [None, None] => continue,
            [Some(a), Some(b)] => (a, b),
            [Some(i), None] | [None, Some(i)] => {
                let (have, miss) = if pair[0].is_some() {
                    ("lora_A", "lora_B")
                } else {
                    ("lora_B", "lora_A")
                };
                return Err(Error::arg(
                    tensors[i].0.as_str(),
                    format!(
                        "module `{path}` has {have} but no {miss} (expected \
                         `{KEY_PREFIX}{path}.{miss}.weight`)"
                    ),
                ));
            }
        };
        let (ka, sa, da) = &tensors[a];
        let (_, sb, db) = &tensors[b];
        let layer = LoraLayer::from_factors(base, be.upload(da, sa)?, be.upload(db, sb)?, scaling)
            .map_err(|e| Error::arg(ka.as_str(), format!("module `{path}`: {e}")))?;
        out.push((path.clone(), layer));
    }
    Ok(out)
}

/// The adapter tensors of a Llama model under PEFT's keys, f32, in [`Llama::trainable_params`]
/// order: for every adapted projection `base_model.model.model.layers.N.{self_attn,mlp}.<proj>.`
/// followed by the method's suffixes ([`crate::adapter::Adapter::params`]: LoRA `lora_A.weight [r, in]`,
/// `lora_B.weight [out, r]`; DoRA also `lora_magnitude_vector [out]`; VeRA `vera_lambda_b`,
/// `vera_lambda_d`; AdaLoRA `lora_A`, `lora_B`, `lora_E` with every rank, see
/// [`llama_adapter_export`] to drop the masked ones), preceded for VeRA by the shared
/// `base_model.vera_A` and `base_model.vera_B` (once). The model holds q/k rows in
/// transformers' order, so these are exactly the tensors PEFT saves for `LlamaForCausalLM`.
/// Empty when the model has no adapter.
pub fn llama_adapter_tensors<B: Backend>(be: &B, model: &Llama<B>) -> Result<Vec<AdapterTensor>> {
    let mut out = Vec::new();
    let has_vera = model.layers.iter().any(|b| {
        b.proj
            .iter()
            .any(|p| matches!(p.adapter, Some(crate::adapter::Adapter::Vera(_))))
    });
    if let (true, Some(sh)) = (has_vera, &model.vera_shared) {
        for (key, t) in [
            (methods::VERA_A_KEY, &sh.vera_a),
            (methods::VERA_B_KEY, &sh.vera_b),
        ] {
            out.push((key.to_string(), t.shape().to_vec(), be.download(t)?));
        }
    }
    if model.soft_prompt.is_some() {
        return additive::prompt_tensors(be, model);
    }
    if model.ln_tuning.is_some() {
        out.extend(additive::ln_tuning_tensors(be, model)?);
    }
    if let Some(t) = &model.score {
        out.push((SCORE_KEY.to_string(), t.shape().to_vec(), be.download(t)?));
    }
    for (l, block) in model.layers.iter().enumerate() {
        for (p, proj) in block.proj.iter().enumerate() {
            let Some(a) = &proj.adapter else { continue };
            for (suffix, t) in a.params() {
                let shape = match a {
                    crate::adapter::Adapter::Ia3(x) => x.peft_shape().to_vec(),
                    crate::adapter::Adapter::Beft(_) => vec![1, t.len()],
                    _ => t.shape().to_vec(),
                };
                out.push((
                    format!("{KEY_PREFIX}{}.{suffix}", proj_path(l, p)),
                    shape,
                    be.download(t)?,
                ));
            }
        }
    }
    Ok(out)
}

/// Attaches a PEFT adapter to a Llama model; the name predates DoRA/VeRA/AdaLoRA support and
/// this is now [`apply_adapter`], which applies every method.
pub fn apply_lora_adapter<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    cfg: &AdapterConfig,
    tensors: &[AdapterTensor],
) -> Result<()> {
    apply_adapter(be, model, cfg, tensors)
}
