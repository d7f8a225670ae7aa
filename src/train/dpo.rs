//! Direct Preference Optimization (Rafailov et al. 2023, eq. 7) as TRL's DPOTrainer computes
//! it: per row the SUM of the completion tokens' log-probabilities (their mean for IPO, as TRL
//! does), the sigmoid loss with TRL's `label_smoothing` (the conservative cDPO of Mitchell 2023)
//! or the IPO loss (Azar et al. 2023), TRL's logged rewards, and the reference model as TRL
//! takes it for a PEFT model: the same model with its adapter disabled, or with the adapter
//! it started from frozen. One forward with the adapter gives the policy's log-probabilities
//! and, through the same saved activations, the gradient: DPO's gradient with respect to a
//! token's logits is the cross-entropy gradient scaled by a per-row weight.

use crate::backend::{Axis, Backend, Tensor, cross_entropy_terms};
use crate::error::{Error, Result};
use crate::model::inject::AdapterSet;
use crate::model::llama::{Llama, PackedBatch};
use crate::train::preference::PreferencePair;
use crate::train::trainer::{
    Metrics, ObjectiveStep, StepHook, StepLoss, StepMetric, TrainConfig, fit, timed_eval,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// TRL's `loss_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// `-log σ(β h)` (with label smoothing ε: `-(1-ε) log σ(β h) - ε log σ(-β h)`), h the
    /// difference of the policy's and the reference's log-ratios.
    #[default]
    Sigmoid,
    /// `(h - 1/(2β))²` over mean (not summed) log-probabilities.
    Ipo,
}

impl DpoLossType {
    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            DpoLossType::Sigmoid => "sigmoid",
            DpoLossType::Ipo => "ipo",
        }
    }
}

impl std::str::FromStr for DpoLossType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sigmoid" => Ok(DpoLossType::Sigmoid),
            "ipo" => Ok(DpoLossType::Ipo),
            other => Err(Error::arg(
                "loss_type",
                format!("unknown DPO loss `{other}`: expected sigmoid or ipo"),
            )),
        }
    }
}

/// DPO's hyperparameters under TRL's `DPOConfig` names; defaults are TRL's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpoConfig {
    /// β: the strength of the KL constraint to the reference (TRL default 0.1).
    pub beta: f64,
    /// ε of the conservative (cDPO) sigmoid loss, the assumed rate of flipped labels, in
    /// `[0, 0.5)`; sigmoid loss only.
    pub label_smoothing: f64,
    pub loss_type: DpoLossType,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            beta: 0.1,
            label_smoothing: 0.0,
            loss_type: DpoLossType::Sigmoid,
        }
    }
}

impl DpoConfig {
    /// Errors: β not positive and finite, ε outside `[0, 0.5)`, ε with the IPO loss.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(Error::arg(
                "beta",
                format!("{} must be positive", self.beta),
            ));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(Error::arg(
                "label_smoothing",
                format!("{} must be in [0, 0.5)", self.label_smoothing),
            ));
        }
        if self.label_smoothing > 0.0 && self.loss_type != DpoLossType::Sigmoid {
            return Err(Error::arg(
                "label_smoothing",
                "label smoothing applies to the sigmoid loss only",
            ));
        }
        Ok(())
    }

    /// Whether a row's log-probability is the mean over its completion tokens (IPO) rather
    /// than the sum.
    pub fn mean_logps(&self) -> bool {
        self.loss_type == DpoLossType::Ipo
    }
}

/// DPO over a batch of pairs, from the rows' log-probabilities.
#[derive(Clone, Debug, PartialEq)]
pub struct DpoBatch {
    /// Mean loss over the pairs.
    pub loss: f64,
    /// d loss / d (policy log-probability of each chosen row), and of each rejected row.
    pub d_chosen: Vec<f64>,
    pub d_rejected: Vec<f64>,
    /// TRL's implicit rewards `β (policy - reference)` of each chosen and rejected row.
    pub rewards_chosen: Vec<f64>,
    pub rewards_rejected: Vec<f64>,
    /// The policy's log-probabilities of each chosen and rejected row.
    pub logps_chosen: Vec<f64>,
    pub logps_rejected: Vec<f64>,
}

