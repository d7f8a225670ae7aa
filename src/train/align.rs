//! One whole preference-alignment run, as `lorafuse dpo` and `lorafuse reward` do it: load the
//! model and the preference pairs, split them, attach the method's adapter (or continue a
//! trained one), train with DPO or as a reward model, and write the adapter in PEFT's layout,
//! `metrics.json`, `loss_curve.png` and `rewards.png`.

use crate::adapter::MethodKind;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::{fetch, peft};
use crate::model::llama::Llama;
use crate::train::data::{BadRecordPolicy, split_train_eval};
use crate::train::dpo::{DpoConfig, DpoMetrics, Reference, train_dpo};
use crate::train::job::{FinetuneJob, JobEvent, chat_template, load_model, save_trained};
use crate::train::preference::{
    PreferencePair, PreferenceSample, load_preferences, preference_from_value, tokenize_preferences,
};
use crate::train::recipe::{self, Method, MethodHook, Recipe};
use crate::train::report::{write_json, write_logs_png, write_loss_png};
use crate::train::reward::{RewardConfig, RewardMetrics, train_reward};
use crate::train::trainer::Metrics;
use std::path::{Path, PathBuf};

/// The preference set shipped with lorafuse (`data/chatterbot_pref_en.jsonl`, built by
/// `scripts/build_preference_set.py` from chatterbot-corpus 1.3.3, BSD-3-Clause).
static DEFAULT_PAIRS: &str = include_str!("../../data/chatterbot_pref_en.jsonl");

/// What is trained.
#[derive(Clone, Debug)]
pub enum Objective {
    /// DPO; with `precompute_ref` the reference log-probabilities are computed once first.
    Dpo {
        config: DpoConfig,
        precompute_ref: bool,
    },
    /// A reward model (score head + the recipe's adapter, or full fine-tuning); the head is
    /// drawn N(0, `score_init_std`²).
    Reward {
        config: RewardConfig,
        score_init_std: f32,
    },
}

/// A preference-alignment run: the fine-tuning job's model, data (preference records; `None`
/// for the shipped set), split, recipe, chat options and output, plus where to start and what
/// to train.
#[derive(Clone, Debug)]
pub struct AlignJob {
    pub job: FinetuneJob,
    /// A trained PEFT adapter to continue (LoRA, DoRA, VeRA, IA3, BEFT or LN tuning, over a
    /// dense or, with the method's `q` variant, an NF4 base): its weights are the start and, for
    /// DPO, the frozen copy of it is the reference (TRL's behaviour with a trained PEFT model);
    /// it is saved with its own config. `None` attaches a fresh adapter of the recipe's method.
    pub start_adapter: Option<PathBuf>,
    pub objective: Objective,
}

/// What a run reports.
#[derive(Debug)]
pub enum AlignMetrics {
    Dpo(DpoMetrics),
    Reward(RewardMetrics),
}

impl AlignMetrics {
    /// The run's shared part.
    pub fn run(&self) -> &Metrics {
        match self {
            AlignMetrics::Dpo(m) => &m.run,
            AlignMetrics::Reward(m) => &m.run,
        }
    }
    /// The eval values before and after training.
    pub fn evals(&self) -> [Option<&std::collections::BTreeMap<String, f64>>; 2] {
        match self {
            AlignMetrics::Dpo(m) => [m.eval_before.as_ref(), m.eval_after.as_ref()],
            AlignMetrics::Reward(m) => [m.eval_before.as_ref(), m.eval_after.as_ref()],
        }
    }
}

/// The outcome of a run.
#[derive(Debug)]
pub struct AlignReport {
    pub metrics: AlignMetrics,
    pub n_base_params: usize,
    pub saved: &'static str,
}

/// The preference records of `data` (`None`: the shipped set), with a log line per skipped one.
/// Errors: as [`load_preferences`].
pub fn load_pairs(
    data: Option<&Path>,
    policy: BadRecordPolicy,
    on_event: &mut dyn FnMut(JobEvent<'_>),
) -> Result<Vec<PreferenceSample>> {
    let Some(p) = data else {
        return DEFAULT_PAIRS
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                let v = serde_json::from_str(l).map_err(|e| Error::Json {
                    context: format!("the shipped preference set, line {}", i + 1),
                    msg: e.to_string(),
                })?;
                preference_from_value(&v).map_err(|e| {
                    Error::Data(format!("the shipped preference set, line {}: {e}", i + 1))
                })
            })
            .collect();
    };
    let rep = load_preferences(p, policy)?;
    for (loc, why) in &rep.skipped {
        on_event(JobEvent::Log(format!(
            "skipped record at {} {loc} of {}: {why}",
            rep.format.location_name(),
            p.display()
        )));
    }
    Ok(rep.records)
}

