//! The `lorafuse` command-line tool: fine-tune, generate, export logits, merge.

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::adapter::LoraConfig;
use lorafuse::backend::Backend;
use lorafuse::io::atomic::write_atomic;
use lorafuse::io::export::{merge_into_base, model_tensors, nf4_model_tensors, write_safetensors};
use lorafuse::io::gguf::GgufFile;
use lorafuse::io::llama_cpp::{gguf_lora, write_gguf_lora, write_gguf_model};
use lorafuse::io::{apply_adapter_folder, fetch};
use lorafuse::model::chat::{LossOn, Prompt};
use lorafuse::model::generate::Sampling;
use lorafuse::model::llama::{Llama, Nf4Spec, PROJ_NAMES, PackedBatch, argmax};
use lorafuse::model::tokenizer::Tokenizer;
use lorafuse::train::chat_data::Truncation;
use lorafuse::train::compare::{self, CompareRow};
use lorafuse::train::data::BadRecordPolicy;
use lorafuse::train::job::{
    ChatOptions, FinetuneJob, JobEvent, load_model, prompt_template, run_finetune,
};
use lorafuse::train::recipe::{
    AdaLoraSettings, AdditiveSettings, FullSettings, Method, Recipe, VeraSettings,
};
use lorafuse::train::report::write_json;
use lorafuse::train::trainer::{Metrics, TrainConfig};
use lorafuse::{Cpu, Error, Result};
use std::path::Path;

mod cli;

