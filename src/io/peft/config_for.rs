//! The `adapter_config.json` lorafuse writes for each method it trains (LoRA, DoRA, VeRA,
//! AdaLoRA with its rank pattern), with PEFT 0.21.2's fields and defaults.

use super::PEFT_VERSION;
use super::config::{
    AdapterConfig, TargetModules, adalora_config_defaults, lora_config_defaults,
    vera_config_defaults,
};
use crate::adapter::rank_pattern::rank_pattern_to_json;
use crate::adapter::{LoraConfig, MethodKind};
use crate::error::{Error, Result};
use crate::model::llama::PROJ_NAMES;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The PEFT config of a lorafuse LoRA: `peft_type` `LORA`, `task_type` `CAUSAL_LM`, r,
/// `lora_alpha`, `use_rslora`, the target modules (sorted; the short forms `q`, `gate`, ...
/// that lorafuse accepts become PEFT's `q_proj`, `gate_proj`, ...), `inference_mode: true` and
/// `peft_version` [`PEFT_VERSION`]. Every other key takes `LoraConfig`'s default when saved.
pub fn adapter_config_for(
    lora: &LoraConfig,
    base_model_name_or_path: Option<String>,
) -> AdapterConfig {
    let mut targets: Vec<String> = lora
        .target_modules
        .iter()
        .map(|t| {
            let t = t.trim();
            let long = format!("{t}_proj");
            if !PROJ_NAMES.contains(&t) && PROJ_NAMES.contains(&long.as_str()) {
                long
            } else {
                t.to_string()
            }
        })
        .collect();
    targets.sort();
    targets.dedup();
    let mut cfg = AdapterConfig {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path,
        inference_mode: true,
        peft_version: Some(PEFT_VERSION.into()),
        r: Some(lora.r),
        lora_alpha: Some(lora.lora_alpha as f64),
        use_rslora: Some(lora.use_rslora),
        use_dora: Some(false),
        target_modules: Some(TargetModules::List(targets)),
        lora_dropout: Some(0.0),
        bias: Some("none".into()),
        fan_in_fan_out: Some(false),
        rank_pattern: Some(Map::new()),
        alpha_pattern: Some(Map::new()),
        init_lora_weights: Some(Value::Bool(true)),
        extra: Map::new(),
    };
    // Every other key PEFT writes, with its default, so that this equals the config read back.
    let typed: Map<String, Value> = cfg.clone().into();
    cfg.extra = lora_config_defaults()
        .into_iter()
        .filter(|(k, _)| !typed.contains_key(k))
        .collect();
    cfg
}

/// VeRA settings of [`MethodOptions`] (PEFT `VeraConfig`'s, with its defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct VeraOptions {
    /// Seed of PEFT's torch generator for the projections (PEFT default 0; lorafuse draws the
    /// same projections from it). They are always saved (`save_projection: true`, PEFT's
    /// default), so the file does not depend on the loader's CPU.
    pub projection_prng_key: u64,
    /// `lambda_d`'s initial value (PEFT default 0.1).
    pub d_initial: f64,
    /// Dropout on the VeRA input during training (default 0).
    pub vera_dropout: f64,
}

impl Default for VeraOptions {
    fn default() -> Self {
        VeraOptions {
            projection_prng_key: 0,
            d_initial: 0.1,
            vera_dropout: 0.0,
        }
    }
}

/// AdaLoRA settings of [`MethodOptions`] (PEFT `AdaLoraConfig`'s budget schedule; `init_r` is
/// [`LoraConfig::r`]).
#[derive(Clone, Debug, PartialEq)]
pub struct AdaLoraOptions {
    /// Average final rank per layer (PEFT default 8).
    pub target_r: usize,
    /// Warm-up steps (default 0).
    pub tinit: u64,
    /// Final steps with a frozen pattern (default 0).
    pub tfinal: u64,
    /// Masking interval (default 1).
    pub delta_t: u64,
    /// EMA factors of the importance scores (defaults 0.85).
    pub beta1: f64,
    pub beta2: f64,
    /// Orthogonality regulariser weight (default 0.5).
    pub orth_reg_weight: f64,
    /// Total training steps: PEFT 0.21 refuses a config without it (> 0).
    pub total_step: Option<u64>,
    /// Kept ranks per module path (`fc1`, `model.layers.0.self_attn.q_proj`), one bool per rank
    /// of init_r; written as PEFT's `rank_pattern` (`<module>.lora_E` keys). `None` = `null`
    /// (no masking yet: every rank saved).
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
}

impl Default for AdaLoraOptions {
    fn default() -> Self {
        AdaLoraOptions {
            target_r: 8,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: None,
            rank_pattern: None,
        }
    }
}

/// What [`adapter_config_for_method`] needs beyond a [`LoraConfig`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MethodOptions {
    /// The base model's hub id or path (`base_model_name_or_path`).
    pub base_model_name_or_path: Option<String>,
    /// VeRA's settings (used for [`MethodKind::Vera`]).
    pub vera: VeraOptions,
    /// AdaLoRA's settings (used for [`MethodKind::AdaLora`]).
    pub adalora: AdaLoraOptions,
    /// IA3's `feedforward_modules` (used for [`MethodKind::Ia3`]).
    pub ia3_feedforward_modules: Vec<String>,
}

