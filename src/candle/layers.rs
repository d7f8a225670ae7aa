//! The adapted linear layers: a frozen base ([`FrozenLinear`], dense or NF4) and the four
//! low-rank methods over it, each a `candle_nn::Module` whose forward is one fused custom op.

use std::sync::{Arc, RwLock};

use candle_core::{DType, Module};
use candle_nn::{Init, VarBuilder};

use super::op::{CTensor, Frozen, FrozenOp, FusedLinear, Method, host_tensor, lf, to_candle};
use crate::Cpu;
use crate::adapter::{AdaLoraLayer, Linear, LoraConfig, VeraShared};
use crate::backend::check::adalora_factor;
use crate::backend::{Backend, LowRank};
use crate::quant::quantize_nf4;

/// A frozen `nn.Linear` base `y = x W0^T + bias` held in lorafuse's storage: `W0 [out, in]`
/// f32, or bitsandbytes NF4 (QLoRA; dequantized tile by tile inside the products, never
/// whole). Built once from a `candle_nn::Linear` (one copy of its weight); clones share it.
/// As a `Module` its backward gives `dx = dy W0` and no weight gradient.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    base: Arc<Linear<Cpu>>,
}

/// Copies a candle weight or bias (f32, CPU) into lorafuse's storage.
fn take(t: &CTensor, name: &str, rank: usize) -> candle_core::Result<crate::Tensor<Cpu>> {
    if t.rank() != rank {
        candle_core::bail!(
            "lorafuse: `{name}` must be {rank}-D, got shape {:?}",
            t.dims()
        );
    }
    host_tensor(t, name)
}

impl FrozenLinear {
    /// The dense base of `linear` (weight `[out, in]`, optional bias `[out]`; f32 on the CPU).
    /// Errors: another dtype or device, or a weight that is not 2-D.
    pub fn from_linear(linear: &candle_nn::Linear) -> candle_core::Result<Self> {
        let weight = take(linear.weight(), "weight", 2)?;
        let bias = linear.bias().map(|b| take(b, "bias", 1)).transpose()?;
        let mut base = Linear::dense(weight).map_err(lf)?;
        base.bias = bias;
        Ok(FrozenLinear {
            base: Arc::new(base),
        })
    }

    /// `linear` quantized to NF4 as bitsandbytes' `Linear4bit(quant_type="nf4")` does it
    /// (`blocksize` 64 and `double_quant` = `compress_statistics` true are QLoRA's settings);
    /// the bias stays f32. Errors: those of [`FrozenLinear::from_linear`]; a blocksize that is
    /// not a power of two in 32..=4096; a NaN or Inf in the weight.
    pub fn nf4(
        linear: &candle_nn::Linear,
        blocksize: usize,
        double_quant: bool,
    ) -> candle_core::Result<Self> {
        let dense = Self::from_linear(linear)?;
        let w = dense
            .base
            .weight
            .dense_or_err("NF4 quantization")
            .map_err(lf)?;
        let q = quantize_nf4(w.data(), w.shape(), blocksize, double_quant).map_err(lf)?;
        let mut base = Linear::nf4(&Cpu, &q).map_err(lf)?;
        base.bias = dense.base.bias.clone();
        Ok(FrozenLinear {
            base: Arc::new(base),
        })
    }

    /// Wraps a lorafuse layer (e.g. from [`crate::io::bnb`] or the model loader).
    pub fn from_lorafuse(base: Linear<Cpu>) -> Self {
        FrozenLinear {
            base: Arc::new(base),
        }
    }

    /// The lorafuse layer.
    pub fn linear(&self) -> &Linear<Cpu> {
        &self.base
    }
    /// `in_features`.
    pub fn in_features(&self) -> usize {
        self.base.in_features()
    }
    /// `out_features`.
    pub fn out_features(&self) -> usize {
        self.base.out_features()
    }
    /// Whether the weight is NF4.
    pub fn is_quantized(&self) -> bool {
        self.base.weight.is_quantized()
    }
    /// Bytes of the base weight (`4 out in` dense, about `0.52 out in` NF4 with double quant).
    pub fn bytes(&self) -> usize {
        self.base.bytes()
    }