use cli::*;

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Finetune(a) => finetune(*a),
        Cmd::Generate(a) => generate(a),
        Cmd::Logits(a) => logits(a),
        Cmd::Merge(a) => merge(a),
        Cmd::Export(a) => export(a),
        Cmd::Compare(a) => compare(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Dpo(a) => align_cmd::dpo(*a),
        Cmd::Reward(a) => align_cmd::reward(*a),
        Cmd::Score(a) => align_cmd::score(a),
        Cmd::SelfInstruct(a) => self_instruct(a),
        Cmd::EvolInstruct(a) => evol_instruct(a),
        Cmd::Fetch => fetch::default_model(&mut |s| eprintln!("{s}")).map(|p| {
            println!("{}", p.display());
        }),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The backend a command runs on, as `--device` picks it.
enum Picked {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(lorafuse::backend::cuda::Cuda),
    #[cfg(feature = "wgpu")]
    Wgpu(lorafuse::Wgpu),
}

/// Resolves `--device`: `cpu`; `cuda` (GPU 0); `wgpu` (the first Vulkan/Metal/DX12 adapter, a
/// software one included); `auto` is CUDA when a CUDA GPU is present, else the CPU reference
/// (wgpu is chosen explicitly: probing Vulkan on every start costs time and prints loader
/// noise on headless machines). Errors: the requested backend is unavailable on this machine
/// or not compiled in.
fn pick(d: Device) -> Result<Picked> {
    match d {
        Device::Cpu => Ok(Picked::Cpu),
        #[cfg(feature = "wgpu")]
        Device::Wgpu => Ok(Picked::Wgpu(lorafuse::Wgpu::new()?)),
        #[cfg(feature = "cuda")]
        Device::Auto => Ok(match lorafuse::backend::cuda::Cuda::new(0) {
            Ok(c) => Picked::Cuda(c),
            Err(_) => Picked::Cpu,
        }),
        #[cfg(not(feature = "cuda"))]
        Device::Auto => Ok(Picked::Cpu),
        #[cfg(not(feature = "wgpu"))]
        Device::Wgpu => Err(Error::BackendUnavailable {
            backend: "wgpu".into(),
            reason: "this build has no `wgpu` feature".into(),
        }),
        #[cfg(feature = "cuda")]
        Device::Cuda => Ok(Picked::Cuda(lorafuse::backend::cuda::Cuda::new(0)?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(Error::BackendUnavailable {
            backend: "cuda".into(),
            reason: "this build has no `cuda` feature".into(),
        }),
    }
}

/// Runs the generic expression `$body` with `$be` bound to the backend `--device` picks.
macro_rules! on_backend {
    ($device:expr, $be:ident => $body:expr) => {
        match pick($device)? {
            Picked::Cpu => {
                let $be = Cpu;
                $body
            }
            #[cfg(feature = "cuda")]
            Picked::Cuda(c) => {
                let $be = c;
                $body
            }
            #[cfg(feature = "wgpu")]
            Picked::Wgpu(w) => {
                let $be = w;
                $body
            }
        }
    };
}

mod align_cmd;
mod multi_cmd;
mod synth_cmd;

fn self_instruct(a: SelfInstructArgs) -> Result<()> {
    on_backend!(a.common.model.device, be => synth_cmd::self_instruct_on(be, &a))
}

fn evol_instruct(a: EvolInstructArgs) -> Result<()> {
    on_backend!(a.common.model.device, be => synth_cmd::evol_instruct_on(be, &a))
}

/// The recipe `finetune` runs, from its flags.
fn recipe_from(a: &FinetuneArgs) -> Result<Recipe> {
    let method = a.method.method();
    let lora = LoraConfig {
        r: a.r,
        lora_alpha: a.lora_alpha,
        use_rslora: a.use_rslora,
        target_modules: a
            .target_modules
            .clone()
            .unwrap_or_else(|| method.default_target_modules()),
    };
    let init_text = match (a.prompt_tuning_init, &a.prompt_tuning_init_text) {
        (PromptInit::Text, Some(t)) => Some(t.clone()),
        (PromptInit::Text, None) => {
            return Err(Error::arg(
                "prompt_tuning_init",
                "--prompt-tuning-init TEXT needs --prompt-tuning-init-text",
            ));
        }
        (PromptInit::Random, Some(_)) => {
            return Err(Error::arg(
                "prompt_tuning_init_text",
                "is used with --prompt-tuning-init TEXT only",
            ));
        }
        (PromptInit::Random, None) => None,
    };
    let train = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr.unwrap_or(method.default_lr()),
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        seed: a.seed,
        ..TrainConfig::default()
    };
    let recipe = Recipe {
        method,
        lora,
        vera: VeraSettings {
            d_initial: a.vera_d_initial,
            projection_prng_key: a.projection_prng_key,
        },
        adalora: AdaLoraSettings {
            init_r: a.init_r,
            target_r: a.target_r,
            tinit: a.tinit,
            tfinal: a.tfinal,
            delta_t: a.delta_t,
            beta1: a.adalora_beta1,
            beta2: a.adalora_beta2,
            orth_reg_weight: a.orth_reg_weight,
        },
        full: FullSettings {
            freeze_embeddings: a.freeze_embeddings,
            unfreeze_every: a.unfreeze_every,
        },
        train,
        seed: a.seed,
        nf4: Nf4Spec::default(),
        compute_dtype: a.compute_dtype.into(),
        additive: AdditiveSettings {
            feedforward_modules: a.feedforward_modules.clone(),
            num_virtual_tokens: a.num_virtual_tokens,
            prompt_tuning_init_text: init_text,
            encoder_hidden_size: a.encoder_hidden_size,
            prefix_projection: a.prefix_projection,
            reduction_factor: a.reduction_factor,
            non_linearity: a.non_linearity.clone(),
            adapter_name: a.adapter_name.clone(),
            fuse: a.fuse.clone(),
        },
    };
    recipe.validate()?;
    Ok(recipe)
}

fn finetune(a: FinetuneCmd) -> Result<()> {
    match &a.multi {
        Some(cfg) => {
            on_backend!(a.args.model.device, be => multi_cmd::finetune_multi(be, &a.args, cfg))
        }
        None => on_backend!(a.args.model.device, be => finetune_on(be, &a.args)),
    }
}

/// The run `a` describes, writing to `a.out` or `default_out`.
fn finetune_job(a: &FinetuneArgs, default_out: &str) -> Result<FinetuneJob> {
    let job = FinetuneJob {
        model: a.model.model.clone(),
        data: a.data.clone(),
        bad_records: match a.bad_records {
            BadRecords::Reject => BadRecordPolicy::Reject,
            BadRecords::Skip => BadRecordPolicy::Skip,
        },
        max_len: a.max_len,
        eval: !a.no_eval,
        out: a.out.clone().unwrap_or_else(|| default_out.into()),
        recipe: recipe_from(a)?,
        chat: ChatOptions {
            template: a.chat_template.clone(),
            loss_on: match a.loss_on {
                LossOnArg::Assistant => LossOn::Assistant,
                LossOnArg::All => LossOn::All,
                LossOnArg::Last => LossOn::Last,
            },
            truncation: match a.truncation {
                TruncationArg::Turns => Truncation::Turns,
                TruncationArg::Right => Truncation::Right,
                TruncationArg::Left => Truncation::Left,
            },
        },
    };
    job.validate()?;
    Ok(job)
}

/// Runs `body` with a progress bar of `steps` steps that shows each [`JobEvent`].
fn with_progress<T>(
    steps: usize,
    body: impl FnOnce(&mut dyn FnMut(JobEvent<'_>)) -> Result<T>,
) -> Result<T> {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let out = body(&mut |e| match e {
        JobEvent::Log(line) => bar.suspend(|| eprintln!("{line}")),
        JobEvent::Evaluating { after } => bar.set_message(if after {
            "evaluating after training..."
        } else {
            "evaluating before training..."
        }),
        JobEvent::Step(m) => {
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                m.loss,
                m.lr,
                m.tokens as f64 / m.seconds
            ));
            bar.inc(1);
        }
    });
    bar.finish_and_clear();
    out
}

/// Prints the run's size, speed and memory, and what was written where.
fn print_run(metrics: &Metrics, n_base_params: usize, saved: &str, out: &Path) {
    eprintln!(
        "{} trainable parameters ({:.3}% of {})",
        metrics.trainable_params,
        100.0 * metrics.trainable_params as f64 / n_base_params as f64,
        n_base_params
    );
    println!(
        "{} steps, {:.3} s/step median ({:.3} mean), {:.0} tokens/s, peak RSS {} MiB",
        metrics.steps.len(),
        metrics.seconds_per_step_median,
        metrics.seconds_per_step_mean,
        metrics.tokens_per_s,
        metrics.peak_rss_bytes.unwrap_or(0) >> 20
    );
    println!(
        "{saved}, metrics.json and plots written to {}",
        out.display()
    );
}

fn finetune_on<B: Backend>(be: B, a: &FinetuneArgs) -> Result<()> {
    let job = finetune_job(a, "runs/smollm2-lora")?;
    let report = with_progress(job.recipe.train.steps, |ev| run_finetune(&be, &job, ev))?;
    let metrics = &report.metrics;
    if let (Some(b), Some(f)) = (metrics.eval_loss_before, metrics.eval_loss_after) {
        println!("eval loss {b:.4} -> {f:.4} ({:+.1}%)", 100.0 * (f - b) / b);
    }
    print_run(metrics, report.n_base_params, report.saved, &job.out);
    Ok(())
}

/// Runs `lorafuse finetune` once per method in a child process (so each run's peak memory is
/// its own), then gathers the metrics into the comparison table.
fn compare(a: CompareArgs) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let model = match &a.model {
        Some(p) => p.clone(),
        None => fetch::default_model(&mut |s| eprintln!("{s}"))?,
    };
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    // One `lorafuse finetune` child per run, with the default recipe of its method.
    let finetune = |method: Method, dir: &Path, extra: &[std::ffi::OsString]| -> Result<()> {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["finetune", "--method", method.name(), "--steps"])
            .arg(a.steps.to_string())
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(dir)
            .args(extra);
        if let Some(d) = &a.data {
            cmd.arg("--data").arg(d);
        }
        let status = cmd.status().map_err(|e| Error::io(&exe, e))?;
        if !status.success() {
            return Err(Error::arg(
                "method",
                format!("the {} run failed ({status})", method.name()),
            ));
        }
        Ok(())
    };
    let mut rows = Vec::new();
    for m in &a.methods {
        let method = m.method();
        let dir = a.out.join(method.name());
        eprintln!("== {} ==", method.name());
        let mut extra = Vec::new();
        if method == Method::AdapterFusion {
            // AdapterFusion fuses trained Pfeiffer adapters: this run's `pfeiffer` one (trained
            // here if it has not run yet) and a second trained with another seed.
            let first = a.out.join(Method::Pfeiffer.name());
            if !rows
                .iter()
                .any(|r: &CompareRow| r.method == Method::Pfeiffer.name())
            {
                eprintln!("== pfeiffer (to fuse) ==");
                finetune(Method::Pfeiffer, &first, &[])?;
            }
            let second = a.out.join("pfeiffer_seed43");
            eprintln!("== pfeiffer, seed 43 (to fuse) ==");
            let args = ["--seed", "43", "--adapter-name", "lorafuse_seed43"].map(Into::into);
            finetune(Method::Pfeiffer, &second, &args)?;
            let mut list = first.into_os_string();
            list.push(",");
            list.push(second.as_os_str());
            extra = vec!["--fuse".into(), list];
        }
        finetune(method, &dir, &extra)?;
        let text = std::fs::read_to_string(dir.join("metrics.json"))
            .map_err(|e| Error::io(dir.join("metrics.json"), e))?;
        let metrics: lorafuse::train::trainer::Metrics =
            serde_json::from_str(&text).map_err(|e| Error::Json {
                context: dir.join("metrics.json").display().to_string(),
                msg: e.to_string(),
            })?;
        let base = metrics
            .total_params
            .saturating_sub(if method == Method::Full {
                0
            } else {
                metrics.trainable_params
            });
        rows.push(CompareRow::from_metrics(method.name(), &metrics, base));
    }
    let table = compare::table(&rows);
    println!("{table}");
    write_json(&a.out.join("compare.json"), &rows)?;
    write_atomic(&a.out.join("compare.md"), table.as_bytes())?;
    compare::write_compare_png(&a.out.join("compare.png"), &rows)?;
    println!(
        "compare.json, compare.md and compare.png written to {}",
        a.out.display()
    );
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    on_backend!(a.model.device, be => generate_on(be, &a))
}

