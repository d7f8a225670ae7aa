//! AdaLoRA's SVD-form layer (Zhang et al. 2023, "Adaptive Budget Allocation for
//! Parameter-Efficient Fine-Tuning", arXiv 2303.10512) as PEFT 0.21's `adalora.SVDLinear`
//! computes it:
//!
//! ```text
//! c = scaling / (ranknum + 1e-5)     scaling = lora_alpha (NOT alpha/r) if lora_alpha > 0 else r
//!                                    ranknum = float(init_r), never changed by masking
//! y = x W0^T + bias + (((x A^T) ⊙ E^T) B^T) * c          E = lora_E [r, 1], one scale per rank
//! ```
//!
//! `lora_A [r, in]` (Q), `lora_E [r, 1]` (Λ), `lora_B [out, r]` (P) are all trained. Masking a
//! rank zeroes its E entry ([`AdaLoraLayer::apply_rank_mask`]); its gradient is still computed
//! (PEFT's RankAllocator re-applies the mask after each step). The RankAllocator itself (budget
//! schedule, importance scores) and the orthogonality regulariser are in
//! [`super::rank_allocator`] (host) and [`super::device_rank_allocator`] (on the backend).

use super::Linear;
use super::lora::{saved_h, wanted};
use crate::backend::{Backend, GradWants, LowRank, Tensor, check};
use crate::error::{Error, Result};
use rand::{RngExt, SeedableRng};

/// One AdaLoRA adapter on a linear layer.
#[derive(Clone, Debug)]
pub struct AdaLoraLayer<B: Backend> {
    /// `lora_A [r, in]` (saved as `…lora_A`, no `.weight`).
    pub lora_a: Tensor<B>,
    /// `lora_B [out, r]`.
    pub lora_b: Tensor<B>,
    /// `lora_E [r, 1]`.
    pub lora_e: Tensor<B>,
    /// PEFT's `scaling`: `lora_alpha` if it is > 0, else r.
    pub scaling: f32,
    /// PEFT's `ranknum`: `init_r`, not saved; a loaded adapter whose masked ranks were dropped
    /// still divides by init_r.
    pub ranknum: f32,
}

/// Gradients of one AdaLoRA layer.
pub struct AdaLoraGrads<B: Backend> {
    /// `dL/dx`, `[T, in]`.
    pub dx: Tensor<B>,
    /// `dL/d lora_A`, `[r, in]`.
    pub d_lora_a: Tensor<B>,
    /// `dL/d lora_B`, `[out, r]`.
    pub d_lora_b: Tensor<B>,
    /// `dL/d lora_E`, `[r, 1]`; non-zero for masked ranks too (masking zeroes E, not its
    /// gradient).
    pub d_lora_e: Tensor<B>,
}

impl<B: Backend> AdaLoraLayer<B> {
    /// PEFT's `scaling` rule: `lora_alpha` if `lora_alpha > 0`, else `r`.
    pub fn scaling_for(lora_alpha: f32, r: usize) -> f32 {
        if lora_alpha > 0.0 {
            lora_alpha
        } else {
            r as f32
        }
    }

    /// PEFT's init (`AdaLoraLayer.reset_lora_parameters`): `lora_E = 0`, `lora_A` and `lora_B`
    /// normal with mean 0 and std 0.02, so the layer starts equal to the base; `ranknum = r`.
    /// The normals come from ChaCha8 seeded by `seed` (Box-Muller), not torch's stream.
    pub fn init(be: &B, base: &Linear<B>, r: usize, lora_alpha: f32, seed: u64) -> Result<Self> {
        if r == 0 {
            return Err(Error::arg("r", "AdaLoRA init_r must be at least 1"));
        }
        let (out, inp) = base.weight.dims();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut normal = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                    let u2: f64 = rng.random_range(0.0..1.0);
                    (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect()
        };
        let a = normal(r * inp);
        let b = normal(out * r);
        Ok(AdaLoraLayer {
            lora_a: be.upload(&a, &[r, inp])?,
            lora_b: be.upload(&b, &[out, r])?,
            lora_e: be.zeros(&[r, 1])?,
            scaling: Self::scaling_for(lora_alpha, r),
            ranknum: r as f32,
        })
    }

