//! The training loop: batches in a seeded order, forward + backward, AdamW with a linear
//! warmup/decay schedule, evaluation before and after, and the metrics written to JSON.

use crate::backend::{Backend, Tensor, cross_entropy_loss};
use crate::error::{Error, Result};
use crate::model::llama::{Llama, PackedBatch};
use crate::train::data::{Example, shuffled_order};
use crate::train::optim::AdamW;
use crate::train::schedule::LinearWarmupDecay;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// Optimization hyperparameters. Defaults are lorafuse's `finetune` defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Linear warmup steps (transformers' `get_linear_schedule_with_warmup`).
    pub warmup_steps: usize,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Seed of the data order ([`shuffled_order`]).
    pub seed: u64,
    /// Examples per evaluation batch (does not change the eval loss, only the work per call).
    pub eval_batch_size: usize,
    /// Gradual unfreezing for full fine-tuning (Howard & Ruder 2018): train only the top layer
    /// at first and unfreeze one more layer, downwards, every this many steps; the embeddings
    /// join when every layer is trainable. `None` trains what the model marks trainable.
    pub unfreeze_every: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 60,
            batch_size: 8,
            lr: 2e-4,
            warmup_steps: 5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            seed: 42,
            eval_batch_size: 16,
            unfreeze_every: None,
        }
    }
}

impl TrainConfig {
    /// Errors: zero steps or batch size, a non-finite or negative learning rate.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::arg("steps", "must be at least 1"));
        }
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            return Err(Error::arg("batch_size", "must be at least 1"));
        }
        if !self.lr.is_finite() || self.lr < 0.0 {
            return Err(Error::arg(
                "lr",
                format!("{} is not a valid learning rate", self.lr),
            ));
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepMetric {
    /// 0-based step.
    pub step: usize,
    /// Token-weighted mean cross-entropy of the batch (nats).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f32,
    /// Tokens in the batch (no padding exists in packed batches).
    pub tokens: usize,
    /// Target tokens in the batch.
    pub targets: usize,
    /// Wall-clock seconds of the step (forward, backward, optimizer).
    pub seconds: f64,
    /// What else the objective logs per step, under the peer's names (DPO's `rewards/chosen`,
    /// `rewards/margins`, ...; a reward model's `accuracy`); empty for SFT.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub logs: BTreeMap<String, f64>,
}

/// Everything `lorafuse finetune` reports, written to `metrics.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Metrics {
    pub steps: Vec<StepMetric>,
    /// Token-weighted eval loss before training (nats).
    pub eval_loss_before: Option<f64>,
    /// Token-weighted eval loss after training (nats).
    pub eval_loss_after: Option<f64>,
    /// Training tokens per second over all steps.
    pub tokens_per_s: f64,
    /// Median seconds per step.
    pub seconds_per_step_median: f64,
    /// Mean seconds per step.
    pub seconds_per_step_mean: f64,
    /// Seconds of each evaluation pass.
    pub eval_seconds: Vec<f64>,
    /// Peak resident set size of the process (bytes), from /proc/self/status `VmHWM`.
    pub peak_rss_bytes: Option<u64>,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Largest size of the optimizer's state during the run (bytes).
    pub optimizer_state_bytes: usize,
    /// Bytes of the projection base weights (f32, or NF4 for QLoRA/QDoRA).
    pub base_weight_bytes: usize,
    /// AdaLoRA: the kept ranks of each module at the end (module path → one bool per rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adalora_rank_pattern: Option<std::collections::BTreeMap<String, Vec<bool>>>,
}

/// Token-weighted mean cross-entropy over all targets of `examples` (eval mode).
/// Errors: the examples hold no target token.
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Llama<B>,
    examples: &[Example],
    batch_size: usize,
) -> Result<f64> {
    evaluate_packed(be, model, examples, batch_size, |c| pack(c.iter()))
}

