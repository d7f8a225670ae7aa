//! AdaLoRA's rank allocator and orthogonal regulariser, with the behaviour of PEFT 0.21.2
//! (`peft/tuners/adalora/layer.py::RankAllocator`, `model.py::AdaLoraModel.update_and_allocate`
//! and `AdaLoraModel.forward`, `config.py::AdaLoraConfig`).
//!
//! Paper: Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
//! (AdaLoRA, arXiv 2303.10512). Section 3 defines the SVD-form update `P Λ Q` (our `lora_B`,
//! `lora_E`, `lora_A`) and the orthogonality regulariser `R(P, Q)`; section 4 defines the
//! importance score of a triplet `(P_{*i}, λ_i, Q_{i*})` from the smoothed sensitivity and its
//! uncertainty, and the cubic budget schedule.
//!
//! Everything here is host-side math on plain `&[f32]` slices (the values and gradients of
//! `lora_A [r, in]`, `lora_B [out, r]`, `lora_E [r, 1]` of each layer, row-major), so it works
//! with any backend: download, allocate, upload the masked `lora_E`. It is also the reference
//! of the allocator kernels of [`crate::backend::Backend`] (the CPU backend's
//! `backend::cpu::adalora`, whose reference math this runs), which [`crate::adapter::device_rank_allocator`] drives so that training reads
//! nothing back for AdaLoRA.
//!
//! # What PEFT does, step by step
//!
//! `AdaLoraModel.update_and_allocate(step)` is called after `optimizer.step()` and before
//! `zero_grad()` with `end = total_step - tfinal`:
//!
//! * `step < end`: update the importance EMAs of every A, B, E entry from `|p * grad|` (even in
//!   the warm-up `step <= tinit`), then compute the budget; when the schedule says to mask
//!   (`tinit < step` and `step % deltaT == 0`) mask `lora_E` down to the budget and store the
//!   rank pattern.
//! * `step == end`: **no** EMA update at this step; mask to the final budget
//!   `target_r * n_layers` (forced, whatever `deltaT` says) with the EMAs of the previous step,
//!   store the rank pattern, then forget the EMAs (`reset_ipt`).
//! * `step > end`: re-apply the stored rank pattern (zero the masked `lora_E` entries again,
//!   since the optimizer may have moved them); nothing else.
//!
//! [`RankAllocator::update_and_allocate`] is exactly that.

pub use super::rank_pattern::{
    KeptFactors, RankPattern, drop_masked_ranks, expand_masked_ranks,
    rank_pattern_from_adapter_config, rank_pattern_from_json, rank_pattern_to_json,
};
use crate::backend::check::EmaCoefs;
pub use crate::backend::cpu::adalora::{
    OrthReg, OrthRegInput, OrthRegTotal, kthvalue, masked, orth_reg, orth_reg_total, triplet_scores,
};
use crate::backend::cpu::adalora::{element_scores, update_ipt};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};

/// AdaLoRA's budget schedule: the config fields of PEFT's `AdaLoraConfig` that drive it.
///
/// Steps are PEFT's `global_step` (whatever the training loop passes, usually 1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaLoraSchedule {
    /// Rank of every layer at the start (`init_r`).
    pub init_r: usize,
    /// Average rank per layer at the end (`target_r`); the final budget is `target_r * n_layers`.
    pub target_r: usize,
    /// Warm-up steps without masking (`tinit`; masking starts at `tinit + 1`).
    pub tinit: u64,
    /// Final fine-tuning steps with a frozen rank pattern (`tfinal`).
    pub tfinal: u64,
    /// Masking interval in the budgeting phase (`deltaT`).
    pub delta_t: u64,
    /// Total training steps (`total_step`).
    pub total_step: u64,
}

