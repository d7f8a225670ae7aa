//! [`VeraLinear`] over shared [`VeraProjections`].

use std::sync::{Arc, RwLock};

use candle_core::Module;
use candle_nn::{Init, VarBuilder};

use super::frozen::{FrozenLinear, check_vb, fused, merged_with, take};
use super::op::{CTensor, Method, host_tensor, lf, to_candle};
use crate::Cpu;
use crate::adapter::VeraShared;
use crate::backend::LowRank;

/// VeRA's frozen projections shared by every layer of a model (Kopiczko et al. 2024):
/// `vera_A [r, max_in]`, `vera_B [max_out, r]`; a layer uses the leading `in` columns of A and
/// `out` rows of B. Saved in the adapter (`base_model.vera_A` / `vera_B`), as PEFT does with
/// `save_projection=True`.
#[derive(Clone, Debug)]
pub struct VeraProjections {
    /// Behind a lock so that [`super::load_peft`] can replace the projections of every layer
    /// that shares them.
    shared: Arc<RwLock<Arc<VeraShared<Cpu>>>>,
}

impl VeraProjections {
    /// Kaiming-uniform projections (PEFT's init, from lorafuse's ChaCha8 generator seeded by
    /// `seed`, not torch's). Errors: a zero size.
    pub fn new(r: usize, max_in: usize, max_out: usize, seed: u64) -> candle_core::Result<Self> {
        let sh = VeraShared::init(&Cpu, r, max_in, max_out, seed).map_err(lf)?;
        Ok(Self::wrap(sh))
    }
    /// Given projections (f32 CPU tensors `[r, max_in]`, `[max_out, r]`). Errors: shapes.
    pub fn from_tensors(vera_a: &CTensor, vera_b: &CTensor) -> candle_core::Result<Self> {
        let sh = VeraShared::from_tensors(take(vera_a, "vera_A", 2)?, take(vera_b, "vera_B", 2)?)
            .map_err(lf)?;
        Ok(Self::wrap(sh))
    }
    fn wrap(sh: VeraShared<Cpu>) -> Self {
        VeraProjections {
            shared: Arc::new(RwLock::new(Arc::new(sh))),
        }
    }
    /// r.
    pub fn r(&self) -> usize {
        self.shared().map(|s| s.r()).unwrap_or(0)
    }
    /// `(vera_A, vera_B)` as candle tensors.
    pub fn to_candle(&self) -> candle_core::Result<(CTensor, CTensor)> {
        let sh = self.shared()?;
        Ok((to_candle(sh.vera_a.clone())?, to_candle(sh.vera_b.clone())?))
    }
    /// The current projections.
    pub(crate) fn shared(&self) -> candle_core::Result<Arc<VeraShared<Cpu>>> {
        match self.shared.read() {
            Ok(s) => Ok(s.clone()),
            Err(_) => candle_core::bail!("lorafuse: the VeRA projections' lock is poisoned"),
        }
    }
    /// Replaces the projections of every layer sharing them. Errors: another r or smaller
    /// sizes than the current ones (the layers were built for those).
    pub(crate) fn replace(&self, sh: VeraShared<Cpu>) -> candle_core::Result<()> {
        let cur = self.shared()?;
        if sh.r() != cur.r()
            || sh.vera_a.dim(1) < cur.vera_a.dim(1)
            || sh.vera_b.dim(0) < cur.vera_b.dim(0)
        {
            candle_core::bail!(
                "lorafuse: VeRA projections {:?} / {:?} do not fit the layers' {:?} / {:?}",
                sh.vera_a.shape(),
                sh.vera_b.shape(),
                cur.vera_a.shape(),
                cur.vera_b.shape()
            );
        }
        match self.shared.write() {
            Ok(mut s) => *s = Arc::new(sh),
            Err(_) => candle_core::bail!("lorafuse: the VeRA projections' lock is poisoned"),
        }
        Ok(())
    }
    /// Whether two handles share the same projections.
    pub fn same(&self, other: &VeraProjections) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// A VeRA layer (PEFT `vera.Linear`): `y = x W0^T + bias + lambda_b ⊙ ((x A^T) ⊙ lambda_d)
/// B^T` over the shared projections, `vera_lambda_d [r]` and `vera_lambda_b [out]` trainable.
#[derive(Clone, Debug)]
pub struct VeraLinear {
    pub(super) base: FrozenLinear,
    projections: VeraProjections,
    /// `vera_lambda_d [r]`.
    pub vera_lambda_d: CTensor,
    /// `vera_lambda_b [out]`.
    pub vera_lambda_b: CTensor,
}

impl VeraLinear {
    /// A VeRA layer over a copy of `linear` (see [`VeraLinear::new`]).
    pub fn from_linear(
        linear: &candle_nn::Linear,
        projections: &VeraProjections,
        d_initial: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Self::new(
            FrozenLinear::from_linear(linear)?,
            projections,
            d_initial,
            vb,
        )
    }

    /// PEFT's init: `lambda_d = d_initial` (PEFT default 0.1), `lambda_b = 0`. Errors: the
    /// projections are smaller than the layer; the VarBuilder as [`LoraLinear::new`].
    pub fn new(
        base: FrozenLinear,
        projections: &VeraProjections,
        d_initial: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        check_vb(&vb)?;
        let sh = projections.shared()?;
        if sh.vera_a.dim(1) < base.in_features() || sh.vera_b.dim(0) < base.out_features() {
            candle_core::bail!(
                "lorafuse VeraLinear: projections [{}, {}] / [{}, {}] are smaller than the layer \
                 [{}, {}]",
                sh.vera_a.dim(0),
                sh.vera_a.dim(1),
                sh.vera_b.dim(0),
                sh.vera_b.dim(1),
                base.out_features(),
                base.in_features()
            );
        }
        let d = vb.get_with_hints(sh.r(), "vera_lambda_d", Init::Const(d_initial))?;
        let b = vb.get_with_hints(base.out_features(), "vera_lambda_b", Init::Const(0.0))?;
        Ok(VeraLinear {
            base,
            projections: projections.clone(),
            vera_lambda_d: d,
            vera_lambda_b: b,
        })
    }

    /// The frozen base.
    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }
    /// The shared projections.
    pub fn projections(&self) -> &VeraProjections {
        &self.projections
    }

    /// PEFT's merge: `W0 + diag(lambda_b) B diag(lambda_d) A` as a `candle_nn::Linear`.
    pub fn merged(&self) -> candle_core::Result<candle_nn::Linear> {
        let (d, b) = (
            host_tensor(&self.vera_lambda_d, "vera_lambda_d")?,
            host_tensor(&self.vera_lambda_b, "vera_lambda_b")?,
        );
        let sh = self.projections.shared()?;
        merged_with(&self.base, &LowRank::vera(&sh.vera_a, &sh.vera_b, &d, &b))
    }
}

impl Module for VeraLinear {
    fn forward(&self, x: &CTensor) -> candle_core::Result<CTensor> {
        let mut frozen = self.base.frozen();
        frozen.vera = Some(self.projections.shared()?);
        fused(
            x,
            frozen,
            Method::Vera,
            &self.vera_lambda_d,
            &self.vera_lambda_b,
            "VeraLinear",
        )
    }
}
