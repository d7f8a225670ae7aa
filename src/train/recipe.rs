//! What to fine-tune and how: the method, its hyperparameters (PEFT's names), and the training
//! run around it. The CLI and the Python module both build a [`Recipe`] and call [`run`].

use crate::adapter::{
    Bottleneck, BottleneckConfig, BottleneckKind, LoraConfig, MethodKind, PromptMethod,
};
use crate::backend::{Activation, Backend};
use crate::error::{Error, Result};
use crate::model::llama::{ComputeDtype, FullFinetune, Llama, Nf4Spec};
use crate::train::data::Example;
pub use crate::train::hooks::{AdaLoraHook, FusionHook, MethodHook};
use crate::train::trainer::{Metrics, StepMetric, TrainConfig, train_with};
use serde::{Deserialize, Serialize};

/// A fine-tuning method, as `lorafuse finetune --method` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// All parameters trained (see [`FullSettings`] for the variants).
    Full,
    /// LoRA (Hu et al. 2021).
    Lora,
    /// QLoRA (Dettmers et al. 2023): LoRA over NF4-quantized frozen projection weights.
    Qlora,
    /// DoRA (Liu et al. 2024): LoRA plus a trained magnitude per output feature.
    Dora,
    /// DoRA over NF4-quantized frozen projection weights (QDoRA).
    Qdora,
    /// VeRA (Kopiczko et al. 2024): shared frozen random projections, trained scaling vectors.
    Vera,
    /// VeRA over NF4-quantized frozen projection weights (QVeRA).
    Qvera,
    /// AdaLoRA (Zhang et al. 2023): SVD-form adapters with a rank budget.
    AdaLora,
    /// AdaLoRA over NF4-quantized frozen projection weights (QAdaLoRA).
    Qadalora,
    /// IA3 (Liu et al. 2022): learned scales of k, v and the feed-forward input.
    Ia3,
    /// Bias tuning (PEFT's BEFT; BitFit, Ben Zaken et al. 2022, on a model with biases).
    Beft,
    /// LN tuning (Zhao et al. 2023): the RMSNorm weights train.
    #[serde(rename = "ln_tuning")]
    LnTuning,
    /// Prompt tuning (Lester et al. 2021): virtual token embeddings before the input.
    #[serde(rename = "prompt_tuning")]
    PromptTuning,
    /// P-tuning (Liu et al. 2021): virtual tokens from a trained MLP prompt encoder.
    #[serde(rename = "p_tuning")]
    PTuning,
    /// Prefix tuning (Li and Liang 2021): trained keys and values before every layer's.
    #[serde(rename = "prefix_tuning")]
    PrefixTuning,
    /// Houlsby bottleneck adapters (Houlsby et al. 2019; the `adapters` library's
    /// `double_seq_bn`).
    Houlsby,
    /// Pfeiffer bottleneck adapters (Pfeiffer et al. 2021; `seq_bn`).
    Pfeiffer,
    /// AdapterFusion (Pfeiffer et al. 2021) over trained Pfeiffer adapters.
    #[serde(rename = "adapter_fusion")]
    AdapterFusion,
}

