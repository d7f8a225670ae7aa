//! PEFT's additive and selective methods in and out: IA3, BEFT, LN tuning and the prompt
//! learning methods (prompt tuning, P-tuning, prefix tuning).
//!
//! Key layout (PEFT 0.21.2 `get_peft_model_state_dict`, adapter name removed):
//!
//! | method | keys |
//! |---|---|
//! | IA3 | `base_model.model.<path>.ia3_l`: `[out, 1]`, or `[1, in]` for `feedforward_modules` |
//! | BEFT | `base_model.model.<path>.beft_bias [1, out]` |
//! | LN tuning | `base_model.model.<norm path>.ln_tuning_layers.weight [hidden]` |
//! | prompt, P-, prefix tuning | `prompt_embeddings`: the prompt's output `[nvt, token_dim]` (`[nvt, 2 L kv_dim]` for prefix tuning); the encoder is not saved |
//!
//! Loading a prompt-learning adapter gives the model its saved output as a fixed prompt (what
//! PEFT uses in inference mode), without the encoder.

use super::config::suffix_match;
use super::{AdapterConfig, AdapterTensor, KEY_PREFIX, PEFT_VERSION, TargetModules};
use crate::adapter::{LnTuning, PromptMethod, SoftPrompt};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::llama::Llama;
use serde_json::{Map, Value, json};

/// The key of a prompt-learning adapter's one tensor.
pub const PROMPT_KEY: &str = "prompt_embeddings";

/// The peft_types of this module.
pub const ADDITIVE_TYPES: [&str; 6] = [
    "IA3",
    "BEFT",
    "LN_TUNING",
    "PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
];

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// Every key PEFT 0.21.2 writes for these peft_types, with its default (`None` for the others).
pub(super) fn defaults(peft_type: &str) -> Option<Map<String, Value>> {
    let common = json!({
        "auto_mapping": null,
        "base_model_name_or_path": null,
        "inference_mode": true,
        "modules_to_save": null,
        "peft_version": PEFT_VERSION,
        "revision": null,
        "task_type": "CAUSAL_LM",
    });
    let mut m = obj(common);
    let extra = match peft_type {
        "IA3" => json!({
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "feedforward_modules": null,
            "init_ia3_weights": true,
            "target_modules": null,
        }),
        "BEFT" => json!({"init_weights": true, "target_modules": null}),
        "LN_TUNING" => json!({"exclude_modules": null, "target_modules": null}),
        "PROMPT_TUNING" => json!({
            "num_attention_heads": null,
            "num_layers": null,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": null,
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": null,
            "token_dim": null,
            "tokenizer_kwargs": null,
            "tokenizer_name_or_path": null,
        }),
        "P_TUNING" => json!({
            "encoder_dropout": 0.0,
            "encoder_hidden_size": null,
            "encoder_num_layers": 2,
            "encoder_reparameterization_type": "MLP",
            "num_attention_heads": null,
            "num_layers": null,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": null,
            "token_dim": null,
        }),
        "PREFIX_TUNING" => json!({
            "encoder_hidden_size": null,
            "init_weights": null,
            "num_attention_heads": null,
            "num_layers": null,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": null,
            "prefix_projection": false,
            "token_dim": null,
        }),
        _ => return None,
    };
    m.extend(obj(extra));
    Some(m)
}

fn base_config(peft_type: &str, base: Option<String>) -> AdapterConfig {
    AdapterConfig {
        peft_type: peft_type.into(),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: base,
        inference_mode: true,
        peft_version: Some(PEFT_VERSION.into()),
        r: None,
        lora_alpha: None,
        use_rslora: None,
        use_dora: None,
        target_modules: None,
        lora_dropout: None,
        bias: None,
        fan_in_fan_out: None,
        rank_pattern: None,
        alpha_pattern: None,
        init_lora_weights: None,
        extra: Map::new(),
    }
}

fn proj_names(names: &[String]) -> Vec<String> {
    names
        .iter()
        .map(|n| {
            let n = n.trim();
            if crate::model::llama::PROJ_NAMES.contains(&n) {
                n.to_string()
            } else {
                format!("{n}_proj")
            }
        })
        .collect()
}