/// The phase a step falls in (PEFT's branches in `update_and_allocate`/`budget_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `step <= tinit`: full budget, scores are updated, nothing is masked.
    Warmup,
    /// `tinit < step < total_step - tfinal`: cubic budget, masked every `delta_t` steps.
    Budgeting,
    /// `step == total_step - tfinal`: the final mask (to `target_r * n_layers`), then the scores
    /// are dropped.
    Finalize,
    /// `step > total_step - tfinal`: the last rank pattern is re-applied.
    Final,
}

/// The budget at one step: PEFT's `budget_schedule(step)` return value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetStep {
    /// Total number of ranks to keep over all layers.
    pub budget: usize,
    /// PEFT's `mask_ind`: whether the schedule alone asks to mask at this step (the model-level
    /// `update_and_allocate` additionally forces a mask at `total_step - tfinal`).
    pub mask: bool,
}

impl AdaLoraSchedule {
    /// Checks the settings that PEFT either rejects or cannot run, each reported as
    /// [`Error::InvalidArgument`] naming the setting:
    ///
    /// * `total_step == 0`: PEFT's config raises ("supply a value > 0").
    /// * `tinit + tfinal >= total_step`: PEFT's config raises (no budgeting phase).
    /// * `delta_t == 0`: PEFT computes `step % deltaT` and fails with `ZeroDivisionError` at the
    ///   first budgeting step; rejected up front.
    /// * `target_r > init_r`: the budget would exceed the number of ranks; PEFT fails in
    ///   `torch.kthvalue` with a negative `k` at the first mask.
    /// * `target_r == init_r`: the budget never drops, `k = 0`, and PEFT fails in
    ///   `torch.kthvalue` ("selected number k out of range") at the first mask. Not turned into a
    ///   silent no-op: use plain LoRA for a fixed rank.
    pub fn validate(&self) -> Result<()> {
        if self.total_step == 0 {
            return Err(Error::arg(
                "total_step",
                "AdaLoRA needs total_step > 0 (PEFT: supply a value > 0)",
            ));
        }
        if self.tinit.saturating_add(self.tfinal) >= self.total_step {
            return Err(Error::arg(
                "tinit",
                format!(
                    "tinit ({}) + tfinal ({}) >= total_step ({}): no budgeting phase; decrease \
                     tfinal/tinit or increase total_step",
                    self.tinit, self.tfinal, self.total_step
                ),
            ));
        }
        if self.delta_t == 0 {
            return Err(Error::arg(
                "delta_t",
                "deltaT must be >= 1 (PEFT divides the step by it)",
            ));
        }
        if self.target_r > self.init_r {
            return Err(Error::arg(
                "target_r",
                format!(
                    "target_r ({}) > init_r ({}): the budget would exceed the number of ranks",
                    self.target_r, self.init_r
                ),
            ));
        }
        if self.target_r == self.init_r {
            return Err(Error::arg(
                "target_r",
                format!(
                    "target_r == init_r ({}): nothing to prune (PEFT fails with kthvalue k = 0)",
                    self.init_r
                ),
            ));
        }
        Ok(())
    }

    /// `total_step - tfinal`: the step of the final mask. Assumes a validated schedule.
    pub fn final_step(&self) -> u64 {
        self.total_step.saturating_sub(self.tfinal)
    }

    /// The phase of `step` (see [`Phase`]).
    pub fn phase(&self, step: u64) -> Phase {
        let end = self.final_step();
        if step > end {
            Phase::Final
        } else if step == end {
            Phase::Finalize
        } else if step <= self.tinit {
            Phase::Warmup
        } else {
            Phase::Budgeting
        }
    }

    /// PEFT's `budget_schedule(step)` for `n_layers` layers of rank `init_r` each
    /// (`init_bgt = init_r * n_layers`, `target_bgt = target_r * n_layers`); see
    /// [`AdaLoraSchedule::budget_for`].
    pub fn budget(&self, step: u64, n_layers: usize) -> BudgetStep {
        self.budget_for(step, self.init_r * n_layers, self.target_r * n_layers)
    }

