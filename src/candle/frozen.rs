//! The frozen base ([`FrozenLinear`], dense or NF4) and what every adapted layer shares: the
//! flattening of leading dims, the fused call, the VarBuilder checks and in-place assignment.

use std::sync::Arc;

use candle_core::{DType, Module};
use candle_nn::{Init, VarBuilder};

use super::op::{CTensor, Frozen, FrozenOp, FusedLinear, Method, host_tensor, lf, to_candle};
use crate::Cpu;
use crate::adapter::{Linear, LoraConfig};
use crate::backend::{Backend, LowRank};
use crate::quant::quantize_nf4;

/// A frozen `nn.Linear` base `y = x W0^T + bias` held in lorafuse's storage: `W0 [out, in]`
/// f32, or bitsandbytes NF4 (QLoRA; dequantized tile by tile inside the products, never
/// whole). Built once from a `candle_nn::Linear` (one copy of its weight); clones share it.
/// As a `Module` its backward gives `dx = dy W0` and no weight gradient.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    pub(super) base: Arc<Linear<Cpu>>,
}

/// Copies a candle weight or bias (f32, CPU) into lorafuse's storage.
pub(super) fn take(
    t: &CTensor,
    name: &str,
    rank: usize,
) -> candle_core::Result<crate::Tensor<Cpu>> {
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

    pub(super) fn frozen(&self) -> Frozen {
        Frozen {
            base: self.base.clone(),
            row_sq: None,
            vera: None,
        }
    }
}

/// Runs `f` on `x` flattened to `[T, in]` (any leading dims, as `candle_nn::Linear` takes)
/// and gives the result back the leading dims with `out` last.
pub(super) fn over_rows(
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
pub(super) fn fused(
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
pub(super) fn check_lora_config(c: &LoraConfig) -> candle_core::Result<()> {
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
pub(super) fn check_vb(vb: &VarBuilder) -> candle_core::Result<()> {
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
pub(super) fn lora_factors(
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

/// `W0 + ΔW(term)` as a candle Linear.
pub(super) fn merged_with(
    base: &FrozenLinear,
    term: &LowRank<'_, Cpu>,
) -> candle_core::Result<candle_nn::Linear> {
    merged_by(base, |w| Cpu.lowrank_merge(w, term, 1.0))
}

/// The base dequantized to f32, changed in place by `merge` (`W0 [out, in]`), as a candle
/// Linear with the base's bias.
pub(super) fn merged_by(
    base: &FrozenLinear,
    merge: impl FnOnce(&mut crate::Tensor<Cpu>) -> crate::Result<()>,
) -> candle_core::Result<candle_nn::Linear> {
    let mut d = base.base.dequantized(&Cpu).map_err(lf)?;
    let w = d.weight.dense_mut_or_err("merge").map_err(lf)?;
    merge(w).map_err(lf)?;
    let w = w.clone();
    Ok(candle_nn::Linear::new(
        to_candle(w)?,
        d.bias.take().map(to_candle).transpose()?,
    ))
}
