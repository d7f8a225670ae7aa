//! DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) as
//! PEFT 0.21's `DoraLinearLayer` computes it (`use_dora=True` on a LoRA config):
//!
//! ```text
//! n = ||W0 + s B A||_row        one norm per OUTPUT row of [out, in] (PEFT dim=1), DETACHED
//! y = (m / n) ⊙ (x W0^T + s (x A^T) B^T) + bias      the bias is NOT scaled by m / n
//! ```
//!
//! `m = lora_magnitude_vector [out]` is trained; `n` carries no gradient (paper sec. 4.3), so
//! `dA`, `dB` only see the `m/n`-scaled LoRA path and `dm` has no term through `n`. Unlike PEFT,
//! which rebuilds `B A` through an identity matrix and the full `[out, in]` norm every forward,
//! `n` is computed by the low-rank identity of [`Backend::lowrank_row_norms`] from the cached
//! `||W0||_row^2` (W0 is frozen). In the fused op DoRA is the LoRA term under the column scale
//! `m / n` ([`LowRank::dora`]). Dropout is not modelled (PEFT with dropout 0).

use super::lora::{saved_h, wanted};
use super::{Linear, LoraConfig, LoraLayer};
use crate::backend::{Backend, GradWants, LowRank, Tensor};
use crate::error::{Error, Result};

/// What a DoRA forward keeps for its backward.
pub struct DoraSaved<B: Backend> {
    /// `h = x A^T`, `[T, r]`.
    pub h: Tensor<B>,
    /// The unscaled adapted output `z = x W0^T + s h B^T`, `[T, out]` (no bias), so that
    /// `dm = sum_T(dy ⊙ z) / n` needs no recomputation of the base product.
    pub z: Tensor<B>,
}

/// Gradients of one DoRA layer.
pub struct DoraGrads<B: Backend> {
    /// `dL/dx`, `[T, in]`.
    pub dx: Tensor<B>,
    /// `dL/d lora_A`, `[r, in]`.
    pub d_lora_a: Tensor<B>,
    /// `dL/d lora_B`, `[out, r]`.
    pub d_lora_b: Tensor<B>,
    /// `dL/d lora_magnitude_vector`, `[out]`.
    pub d_magnitude: Tensor<B>,
}

/// One DoRA adapter on a linear layer.
#[derive(Clone, Debug)]
pub struct DoraLayer<B: Backend> {
    /// `lora_A [r, in]`.
    pub lora_a: Tensor<B>,
    /// `lora_B [out, r]`.
    pub lora_b: Tensor<B>,
    /// `lora_magnitude_vector [out]` (m); saved by PEFT as `…lora_magnitude_vector` (no
    /// `.weight` in the file).
    pub lora_magnitude_vector: Tensor<B>,
    /// `s = lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub scaling: f32,
    /// `||W0||_row^2 [out]` of the base this layer was built on, computed once.
    base_row_sq: Tensor<B>,
    /// The weight norm the base was merged with, kept for [`DoraLayer::unmerge`]
    /// (PEFT caches it the same way); `Some` while merged.
    merged_weight_norm: Option<Tensor<B>>,
}

/// Saved state of [`DoraLayer::forward`] for [`DoraLayer::backward`].
pub struct DoraLayerSaved<B: Backend> {
    /// The kernel's saved tensors (`h [T, r]`, `z [T, out]`).
    pub kernel: DoraSaved<B>,
    /// The detached weight norm `n [out]` used by this forward.
    pub weight_norm: Tensor<B>,
}

/// `||W0 + s B A||_row [out]` of any base format.
fn base_weight_norm<B: Backend>(
    be: &B,
    base: &Linear<B>,
    w0_row_sq: &Tensor<B>,
    lora_a: &Tensor<B>,
    lora_b: &Tensor<B>,
    scaling: f32,
) -> Result<Tensor<B>> {
    be.lowrank_row_norms(
        base.weight.as_base(),
        w0_row_sq,
        &LowRank::lora(lora_a, lora_b, scaling),
    )
}

impl<B: Backend> DoraLayer<B> {
    /// PEFT's init for `use_dora=True`: LoRA's init ([`LoraLayer::init`]: `lora_A`
    /// kaiming-uniform, `lora_B = 0`), then `m = ||W0 + s B A||_row`, which is `||W0||_row`
    /// since `B = 0`: the layer starts equal to the base.
    pub fn init(be: &B, base: &Linear<B>, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        let (out, inp) = base.weight.dims();
        let lora = LoraLayer::init(be, inp, out, cfg, seed)?;
        Self::from_factors(be, base, lora.lora_a, lora.lora_b, lora.scaling, None)
    }

    /// Wraps given factors, checking `lora_A [r, in]`, `lora_B [out, r]` and the magnitude
    /// `[out]` against the base. With `magnitude = None` the magnitude is PEFT's creation-time
    /// value `||W0 + s B A||_row` for these factors (`magnitude_init` in the golden file).
    pub fn from_factors(
        be: &B,
        base: &Linear<B>,
        lora_a: Tensor<B>,
        lora_b: Tensor<B>,
        scaling: f32,
        magnitude: Option<Tensor<B>>,
    ) -> Result<Self> {
        let (out, inp) = base.weight.dims();
        let (r, ain) = lora_a.dims2("lora_A")?;
        if r == 0 || ain != inp {
            return Err(Error::shape(
                "lora_A",
                format!("[r >= 1, {inp}]"),
                lora_a.shape(),
            ));
        }
        lora_b.expect_shape("lora_B", &[out, r])?;
        let base_row_sq = be.row_sq_norms(base.weight.as_base())?;
        let lora_magnitude_vector = match magnitude {
            Some(m) => {
                m.expect_shape("lora_magnitude_vector", &[out])?;
                m
            }
            None => base_weight_norm(be, base, &base_row_sq, &lora_a, &lora_b, scaling)?,
        };
        Ok(DoraLayer {
            lora_a,
            lora_b,
            lora_magnitude_vector,
            scaling,
            base_row_sq,
            merged_weight_norm: None,
        })
    }