    /// The weight as a dense candle `[out, in]` tensor (NF4 dequantized as bitsandbytes'
    /// `dequantize_4bit`), and the bias.
    pub fn to_candle(&self) -> candle_core::Result<(CTensor, Option<CTensor>)> {
        let d = self.base.dequantized(&Cpu).map_err(lf)?;
        let w = d.weight.dense_or_err("to_candle").map_err(lf)?.clone();
        Ok((to_candle(w)?, d.bias.map(to_candle).transpose()?))
    }

    fn frozen(&self) -> Frozen {
        Frozen {
            base: self.base.clone(),
            row_sq: None,
            vera: None,
        }
    }
}

/// Runs `f` on `x` flattened to `[T, in]` (any leading dims, as `candle_nn::Linear` takes)
/// and gives the result back the leading dims with `out` last.
fn over_rows(
    x: &CTensor,
    base: &Linear<Cpu>,
    what: &str,
    f: impl FnOnce(&CTensor) -> candle_core::Result<CTensor>,
) -> candle_core::Result<CTensor> {
    let dims = x.dims();
    let inp = base.in_features();
    if dims.last() != Some(&inp) {
        candle_core::bail!(
            "lorafuse {what}: x has shape {dims:?}, the layer takes {inp} input features"
        );
    }
    let t: usize = dims[..dims.len() - 1].iter().product();
    let y = f(&x.reshape((t, inp))?.contiguous()?)?;
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(base.out_features());
    y.reshape(shape)
}

impl Module for FrozenLinear {
    fn forward(&self, x: &CTensor) -> candle_core::Result<CTensor> {
        over_rows(x, &self.base, "FrozenLinear", |x| {
            x.apply_op1(FrozenOp {
                base: self.base.clone(),
            })
        })
    }
}

/// The fused adapted forward over `base`.
fn fused(
    x: &CTensor,
    frozen: Frozen,
    method: Method,
    p1: &CTensor,
    p2: &CTensor,
    what: &str,
) -> candle_core::Result<CTensor> {
    let base = frozen.base.clone();
    over_rows(x, &base, what, |x| {
        x.apply_op3(
            &p1.contiguous()?,
            &p2.contiguous()?,
            FusedLinear::new(frozen, method),
        )
    })
}

/// Checks r and alpha the way PEFT's `LoraConfig` does (r >= 1, finite alpha).
fn check_lora_config(c: &LoraConfig) -> candle_core::Result<()> {
    if c.r == 0 || !c.lora_alpha.is_finite() {
        candle_core::bail!(
            "lorafuse: LoRA needs r >= 1 and a finite lora_alpha, got r {} alpha {}",
            c.r,
            c.lora_alpha
        );
    }
    Ok(())
}

/// The trainable tensors come from `vb`: a `VarMap`-backed builder creates them as `Var`s.
fn check_vb(vb: &VarBuilder) -> candle_core::Result<()> {
    if vb.dtype() != DType::F32 || !vb.device().is_cpu() {
        candle_core::bail!(
            "lorafuse: the adapter's VarBuilder must be f32 on the CPU, got {:?} on {:?}",
            vb.dtype(),
            vb.device()
        );
    }
    Ok(())
}