fn generate_on<B: Backend>(be: B, a: &GenerateArgs) -> Result<()> {
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate()?;
    if a.no_kv_cache && a.temperature != 0.0 {
        return Err(Error::arg(
            "no-kv-cache",
            "the uncached reference decodes greedily: use it with --temperature 0",
        ));
    }
    let texts = prompts_of(a)?;
    let (path, tok, mut model) = load_model(&be, a.model.model.as_deref(), None, &mut |l| {
        eprintln!("{l}")
    })?;
    let tmpl = if a.raw {
        None
    } else {
        Some(prompt_template(&path, &tok, Some(&a.chat.chat_template))?)
    };
    let system = a.chat.system.as_deref();
    let prompts = texts
        .iter()
        .map(|(p, _)| p.ids(tmpl.as_ref(), system, &tok))
        .collect::<Result<Vec<_>>>()?;
    let eos = tok.eos_id();
    let named = multi_cmd::named_adapters(&a.adapter)?;
    if let Some(named) = named {
        if a.no_kv_cache {
            return Err(Error::arg(
                "no-kv-cache",
                "a mixed batch of adapters decodes with the KV cache",
            ));
        }
        let prompts: Vec<_> = prompts
            .into_iter()
            .zip(texts.into_iter().map(|(_, n)| n))
            .collect();
        let settings = (a.max_new_tokens, eos, sampling);
        return multi_cmd::generate_mixed(&be, &mut model, &named, &prompts, settings, &tok);
    }
    if let Some((_, Some(n))) = texts.iter().find(|(_, n)| n.is_some()) {
        return Err(Error::arg(
            "prompt-file",
            format!("a prompt names adapter `{n}`: give the adapters as --adapter NAME=DIR"),
        ));
    }
    let run = |model: &Llama<B>, label: &str| -> Result<()> {
        let t0 = std::time::Instant::now();
        let outs = if a.no_kv_cache {
            prompts
                .iter()
                .map(|p| model.generate_greedy_uncached(&be, p, a.max_new_tokens, eos))
                .collect::<Result<Vec<_>>>()?
        } else {
            model.generate(&be, &prompts, a.max_new_tokens, eos, sampling)?
        };
        let secs = t0.elapsed().as_secs_f64();
        let n: usize = outs.iter().map(Vec::len).sum();
        for (i, out) in outs.iter().enumerate() {
            let which = if outs.len() > 1 {
                format!(" (prompt {})", i + 1)
            } else {
                String::new()
            };
            println!("--- {label}{which} ---\n{}", strip_eos(&tok, out, eos)?);
        }
        let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
        eprintln!(
            "{label}: {n} new tokens after {prompt_tokens} prompt tokens in {secs:.3} s \
             ({:.1} tokens/s, {})",
            n as f64 / secs.max(1e-9),
            if a.no_kv_cache {
                "no KV cache"
            } else {
                "KV cache"
            }
        );
        Ok(())
    };
    run(&model, "base model")?;
    if let Some(dir) = a.adapter.first() {
        apply_adapter_folder(&be, &mut model, Path::new(dir))?;
        run(&model, &format!("with adapter {dir}"))?;
    }
    Ok(())
}