    /// PEFT's `budget_schedule(step)` with explicit total budgets (PEFT's `init_bgt` is the sum
    /// of the layers' actual ranks):
    ///
    /// ```text
    /// step <= tinit                : (init_bgt, false)
    /// step >  total_step - tfinal  : (target_bgt, true)
    /// otherwise                    : m = 1 - (step - tinit) / (total_step - tfinal - tinit)
    ///                                (trunc((init_bgt - target_bgt) m^3 + target_bgt), step % deltaT == 0)
    /// ```
    ///
    /// The cubic term is evaluated in f64 with `powf(3.0)` like Python's `float ** 3`, and
    /// truncated like `int()`. At `step == total_step - tfinal`, `m = 0` so the budget is exactly
    /// `target_bgt`; at `step == tinit` it is exactly `init_bgt`. A `delta_t` of 0 reports no
    /// mask (see [`AdaLoraSchedule::validate`]).
    pub fn budget_for(&self, step: u64, init_bgt: usize, target_bgt: usize) -> BudgetStep {
        if step <= self.tinit {
            return BudgetStep {
                budget: init_bgt,
                mask: false,
            };
        }
        if step > self.final_step() {
            return BudgetStep {
                budget: target_bgt,
                mask: true,
            };
        }
        let window = (self.final_step() - self.tinit) as f64;
        let m = 1.0 - (step - self.tinit) as f64 / window;
        let cubic = (init_bgt as f64 - target_bgt as f64) * m.powf(3.0) + target_bgt as f64;
        BudgetStep {
            budget: cubic.trunc() as usize,
            mask: self.delta_t != 0 && step.is_multiple_of(self.delta_t),
        }
    }
}

/// One layer's adapter as the allocator sees it: values and gradients, row-major.
///
/// Shapes: `lora_a`/`grad_a` `[r, in_features]`, `lora_b`/`grad_b` `[out_features, r]`,
/// `lora_e`/`grad_e` `[r]` (PEFT's `[r, 1]`). Masking writes 0 into `lora_e`.
#[derive(Debug)]
pub struct AdaLoraLayerView<'a> {
    /// Module name (`fc1`, `model.layers.0.self_attn.q_proj`); the rank pattern's key.
    pub name: &'a str,
    pub lora_a: &'a [f32],
    pub grad_a: &'a [f32],
    pub lora_b: &'a [f32],
    pub grad_b: &'a [f32],
    pub lora_e: &'a mut [f32],
    pub grad_e: &'a [f32],
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl AdaLoraLayerView<'_> {
    fn check(&self) -> Result<()> {
        let (r, i, o) = (self.r, self.in_features, self.out_features);
        let checks: [(&str, usize, usize); 6] = [
            ("lora_A", self.lora_a.len(), r * i),
            ("grad_A", self.grad_a.len(), r * i),
            ("lora_B", self.lora_b.len(), o * r),
            ("grad_B", self.grad_b.len(), o * r),
            ("lora_E", self.lora_e.len(), r),
            ("grad_E", self.grad_e.len(), r),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(Error::shape(
                    format!("{}.{what}", self.name),
                    format!("{want} values for r={r}, in={i}, out={o}"),
                    &[got],
                ));
            }
        }
        Ok(())
    }
}

/// The smoothed sensitivity (`exp_avg_ipt`, PEFT's Ī) and uncertainty (`exp_avg_unc`, Ū) of
/// every entry of one parameter, same layout as the parameter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EntryEma {
    pub exp_avg_ipt: Vec<f32>,
    pub exp_avg_unc: Vec<f32>,
}

impl EntryEma {
    fn zeros(n: usize) -> Self {
        EntryEma {
            exp_avg_ipt: vec![0.0; n],
            exp_avg_unc: vec![0.0; n],
        }
    }

