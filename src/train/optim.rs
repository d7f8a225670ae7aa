//! AdamW over named trainable tensors, with its moment state on the backend.

use crate::backend::{AdamWParams, Backend, Tensor};
use crate::error::{Error, Result};
use std::collections::HashMap;

/// Moments and step count of one parameter (torch keeps `step` per parameter too).
struct State<B: Backend> {
    exp_avg: Tensor<B>,
    exp_avg_sq: Tensor<B>,
    step: u64,
}

/// `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments) over tensors named as
/// the model names its trainable parameters. A tensor's state is created at its first step,
/// so a parameter that becomes trainable later (gradual unfreezing) starts from zero moments
/// and its own step 1, as it would in torch when added to the optimizer then.
pub struct AdamW<B: Backend> {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    state: HashMap<String, State<B>>,
}

impl<B: Backend> AdamW<B> {
    /// Errors: a beta outside `[0, 1)` or a non-positive eps.
    pub fn new(betas: (f32, f32), eps: f32, weight_decay: f32) -> Result<Self> {
        for (name, b) in [("beta1", betas.0), ("beta2", betas.1)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::arg(name, format!("{b} is outside [0, 1)")));
            }
        }
        if eps <= 0.0 || !eps.is_finite() {
            return Err(Error::arg("eps", format!("{eps} must be positive")));
        }
        Ok(AdamW {
            beta1: betas.0,
            beta2: betas.1,
            eps,
            weight_decay,
            state: HashMap::new(),
        })
    }

    /// One step with learning rate `lr`: `params[i]` (named `names[i]`) moves along
    /// `grads[i]`. Errors: lists of different lengths, a shape that changed since the last
    /// step of that name.
    pub fn step(
        &mut self,
        be: &B,
        names: &[String],
        params: Vec<&mut Tensor<B>>,
        grads: &[Tensor<B>],
        lr: f32,
    ) -> Result<()> {
        if params.len() != names.len() || grads.len() != names.len() {
            return Err(Error::arg(
                "params",
                format!(
                    "{} names, {} params and {} grads",
                    names.len(),
                    params.len(),
                    grads.len()
                ),
            ));
        }
        for ((name, w), g) in names.iter().zip(params).zip(grads) {
            let st = match self.state.entry(name.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(State {
                    exp_avg: be.zeros(w.shape())?,
                    exp_avg_sq: be.zeros(w.shape())?,
                    step: 0,
                }),
            };
            st.step += 1;
            let p = AdamWParams {
                lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
                step: st.step,
            };
            be.adamw_step(w, g, &mut st.exp_avg, &mut st.exp_avg_sq, &p)
                .map_err(|e| Error::arg(name.as_str(), e.to_string()))?;
        }
        Ok(())
    }

    /// Bytes of optimizer state (f32 moments), for memory reports.
    pub fn state_bytes(&self) -> usize {
        self.state
            .values()
            .map(|s| 4 * (s.exp_avg.len() + s.exp_avg_sq.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    /// Two steps of torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    /// on p = [1, -2] with grads [0.5, -1] then [0.25, 2], written out by hand from torch's
    /// update rule.
    #[test]
    fn matches_torch_adamw_update_rule() {
        let be = Cpu;
        let mut opt = AdamW::<Cpu>::new((0.9, 0.999), 1e-8, 0.01).unwrap();
        let mut p = be.upload(&[1.0, -2.0], &[2]).unwrap();
        let names = vec!["p".to_string()];
        let (lr, b1, b2, eps, wd) = (0.1f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, g) in [[0.5f64, -1.0], [0.25, 2.0]].iter().enumerate() {
            let gt = be.upload(&[g[0] as f32, g[1] as f32], &[2]).unwrap();
            opt.step(&be, &names, vec![&mut p], &[gt], lr as f32)
                .unwrap();
            let step = (t + 1) as i32;
            for i in 0..2 {
                want[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let denom = (v[i] / (1.0 - b2.powi(step))).sqrt() + eps;
                want[i] -= lr / (1.0 - b1.powi(step)) * m[i] / denom;
            }
        }
        for (got, w) in p.data().iter().zip(want) {
            assert!((*got as f64 - w).abs() < 1e-6, "{got} vs {w}");
        }
        assert_eq!(opt.state_bytes(), 16);
    }
}