impl Method {
    /// Every method, in the order `lorafuse compare` reports them.
    pub const ALL: [Method; 18] = [
        Method::Full,
        Method::Lora,
        Method::Qlora,
        Method::Dora,
        Method::Qdora,
        Method::Vera,
        Method::Qvera,
        Method::AdaLora,
        Method::Qadalora,
        Method::Ia3,
        Method::Beft,
        Method::LnTuning,
        Method::PromptTuning,
        Method::PTuning,
        Method::PrefixTuning,
        Method::Houlsby,
        Method::Pfeiffer,
        Method::AdapterFusion,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Lora => "lora",
            Method::Qlora => "qlora",
            Method::Dora => "dora",
            Method::Qdora => "qdora",
            Method::Vera => "vera",
            Method::Qvera => "qvera",
            Method::AdaLora => "adalora",
            Method::Qadalora => "qadalora",
            Method::Ia3 => "ia3",
            Method::Beft => "beft",
            Method::LnTuning => "ln_tuning",
            Method::PromptTuning => "prompt_tuning",
            Method::PTuning => "p_tuning",
            Method::PrefixTuning => "prefix_tuning",
            Method::Houlsby => "houlsby",
            Method::Pfeiffer => "pfeiffer",
            Method::AdapterFusion => "adapter_fusion",
        }
    }

    /// The learning rate used when none is given: 2e-4 for LoRA and DoRA (the issue's
    /// recipe), 2e-5 for full fine-tuning (every weight moves, so the usual full-FT range),
    /// 5e-3 for VeRA (its paper trains the scaling vectors with rates 10-100x LoRA's), and
    /// 5e-3 for AdaLoRA: its `lora_E` starts at 0 and A, B at N(0, 0.02), so its first updates
    /// are far smaller than LoRA's; on the default 60-step task 5e-4 moved the eval loss by
    /// 1.1% and 5e-3 by 24% (measured with `lorafuse finetune --method adalora --lr ...`).
    pub fn default_lr(self) -> f32 {
        match self {
            Method::Full => 2e-5,
            Method::Lora | Method::Qlora | Method::Dora | Method::Qdora => 2e-4,
            Method::Vera | Method::Qvera => 5e-3,
            Method::AdaLora | Method::Qadalora => 5e-3,
            Method::Ia3 => IA3_LR,
            Method::Beft => BEFT_LR,
            Method::LnTuning => LN_TUNING_LR,
            Method::PromptTuning => PROMPT_TUNING_LR,
            Method::PTuning => P_TUNING_LR,
            Method::PrefixTuning => PREFIX_TUNING_LR,
            Method::Houlsby | Method::Pfeiffer => BOTTLENECK_LR,
            Method::AdapterFusion => FUSION_LR,
        }
    }

    /// The modules a method adapts when `--target-modules` is not given: PEFT's defaults for
    /// Llama where the method has one (IA3 `k_proj, v_proj, down_proj`; BEFT `v_proj`; LN
    /// tuning both norms of every layer and the final `norm`), lorafuse's all seven
    /// projections for the LoRA family, nothing for the methods that adapt no module.
    pub fn default_target_modules(self) -> Vec<String> {
        let names: &[&str] = match self {
            Method::Ia3 => &["k_proj", "v_proj", "down_proj"],
            Method::Beft => &["v_proj"],
            Method::LnTuning => &crate::adapter::ln_tuning::LN_TARGETS,
            m if m.adapter_kind().is_some_and(MethodKind::is_low_rank) => {
                return LoraConfig::default().target_modules;
            }
            _ => &[],
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    /// The soft prompt this method trains, if it is one.
    pub fn prompt_method(self) -> Option<PromptMethod> {
        match self {
            Method::PromptTuning => Some(PromptMethod::PromptTuning),
            Method::PTuning => Some(PromptMethod::PTuning),
            Method::PrefixTuning => Some(PromptMethod::PrefixTuning),
            _ => None,
        }
    }

    /// The bottleneck adapter this method trains, if it is one.
    pub fn bottleneck_kind(self) -> Option<BottleneckKind> {
        match self {
            Method::Houlsby => Some(BottleneckKind::Houlsby),
            Method::Pfeiffer => Some(BottleneckKind::Pfeiffer),
            _ => None,
        }
    }

    /// Whether the frozen projection weights are NF4 (QLoRA, QDoRA, QVeRA, QAdaLoRA).
    pub fn quantized_base(self) -> bool {
        matches!(
            self,
            Method::Qlora | Method::Qdora | Method::Qvera | Method::Qadalora
        )
    }

    /// The adapter method (PEFT's `peft_type`), `None` for full fine-tuning.
    pub fn adapter_kind(self) -> Option<MethodKind> {
        match self {
            Method::Full => None,
            Method::Lora | Method::Qlora => Some(MethodKind::Lora),
            Method::Dora | Method::Qdora => Some(MethodKind::Dora),
            Method::Vera | Method::Qvera => Some(MethodKind::Vera),
            Method::AdaLora | Method::Qadalora => Some(MethodKind::AdaLora),
            Method::Ia3 => Some(MethodKind::Ia3),
            Method::Beft => Some(MethodKind::Beft),
            _ => None,
        }
    }

    /// Whether the method trains an adapter (anything but full fine-tuning): the base weights
    /// stay frozen.
    pub fn is_adapter(self) -> bool {
        self != Method::Full
    }
}

// Default learning rates of the additive and selective methods: the best of a grid on the
// default recipe (SmolLM2-135M-Instruct, 60 steps of 8 chatterbot examples, the train split
// only) by the mean training loss of the last 20 steps; README.md, "Choosing the learning
// rates", lists the grid.
const IA3_LR: f32 = 3e-2;
const BEFT_LR: f32 = 1e-2;
const LN_TUNING_LR: f32 = 3e-3;
const PROMPT_TUNING_LR: f32 = 3e-1;
const P_TUNING_LR: f32 = 3e-3;
const PREFIX_TUNING_LR: f32 = 3e-2;
const BOTTLENECK_LR: f32 = 3e-3;
const FUSION_LR: f32 = 5e-4;

/// VeRA's settings (PEFT's `VeraConfig` names).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct VeraSettings {
    /// Initial value of every `vera_lambda_d` entry.
    pub d_initial: f32,
    /// Seed of the shared projections (lorafuse's generator, not torch's).
    pub projection_prng_key: u64,
}

