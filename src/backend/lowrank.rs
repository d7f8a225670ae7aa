//! The one description of what a fused epilogue adds to a base product.
//!
//! Every method of the reparameterization family is the same op over a frozen base weight
//! `W [out, in]` (dense, NF4 or bf16, [`Base`]):
//!
//! ```text
//! h  = x A^T                                   [T, r]   (A = lora_a[:, :in])
//! u  = scale * out_scale ⊙ ((h ⊙ rank_scale) B^T)    [T, out] (B = lora_b[:out, :])
//! z  = x W^T + u                               [T, out]
//! y  = col_scale ⊙ z + bias                    [T, out]  (col_scale = magnitude / weight_norm)
//! ```
//!
//! | method (PEFT)      | lora_a / lora_b            | scale                     | rank_scale  | out_scale     | col_scale |
//! |--------------------|----------------------------|---------------------------|-------------|---------------|-----------|
//! | LoRA `lora.Linear` | `lora_A`, `lora_B`         | `lora_alpha / r`          |             |               |           |
//! | rsLoRA             | `lora_A`, `lora_B`         | `lora_alpha / sqrt(r)`    |             |               |           |
//! | DoRA (`use_dora`)  | `lora_A`, `lora_B`         | as LoRA                   |             |               | `m / n`   |
//! | VeRA `vera.Linear` | shared `vera_A`, `vera_B`  | 1                         | `lambda_d`  | `lambda_b`    |           |
//! | AdaLoRA `SVDLinear`| `lora_A`, `lora_B`         | `lora_alpha/(ranknum+1e-5)` | `lora_E`  |               |           |
//!
//! Absent scales are 1. The bias is never scaled (PEFT adds it after DoRA's `m / n`). A is
//! `[r, in]` and B `[out, r]` exactly, except for a `shared` term (VeRA's model-wide
//! projections `[r, max_in]`, `[max_out, r]`), of which the layer uses the leading columns and
//! rows. [`crate::backend::Backend::linear_lowrank`] computes `y` (and keeps `h`, and `z` when
//! there is a column scale, for the backward); its backward
//! ([`crate::backend::Backend::linear_lowrank_backward`]) gives `dx` and the gradient of every
//! part the caller trains ([`GradWants`]), by the chain rule through this one formula; the
//! merge folds the term into a dense W.

use super::{Bf16Weight, Kernels, Nf4Weight, Tensor};

/// A frozen base weight `[out, in]` as a fused product reads it.
pub enum Base<'a, B: Kernels> {
    /// A plain `[out, in]` tensor (f32, or narrower where the backend stores frozen weights so).
    Dense(&'a Tensor<B>),
    /// bitsandbytes NF4, dequantized tile by tile inside the product (QLoRA).
    Nf4(&'a Nf4Weight<B>),
    /// bf16 storage (`--compute-dtype bf16`), widened to f32 inside the product.
    Bf16(&'a Bf16Weight<B>),
}

impl<B: Kernels> Clone for Base<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Kernels> Copy for Base<'_, B> {}

impl<B: Kernels> std::fmt::Debug for Base<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Base::Dense(w) => write!(f, "Dense{:?}", w.shape()),
            Base::Nf4(w) => write!(f, "{w:?}"),
            Base::Bf16(w) => write!(f, "{w:?}"),
        }
    }
}

impl<'a, B: Kernels> Base<'a, B> {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Base::Dense(w) => (w.dim(0), w.dim(1)),
            Base::Nf4(w) => w.dims(),
            Base::Bf16(w) => w.dims(),
        }
    }
}

impl<'a, B: Kernels> From<&'a Tensor<B>> for Base<'a, B> {
    fn from(w: &'a Tensor<B>) -> Self {
        Base::Dense(w)
    }
}

/// DoRA's per-output column scale `m / n` (Liu et al. 2024, sec. 4.3): `magnitude`
/// (`lora_magnitude_vector`, trainable) over `weight_norm` (`||W + ΔW||_row`, a constant for
/// autograd, as PEFT detaches it). A forward or merge given `weight_norm: None` computes it
/// (and returns it); a backward or unmerge needs the norm the forward or merge used.
pub struct ColScale<'a, B: Kernels> {
    /// `m [out]`.
    pub magnitude: &'a Tensor<B>,
    /// `n [out]`, or `None` where the op computes it.
    pub weight_norm: Option<&'a Tensor<B>>,
}

