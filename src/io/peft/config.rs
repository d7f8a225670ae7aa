//! `adapter_config.json`: [`AdapterConfig`], read and written the way PEFT 0.21.2 does.

use super::{CONFIG_NAME, PEFT_VERSION};
use crate::adapter::rank_pattern::rank_pattern_from_json;
use crate::adapter::{LoraConfig, MethodKind};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::io::Write;

/// PEFT's `target_modules`: a list of module names, or one regex string.
///
/// A list entry matches a module whose path equals it or ends with `.` + it (PEFT
/// `check_target_module_exists`); a string is a Python regex that must match the whole path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names, e.g. `["q_proj", "v_proj"]` (PEFT keeps a set; lorafuse writes it sorted).
    List(Vec<String>),
    /// A regex over the full module path, kept verbatim. lorafuse has no regex engine, so it
    /// does not check modules against it.
    Regex(String),
}

impl TargetModules {
    /// Whether a list entry names the module at `path` (PEFT's suffix rule). `None` for a regex.
    pub fn matches(&self, path: &str) -> Option<bool> {
        match self {
            TargetModules::List(names) => Some(names.iter().any(|n| suffix_match(path, n))),
            TargetModules::Regex(_) => None,
        }
    }
}

/// `path == name` or `path` ends with `.name`.
pub(super) fn suffix_match(path: &str, name: &str) -> bool {
    path == name
        || path
            .strip_suffix(name)
            .is_some_and(|head| head.ends_with('.'))
}

/// PEFT's task type of a sequence-classification model (a reward model).
pub const SEQ_CLS: &str = "SEQ_CLS";

/// The contents of a PEFT `adapter_config.json`.
///
/// The fields lorafuse reads are typed; every other key (and a `null` given for a typed key) is
/// kept in [`extra`](Self::extra), so a config read and written back keeps all of its keys and
/// values. A typed field left `None` means "absent from the file": the accessors ([`rank`],
/// [`alpha`], ...) then give PEFT's `LoraConfig` default, and serialization leaves the key out
/// (except the base `PeftConfig` keys `task_type` and `base_model_name_or_path`, written as
/// `null`, as PEFT does).
///
/// Serde goes through a JSON object (`try_from`/`into` `Map<String, Value>`), which is how the
/// typed keys and the kept ones (the flattened `extra`) share one object.
///
/// [`rank`]: Self::rank
/// [`alpha`]: Self::alpha
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Map<String, Value>", into = "Map<String, Value>")]
pub struct AdapterConfig {
    /// `LORA`, `VERA`, `ADALORA`, ... (required, as in PEFT).
    pub peft_type: String,
    /// `CAUSAL_LM` etc.; `None` is written as `null`.
    pub task_type: Option<String>,
    /// The base model's hub id or path; `None` is written as `null`.
    pub base_model_name_or_path: Option<String>,
    /// PEFT sets this to `true` in every saved config; absent reads as `false`.
    pub inference_mode: bool,
    /// The PEFT version that wrote the file.
    pub peft_version: Option<String>,
    /// Rank r (PEFT default 8).
    pub r: Option<usize>,
    /// `lora_alpha` (PEFT default 8); written as an integer when it is one, like PEFT.
    pub lora_alpha: Option<f64>,
    /// rsLoRA: scaling `lora_alpha / sqrt(r)` instead of `lora_alpha / r` (default false).
    pub use_rslora: Option<bool>,
    /// DoRA (default false); not supported yet.
    pub use_dora: Option<bool>,
    /// The adapted modules.
    pub target_modules: Option<TargetModules>,
    /// Dropout on the LoRA input during training (default 0); no effect in eval.
    pub lora_dropout: Option<f64>,
    /// `none`, `all` or `lora_only` (default `none`); only `none` is supported.
    pub bias: Option<String>,
    /// GPT-2 `Conv1D` layout (default false); `true` is not supported.
    pub fan_in_fan_out: Option<bool>,
    /// Per-module ranks (default `{}`); must be empty for LoRA.
    pub rank_pattern: Option<Map<String, Value>>,
    /// Per-module alphas (default `{}`); must be empty for LoRA.
    pub alpha_pattern: Option<Map<String, Value>>,
    /// `true`, `false` or an init name (`gaussian`, `pissa`, ...); default `true`.
    pub init_lora_weights: Option<Value>,
    /// Every other key of the file, kept as it was.
    pub extra: Map<String, Value>,
}