impl Default for VeraSettings {
    fn default() -> Self {
        VeraSettings {
            d_initial: 0.1,
            projection_prng_key: 0,
        }
    }
}

/// AdaLoRA's settings (PEFT's `AdaLoraConfig` names). The layers start at `init_r` (which
/// replaces the LoRA `r`), and the budget falls to `target_r` per layer on average.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraSettings {
    pub init_r: usize,
    pub target_r: usize,
    pub tinit: u64,
    pub tfinal: u64,
    pub delta_t: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub orth_reg_weight: f32,
}

impl Default for AdaLoraSettings {
    /// PEFT's defaults for init_r, target_r, beta1, beta2 and orth_reg_weight; tinit,
    /// tfinal and deltaT chosen for the 60-step default run (10 warmup steps, the pattern
    /// frozen for the last 20, a new mask every 5 steps in between).
    fn default() -> Self {
        AdaLoraSettings {
            init_r: 12,
            target_r: 8,
            tinit: 10,
            tfinal: 20,
            delta_t: 5,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
        }
    }
}

/// Full fine-tuning settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FullSettings {
    /// Keep the embeddings (and the tied LM head) frozen.
    pub freeze_embeddings: bool,
    /// Gradual unfreezing from the top: one more layer every this many steps.
    pub unfreeze_every: Option<usize>,
}

/// The settings of the additive and selective methods, under their reference libraries'
/// names (PEFT's `IA3Config`, `PromptTuningConfig`, `PromptEncoderConfig`,
/// `PrefixTuningConfig`; the `adapters` library's `SeqBnConfig`/`DoubleSeqBnConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdditiveSettings {
    /// IA3: the targets that scale their input instead of their output (a subset of the
    /// target modules; PEFT's default for Llama `down_proj`).
    pub feedforward_modules: Vec<String>,
    /// Prompt, P- and prefix tuning: virtual tokens.
    pub num_virtual_tokens: usize,
    /// Prompt tuning: PEFT's `TEXT` init from this text's tokens (repeated or cut to
    /// `num_virtual_tokens`); `None` is `RANDOM`.
    pub prompt_tuning_init_text: Option<String>,
    /// P-tuning's MLP width, prefix tuning's projection width; `None`: the token width, as
    /// PEFT defaults it.
    pub encoder_hidden_size: Option<usize>,
    /// Prefix tuning: train the prefix through PEFT's two-layer tanh projection.
    pub prefix_projection: bool,
    /// Bottleneck adapters: hidden size / bottleneck width (the library's 16 for both).
    pub reduction_factor: f64,
    /// Bottleneck adapters: `relu`, `swish` or `tanh`; `None`: the library's default for the
    /// architecture (Houlsby `swish`, Pfeiffer `relu`).
    pub non_linearity: Option<String>,
    /// Bottleneck adapters: the adapter's name in its files (the library's `load_adapter`
    /// name); AdapterFusion names its fused adapters by theirs.
    pub adapter_name: String,
    /// AdapterFusion: the trained Pfeiffer adapter folders to fuse, in order (at least two).
    pub fuse: Vec<std::path::PathBuf>,
}

