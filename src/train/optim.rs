//! AdamW over a list of trainable tensors, with its moment state on the backend.

use crate::backend::{AdamWParams, Backend, Tensor};
use crate::error::{Error, Result};

/// `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments) over a fixed list of
/// tensors. The moments `exp_avg` and `exp_avg_sq` live on the backend beside the parameters.
pub struct AdamW<B: Backend> {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Steps taken so far.
    pub step: u64,
    exp_avg: Vec<Tensor<B>>,
    exp_avg_sq: Vec<Tensor<B>>,
}

impl<B: Backend> AdamW<B> {
    /// Zero moments for parameters of the given shapes. Errors: a beta outside `[0, 1)` or a
    /// non-positive eps.
    pub fn new(
        be: &B,
        shapes: &[Vec<usize>],
        betas: (f32, f32),
        eps: f32,
        weight_decay: f32,
    ) -> Result<Self> {
        for (name, b) in [("beta1", betas.0), ("beta2", betas.1)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::arg(name, format!("{b} is outside [0, 1)")));
            }
        }
        if eps <= 0.0 || !eps.is_finite() {
            return Err(Error::arg("eps", format!("{eps} must be positive")));
        }
        let zeros = |_| -> Result<Vec<Tensor<B>>> { shapes.iter().map(|s| be.zeros(s)).collect() };
        Ok(AdamW {
            beta1: betas.0,
            beta2: betas.1,
            eps,
            weight_decay,
            step: 0,
            exp_avg: zeros(())?,
            exp_avg_sq: zeros(())?,
        })
    }

    /// One step with learning rate `lr` over `params` (same order and shapes as at creation).
    pub fn step(
        &mut self,
        be: &B,
        params: Vec<&mut Tensor<B>>,
        grads: &[Tensor<B>],
        lr: f32,
    ) -> Result<()> {
        if params.len() != self.exp_avg.len() || grads.len() != params.len() {
            return Err(Error::arg(
                "params",
                format!(
                    "{} params and {} grads for an optimizer over {} tensors",
                    params.len(),
                    grads.len(),
                    self.exp_avg.len()
                ),
            ));
        }
        self.step += 1;
        let p = AdamWParams {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step: self.step,
        };
        for (((w, g), m), v) in params
            .into_iter()
            .zip(grads)
            .zip(&mut self.exp_avg)
            .zip(&mut self.exp_avg_sq)
        {
            be.adamw_step(w, g, m, v, &p)?;
        }
        Ok(())
    }
}
