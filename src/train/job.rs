//! One whole fine-tuning run, as `lorafuse finetune` and Python's `lorafuse.finetune` do it:
//! load the GGUF model and its tokenizer, read and split the data, train with a [`Recipe`],
//! and write the adapter (PEFT's layout) or the full model, `metrics.json` and
//! `loss_curve.png`.

use crate::adapter::MethodKind;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::export::{WeightDtype, model_tensors, write_safetensors};
use crate::io::gguf::GgufFile;
use crate::io::hf;
use crate::io::load::{llama_from_gguf_with, llama_from_hf};
use crate::io::{adapters_lib, fetch, peft};
use crate::model::chat::{ChatTemplate, LossOn};
use crate::model::llama::{Llama, Nf4Spec};
use crate::model::tokenizer::Tokenizer;
use crate::train::chat_data::{self, ChatSettings, Truncation, tokenize_samples};
use crate::train::data::{self, BadRecordPolicy, Sample, split_train_eval};
use crate::train::recipe::{self, Method, Recipe};
use crate::train::report::{write_json, write_loss_png};
use crate::train::trainer::{Metrics, StepMetric};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a run needs besides the backend.
#[derive(Clone, Debug)]
pub struct FinetuneJob {
    /// The GGUF model; `None` fetches the default (SmolLM2-135M-Instruct) into the cache.
    pub model: Option<PathBuf>,
    /// Training data (Alpaca, chat pairs or messages; .jsonl or .json); `None` for the
    /// embedded chatterbot-corpus set. Records with index % 10 == 9 form the eval split.
    pub data: Option<PathBuf>,
    /// What to do with a malformed record in `data`.
    pub bad_records: BadRecordPolicy,
    /// Maximum tokens per example (longer ones are truncated); at least 2.
    pub max_len: usize,
    /// Evaluate the eval split before and after training.
    pub eval: bool,
    /// Output folder (created if missing).
    pub out: PathBuf,
    pub recipe: Recipe,
    /// How conversations (`messages` records) are rendered and trained.
    pub chat: ChatOptions,
}

/// How conversations train: the template (`None`: the model's own, from the GGUF's
/// `tokenizer.chat_template` or the folder's `tokenizer_config.json`), which assistant turns are
/// targets and how a long conversation is cut.
#[derive(Clone, Debug, Default)]
pub struct ChatOptions {
    /// A Jinja chat template file that replaces the model's (`--chat-template`).
    pub template: Option<PathBuf>,
    pub loss_on: LossOn,
    pub truncation: Truncation,
}

impl ChatOptions {
    /// How conversations become examples with `template` (the one these options chose) and the
    /// tokenizer's end-of-turn token (its EOS).
    pub fn settings<'a>(&self, template: &'a ChatTemplate, tok: &Tokenizer) -> ChatSettings<'a> {
        ChatSettings {
            template,
            loss_on: self.loss_on,
            truncation: self.truncation,
            end_of_turn: tok.eos_id(),
        }
    }
}

/// What happens during a run, for progress display.
pub enum JobEvent<'a> {
    /// A line worth showing (model loaded, data sizes, skipped records).
    Log(String),
    /// The eval split is being evaluated (`after` training or before it).
    Evaluating { after: bool },
    /// One optimizer step finished.
    Step(&'a StepMetric),
}

/// The outcome of a run.
#[derive(Debug)]
pub struct JobReport {
    pub metrics: Metrics,
    /// Base parameters of the model (before adapters).
    pub n_base_params: usize,
    /// What was written besides metrics.json and loss_curve.png: `PEFT adapter` or
    /// `model.safetensors`.
    pub saved: &'static str,
}

impl FinetuneJob {
    /// Checks everything that can be checked before loading anything: the recipe (see
    /// [`Recipe::validate`]) and `max_len`.
    pub fn validate(&self) -> Result<()> {
        self.recipe.validate()?;
        if self.max_len < 2 {
            return Err(Error::arg("max_len", "must be at least 2 tokens"));
        }
        Ok(())
    }
}

