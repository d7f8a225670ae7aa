//! Reward models as TRL's RewardTrainer trains them (InstructGPT's step 2, Ouyang et al. 2022
//! §3.5): `LlamaForSequenceClassification(num_labels=1)` scores each sequence at its last
//! token, and the Bradley-Terry loss `mean(-log σ(r_chosen - r_rejected - margin))` (TRL's
//! optional per-pair `margin`, and its `center_rewards_coefficient` term
//! `c mean((r_chosen + r_rejected)²)`, Eisenstein et al. 2023) pulls chosen above rejected. The
//! `score` head trains in full, the body with an adapter or in full.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::heads::SCORE_NAME;
use crate::model::llama::{Llama, PackedBatch};
use crate::train::dpo::{log_sigmoid, pack_pairs, sigmoid};
use crate::train::preference::PreferencePair;
use crate::train::trainer::{
    Metrics, ObjectiveStep, StepHook, StepLoss, StepMetric, TrainConfig, fit, timed_eval,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// TRL `RewardConfig`'s loss setting.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardConfig {
    /// Weight of the term that centres the rewards on zero; `None` (TRL's default) leaves it
    /// out.
    pub center_rewards_coefficient: Option<f64>,
}

impl RewardConfig {
    /// Errors: a negative or non-finite coefficient.
    pub fn validate(&self) -> Result<()> {
        if let Some(c) = self.center_rewards_coefficient
            && !(c.is_finite() && c >= 0.0)
        {
            return Err(Error::arg(
                "center_rewards_coefficient",
                format!("{c} must be a non-negative number"),
            ));
        }
        Ok(())
    }
}

/// The pairwise loss over a batch of pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardBatch {
    /// Mean loss over the pairs.
    pub loss: f64,
    /// d loss / d r of each chosen and each rejected row.
    pub d_chosen: Vec<f64>,
    pub d_rejected: Vec<f64>,
    pub rewards_chosen: Vec<f64>,
    pub rewards_rejected: Vec<f64>,
}

/// The reward model's loss of n pairs from their rewards (`[n]` each) and optional margins,
/// with its gradient. Errors: lengths that differ, no pair.
pub fn reward_loss(
    cfg: &RewardConfig,
    chosen: &[f64],
    rejected: &[f64],
    margins: &[Option<f64>],
) -> Result<RewardBatch> {
    let n = chosen.len();
    if n == 0 {
        return Err(Error::arg("pairs", "no preference pair"));
    }
    if rejected.len() != n || margins.len() != n {
        return Err(Error::arg(
            "rewards",
            "chosen, rejected and margins must cover the same pairs",
        ));
    }
    let c = cfg.center_rewards_coefficient.unwrap_or(0.0);
    let mut out = RewardBatch {
        loss: 0.0,
        d_chosen: Vec::with_capacity(n),
        d_rejected: Vec::with_capacity(n),
        rewards_chosen: chosen.to_vec(),
        rewards_rejected: rejected.to_vec(),
    };
    for i in 0..n {
        let x = chosen[i] - rejected[i] - margins[i].unwrap_or(0.0);
        let sum = chosen[i] + rejected[i];
        out.loss += (-log_sigmoid(x) + c * sum * sum) / n as f64;
        let dx = -sigmoid(-x);
        out.d_chosen.push((dx + 2.0 * c * sum) / n as f64);
        out.d_rejected.push((-dx + 2.0 * c * sum) / n as f64);
    }
    Ok(out)
}