    /// Paper eq. (8)–(9), PEFT `update_ipt`, elementwise in f32 like torch:
    /// `I = |p * g|`, `Ī = b1 Ī + (1 - b1) I`, `Ū = b2 Ū + (1 - b2) |I - Ī|` (with the new Ī).
    fn update(&mut self, p: &[f32], g: &[f32], c: &EmaCoefs) {
        update_ipt(p, g, &mut self.exp_avg_ipt, &mut self.exp_avg_unc, c);
    }

    /// PEFT `_element_score`: `s = Ī * Ū` per entry (paper eq. (10)).
    pub fn scores(&self) -> Vec<f32> {
        element_scores(&self.exp_avg_ipt, &self.exp_avg_unc)
    }
}

/// The EMAs of one layer's three factors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerEma {
    pub a: EntryEma,
    pub b: EntryEma,
    pub e: EntryEma,
}

/// What one call of [`RankAllocator::update_and_allocate`] does (PEFT's branches of
/// `AdaLoraModel.update_and_allocate`), from [`RankAllocator::plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPlan {
    /// Before `total_step - tfinal`: update the EMAs, then mask to `mask` ranks when the
    /// schedule masks at this step.
    Update { mask: Option<usize> },
    /// At `total_step - tfinal`: mask to the final `budget` with the current EMAs (no update),
    /// then forget the EMAs.
    Finalize { budget: usize },
    /// After `total_step - tfinal`: re-apply the stored rank pattern.
    Reapply,
}

/// The result of a mask computed from the scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    /// Ranks to keep in total (the schedule's budget).
    pub budget: usize,
    /// `torch.kthvalue(all_scores, init_bgt - budget)`: every triplet whose score is `<=` this is
    /// masked (ties at the threshold are all masked, so slightly more than
    /// `init_bgt - budget` ranks may go).
    pub threshold: f32,
    /// The triplet score of every rank of every layer (paper eq. (7) with PEFT's averaging).
    pub triplet_scores: BTreeMap<String, Vec<f32>>,
}

#[derive(Clone, Debug)]
struct LayerInfo {
    name: String,
    r: usize,
}

/// AdaLoRA's rank allocator (PEFT `RankAllocator` + `AdaLoraModel.update_and_allocate`).
#[derive(Clone, Debug)]
pub struct RankAllocator {
    schedule: AdaLoraSchedule,
    coefs: EmaCoefs,
    betas: (f64, f64),
    layers: Vec<LayerInfo>,
    index: HashMap<String, usize>,
    init_bgt: usize,
    target_bgt: usize,
    /// `None` until the first update and again after the final mask (PEFT's `reset_ipt`).
    ema: Option<Vec<LayerEma>>,
    rank_pattern: Option<RankPattern>,
}

impl RankAllocator {
    /// An allocator for `layers` (module name and current rank `r` of each), with the EMA
    /// coefficients `beta1` (sensitivity) and `beta2` (uncertainty).
    ///
    /// As PEFT, `init_bgt` is the sum of the layers' ranks and `target_bgt = target_r * n_layers`.
    ///
    /// Errors ([`Error::InvalidArgument`]): the schedule fails [`AdaLoraSchedule::validate`];
    /// `beta1`/`beta2` outside the open interval (0, 1) (PEFT asserts it); no layers (PEFT fails
    /// in `torch.cat` of nothing); a repeated layer name; a layer of rank 0 (nothing to allocate;
    /// PEFT only creates those when loading a pruned adapter); `target_bgt >= init_bgt`, i.e. a
    /// final budget larger than, or equal to, the number of ranks (PEFT fails in `kthvalue`).
    pub fn new(
        schedule: AdaLoraSchedule,
        beta1: f64,
        beta2: f64,
        layers: &[(&str, usize)],
    ) -> Result<Self> {
        schedule.validate()?;
        let coefs = EmaCoefs::new(beta1, beta2)?;
        if layers.is_empty() {
            return Err(Error::arg("layers", "no AdaLoRA layers to allocate over"));
        }
        let mut index = HashMap::new();
        let mut infos = Vec::with_capacity(layers.len());
        for (i, &(name, r)) in layers.iter().enumerate() {
            if r == 0 {
                return Err(Error::arg("layers", format!("layer `{name}` has rank 0")));
            }
            if index.insert(name.to_string(), i).is_some() {
                return Err(Error::arg("layers", format!("layer `{name}` given twice")));
            }
            infos.push(LayerInfo {
                name: name.to_string(),
                r,
            });
        }
        let init_bgt: usize = infos.iter().map(|l| l.r).sum();
        let target_bgt = schedule.target_r * infos.len();
        if target_bgt >= init_bgt {
            return Err(Error::arg(
                "target_r",
                format!(
                    "final budget target_r * n_layers = {target_bgt} is not below the number of \
                     ranks {init_bgt}"
                ),
            ));
        }
        Ok(RankAllocator {
            schedule,
            coefs,
            betas: (beta1, beta2),
            layers: infos,
            index,
            init_bgt,
            target_bgt,
            ema: None,
            rank_pattern: None,
        })
    }