    /// Wraps given tensors, checking `lora_A [r, in]`, `lora_B [out, r]`, `lora_E [r, 1]`
    /// against the base. `scaling` is PEFT's (see [`AdaLoraLayer::scaling_for`]); `ranknum` is
    /// init_r (which may exceed r when masked ranks were dropped on save).
    pub fn from_factors(
        base: &Linear<B>,
        lora_a: Tensor<B>,
        lora_b: Tensor<B>,
        lora_e: Tensor<B>,
        scaling: f32,
        ranknum: f32,
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
        lora_e.expect_shape("lora_E", &[r, 1])?;
        if !(ranknum.is_finite() && ranknum > 0.0) {
            return Err(Error::arg("ranknum", format!("must be > 0, got {ranknum}")));
        }
        Ok(AdaLoraLayer {
            lora_a,
            lora_b,
            lora_e,
            scaling,
            ranknum,
        })
    }

    /// Rank r (rows of `lora_A`).
    pub fn r(&self) -> usize {
        self.lora_a.dim(0)
    }

    /// The effective factor `c = scaling / (ranknum + 1e-5)` (f32, as PEFT).
    pub fn factor(&self) -> f32 {
        self.scaling / (self.ranknum + 1e-5)
    }

    /// Zeroes `lora_E` where `keep[i]` is false (PEFT `RankAllocator.mask_using_rank_pattern`);
    /// `ranknum` is unchanged. Errors: `keep.len() != r`.
    pub fn apply_rank_mask(&mut self, be: &B, keep: &[bool]) -> Result<()> {
        let r = self.r();
        if keep.len() != r {
            return Err(Error::arg(
                "rank_mask",
                format!("{} entries for rank {r}", keep.len()),
            ));
        }
        let mut e = be.download(&self.lora_e)?;
        for (v, &k) in e.iter_mut().zip(keep) {
            if !k {
                *v = 0.0;
            }
        }
        self.lora_e = be.upload(&e, &[r, 1])?;
        Ok(())
    }

    /// The term: `lora_E` per rank, the factor `c = scaling / (ranknum + 1e-5)`. Errors: a
    /// ranknum that is not positive.
    pub fn term(&self) -> Result<LowRank<'_, B>> {
        let c = check::adalora_factor(self.scaling, self.ranknum)?;
        Ok(LowRank::adalora(
            &self.lora_a,
            &self.lora_b,
            &self.lora_e,
            c,
        ))
    }

    /// Fused forward over `base` (dense or NF4: QAdaLoRA): `(y [T, out], h = x A^T [T, r])`
    /// (h before E's per-rank scale).
    pub fn forward(
        &self,
        be: &B,
        base: &Linear<B>,
        x: &Tensor<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let out = base.forward_lowrank(be, x, &self.term()?)?;
        Ok((out.y, saved_h(out.h)?))
    }

    /// Backward from `dy [T, out]` with the saved `x`, `h`: dx, dA, dB, dE.
    pub fn backward(
        &self,
        be: &B,
        base: &Linear<B>,
        x: &Tensor<B>,
        h: &Tensor<B>,
        dy: &Tensor<B>,
    ) -> Result<AdaLoraGrads<B>> {
        let g = be.linear_lowrank_backward(
            dy,
            x,
            h,
            None,
            base.weight.as_base(),
            &self.term()?,
            GradWants::ADALORA,
        )?;
        Ok(AdaLoraGrads {
            dx: g.dx,
            d_lora_a: wanted(g.d_lora_a, "lora_A")?,
            d_lora_b: wanted(g.d_lora_b, "lora_B")?,
            d_lora_e: wanted(g.d_rank_scale, "lora_E")?,
        })
    }

    /// PEFT `merge`: `W0 += c B (A ⊙ E)` in place.
    pub fn merge(&self, be: &B, base: &mut Linear<B>) -> Result<()> {
        let w = base.weight.dense_mut_or_err("AdaLoRA merge")?;
        be.lowrank_merge(w, &self.term()?, 1.0)
    }

    /// PEFT `unmerge`: `W0 -= c B (A ⊙ E)` in place.
    pub fn unmerge(&self, be: &B, base: &mut Linear<B>) -> Result<()> {
        let w = base.weight.dense_mut_or_err("AdaLoRA unmerge")?;
        be.lowrank_merge(w, &self.term()?, -1.0)
    }
}