/// PEFT's `IA3Config` for `target_modules` with `feedforward_modules` (short forms such as
/// `down` become `down_proj`).
pub fn ia3_config(
    targets: &[String],
    feedforward: &[String],
    base: Option<String>,
) -> AdapterConfig {
    let mut c = base_config("IA3", base);
    c.target_modules = Some(TargetModules::List(proj_names(targets)));
    c.fan_in_fan_out = Some(false);
    let mut ff = proj_names(feedforward);
    ff.sort();
    c.extra
        .insert("feedforward_modules".into(), Value::from(ff));
    c.extra.insert("init_ia3_weights".into(), Value::Bool(true));
    c
}

/// PEFT's `BeftConfig` for `target_modules`.
pub fn beft_config(targets: &[String], base: Option<String>) -> AdapterConfig {
    let mut c = base_config("BEFT", base);
    c.target_modules = Some(TargetModules::List(proj_names(targets)));
    c
}

/// PEFT's `LNTuningConfig` for the norms `targets`.
pub fn ln_tuning_config(targets: &[String], base: Option<String>) -> AdapterConfig {
    let mut c = base_config("LN_TUNING", base);
    c.target_modules = Some(TargetModules::List(targets.to_vec()));
    c
}

/// How a prompt-learning config was set up beyond the model's shape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PromptOptions {
    /// P-tuning's MLP width; prefix tuning's projection width (with `prefix_projection`).
    pub encoder_hidden_size: Option<usize>,
    /// Prefix tuning: the prefix is the projection MLP's output.
    pub prefix_projection: bool,
    /// Prompt tuning: `TEXT` init from this text (else `RANDOM`).
    pub init_text: Option<String>,
    /// The tokenizer used for the init text (PEFT's `tokenizer_name_or_path`).
    pub tokenizer_name_or_path: Option<String>,
}

/// The PEFT config of a soft prompt for a model: `token_dim` is the hidden size (prompt and
/// P-tuning) or `kv_heads * head_dim` (prefix tuning, with `num_attention_heads` the key/value
/// head count, as PEFT records it for GQA models); prefix tuning's `encoder_hidden_size`
/// defaults to `token_dim` without projection, as PEFT's does.
pub fn prompt_config<B: Backend>(
    model: &Llama<B>,
    method: PromptMethod,
    num_virtual_tokens: usize,
    opts: &PromptOptions,
    base: Option<String>,
) -> AdapterConfig {
    let c = &model.cfg;
    let mut cfg = base_config(method.peft_type(), base);
    let put = |cfg: &mut AdapterConfig, k: &str, v: Value| {
        cfg.extra.insert(k.into(), v);
    };
    put(
        &mut cfg,
        "num_virtual_tokens",
        Value::from(num_virtual_tokens),
    );
    put(&mut cfg, "num_layers", Value::from(c.num_hidden_layers));
    put(&mut cfg, "num_transformer_submodules", Value::from(1));
    match method {
        PromptMethod::PromptTuning => {
            put(&mut cfg, "token_dim", Value::from(c.hidden_size));
            put(
                &mut cfg,
                "num_attention_heads",
                Value::from(c.num_attention_heads),
            );
            match &opts.init_text {
                Some(t) => {
                    put(&mut cfg, "prompt_tuning_init", Value::from("TEXT"));
                    put(&mut cfg, "prompt_tuning_init_text", Value::from(t.clone()));
                    put(
                        &mut cfg,
                        "tokenizer_name_or_path",
                        opts.tokenizer_name_or_path
                            .clone()
                            .map_or(Value::Null, Value::from),
                    );
                }
                None => put(&mut cfg, "prompt_tuning_init", Value::from("RANDOM")),
            }
        }
        PromptMethod::PTuning => {
            put(&mut cfg, "token_dim", Value::from(c.hidden_size));
            put(
                &mut cfg,
                "num_attention_heads",
                Value::from(c.num_attention_heads),
            );
            put(
                &mut cfg,
                "encoder_hidden_size",
                Value::from(opts.encoder_hidden_size.unwrap_or(c.hidden_size)),
            );
            put(
                &mut cfg,
                "encoder_reparameterization_type",
                Value::from("MLP"),
            );
            put(&mut cfg, "encoder_num_layers", Value::from(2));
            put(&mut cfg, "encoder_dropout", Value::from(0.0));
        }
        PromptMethod::PrefixTuning => {
            let kv = c.num_key_value_heads * c.head_dim;
            put(&mut cfg, "token_dim", Value::from(kv));
            put(
                &mut cfg,
                "num_attention_heads",
                Value::from(c.num_key_value_heads),
            );
            put(
                &mut cfg,
                "prefix_projection",
                Value::Bool(opts.prefix_projection),
            );
            put(
                &mut cfg,
                "encoder_hidden_size",
                Value::from(opts.encoder_hidden_size.unwrap_or(kv)),
            );
        }
    }
    cfg
}

