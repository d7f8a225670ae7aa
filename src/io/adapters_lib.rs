//! The `adapters` library's files (version 1.3.0): a bottleneck adapter as
//! `model.save_adapter(dir, name, with_head=False, use_safetensors=True)` writes it, and an
//! AdapterFusion as `model.save_adapter_fusion(dir, "a,b")` plus each fused adapter in its own
//! subfolder.
//!
//! | file | contents |
//! |---|---|
//! | `adapter_config.json` | `config` (the adapter config, every field), `hidden_size`, `model_class`, `model_name`, `model_type`, `name`, `version` |
//! | `adapter.safetensors` | `model.layers.N.{attention,output}_adapters.adapters.<name>.adapter_{down.0,up}.{weight,bias}` (no header metadata) |
//! | `adapter_fusion_config.json` | `adapter_names`, `config` (the fusion config), the same model fields, `name` = `a,b` |
//! | `model_adapter_fusion.safetensors` | `model.layers.N.output_adapters.adapter_fusion_layer.<a,b>.{query,key}.{weight,bias}`, `.value.weight` |

use super::peft::{AdapterTensor, read_safetensors_f32, serialize_f32_meta, write_dir_atomically};
use crate::adapter::bottleneck::{BN_SUFFIXES, FUSION_SUFFIXES};
use crate::adapter::{
    AdapterFusion, BnAdapter, BnLayer, Bottleneck, BottleneckConfig, BottleneckKind, FuseLayer,
};
use crate::backend::{Activation, Backend};
use crate::error::{Error, Result};
use crate::model::llama::Llama;
use serde_json::{Map, Value, json};
use std::path::Path;

/// The adapter's config file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights.
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
/// A fusion's config file.
pub const FUSION_CONFIG_FILE: &str = "adapter_fusion_config.json";
/// A fusion's weights.
pub const FUSION_WEIGHTS_FILE: &str = "model_adapter_fusion.safetensors";
/// The library version whose layout lorafuse writes.
pub const ADAPTERS_VERSION: &str = "adapters.1.3.0";

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::Relu => "relu",
        Activation::Silu => "swish",
        Activation::Tanh => "tanh",
    }
}

/// A number as Python writes it (an integer when it is one).
fn py_num(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// Every field of the library's `DoubleSeqBnConfig` / `SeqBnConfig` for `cfg`.
pub fn bottleneck_config_json(cfg: &BottleneckConfig) -> Value {
    let houlsby = cfg.kind == BottleneckKind::Houlsby;
    let mut m = obj(json!({
        "adapter_residual_before_ln": false,
        "cross_adapter": false,
        "dropout": 0.0,
        "factorized_phm_W": true,
        "factorized_phm_rule": false,
        "hypercomplex_nonlinearity": "glorot-uniform",
        "init_weights": "bert",
        "init_weights_seed": null,
        "inv_adapter": null,
        "inv_adapter_reduction_factor": null,
        "is_parallel": false,
        "learn_phm": true,
        "leave_out": [],
        "ln_after": false,
        "ln_before": false,
        "original_ln_after": true,
        "output_adapter": true,
        "phm_bias": true,
        "phm_c_init": "normal",
        "phm_dim": 4,
        "phm_init_range": 0.0001,
        "phm_layer": false,
        "phm_rank": 1,
        "residual_before_ln": true,
        "scaling": 1.0,
        "shared_W_phm": false,
        "shared_phm_rule": true,
        "stochastic_depth": 0.0,
        "use_gating": false
    }));
    m.insert("mh_adapter".into(), Value::Bool(houlsby));
    m.insert("original_ln_before".into(), Value::Bool(!houlsby));
    m.insert(
        "non_linearity".into(),
        Value::from(act_name(cfg.non_linearity)),
    );
    m.insert("reduction_factor".into(), py_num(cfg.reduction_factor));
    Value::Object(m)
}

fn model_fields<B: Backend>(model: &Llama<B>, name: &str, model_name: &str) -> Map<String, Value> {
    obj(json!({
        "hidden_size": model.cfg.hidden_size,
        "model_class": "LlamaForCausalLM",
        "model_name": model_name,
        "model_type": "llama",
        "name": name,
        "version": ADAPTERS_VERSION,
    }))
}

/// A JSON file. Errors: I/O, not JSON (naming the file).
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        context: path.display().to_string(),
        msg: e.to_string(),
    })
}