impl Default for AdditiveSettings {
    fn default() -> Self {
        AdditiveSettings {
            feedforward_modules: vec!["down_proj".into()],
            num_virtual_tokens: 20,
            prompt_tuning_init_text: None,
            encoder_hidden_size: None,
            prefix_projection: false,
            reduction_factor: 16.0,
            non_linearity: None,
            adapter_name: "lorafuse".into(),
            fuse: Vec::new(),
        }
    }
}

impl AdditiveSettings {
    /// The bottleneck config of `kind` from these settings. Errors: an unknown non-linearity,
    /// a reduction factor that is not a positive number.
    pub fn bottleneck_config(&self, kind: BottleneckKind) -> Result<BottleneckConfig> {
        if !(self.reduction_factor.is_finite() && self.reduction_factor > 0.0) {
            return Err(Error::arg(
                "reduction_factor",
                format!("must be a positive number, got {}", self.reduction_factor),
            ));
        }
        Ok(BottleneckConfig {
            kind,
            name: self.adapter_name.clone(),
            reduction_factor: self.reduction_factor,
            non_linearity: match &self.non_linearity {
                Some(n) => Activation::from_name(n)?,
                None => kind.default_activation(),
            },
        })
    }
}

/// Everything that defines a fine-tuning run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub method: Method,
    /// r, lora_alpha, use_rslora and target_modules (VeRA uses r and the targets; AdaLoRA the
    /// alpha and the targets, its rank coming from `adalora.init_r`).
    pub lora: LoraConfig,
    pub vera: VeraSettings,
    pub adalora: AdaLoraSettings,
    pub full: FullSettings,
    pub train: TrainConfig,
    /// Seed of the adapter init.
    pub seed: u64,
    /// NF4 settings of QLoRA/QDoRA's frozen base.
    pub nf4: Nf4Spec,
    /// IA3, soft prompt, bottleneck adapter and AdapterFusion settings.
    #[serde(default)]
    pub additive: AdditiveSettings,
    /// Storage of the frozen dense bases under adapters (`--compute-dtype`, f32 by default).
    #[serde(default)]
    pub compute_dtype: ComputeDtype,
}