    /// The schedule.
    pub fn schedule(&self) -> &AdaLoraSchedule {
        &self.schedule
    }

    /// PEFT's `init_bgt` (sum of the layers' ranks).
    pub fn init_budget(&self) -> usize {
        self.init_bgt
    }

    /// PEFT's `target_bgt` (`target_r * n_layers`).
    pub fn target_budget(&self) -> usize {
        self.target_bgt
    }

    /// The budget at `step` (PEFT `budget_schedule`).
    pub fn budget(&self, step: u64) -> BudgetStep {
        self.schedule
            .budget_for(step, self.init_bgt, self.target_bgt)
    }

    /// The EMA coefficients `(beta1, beta2)` given to [`RankAllocator::new`].
    pub fn betas(&self) -> (f64, f64) {
        self.betas
    }

    /// The layers `(name, rank)` in the order given to [`RankAllocator::new`].
    pub fn layers(&self) -> impl ExactSizeIterator<Item = (&str, usize)> {
        self.layers.iter().map(|l| (l.name.as_str(), l.r))
    }

    /// What [`RankAllocator::update_and_allocate`] does at `step` (see [`StepPlan`]); the
    /// device-resident allocator ([`crate::adapter::device_rank_allocator`]) follows the same
    /// plan.
    pub fn plan(&self, step: u64) -> StepPlan {
        match self.schedule.phase(step) {
            Phase::Warmup | Phase::Budgeting => {
                let b = self.budget(step);
                StepPlan::Update {
                    mask: b.mask.then_some(b.budget),
                }
            }
            Phase::Finalize => StepPlan::Finalize {
                budget: self.budget(step).budget,
            },
            Phase::Final => StepPlan::Reapply,
        }
    }

    /// PEFT's `k = init_bgt - budget` of `torch.kthvalue` for a mask to `budget`, 1-based.
    /// Errors: `k` outside `1..=init_bgt` (PEFT: kthvalue out of range).
    pub fn kth_for_budget(&self, budget: usize) -> Result<usize> {
        self.init_bgt
            .checked_sub(budget)
            .filter(|&k| k >= 1)
            .ok_or_else(|| {
                Error::arg(
                    "budget",
                    format!(
                        "budget {budget} leaves k = init_bgt - budget out of 1..={} (PEFT: \
                         kthvalue out of range)",
                        self.init_bgt
                    ),
                )
            })
    }

    /// The EMAs of layer `name`, if any update happened since the start or the last reset.
    pub fn ema(&self, name: &str) -> Option<&LayerEma> {
        let i = *self.index.get(name)?;
        self.ema.as_ref().map(|e| &e[i])
    }

    /// The last rank pattern (PEFT stores it in `config.rank_pattern`).
    pub fn rank_pattern(&self) -> Option<&RankPattern> {
        self.rank_pattern.as_ref()
    }