/// The prompts of `generate`: every `--prompt`, then the lines of `--prompt-file` (plain text,
/// or a JSON object: see [`Prompt::from_json`]), each with the adapter a JSON record names
/// (`"adapter"`). Errors: an unreadable file, a JSON line that is neither (named by its line
/// number), an adapter name that is not a string, no prompt at all.
fn prompts_of(a: &GenerateArgs) -> Result<Vec<(Prompt, Option<String>)>> {
    let mut out: Vec<(Prompt, Option<String>)> = a
        .prompt
        .iter()
        .map(|p| (Prompt::Text(p.clone()), None))
        .collect();
    if let Some(path) = &a.prompt_file {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            if line.trim_start().starts_with('{') {
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Json {
                    context: format!("{} line {}", path.display(), i + 1),
                    msg: e.to_string(),
                })?;
                let bad = |m: String| Error::format(path, format!("line {}: {m}", i + 1));
                let adapter = multi_cmd::adapter_field(&v)
                    .map_err(bad)?
                    .map(str::to_string);
                out.push((Prompt::from_json(&v).map_err(bad)?, adapter));
            } else {
                out.push((Prompt::Text(line.to_string()), None));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::arg(
            "prompt",
            "no prompt given (--prompt or --prompt-file)",
        ));
    }
    Ok(out)
}