/// The [`BottleneckConfig`] of an `adapter_config.json`. Errors naming the field: a config the
/// Llama placement does not implement (parallel adapters, gating, layer norms inside the
/// adapter, PHM layers, invertible adapters, `leave_out`, a scaling other than 1,
/// `residual_before_ln: false`), sites other than Houlsby's or Pfeiffer's, an unknown
/// non-linearity.
pub fn bottleneck_config_from_json(path: &Path, v: &Value) -> Result<BottleneckConfig> {
    let c = v.get("config").ok_or_else(|| Error::Missing {
        path: path.to_path_buf(),
        name: "config".into(),
    })?;
    let flag = |k: &str| c.get(k).and_then(Value::as_bool).unwrap_or(false);
    for k in [
        "is_parallel",
        "use_gating",
        "ln_before",
        "ln_after",
        "phm_layer",
        "cross_adapter",
    ] {
        if flag(k) {
            return Err(Error::format(
                path,
                format!(
                    "config.{k}: true is not supported (lorafuse places sequential bottleneck adapters)"
                ),
            ));
        }
    }
    if c.get("residual_before_ln").and_then(Value::as_bool) == Some(false) {
        return Err(Error::format(
            path,
            "config.residual_before_ln: false is not supported",
        ));
    }
    if c.get("inv_adapter").is_some_and(|x| !x.is_null()) {
        return Err(Error::format(
            path,
            "config.inv_adapter (invertible adapters) is not supported",
        ));
    }
    if c.get("leave_out")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return Err(Error::format(
            path,
            "config.leave_out (skipped layers) is not supported",
        ));
    }
    if let Some(s) = c.get("scaling")
        && s.as_f64() != Some(1.0)
    {
        return Err(Error::format(
            path,
            format!("config.scaling {s} is not supported (only 1.0)"),
        ));
    }
    let kind = match (flag("mh_adapter"), flag("output_adapter")) {
        (true, true) => BottleneckKind::Houlsby,
        (false, true) => BottleneckKind::Pfeiffer,
        (mh, out) => {
            return Err(Error::format(
                path,
                format!(
                    "config.mh_adapter {mh} / output_adapter {out}: only Houlsby (both) and Pfeiffer (output only) are supported"
                ),
            ));
        }
    };
    let nl = c
        .get("non_linearity")
        .and_then(Value::as_str)
        .unwrap_or("relu");
    let reduction_factor = c
        .get("reduction_factor")
        .and_then(Value::as_f64)
        .ok_or_else(|| Error::format(path, "config.reduction_factor is missing or not a number (per-layer factors are not supported)"))?;
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Missing {
            path: path.to_path_buf(),
            name: "name".into(),
        })?
        .to_string();
    Ok(BottleneckConfig {
        kind,
        name,
        reduction_factor,
        non_linearity: Activation::from_name(nl)
            .map_err(|e| Error::format(path, format!("config.non_linearity: {e}")))?,
    })
}

fn check_model<B: Backend>(path: &Path, v: &Value, model: &Llama<B>) -> Result<()> {
    if let Some(h) = v.get("hidden_size").and_then(Value::as_u64)
        && h as usize != model.cfg.hidden_size
    {
        return Err(Error::format(
            path,
            format!(
                "hidden_size {h}: the adapter was made for another model (this one has {})",
                model.cfg.hidden_size
            ),
        ));
    }
    if let Some(t) = v.get("model_type").and_then(Value::as_str)
        && t != "llama"
    {
        return Err(Error::format(
            path,
            format!("model_type `{t}`: lorafuse runs llama models"),
        ));
    }
    Ok(())
}