    /// Sets the rank pattern re-applied in the final phase (e.g. resuming from a saved config,
    /// as PEFT reads `config.rank_pattern`). Errors: a layer missing or of the wrong length.
    pub fn set_rank_pattern(&mut self, pattern: RankPattern) -> Result<()> {
        for l in &self.layers {
            match pattern.get(&l.name) {
                Some(v) if v.len() == l.r => {}
                Some(v) => {
                    return Err(Error::arg(
                        "rank_pattern",
                        format!("`{}`: {} entries for rank {}", l.name, v.len(), l.r),
                    ));
                }
                None => {
                    return Err(Error::arg(
                        "rank_pattern",
                        format!("no entry for layer `{}`", l.name),
                    ));
                }
            }
        }
        self.rank_pattern = Some(pattern);
        Ok(())
    }

    /// Forgets the importance EMAs (PEFT `reset_ipt`).
    pub fn reset_ipt(&mut self) {
        self.ema = None;
    }

    /// One call per training step, after the optimizer step and before the gradients are
    /// cleared, in PEFT's order (see the module docs):
    ///
    /// * `step < total_step - tfinal`: update the EMAs from every layer's values and gradients,
    ///   then, if the schedule masks at this step, mask `lora_E` to the budget.
    /// * `step == total_step - tfinal`: mask to `target_r * n_layers` with the current EMAs (no
    ///   update at this step), then reset the EMAs.
    /// * `step > total_step - tfinal`: zero `lora_E` where the last rank pattern says so.
    ///
    /// Returns the [`Allocation`] when a new mask was computed from the scores, else `None`.
    ///
    /// Errors: `layers` is not exactly the set of layers given to [`RankAllocator::new`] (by name
    /// and rank, any order) or a slice has the wrong length ([`Error::Shape`]); the final mask
    /// before any update; the final phase without a rank pattern (PEFT fails on `None` there).
    pub fn update_and_allocate(
        &mut self,
        step: u64,
        layers: &mut [AdaLoraLayerView<'_>],
    ) -> Result<Option<Allocation>> {
        let order = self.match_layers(layers, |v| (v.name, v.r), |v| v.check())?;
        match self.plan(step) {
            StepPlan::Update { mask } => {
                self.update_ipt(layers, &order);
                match mask {
                    Some(budget) => Ok(Some(self.mask_to_budget(budget, layers, &order)?)),
                    None => Ok(None),
                }
            }
            StepPlan::Finalize { budget } => {
                let alloc = self.mask_to_budget(budget, layers, &order)?;
                self.reset_ipt();
                Ok(Some(alloc))
            }
            StepPlan::Reapply => {
                let pattern = self
                    .rank_pattern
                    .as_ref()
                    .ok_or_else(|| self.no_pattern_err(step))?;
                for view in layers.iter_mut() {
                    apply_mask(view.lora_e, &pattern[view.name]);
                }
                Ok(None)
            }
        }
    }

    /// The error of a final-phase step without a rank pattern (PEFT fails on `None` there).
    pub(crate) fn no_pattern_err(&self, step: u64) -> Error {
        Error::arg(
            "step",
            format!(
                "step {step} is in the final phase but no rank pattern exists; call at step {} \
                 first or set one",
                self.schedule.final_step()
            ),
        )
    }

    /// For each of `items` (a layer named and ranked by `key`), its registered layer index,
    /// running `check` on each after its name and rank matched. Errors: not exactly the
    /// registered set of layers, a rank that differs, what `check` reports.
    pub(crate) fn match_layers<T>(
        &self,
        items: &[T],
        key: impl Fn(&T) -> (&str, usize),
        check: impl Fn(&T) -> Result<()>,
    ) -> Result<Vec<usize>> {
        if items.len() != self.layers.len() {
            return Err(Error::arg(
                "layers",
                format!(
                    "{} layers given, the allocator has {}",
                    items.len(),
                    self.layers.len()
                ),
            ));
        }
        let mut seen = vec![false; self.layers.len()];
        let mut order = Vec::with_capacity(items.len());
        for v in items {
            let (name, r) = key(v);
            let i = *self
                .index
                .get(name)
                .ok_or_else(|| Error::arg("layers", format!("unknown layer `{name}`")))?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(Error::arg("layers", format!("layer `{name}` given twice")));
            }
            if r != self.layers[i].r {
                return Err(Error::arg(
                    "layers",
                    format!(
                        "layer `{name}` has rank {r}, the allocator expects {}",
                        self.layers[i].r
                    ),
                ));
            }
            check(v)?;
            order.push(i);
        }
        Ok(order)
    }

