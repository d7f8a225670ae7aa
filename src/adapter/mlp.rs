//! A small MLP of `nn.Linear` layers with biases and one activation between them, trained in
//! full: P-tuning's prompt encoder (`mlp_head`: Linear, ReLU, Linear, ReLU, Linear) and prefix
//! tuning's projection (`transform`: Linear, tanh, Linear), as PEFT builds them.

use crate::backend::{Activation, Axis, Backend, Tensor};
use crate::error::{Error, Result};
use rand::{RngExt, SeedableRng};

/// Linear layers `(weight [out, in], bias [out])` with `act` after every layer but the last.
#[derive(Clone, Debug)]
pub struct Mlp<B: Backend> {
    pub layers: Vec<(Tensor<B>, Tensor<B>)>,
    pub act: Activation,
}

/// What [`Mlp::forward`] keeps: each layer's input and pre-activation.
pub struct MlpSaved<B: Backend> {
    inputs: Vec<Tensor<B>>,
    pre: Vec<Tensor<B>>,
}

impl<B: Backend> Mlp<B> {
    /// torch's default `nn.Linear` init (kaiming-uniform with a = sqrt(5): weight and bias
    /// `U(-1/sqrt(in), 1/sqrt(in))`) for the widths `dims[0] -> dims[1] -> ...`, from our own
    /// seeded generator (not torch's stream). Errors: fewer than two widths, a zero width.
    pub fn init(be: &B, dims: &[usize], act: Activation, seed: u64) -> Result<Self> {
        if dims.len() < 2 || dims.contains(&0) {
            return Err(Error::arg(
                "mlp",
                format!("widths {dims:?}: need two or more, non-zero"),
            ));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::new();
        for w in dims.windows(2) {
            let (i, o) = (w[0], w[1]);
            let b = 1.0 / (i as f32).sqrt();
            let wt: Vec<f32> = (0..o * i).map(|_| rng.random_range(-b..b)).collect();
            let bs: Vec<f32> = (0..o).map(|_| rng.random_range(-b..b)).collect();
            layers.push((be.upload(&wt, &[o, i])?, be.upload(&bs, &[o])?));
        }
        Ok(Mlp { layers, act })
    }

    /// Errors: a weight that is not 2-D, a bias not `[out]`, widths that do not chain.
    pub fn validate(&self) -> Result<()> {
        for (i, (w, b)) in self.layers.iter().enumerate() {
            let (o, inp) = w.dims2(&format!("layer {i} weight"))?;
            b.expect_shape(&format!("layer {i} bias"), &[o])?;
            if i > 0 && self.layers[i - 1].0.dim(0) != inp {
                return Err(Error::shape(
                    format!("layer {i} weight"),
                    format!("[out, {}]", self.layers[i - 1].0.dim(0)),
                    w.shape(),
                ));
            }
        }
        Ok(())
    }

    /// Input and output widths.
    pub fn dims(&self) -> (usize, usize) {
        (
            self.layers.first().map_or(0, |l| l.0.dim(1)),
            self.layers.last().map_or(0, |l| l.0.dim(0)),
        )
    }

    /// `y [n, out]` for x `[n, in]`.
    pub fn forward(&self, be: &B, x: &Tensor<B>) -> Result<(Tensor<B>, MlpSaved<B>)> {
        let mut saved = MlpSaved {
            inputs: Vec::new(),
            pre: Vec::new(),
        };
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, (w, b)) in self.layers.iter().enumerate() {
            let z = be.linear(&h, w, Some(b))?;
            saved.inputs.push(h);
            h = if i < last {
                let a = be.activation(&z, self.act)?;
                saved.pre.push(z);
                a
            } else {
                z
            };
        }
        Ok((h, saved))
    }

    /// `(dx, [dW, db] per layer)` from dy `[n, out]`.
    pub fn backward(
        &self,
        be: &B,
        saved: &MlpSaved<B>,
        dy: &Tensor<B>,
    ) -> Result<(Tensor<B>, Vec<Tensor<B>>)> {
        let mut grads = vec![None; 2 * self.layers.len()];
        let mut g = dy.clone();
        for i in (0..self.layers.len()).rev() {
            let (w, _) = &self.layers[i];
            if i < self.layers.len() - 1 {
                g = be.activation_backward(&g, &saved.pre[i], self.act)?;
            }
            let mut dw = be.zeros(w.shape())?;
            be.linear_backward_weight(&g, &saved.inputs[i], &mut dw)?;
            grads[2 * i] = Some(dw);
            grads[2 * i + 1] = Some(be.sum_product(&g, None, Axis::Cols)?);
            g = be
                .linear_backward_input(&g, w, None)?
                .ok_or_else(|| Error::arg("dx", "linear_backward_input returned no dx"))?;
        }
        Ok((g, grads.into_iter().flatten().collect()))
    }
}