/// `log σ(x)`, stable for large |x|.
pub(crate) fn log_sigmoid(x: f64) -> f64 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

/// `σ(x)`, stable for large |x|.
pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The DPO loss of n pairs from the policy's and the reference's log-probabilities of the
/// chosen and rejected rows (each `[n]`), with its gradient with respect to the policy's.
/// Errors: slices of different lengths, no pair.
pub fn dpo_loss(
    cfg: &DpoConfig,
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    reference_chosen: &[f64],
    reference_rejected: &[f64],
) -> Result<DpoBatch> {
    let n = policy_chosen.len();
    if n == 0 {
        return Err(Error::arg("pairs", "no preference pair"));
    }
    if [policy_rejected, reference_chosen, reference_rejected]
        .iter()
        .any(|v| v.len() != n)
    {
        return Err(Error::arg(
            "logps",
            "the policy's and the reference's log-probabilities must cover the same pairs",
        ));
    }
    let (beta, eps) = (cfg.beta, cfg.label_smoothing);
    let mut out = DpoBatch {
        loss: 0.0,
        d_chosen: Vec::with_capacity(n),
        d_rejected: Vec::with_capacity(n),
        rewards_chosen: Vec::with_capacity(n),
        rewards_rejected: Vec::with_capacity(n),
        logps_chosen: policy_chosen.to_vec(),
        logps_rejected: policy_rejected.to_vec(),
    };
    for i in 0..n {
        let h =
            (policy_chosen[i] - policy_rejected[i]) - (reference_chosen[i] - reference_rejected[i]);
        let (loss, dh) = match cfg.loss_type {
            DpoLossType::Sigmoid => (
                -(1.0 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h),
                -beta * (1.0 - eps) * sigmoid(-beta * h) + beta * eps * sigmoid(beta * h),
            ),
            DpoLossType::Ipo => {
                let d = h - 1.0 / (2.0 * beta);
                (d * d, 2.0 * d)
            }
        };
        out.loss += loss / n as f64;
        out.d_chosen.push(dh / n as f64);
        out.d_rejected.push(-dh / n as f64);
        out.rewards_chosen
            .push(beta * (policy_chosen[i] - reference_chosen[i]));
        out.rewards_rejected
            .push(beta * (policy_rejected[i] - reference_rejected[i]));
    }
    Ok(out)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

impl DpoBatch {
    /// TRL's logged values: `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`
    /// (the fraction of pairs whose chosen reward is the larger), `rewards/margins`,
    /// `logps/chosen`, `logps/rejected` (means over the pairs).
    pub fn logs(&self) -> BTreeMap<String, f64> {
        let margins: Vec<f64> = self
            .rewards_chosen
            .iter()
            .zip(&self.rewards_rejected)
            .map(|(c, r)| c - r)
            .collect();
        let acc: Vec<f64> = margins
            .iter()
            .map(|&m| f64::from(u8::from(m > 0.0)))
            .collect();
        [
            ("loss", self.loss),
            ("rewards/chosen", mean(&self.rewards_chosen)),
            ("rewards/rejected", mean(&self.rewards_rejected)),
            ("rewards/accuracies", mean(&acc)),
            ("rewards/margins", mean(&margins)),
            ("logps/chosen", mean(&self.logps_chosen)),
            ("logps/rejected", mean(&self.logps_rejected)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// The pairs as one packed batch, TRL's concatenated layout: rows `0..n` prompt + chosen, rows
/// `n..2n` prompt + rejected. Returns it with each row's number of target tokens.
pub fn pack_pairs(pairs: &[&PreferencePair]) -> Result<(PackedBatch, Vec<usize>)> {
    let rows: Vec<_> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let counts = rows.iter().map(|e| e.n_targets()).collect();
    let batch = PackedBatch::from_examples(rows.iter().map(|e| (&e.input_ids[..], &e.labels[..])))?;
    Ok((batch, counts))
}

/// Each row's log-probability from the cross-entropy statistics of its targets
/// ([`Backend::cross_entropy_stats`], rows' targets in order, `counts[r]` of row r): the sum
/// of `logit(label) - max - ln Σ exp(logit - max)` over its targets, or their mean.
pub fn row_logps(stats: &[f32], counts: &[usize], mean_over_tokens: bool) -> Vec<f64> {
    let mut tok = cross_entropy_terms(stats).map(|ce| -ce);
    counts
        .iter()
        .map(|&c| {
            let sum: f64 = tok.by_ref().take(c).sum();
            if mean_over_tokens {
                sum / c.max(1) as f64
            } else {
                sum
            }
        })
        .collect()
}

/// The model's log-probability of each row's targets (no gradient; [`row_logps`]). Errors: a
/// batch without targets, the backend's.
pub fn sequence_logps<B: Backend>(
    be: &B,
    model: &Llama<B>,
    batch: &PackedBatch,
    counts: &[usize],
    mean_over_tokens: bool,
) -> Result<Vec<f64>> {
    if batch.n_targets() == 0 {
        return Err(Error::Data("batch has no target token".into()));
    }
    let logits = model.logits_at(be, batch, &batch.target_rows)?;
    let (stats, _) = be.cross_entropy_stats(&logits, &batch.target_labels, 0.0)?;
    Ok(row_logps(&be.download(&stats)?, counts, mean_over_tokens))
}

/// The reference model of DPO.
pub enum Reference<B: Backend> {
    /// The policy's own model with these adapters in its adapters' place: none
    /// ([`AdapterSet::none`]) for the base model (TRL's default for a PEFT model: the adapter
    /// disabled), or a frozen copy of the adapter training started from.
    Adapters(Box<AdapterSet<B>>),
    /// A separate frozen model (full fine-tuning: a copy of the starting weights).
    Model(Box<Llama<B>>),
}

impl<B: Backend> Reference<B> {
    /// The base model under `model`'s adapters (PEFT's `disable_adapter()`): TRL's default
    /// reference for a PEFT model trained from scratch.
    pub fn base_of(model: &Llama<B>) -> Self {
        Reference::Adapters(Box::new(AdapterSet::none(model.layers.len())))
    }

    /// `model`'s adapters as they are now, frozen (a copy): the reference when training starts
    /// from a trained (SFT) adapter, as TRL takes a PEFT model handed to it.
    pub fn frozen_adapters_of(model: &mut Llama<B>) -> Result<Self> {
        let set = model.take_adapters();
        let copy = set.clone();
        model.put_adapters(set)?;
        Ok(Reference::Adapters(Box::new(copy)))
    }

    /// A frozen copy of the whole model (full fine-tuning).
    pub fn copy_of(model: &Llama<B>) -> Self {
        Reference::Model(Box::new(model.clone()))
    }

    /// The reference's log-probabilities of each row of `batch` (see [`sequence_logps`]);
    /// `policy` is borrowed to run with the reference's adapters and left as it was.
    pub fn logps(
        &mut self,
        be: &B,
        policy: &mut Llama<B>,
        batch: &PackedBatch,
        counts: &[usize],
        mean_over_tokens: bool,
    ) -> Result<Vec<f64>> {
        match self {
            Reference::Adapters(set) => policy.with_adapters(set, |m| {
                sequence_logps(be, m, batch, counts, mean_over_tokens)
            }),
            Reference::Model(m) => sequence_logps(be, m, batch, counts, mean_over_tokens),
        }
    }

    /// What it costs besides the policy: the frozen copy's bytes (f32), or 0.
    pub fn extra_bytes(&self) -> usize {
        match self {
            Reference::Adapters(_) => 0,
            Reference::Model(m) => 4 * (m.n_base_params()),
        }
    }

    /// Names it for the metrics: `base (adapter disabled)`, `starting adapter (frozen)` or
    /// `frozen copy of the model`.
    pub fn describe(&self) -> &'static str {
        match self {
            Reference::Adapters(s) if s.is_empty() => "base model (adapter disabled)",
            Reference::Adapters(_) => "the starting adapter, frozen",
            Reference::Model(_) => "frozen copy of the starting model",
        }
    }
}

/// The reference log-probabilities of the pairs, kept with them (`--precompute-ref`):
/// computed once, `batch_size` pairs at a time. Errors: as [`Reference::logps`].
pub fn precompute_reference<B: Backend>(
    be: &B,
    policy: &mut Llama<B>,
    reference: &mut Reference<B>,
    pairs: &mut [PreferencePair],
    batch_size: usize,
    cfg: &DpoConfig,
) -> Result<()> {
    for chunk in pairs.chunks_mut(batch_size.max(1)) {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let (batch, counts) = pack_pairs(&refs)?;
        let lp = reference.logps(be, policy, &batch, &counts, cfg.mean_logps())?;
        let n = chunk.len();
        for (i, p) in chunk.iter_mut().enumerate() {
            p.reference = Some((lp[i], lp[n + i]));
        }
    }
    Ok(())
}

/// The reference log-probabilities of the pairs' rows (chosen rows, then rejected): the
/// precomputed ones when every pair has them, else computed now.
fn reference_logps<B: Backend>(
    be: &B,
    policy: &mut Llama<B>,
    reference: &mut Reference<B>,
    pairs: &[&PreferencePair],
    batch: &PackedBatch,
    counts: &[usize],
    cfg: &DpoConfig,
) -> Result<Vec<f64>> {
    match pairs
        .iter()
        .map(|p| p.reference)
        .collect::<Option<Vec<_>>>()
    {
        Some(pre) => Ok(pre
            .iter()
            .map(|r| r.0)
            .chain(pre.iter().map(|r| r.1))
            .collect()),
        None => reference.logps(be, policy, batch, counts, cfg.mean_logps()),
    }
}

/// DPO's loss and its gradients (in the order of [`Llama::trainable_params`]) for a packed
/// batch of pairs ([`pack_pairs`]) given the reference's log-probabilities of its rows: one
/// forward, whose log-probabilities set each row's weight `-d loss / d logp`, and one backward
/// of the so-weighted cross-entropy. Errors: `reference` or `counts` of the wrong length, the
/// model's.
pub fn dpo_grads<B: Backend>(
    be: &B,
    model: &Llama<B>,
    batch: &PackedBatch,
    counts: &[usize],
    reference: &[f64],
    cfg: &DpoConfig,
) -> Result<(DpoBatch, Vec<Tensor<B>>)> {
    let rows = counts.len();
    if rows == 0 || !rows.is_multiple_of(2) || reference.len() != rows || rows != batch.seqs.len() {
        return Err(Error::arg(
            "pairs",
            format!(
                "{rows} row counts and {} reference values for a batch of {} rows: expected \
                 2 per pair",
                reference.len(),
                batch.seqs.len()
            ),
        ));
    }
    if counts.iter().sum::<usize>() != batch.n_targets() || counts.contains(&0) {
        return Err(Error::arg(
            "counts",
            "every row needs targets, and the counts must add up to the batch's",
        ));
    }
    let n = rows / 2;
    let mean = cfg.mean_logps();
    model
        .grads_from_head(be, batch, &batch.target_rows, |hn, trained| {
            let logits = be.linear(hn, model.head(), None)?;
            let (stats, dlogits) = be.cross_entropy_stats(&logits, &batch.target_labels, 1.0)?;
            drop(logits);
            let pol = row_logps(&be.download(&stats)?, counts, mean);
            let out = dpo_loss(cfg, &pol[..n], &pol[n..], &reference[..n], &reference[n..])?;
            // d loss / d logits = (d loss / d logp_row) (onehot - softmax) = w (softmax - onehot)
            // with w = -d loss / d logp_row (divided by the row's length for a mean).
            let d_row = out.d_chosen.iter().chain(&out.d_rejected);
            let mut w = Vec::with_capacity(batch.n_targets());
            for (&c, &d) in counts.iter().zip(d_row) {
                let per = if mean { -d / c as f64 } else { -d };
                w.extend(std::iter::repeat_n(per as f32, c));
            }
            let w = be.upload(&w, &[w.len()])?;
            let dlogits = be.mul_vector(&dlogits, &w, Axis::Rows)?;
            Ok((model.lm_head_backward(be, hn, &dlogits, trained)?, out))
        })
        .map(|(grads, out)| (out, grads))
}

/// DPO's loss and logged values over `pairs` (no gradient), `batch_size` pairs per forward,
/// averaged over the pairs. Errors: no pair, the model's.
pub fn evaluate_dpo<B: Backend>(
    be: &B,
    policy: &mut Llama<B>,
    reference: &mut Reference<B>,
    pairs: &[PreferencePair],
    batch_size: usize,
    cfg: &DpoConfig,
) -> Result<BTreeMap<String, f64>> {
    let (mut pc, mut pr, mut rc, mut rr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let (batch, counts) = pack_pairs(&refs)?;
        let r = reference_logps(be, policy, reference, &refs, &batch, &counts, cfg)?;
        let p = sequence_logps(be, policy, &batch, &counts, cfg.mean_logps())?;
        let n = chunk.len();
        pc.extend_from_slice(&p[..n]);
        pr.extend_from_slice(&p[n..]);
        rc.extend_from_slice(&r[..n]);
        rr.extend_from_slice(&r[n..]);
    }
    Ok(dpo_loss(cfg, &pc, &pr, &rc, &rr)?.logs())
}

/// What a DPO run reports (`metrics.json`): the run's [`Metrics`] (per-step `loss` is the DPO
/// loss, each step's `logs` TRL's rewards and log-probabilities; `eval_loss_*` the eval DPO
/// loss), the eval values before and after, and the settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DpoMetrics {
    #[serde(flatten)]
    pub run: Metrics,
    pub eval_before: Option<BTreeMap<String, f64>>,
    pub eval_after: Option<BTreeMap<String, f64>>,
    pub dpo: DpoConfig,
    /// What the reference model was ([`Reference::describe`]).
    pub reference: String,
    /// Bytes the reference needs besides the policy (a frozen copy for full fine-tuning).
    pub reference_bytes: usize,
    pub precompute_ref: bool,
}

/// Trains `model`'s trainable tensors with DPO on `train` pairs (`cfg.batch_size` pairs per
/// step, TRL's order-independent mean over pairs), evaluating on `eval` before and after
/// (skipped when empty). With `precompute_ref`, the reference log-probabilities of every pair
/// are computed once first ([`precompute_reference`]); otherwise each step runs the reference
/// forward. Errors: an invalid config, no pair, nothing to train, a non-finite loss, the
/// model's.
#[allow(clippy::too_many_arguments)]
pub fn train_dpo<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    reference: &mut Reference<B>,
    train: &mut [PreferencePair],
    eval: &mut [PreferencePair],
    cfg: &TrainConfig,
    dpo: &DpoConfig,
    precompute_ref: bool,
    on_step: impl FnMut(&StepMetric),
    hook: &mut dyn StepHook<B>,
) -> Result<DpoMetrics> {
    dpo.validate()?;
    cfg.validate()?;
    if train.is_empty() {
        return Err(Error::Data("no preference pair to train on".into()));
    }
    let mut m = DpoMetrics {
        dpo: dpo.clone(),
        reference: reference.describe().into(),
        reference_bytes: reference.extra_bytes(),
        precompute_ref,
        ..Default::default()
    };
    if precompute_ref {
        precompute_reference(be, model, reference, train, cfg.eval_batch_size, dpo)?;
        precompute_reference(be, model, reference, eval, cfg.eval_batch_size, dpo)?;
    }
    let has_eval = !eval.is_empty();
    m.eval_before = timed_eval(&mut m.run, false, has_eval, || {
        evaluate_dpo(be, model, reference, eval, cfg.eval_batch_size, dpo)
    })?;
    let mut objective = |be: &B, model: &mut Llama<B>, picked: &[&PreferencePair]| {
        let (batch, counts) = pack_pairs(picked)?;
        let refs = reference_logps(be, model, reference, picked, &batch, &counts, dpo)?;
        let (out, grads) = dpo_grads(be, model, &batch, &counts, &refs, dpo)?;
        let mut logs = out.logs();
        logs.remove("loss");
        Ok(ObjectiveStep {
            grads,
            loss: StepLoss::Host(out.loss),
            tokens: batch.n_tokens(),
            targets: batch.n_targets(),
            logs,
        })
    };
    let fitted = fit(be, model, &*train, cfg, on_step, hook, &mut objective)?;
    m.eval_after = timed_eval(&mut m.run, true, has_eval, || {
        evaluate_dpo(be, model, reference, eval, cfg.eval_batch_size, dpo)
    })?;
    fitted.into_metrics(model, &mut m.run);
    Ok(m)
}
