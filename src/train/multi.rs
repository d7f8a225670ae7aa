//! Several LoRA adapters trained in one process and one pass (mLoRA / ASPEN's BatchLoRA; no
//! serving kernel of Punica, S-LoRA or vLLM trains): each step's batch is the union of the K
//! adapters' batches, every sequence tagged with its adapter, so the frozen base weights are
//! read once per step for all K ([`crate::model::multi::MultiLora`]).
//!
//! Each adapter keeps everything a run of its own has: its recipe (r, alpha, rsLoRA, target
//! modules, init seed), its data in its own seeded order, its learning rate, schedule and
//! AdamW state, its loss (the mean over its own target tokens: the union's loss is the sum of
//! the K means, whose gradient with respect to adapter k is its own mean's) and its eval
//! split. So each adapter ends where it ends when trained alone by [`recipe::run`] with the
//! same recipe and data, up to float summation order.

use crate::backend::{Axis, Backend, cross_entropy_loss};
use crate::error::{Error, Result};
use crate::model::inject::AdapterSet;
use crate::model::llama::{Llama, PackedBatch};
use crate::model::multi::MultiLora;
use crate::train::data::{Example, shuffled_order};
use crate::train::optim::AdamW;
use crate::train::recipe::{self, Method, Recipe};
use crate::train::schedule::LinearWarmupDecay;
use crate::train::trainer::{Metrics, StepMetric, evaluate_packed, median, peak_rss_bytes};
use std::time::Instant;

/// One adapter of a multi-adapter run.
#[derive(Clone, Debug)]
pub struct MultiSpec {
    /// Its name (its output folder's, and the `<name>` of its tensors while training).
    pub name: String,
    /// Its recipe: `Method::Lora` (rsLoRA through `lora.use_rslora`); r, alpha, targets, seed,
    /// and its training config (steps, batch size, lr, warmup, betas, data-order seed).
    pub recipe: Recipe,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
}

/// What a multi-adapter run gives back per adapter: its metrics and its trained adapter.
#[derive(Debug)]
pub struct MultiResult<B: Backend> {
    pub name: String,
    pub metrics: Metrics,
    pub adapter: AdapterSet<B>,
}

/// Each adapter's place in a step: its picked examples, data order, optimizer and schedule.
struct Lane<'a, B: Backend> {
    spec: &'a MultiSpec,
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
    opt: AdamW<B>,
    sched: LinearWarmupDecay,
    steps: Vec<StepMetric>,
    opt_bytes: usize,
}

impl<'a, B: Backend> Lane<'a, B> {
    /// The next `batch_size` examples in the adapter's seeded order (as
    /// [`crate::train::trainer::fit`] takes them).
    fn pick(&mut self) -> Vec<&'a Example> {
        let spec: &'a MultiSpec = self.spec;
        let cfg = &spec.recipe.train;
        let train = &spec.train;
        let mut picked = Vec::with_capacity(cfg.batch_size);
        while picked.len() < cfg.batch_size {
            if self.cursor == self.order.len() {
                self.epoch += 1;
                self.order = shuffled_order(train.len(), cfg.seed, self.epoch);
                self.cursor = 0;
            }
            picked.push(&train[self.order[self.cursor]]);
            self.cursor += 1;
        }
        picked
    }
}

/// Packs `groups[k]` (adapter k's examples) into one batch, each sequence tagged with its
/// adapter. Returns the batch and each adapter's target count.
fn pack_tagged(groups: &[(usize, Vec<&Example>)]) -> Result<(PackedBatch, Vec<usize>)> {
    let mut b = PackedBatch::from_examples(
        groups
            .iter()
            .flat_map(|(_, ex)| ex.iter().map(|e| (&e.input_ids[..], &e.labels[..]))),
    )?;
    b.adapter_of_seq = groups
        .iter()
        .flat_map(|(k, ex)| std::iter::repeat_n(*k as i32, ex.len()))
        .collect();
    let mut counts = Vec::with_capacity(groups.len());
    let mut seq = 0usize;
    let mut t = 0usize;
    for (_, ex) in groups {
        let end = b
            .seqs
            .get(seq + ex.len() - 1)
            .map_or(0, |s| s.start + s.len);
        let n = b.target_rows[t..]
            .iter()
            .take_while(|&&r| (r as usize) < end)
            .count();
        counts.push(n);
        t += n;
        seq += ex.len();
    }
    Ok((b, counts))
}

