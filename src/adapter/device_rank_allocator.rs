//! AdaLoRA's rank allocator with its state on the backend: the importance EMAs, the triplet
//! scores, the threshold and the keep-mask are backend tensors, updated by the allocator kernels
//! of [`Backend`] (`adalora_update_ipt`, `adalora_triplet_scores`, `adalora_threshold`,
//! `adalora_rank_mask`, `adalora_apply_mask`), so that a training step on a GPU reads nothing
//! back for it, mask steps included. The rank pattern is read back only when asked for
//! ([`DeviceRankAllocator::rank_pattern`], once at the end of a run).
//!
//! The schedule, phases, budgets and the checks of the layers are the host [`RankAllocator`]'s
//! (held inside, with its own EMAs unused): this is the same PEFT 0.21.2 `update_and_allocate`,
//! following [`RankAllocator::plan`] step by step. On the CPU backend the kernels are the host
//! allocator's functions, so the results are bit-identical to [`RankAllocator`]'s; on a GPU the
//! triplet scores may differ in the last bits (see [`Backend::adalora_triplet_scores`]).

use super::rank_allocator::{
    AdaLoraSchedule, BudgetStep, RankAllocator, RankPattern, StepPlan, no_scores_err,
};
use crate::backend::{AdaLoraIpt, Backend, Tensor, check};
use crate::error::{Error, Result};

/// One layer's adapter as the device allocator sees it: values and gradients on the backend.
/// Shapes: `lora_a`/`grad_a` `[r, in]`, `lora_b`/`grad_b` `[out, r]`, `lora_e`/`grad_e`
/// `[r, 1]`. Masking writes 0 into `lora_e`.
pub struct AdaLoraDeviceLayer<'a, B: Backend> {
    /// Module name (`model.layers.0.self_attn.q_proj`); the rank pattern's key.
    pub name: &'a str,
    pub lora_a: &'a Tensor<B>,
    pub grad_a: &'a Tensor<B>,
    pub lora_b: &'a Tensor<B>,
    pub grad_b: &'a Tensor<B>,
    pub lora_e: &'a mut Tensor<B>,
    pub grad_e: &'a Tensor<B>,
}

/// AdaLoRA's rank allocator (PEFT `RankAllocator` + `AdaLoraModel.update_and_allocate`) with
/// its EMAs and masks on the backend; see the [module docs](self).
pub struct DeviceRankAllocator<B: Backend> {
    /// Schedule, layers and budgets (its own EMAs and pattern stay unused).
    plan: RankAllocator,
    /// Start of each registered layer's ranks in `scores` and `keep`.
    offsets: Vec<usize>,
    /// Per registered layer; `None` until the first update and after the final mask.
    ema: Option<Vec<AdaLoraIpt<B>>>,
    /// Every layer's triplet scores, `[init_bgt]` (those of the last mask).
    scores: Tensor<B>,
    /// The last threshold, `[1]`.
    threshold: Option<Tensor<B>>,
    /// The last keep-mask (1 kept, 0 masked), `[init_bgt]`: the rank pattern on the device.
    keep: Option<Tensor<B>>,
}

impl<B: Backend> DeviceRankAllocator<B> {
    /// An allocator for `layers` (module name and rank of each); arguments and errors as
    /// [`RankAllocator::new`], plus a backend error allocating the score buffer.
    pub fn new(
        be: &B,
        schedule: AdaLoraSchedule,
        beta1: f64,
        beta2: f64,
        layers: &[(&str, usize)],
    ) -> Result<Self> {
        let plan = RankAllocator::new(schedule, beta1, beta2, layers)?;
        let offsets = layers
            .iter()
            .scan(0, |acc, &(_, r)| {
                let off = *acc;
                *acc += r;
                Some(off)
            })
            .collect();
        let scores = be.zeros(&[plan.init_budget()])?;
        Ok(DeviceRankAllocator {
            plan,
            offsets,
            ema: None,
            scores,
            threshold: None,
            keep: None,
        })
    }

    /// The schedule.
    pub fn schedule(&self) -> &AdaLoraSchedule {
        self.plan.schedule()
    }

    /// PEFT's `init_bgt` (sum of the layers' ranks): the length of the score and keep buffers.
    pub fn init_budget(&self) -> usize {
        self.plan.init_budget()
    }

    /// PEFT's `target_bgt` (`target_r * n_layers`).
    pub fn target_budget(&self) -> usize {
        self.plan.target_budget()
    }

    /// The budget at `step` (PEFT `budget_schedule`).
    pub fn budget(&self, step: u64) -> BudgetStep {
        self.plan.budget(step)
    }

    /// The EMAs of layer `name`, if any update happened since the start or the last reset.
    pub fn ema(&self, name: &str) -> Option<&AdaLoraIpt<B>> {
        let i = self.plan.layers().position(|(n, _)| n == name)?;
        self.ema.as_ref().map(|e| &e[i])
    }

    /// Every layer's triplet scores as of the last mask, `[init_bgt]`, layers in the order
    /// given to [`DeviceRankAllocator::new`] (zeros before the first mask).
    pub fn scores(&self) -> &Tensor<B> {
        &self.scores
    }

    /// The threshold of the last mask (`[1]`), if any.
    pub fn threshold(&self) -> Option<&Tensor<B>> {
        self.threshold.as_ref()
    }

    /// The keep-mask of the last mask, `[init_bgt]` (1 kept, 0 masked; layers in the order
    /// given to [`DeviceRankAllocator::new`]), if any.
    pub fn keep_mask(&self) -> Option<&Tensor<B>> {
        self.keep.as_ref()
    }

