//! One whole preference-alignment run, as `lorafuse dpo` and `lorafuse reward` do it: load the
//! model and the preference pairs, split them, attach the method's adapter (or continue a
//! trained one), train with DPO or as a reward model, and write the adapter in PEFT's layout,
//! `metrics.json`, `loss_curve.png` and `rewards.png`.

use crate::adapter::MethodKind;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::{fetch, peft};
use crate::model::llama::Llama;
use crate::train::chat_data::ChatSettings;
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
    /// A trained PEFT adapter to continue (LoRA or DoRA, over a dense or, with `--method
    /// qlora|qdora`, an NF4 base): its weights are the start and, for DPO, the frozen copy of
    /// it is the reference (TRL's behaviour with a trained PEFT model). `None` attaches a fresh
    /// adapter of the recipe's method.
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

/// Continues the trained adapter at `dir` on `model`: checks it is a LoRA/DoRA adapter of the
/// recipe's method and takes its r, alpha, rsLoRA and targets into the recipe (they are what is
/// saved). Errors: an adapter of another method, one the model cannot take.
fn continue_adapter<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    recipe: &mut Recipe,
    dir: &Path,
) -> Result<()> {
    let (cfg, tensors) = peft::load_adapter(dir)?;
    let kind = cfg.check_supported()?;
    if !matches!(kind, MethodKind::Lora | MethodKind::Dora) {
        return Err(Error::arg(
            "adapter",
            format!(
                "{}: continuing a {} adapter is not supported (LoRA and DoRA adapters are); \
                 train one from the base with --method instead",
                dir.display(),
                cfg.peft_type
            ),
        ));
    }
    if recipe.method.adapter_kind() != Some(kind) {
        return Err(Error::arg(
            "method",
            format!(
                "{} holds a {} adapter but --method is {}: pass --method {} (or q{} for an NF4 \
                 base)",
                dir.display(),
                if kind == MethodKind::Dora {
                    "DoRA"
                } else {
                    "LoRA"
                },
                recipe.method.name(),
                if kind == MethodKind::Dora {
                    "dora"
                } else {
                    "lora"
                },
                if kind == MethodKind::Dora {
                    "dora"
                } else {
                    "lora"
                },
            ),
        ));
    }
    let targets = match &cfg.target_modules {
        Some(peft::TargetModules::List(v)) => v.clone(),
        _ => recipe.lora.target_modules.clone(),
    };
    recipe.lora = crate::adapter::LoraConfig {
        r: cfg.rank(),
        lora_alpha: cfg.alpha() as f32,
        use_rslora: cfg.rslora(),
        target_modules: targets,
    };
    if recipe.method.quantized_base() {
        model.quantize_bases(be, recipe.nf4)?;
    } else {
        model.freeze_bases(be)?;
    }
    peft::apply_adapter(be, model, &cfg, &tensors)
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
    if base.recipe.method.prompt_method().is_some() {
        return Err(Error::arg(
            "method",
            format!(
                "{} is not supported for preference training yet (the LoRA family, IA3, BEFT, \
                 LN tuning, bottleneck adapters and full fine-tuning are)",
                base.recipe.method.name()
            ),
        ));
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
    let chatty = |s: &[PreferenceSample]| {
        s.iter()
            .any(|p| matches!(p.chosen, crate::train::data::Sample::Chat(_)))
    };
    let template = if chatty(&train_s) || chatty(&eval_s) {
        chat_template(&path, &tok, base.chat.template.as_deref())?
    } else {
        None
    };
    let settings = template.as_ref().map(|t| ChatSettings {
        template: t,
        loss_on: base.chat.loss_on,
        truncation: base.chat.truncation,
        end_of_turn: tok.eos_id(),
    });
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
    match &job.start_adapter {
        Some(dir) => continue_adapter(be, &mut model, &mut recipe, dir)?,
        None => recipe::prepare_with(be, &mut model, &recipe, None)?,
    }
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
    let saved = save_trained(be, &model, &recipe, metrics.run(), out, model_name)?;
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
