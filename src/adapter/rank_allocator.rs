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
//! of the allocator kernels of [`crate::backend::Backend`] (the CPU backend runs these very
//! functions), which [`crate::adapter::device_rank_allocator`] drives so that training reads
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

use crate::error::{Error, Result};
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

/// Which ranks of each layer are kept: layer (module) name, e.g. `fc1` or
/// `model.layers.0.self_attn.q_proj`, → one `bool` per rank (`true` = kept).
///
/// PEFT keys it by the `lora_E` parameter name (`fc1.lora_E.default` while training,
/// `fc1.lora_E` in the saved `adapter_config.json`); see [`rank_pattern_to_json`] and
/// [`rank_pattern_from_json`] for the conversion.
pub type RankPattern = BTreeMap<String, Vec<bool>>;

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

/// [`EntryEma`]'s update over slices (the CPU backend's `adalora_update_ipt` is this too).
pub(crate) fn update_ipt(p: &[f32], g: &[f32], ipt: &mut [f32], unc: &mut [f32], c: &EmaCoefs) {
    for (((ipt_bar, unc_bar), &p), &g) in ipt.iter_mut().zip(unc.iter_mut()).zip(p).zip(g) {
        let ipt = (p * g).abs();
        *ipt_bar = c.b1 * *ipt_bar + c.one_minus_b1 * ipt;
        *unc_bar = c.b2 * *unc_bar + c.one_minus_b2 * (ipt - *ipt_bar).abs();
    }
}

/// PEFT `_element_score` over slices: `ipt * unc` per entry.
fn element_scores(ipt: &[f32], unc: &[f32]) -> Vec<f32> {
    ipt.iter().zip(unc).map(|(i, u)| i * u).collect()
}

/// The EMAs of one layer's three factors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerEma {
    pub a: EntryEma,
    pub b: EntryEma,
    pub e: EntryEma,
}

/// Torch multiplies an f32 tensor by a Python float as f32, with `1 - beta` computed in f64.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EmaCoefs {
    pub b1: f32,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
}

impl EmaCoefs {
    /// The f32 coefficients of `beta1`, `beta2` (each in the open interval (0, 1), which PEFT
    /// asserts). Errors: a beta outside it, named.
    pub(crate) fn new(beta1: f64, beta2: f64) -> Result<Self> {
        for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
            if !(b > 0.0 && b < 1.0) {
                return Err(Error::arg(name, format!("must be in (0, 1), got {b}")));
            }
        }
        Ok(EmaCoefs {
            b1: beta1 as f32,
            one_minus_b1: (1.0 - beta1) as f32,
            b2: beta2 as f32,
            one_minus_b2: (1.0 - beta2) as f32,
        })
    }
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

/// `torch.kthvalue(values, k)`: the 1-based k-th smallest in the total order of
/// [`f32::total_cmp`] (NaN above +inf, as torch sorts it). `values` is reordered. Assumes
/// `1 <= k <= values.len()`.
pub(crate) fn kthvalue(values: &mut [f32], k: usize) -> f32 {
    *values.select_nth_unstable_by(k - 1, f32::total_cmp).1
}