    /// The last rank pattern, read back from the device (one download), or `None` before the
    /// first mask. Errors: a backend error reading it.
    pub fn rank_pattern(&self, be: &B) -> Result<Option<RankPattern>> {
        let Some(keep) = &self.keep else {
            return Ok(None);
        };
        let bits = be.download(keep)?;
        Ok(Some(
            self.plan
                .layers()
                .zip(&self.offsets)
                .map(|((name, r), &off)| {
                    (
                        name.to_string(),
                        bits[off..off + r].iter().map(|&k| k != 0.0).collect(),
                    )
                })
                .collect(),
        ))
    }

    /// Sets the rank pattern re-applied in the final phase (one upload). Errors: as
    /// [`RankAllocator::set_rank_pattern`].
    pub fn set_rank_pattern(&mut self, be: &B, pattern: RankPattern) -> Result<()> {
        self.plan.set_rank_pattern(pattern)?;
        let pattern = self.plan.rank_pattern().ok_or_else(|| {
            Error::arg("rank_pattern", "the pattern was not kept by the allocator")
        })?;
        let bits: Vec<f32> = self
            .plan
            .layers()
            .flat_map(|(name, _)| pattern[name].iter().map(|&k| f32::from(u8::from(k))))
            .collect();
        self.keep = Some(be.upload(&bits, &[bits.len()])?);
        Ok(())
    }

    /// Forgets the importance EMAs (PEFT `reset_ipt`).
    pub fn reset_ipt(&mut self) {
        self.ema = None;
    }

    /// One call per training step, after the optimizer step and before the gradients are
    /// cleared: [`RankAllocator::update_and_allocate`] on the device (same phases, same
    /// errors), with nothing read back. Returns the budget masked to when a new mask was
    /// computed from the scores, else `None`.
    ///
    /// Errors: `layers` is not exactly the set of layers given to
    /// [`DeviceRankAllocator::new`] (by name and rank, any order) or a tensor has the wrong
    /// shape; the final mask before any update; the final phase without a rank pattern; a
    /// backend error.
    pub fn update_and_allocate(
        &mut self,
        be: &B,
        step: u64,
        layers: &mut [AdaLoraDeviceLayer<'_, B>],
    ) -> Result<Option<usize>> {
        let order = self.plan.match_layers(
            layers,
            |v| (v.name, v.lora_a.dim(0)),
            |v| {
                let (din, dout) = (v.lora_a.dim(1), v.lora_b.dim(0));
                check::adalora(din, dout, v.lora_a, v.lora_b, v.lora_e)?;
                check::adalora(din, dout, v.grad_a, v.grad_b, v.grad_e)?;
                Ok(())
            },
        )?;
        match self.plan.plan(step) {
            StepPlan::Update { mask } => {
                self.update_ipt(be, layers, &order)?;
                if let Some(budget) = mask {
                    self.mask_to_budget(be, budget, layers, &order)?;
                }
                Ok(mask)
            }
            StepPlan::Finalize { budget } => {
                self.mask_to_budget(be, budget, layers, &order)?;
                self.reset_ipt();
                Ok(Some(budget))
            }
            StepPlan::Reapply => {
                let keep = self
                    .keep
                    .as_ref()
                    .ok_or_else(|| self.plan.no_pattern_err(step))?;
                for (v, &i) in layers.iter_mut().zip(&order) {
                    be.adalora_apply_mask(v.lora_e, keep, self.offsets[i])?;
                }
                Ok(None)
            }
        }
    }

    fn update_ipt(
        &mut self,
        be: &B,
        layers: &[AdaLoraDeviceLayer<'_, B>],
        order: &[usize],
    ) -> Result<()> {
        if self.ema.is_none() {
            // Zeros in the registered order (PEFT creates each EMA at its first update).
            let mut fresh: Vec<Option<AdaLoraIpt<B>>> = (0..layers.len()).map(|_| None).collect();
            for (v, &i) in layers.iter().zip(order) {
                let (r, din) = (v.lora_a.dim(0), v.lora_a.dim(1));
                fresh[i] = Some(AdaLoraIpt::zeros(be, r, din, v.lora_b.dim(0))?);
            }
            self.ema = Some(fresh.into_iter().flatten().collect());
        }
        let (b1, b2) = self.plan.betas();
        let ema = self.ema.as_mut().ok_or_else(no_scores_err)?;
        for (v, &i) in layers.iter().zip(order) {
            let e = &mut ema[i];
            be.adalora_update_ipt(v.lora_a, v.grad_a, &mut e.ipt_a, &mut e.unc_a, b1, b2)?;
            be.adalora_update_ipt(v.lora_b, v.grad_b, &mut e.ipt_b, &mut e.unc_b, b1, b2)?;
            be.adalora_update_ipt(v.lora_e, v.grad_e, &mut e.ipt_e, &mut e.unc_e, b1, b2)?;
        }
        Ok(())
    }

    /// PEFT `mask_to_budget`: triplet scores, global k-th smallest, mask `<=` threshold.
    fn mask_to_budget(
        &mut self,
        be: &B,
        budget: usize,
        layers: &mut [AdaLoraDeviceLayer<'_, B>],
        order: &[usize],
    ) -> Result<()> {
        let ema = self.ema.as_ref().ok_or_else(no_scores_err)?;
        let k = self.plan.kth_for_budget(budget)?;
        for (e, &off) in ema.iter().zip(&self.offsets) {
            be.adalora_triplet_scores(e, &mut self.scores, off)?;
        }
        let threshold = be.adalora_threshold(&self.scores, k)?;
        let keep = be.adalora_rank_mask(&self.scores, &threshold)?;
        for (v, &i) in layers.iter_mut().zip(order) {
            be.adalora_apply_mask(v.lora_e, &keep, self.offsets[i])?;
        }
        self.threshold = Some(threshold);
        self.keep = Some(keep);
        Ok(())
    }
}
