//! VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation",
//! arXiv 2310.11454) as PEFT 0.21's `vera.Linear` computes it:
//!
//! ```text
//! As = vera_A[:, :in]   Bs = vera_B[:out, :]     (one frozen pair shared by every layer)
//! y  = x W0^T + bias + lambda_b ⊙ ((lambda_d ⊙ (x As^T)) Bs^T)     NO alpha/r scaling
//! ```
//!
//! Only `vera_lambda_d [r]` and `vera_lambda_b [out]` are trained (r + out per layer).

use super::Linear;
use super::lora::{saved_h, wanted};
use crate::backend::{Backend, GradWants, LowRank, Tensor};
use crate::error::{Error, Result};
use crate::torch_cpu::TorchCapability;
use crate::torch_cpu::rng::TorchGenerator;

/// The frozen random projections shared by all VeRA layers of a model: `vera_A [r, max_in]`,
/// `vera_B [max_out, r]` (state-dict keys `base_model.vera_A`, `base_model.vera_B`).
#[derive(Clone, Debug)]
pub struct VeraShared<B: Backend> {
    pub vera_a: Tensor<B>,
    pub vera_b: Tensor<B>,
}

impl<B: Backend> VeraShared<B> {
    /// PEFT's projections for `projection_prng_key = seed`, bit for bit
    /// (`VeraModel._init_vera_A_vera_B`): one `torch.Generator().manual_seed(seed)` draws
    /// `vera_A [r, max_in]` and then `vera_B [max_out, r]`, each by `_kaiming_init` (uniform in
    /// `±sqrt(3) sqrt(2) / sqrt(fan_in)`, fan_in = `max_in` for A and `r` for B), through
    /// [`TorchGenerator`] under the CPU capability torch would use here (its float sampler
    /// rounds differently under `ATEN_CPU_CAPABILITY=default`). So a PEFT adapter saved with
    /// `save_projection=False` gets the projections PEFT would regenerate.
    ///
    /// Errors: r, max_in or max_out of 0.
    pub fn init(be: &B, r: usize, max_in: usize, max_out: usize, seed: u64) -> Result<Self> {
        if r == 0 || max_in == 0 || max_out == 0 {
            return Err(Error::arg(
                "r",
                format!("VeRA needs r, max_in, max_out >= 1, got {r}, {max_in}, {max_out}"),
            ));
        }
        let cap = TorchCapability::detected();
        let mut g = TorchGenerator::manual_seed(seed);
        let a = g.peft_kaiming_uniform(r, max_in, cap);
        let b = g.peft_kaiming_uniform(max_out, r, cap);
        Ok(VeraShared {
            vera_a: be.upload(&a, &[r, max_in])?,
            vera_b: be.upload(&b, &[max_out, r])?,
        })
    }

    /// Wraps loaded projections, checking `vera_A [r, max_in]` and `vera_B [max_out, r]`.
    pub fn from_tensors(vera_a: Tensor<B>, vera_b: Tensor<B>) -> Result<Self> {
        let (r, _) = vera_a.dims2("vera_A")?;
        let (_, br) = vera_b.dims2("vera_B")?;
        if r == 0 || br != r {
            return Err(Error::shape(
                "vera_B",
                format!("[max_out, {r}] (r from vera_A, r >= 1)"),
                vera_b.shape(),
            ));
        }
        Ok(VeraShared { vera_a, vera_b })
    }

    /// Rank r.
    pub fn r(&self) -> usize {
        self.vera_a.dim(0)
    }
}

/// One VeRA adapter on a linear layer: `vera_lambda_d [r]`, `vera_lambda_b [out]`.
#[derive(Clone, Debug)]
pub struct VeraLayer<B: Backend> {
    pub vera_lambda_d: Tensor<B>,
    pub vera_lambda_b: Tensor<B>,
}

/// Gradients of one VeRA layer: `(dlambda_d [r], dlambda_b [out])`.
pub type VeraGrads<B> = (Tensor<B>, Tensor<B>);