/// Token-weighted mean cross-entropy of adapter k over `examples` (eval mode).
fn evaluate_tagged<B: Backend>(
    be: &B,
    model: &Llama<B>,
    k: usize,
    examples: &[Example],
    batch_size: usize,
) -> Result<f64> {
    evaluate_packed(be, model, examples, batch_size, |c| {
        Ok(pack_tagged(&[(k, c.iter().collect())])?.0)
    })
}

/// Trains the K adapters of `specs` together on `model` (which must hold no adapter): each
/// adapter initialized by its recipe as [`recipe::prepare`] does, then every step one forward
/// and backward over the union of the adapters' batches (an adapter whose `steps` are done
/// drops out), and each adapter's own AdamW update. `on_step(name, metric)` sees each
/// adapter's step (its `seconds` are the whole union step's). Returns each adapter's metrics
/// and trained adapter; the model is left without adapters. Errors: no spec, a repeated name,
/// a recipe that is not LoRA or does not validate, an empty training set, a non-finite loss.
pub fn train_multi<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    specs: &[MultiSpec],
    mut on_step: impl FnMut(&str, &StepMetric),
) -> Result<Vec<MultiResult<B>>> {
    if specs.is_empty() {
        return Err(Error::arg("adapters", "no adapter to train"));
    }
    let mut sets = Vec::with_capacity(specs.len());
    for s in specs {
        let what = |m: String| Error::arg(format!("adapter `{}`", s.name), m);
        s.recipe.validate().map_err(|e| what(e.to_string()))?;
        if s.recipe.method != Method::Lora {
            return Err(what(format!(
                "method {} cannot train with others in one pass (LoRA and rsLoRA can)",
                s.recipe.method.name()
            )));
        }
        if s.train.is_empty() {
            return Err(what("its training set is empty".into()));
        }
        recipe::prepare(be, model, &s.recipe)?;
        sets.push((s.name.clone(), model.take_adapters()));
    }
    model.set_multi_lora(MultiLora::new(sets)?)?;
    let res = run_lanes(be, model, specs, &mut on_step);
    let multi = model.take_multi_lora();
    let metrics = res?;
    let sets = multi
        .ok_or_else(|| Error::arg("model", "the adapters were taken off during training"))?
        .into_sets();
    Ok(sets
        .into_iter()
        .zip(metrics)
        .map(|((name, adapter), metrics)| MultiResult {
            name,
            metrics,
            adapter,
        })
        .collect())
}