/// An AdaLoRA rank pattern keyed by module path as PEFT's `rank_pattern` JSON object
/// (`<module>.lora_E` → list of bools; [`rank_pattern_to_json`]).
pub fn rank_pattern_json(pattern: &BTreeMap<String, Vec<bool>>) -> Map<String, Value> {
    match rank_pattern_to_json(pattern) {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The PEFT config of a lorafuse adapter of any method, with the key set PEFT 0.21.2 writes for
/// its `peft_type`:
/// - [`MethodKind::Lora`]: as [`adapter_config_for`];
/// - [`MethodKind::Dora`]: the same with `use_dora: true`;
/// - [`MethodKind::Vera`]: `peft_type` `VERA`, r, target modules, `projection_prng_key`,
///   `save_projection: true` (always: lorafuse's projections are not torch's), `d_initial`,
///   `vera_dropout` and `VeraConfig`'s other keys (no `lora_alpha`: VeRA has no scaling);
/// - [`MethodKind::AdaLora`]: `peft_type` `ADALORA`, `init_r` = `lora.r`, `lora_alpha`, the
///   schedule of [`AdaLoraOptions`] and its `rank_pattern`, `r` left at 8 (PEFT ignores it for
///   AdaLoRA), plus `LoraConfig`'s keys.
///
/// Errors: an invalid `lora` ([`LoraConfig::validate`]); for AdaLoRA a missing or zero
/// `total_step`, a schedule with no budgeting phase (`tinit >= total_step - tfinal`, as PEFT
/// checks), `use_rslora`, or a rank_pattern list whose length is not init_r.
pub fn adapter_config_for_method(
    method: MethodKind,
    lora: &LoraConfig,
    extra: &MethodOptions,
) -> Result<AdapterConfig> {
    lora.validate()?;
    let base = extra.base_model_name_or_path.clone();
    match method {
        MethodKind::Ia3 => {
            return Ok(super::additive::ia3_config(
                &lora.target_modules,
                &extra.ia3_feedforward_modules,
                base,
            ));
        }
        MethodKind::Beft => return Ok(super::additive::beft_config(&lora.target_modules, base)),
        _ => {}
    }
    let mut cfg = adapter_config_for(lora, base);
    match method {
        MethodKind::Ia3 | MethodKind::Beft => unreachable!("returned above"),
        MethodKind::Lora => {}
        MethodKind::Dora => cfg.use_dora = Some(true),
        MethodKind::Vera => {
            let v = &extra.vera;
            cfg.peft_type = "VERA".into();
            cfg.lora_alpha = None;
            cfg.use_rslora = None;
            cfg.use_dora = None;
            cfg.lora_dropout = None;
            cfg.rank_pattern = None;
            cfg.alpha_pattern = None;
            cfg.init_lora_weights = None;
            cfg.extra = Map::new();
            let typed: Map<String, Value> = cfg.clone().into();
            cfg.extra = vera_config_defaults()
                .into_iter()
                .filter(|(k, _)| !typed.contains_key(k))
                .collect();
            cfg.extra.insert(
                "projection_prng_key".into(),
                Value::from(v.projection_prng_key),
            );
            cfg.extra
                .insert("save_projection".into(), Value::Bool(true));
            cfg.extra
                .insert("d_initial".into(), Value::from(v.d_initial));
            cfg.extra
                .insert("vera_dropout".into(), Value::from(v.vera_dropout));
        }
        MethodKind::AdaLora => {
            let a = &extra.adalora;
            if lora.use_rslora {
                return Err(Error::arg(
                    "use_rslora",
                    "AdaLoRA has its own scaling (lora_alpha / ranknum); use_rslora does not apply",
                ));
            }
            let total = match a.total_step {
                Some(t) if t > 0 => t,
                t => {
                    return Err(Error::arg(
                        "total_step",
                        format!(
                            "AdaLoRA needs total_step > 0 (PEFT refuses the config), got {t:?}"
                        ),
                    ));
                }
            };
            if a.tinit >= total.saturating_sub(a.tfinal) {
                return Err(Error::arg(
                    "tinit",
                    format!(
                        "tinit {} >= total_step {total} - tfinal {}: no budgeting phase (PEFT \
                         refuses this schedule)",
                        a.tinit, a.tfinal
                    ),
                ));
            }
            if let Some(p) = &a.rank_pattern
                && let Some((k, v)) = p.iter().find(|(_, v)| v.len() != lora.r)
            {
                return Err(Error::arg(
                    format!("rank_pattern.{k}"),
                    format!("{} entries, init_r is {}", v.len(), lora.r),
                ));
            }
            cfg.peft_type = "ADALORA".into();
            cfg.r = Some(8);
            cfg.use_rslora = Some(false);
            cfg.rank_pattern = None;
            for (k, v) in adalora_config_defaults() {
                cfg.extra.insert(k, v);
            }
            cfg.extra.remove("peft_type");
            cfg.extra.remove("rank_pattern");
            cfg.rank_pattern = a.rank_pattern.as_ref().map(rank_pattern_json);
            if cfg.rank_pattern.is_none() {
                cfg.extra.insert("rank_pattern".into(), Value::Null);
            }
            let put = |c: &mut AdapterConfig, k: &str, v: Value| {
                c.extra.insert(k.into(), v);
            };
            put(&mut cfg, "init_r", Value::from(lora.r));
            put(&mut cfg, "target_r", Value::from(a.target_r));
            put(&mut cfg, "tinit", Value::from(a.tinit));
            put(&mut cfg, "tfinal", Value::from(a.tfinal));
            put(&mut cfg, "deltaT", Value::from(a.delta_t));
            put(&mut cfg, "beta1", Value::from(a.beta1));
            put(&mut cfg, "beta2", Value::from(a.beta2));
            put(&mut cfg, "orth_reg_weight", Value::from(a.orth_reg_weight));
            put(&mut cfg, "total_step", Value::from(total));
        }
    }
    Ok(cfg)
}