/// `lora_A` and `lora_B` under PEFT's init: A kaiming-uniform with `a = sqrt(5)` (bound
/// `1 / sqrt(in)`), B zero.
fn lora_factors(
    base: &FrozenLinear,
    r: usize,
    vb: &VarBuilder,
) -> candle_core::Result<(CTensor, CTensor)> {
    let bound = 1.0 / (base.in_features() as f64).sqrt();
    let a = vb.get_with_hints(
        (r, base.in_features()),
        "lora_A.weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let b = vb.get_with_hints((base.out_features(), r), "lora_B.weight", Init::Const(0.0))?;
    Ok((a, b))
}

/// Overwrites `dst` in place with `src` (same shape): how a value reaches a `Var` held as a
/// tensor (candle's `slice_set`, which writes into the var's storage).
pub(crate) fn assign(dst: &CTensor, src: &CTensor) -> candle_core::Result<()> {
    if dst.dims() != src.dims() {
        candle_core::bail!(
            "lorafuse: cannot assign shape {:?} to a tensor of shape {:?}",
            src.dims(),
            dst.dims()
        );
    }
    dst.slice_set(&src.contiguous()?, 0, 0)
}

/// A LoRA (or rsLoRA) layer over a frozen base (PEFT `lora.Linear`; QLoRA over an NF4
/// base): `y = x W0^T + bias + s (x A^T) B^T`, `s = lora_alpha / r` (`/ sqrt(r)` with rsLoRA),
/// `lora_A [r, in]`, `lora_B [out, r]` trainable, named `lora_A.weight` / `lora_B.weight` in
/// the VarBuilder (PEFT's keys under the module path).
#[derive(Clone, Debug)]
pub struct LoraLinear {
    base: FrozenLinear,
    /// `lora_A [r, in]`.
    pub lora_a: CTensor,
    /// `lora_B [out, r]`.
    pub lora_b: CTensor,
    config: LoraConfig,
}

impl LoraLinear {
    /// A LoRA layer over a copy of `linear` (see [`LoraLinear::new`]).
    pub fn from_linear(
        linear: &candle_nn::Linear,
        config: &LoraConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Self::new(FrozenLinear::from_linear(linear)?, config, vb)
    }

    /// A LoRA layer over `base` with `lora_A`, `lora_B` from `vb` (PEFT's init where `vb`
    /// creates them). Errors: r = 0, a non-finite alpha, a VarBuilder that is not f32 on the
    /// CPU, or one holding tensors of other shapes.
    pub fn new(
        base: FrozenLinear,
        config: &LoraConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        check_lora_config(config)?;
        check_vb(&vb)?;
        let (lora_a, lora_b) = lora_factors(&base, config.r, &vb)?;
        Ok(LoraLinear {
            base,
            lora_a,
            lora_b,
            config: config.clone(),
        })
    }

    /// The frozen base.
    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }
    /// r, lora_alpha, use_rslora.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }
    /// `s`.
    pub fn scaling(&self) -> f32 {
        self.config.scaling()
    }

    /// PEFT's `merge_and_unload` for this layer: a `candle_nn::Linear` with `W0 + s B A`
    /// (an NF4 base is dequantized first) and the bias.
    pub fn merged(&self) -> candle_core::Result<candle_nn::Linear> {
        let (a, b) = (
            host_tensor(&self.lora_a, "lora_A")?,
            host_tensor(&self.lora_b, "lora_B")?,
        );
        merged_with(&self.base, &LowRank::lora(&a, &b, self.scaling()))
    }
}

/// `W0 + ΔW(term)` as a candle Linear.
fn merged_with(
    base: &FrozenLinear,
    term: &LowRank<'_, Cpu>,
) -> candle_core::Result<candle_nn::Linear> {
    let mut d = base.base.dequantized(&Cpu).map_err(lf)?;
    let w = d.weight.dense_mut_or_err("merge").map_err(lf)?;
    Cpu.lowrank_merge(w, term, 1.0).map_err(lf)?;
    let w = w.clone();
    Ok(candle_nn::Linear::new(
        to_candle(w)?,
        d.bias.take().map(to_candle).transpose()?,
    ))
}

impl Module for LoraLinear {
    fn forward(&self, x: &CTensor) -> candle_core::Result<CTensor> {
        let method = Method::Lora {
            scale: self.scaling(),
        };
        fused(
            x,
            self.base.frozen(),
            method,
            &self.lora_a,
            &self.lora_b,
            "LoraLinear",
        )
    }
}

/// A DoRA layer (PEFT `lora.Linear` with `use_dora=True`, Liu et al. 2024):
/// `y = (m / n) ⊙ (x W0^T + s (x A^T) B^T) + bias` with `n = ||W0 + s B A||_row` detached
/// (paper sec. 4.3), `m = lora_magnitude_vector [out]` trainable with A and B.
#[derive(Clone, Debug)]
pub struct DoraLinear {
    lora: LoraLinear,
    /// `lora_magnitude_vector [out]`.
    pub lora_magnitude_vector: CTensor,
    /// `||W0||_row^2 [out]`, computed once.
    row_sq: Arc<crate::Tensor<Cpu>>,
}

impl DoraLinear {
    /// A DoRA layer over a copy of `linear` (see [`DoraLinear::new`]).
    pub fn from_linear(
        linear: &candle_nn::Linear,
        config: &LoraConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Self::new(FrozenLinear::from_linear(linear)?, config, vb)
    }