fn run_lanes<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    specs: &[MultiSpec],
    on_step: &mut dyn FnMut(&str, &StepMetric),
) -> Result<Vec<Metrics>> {
    let mut metrics: Vec<Metrics> = specs.iter().map(|_| Metrics::default()).collect();
    for (k, s) in specs.iter().enumerate() {
        if !s.eval.is_empty() {
            let t = Instant::now();
            let bs = s.recipe.train.eval_batch_size;
            metrics[k].eval_loss_before = Some(evaluate_tagged(be, model, k, &s.eval, bs)?);
            metrics[k].eval_seconds.push(t.elapsed().as_secs_f64());
        }
    }
    let mut lanes = specs
        .iter()
        .map(|s| {
            let c = &s.recipe.train;
            Ok(Lane {
                spec: s,
                order: shuffled_order(s.train.len(), c.seed, 0),
                cursor: 0,
                epoch: 0,
                opt: AdamW::new((c.beta1, c.beta2), c.eps, c.weight_decay)?,
                sched: LinearWarmupDecay {
                    peak_lr: c.lr,
                    warmup_steps: c.warmup_steps,
                    total_steps: c.steps,
                },
                steps: Vec::with_capacity(c.steps),
                opt_bytes: 0,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let counts = model
        .multi_lora
        .as_ref()
        .map(MultiLora::param_counts)
        .unwrap_or_default();
    let names: Vec<String> = model
        .trainable_params()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let total_steps = specs
        .iter()
        .map(|s| s.recipe.train.steps)
        .max()
        .unwrap_or(0);
    for step in 0..total_steps {
        let t0 = Instant::now();
        let groups: Vec<(usize, Vec<&Example>)> = lanes
            .iter_mut()
            .enumerate()
            .filter(|(_, l)| step < l.spec.recipe.train.steps)
            .map(|(k, l)| (k, l.pick()))
            .collect();
        let (batch, n_of) = pack_tagged(&groups)?;
        if let Some(g) = groups.iter().zip(&n_of).find(|(_, n)| **n == 0) {
            return Err(Error::Data(format!(
                "adapter `{}`: step {step}'s batch has no target token",
                specs[g.0.0].name
            )));
        }
        // Each target weighs 1 / (its adapter's target count): the sum of the K means.
        let weights: Vec<f32> = n_of
            .iter()
            .flat_map(|&n| std::iter::repeat_n(1.0 / n as f32, n))
            .collect();
        let w = be.upload(&weights, &[weights.len()])?;
        let (grads, stats) =
            model.grads_from_head(be, &batch, &batch.target_rows, |hn, trained| {
                let logits = be.linear(hn, model.head(), None)?;
                let (stats, dlogits) =
                    be.cross_entropy_stats(&logits, &batch.target_labels, 1.0)?;
                drop(logits);
                let dlogits = be.mul_vector(&dlogits, &w, Axis::Rows)?;
                Ok((model.lm_head_backward(be, hn, &dlogits, trained)?, stats))
            })?;
        let stats = be.download(&stats)?;
        // Split the gradients, the parameters and the statistics by adapter.
        let mut params = model.trainable_params_mut();
        let mut grads = grads.into_iter();
        let mut names_it = names.iter();
        let mut row = 0usize;
        let mut done = Vec::new();
        let mut per_group = groups.iter().zip(&n_of).peekable();
        for (k, (lane, &count)) in lanes.iter_mut().zip(&counts).enumerate() {
            let p: Vec<_> = params.drain(..count).collect();
            let g: Vec<_> = grads.by_ref().take(count).collect();
            let nm: Vec<String> = names_it.by_ref().take(count).cloned().collect();
            let Some(((_, picked), &n)) = per_group.next_if(|((gk, _), _)| *gk == k) else {
                continue;
            };
            let loss = cross_entropy_loss(&stats[3 * row..3 * (row + n)]) / n as f64;
            row += n;
            if !loss.is_finite() {
                return Err(Error::Data(format!(
                    "adapter `{}`: loss became {loss} at step {step}",
                    lane.spec.name
                )));
            }
            let lr = lane.sched.lr(step);
            lane.opt.step(be, &nm, p, &g, lr)?;
            lane.opt_bytes = lane.opt_bytes.max(lane.opt.state_bytes());
            done.push((
                k,
                StepMetric {
                    step,
                    loss,
                    lr,
                    tokens: picked.iter().map(|e| e.input_ids.len()).sum(),
                    targets: n,
                    seconds: 0.0,
                    logs: Default::default(),
                },
            ));
        }
        // Every adapter's step is the whole union step.
        let step_secs = t0.elapsed().as_secs_f64();
        for (k, mut m) in done {
            m.seconds = step_secs;
            on_step(&lanes[k].spec.name, &m);
            lanes[k].steps.push(m);
        }
    }
    for (k, s) in specs.iter().enumerate() {
        if !s.eval.is_empty() {
            let t = Instant::now();
            let bs = s.recipe.train.eval_batch_size;
            metrics[k].eval_loss_after = Some(evaluate_tagged(be, model, k, &s.eval, bs)?);
            metrics[k].eval_seconds.push(t.elapsed().as_secs_f64());
        }
    }
    let trainable: Vec<usize> = {
        let params = model.trainable_params();
        let mut it = params.iter();
        counts
            .iter()
            .map(|&c| it.by_ref().take(c).map(|(_, t)| t.len()).sum())
            .collect()
    };
    for (k, (m, lane)) in metrics.iter_mut().zip(lanes).enumerate() {
        let secs: Vec<f64> = lane.steps.iter().map(|s| s.seconds).collect();
        let total: f64 = secs.iter().sum();
        let tokens: usize = lane.steps.iter().map(|s| s.tokens).sum();
        m.tokens_per_s = tokens as f64 / total.max(1e-9);
        m.seconds_per_step_mean = total / secs.len().max(1) as f64;
        m.seconds_per_step_median = median(&secs);
        m.steps = lane.steps;
        m.trainable_params = trainable[k];
        m.total_params = model.n_base_params() + trainable[k];
        m.optimizer_state_bytes = lane.opt_bytes;
        m.base_weight_bytes = model.base_weight_bytes();
        m.peak_rss_bytes = peak_rss_bytes();
    }
    Ok(metrics)
}