fn strip_eos(tok: &Tokenizer, ids: &[u32], eos: u32) -> Result<String> {
    let end = ids.iter().position(|&i| i == eos).unwrap_or(ids.len());
    tok.decode(&ids[..end])
}

fn logits(a: LogitsArgs) -> Result<()> {
    on_backend!(a.model.device, be => logits_on(be, &a))
}

fn logits_on<B: Backend>(be: B, a: &LogitsArgs) -> Result<()> {
    let (path, tok, mut model) = load_model(&be, a.model.model.as_deref(), None, &mut |l| {
        eprintln!("{l}")
    })?;
    if let Some(rows) = &a.rows {
        return multi_cmd::logits_rows(&be, a, rows, &mut model, &tok, &path);
    }
    match &a.adapter[..] {
        [] => {}
        [dir] => apply_adapter_folder(&be, &mut model, Path::new(dir))?,
        _ => {
            return Err(Error::arg(
                "adapter",
                "several adapters need --rows (each row names its adapter)",
            ));
        }
    }
    let mut ids = match (&a.text, &a.messages) {
        (Some(t), _) => tok.encode(t)?,
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
                context: f.display().to_string(),
                msg: e.to_string(),
            })?;
            let tmpl = prompt_template(&path, &tok, Some(&a.chat.chat_template))?;
            Prompt::from_json(&v)
                .map_err(|m| Error::format(f, m))?
                .ids(Some(&tmpl), a.chat.system.as_deref(), &tok)?
        }
        (None, None) => return Err(Error::arg("text", "give --text or --messages")),
    };
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    if ids.is_empty() {
        return Err(Error::arg("text", "no token to run"));
    }
    let labels = vec![-100i32; ids.len()];
    let batch = PackedBatch::from_examples([(&ids[..], &labels[..])])?;
    let logits = be.download(&model.logits_at(&be, &batch, &[(ids.len() - 1) as u32])?)?;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
    let logit_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tensors = vec![
        (
            "input_ids".to_string(),
            safetensors::Dtype::I64,
            vec![ids.len()],
            id_bytes,
        ),
        (
            "logits".to_string(),
            safetensors::Dtype::F32,
            vec![logits.len()],
            logit_bytes,
        ),
    ];
    write_safetensors(&a.out, tensors)?;
    println!(
        "{} tokens, argmax {} ({:?}), written to {}",
        ids.len(),
        argmax(&logits),
        tok.decode(&[argmax(&logits) as u32])?,
        a.out.display()
    );
    Ok(())
}