impl<B: Backend> VeraLayer<B> {
    /// PEFT's init: `vera_lambda_b = 0`, `vera_lambda_d = d_initial` (PEFT default 0.1), so the
    /// adapted layer starts equal to the base. Errors: the base is larger than the shared
    /// projections.
    pub fn init(be: &B, shared: &VeraShared<B>, base: &Linear<B>, d_initial: f32) -> Result<Self> {
        let r = shared.r();
        let layer = VeraLayer {
            vera_lambda_d: be.upload(&vec![d_initial; r], &[r])?,
            vera_lambda_b: be.zeros(&[base.out_features()])?,
        };
        layer.check(shared, base)?;
        Ok(layer)
    }

    /// Wraps loaded vectors, checking them against the shared projections and the base.
    pub fn from_vectors(
        shared: &VeraShared<B>,
        base: &Linear<B>,
        vera_lambda_d: Tensor<B>,
        vera_lambda_b: Tensor<B>,
    ) -> Result<Self> {
        let layer = VeraLayer {
            vera_lambda_d,
            vera_lambda_b,
        };
        layer.check(shared, base)?;
        Ok(layer)
    }

    fn check(&self, shared: &VeraShared<B>, base: &Linear<B>) -> Result<()> {
        let (out, inp) = base.weight.dims();
        let r = shared.r();
        if shared.vera_a.dim(1) < inp {
            return Err(Error::shape(
                "vera_A",
                format!("[{r}, max_in >= {inp}]"),
                shared.vera_a.shape(),
            ));
        }
        if shared.vera_b.dim(0) < out {
            return Err(Error::shape(
                "vera_B",
                format!("[max_out >= {out}, {r}]"),
                shared.vera_b.shape(),
            ));
        }
        self.vera_lambda_d.expect_shape("vera_lambda_d", &[r])?;
        self.vera_lambda_b.expect_shape("vera_lambda_b", &[out])
    }

    /// The term: the shared projections under `lambda_d` per rank and `lambda_b` per output.
    pub fn term<'a>(&'a self, shared: &'a VeraShared<B>) -> LowRank<'a, B> {
        LowRank::vera(
            &shared.vera_a,
            &shared.vera_b,
            &self.vera_lambda_d,
            &self.vera_lambda_b,
        )
    }

    /// Fused forward over `base` (dense or NF4: QVeRA): `(y [T, out], h = x As^T [T, r])`.
    pub fn forward(
        &self,
        be: &B,
        shared: &VeraShared<B>,
        base: &Linear<B>,
        x: &Tensor<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let out = base.forward_lowrank(be, x, &self.term(shared))?;
        Ok((out.y, saved_h(out.h)?))
    }

    /// Backward from `dy [T, out]` with the saved `x`, `h`: `(dx, (dlambda_d, dlambda_b))`.
    pub fn backward(
        &self,
        be: &B,
        shared: &VeraShared<B>,
        base: &Linear<B>,
        x: &Tensor<B>,
        h: &Tensor<B>,
        dy: &Tensor<B>,
    ) -> Result<(Tensor<B>, VeraGrads<B>)> {
        let g = be.linear_lowrank_backward(
            dy,
            x,
            h,
            None,
            base.weight.as_base(),
            &self.term(shared),
            GradWants::VERA,
        )?;
        Ok((
            g.dx,
            (
                wanted(g.d_rank_scale, "vera_lambda_d")?,
                wanted(g.d_out_scale, "vera_lambda_b")?,
            ),
        ))
    }

    /// PEFT `merge`: `W0 += (lambda_b[:, None] ⊙ Bs) (lambda_d[:, None] ⊙ As)` in place.
    pub fn merge(&self, be: &B, shared: &VeraShared<B>, base: &mut Linear<B>) -> Result<()> {
        let w = base.weight.dense_mut_or_err("VeRA merge")?;
        be.lowrank_merge(w, &self.term(shared), 1.0)
    }

    /// PEFT `unmerge`: subtracts the same product.
    pub fn unmerge(&self, be: &B, shared: &VeraShared<B>, base: &mut Linear<B>) -> Result<()> {
        let w = base.weight.dense_mut_or_err("VeRA unmerge")?;
        be.lowrank_merge(w, &self.term(shared), -1.0)
    }
}