    /// A DoRA layer over `base`: A and B as [`LoraLinear::new`], and where `vb` creates the
    /// magnitude as a `Var`, PEFT's creation-time value `m = ||W0 + s B A||_row` of those
    /// factors (`||W0||_row` for a fresh `B = 0`); a magnitude `vb` only reads (pretrained) is
    /// kept. Errors: as [`LoraLinear::new`].
    pub fn new(
        base: FrozenLinear,
        config: &LoraConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let lora = LoraLinear::new(base, config, vb.clone())?;
        let row_sq = Cpu
            .row_sq_norms(lora.base.base.weight.as_base())
            .map_err(lf)?;
        let m = vb.get_with_hints(
            lora.base.out_features(),
            "lora_magnitude_vector",
            Init::Const(1.0),
        )?;
        let layer = DoraLinear {
            lora,
            lora_magnitude_vector: m,
            row_sq: Arc::new(row_sq),
        };
        if layer.lora_magnitude_vector.is_variable() {
            assign(&layer.lora_magnitude_vector, &layer.weight_norm()?)?;
        }
        Ok(layer)
    }

    /// The LoRA part (base, `lora_A`, `lora_B`, scaling).
    pub fn lora(&self) -> &LoraLinear {
        &self.lora
    }

    /// `n = ||W0 + s B A||_row [out]` for the current factors (detached).
    pub fn weight_norm(&self) -> candle_core::Result<CTensor> {
        let (a, b) = (
            host_tensor(&self.lora.lora_a, "lora_A")?,
            host_tensor(&self.lora.lora_b, "lora_B")?,
        );
        let n = Cpu
            .lowrank_row_norms(
                self.lora.base.base.weight.as_base(),
                &self.row_sq,
                &LowRank::lora(&a, &b, self.lora.scaling()),
            )
            .map_err(lf)?;
        to_candle(n)
    }

    /// PEFT's merge: `(m / n)[:, None] ⊙ (W0 + s B A)` (n of the merged rows) as a
    /// `candle_nn::Linear`, with the unscaled bias.
    pub fn merged(&self) -> candle_core::Result<candle_nn::Linear> {
        let (a, b, m) = (
            host_tensor(&self.lora.lora_a, "lora_A")?,
            host_tensor(&self.lora.lora_b, "lora_B")?,
            host_tensor(&self.lora_magnitude_vector, "lora_magnitude_vector")?,
        );
        let mut d = self.lora.base.base.dequantized(&Cpu).map_err(lf)?;
        let w = d.weight.dense_mut_or_err("merge").map_err(lf)?;
        let term = LowRank::dora(&a, &b, self.lora.scaling(), &m, None);
        Cpu.lowrank_merge_with_norm(w, &self.row_sq, &term)
            .map_err(lf)?;
        let w = w.clone();
        Ok(candle_nn::Linear::new(
            to_candle(w)?,
            d.bias.take().map(to_candle).transpose()?,
        ))
    }
}

impl Module for DoraLinear {
    fn forward(&self, x: &CTensor) -> candle_core::Result<CTensor> {
        let mut frozen = self.lora.base.frozen();
        frozen.row_sq = Some(self.row_sq.clone());
        let method = Method::Dora {
            scale: self.lora.scaling(),
        };
        let packed = CTensor::cat(
            &[&self.lora.lora_b, &self.lora_magnitude_vector.unsqueeze(1)?],
            1,
        )?;
        fused(x, frozen, method, &self.lora.lora_a, &packed, "DoraLinear")
    }
}

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
    base: FrozenLinear,
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

/// An AdaLoRA layer (PEFT `adalora.SVDLinear`, Zhang et al. 2023): `y = x W0^T + bias +
/// c (x (A ⊙ E)^T) B^T` with `c = scaling / (ranknum + 1e-5)`, `scaling = lora_alpha` (r when
/// `lora_alpha <= 0`), `ranknum = init_r`; `lora_A [r, in]`, `lora_B [out, r]`, `lora_E [r, 1]`
/// trainable. A masked rank has `E = 0` ([`AdaLoraLinear::apply_rank_mask`]).
#[derive(Clone, Debug)]
pub struct AdaLoraLinear {
    base: FrozenLinear,
    /// `lora_A [r, in]`.
    pub lora_a: CTensor,
    /// `lora_B [out, r]`.
    pub lora_b: CTensor,
    /// `lora_E [r, 1]`.
    pub lora_e: CTensor,
    lora_alpha: f32,
}