/// `lorafuse merge`: loads the model (with `--base nf4` its projections quantized to NF4, as
/// QLoRA/QDoRA trained over), applies the adapter, merges it into every adapted projection (over
/// an NF4 base: into its dequantized copy, [`lorafuse::adapter::Linear::dequantized`], since a
/// merge needs a dense weight) and writes every tensor, atomically: in `--dtype`, or with
/// `--requantize-nf4` the projections as bitsandbytes NF4 tensors and the rest in `--dtype`.
/// Errors: `--nf4-blocksize` without `--base nf4` or `--requantize-nf4`, or not a power of two
/// in 32..=4096 (both before anything is loaded).
fn merge(a: MergeArgs) -> Result<()> {
    if a.nf4_blocksize.is_some() && a.base != MergeBase::Nf4 && !a.requantize_nf4 {
        return Err(Error::arg(
            "nf4_blocksize",
            "--nf4-blocksize applies only with --base nf4 or --requantize-nf4",
        ));
    }
    let spec = Nf4Spec {
        blocksize: a.nf4_blocksize.unwrap_or(Nf4Spec::default().blocksize),
        ..Nf4Spec::default()
    };
    if lorafuse::quant::nf4::check_blocksize(spec.blocksize).is_err() {
        return Err(Error::arg(
            "nf4_blocksize",
            format!(
                "--nf4-blocksize must be a power of two in 32..=4096 (as in bitsandbytes), got {}",
                spec.blocksize
            ),
        ));
    }
    // The safetensors dtype (`None`: --to gguf), every refusal before anything is loaded.
    let st_dtype = match a.to {
        MergeTo::Safetensors => Some(a.dtype.weight_dtype().ok_or_else(|| {
            Error::arg(
                "dtype",
                "q8_0 is a GGUF type: use it with --to gguf (safetensors: f32, f16, bf16)",
            )
        })?),
        MergeTo::Gguf if a.requantize_nf4 => {
            return Err(Error::arg(
                "requantize_nf4",
                "--requantize-nf4 writes bitsandbytes tensors, which only --to safetensors \
                 holds (llama.cpp has no NF4 type)",
            ));
        }
        MergeTo::Gguf => {
            if let Some(p) = a
                .model
                .model
                .as_deref()
                .filter(|p| lorafuse::io::hf::is_hf_folder(p))
            {
                return Err(Error::arg(
                    "model",
                    format!(
                        "{} is a transformers folder: --to gguf carries the metadata and \
                         tokenizer over from a GGUF model file; merge --to safetensors into \
                         the folder and convert it with llama.cpp's convert_hf_to_gguf.py",
                        p.display()
                    ),
                ));
            }
            None
        }
    };
    // Merging is an export: it runs on the CPU reference whatever --device says.
    let be = Cpu;
    let (path, _tok, mut model) = load_model(
        &be,
        a.model.model.as_deref(),
        (a.base == MergeBase::Nf4).then_some(spec),
        &mut |l| eprintln!("{l}"),
    )?;
    apply_adapter_folder(&be, &mut model, &a.adapter)?;
    let norms = model.ln_tuning.is_some();
    let merged = merge_into_base(&be, &mut model)?;
    let report = |n: usize, how: &str| {
        println!(
            "merged {merged} of {} projections{}{how}; {n} tensors written to {}",
            model.layers.len() * PROJ_NAMES.len(),
            if norms { " and the tuned norms" } else { "" },
            a.out.display()
        )
    };
    let Some(st_dtype) = st_dtype else {
        let source = GgufFile::open(&path)?;
        let n = write_gguf_model(&be, &model, &source, &a.out, a.dtype.gguf_dtype())?;
        report(n, ", as GGUF for llama.cpp");
        return Ok(());
    };
    let tensors = if a.requantize_nf4 {
        nf4_model_tensors(&model, st_dtype, spec)?
    } else {
        model_tensors(&be, &model, st_dtype)?
    };
    let n = tensors.len();
    write_safetensors(&a.out, tensors)?;
    let how = if a.requantize_nf4 {
        format!(
            ", re-quantized to NF4 (blocksize {}, double quant)",
            spec.blocksize
        )
    } else {
        String::new()
    };
    report(n, &how);
    Ok(())
}