impl Recipe {
    /// Checks the settings that need no model: the LoRA config (r, alpha, known target
    /// modules), the training config, that the full-fine-tuning options (frozen
    /// embeddings, gradual unfreezing) are used only with [`Method::Full`], and that a bf16
    /// compute dtype has frozen dense bases to store (not full fine-tuning, which trains them,
    /// nor QLoRA/QDoRA, whose bases are NF4).
    pub fn validate(&self) -> Result<()> {
        if self.compute_dtype == ComputeDtype::Bf16
            && (!self.method.is_adapter() || self.method.quantized_base())
        {
            return Err(Error::arg(
                "compute_dtype",
                format!(
                    "--compute-dtype bf16 stores the frozen dense base weights in bf16, and \
                     --method {} has none: {}",
                    self.method.name(),
                    if self.method.quantized_base() {
                        "its base is NF4 (dequantized to f32 in every product)"
                    } else {
                        "full fine-tuning trains the base in f32"
                    }
                ),
            ));
        }
        let targets = &self.lora.target_modules;
        match self.method {
            // Every module trains; the LoRA settings are unused.
            Method::Full => {}
            // Norm names, checked when the norms are copied.
            Method::LnTuning | Method::Beft if targets.is_empty() => {
                return Err(Error::arg("target_modules", "no module to adapt"));
            }
            Method::LnTuning => {}
            Method::Beft => {
                crate::model::llama::target_indices(targets)?;
            }
            Method::Ia3 => {
                if targets.is_empty() {
                    return Err(Error::arg("target_modules", "no module to adapt"));
                }
                crate::model::llama::target_indices(targets)?;
                crate::model::llama::target_indices(&self.additive.feedforward_modules)?;
            }
            m if m.is_adapter() && m.adapter_kind().is_none() => {
                if !targets.is_empty() {
                    return Err(Error::arg(
                        "target_modules",
                        format!("{} adapts no module; drop --target-modules", m.name()),
                    ));
                }
            }
            _ => {
                self.lora.validate()?;
                crate::model::llama::target_indices(targets)?;
            }
        }
        if self.method.prompt_method().is_some() && self.additive.num_virtual_tokens == 0 {
            return Err(Error::arg(
                "num_virtual_tokens",
                "a soft prompt needs at least one virtual token",
            ));
        }
        if self.additive.prompt_tuning_init_text.is_some() && self.method != Method::PromptTuning {
            return Err(Error::arg(
                "prompt_tuning_init_text",
                "applies to --method prompt_tuning only",
            ));
        }
        if let Some(kind) = self.method.bottleneck_kind() {
            self.additive.bottleneck_config(kind)?;
        }
        if self.method == Method::AdapterFusion && self.additive.fuse.len() < 2 {
            return Err(Error::arg(
                "fuse",
                format!(
                    "AdapterFusion needs at least two trained Pfeiffer adapter folders \
                     (--fuse DIR,DIR), got {}",
                    self.additive.fuse.len()
                ),
            ));
        }
        if self.method != Method::AdapterFusion && !self.additive.fuse.is_empty() {
            return Err(Error::arg(
                "fuse",
                "applies to --method adapter_fusion only",
            ));
        }
        self.train.validate()?;
        if self.method != Method::Full
            && (self.full.freeze_embeddings || self.full.unfreeze_every.is_some())
        {
            return Err(Error::arg(
                "method",
                "--freeze-embeddings and --unfreeze-every apply to --method full",
            ));
        }
        Ok(())
    }
}

/// Puts the method's trainable tensors on `model`: adapters with their init (over dense bases
/// made frozen with [`Llama::freeze_bases`], or NF4 bases for QLoRA/QDoRA), or full
/// fine-tuning (which needs bases that were never frozen on a backend that stores them
/// narrower). Errors: invalid settings, an unknown target module.
pub fn prepare<B: Backend>(be: &B, model: &mut Llama<B>, recipe: &Recipe) -> Result<()> {
    prepare_with(be, model, recipe, None)
}