/// The tensors of one adapter of a model (`sites` as the library names them).
fn adapter_tensors<B: Backend>(
    be: &B,
    layers: &[BnLayer<B>],
    name: &str,
) -> Result<Vec<AdapterTensor>> {
    let mut out = Vec::new();
    for (l, bl) in layers.iter().enumerate() {
        for (site, a) in [
            ("attention_adapters", &bl.attention),
            ("output_adapters", &bl.output),
        ] {
            if let Some(a) = a {
                for (sfx, t) in a.params() {
                    out.push((
                        format!("model.layers.{l}.{site}.adapters.{name}.{sfx}"),
                        t.shape().to_vec(),
                        be.download(t)?,
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// The two files of one adapter.
fn adapter_files<B: Backend>(
    be: &B,
    model: &Llama<B>,
    cfg: &BottleneckConfig,
    layers: &[BnLayer<B>],
    model_name: &str,
    dir: &Path,
) -> Result<(String, Vec<u8>)> {
    let mut m = model_fields(model, &cfg.name, model_name);
    m.insert("config".into(), bottleneck_config_json(cfg));
    let json = super::peft::py_json(&Value::Object(m), CONFIG_FILE)?;
    let st = serialize_f32_meta(
        &dir.join(WEIGHTS_FILE),
        &adapter_tensors(be, layers, &cfg.name)?,
        None,
    )?;
    Ok((json, st))
}

/// Saves the model's trained bottleneck adapter as the library does (atomically: the folder
/// appears whole or not at all). `model_name` is written as `model_name`. Errors: no
/// bottleneck adapter; the folder errors of [`super::peft::save_adapter`].
pub fn save_bottleneck<B: Backend>(
    be: &B,
    model: &Llama<B>,
    dir: &Path,
    model_name: &str,
) -> Result<()> {
    let bn = model
        .bottleneck
        .as_ref()
        .ok_or_else(|| Error::arg("bottleneck", "the model has no bottleneck adapter"))?;
    let (json, st) = adapter_files(be, model, &bn.config, &bn.layers, model_name, dir)?;
    write_dir_atomically(dir, &[(CONFIG_FILE, json.as_bytes()), (WEIGHTS_FILE, &st)])
}

/// Reads one adapter folder into its config and per-layer adapters, checked against `model`.
fn read_adapter<B: Backend>(
    be: &B,
    model: &Llama<B>,
    dir: &Path,
) -> Result<(BottleneckConfig, Vec<BnLayer<B>>)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let v = read_json(&cfg_path)?;
    let cfg = bottleneck_config_from_json(&cfg_path, &v)?;
    check_model(&cfg_path, &v, model)?;
    let st_path = dir.join(WEIGHTS_FILE);
    if !st_path.is_file() {
        return Err(Error::Missing {
            path: dir.to_path_buf(),
            name: WEIGHTS_FILE.into(),
        });
    }
    let tensors = read_safetensors_f32(&st_path)?;
    let d = model.cfg.hidden_size;
    let m = cfg.bottleneck(d)?;
    let n = model.layers.len();
    let mut found: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> =
        tensors.into_iter().map(|(k, s, v)| (k, (s, v))).collect();
    let mut take_adapter = |l: usize, site: &str| -> Result<Option<BnAdapter<B>>> {
        let prefix = format!("model.layers.{l}.{site}.adapters.{}", cfg.name);
        let keys: Vec<String> = BN_SUFFIXES
            .iter()
            .map(|s| format!("{prefix}.{s}"))
            .collect();
        if keys.iter().all(|k| !found.contains_key(k)) {
            return Ok(None);
        }
        let mut ts = Vec::new();
        for (k, want) in keys.iter().zip([vec![m, d], vec![m], vec![d, m], vec![d]]) {
            let (s, v) = found.remove(k).ok_or_else(|| Error::Missing {
                path: st_path.clone(),
                name: k.clone(),
            })?;
            if s != want {
                return Err(Error::shape(
                    k.as_str(),
                    format!("{want:?} (hidden {d}, bottleneck {m})"),
                    &s,
                ));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFinite {
                    name: k.clone(),
                    index: i,
                });
            }
            ts.push(be.upload(&v, &s)?);
        }
        let mut it = ts.into_iter();
        let mut next = || it.next().expect("four tensors");
        Ok(Some(BnAdapter {
            down_w: next(),
            down_b: next(),
            up_w: next(),
            up_b: next(),
        }))
    };
    let mut layers = Vec::with_capacity(n);
    for l in 0..n {
        let attention = take_adapter(l, "attention_adapters")?;
        let output = take_adapter(l, "output_adapters")?;
        if attention.is_some() && cfg.kind == BottleneckKind::Pfeiffer {
            return Err(Error::format(
                &st_path,
                format!(
                    "layer {l} has an attention adapter but the config is Pfeiffer (output only)"
                ),
            ));
        }
        layers.push(BnLayer { attention, output });
    }
    if let Some(k) = found.keys().next() {
        return Err(Error::arg(
            k.as_str(),
            format!(
                "unexpected tensor in {} for adapter `{}` of a {n}-layer model",
                st_path.display(),
                cfg.name
            ),
        ));
    }
    Ok((cfg, layers))
}

/// Loads a bottleneck adapter folder the library saved onto `model` (trainable). Errors, the
/// model untouched: a missing file or key, a config made for another model (`hidden_size`,
/// `model_type`, layers), an unsupported config, a shape or non-finite value.
pub fn load_bottleneck<B: Backend>(be: &B, model: &mut Llama<B>, dir: &Path) -> Result<()> {
    let (config, layers) = read_adapter(be, model, dir)?;
    model.bottleneck = Some(Bottleneck { config, layers });
    Ok(())
}

/// Every field of the library's dynamic `Fuse` config.
pub fn fusion_config_json() -> Value {
    json!({
        "dropout_prob": null,
        "key": true,
        "query": true,
        "query_before_ln": false,
        "regularization": true,
        "residual_before": false,
        "temperature": false,
        "value": true,
        "value_before_softmax": true,
        "value_initialized": true
    })
}

/// AdapterFusion over the Pfeiffer adapter folders `dirs` (frozen; their names fuse in this
/// order), with the library's fusion init (seeded). Errors: fewer than two adapters, an
/// adapter that is not Pfeiffer (fusion is placed after the MLP), adapters for another model,
/// two adapters of one name; those of [`load_bottleneck`].
pub fn new_fusion<B: Backend>(
    be: &B,
    model: &Llama<B>,
    dirs: &[&Path],
    seed: u64,
) -> Result<AdapterFusion<B>> {
    if dirs.len() < 2 {
        return Err(Error::arg(
            "fuse",
            format!(
                "AdapterFusion needs at least two adapters, got {}",
                dirs.len()
            ),
        ));
    }
    let mut configs = Vec::new();
    let mut per_layer: Vec<Vec<BnAdapter<B>>> = vec![Vec::new(); model.layers.len()];
    for dir in dirs {
        let (cfg, layers) = read_adapter(be, model, dir)?;
        if cfg.kind != BottleneckKind::Pfeiffer {
            return Err(Error::arg(
                "fuse",
                format!(
                    "{}: adapter `{}` is Houlsby; lorafuse fuses Pfeiffer (output) adapters",
                    dir.display(),
                    cfg.name
                ),
            ));
        }
        if configs
            .iter()
            .any(|c: &BottleneckConfig| c.name == cfg.name)
        {
            return Err(Error::arg(
                "fuse",
                format!("two adapters are named `{}`", cfg.name),
            ));
        }
        for (l, bl) in layers.into_iter().enumerate() {
            let a = bl.output.ok_or_else(|| {
                Error::arg(
                    "fuse",
                    format!("{}: layer {l} has no output adapter", dir.display()),
                )
            })?;
            per_layer[l].push(a);
        }
        configs.push(cfg);
    }
    let d = model.cfg.hidden_size;
    let layers = per_layer
        .into_iter()
        .enumerate()
        .map(|(l, ads)| FuseLayer::init(be, ads, d, seed.wrapping_add(l as u64)))
        .collect::<Result<Vec<_>>>()?;
    Ok(AdapterFusion {
        adapters: configs,
        layers,
        reg_weight: 0.01,
    })
}

/// Saves the model's AdapterFusion as the library does: the fusion's config and weights, and
/// each fused adapter in its own subfolder named after it (atomically). Errors: no fusion.
pub fn save_fusion<B: Backend>(
    be: &B,
    model: &Llama<B>,
    dir: &Path,
    model_name: &str,
) -> Result<()> {
    let fu = model
        .fusion
        .as_ref()
        .ok_or_else(|| Error::arg("fusion", "the model has no AdapterFusion"))?;
    let name = fu.name();
    let mut m = model_fields(model, &name, model_name);
    m.insert("config".into(), fusion_config_json());
    m.insert(
        "adapter_names".into(),
        Value::from(
            fu.adapters
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>(),
        ),
    );
    let json = super::peft::py_json(&Value::Object(m), FUSION_CONFIG_FILE)?;
    let mut tensors = Vec::new();
    for (l, fl) in fu.layers.iter().enumerate() {
        for (sfx, t) in fl.params() {
            tensors.push((
                format!("model.layers.{l}.output_adapters.adapter_fusion_layer.{name}.{sfx}"),
                t.shape().to_vec(),
                be.download(t)?,
            ));
        }
    }
    let st = serialize_f32_meta(&dir.join(FUSION_WEIGHTS_FILE), &tensors, None)?;
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (FUSION_CONFIG_FILE.into(), json.into_bytes()),
        (FUSION_WEIGHTS_FILE.into(), st),
    ];
    for (i, cfg) in fu.adapters.iter().enumerate() {
        let layers: Vec<BnLayer<B>> = fu
            .layers
            .iter()
            .map(|fl| BnLayer {
                attention: None,
                output: Some(fl.adapters[i].clone()),
            })
            .collect();
        let (j, s) = adapter_files(be, model, cfg, &layers, model_name, &dir.join(&cfg.name))?;
        files.push((format!("{}/{CONFIG_FILE}", cfg.name), j.into_bytes()));
        files.push((format!("{}/{WEIGHTS_FILE}", cfg.name), s));
    }
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    write_dir_atomically(dir, &refs)
}

/// Loads a fusion folder the library saved (the fusion and its adapters in subfolders named in
/// `adapter_names`) onto `model`; the fusion layers train, the adapters stay frozen. Errors,
/// the model untouched: a missing file or key, adapters made for another model, shapes.
pub fn load_fusion<B: Backend>(be: &B, model: &mut Llama<B>, dir: &Path) -> Result<()> {
    let cfg_path = dir.join(FUSION_CONFIG_FILE);
    let v = read_json(&cfg_path)?;
    check_model(&cfg_path, &v, model)?;
    let names: Vec<String> = v
        .get("adapter_names")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Missing {
            path: cfg_path.clone(),
            name: "adapter_names".into(),
        })?
        .iter()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect();
    let dirs: Vec<std::path::PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    let refs: Vec<&Path> = dirs.iter().map(|p| p.as_path()).collect();
    let mut fu = new_fusion(be, model, &refs, 0)?;
    let st_path = dir.join(FUSION_WEIGHTS_FILE);
    let tensors = read_safetensors_f32(&st_path)?;
    let mut found: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> =
        tensors.into_iter().map(|(k, s, v)| (k, (s, v))).collect();
    let name = fu.name();
    let d = model.cfg.hidden_size;
    for (l, fl) in fu.layers.iter_mut().enumerate() {
        for (sfx, t) in FUSION_SUFFIXES.iter().zip(fl.params_mut()) {
            let k = format!("model.layers.{l}.output_adapters.adapter_fusion_layer.{name}.{sfx}");
            let (s, v) = found.remove(&k).ok_or_else(|| Error::Missing {
                path: st_path.clone(),
                name: k.clone(),
            })?;
            let want = if sfx.ends_with("bias") {
                vec![d]
            } else {
                vec![d, d]
            };
            if s != want {
                return Err(Error::shape(k.as_str(), format!("{want:?}"), &s));
            }
            *t = be.upload(&v, &s)?;
        }
    }
    if let Some(k) = found.keys().next() {
        return Err(Error::arg(
            k.as_str(),
            format!("unexpected tensor in {}", st_path.display()),
        ));
    }
    model.fusion = Some(fu);
    Ok(())
}