    /// Rank r.
    pub fn r(&self) -> usize {
        self.lora_a.dim(0)
    }

    /// Whether the base is currently merged with this adapter.
    pub fn is_merged(&self) -> bool {
        self.merged_weight_norm.is_some()
    }

    /// The detached weight norm `n = ||W0 + s B A||_row [out]` for the current factors.
    pub fn weight_norm(&self, be: &B, base: &Linear<B>) -> Result<Tensor<B>> {
        self.check_unmerged()?;
        base_weight_norm(
            be,
            base,
            &self.base_row_sq,
            &self.lora_a,
            &self.lora_b,
            self.scaling,
        )
    }

    fn check_unmerged(&self) -> Result<()> {
        if self.is_merged() {
            return Err(Error::arg(
                "base",
                "the DoRA adapter is merged into the base; use the base Linear or unmerge first",
            ));
        }
        Ok(())
    }

    /// The term, with the weight norm `n` (`None`: the op computes it).
    fn term<'a>(&'a self, n: Option<&'a Tensor<B>>) -> LowRank<'a, B> {
        LowRank::dora(
            &self.lora_a,
            &self.lora_b,
            self.scaling,
            &self.lora_magnitude_vector,
            n,
        )
    }

    /// Fused forward over the unmerged `base` (dense or NF4), the weight norm taken in the
    /// same op: `(y [T, out], saved)`. Errors while merged.
    pub fn forward(
        &self,
        be: &B,
        base: &Linear<B>,
        x: &Tensor<B>,
    ) -> Result<(Tensor<B>, DoraLayerSaved<B>)> {
        self.check_unmerged()?;
        let out = be.linear_lowrank_with_norm(
            x,
            base.weight.as_base(),
            &self.base_row_sq,
            base.bias.as_ref(),
            &self.term(None),
        )?;
        let missing = |w: &str| Error::arg("saved", format!("the DoRA forward kept no {w}"));
        Ok((
            out.y,
            DoraLayerSaved {
                kernel: DoraSaved {
                    h: saved_h(out.h)?,
                    z: out.z.ok_or_else(|| missing("z"))?,
                },
                weight_norm: out.weight_norm.ok_or_else(|| missing("weight norm"))?,
            },
        ))
    }

    /// Backward from `dy [T, out]` with the saved `x` and state: `dx`, `dA`, `dB`, `dm`.
    pub fn backward(
        &self,
        be: &B,
        base: &Linear<B>,
        x: &Tensor<B>,
        saved: &DoraLayerSaved<B>,
        dy: &Tensor<B>,
    ) -> Result<DoraGrads<B>> {
        let g = be.linear_lowrank_backward(
            dy,
            x,
            &saved.kernel.h,
            Some(&saved.kernel.z),
            base.weight.as_base(),
            &self.term(Some(&saved.weight_norm)),
            GradWants::DORA,
        )?;
        Ok(DoraGrads {
            dx: g.dx,
            d_lora_a: wanted(g.d_lora_a, "lora_A")?,
            d_lora_b: wanted(g.d_lora_b, "lora_B")?,
            d_magnitude: wanted(g.d_magnitude, "lora_magnitude_vector")?,
        })
    }

    /// PEFT `merge`: `W = (m / n)[:, None] ⊙ (W0 + s B A)` in place, with `n = ||W0 + s B A||_row`
    /// ([`Backend::lowrank_merge_with_norm`]: the norm of the merged rows, as PEFT takes it); n
    /// is kept for [`DoraLayer::unmerge`]. Errors if already merged, or over an NF4 base: merge
    /// into `base.dequantized(be)?` instead (this same layer works there: its cached
    /// `||W0||_row^2` is of the same dequantized values).
    pub fn merge(&mut self, be: &B, base: &mut Linear<B>) -> Result<()> {
        self.check_unmerged()?;
        let w = base.weight.dense_mut_or_err("DoRA merge")?;
        let n = be.lowrank_merge_with_norm(w, &self.base_row_sq, &self.term(None))?;
        self.merged_weight_norm = Some(n);
        Ok(())
    }

    /// PEFT `unmerge`: `W0 = W / (m / n)[:, None] - s B A` with the n cached by the merge.
    /// Numerics: rounding errors of each row grow by `n / m`; with `m ≈ n` the round trip gives
    /// W0 back to a few ulp of `max(|W0|, |s B A|)`. Errors if not merged, or if some `m / n`
    /// is zero (the merge then destroyed that row and it cannot be recovered).
    pub fn unmerge(&mut self, be: &B, base: &mut Linear<B>) -> Result<()> {
        let Some(n) = self.merged_weight_norm.as_ref() else {
            return Err(Error::arg("base", "the DoRA adapter is not merged"));
        };
        let w = base.weight.dense_mut_or_err("DoRA unmerge")?;
        be.lowrank_merge(w, &self.term(Some(n)), -1.0)?;
        self.merged_weight_norm = None;
        Ok(())
    }
}