impl AdaLoraLinear {
    /// An AdaLoRA layer over a copy of `linear` (see [`AdaLoraLinear::new`]).
    pub fn from_linear(
        linear: &candle_nn::Linear,
        init_r: usize,
        lora_alpha: f32,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Self::new(FrozenLinear::from_linear(linear)?, init_r, lora_alpha, vb)
    }

    /// PEFT's init: `lora_E = 0`, `lora_A` and `lora_B` normal(0, 0.02), so the layer starts
    /// equal to the base. Errors: `init_r = 0`, a non-finite alpha, the VarBuilder as
    /// [`LoraLinear::new`].
    pub fn new(
        base: FrozenLinear,
        init_r: usize,
        lora_alpha: f32,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if init_r == 0 || !lora_alpha.is_finite() {
            candle_core::bail!(
                "lorafuse AdaLoraLinear: needs init_r >= 1 and a finite lora_alpha, got {init_r}, \
                 {lora_alpha}"
            );
        }
        check_vb(&vb)?;
        let normal = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let a = vb.get_with_hints((init_r, base.in_features()), "lora_A", normal)?;
        let b = vb.get_with_hints((base.out_features(), init_r), "lora_B", normal)?;
        let e = vb.get_with_hints((init_r, 1), "lora_E", Init::Const(0.0))?;
        Ok(AdaLoraLinear {
            base,
            lora_a: a,
            lora_b: b,
            lora_e: e,
            lora_alpha,
        })
    }

    /// The frozen base.
    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }
    /// `init_r` (= PEFT's `ranknum`).
    pub fn r(&self) -> usize {
        self.lora_a.dim(0).unwrap_or(0)
    }
    /// `lora_alpha` as given.
    pub fn lora_alpha(&self) -> f32 {
        self.lora_alpha
    }
    /// The factor `c = scaling / (ranknum + 1e-5)`.
    pub fn factor(&self) -> candle_core::Result<f32> {
        let r = self.r();
        adalora_factor(
            AdaLoraLayer::<Cpu>::scaling_for(self.lora_alpha, r),
            r as f32,
        )
        .map_err(lf)
    }

    /// Zeroes `lora_E` of the ranks with `keep[i] = false` in place (PEFT's `mask_to_budget`;
    /// the gradient of a masked E is not zeroed, as in PEFT). Errors: `keep.len() != r`.
    pub fn apply_rank_mask(&self, keep: &[bool]) -> candle_core::Result<()> {
        let r = self.r();
        if keep.len() != r {
            candle_core::bail!(
                "lorafuse AdaLoraLinear: {} mask entries for rank {r}",
                keep.len()
            );
        }
        let mask: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let mask = CTensor::from_vec(mask, (r, 1), self.lora_e.device())?;
        assign(&self.lora_e, &self.lora_e.mul(&mask)?)
    }

    /// PEFT's orthogonal regularizer for this layer: `||A A^T - I||_F + ||B^T B - I||_F`
    /// (differentiable; PEFT adds `orth_reg_weight` times the mean over the A and B matrices
    /// of a model to the loss).
    pub fn orth_regularization(&self) -> candle_core::Result<CTensor> {
        let r = self.r();
        let eye = CTensor::eye(r, DType::F32, self.lora_a.device())?;
        let fro =
            |m: CTensor| -> candle_core::Result<CTensor> { (m - &eye)?.sqr()?.sum_all()?.sqrt() };
        let a = fro(self.lora_a.matmul(&self.lora_a.t()?)?)?;
        let b = fro(self.lora_b.t()?.matmul(&self.lora_b)?)?;
        a + b
    }

    /// PEFT's merge: `W0 + c B (A ⊙ E)` as a `candle_nn::Linear`.
    pub fn merged(&self) -> candle_core::Result<candle_nn::Linear> {
        let (a, b, e) = (
            host_tensor(&self.lora_a, "lora_A")?,
            host_tensor(&self.lora_b, "lora_B")?,
            host_tensor(&self.lora_e, "lora_E")?,
        );
        merged_with(&self.base, &LowRank::adalora(&a, &b, &e, self.factor()?))
    }
}