/// The `feedforward_modules` of an IA3 config (empty when absent or null).
pub fn feedforward_modules(cfg: &AdapterConfig) -> Vec<String> {
    match cfg.extra.get("feedforward_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Whether module `path` is one of IA3's feed-forward modules.
pub fn is_feedforward(cfg: &AdapterConfig, path: &str) -> bool {
    feedforward_modules(cfg)
        .iter()
        .any(|n| suffix_match(path, n))
}

fn usize_field(cfg: &AdapterConfig, key: &str) -> Result<usize> {
    cfg.extra
        .get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| {
            Error::arg(
                key,
                format!("missing or not an integer in this {} config", cfg.peft_type),
            )
        })
}

/// The prompt-learning method of a config, if it is one.
pub fn prompt_method(cfg: &AdapterConfig) -> Option<PromptMethod> {
    match cfg.peft_type.as_str() {
        "PROMPT_TUNING" => Some(PromptMethod::PromptTuning),
        "P_TUNING" => Some(PromptMethod::PTuning),
        "PREFIX_TUNING" => Some(PromptMethod::PrefixTuning),
        _ => None,
    }
}

/// Gives `model` the soft prompt of a PEFT prompt-learning adapter (its `prompt_embeddings`
/// as a fixed prompt, as PEFT's inference mode uses it). Errors naming the key: a config made
/// for another model (`num_layers`, `token_dim`, the head count), `num_transformer_submodules`
/// other than 1, P-tuning's LSTM encoder (its saved output works, the flag is checked only),
/// no or another tensor, a shape other than `[num_virtual_tokens, width]`.
pub fn apply_prompt<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    cfg: &AdapterConfig,
    tensors: &[AdapterTensor],
) -> Result<()> {
    let method = prompt_method(cfg).ok_or_else(|| {
        Error::arg(
            "peft_type",
            format!("`{}` is not prompt learning", cfg.peft_type),
        )
    })?;
    let c = &model.cfg;
    let nvt = usize_field(cfg, "num_virtual_tokens")?;
    if nvt == 0 {
        return Err(Error::arg("num_virtual_tokens", "must be at least 1"));
    }
    let layers = usize_field(cfg, "num_layers")?;
    if layers != c.num_hidden_layers {
        return Err(Error::arg(
            "num_layers",
            format!(
                "the adapter was made for {layers} layers; this model has {}",
                c.num_hidden_layers
            ),
        ));
    }
    if let Some(n) = cfg
        .extra
        .get("num_transformer_submodules")
        .and_then(Value::as_u64)
        && n != 1
    {
        return Err(Error::arg(
            "num_transformer_submodules",
            format!("{n}: a decoder-only model has 1"),
        ));
    }
    let kv = c.num_key_value_heads * c.head_dim;
    let (token_dim, heads, out) = match method {
        PromptMethod::PrefixTuning => (kv, c.num_key_value_heads, 2 * c.num_hidden_layers * kv),
        _ => (c.hidden_size, c.num_attention_heads, c.hidden_size),
    };
    let td = usize_field(cfg, "token_dim")?;
    if td != token_dim {
        return Err(Error::arg(
            "token_dim",
            format!("the adapter's token_dim is {td}; this model needs {token_dim}"),
        ));
    }
    if let Some(h) = cfg.extra.get("num_attention_heads").and_then(Value::as_u64)
        && h as usize != heads
    {
        return Err(Error::arg(
            "num_attention_heads",
            format!("the adapter was made for {h} heads; this model has {heads}"),
        ));
    }
    let [(key, shape, data)] = tensors else {
        return Err(Error::arg(
            PROMPT_KEY,
            format!(
                "a {} adapter holds exactly one tensor `{PROMPT_KEY}`, got {}",
                cfg.peft_type,
                tensors.len()
            ),
        ));
    };
    if key != PROMPT_KEY {
        return Err(Error::arg(key.as_str(), format!("expected `{PROMPT_KEY}`")));
    }
    if shape[..] != [nvt, out] {
        return Err(Error::shape(
            PROMPT_KEY,
            format!("[{nvt}, {out}] (num_virtual_tokens, output width)"),
            shape,
        ));
    }
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            name: PROMPT_KEY.into(),
            index: i,
        });
    }
    let sp = SoftPrompt {
        method,
        embedding: be.upload(data, shape)?,
        encoder: None,
    };
    sp.validate(out)?;
    model.soft_prompt = Some(sp);
    Ok(())
}