impl<B: Kernels> Clone for ColScale<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Kernels> Copy for ColScale<'_, B> {}

/// The low-rank term of a fused product (see the module docs for the formula and the table of
/// methods). Shapes: `lora_a [r, in]`, `lora_b [out, r]` (`shared`: `[r, >= in]`,
/// `[>= out, r]`), `rank_scale` r values (`[r]` or `[r, 1]`), `out_scale [out]`.
pub struct LowRank<'a, B: Kernels> {
    pub lora_a: &'a Tensor<B>,
    pub lora_b: &'a Tensor<B>,
    pub scale: f32,
    /// Per-rank scale applied to `h = x A^T` (AdaLoRA's `lora_E`, VeRA's `lambda_d`).
    pub rank_scale: Option<&'a Tensor<B>>,
    /// Per-output scale of the low-rank term only (VeRA's `lambda_b`).
    pub out_scale: Option<&'a Tensor<B>>,
    /// Per-output scale of base + term, not of the bias (DoRA's `m / n`).
    pub col_scale: Option<ColScale<'a, B>>,
    /// `lora_a` / `lora_b` are projections shared by every layer, of which this layer uses the
    /// leading `in` columns / `out` rows (VeRA).
    pub shared: bool,
}

impl<B: Kernels> Clone for LowRank<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Kernels> Copy for LowRank<'_, B> {}

impl<'a, B: Kernels> LowRank<'a, B> {
    /// The plain LoRA term `scale * (x A^T) B^T` (rsLoRA differs only in `scale`).
    pub fn lora(lora_a: &'a Tensor<B>, lora_b: &'a Tensor<B>, scale: f32) -> Self {
        LowRank {
            lora_a,
            lora_b,
            scale,
            rank_scale: None,
            out_scale: None,
            col_scale: None,
            shared: false,
        }
    }

    /// DoRA: the LoRA term under the column scale `magnitude / weight_norm`.
    pub fn dora(
        lora_a: &'a Tensor<B>,
        lora_b: &'a Tensor<B>,
        scale: f32,
        magnitude: &'a Tensor<B>,
        weight_norm: Option<&'a Tensor<B>>,
    ) -> Self {
        LowRank {
            col_scale: Some(ColScale {
                magnitude,
                weight_norm,
            }),
            ..Self::lora(lora_a, lora_b, scale)
        }
    }

    /// VeRA: the shared projections with `lambda_d [r]` per rank and `lambda_b [out]` per
    /// output, no other scaling.
    pub fn vera(
        vera_a: &'a Tensor<B>,
        vera_b: &'a Tensor<B>,
        lambda_d: &'a Tensor<B>,
        lambda_b: &'a Tensor<B>,
    ) -> Self {
        LowRank {
            rank_scale: Some(lambda_d),
            out_scale: Some(lambda_b),
            shared: true,
            ..Self::lora(vera_a, vera_b, 1.0)
        }
    }

    /// AdaLoRA: `lora_E [r, 1]` per rank and the factor `c = scaling / (ranknum + 1e-5)`
    /// ([`adalora_factor`](crate::backend::check::adalora_factor)).
    pub fn adalora(
        lora_a: &'a Tensor<B>,
        lora_b: &'a Tensor<B>,
        lora_e: &'a Tensor<B>,
        factor: f32,
    ) -> Self {
        LowRank {
            rank_scale: Some(lora_e),
            ..Self::lora(lora_a, lora_b, factor)
        }
    }

    /// The same term without its column scale (the part whose row norms DoRA takes).
    pub fn without_col_scale(&self) -> Self {
        LowRank {
            col_scale: None,
            ..*self
        }
    }

    /// Rank r (rows of `lora_a`).
    pub fn r(&self) -> usize {
        self.lora_a.dim(0)
    }
}