    fn update_ipt(&mut self, layers: &[AdaLoraLayerView<'_>], order: &[usize]) {
        let n_layers = self.layers.len();
        let ema = self
            .ema
            .get_or_insert_with(|| vec![LayerEma::default(); n_layers]);
        for (v, &i) in layers.iter().zip(order) {
            let e = &mut ema[i];
            if e.a.exp_avg_ipt.len() != v.lora_a.len() {
                *e = LayerEma {
                    a: EntryEma::zeros(v.lora_a.len()),
                    b: EntryEma::zeros(v.lora_b.len()),
                    e: EntryEma::zeros(v.lora_e.len()),
                };
            }
            e.a.update(v.lora_a, v.grad_a, &self.coefs);
            e.b.update(v.lora_b, v.grad_b, &self.coefs);
            e.e.update(v.lora_e, v.grad_e, &self.coefs);
        }
    }

    /// PEFT `mask_to_budget`: triplet scores, global k-th smallest, mask `<=` threshold.
    fn mask_to_budget(
        &mut self,
        budget: usize,
        layers: &mut [AdaLoraLayerView<'_>],
        order: &[usize],
    ) -> Result<Allocation> {
        let ema = self.ema.as_ref().ok_or_else(no_scores_err)?;
        let mut triplet_scores = BTreeMap::new();
        let mut all = Vec::with_capacity(self.init_bgt);
        for (v, &i) in layers.iter().zip(order) {
            let s = triplet_scores_of(&ema[i], v.r, v.in_features, v.out_features);
            all.extend_from_slice(&s);
            triplet_scores.insert(v.name.to_string(), s);
        }
        // PEFT: torch.kthvalue(cat(all_score), k = init_bgt - budget), 1-based k-th smallest.
        let k = self.kth_for_budget(budget)?;
        let threshold = kthvalue(&mut all, k);
        let mut pattern = RankPattern::new();
        for v in layers.iter_mut() {
            let keep: Vec<bool> = triplet_scores[v.name]
                .iter()
                .map(|&s| !masked(s, threshold))
                .collect();
            apply_mask(v.lora_e, &keep);
            pattern.insert(v.name.to_string(), keep);
        }
        self.rank_pattern = Some(pattern);
        Ok(Allocation {
            budget,
            threshold,
            triplet_scores,
        })
    }
}

/// The error of a mask asked for before any EMA update (or after the reset).
pub(crate) fn no_scores_err() -> Error {
    Error::arg(
        "step",
        "no importance scores to mask with: update_and_allocate was not called before the \
         final mask step",
    )
}

fn triplet_scores_of(ema: &LayerEma, r: usize, inp: usize, out: usize) -> Vec<f32> {
    triplet_scores(
        [
            (ema.a.exp_avg_ipt.as_slice(), ema.a.exp_avg_unc.as_slice()),
            (ema.b.exp_avg_ipt.as_slice(), ema.b.exp_avg_unc.as_slice()),
            (ema.e.exp_avg_ipt.as_slice(), ema.e.exp_avg_unc.as_slice()),
        ],
        r,
        inp,
        out,
    )
}

fn apply_mask(lora_e: &mut [f32], keep: &[bool]) {
    for (e, &k) in lora_e.iter_mut().zip(keep) {
        if !k {
            *e = 0.0;
        }
    }
}