/// PEFT's mask predicate `score <= threshold`: a NaN on either side compares false, so a NaN
/// score is kept (and a NaN threshold masks nothing).
pub(crate) fn masked(score: f32, threshold: f32) -> bool {
    matches!(
        score.partial_cmp(&threshold),
        Some(Ordering::Less | Ordering::Equal)
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

/// PEFT `_combine_ipt` over `mask_to_budget`'s row/column means: the score of rank `i` is
/// `s(λ_i) + mean_j s(A_ij) + mean_k s(B_ki)` (paper eq. (7) uses the same averages), from the
/// `(exp_avg_ipt, exp_avg_unc)` of A `[r, in]`, B `[out, r]` and E `[r]`. The means are
/// accumulated in f64 and rounded to f32; the two means are added first, then E's score (as
/// PEFT's `ipt_E + ipt_AB.sum(dim=1)`). A mean over no entries (`in` or `out` 0) is NaN.
pub(crate) fn triplet_scores(
    [(ia, ua), (ib, ub), (ie, ue)]: [(&[f32], &[f32]); 3],
    r: usize,
    inp: usize,
    out: usize,
) -> Vec<f32> {
    let sa = element_scores(ia, ua);
    let sb = element_scores(ib, ub);
    let se = element_scores(ie, ue);
    (0..r)
        .map(|i| {
            let mean_a = if inp == 0 {
                f32::NAN
            } else {
                (sa[i * inp..(i + 1) * inp]
                    .iter()
                    .map(|&x| x as f64)
                    .sum::<f64>()
                    / inp as f64) as f32
            };
            let mean_b = if out == 0 {
                f32::NAN
            } else {
                ((0..out).map(|k| sb[k * r + i] as f64).sum::<f64>() / out as f64) as f32
            };
            se[i] + (mean_a + mean_b)
        })
        .collect()
}

fn apply_mask(lora_e: &mut [f32], keep: &[bool]) {
    for (e, &k) in lora_e.iter_mut().zip(keep) {
        if !k {
            *e = 0.0;
        }
    }
}

/// The orthogonality penalty of one layer and its gradient (unweighted).
#[derive(Clone, Debug, PartialEq)]
pub struct OrthReg {
    /// `||A A^T - I_r||_F + ||B^T B - I_r||_F` (Frobenius norms, **not** squared: PEFT uses
    /// `torch.norm(·, p="fro")`; the paper's eq. (4) writes squared norms).
    pub loss: f32,
    /// `||A A^T - I||_F`.
    pub norm_a: f32,
    /// `||B^T B - I||_F`.
    pub norm_b: f32,
    /// `d loss / d A = 2 (A A^T - I) A / ||A A^T - I||_F` (0 where the norm is 0, as torch).
    pub grad_a: Vec<f32>,
    /// `d loss / d B = 2 B (B^T B - I) / ||B^T B - I||_F` (0 where the norm is 0, as torch).
    pub grad_b: Vec<f32>,
}

/// The orthogonality penalty of one layer, `lora_a [r, in]`, `lora_b [out, r]` (paper sec. 3,
/// `R(P, Q)`, in PEFT's unsquared form), with its gradients; f64 inside.
///
/// As in PEFT, every rank counts, masked or not (masking only zeroes `lora_E`).
///
/// Errors: slice lengths that do not match `r`, `in_features`, `out_features`.
pub fn orth_reg(
    lora_a: &[f32],
    lora_b: &[f32],
    r: usize,
    in_features: usize,
    out_features: usize,
) -> Result<OrthReg> {
    if lora_a.len() != r * in_features {
        return Err(Error::shape(
            "lora_A",
            format!("[{r}, {in_features}]"),
            &[lora_a.len()],
        ));
    }
    if lora_b.len() != out_features * r {
        return Err(Error::shape(
            "lora_B",
            format!("[{out_features}, {r}]"),
            &[lora_b.len()],
        ));
    }
    // A: rows are the r vectors (length in); B: columns are the r vectors (length out).
    let (norm_a, grad_a) = gram_penalty(r, in_features, |i, j| lora_a[i * in_features + j]);
    let (norm_b, grad_b) = gram_penalty(r, out_features, |i, k| lora_b[k * r + i]);
    // grad_b comes back indexed [i][k] (vector-major); B is [out, r].
    let mut gb = vec![0.0f32; out_features * r];
    for i in 0..r {
        for k in 0..out_features {
            gb[k * r + i] = grad_b[i * out_features + k] as f32;
        }
    }
    Ok(OrthReg {
        loss: (norm_a + norm_b) as f32,
        norm_a: norm_a as f32,
        norm_b: norm_b as f32,
        grad_a: grad_a.into_iter().map(|x| x as f32).collect(),
        grad_b: gb,
    })
}

/// For r vectors `v_i` of length n (`at(i, j)`), `G = V V^T - I`: `(||G||_F, 2 G V / ||G||_F)`,
/// the gradient laid out `[r, n]`.
fn gram_penalty(r: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> (f64, Vec<f64>) {
    let v: Vec<f64> = (0..r * n)
        .map(|x| at(x / n.max(1), x % n.max(1)) as f64)
        .collect();
    let mut g = vec![0.0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            let dot: f64 = (0..n).map(|t| v[i * n + t] * v[j * n + t]).sum();
            g[i * r + j] = dot - if i == j { 1.0 } else { 0.0 };
        }
    }
    let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut grad = vec![0.0f64; r * n];
    if norm > 0.0 {
        for i in 0..r {
            for t in 0..n {
                let s: f64 = (0..r).map(|j| g[i * r + j] * v[j * n + t]).sum();
                grad[i * n + t] = 2.0 * s / norm;
            }
        }
    }
    (norm, grad)
}

/// One layer's factors for [`orth_reg_total`].
#[derive(Clone, Copy, Debug)]
pub struct OrthRegInput<'a> {
    pub lora_a: &'a [f32],
    pub lora_b: &'a [f32],
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// The term PEFT's `AdaLoraModel.forward` adds to the loss, and its gradient per layer.
#[derive(Clone, Debug, PartialEq)]
pub struct OrthRegTotal {
    /// `orth_reg_weight * (Σ_layers ||A A^T - I||_F + ||B^T B - I||_F) / (2 n_layers)`.
    pub loss: f32,
    /// Per layer `(d loss / d A, d loss / d B)`, already weighted and averaged.
    pub grads: Vec<(Vec<f32>, Vec<f32>)>,
}

/// PEFT's regulariser over all layers: the sum of one Frobenius norm per `lora_A` and per
/// `lora_B` parameter, divided by the number of such parameters (`2 n_layers`), times
/// `orth_reg_weight`. No layers give 0.
///
/// Errors: `orth_reg_weight < 0` or not finite (PEFT raises for < 0); see [`orth_reg`].
pub fn orth_reg_total(layers: &[OrthRegInput<'_>], orth_reg_weight: f32) -> Result<OrthRegTotal> {
    if !(orth_reg_weight >= 0.0 && orth_reg_weight.is_finite()) {
        return Err(Error::arg(
            "orth_reg_weight",
            format!("must be finite and >= 0, got {orth_reg_weight}"),
        ));
    }
    if layers.is_empty() {
        return Ok(OrthRegTotal {
            loss: 0.0,
            grads: Vec::new(),
        });
    }
    let scale = orth_reg_weight as f64 / (2 * layers.len()) as f64;
    let mut sum = 0.0f64;
    let mut grads = Vec::with_capacity(layers.len());
    for l in layers {
        let o = orth_reg(l.lora_a, l.lora_b, l.r, l.in_features, l.out_features)?;
        sum += o.norm_a as f64 + o.norm_b as f64;
        let s = |g: Vec<f32>| g.into_iter().map(|x| (x as f64 * scale) as f32).collect();
        grads.push((s(o.grad_a), s(o.grad_b)));
    }
    Ok(OrthRegTotal {
        loss: (sum * scale) as f32,
        grads,
    })
}

/// The `rank_pattern` object PEFT writes in `adapter_config.json`: `"{layer}.lora_E"` → list of
/// bools (PEFT's `_get_adapter_state_dict` strips the `.{adapter_name}` suffix before saving).
pub fn rank_pattern_to_json(pattern: &RankPattern) -> Value {
    let map = pattern
        .iter()
        .map(|(k, v)| {
            (
                format!("{k}.lora_E"),
                Value::Array(v.iter().map(|&b| Value::Bool(b)).collect()),
            )
        })
        .collect();
    Value::Object(map)
}

/// Parses a `rank_pattern` object. Keys may be the saved form `"{layer}.lora_E"` or the
/// in-training form `"{layer}.lora_E.{adapter_name}"` (PEFT's `mask_using_rank_pattern` accepts
/// both); values are lists of bools (`0`/`1` integers, which PEFT's `bool()` also accepts, are
/// read as bools).
///
/// Errors ([`Error::Json`]): not an object, a key without `.lora_E`, a value that is not a list
/// of bools, two keys naming the same layer.
pub fn rank_pattern_from_json(value: &Value, adapter_name: &str) -> Result<RankPattern> {
    let bad = |msg: String| Error::Json {
        context: "rank_pattern".into(),
        msg,
    };
    let obj = value
        .as_object()
        .ok_or_else(|| bad("rank_pattern is not an object".into()))?;
    let training_suffix = format!(".lora_E.{adapter_name}");
    let mut out = RankPattern::new();
    for (key, v) in obj {
        let layer = key
            .strip_suffix(".lora_E")
            .or_else(|| key.strip_suffix(training_suffix.as_str()))
            .ok_or_else(|| bad(format!("key `{key}` does not end in `.lora_E`")))?;
        let list = v
            .as_array()
            .ok_or_else(|| bad(format!("`{key}` is not a list")))?;
        let bits = list
            .iter()
            .map(|x| match x {
                Value::Bool(b) => Ok(*b),
                Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
                Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
                _ => Err(bad(format!("`{key}` holds {x}, not a bool"))),
            })
            .collect::<Result<Vec<bool>>>()?;
        if out.insert(layer.to_string(), bits).is_some() {
            return Err(bad(format!("layer `{layer}` appears twice")));
        }
    }
    Ok(out)
}

/// The `rank_pattern` of an `adapter_config.json` text: `None` if the field is absent or `null`
/// (an AdaLoRA adapter saved before any mask). Errors: invalid JSON or pattern.
pub fn rank_pattern_from_adapter_config(
    json: &str,
    adapter_name: &str,
) -> Result<Option<RankPattern>> {
    let v: Value = serde_json::from_str(json).map_err(|e| Error::Json {
        context: "adapter_config.json".into(),
        msg: e.to_string(),
    })?;
    match v.get("rank_pattern") {
        None | Some(Value::Null) => Ok(None),
        Some(p) => rank_pattern_from_json(p, adapter_name).map(Some),
    }
}

/// One layer's factors with only some ranks: `lora_a [kept, in]`, `lora_b [out, kept]`,
/// `lora_e [kept]` (PEFT saves E as `[kept, 1]`).
#[derive(Clone, Debug, PartialEq)]
pub struct KeptFactors {
    pub kept: usize,
    pub lora_a: Vec<f32>,
    pub lora_b: Vec<f32>,
    pub lora_e: Vec<f32>,
}

fn check_factors(a: &[f32], b: &[f32], e: &[f32], r: usize, inp: usize, out: usize) -> Result<()> {
    if a.len() != r * inp {
        return Err(Error::shape("lora_A", format!("[{r}, {inp}]"), &[a.len()]));
    }
    if b.len() != out * r {
        return Err(Error::shape("lora_B", format!("[{out}, {r}]"), &[b.len()]));
    }
    if e.len() != r {
        return Err(Error::shape("lora_E", format!("[{r}, 1]"), &[e.len()]));
    }
    Ok(())
}

/// Drops the ranks where `keep` is false, as PEFT's `resize_state_dict_by_rank_pattern` does
/// when saving (rows of A and E, columns of B). With every rank kept the tensors are unchanged.
/// A layer with nothing kept gives rank 0 (PEFT allows `r == 0` for AdaLoRA).
///
/// Errors: `lora_a [r, in]`, `lora_b [out, r]`, `lora_e [r]` with `r = keep.len()` mismatched.
pub fn drop_masked_ranks(
    lora_a: &[f32],
    lora_b: &[f32],
    lora_e: &[f32],
    in_features: usize,
    out_features: usize,
    keep: &[bool],
) -> Result<KeptFactors> {
    let r = keep.len();
    check_factors(lora_a, lora_b, lora_e, r, in_features, out_features)?;
    let idx: Vec<usize> = (0..r).filter(|&i| keep[i]).collect();
    let kept = idx.len();
    let mut a = Vec::with_capacity(kept * in_features);
    for &i in &idx {
        a.extend_from_slice(&lora_a[i * in_features..(i + 1) * in_features]);
    }
    let mut b = Vec::with_capacity(out_features * kept);
    for k in 0..out_features {
        b.extend(idx.iter().map(|&i| lora_b[k * r + i]));
    }
    let e = idx.iter().map(|&i| lora_e[i]).collect();
    Ok(KeptFactors {
        kept,
        lora_a: a,
        lora_b: b,
        lora_e: e,
    })
}

/// The inverse of [`drop_masked_ranks`]: back to rank `keep.len()` with zeros in A, B and E at
/// the masked ranks, so the layer's output is unchanged. PEFT instead loads such an adapter at
/// the kept rank (`resize_modules_by_rank_pattern`, `ranknum` still `init_r`); expanding lets a
/// fixed-rank layer (and a resumed allocator) use it. Returns `(lora_a, lora_b, lora_e)`.
///
/// Errors: the kept factors do not have `count(keep)` ranks.
pub fn expand_masked_ranks(
    kept: &KeptFactors,
    in_features: usize,
    out_features: usize,
    keep: &[bool],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let r = keep.len();
    let n = keep.iter().filter(|&&k| k).count();
    if kept.kept != n {
        return Err(Error::arg(
            "rank_pattern",
            format!(
                "{n} kept ranks in the pattern, {} in the factors",
                kept.kept
            ),
        ));
    }
    check_factors(
        &kept.lora_a,
        &kept.lora_b,
        &kept.lora_e,
        n,
        in_features,
        out_features,
    )?;
    let mut a = vec![0.0f32; r * in_features];
    let mut b = vec![0.0f32; out_features * r];
    let mut e = vec![0.0f32; r];
    for (j, i) in (0..r).filter(|&i| keep[i]).enumerate() {
        a[i * in_features..(i + 1) * in_features]
            .copy_from_slice(&kept.lora_a[j * in_features..(j + 1) * in_features]);
        for k in 0..out_features {
            b[k * r + i] = kept.lora_b[k * n + j];
        }
        e[i] = kept.lora_e[j];
    }
    Ok((a, b, e))
}