/// The methods that may continue a PEFT adapter of this config: the method and its variant
/// over an NF4 base. `None` for what cannot be continued: AdaLoRA (its rank allocator's state
/// is not in the folder) and the soft prompts (their encoders are not saved, only their output).
fn continuable(cfg: &peft::AdapterConfig) -> Result<Option<&'static [Method]>> {
    Ok(match cfg.peft_type.as_str() {
        "LN_TUNING" => Some(&[Method::LnTuning]),
        "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING" => None,
        _ => match cfg.check_supported()? {
            MethodKind::Lora => Some(&[Method::Lora, Method::Qlora]),
            MethodKind::Dora => Some(&[Method::Dora, Method::Qdora]),
            MethodKind::Vera => Some(&[Method::Vera, Method::Qvera]),
            MethodKind::Ia3 => Some(&[Method::Ia3]),
            MethodKind::Beft => Some(&[Method::Beft]),
            MethodKind::AdaLora => None,
        },
    })
}

/// Continues the trained PEFT adapter at `dir` on `model` (LoRA, DoRA, VeRA, IA3, BEFT or LN
/// tuning, over a dense base or, with the method's `q` variant, an NF4 one): checks it is of the
/// recipe's method and returns its config, which is what the continued adapter is saved with.
/// Errors: an adapter that cannot be continued, one of another method than `--method`, one the
/// model cannot take.
fn continue_adapter<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    recipe: &Recipe,
    dir: &Path,
) -> Result<peft::AdapterConfig> {
    let (cfg, tensors) = peft::load_adapter(dir)?;
    let Some(methods) = continuable(&cfg)? else {
        return Err(Error::arg(
            "adapter",
            format!(
                "{}: continuing a {} adapter is not supported (LoRA, DoRA, VeRA, IA3, BEFT and LN \
                 tuning adapters are); train one from the base with --method instead",
                dir.display(),
                cfg.peft_type
            ),
        ));
    };
    if !methods.contains(&recipe.method) {
        let names: Vec<&str> = methods.iter().map(|m| m.name()).collect();
        return Err(Error::arg(
            "method",
            format!(
                "{} holds a {} adapter but --method is {}: pass --method {}",
                dir.display(),
                if cfg.use_dora == Some(true) {
                    "DoRA"
                } else {
                    cfg.peft_type.as_str()
                },
                recipe.method.name(),
                names.join(" or --method ")
            ),
        ));
    }
    if recipe.method.quantized_base() {
        model.quantize_bases(be, recipe.nf4)?;
    } else {
        model.freeze_bases(be, recipe.compute_dtype)?;
    }
    peft::apply_adapter(be, model, &cfg, &tensors)?;
    Ok(cfg)
}