/// [`evaluate`] with each chunk of `batch_size` examples packed by `pack` (which may tag its
/// sequences, as several adapters trained in one pass need). Errors: as [`evaluate`].
pub(crate) fn evaluate_packed<B: Backend>(
    be: &B,
    model: &Llama<B>,
    examples: &[Example],
    batch_size: usize,
    pack: impl Fn(&[Example]) -> Result<PackedBatch>,
) -> Result<f64> {
    let mut sum = 0.0;
    let mut count = 0usize;
    for chunk in examples.chunks(batch_size.max(1)) {
        let batch = pack(chunk)?;
        let (s, n) = model.loss(be, &batch)?;
        sum += s;
        count += n;
    }
    if count == 0 {
        return Err(Error::Data("evaluation set has no target token".into()));
    }
    Ok(sum / count as f64)
}

pub(crate) fn pack<'a>(examples: impl Iterator<Item = &'a Example>) -> Result<PackedBatch> {
    PackedBatch::from_examples(examples.map(|e| (&e.input_ids[..], &e.labels[..])))
}

/// Method-specific work around each optimizer step (AdaLoRA's regularizer and rank
/// allocator). The default methods do nothing. A hook should keep its work on the device: the
/// trainer reads back one thing per step, the loss (with the regularizer's value).
pub trait StepHook<B: Backend> {
    /// Before the update: may add regularizer gradients into `grads` (named `names`, the
    /// model's trainable order); returns the regularizer's value as a device tensor `[1]`,
    /// which the trainer adds to the loss, reading both back together (or `None`: no
    /// regularizer).
    fn before_update(
        &mut self,
        _be: &B,
        _step: usize,
        _model: &Llama<B>,
        _names: &[String],
        _grads: &mut [Tensor<B>],
    ) -> Result<Option<Tensor<B>>> {
        Ok(None)
    }
    /// After the update, with the gradients of this step.
    fn after_update(
        &mut self,
        _be: &B,
        _step: usize,
        _model: &mut Llama<B>,
        _names: &[String],
        _grads: &[Tensor<B>],
    ) -> Result<()> {
        Ok(())
    }
}

/// The hook that does nothing (LoRA, DoRA, VeRA, full fine-tuning).
pub struct NoHook;
impl<B: Backend> StepHook<B> for NoHook {}

/// Trains the model's trainable tensors on `train`, evaluating on `eval` before and after
/// (skipped when `eval` is empty). `on_step` sees each step as it ends (for a progress bar).
/// Errors: invalid config, an empty training set, a non-finite loss.
pub fn train<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    train: &[Example],
    eval: &[Example],
    cfg: &TrainConfig,
    on_step: impl FnMut(&StepMetric),
) -> Result<Metrics> {
    train_with(be, model, train, eval, cfg, on_step, &mut NoHook)
}

/// [`train`] with a method hook around each optimizer step.
pub fn train_with<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    train: &[Example],
    eval: &[Example],
    cfg: &TrainConfig,
    on_step: impl FnMut(&StepMetric),
    hook: &mut dyn StepHook<B>,
) -> Result<Metrics> {
    preflight(model, cfg, train.len())?;
    let mut metrics = Metrics::default();
    if !eval.is_empty() {
        let t = Instant::now();
        metrics.eval_loss_before = Some(evaluate(be, model, eval, cfg.eval_batch_size)?);
        metrics.eval_seconds.push(t.elapsed().as_secs_f64());
    }
    let mut sft = |be: &B, model: &mut Llama<B>, picked: &[&Example]| {
        let batch = pack(picked.iter().copied())?;
        let out = model.loss_and_grads_deferred(be, &batch)?;
        Ok(ObjectiveStep {
            grads: out.grads,
            loss: StepLoss::CrossEntropy {
                stats: out.loss_stats,
                n_targets: out.n_targets,
            },
            tokens: batch.n_tokens(),
            targets: out.n_targets,
            logs: BTreeMap::new(),
        })
    };
    let fitted = fit(be, model, train, cfg, on_step, hook, &mut sft)?;
    if !eval.is_empty() {
        let t = Instant::now();
        metrics.eval_loss_after = Some(evaluate(be, model, eval, cfg.eval_batch_size)?);
        metrics.eval_seconds.push(t.elapsed().as_secs_f64());
    }
    fitted.into_metrics(model, &mut metrics);
    Ok(metrics)
}