/// Removes `key` from `m` and parses it. A `null` stays in `m` (so it is written back) and
/// reads as `None`.
fn take<T: serde::de::DeserializeOwned>(
    m: &mut Map<String, Value>,
    key: &str,
) -> Result<Option<T>, String> {
    match m.remove(key) {
        None => Ok(None),
        Some(Value::Null) => {
            m.insert(key.to_string(), Value::Null);
            Ok(None)
        }
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| format!("field `{key}`: {e} (got {v})")),
    }
}

impl TryFrom<Map<String, Value>> for AdapterConfig {
    type Error = String;

    fn try_from(mut m: Map<String, Value>) -> Result<Self, String> {
        let peft_type: String = take(&mut m, "peft_type")?
            .ok_or_else(|| "missing field `peft_type` (every PEFT config has one)".to_string())?;
        // `null` for these is written back from the typed field, no need to keep it in extra.
        let task_type = take(&mut m, "task_type")?;
        let base_model_name_or_path = take(&mut m, "base_model_name_or_path")?;
        let inference_mode = take(&mut m, "inference_mode")?;
        for k in ["task_type", "base_model_name_or_path", "inference_mode"] {
            if m.get(k) == Some(&Value::Null) {
                m.remove(k);
            }
        }
        Ok(AdapterConfig {
            peft_type,
            task_type,
            base_model_name_or_path,
            inference_mode: inference_mode.unwrap_or(false),
            peft_version: take(&mut m, "peft_version")?,
            r: take(&mut m, "r")?,
            lora_alpha: take(&mut m, "lora_alpha")?,
            use_rslora: take(&mut m, "use_rslora")?,
            use_dora: take(&mut m, "use_dora")?,
            target_modules: take(&mut m, "target_modules")?,
            lora_dropout: take(&mut m, "lora_dropout")?,
            bias: take(&mut m, "bias")?,
            fan_in_fan_out: take(&mut m, "fan_in_fan_out")?,
            rank_pattern: take(&mut m, "rank_pattern")?,
            alpha_pattern: take(&mut m, "alpha_pattern")?,
            init_lora_weights: take(&mut m, "init_lora_weights")?,
            extra: m,
        })
    }
}