impl RewardBatch {
    /// The logged values: `loss`, `accuracy` (the fraction of pairs whose chosen reward is the
    /// larger, TRL's `compute_accuracy`), `margin` (mean `r_chosen - r_rejected`),
    /// `rewards/chosen`, `rewards/rejected` (means), `min_reward`, `max_reward`.
    pub fn logs(&self) -> BTreeMap<String, f64> {
        let n = self.rewards_chosen.len().max(1) as f64;
        let pairs = self.rewards_chosen.iter().zip(&self.rewards_rejected);
        let acc = pairs.clone().filter(|(c, r)| c > r).count() as f64 / n;
        let margin = pairs.map(|(c, r)| c - r).sum::<f64>() / n;
        let all = self.rewards_chosen.iter().chain(&self.rewards_rejected);
        [
            ("loss", self.loss),
            ("accuracy", acc),
            ("margin", margin),
            (
                "rewards/chosen",
                self.rewards_chosen.iter().sum::<f64>() / n,
            ),
            (
                "rewards/rejected",
                self.rewards_rejected.iter().sum::<f64>() / n,
            ),
            (
                "min_reward",
                all.clone().copied().fold(f64::INFINITY, f64::min),
            ),
            ("max_reward", all.copied().fold(f64::NEG_INFINITY, f64::max)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// The loss and its gradients (in the order of [`Llama::trainable_params`], the score head's
/// last) for a packed batch of pairs ([`pack_pairs`]: chosen rows, then rejected). Errors: a
/// model without a score head, margins of the wrong length, the model's.
pub fn reward_grads<B: Backend>(
    be: &B,
    model: &Llama<B>,
    batch: &PackedBatch,
    margins: &[Option<f64>],
    cfg: &RewardConfig,
) -> Result<(RewardBatch, Vec<crate::backend::Tensor<B>>)> {
    let rows = batch.seqs.len();
    if rows == 0 || !rows.is_multiple_of(2) || margins.len() * 2 != rows {
        return Err(Error::arg(
            "pairs",
            format!(
                "{rows} rows and {} margins: expected 2 rows per pair",
                margins.len()
            ),
        ));
    }
    let n = rows / 2;
    let last = Llama::<B>::last_rows(batch);
    model
        .grads_from_head(be, batch, &last, |hn, _| {
            let r = model.score_rows(be, hn)?;
            let out = reward_loss(cfg, &r[..n], &r[n..], margins)?;
            let d: Vec<f32> = out
                .d_chosen
                .iter()
                .chain(&out.d_rejected)
                .map(|&v| v as f32)
                .collect();
            Ok((model.score_head_backward(be, hn, &d)?, out))
        })
        .map(|(grads, out)| (out, grads))
}

/// The rewards of each pair's chosen and rejected sequence over `pairs`, `batch_size` pairs per
/// forward: `(chosen, rejected)`. Errors: no score head, the model's.
pub fn score_pairs<B: Backend>(
    be: &B,
    model: &Llama<B>,
    pairs: &[PreferencePair],
    batch_size: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut c, mut r) = (Vec::new(), Vec::new());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let (batch, _) = pack_pairs(&refs)?;
        let rw = model.rewards(be, &batch)?;
        c.extend_from_slice(&rw[..chunk.len()]);
        r.extend_from_slice(&rw[chunk.len()..]);
    }
    Ok((c, r))
}

/// The loss and logged values over `pairs` (no gradient). Errors: no pair, as [`score_pairs`].
pub fn evaluate_reward<B: Backend>(
    be: &B,
    model: &Llama<B>,
    pairs: &[PreferencePair],
    batch_size: usize,
    cfg: &RewardConfig,
) -> Result<BTreeMap<String, f64>> {
    let (c, r) = score_pairs(be, model, pairs, batch_size)?;
    let margins: Vec<Option<f64>> = pairs.iter().map(|p| p.margin).collect();
    Ok(reward_loss(cfg, &c, &r, &margins)?.logs())
}

/// What a reward-model run reports (`metrics.json`): the run's [`Metrics`] (per-step `loss`
/// the pairwise loss, `logs` the accuracy and rewards), the eval values before and after.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RewardMetrics {
    #[serde(flatten)]
    pub run: Metrics,
    pub eval_before: Option<BTreeMap<String, f64>>,
    pub eval_after: Option<BTreeMap<String, f64>>,
    pub reward: RewardConfig,
}

/// Trains a reward model: `model` must have its score head ([`Llama::attach_score_head`]) and
/// whatever else trains (an adapter, or full fine-tuning). `cfg.batch_size` pairs per step;
/// `eval` evaluated before and after (skipped when empty). Errors: an invalid config, no
/// pair, no score head, a non-finite loss, the model's.
#[allow(clippy::too_many_arguments)] // train_dpo's shape: model, data, settings, progress, hook
pub fn train_reward<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    train: &[PreferencePair],
    eval: &[PreferencePair],
    cfg: &TrainConfig,
    reward: &RewardConfig,
    on_step: impl FnMut(&StepMetric),
    hook: &mut dyn StepHook<B>,
) -> Result<RewardMetrics> {
    reward.validate()?;
    if model.score.is_none() {
        return Err(Error::arg(
            "score",
            format!("a reward model needs its `{SCORE_NAME}` head"),
        ));
    }
    let mut m = RewardMetrics {
        reward: reward.clone(),
        ..Default::default()
    };
    let has_eval = !eval.is_empty();
    m.eval_before = timed_eval(&mut m.run, false, has_eval, || {
        evaluate_reward(be, model, eval, cfg.eval_batch_size, reward)
    })?;
    let mut objective = |be: &B, model: &mut Llama<B>, picked: &[&PreferencePair]| {
        let (batch, _) = pack_pairs(picked)?;
        let margins: Vec<Option<f64>> = picked.iter().map(|p| p.margin).collect();
        let (out, grads) = reward_grads(be, model, &batch, &margins, reward)?;
        let mut logs = out.logs();
        logs.remove("loss");
        Ok(ObjectiveStep {
            grads,
            loss: StepLoss::Host(out.loss),
            tokens: batch.n_tokens(),
            targets: batch.seqs.len(),
            logs,
        })
    };
    let fitted = fit(be, model, train, cfg, on_step, hook, &mut objective)?;
    m.eval_after = timed_eval(&mut m.run, true, has_eval, || {
        evaluate_reward(be, model, eval, cfg.eval_batch_size, reward)
    })?;
    fitted.into_metrics(model, &mut m.run);
    Ok(m)
}