/// What every run checks before it evaluates or trains: the config, a non-empty training set,
/// something to train, and full fine-tuning when gradual unfreezing is asked for.
fn preflight<B: Backend>(model: &Llama<B>, cfg: &TrainConfig, n_train: usize) -> Result<()> {
    cfg.validate()?;
    if n_train == 0 {
        return Err(Error::Data("training set is empty".into()));
    }
    if cfg.unfreeze_every.is_some() && model.full_finetune.is_none() {
        return Err(Error::arg(
            "unfreeze_every",
            "gradual unfreezing needs full fine-tuning",
        ));
    }
    if model.n_trainable() == 0 {
        return Err(Error::arg(
            "model",
            "no trainable parameter (no adapter attached)",
        ));
    }
    Ok(())
}

/// Runs `evaluate` when there is an eval split (`has_eval`), files its `loss` as the run's eval
/// loss before training (or after, with `after`) and its seconds in `m`, and returns the logged
/// values (`None` without an eval split). For objectives whose eval is more than a loss (DPO's
/// rewards, a reward model's accuracy).
pub fn timed_eval(
    m: &mut Metrics,
    after: bool,
    has_eval: bool,
    evaluate: impl FnOnce() -> Result<BTreeMap<String, f64>>,
) -> Result<Option<BTreeMap<String, f64>>> {
    if !has_eval {
        return Ok(None);
    }
    let t = Instant::now();
    let values = evaluate()?;
    let loss = values.get("loss").copied();
    if after {
        m.eval_loss_after = loss;
    } else {
        m.eval_loss_before = loss;
    }
    m.eval_seconds.push(t.elapsed().as_secs_f64());
    Ok(Some(values))
}

/// The loss of one step as an objective returns it to [`fit`].
pub enum StepLoss<B: Backend> {
    /// Already on the host (DPO, reward models: their step reads log-probabilities back).
    Host(f64),
    /// Cross-entropy statistics still on the device (see [`Backend::cross_entropy_stats`]):
    /// the loss is their sum over `n_targets`, read back with the hook's regularizer.
    CrossEntropy { stats: Tensor<B>, n_targets: usize },
}

/// What one forward + backward of an objective gives [`fit`].
pub struct ObjectiveStep<B: Backend> {
    /// Gradients of the loss, in the order of [`Llama::trainable_params`].
    pub grads: Vec<Tensor<B>>,
    pub loss: StepLoss<B>,
    /// Tokens the step ran and target tokens it scored.
    pub tokens: usize,
    pub targets: usize,
    /// Extra per-step values ([`StepMetric::logs`]).
    pub logs: BTreeMap<String, f64>,
}

/// An objective: forward + backward over the step's items.
pub type Objective<'a, B, T> = dyn FnMut(&B, &mut Llama<B>, &[&T]) -> Result<ObjectiveStep<B>> + 'a;

/// What [`fit`] did.
pub struct Fitted {
    pub steps: Vec<StepMetric>,
    pub optimizer_state_bytes: usize,
}

impl Fitted {
    /// Fills `m` with the steps, their throughput and the model's sizes.
    pub fn into_metrics<B: Backend>(self, model: &Llama<B>, m: &mut Metrics) {
        let trainable = model.n_trainable();
        m.trainable_params = trainable;
        // Full fine-tuning trains base tensors: count them once.
        m.total_params = model.n_base_params()
            + if model.full_finetune.is_some() {
                0
            } else {
                trainable
            };
        m.optimizer_state_bytes = self.optimizer_state_bytes;
        let secs: Vec<f64> = self.steps.iter().map(|s| s.seconds).collect();
        let total: f64 = secs.iter().sum();
        let tokens: usize = self.steps.iter().map(|s| s.tokens).sum();
        m.tokens_per_s = tokens as f64 / total.max(1e-9);
        m.seconds_per_step_mean = total / secs.len().max(1) as f64;
        m.seconds_per_step_median = median(&secs);
        m.steps = self.steps;
        m.peak_rss_bytes = peak_rss_bytes();
        m.base_weight_bytes = model.base_weight_bytes();
    }
}