/// A JSON number the way Python writes it: an integer when the value is one.
fn py_number(x: f64) -> Value {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

impl From<AdapterConfig> for Map<String, Value> {
    fn from(c: AdapterConfig) -> Self {
        let mut m = c.extra;
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("peft_type", Some(Value::String(c.peft_type)));
        put(
            "task_type",
            Some(c.task_type.map_or(Value::Null, Value::String)),
        );
        put(
            "base_model_name_or_path",
            Some(c.base_model_name_or_path.map_or(Value::Null, Value::String)),
        );
        put("inference_mode", Some(Value::Bool(c.inference_mode)));
        put("peft_version", c.peft_version.map(Value::String));
        put("r", c.r.map(Value::from));
        put("lora_alpha", c.lora_alpha.map(py_number));
        put("use_rslora", c.use_rslora.map(Value::Bool));
        put("use_dora", c.use_dora.map(Value::Bool));
        put(
            "target_modules",
            c.target_modules.map(|t| match t {
                TargetModules::List(mut v) => {
                    v.sort();
                    v.dedup();
                    Value::from(v)
                }
                TargetModules::Regex(s) => Value::String(s),
            }),
        );
        put("lora_dropout", c.lora_dropout.map(Value::from));
        put("bias", c.bias.map(Value::String));
        put("fan_in_fan_out", c.fan_in_fan_out.map(Value::Bool));
        put("rank_pattern", c.rank_pattern.map(Value::Object));
        put("alpha_pattern", c.alpha_pattern.map(Value::Object));
        put("init_lora_weights", c.init_lora_weights);
        m
    }
}

/// Every key PEFT 0.21.2 writes for a `LoraConfig`, with its default value (what
/// `LoraConfig(...).save_pretrained` gives for keys the user did not set).
pub(super) fn lora_config_defaults() -> Map<String, Value> {
    let v = serde_json::json!({
        "alora_invocation_tokens": null,
        "alpha_pattern": {},
        "arrow_config": null,
        "auto_mapping": null,
        "base_model_name_or_path": null,
        "bias": "none",
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "kasa_config": null,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_bias": false,
        "lora_dropout": 0.0,
        "lora_ga_config": null,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "monteclora_config": null,
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "qalora_group_size": 16,
        "r": 8,
        "rank_pattern": {},
        "revision": null,
        "target_modules": null,
        "target_parameters": null,
        "task_type": null,
        "trainable_token_indices": null,
        "use_bdlora": null,
        "use_dora": false,
        "use_qalora": false,
        "use_rslora": false,
        "velora_config": null
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// Every key PEFT 0.21.2 writes for an `AdaLoraConfig` (a `LoraConfig` subclass) beyond
/// `LoraConfig`'s, with its default. `total_step` has no usable default: PEFT refuses `None`.
pub(super) fn adalora_config_defaults() -> Map<String, Value> {
    let v = serde_json::json!({
        "beta1": 0.85,
        "beta2": 0.85,
        "deltaT": 1,
        "init_r": 12,
        "orth_reg_weight": 0.5,
        "rank_pattern": null,
        "target_r": 8,
        "tfinal": 0,
        "tinit": 0,
        "total_step": null,
        "peft_type": "ADALORA"
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// Every key PEFT 0.21.2 writes for a `VeraConfig`, with its default.
pub(super) fn vera_config_defaults() -> Map<String, Value> {
    let v = serde_json::json!({
        "auto_mapping": null,
        "base_model_name_or_path": null,
        "bias": "none",
        "d_initial": 0.1,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "modules_to_save": null,
        "peft_type": "VERA",
        "peft_version": PEFT_VERSION,
        "projection_prng_key": 0,
        "r": 256,
        "revision": null,
        "save_projection": true,
        "target_modules": null,
        "task_type": null,
        "vera_dropout": 0.0
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// The keys PEFT writes for a `peft_type`, with their defaults (empty for an unknown type).
fn config_defaults(peft_type: &str) -> Map<String, Value> {
    match peft_type {
        "LORA" => lora_config_defaults(),
        "ADALORA" => {
            let mut m = lora_config_defaults();
            m.extend(adalora_config_defaults());
            m
        }
        "VERA" => vera_config_defaults(),
        t => super::additive::defaults(t).unwrap_or_default(),
    }
}

/// True for JSON `null`, `false`, `{}`, `[]` and `""`: "not set" for a config switch.
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

impl AdapterConfig {
    /// Rank r, or PEFT's default 8 when absent.
    pub fn rank(&self) -> usize {
        self.r.unwrap_or(8)
    }

    /// `lora_alpha`, or PEFT's default 8 when absent.
    pub fn alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(8.0)
    }

    /// Whether rsLoRA scaling is on (default false).
    pub fn rslora(&self) -> bool {
        self.use_rslora.unwrap_or(false)
    }

    /// The LoRA scaling, as PEFT's `LoraLayer.update_layer` computes it: `lora_alpha / r`, or
    /// `lora_alpha / sqrt(r)` with `use_rslora`, in f64 and then rounded to f32 (the scalar is
    /// applied to f32 tensors). Errors: r = 0 or a non-finite `lora_alpha`.
    pub fn scaling(&self) -> Result<f32> {
        let r = self.rank();
        if r == 0 {
            return Err(Error::arg("r", "LoRA rank r must be at least 1, got 0"));
        }
        let alpha = self.alpha();
        if !alpha.is_finite() {
            return Err(Error::arg(
                "lora_alpha",
                format!("must be finite, got {alpha}"),
            ));
        }
        let s = if self.rslora() {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok(s as f32)
    }

    /// Checks that lorafuse can apply this adapter exactly as PEFT would: a plain LoRA or rsLoRA
    /// adapter on `nn.Linear` layers.
    ///
    /// Errors (each naming the setting): a `peft_type` other than `LORA` (DoRA, VeRA and AdaLoRA
    /// say "not supported yet"), `use_dora` or another LoRA variant (aLoRA, VeLoRA, MonteCLoRA,
    /// BD-LoRA, Arrow, KaSA, MiCA, QALoRA), `fan_in_fan_out: true`, `bias` other than `none`,
    /// `lora_bias: true`, a non-empty `rank_pattern` or `alpha_pattern`, `layers_to_transform`,
    /// `layer_replication`, `modules_to_save`, `trainable_token_indices`, `target_parameters`,
    /// an `init_lora_weights` (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) whose adapter only works on
    /// the base weights PEFT rewrote, r = 0, or a non-finite `lora_alpha`.
    /// `lora_dropout` is accepted: it has no effect outside training.
    pub fn check_lora_supported(&self) -> Result<()> {
        let other = "use apply_adapter / adapter_layers_from_adapter, which apply every method";
        match self.peft_type.as_str() {
            "LORA" => {}
            t @ ("VERA" | "ADALORA") => {
                return Err(Error::arg(
                    "peft_type",
                    format!(
                        "peft_type `{t}` is not a plain LoRA adapter; lora_layers_from_adapter \
                         builds LoRA layers only ({other})"
                    ),
                ));
            }
            t => {
                return Err(Error::arg(
                    "peft_type",
                    format!(
                        "peft_type `{t}` is not supported (lorafuse applies LORA (with DoRA), \
                         VERA, ADALORA, IA3, BEFT, LN_TUNING, PROMPT_TUNING, P_TUNING and \
                         PREFIX_TUNING adapters)"
                    ),
                ));
            }
        }
        if self.use_dora == Some(true) {
            return Err(Error::arg(
                "use_dora",
                format!(
                    "a DoRA adapter (use_dora: true) is not a plain LoRA adapter; \
                     lora_layers_from_adapter builds LoRA layers only ({other})"
                ),
            ));
        }
        self.check_lora_family()
    }

    /// VeRA's `projection_prng_key` (PEFT default 0) and whether the projections are in the
    /// weights file (`save_projection`, default true).
    pub fn vera_projection(&self) -> (u64, bool) {
        let key = self
            .extra
            .get("projection_prng_key")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let saved = self.extra.get("save_projection") != Some(&Value::Bool(false));
        (key, saved)
    }

    /// Which method this adapter is: `LORA` (DoRA with `use_dora: true`), `VERA` or `ADALORA`,
    /// after checking that lorafuse can apply it exactly as PEFT would.
    ///
    /// Errors, each naming the setting: another `peft_type`; for LoRA/DoRA/AdaLoRA those of
    /// [`check_lora_supported`](Self::check_lora_supported) other than the method itself
    /// (AdaLoRA may have a `rank_pattern`: its mask; `use_dora` with AdaLoRA is an error);
    /// an AdaLoRA `init_r` of 0; for VeRA `fan_in_fan_out`, a `bias` other than `none`,
    /// `layers_to_transform`, `modules_to_save`, r = 0.
    pub fn check_supported(&self) -> Result<MethodKind> {
        match self.peft_type.as_str() {
            "LORA" => {
                self.check_lora_family()?;
                Ok(if self.use_dora == Some(true) {
                    MethodKind::Dora
                } else {
                    MethodKind::Lora
                })
            }
            "ADALORA" => {
                if self.use_dora == Some(true) {
                    return Err(Error::arg(
                        "use_dora",
                        "use_dora: true with peft_type ADALORA (PEFT refuses it too)",
                    ));
                }
                self.check_lora_family()?;
                if self.init_r() == 0 {
                    return Err(Error::arg(
                        "init_r",
                        "AdaLoRA init_r must be at least 1, got 0",
                    ));
                }
                self.adalora_rank_pattern()?;
                Ok(MethodKind::AdaLora)
            }
            "VERA" => {
                if self.fan_in_fan_out == Some(true) {
                    return Err(Error::arg(
                        "fan_in_fan_out",
                        "fan_in_fan_out: true (GPT-2 Conv1D weight layout) is not supported",
                    ));
                }
                if let Some(b) = self.bias.as_deref().filter(|b| *b != "none") {
                    return Err(Error::arg(
                        "bias",
                        format!(
                            "bias `{b}` (trained base biases) is not supported; only `none` is"
                        ),
                    ));
                }
                for key in ["layers_to_transform", "modules_to_save"] {
                    if let Some(v) = self.extra.get(key).filter(|v| !is_unset(v)) {
                        return Err(Error::arg(key, format!("{key}: {v} is not supported")));
                    }
                }
                if self.rank() == 0 {
                    return Err(Error::arg("r", "VeRA rank r must be at least 1, got 0"));
                }
                Ok(MethodKind::Vera)
            }
            "IA3" | "BEFT" => {
                if self.fan_in_fan_out == Some(true) {
                    return Err(Error::arg(
                        "fan_in_fan_out",
                        "fan_in_fan_out: true (GPT-2 Conv1D weight layout) is not supported",
                    ));
                }
                if let Some(v) = self.extra.get("modules_to_save").filter(|v| !is_unset(v)) {
                    return Err(Error::arg(
                        "modules_to_save",
                        format!("modules_to_save: {v} is not supported"),
                    ));
                }
                Ok(if self.peft_type == "IA3" {
                    MethodKind::Ia3
                } else {
                    MethodKind::Beft
                })
            }
            t => Err(Error::arg(
                "peft_type",
                format!(
                    "peft_type `{t}` is not supported (lorafuse applies LORA (with rsLoRA and \
                     DoRA), VERA, ADALORA, IA3, BEFT, LN_TUNING, PROMPT_TUNING, P_TUNING and \
                     PREFIX_TUNING adapters)"
                ),
            )),
        }
    }

    /// Whether this is a sequence-classification adapter whose `modules_to_save` is PEFT's
    /// classification head and nothing else (`task_type: SEQ_CLS`, modules among `classifier`
    /// and `score`: what PEFT writes for `LlamaForSequenceClassification`, a reward model).
    pub fn is_seq_cls_head(&self) -> bool {
        self.task_type.as_deref() == Some(SEQ_CLS)
            && match self.extra.get("modules_to_save") {
                Some(Value::Array(m)) => m
                    .iter()
                    .all(|v| matches!(v.as_str(), Some("classifier" | "score"))),
                None | Some(Value::Null) => true,
                _ => false,
            }
    }

    /// Marks the config as PEFT marks a reward model's: `task_type: SEQ_CLS` with the head in
    /// `modules_to_save` (`["classifier", "score"]`, PEFT's list for the task).
    pub fn set_seq_cls_head(&mut self) {
        self.task_type = Some(SEQ_CLS.into());
        self.extra.insert(
            "modules_to_save".into(),
            serde_json::json!(["classifier", "score"]),
        );
    }

    /// AdaLoRA's `init_r` (PEFT default 12): the rank every layer starts with, and the
    /// `ranknum` divisor of a loaded layer even when masked ranks were dropped on save.
    pub fn init_r(&self) -> usize {
        self.extra
            .get("init_r")
            .and_then(Value::as_u64)
            .map_or(12, |v| v as usize)
    }

    /// AdaLoRA's `rank_pattern`, keyed by module path (`fc1`, `model.layers.0.self_attn.q_proj`):
    /// one bool per rank of init_r, `true` = kept. PEFT writes the keys as `<module>.lora_E`
    /// (`<module>.lora_E.default` while training; both are read). Empty when absent or `null`.
    /// Errors, naming the key: a key not ending in `.lora_E`, a value that is not a list of
    /// bools (or 0/1), a list whose length is not init_r.
    pub fn adalora_rank_pattern(&self) -> Result<BTreeMap<String, Vec<bool>>> {
        let Some(p) = &self.rank_pattern else {
            return Ok(BTreeMap::new());
        };
        let out = rank_pattern_from_json(&Value::Object(p.clone()), "default")?;
        let init_r = self.init_r();
        if let Some((k, v)) = out.iter().find(|(_, v)| v.len() != init_r) {
            return Err(Error::arg(
                format!("rank_pattern.{k}.lora_E"),
                format!("expected {init_r} bools (init_r), got {}", v.len()),
            ));
        }
        Ok(out)
    }

    /// The checks shared by LoRA, DoRA and AdaLoRA (everything but the method itself).
    fn check_lora_family(&self) -> Result<()> {
        let later = "not supported yet";
        for (key, what) in [
            ("alora_invocation_tokens", "aLoRA"),
            ("velora_config", "VeLoRA"),
            ("monteclora_config", "MonteCLoRA"),
            ("use_bdlora", "BD-LoRA"),
            ("arrow_config", "Arrow routing"),
            ("kasa_config", "KaSA"),
            ("use_qalora", "QALoRA"),
        ] {
            if let Some(v) = self.extra.get(key).filter(|v| !is_unset(v)) {
                return Err(Error::arg(
                    key,
                    format!("{what} adapters ({key}: {v}) are {later}"),
                ));
            }
        }
        if self.fan_in_fan_out == Some(true) {
            return Err(Error::arg(
                "fan_in_fan_out",
                "fan_in_fan_out: true (GPT-2 Conv1D weight layout) is not supported; lorafuse \
                 layers are nn.Linear [out, in]",
            ));
        }
        if let Some(b) = self.bias.as_deref().filter(|b| *b != "none") {
            return Err(Error::arg(
                "bias",
                format!("bias `{b}` (trained base biases) is not supported; only `none` is"),
            ));
        }
        if self.extra.get("lora_bias").is_some_and(|v| !is_unset(v)) {
            return Err(Error::arg(
                "lora_bias",
                "lora_bias: true (a bias on lora_B) is not supported",
            ));
        }
        let rank_pattern = if self.peft_type == "ADALORA" {
            &None
        } else {
            &self.rank_pattern
        };
        for (key, pat) in [
            ("rank_pattern", rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ] {
            if let Some(p) = pat.as_ref().filter(|p| !p.is_empty()) {
                let keys: Vec<&String> = p.keys().collect();
                return Err(Error::arg(
                    key,
                    format!(
                        "per-module {key} {keys:?} is not supported yet; every module must use \
                         r and lora_alpha"
                    ),
                ));
            }
        }
        let seq_cls_head = self.is_seq_cls_head();
        for (key, what) in [
            ("layers_to_transform", "adapting only some layers"),
            ("layer_replication", "layer replication"),
            ("modules_to_save", "fully trained extra modules"),
            ("trainable_token_indices", "trainable tokens"),
            ("target_parameters", "LoRA on nn.Parameter targets"),
        ] {
            if key == "modules_to_save" && seq_cls_head {
                continue;
            }
            if let Some(v) = self.extra.get(key).filter(|v| !is_unset(v)) {
                return Err(Error::arg(
                    key,
                    format!("{key}: {v} ({what}) is not supported"),
                ));
            }
        }
        match &self.init_lora_weights {
            None | Some(Value::Bool(_)) => {}
            Some(Value::String(s)) if matches!(s.as_str(), "gaussian" | "eva" | "orthogonal") => {}
            Some(Value::String(s))
                if s.starts_with("pissa")
                    || ["olora", "corda", "loftq", "lora_ga"]
                        .contains(&s.to_lowercase().as_str()) =>
            {
                return Err(Error::arg(
                    "init_lora_weights",
                    format!(
                        "init_lora_weights `{s}` rewrites the base weights, so this adapter only \
                         fits PEFT's modified base model; save it from PEFT with \
                         path_initial_model_for_weight_conversion to get a plain LoRA adapter"
                    ),
                ));
            }
            Some(v) => {
                return Err(Error::arg(
                    "init_lora_weights",
                    format!("init_lora_weights {v} is {later}"),
                ));
            }
        }
        if self.peft_type == "ADALORA" {
            if !self.alpha().is_finite() {
                return Err(Error::arg(
                    "lora_alpha",
                    format!("must be finite, got {}", self.alpha()),
                ));
            }
        } else {
            self.scaling()?;
        }
        Ok(())
    }

    /// The config as lorafuse's [`LoraConfig`]. Errors: as [`check_lora_supported`], and a
    /// regex or missing `target_modules`.
    ///
    /// [`check_lora_supported`]: Self::check_lora_supported
    pub fn to_lora_config(&self) -> Result<LoraConfig> {
        self.check_lora_supported()?;
        let target_modules = match &self.target_modules {
            Some(TargetModules::List(v)) => v.clone(),
            Some(TargetModules::Regex(s)) => {
                return Err(Error::arg(
                    "target_modules",
                    format!("a regex ({s:?}) cannot be turned into a module list"),
                ));
            }
            None => return Err(Error::arg("target_modules", "missing")),
        };
        let cfg = LoraConfig {
            r: self.rank(),
            lora_alpha: self.alpha() as f32,
            use_rslora: self.rslora(),
            target_modules,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `adapter_config.json` text PEFT would write: `json.dumps(d, indent=2,
    /// sort_keys=True)` (non-ASCII escaped, no trailing newline). For a `LORA` config, every key
    /// PEFT 0.21.2 writes is present, missing ones filled with `LoraConfig`'s defaults.
    pub fn to_peft_json(&self) -> Result<String> {
        let mut m: Map<String, Value> = self.clone().into();
        for (k, v) in config_defaults(&self.peft_type) {
            m.entry(k).or_insert(v);
        }
        // Sort explicitly: serde_json's Map is only sorted without `preserve_order`.
        let sorted: BTreeMap<String, Value> = m.into_iter().collect();
        let mut out = Vec::new();
        let mut ser = serde_json::Serializer::with_formatter(&mut out, PyJsonFormatter::new());
        sorted.serialize(&mut ser).map_err(|e| Error::Json {
            context: CONFIG_NAME.into(),
            msg: e.to_string(),
        })?;
        String::from_utf8(out).map_err(|e| Error::Json {
            context: CONFIG_NAME.into(),
            msg: e.to_string(),
        })
    }
}

/// A JSON value as Python's `json.dumps(v, indent=2, sort_keys=True)` writes it (the layout
/// of `adapter_config.json` files of PEFT and the `adapters` library).
pub(crate) fn py_json(v: &Value, context: &str) -> Result<String> {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(b.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            x => x.clone(),
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyJsonFormatter::new());
    sorted(v).serialize(&mut ser).map_err(|e| Error::Json {
        context: context.into(),
        msg: e.to_string(),
    })?;
    String::from_utf8(out).map_err(|e| Error::Json {
        context: context.into(),
        msg: e.to_string(),
    })
}

/// serde_json's pretty printer (2-space indent, `": "`) plus Python's `ensure_ascii=True`:
/// non-ASCII characters are written as `\uXXXX` (UTF-16), as `json.dumps` does by default.
struct PyJsonFormatter(serde_json::ser::PrettyFormatter<'static>);

impl PyJsonFormatter {
    fn new() -> Self {
        PyJsonFormatter(serde_json::ser::PrettyFormatter::with_indent(b"  "))
    }
}

impl serde_json::ser::Formatter for PyJsonFormatter {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_value(w)
    }
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for ch in fragment.chars() {
            if ch.is_ascii() {
                w.write_all(&[ch as u8])?;
            } else {
                let mut buf = [0u16; 2];
                for unit in ch.encode_utf16(&mut buf) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}
