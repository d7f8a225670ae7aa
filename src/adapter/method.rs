//! One type for "the adapter on a projection", whichever method it is, so that a model holds
//! and trains any of them through the same code path.

use super::{
    AdaLoraLayer, BeftLayer, DoraLayer, DoraLayerSaved, Ia3Layer, Ia3Saved, Linear, LoraLayer,
    VeraLayer, VeraShared,
};
use crate::backend::{Backend, LowRank, Tensor};
use crate::error::{Error, Result};

/// The methods that put an adapter on a projection, named as PEFT's `peft_type` (DoRA is LoRA
/// with `use_dora`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodKind {
    Lora,
    Dora,
    Vera,
    AdaLora,
    /// IA3: a learned scale of the projection's output (or input, feed-forward layers).
    Ia3,
    /// BEFT: a learned bias added to the projection.
    Beft,
}

impl MethodKind {
    /// Whether the method adds a low-rank term (the LoRA family).
    pub fn is_low_rank(self) -> bool {
        matches!(
            self,
            MethodKind::Lora | MethodKind::Dora | MethodKind::Vera | MethodKind::AdaLora
        )
    }
}

/// The adapter of one projection.
#[derive(Clone, Debug)]
pub enum Adapter<B: Backend> {
    Lora(LoraLayer<B>),
    Dora(DoraLayer<B>),
    Vera(VeraLayer<B>),
    AdaLora(AdaLoraLayer<B>),
    Ia3(Ia3Layer<B>),
    Beft(BeftLayer<B>),
}

/// What a forward pass keeps for the backward pass.
pub enum AdapterSaved<B: Backend> {
    /// `h = x A^T` (LoRA), `x As^T` (VeRA) or `x (A ⊙ E)^T` (AdaLoRA), `[T, r]`.
    H(Tensor<B>),
    /// DoRA's saved state.
    Dora(DoraLayerSaved<B>),
    /// IA3's unscaled output (output scaling).
    Ia3(Ia3Saved<B>),
    /// Nothing (bias tuning).
    None,
}

fn need_shared<B: Backend>(shared: Option<&VeraShared<B>>) -> Result<&VeraShared<B>> {
    shared.ok_or_else(|| Error::arg("vera_A", "a VeRA adapter needs the shared projections"))
}

fn wrong_saved() -> Error {
    Error::arg(
        "saved",
        "saved state does not belong to this adapter's method",
    )
}

impl<B: Backend> Adapter<B> {
    /// Which method this is.
    pub fn kind(&self) -> MethodKind {
        match self {
            Adapter::Lora(_) => MethodKind::Lora,
            Adapter::Dora(_) => MethodKind::Dora,
            Adapter::Vera(_) => MethodKind::Vera,
            Adapter::AdaLora(_) => MethodKind::AdaLora,
            Adapter::Ia3(_) => MethodKind::Ia3,
            Adapter::Beft(_) => MethodKind::Beft,
        }
    }

    /// The trainable tensors with the name suffix PEFT's state dict uses for them (after the
    /// module path): LoRA `lora_A.weight`, `lora_B.weight`; DoRA adds `lora_magnitude_vector`;
    /// VeRA `vera_lambda_b`, `vera_lambda_d`; AdaLoRA `lora_A`, `lora_B`, `lora_E`; IA3
    /// `ia3_l`; BEFT `beft_bias`. Gradients
    /// from [`Adapter::backward`] come in this order.
    pub fn params(&self) -> Vec<(&'static str, &Tensor<B>)> {
        match self {
            Adapter::Lora(l) => vec![("lora_A.weight", &l.lora_a), ("lora_B.weight", &l.lora_b)],
            Adapter::Dora(l) => vec![
                ("lora_A.weight", &l.lora_a),
                ("lora_B.weight", &l.lora_b),
                ("lora_magnitude_vector", &l.lora_magnitude_vector),
            ],
            Adapter::Vera(l) => vec![
                ("vera_lambda_b", &l.vera_lambda_b),
                ("vera_lambda_d", &l.vera_lambda_d),
            ],
            Adapter::AdaLora(l) => vec![
                ("lora_A", &l.lora_a),
                ("lora_B", &l.lora_b),
                ("lora_E", &l.lora_e),
            ],
            Adapter::Ia3(l) => vec![("ia3_l", &l.ia3_l)],
            Adapter::Beft(l) => vec![("beft_bias", &l.beft_bias)],
        }
    }