/// The optimization loop every objective shares: `cfg.steps` AdamW steps with the linear
/// warmup/decay schedule, each over `cfg.batch_size` items of `train` taken in the seeded
/// order ([`shuffled_order`], one permutation per epoch), the method's `hook` around each
/// update, gradual unfreezing when `cfg.unfreeze_every` is set. `objective` runs the forward
/// and backward of a step. Errors: an invalid config, an empty `train`, a model with nothing
/// to train, a non-finite loss, the objective's.
pub fn fit<B: Backend, T>(
    be: &B,
    model: &mut Llama<B>,
    train: &[T],
    cfg: &TrainConfig,
    mut on_step: impl FnMut(&StepMetric),
    hook: &mut dyn StepHook<B>,
    objective: &mut Objective<'_, B, T>,
) -> Result<Fitted> {
    preflight(model, cfg, train.len())?;
    if let Some(f) = model
        .full_finetune
        .as_mut()
        .filter(|_| cfg.unfreeze_every.is_some())
    {
        f.trainable_from = model.layers.len().saturating_sub(1);
    }
    let mut opt = AdamW::new((cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay)?;
    let sched = LinearWarmupDecay {
        peak_lr: cfg.lr,
        warmup_steps: cfg.warmup_steps,
        total_steps: cfg.steps,
    };
    let mut fitted = Fitted {
        steps: Vec::with_capacity(cfg.steps),
        optimizer_state_bytes: 0,
    };
    let mut epoch = 0u64;
    let mut order = shuffled_order(train.len(), cfg.seed, epoch);
    let mut cursor = 0usize;
    let n_layers = model.layers.len();
    for step in 0..cfg.steps {
        let t0 = Instant::now();
        if let (Some(every), Some(f)) = (cfg.unfreeze_every, model.full_finetune.as_mut()) {
            f.trainable_from = n_layers.saturating_sub(1 + step / every);
        }
        let mut picked = Vec::with_capacity(cfg.batch_size);
        while picked.len() < cfg.batch_size {
            if cursor == order.len() {
                epoch += 1;
                order = shuffled_order(train.len(), cfg.seed, epoch);
                cursor = 0;
            }
            picked.push(&train[order[cursor]]);
            cursor += 1;
        }
        let mut out = objective(be, model, &picked)?;
        let names: Vec<String> = model
            .trainable_params()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let reg = hook.before_update(be, step, model, &names, &mut out.grads)?;
        // The step's one readback: the loss statistics and the regularizer together.
        let mut wanted = Vec::new();
        if let StepLoss::CrossEntropy { stats, .. } = &out.loss {
            wanted.push(stats);
        }
        wanted.extend(reg.as_ref());
        let mut host = be.download_many(&wanted)?.into_iter();
        let mut loss = match out.loss {
            StepLoss::Host(l) => l,
            StepLoss::CrossEntropy { n_targets, .. } => {
                let stats = host.next().unwrap_or_default();
                cross_entropy_loss(&stats) / n_targets as f64
            }
        };
        if let Some(r) = host.next().and_then(|v| v.first().copied()) {
            loss += r as f64;
        }
        if !loss.is_finite() {
            return Err(Error::Data(format!("loss became {loss} at step {step}")));
        }
        let lr = sched.lr(step);
        opt.step(be, &names, model.trainable_params_mut(), &out.grads, lr)?;
        hook.after_update(be, step, model, &names, &out.grads)?;
        fitted.optimizer_state_bytes = fitted.optimizer_state_bytes.max(opt.state_bytes());
        let m = StepMetric {
            step,
            loss,
            lr,
            tokens: out.tokens,
            targets: out.targets,
            seconds: t0.elapsed().as_secs_f64(),
            logs: out.logs,
        };
        on_step(&m);
        fitted.steps.push(m);
    }
    Ok(fitted)
}

/// Median of a non-empty slice (mean of the middle two for even lengths); 0 when empty.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`); `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