impl Module for AdaLoraLinear {
    fn forward(&self, x: &CTensor) -> candle_core::Result<CTensor> {
        let method = Method::AdaLora {
            factor: self.factor()?,
        };
        let packed = CTensor::cat(&[&self.lora_a, &self.lora_e], 1)?;
        fused(
            x,
            self.base.frozen(),
            method,
            &packed,
            &self.lora_b,
            "AdaLoraLinear",
        )
    }
}

/// A projection of a model: frozen, or adapted by one of the methods (what
/// [`super::save_peft`] and [`super::load_peft`] walk).
#[derive(Clone, Debug)]
pub enum AdaptedLinear {
    Frozen(FrozenLinear),
    Lora(LoraLinear),
    Dora(DoraLinear),
    Vera(VeraLinear),
    AdaLora(AdaLoraLinear),
}

impl AdaptedLinear {
    /// The frozen base.
    pub fn base(&self) -> &FrozenLinear {
        match self {
            AdaptedLinear::Frozen(b) => b,
            AdaptedLinear::Lora(l) => &l.base,
            AdaptedLinear::Dora(l) => &l.lora.base,
            AdaptedLinear::Vera(l) => &l.base,
            AdaptedLinear::AdaLora(l) => &l.base,
        }
    }

    /// The trainable tensors under their PEFT names (`lora_A.weight`, ...; none when frozen).
    pub fn params(&self) -> Vec<(&'static str, &CTensor)> {
        match self {
            AdaptedLinear::Frozen(_) => vec![],
            AdaptedLinear::Lora(l) => {
                vec![("lora_A.weight", &l.lora_a), ("lora_B.weight", &l.lora_b)]
            }
            AdaptedLinear::Dora(l) => vec![
                ("lora_A.weight", &l.lora.lora_a),
                ("lora_B.weight", &l.lora.lora_b),
                ("lora_magnitude_vector", &l.lora_magnitude_vector),
            ],
            AdaptedLinear::Vera(l) => vec![
                ("vera_lambda_b", &l.vera_lambda_b),
                ("vera_lambda_d", &l.vera_lambda_d),
            ],
            AdaptedLinear::AdaLora(l) => vec![
                ("lora_A", &l.lora_a),
                ("lora_B", &l.lora_b),
                ("lora_E", &l.lora_e),
            ],
        }
    }

    /// The merged layer (the base itself when frozen), as `candle_nn::Linear`.
    pub fn merged(&self) -> candle_core::Result<candle_nn::Linear> {
        match self {
            AdaptedLinear::Frozen(b) => {
                let (w, bias) = b.to_candle()?;
                Ok(candle_nn::Linear::new(w, bias))
            }
            AdaptedLinear::Lora(l) => l.merged(),
            AdaptedLinear::Dora(l) => l.merged(),
            AdaptedLinear::Vera(l) => l.merged(),
            AdaptedLinear::AdaLora(l) => l.merged(),
        }
    }
}

impl Module for AdaptedLinear {
    fn forward(&self, x: &CTensor) -> candle_core::Result<CTensor> {
        match self {
            AdaptedLinear::Frozen(l) => l.forward(x),
            AdaptedLinear::Lora(l) => l.forward(x),
            AdaptedLinear::Dora(l) => l.forward(x),
            AdaptedLinear::Vera(l) => l.forward(x),
            AdaptedLinear::AdaLora(l) => l.forward(x),
        }
    }
}

impl From<FrozenLinear> for AdaptedLinear {
    fn from(l: FrozenLinear) -> Self {
        AdaptedLinear::Frozen(l)
    }
}
impl From<LoraLinear> for AdaptedLinear {
    fn from(l: LoraLinear) -> Self {
        AdaptedLinear::Lora(l)
    }
}
impl From<DoraLinear> for AdaptedLinear {
    fn from(l: DoraLinear) -> Self {
        AdaptedLinear::Dora(l)
    }
}
impl From<VeraLinear> for AdaptedLinear {
    fn from(l: VeraLinear) -> Self {
        AdaptedLinear::Vera(l)
    }
}
impl From<AdaLoraLinear> for AdaptedLinear {
    fn from(l: AdaLoraLinear) -> Self {
        AdaptedLinear::AdaLora(l)
    }
}