/// [`prepare`], with the token ids of prompt tuning's init text
/// ([`AdditiveSettings::prompt_tuning_init_text`], tokenized by the caller as PEFT does, without
/// special tokens). Errors: those of [`prepare`]; init text given but no ids.
pub fn prepare_with<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    recipe: &Recipe,
    prompt_init_ids: Option<&[u32]>,
) -> Result<()> {
    model.remove_adapters();
    model.full_finetune = None;
    if recipe.method.quantized_base() {
        model.quantize_bases(be, recipe.nf4)?;
    } else if recipe.method.is_adapter() {
        // The dense bases stay frozen under adapters: a backend may store them narrower (wgpu:
        // f16 where the adapter has SHADER_F16). Before the adapters' init, so that DoRA's
        // magnitude is the norm of the weight as stored.
        model.freeze_bases(be, recipe.compute_dtype)?;
    }
    let add = &recipe.additive;
    let targets = &recipe.lora.target_modules;
    if let Some(pm) = recipe.method.prompt_method() {
        let ids = match (&add.prompt_tuning_init_text, prompt_init_ids) {
            (None, _) => None,
            (Some(_), Some(ids)) => Some(ids),
            (Some(_), None) => {
                return Err(Error::arg(
                    "prompt_tuning_init_text",
                    "TEXT init needs the text's token ids",
                ));
            }
        };
        let hidden = match pm {
            PromptMethod::PrefixTuning if !add.prefix_projection => None,
            _ => Some(add.encoder_hidden_size.unwrap_or(model.cfg.hidden_size)),
        };
        return model.add_soft_prompt(be, pm, add.num_virtual_tokens, hidden, ids, recipe.seed);
    }
    if let Some(kind) = recipe.method.bottleneck_kind() {
        let cfg = add.bottleneck_config(kind)?;
        let (n, d) = (model.cfg.num_hidden_layers, model.cfg.hidden_size);
        model.bottleneck = Some(Bottleneck::init(be, cfg, n, d, recipe.seed)?);
        return Ok(());
    }
    match recipe.method {
        Method::AdapterFusion => {
            let dirs: Vec<&std::path::Path> = add.fuse.iter().map(|p| p.as_path()).collect();
            let fusion = crate::io::adapters_lib::new_fusion(be, model, &dirs, recipe.seed)?;
            model.fusion = Some(fusion);
            return Ok(());
        }
        Method::LnTuning => return model.add_ln_tuning(be, targets),
        Method::Ia3 => return model.add_ia3(be, targets, &add.feedforward_modules),
        Method::Beft => return model.add_beft(be, targets),
        _ => {}
    }
    match recipe.method.adapter_kind() {
        None => {
            model.full_finetune = Some(FullFinetune {
                freeze_embeddings: recipe.full.freeze_embeddings,
                trainable_from: 0,
            });
        }
        Some(kind) => {
            let mut lora = recipe.lora.clone();
            let mut seed = recipe.seed;
            match kind {
                MethodKind::AdaLora => {
                    let a = &recipe.adalora;
                    if a.target_r == 0 || a.target_r >= a.init_r {
                        return Err(Error::arg(
                            "target_r",
                            format!("must be in 1..init_r (init_r = {})", a.init_r),
                        ));
                    }
                    lora.r = a.init_r;
                }
                MethodKind::Vera => seed = recipe.vera.projection_prng_key,
                _ => {}
            }
            model.add_adapters_with(be, kind, &lora, seed, recipe.vera.d_initial)?;
        }
    }
    Ok(())
}

/// Prepares the model for `recipe` and trains it (see [`train_with`]); AdaLoRA runs its rank
/// allocator and orthogonal regularizer around each step.
pub fn run<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    recipe: &Recipe,
    train: &[Example],
    eval: &[Example],
    on_step: impl FnMut(&StepMetric),
) -> Result<Metrics> {
    run_with(be, model, recipe, None, train, eval, on_step)
}

/// [`run`], with the token ids of prompt tuning's init text (see [`prepare_with`]).
pub fn run_with<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    recipe: &Recipe,
    prompt_init_ids: Option<&[u32]>,
    train: &[Example],
    eval: &[Example],
    on_step: impl FnMut(&StepMetric),
) -> Result<Metrics> {
    prepare_with(be, model, recipe, prompt_init_ids)?;
    let mut cfg = recipe.train.clone();
    if recipe.method == Method::Full {
        cfg.unfreeze_every = recipe.full.unfreeze_every;
    }
    let mut hook = MethodHook::for_recipe(be, model, recipe, cfg.steps)?;
    let mut metrics = train_with(be, model, train, eval, &cfg, on_step, &mut hook)?;
    metrics.adalora_rank_pattern = hook.rank_pattern(be)?;
    Ok(metrics)
}