    /// Mutable trainable tensors, in the order of [`Adapter::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Tensor<B>> {
        match self {
            Adapter::Lora(l) => vec![&mut l.lora_a, &mut l.lora_b],
            Adapter::Dora(l) => vec![&mut l.lora_a, &mut l.lora_b, &mut l.lora_magnitude_vector],
            Adapter::Vera(l) => vec![&mut l.vera_lambda_b, &mut l.vera_lambda_d],
            Adapter::AdaLora(l) => vec![&mut l.lora_a, &mut l.lora_b, &mut l.lora_e],
            Adapter::Ia3(l) => vec![&mut l.ia3_l],
            Adapter::Beft(l) => vec![&mut l.beft_bias],
        }
    }

    /// The adapter as a plain low-rank term over its base ([`LowRank`]): LoRA/rsLoRA, VeRA
    /// (`shared`: its projections) and AdaLoRA, the terms a mixed batch can pool
    /// ([`crate::backend::multi`]). Errors: DoRA (its column scale rescales the base product),
    /// IA3 and BEFT (no low-rank term), a VeRA adapter without `shared`, an AdaLoRA ranknum
    /// that is not positive.
    pub fn lowrank_term<'a>(&'a self, shared: Option<&'a VeraShared<B>>) -> Result<LowRank<'a, B>> {
        match self {
            Adapter::Lora(l) => Ok(l.term()),
            Adapter::Vera(l) => Ok(l.term(need_shared(shared)?)),
            Adapter::AdaLora(l) => l.term(),
            Adapter::Dora(_) | Adapter::Ia3(_) | Adapter::Beft(_) => Err(Error::arg(
                "adapter",
                format!(
                    "a {:?} adapter is not a plain low-rank term over the base (DoRA rescales \
                     the base product, IA3 scales it, BEFT adds a bias): it cannot share a \
                     mixed batch; merge it or serve it alone",
                    self.kind()
                ),
            )),
        }
    }

    /// Forward over `base`: `(y [T, out], saved)`. `shared` holds VeRA's projections.
    pub fn forward(
        &self,
        be: &B,
        base: &Linear<B>,
        shared: Option<&VeraShared<B>>,
        x: &Tensor<B>,
    ) -> Result<(Tensor<B>, AdapterSaved<B>)> {
        Ok(match self {
            Adapter::Lora(l) => {
                let (y, h) = l.forward(be, base, x)?;
                (y, AdapterSaved::H(h))
            }
            Adapter::Dora(l) => {
                let (y, s) = l.forward(be, base, x)?;
                (y, AdapterSaved::Dora(s))
            }
            Adapter::Vera(l) => {
                let (y, h) = l.forward(be, need_shared(shared)?, base, x)?;
                (y, AdapterSaved::H(h))
            }
            Adapter::AdaLora(l) => {
                let (y, h) = l.forward(be, base, x)?;
                (y, AdapterSaved::H(h))
            }
            Adapter::Ia3(l) => {
                let (y, s) = l.forward(be, base, x)?;
                (y, AdapterSaved::Ia3(s))
            }
            Adapter::Beft(l) => (l.forward(be, base, x)?, AdapterSaved::None),
        })
    }

    /// Backward from `dy [T, out]`: `dx` and the gradients in the order of [`Adapter::params`].
    pub fn backward(
        &self,
        be: &B,
        base: &Linear<B>,
        shared: Option<&VeraShared<B>>,
        x: &Tensor<B>,
        saved: &AdapterSaved<B>,
        dy: &Tensor<B>,
    ) -> Result<(Tensor<B>, Vec<Tensor<B>>)> {
        Ok(match (self, saved) {
            (Adapter::Lora(l), AdapterSaved::H(h)) => {
                let (dx, (da, db)) = l.backward(be, base, x, h, dy)?;
                (dx, vec![da, db])
            }
            (Adapter::Dora(l), AdapterSaved::Dora(s)) => {
                let g = l.backward(be, base, x, s, dy)?;
                (g.dx, vec![g.d_lora_a, g.d_lora_b, g.d_magnitude])
            }
            (Adapter::Vera(l), AdapterSaved::H(h)) => {
                let (dx, (dld, dlb)) = l.backward(be, need_shared(shared)?, base, x, h, dy)?;
                (dx, vec![dlb, dld])
            }
            (Adapter::AdaLora(l), AdapterSaved::H(h)) => {
                let g = l.backward(be, base, x, h, dy)?;
                (g.dx, vec![g.d_lora_a, g.d_lora_b, g.d_lora_e])
            }
            (Adapter::Ia3(l), AdapterSaved::Ia3(s)) => {
                let (dx, dl) = l.backward(be, base, x, s, dy)?;
                (dx, vec![dl])
            }
            (Adapter::Beft(l), AdapterSaved::None) => {
                let (dx, db) = l.backward(be, base, dy)?;
                (dx, vec![db])
            }
            _ => return Err(wrong_saved()),
        })
    }

    /// Merges into `base` in place (PEFT `merge`).
    pub fn merge(
        &mut self,
        be: &B,
        base: &mut Linear<B>,
        shared: Option<&VeraShared<B>>,
    ) -> Result<()> {
        match self {
            Adapter::Lora(l) => l.merge(be, base),
            Adapter::Dora(l) => l.merge(be, base),
            Adapter::Vera(l) => l.merge(be, need_shared(shared)?, base),
            Adapter::AdaLora(l) => l.merge(be, base),
            Adapter::Ia3(l) => l.merge(be, base),
            Adapter::Beft(l) => l.merge_sign(be, base, 1.0),
        }
    }

    /// Removes a previous [`Adapter::merge`] from `base` (PEFT `unmerge`).
    pub fn unmerge(
        &mut self,
        be: &B,
        base: &mut Linear<B>,
        shared: Option<&VeraShared<B>>,
    ) -> Result<()> {
        match self {
            Adapter::Lora(l) => l.unmerge(be, base),
            Adapter::Dora(l) => l.unmerge(be, base),
            Adapter::Vera(l) => l.unmerge(be, need_shared(shared)?, base),
            Adapter::AdaLora(l) => l.unmerge(be, base),
            Adapter::Ia3(l) => l.unmerge(be, base),
            Adapter::Beft(l) => l.merge_sign(be, base, -1.0),
        }
    }
}