/// Runs `job` on `be`, reporting progress through `on_event`. Errors: an invalid job, a model
/// or data file that cannot be read, a backend failure, or an output that cannot be written
/// (every file is written atomically, so none is left half-written).
pub fn run_finetune<B: Backend>(
    be: &B,
    job: &FinetuneJob,
    on_event: &mut dyn FnMut(JobEvent<'_>),
) -> Result<JobReport> {
    job.validate()?;
    let recipe = &job.recipe;
    let records = job_records(job, on_event)?;
    let nf4 = recipe.method.quantized_base().then_some(recipe.nf4);
    let (path, tok, mut model) = load_model(be, job.model.as_deref(), nf4, &mut |line| {
        on_event(JobEvent::Log(line))
    })?;
    // Every soft prompt moves the real tokens' positions up by its length.
    let nvt = match recipe.method.prompt_method() {
        Some(_) => recipe.additive.num_virtual_tokens,
        None => 0,
    };
    let max_pos = model.cfg.max_position_embeddings;
    if nvt > 0 && nvt + job.max_len > max_pos {
        return Err(Error::arg(
            "num_virtual_tokens",
            format!(
                "{nvt} virtual tokens + --max-len {} exceed the model's {max_pos} positions: \
                 lower one of them",
                job.max_len
            ),
        ));
    }
    // PEFT tokenizes the init text with the model's tokenizer, special tokens included as
    // that tokenizer adds them (SmolLM2's adds none).
    let init_ids = match &recipe.additive.prompt_tuning_init_text {
        Some(t) => Some(tok.encode(t)?),
        None => None,
    };
    let (train_ex, eval_ex) = job_examples(job, &tok, &path, &records, on_event)?;
    let steps = recipe.train.steps;
    if !eval_ex.is_empty() {
        on_event(JobEvent::Evaluating { after: false });
    }
    let metrics = recipe::run_with(
        be,
        &mut model,
        recipe,
        init_ids.as_deref(),
        &train_ex,
        &eval_ex,
        |m| {
            on_event(JobEvent::Step(m));
            if m.step + 1 == steps && !eval_ex.is_empty() {
                on_event(JobEvent::Evaluating { after: true });
            }
        },
    )?;
    let saved = save_run(be, &model, job, &metrics, &path)?;
    Ok(JobReport {
        n_base_params: model.n_base_params(),
        metrics,
        saved,
    })
}

/// Several LoRA/rsLoRA runs over one model in one process and one pass
/// ([`crate::train::multi::train_multi`]): every `(name, job)` keeps its own data, recipe and
/// output folder, and ends as [`run_finetune`] of that job alone would (up to float summation
/// order); the model is loaded once and its frozen weights are read once per step for all of
/// them. `on_event(name, event)` reports each run's progress (the model's loading under the
/// first name). Errors: as [`run_finetune`]; jobs over different models; a method other than
/// LoRA; a repeated name.
pub fn run_finetune_multi<B: Backend>(
    be: &B,
    jobs: &[(String, FinetuneJob)],
    on_event: &mut dyn FnMut(&str, JobEvent<'_>),
) -> Result<Vec<JobReport>> {
    let Some((first, job0)) = jobs.first() else {
        return Err(Error::arg("jobs", "no run given"));
    };
    let mut records = Vec::with_capacity(jobs.len());
    for (name, job) in jobs {
        let what = |e: Error| Error::arg(format!("adapter `{name}`"), e.to_string());
        job.validate().map_err(what)?;
        if job.model != job0.model {
            return Err(Error::arg(
                format!("adapter `{name}`"),
                "every run of a multi-adapter job trains over the same model",
            ));
        }
        records.push(job_records(job, &mut |e| on_event(name, e)).map_err(what)?);
    }
    let (path, tok, mut model) = load_model(be, job0.model.as_deref(), None, &mut |line| {
        on_event(first, JobEvent::Log(line))
    })?;
    let mut specs = Vec::with_capacity(jobs.len());
    for ((name, job), recs) in jobs.iter().zip(&records) {
        let (train, eval) = job_examples(job, &tok, &path, recs, &mut |e| on_event(name, e))?;
        specs.push(crate::train::multi::MultiSpec {
            name: name.clone(),
            recipe: job.recipe.clone(),
            train,
            eval,
        });
    }
    for s in &specs {
        if !s.eval.is_empty() {
            on_event(&s.name, JobEvent::Evaluating { after: false });
        }
    }
    let results = crate::train::multi::train_multi(be, &mut model, &specs, |name, m| {
        on_event(name, JobEvent::Step(m));
    })?;
    let mut reports = Vec::with_capacity(results.len());
    for ((_, job), r) in jobs.iter().zip(results) {
        model.put_adapters(r.adapter)?;
        let saved = save_run(be, &model, job, &r.metrics, &path);
        model.take_adapters();
        reports.push(JobReport {
            n_base_params: model.n_base_params(),
            metrics: r.metrics,
            saved: saved?,
        });
    }
    Ok(reports)
}

/// A job's records, split into train and eval (index % 10 == 9), skipped ones reported.
fn job_records(
    job: &FinetuneJob,
    on_event: &mut dyn FnMut(JobEvent<'_>),
) -> Result<(Vec<Sample>, Vec<Sample>)> {
    let records: Vec<Sample> = match &job.data {
        None => chat_data::pairs(data::default_records()?),
        Some(p) => {
            let rep = data::load_records(p, job.bad_records)?;
            for (loc, why) in &rep.skipped {
                on_event(JobEvent::Log(format!(
                    "skipped record at {} {loc} of {}: {why}",
                    rep.format.location_name(),
                    p.display()
                )));
            }
            rep.records
        }
    };
    Ok(split_train_eval(records))
}

/// A job's records tokenized (conversations with the chat template of the model at `path`):
/// the train examples and, when the job evaluates, the eval ones. Errors: a template that does
/// not parse, no training example left.
fn job_examples(
    job: &FinetuneJob,
    tok: &Tokenizer,
    path: &Path,
    (train_recs, eval_recs): &(Vec<Sample>, Vec<Sample>),
    on_event: &mut dyn FnMut(JobEvent<'_>),
) -> Result<(Vec<data::Example>, Vec<data::Example>)> {
    let template =
        if chat_data::has_conversations(train_recs) || chat_data::has_conversations(eval_recs) {
            chat_template(path, tok, job.chat.template.as_deref())?
        } else {
            None
        };
    let settings = template.as_ref().map(|t| job.chat.settings(t, tok));
    let skip = job.bad_records == BadRecordPolicy::Skip;
    let mut tokenize = |recs: &[Sample], split: &str| -> Result<Vec<data::Example>> {
        let (ex, skipped) = tokenize_samples(tok, settings.as_ref(), recs, job.max_len, skip)?;
        for (i, why) in skipped {
            on_event(JobEvent::Log(format!("skipped {split} record #{i}: {why}")));
        }
        Ok(ex)
    };
    let train_ex = tokenize(train_recs, "train")?;
    let eval_ex = if job.eval {
        tokenize(eval_recs, "eval")?
    } else {
        Vec::new()
    };
    if train_ex.is_empty() {
        return Err(Error::Data(
            "no training example left after tokenization".into(),
        ));
    }
    let recipe = &job.recipe;
    on_event(JobEvent::Log(format!(
        "data: {} train / {} eval examples ({} eval target tokens); method {}, lr {:.1e}",
        train_ex.len(),
        eval_ex.len(),
        eval_ex.iter().map(|e| e.n_targets()).sum::<usize>(),
        recipe.method.name(),
        recipe.train.lr
    )));
    Ok((train_ex, eval_ex))
}

/// Writes a finished run into `job.out`: what was trained ([`save_trained`]), `metrics.json`
/// and `loss_curve.png`, each atomically. Returns what [`save_trained`] wrote.
fn save_run<B: Backend>(
    be: &B,
    model: &Llama<B>,
    job: &FinetuneJob,
    metrics: &Metrics,
    path: &Path,
) -> Result<&'static str> {
    std::fs::create_dir_all(&job.out).map_err(|e| Error::io(&job.out, e))?;
    let model_name = job
        .model
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| fetch::DEFAULT_MODEL_FILE.to_string());
    let saved = save_trained(be, model, &job.recipe, metrics, &job.out, model_name)?;
    write_json(&job.out.join("metrics.json"), metrics)?;
    write_loss_png(
        &job.out.join("loss_curve.png"),
        metrics,
        &format!(
            "lorafuse {} on {}",
            job.recipe.method.name(),
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
    )?;
    Ok(saved)
}

/// Opens a GGUF model or a transformers model folder ([`hf::is_hf_folder`]; its
/// `tokenizer.json` is needed) (`None`: the default GGUF, fetched into the cache on first use) and
/// builds its tokenizer and the model on `be`, quantizing the projections to NF4 while reading
/// them when `nf4` is given; reports progress lines (fetch, `loaded ... in 1.2s on cpu`) to
/// `log`. Returns the file's path, the tokenizer and the model.
pub fn load_model<B: Backend>(
    be: &B,
    model: Option<&Path>,
    nf4: Option<Nf4Spec>,
    log: &mut dyn FnMut(String),
) -> Result<(PathBuf, Tokenizer, Llama<B>)> {
    let path = match model {
        Some(p) => p.to_path_buf(),
        None => fetch::default_model(&mut |s| log(s.to_string()))?,
    };
    let t = Instant::now();
    let (tok, model) = if hf::is_hf_folder(&path) {
        let mut folder = hf::HfFolder::open(&path)?;
        let file = folder.tokenizer_file().ok_or_else(|| Error::Missing {
            path: path.clone(),
            name: hf::TOKENIZER_FILE.into(),
        })?;
        let c = folder.llama_config();
        let tok = Tokenizer::from_hf_file(&file, c.bos_token_id, c.eos_token_id, c.pad_token_id)?;
        (tok, llama_from_hf(be, &mut folder, nf4)?)
    } else {
        let g = GgufFile::open(&path)?;
        (
            Tokenizer::from_gguf(&g)?,
            llama_from_gguf_with(be, &g, nf4)?,
        )
    };
    log(format!(
        "loaded {} ({} parameters, {} layers) in {:.1}s on {}",
        path.display(),
        model.n_base_params(),
        model.cfg.num_hidden_layers,
        t.elapsed().as_secs_f64(),
        be.name()
    ));
    Ok((path, tok, model))
}

/// The chat template conversations are rendered with (`--chat-template`): `over` when given
/// (`chatml`: the default recipe's fixed ChatML, [`crate::model::chat::CHATML`]; `model`: the
/// model's own; anything else a Jinja file), else the model's own (a GGUF's
/// `tokenizer.chat_template`, a transformers folder's `tokenizer_config.json`); `None` when the
/// model has none. Errors: an unreadable file, a template that does not parse.
pub fn chat_template(
    model: &Path,
    tok: &Tokenizer,
    over: Option<&Path>,
) -> Result<Option<ChatTemplate>> {
    let over = over.filter(|f| f.as_os_str() != "model");
    if over.is_some_and(|f| f.as_os_str() == "chatml") {
        return ChatTemplate::for_tokenizer(crate::model::chat::CHATML, tok).map(Some);
    }
    if let Some(f) = over {
        let src = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
        return ChatTemplate::for_tokenizer(&src, tok).map(Some);
    }
    if hf::is_hf_folder(model) {
        return match hf::HfFolder::open(model)?.chat_template()? {
            Some(src) => ChatTemplate::for_tokenizer(&src, tok).map(Some),
            None => Ok(None),
        };
    }
    ChatTemplate::from_gguf(&GgufFile::open(model)?, tok)
}

/// The template prompts are rendered with (`generate`, `logits`): as [`chat_template`], with the
/// default recipe's ChatML for a model that has none. Errors: as [`chat_template`].
pub fn prompt_template(model: &Path, tok: &Tokenizer, over: Option<&Path>) -> Result<ChatTemplate> {
    match chat_template(model, tok, over)? {
        Some(t) => Ok(t),
        None => ChatTemplate::for_tokenizer(crate::model::chat::CHATML, tok),
    }
}

/// Saves what was trained: the adapter in PEFT's layout (AdaLoRA's masked ranks dropped and
/// its rank pattern in the config, as PEFT saves them), or for full fine-tuning the whole
/// model as `model.safetensors` with transformers' names. Returns what was written.
pub fn save_trained<B: Backend>(
    be: &B,
    model: &Llama<B>,
    recipe: &Recipe,
    metrics: &Metrics,
    out: &Path,
    model_name: String,
) -> Result<&'static str> {
    let add = &recipe.additive;
    let targets = &recipe.lora.target_modules;
    let base = Some(model_name.clone());
    let peft_cfg = match recipe.method {
        Method::Ia3 => Some(peft::additive::ia3_config(
            targets,
            &add.feedforward_modules,
            base,
        )),
        Method::Beft => Some(peft::additive::beft_config(targets, base)),
        Method::LnTuning => Some(peft::additive::ln_tuning_config(targets, base)),
        m => m.prompt_method().map(|pm| {
            let opts = peft::additive::PromptOptions {
                encoder_hidden_size: add.encoder_hidden_size,
                prefix_projection: add.prefix_projection,
                init_text: add.prompt_tuning_init_text.clone(),
                tokenizer_name_or_path: add
                    .prompt_tuning_init_text
                    .as_ref()
                    .map(|_| model_name.clone()),
            };
            peft::additive::prompt_config(model, pm, add.num_virtual_tokens, &opts, base)
        }),
    };
    // A reward model is PEFT's SEQ_CLS task with its head in modules_to_save.
    let task = |mut cfg: peft::AdapterConfig| {
        if model.score.is_some() {
            cfg.set_seq_cls_head();
        }
        cfg
    };
    if let Some(cfg) = peft_cfg {
        let cfg = task(cfg);
        peft::save_adapter(out, &cfg, &peft::llama_adapter_tensors(be, model)?)?;
        return Ok("PEFT adapter");
    }
    if recipe.method.bottleneck_kind().is_some() {
        adapters_lib::save_bottleneck(be, model, out, &model_name)?;
        return Ok("adapters-library adapter");
    }
    if recipe.method == Method::AdapterFusion {
        adapters_lib::save_fusion(be, model, out, &model_name)?;
        return Ok("adapters-library fusion");
    }
    let Some(kind) = recipe.method.adapter_kind() else {
        write_safetensors(
            &out.join("model.safetensors"),
            model_tensors(be, model, WeightDtype::F32)?,
        )?;
        return Ok("model.safetensors");
    };
    let mut lora = recipe.lora.clone();
    if kind == MethodKind::AdaLora {
        lora.r = recipe.adalora.init_r;
    }
    let pattern = metrics.adalora_rank_pattern.clone();
    let a = &recipe.adalora;
    let opts = peft::MethodOptions {
        base_model_name_or_path: Some(model_name),
        vera: peft::VeraOptions {
            projection_prng_key: recipe.vera.projection_prng_key,
            d_initial: recipe.vera.d_initial as f64,
            ..Default::default()
        },
        adalora: peft::AdaLoraOptions {
            target_r: a.target_r,
            tinit: a.tinit,
            tfinal: a.tfinal,
            delta_t: a.delta_t,
            beta1: a.beta1,
            beta2: a.beta2,
            orth_reg_weight: a.orth_reg_weight as f64,
            total_step: Some(recipe.train.steps as u64),
            rank_pattern: pattern.clone(),
        },
        ia3_feedforward_modules: Vec::new(),
    };
    let cfg = task(peft::adapter_config_for_method(kind, &lora, &opts)?);
    let (tensors, _) = match &pattern {
        Some(p) => peft::llama_adapter_export(be, model, peft::AdaLoraMask::Pattern(p))?,
        None => peft::llama_adapter_export(be, model, peft::AdaLoraMask::KeepAll)?,
    };
    peft::save_adapter(out, &cfg, &tensors)?;
    Ok("PEFT adapter")
}