/// The soft prompt's output as PEFT saves it (`prompt_embeddings`).
pub fn prompt_tensors<B: Backend>(be: &B, model: &Llama<B>) -> Result<Vec<AdapterTensor>> {
    let sp = model
        .soft_prompt
        .as_ref()
        .ok_or_else(|| Error::arg("soft_prompt", "the model has no soft prompt"))?;
    let (out, _) = sp.output(be)?;
    Ok(vec![(
        PROMPT_KEY.into(),
        out.shape().to_vec(),
        be.download(&out)?,
    )])
}

/// The path of norm `which` of layer l in PEFT's keys (`model.layers.l.input_layernorm`).
fn norm_path(l: usize, which: usize) -> String {
    let n = ["input_layernorm", "post_attention_layernorm"][which];
    format!("model.layers.{l}.{n}")
}

/// LN tuning's tensors as PEFT saves them.
pub fn ln_tuning_tensors<B: Backend>(be: &B, model: &Llama<B>) -> Result<Vec<AdapterTensor>> {
    let ln = model
        .ln_tuning
        .as_ref()
        .ok_or_else(|| Error::arg("ln_tuning", "the model has no LN tuning"))?;
    let mut out = Vec::new();
    for (l, pair) in ln.layers.iter().enumerate() {
        for (which, t) in pair.iter().enumerate() {
            if let Some(t) = t {
                out.push((
                    format!(
                        "{KEY_PREFIX}{}.ln_tuning_layers.weight",
                        norm_path(l, which)
                    ),
                    t.shape().to_vec(),
                    be.download(t)?,
                ));
            }
        }
    }
    if let Some(t) = &ln.norm {
        out.push((
            format!("{KEY_PREFIX}model.norm.ln_tuning_layers.weight"),
            t.shape().to_vec(),
            be.download(t)?,
        ));
    }
    Ok(out)
}

/// Gives `model` the norm copies of a PEFT LN tuning adapter. Errors naming the key: a key
/// that is not a norm of this model, a shape other than `[hidden]`, a non-finite value, no
/// tensor.
pub fn apply_ln_tuning<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    tensors: &[AdapterTensor],
) -> Result<()> {
    if tensors.is_empty() {
        return Err(Error::arg(
            "tensors",
            "the LN tuning adapter holds no tensor",
        ));
    }
    let d = model.cfg.hidden_size;
    let n = model.layers.len();
    let mut ln = LnTuning {
        layers: vec![[None, None]; n],
        norm: None,
    };
    for (key, shape, data) in tensors {
        if shape[..] != [d] {
            return Err(Error::shape(key.as_str(), format!("[{d}] (hidden)"), shape));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                name: key.clone(),
                index: i,
            });
        }
        let path = key
            .strip_prefix(KEY_PREFIX)
            .and_then(|k| k.strip_suffix(".ln_tuning_layers.weight"))
            .ok_or_else(|| {
                Error::arg(
                    key.as_str(),
                    format!("expected `{KEY_PREFIX}<norm>.ln_tuning_layers.weight`"),
                )
            })?;
        let t = be.upload(data, shape)?;
        if path == "model.norm" {
            ln.norm = Some(t);
            continue;
        }
        let slot = (0..n)
            .flat_map(|l| (0..2).map(move |w| (l, w)))
            .find(|&(l, w)| norm_path(l, w) == path)
            .ok_or_else(|| {
                Error::arg(
                    key.as_str(),
                    format!("no norm `{path}` in this model of {n} layers"),
                )
            })?;
        ln.layers[slot.0][slot.1] = Some(t);
    }
    model.ln_tuning = Some(ln);
    Ok(())
}