/// The result of a fused forward: `y`, and what its backward needs.
pub struct LowRankOut<B: Kernels> {
    /// `[T, out]`.
    pub y: Tensor<B>,
    /// `h = x A^T` `[T, r]` (unscaled by `rank_scale`); `None` without a term.
    pub h: Option<Tensor<B>>,
    /// `z = x W^T + u` `[T, out]` before the column scale; only with a column scale.
    pub z: Option<Tensor<B>>,
    /// The column scale's `weight_norm [out]` where the forward computed it.
    pub weight_norm: Option<Tensor<B>>,
}

/// The input gradient of a fused product: `(dx, g)` ([`crate::backend::Backend::backward_input`]):
/// dx (`None` when it was added into an accumulator) and, with a term, `g [T, r]`.
pub type InputGrad<B> = (Option<Tensor<B>>, Option<Tensor<B>>);

/// Which gradients a fused backward computes (the parts of the term the caller trains).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GradWants {
    pub lora_a: bool,
    pub lora_b: bool,
    pub rank_scale: bool,
    pub out_scale: bool,
    /// DoRA's `lora_magnitude_vector` (the column scale's numerator).
    pub magnitude: bool,
}

impl GradWants {
    /// LoRA, rsLoRA: `lora_A`, `lora_B`.
    pub const LORA: GradWants = GradWants {
        lora_a: true,
        lora_b: true,
        rank_scale: false,
        out_scale: false,
        magnitude: false,
    };
    /// DoRA: `lora_A`, `lora_B`, `lora_magnitude_vector`.
    pub const DORA: GradWants = GradWants {
        magnitude: true,
        ..Self::LORA
    };
    /// VeRA: `lambda_d`, `lambda_b` (the projections are frozen).
    pub const VERA: GradWants = GradWants {
        lora_a: false,
        lora_b: false,
        rank_scale: true,
        out_scale: true,
        magnitude: false,
    };
    /// AdaLoRA: `lora_A`, `lora_B`, `lora_E`.
    pub const ADALORA: GradWants = GradWants {
        rank_scale: true,
        ..Self::LORA
    };
    /// No parameter gradient (only `dx`).
    pub const NONE: GradWants = GradWants {
        lora_a: false,
        lora_b: false,
        rank_scale: false,
        out_scale: false,
        magnitude: false,
    };
}

/// Gradients of a fused product ([`crate::backend::Backend::linear_lowrank_backward`]); each
/// parameter gradient is present where [`GradWants`] asked for it and shaped like its
/// parameter (a shared projection's gradient is the layer's slice, `[r, in]` / `[out, r]`).
pub struct LowRankGrads<B: Kernels> {
    /// `dL/dx` `[T, in]`.
    pub dx: Tensor<B>,
    pub d_lora_a: Option<Tensor<B>>,
    pub d_lora_b: Option<Tensor<B>>,
    pub d_rank_scale: Option<Tensor<B>>,
    pub d_out_scale: Option<Tensor<B>>,
    /// `dL/dm = sum_T(dy ⊙ z) / n` (no term through n: it is detached).
    pub d_magnitude: Option<Tensor<B>>,
}

/// The parameter gradients of a fused product, without `dx` (what
/// [`Kernels::lowrank_grads_kernel`] returns).
pub struct ParamGrads<B: Kernels> {
    pub d_lora_a: Option<Tensor<B>>,
    pub d_lora_b: Option<Tensor<B>>,
    pub d_rank_scale: Option<Tensor<B>>,
    pub d_out_scale: Option<Tensor<B>>,
    pub d_magnitude: Option<Tensor<B>>,
}

impl<B: Kernels> ParamGrads<B> {
    /// With `dx`, the full [`LowRankGrads`].
    pub fn with_dx(self, dx: Tensor<B>) -> LowRankGrads<B> {
        LowRankGrads {
            dx,
            d_lora_a: self.d_lora_a,
            d_lora_b: self.d_lora_b,
            d_rank_scale: self.d_rank_scale,
            d_out_scale: self.d_out_scale,
            d_magnitude: self.d_magnitude,
        }
    }
}