/// Runs `job` on `be`, reporting progress through `on_event`. Errors: an invalid job, a model,
/// adapter or data file that cannot be read, a backend failure, an output that cannot be
/// written (every file is written atomically).
pub fn run_align<B: Backend>(
    be: &B,
    job: &AlignJob,
    on_event: &mut dyn FnMut(JobEvent<'_>),
) -> Result<AlignReport> {
    let base = &job.job;
    base.validate()?;
    match &job.objective {
        Objective::Dpo { config, .. } => config.validate()?,
        Objective::Reward { config, .. } => config.validate()?,
    }
    let mut recipe = base.recipe.clone();
    let samples = load_pairs(base.data.as_deref(), base.bad_records, on_event)?;
    let (train_s, eval_s) = split_train_eval(samples);
    let nf4 = match &job.start_adapter {
        Some(_) => None, // quantized below, after the dense weights are read
        None => recipe.method.quantized_base().then_some(recipe.nf4),
    };
    let (path, tok, mut model) = load_model(be, base.model.as_deref(), nf4, &mut |line| {
        on_event(JobEvent::Log(line))
    })?;
    // PEFT tokenizes prompt tuning's init text with the model's tokenizer.
    let init_ids = match &recipe.additive.prompt_tuning_init_text {
        Some(t) => Some(tok.encode(t)?),
        None => None,
    };
    let chatty = |s: &[PreferenceSample]| {
        s.iter()
            .any(|p| matches!(p.chosen, crate::train::data::Sample::Chat(_)))
    };
    let template = if chatty(&train_s) || chatty(&eval_s) {
        chat_template(&path, &tok, base.chat.template.as_deref())?
    } else {
        None
    };
    let settings = template.as_ref().map(|t| base.chat.settings(t, &tok));
    let skip = base.bad_records == BadRecordPolicy::Skip;
    let mut tokenize = |s: &[PreferenceSample], split: &str| -> Result<Vec<PreferencePair>> {
        let (pairs, skipped) =
            tokenize_preferences(&tok, settings.as_ref(), s, base.max_len, skip)?;
        for (i, why) in skipped {
            on_event(JobEvent::Log(format!("skipped {split} pair #{i}: {why}")));
        }
        Ok(pairs)
    };
    let mut train = tokenize(&train_s, "train")?;
    let mut eval = if base.eval {
        tokenize(&eval_s, "eval")?
    } else {
        Vec::new()
    };
    if train.is_empty() {
        return Err(Error::Data(
            "no training pair left after tokenization".into(),
        ));
    }
    let continued = match &job.start_adapter {
        Some(dir) => Some(continue_adapter(be, &mut model, &recipe, dir)?),
        None => {
            recipe::prepare_with(be, &mut model, &recipe, init_ids.as_deref())?;
            None
        }
    };
    if recipe.method == Method::Full {
        recipe.train.unfreeze_every = recipe.full.unfreeze_every;
    }
    on_event(JobEvent::Log(format!(
        "data: {} train / {} eval pairs; method {}, lr {:.1e}",
        train.len(),
        eval.len(),
        recipe.method.name(),
        recipe.train.lr
    )));
    let cfg = recipe.train.clone();
    let mut hook = MethodHook::for_recipe(be, &model, &recipe, cfg.steps)?;
    if !eval.is_empty() {
        on_event(JobEvent::Evaluating { after: false });
    }
    let steps = cfg.steps;
    let has_eval = !eval.is_empty();
    let mut progress = |m: &crate::train::trainer::StepMetric| {
        on_event(JobEvent::Step(m));
        if m.step + 1 == steps && has_eval {
            on_event(JobEvent::Evaluating { after: true });
        }
    };
    let mut metrics = match &job.objective {
        Objective::Dpo {
            config,
            precompute_ref,
        } => {
            let mut reference = if recipe.method == Method::Full {
                Reference::copy_of(&model)
            } else if job.start_adapter.is_some() {
                Reference::frozen_adapters_of(&mut model)?
            } else {
                Reference::base_of(&model)
            };
            AlignMetrics::Dpo(train_dpo(
                be,
                &mut model,
                &mut reference,
                &mut train,
                &mut eval,
                &cfg,
                config,
                *precompute_ref,
                &mut progress,
                &mut hook,
            )?)
        }
        Objective::Reward {
            config,
            score_init_std,
        } => {
            if model.score.is_none() {
                model.attach_score_head(be, *score_init_std, recipe.seed)?;
            }
            AlignMetrics::Reward(train_reward(
                be,
                &mut model,
                &train,
                &eval,
                &cfg,
                config,
                &mut progress,
                &mut hook,
            )?)
        }
    };
    let pattern = hook.rank_pattern(be)?;
    match &mut metrics {
        AlignMetrics::Dpo(m) => m.run.adalora_rank_pattern = pattern,
        AlignMetrics::Reward(m) => m.run.adalora_rank_pattern = pattern,
    }
    let out = &base.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let model_name = base
        .model
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| fetch::DEFAULT_MODEL_FILE.to_string());
    let saved = match continued {
        // A continued adapter keeps its own config (the method's settings as it was trained).
        Some(mut cfg) => {
            cfg.base_model_name_or_path = Some(model_name);
            if model.score.is_some() {
                cfg.set_seq_cls_head();
            }
            peft::save_adapter(out, &cfg, &peft::llama_adapter_tensors(be, &model)?)?;
            "PEFT adapter"
        }
        None => save_trained(be, &model, &recipe, metrics.run(), out, model_name)?,
    };
    let (what, keys): (&str, &[&str]) = match &metrics {
        AlignMetrics::Dpo(m) => {
            write_json(&out.join("metrics.json"), m)?;
            (
                "DPO",
                &[
                    "rewards/chosen",
                    "rewards/rejected",
                    "rewards/margins",
                    "rewards/accuracies",
                    "logps/chosen",
                    "logps/rejected",
                ],
            )
        }
        AlignMetrics::Reward(m) => {
            write_json(&out.join("metrics.json"), m)?;
            (
                "reward model",
                &["accuracy", "margin", "rewards/chosen", "rewards/rejected"],
            )
        }
    };
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let title = format!("lorafuse {what} ({}) on {file}", recipe.method.name());
    write_loss_png(&out.join("loss_curve.png"), metrics.run(), &title)?;
    write_logs_png(&out.join("rewards.png"), &metrics.run().steps, keys, &title)?;
    Ok(AlignReport {
        n_base_params: model.n_base_params(),
        metrics,
        saved,
    })
}