/// `lorafuse export`: applies the adapter folder to the model (dense, on the CPU: only its
/// shapes and the factors matter) and writes it as llama.cpp's LoRA adapter GGUF
/// ([`lorafuse::io::llama_cpp`]). Errors: a method with no LoRA-adapter form (named, with the
/// alternative), as [`gguf_lora`] and [`write_gguf_lora`] say.
fn export(a: ExportArgs) -> Result<()> {
    let be = Cpu;
    let (_, _tok, mut model) = load_model(&be, a.model.model.as_deref(), None, &mut |l| {
        eprintln!("{l}")
    })?;
    apply_adapter_folder(&be, &mut model, &a.adapter)?;
    match a.to {
        ExportTo::GgufLora => {
            let lora = gguf_lora(&be, &model)?;
            let name = a
                .adapter
                .file_name()
                .map_or("adapter".into(), |n| n.to_string_lossy().into_owned());
            write_gguf_lora(&a.out, "llama", &name, &lora, a.dtype.gguf_dtype())?;
            let ranks: Vec<usize> = lora.tensors.iter().map(|(_, f)| f.r).collect();
            println!(
                "{} projections (rank {}..={}), alpha {}{}, written to {}",
                lora.tensors.len(),
                ranks.iter().min().unwrap_or(&0),
                ranks.iter().max().unwrap_or(&0),
                lora.alpha,
                if lora.alpha == 0.0 {
                    " (scales folded into lora_b)"
                } else {
                    ""
                },
                a.out.display()
            );
        }
    }
    Ok(())
}

/// `lorafuse bench`: times the cases on the backend `--device` picks, with the machine's
/// measured limits (SGEMM peak through that backend's `linear`, host memory bandwidth).
fn bench(a: BenchArgs) -> Result<()> {
    on_backend!(a.device, be => bench_on(be, &a))
}

fn bench_on<B: Backend>(be: B, a: &BenchArgs) -> Result<()> {
    if a.mixed {
        return multi_cmd::bench_mixed(be, a);
    }
    use lorafuse::adapter::bench::{self as hb, CaseSet, Timing};
    let set = match a.cases {
        BenchCases::Default => CaseSet::Default,
        BenchCases::Full => CaseSet::Full,
        BenchCases::Small => CaseSet::Small,
    };
    if !(a.min_time.is_finite() && a.min_time >= 0.0) {
        return Err(Error::arg("min-time", "must be a finite number >= 0"));
    }
    let timing = Timing {
        min_time: std::time::Duration::from_secs_f64(a.min_time),
        ..Timing::default()
    };
    let peak = hb::measure_peak(&be)?;
    println!(
        "backend {}; machine: {} threads; {peak}",
        be.name(),
        rayon::current_num_threads()
    );
    println!(
        "{:<36} {:>10} {:>5} {:>8} {:>6} {:>7} {:>6} {:>6}",
        "case", "ours ms", "reps", "GFLOP/s", "%peak", "GB/s", "%bw", "%limit"
    );
    let mut results = Vec::new();
    for case in hb::cases(set) {
        let name = case.name();
        if a.filter
            .as_ref()
            .is_some_and(|f| !name.contains(f.as_str()))
        {
            continue;
        }
        let r = hb::bench_case(&be, &case, &timing, &peak)?;
        println!(
            "{:<36} {:>10.3} {:>5} {:>8.1} {:>5.0}% {:>7.1} {:>5.0}% {:>5.0}%",
            r.case,
            r.ours_s * 1e3,
            r.reps,
            r.gflops,
            100.0 * r.frac_peak_flops,
            r.gbps,
            100.0 * r.frac_peak_bw,
            100.0 * r.frac_limit
        );
        results.push(r);
    }
    if let Some(p) = &a.json {
        write_json(p, &results)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
