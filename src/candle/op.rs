//! The candle custom ops behind every layer of [`crate::candle`]: one fused low-rank op
//! ([`FusedLinear`], a `CustomOp3` over `(x, p1, p2)`) for all four methods, and the frozen
//! base product ([`FrozenOp`], a `CustomOp1`). Both run lorafuse's CPU kernels on candle's
//! `CpuStorage`, and their `bwd` hands candle's autograd the gradients of lorafuse's fused
//! backward ([`Backend::linear_lowrank_backward`]).
//!
//! The trainable tensors travel as the op's inputs so that candle tracks them; a method with
//! three trainable tensors packs two of them into one input (candle has no `CustomOp4`):
//!
//! | method  | p1                       | p2                                 |
//! |---------|--------------------------|------------------------------------|
//! | LoRA    | `lora_A [r, in]`         | `lora_B [out, r]`                  |
//! | DoRA    | `lora_A [r, in]`         | `[lora_B | m] [out, r + 1]`        |
//! | VeRA    | `vera_lambda_d [r]`      | `vera_lambda_b [out]`              |
//! | AdaLoRA | `[lora_A | lora_E] [r, in + 1]` | `lora_B [out, r]`           |
//!
//! The layers build the packed input with `Tensor::cat`, whose own backward splits the packed
//! gradient back onto the two parameters.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Shape};

use crate::adapter::{Linear, VeraShared};
use crate::backend::{Backend, Base, GradWants, LowRank, Tensor};
use crate::{Cpu, Error};

/// A candle tensor (the module's public tensor type).
pub(crate) type CTensor = candle_core::Tensor;

/// A lorafuse error as a candle error (its message kept).
pub(crate) fn lf(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The frozen part of an adapted layer, held once (behind `Arc`s) and shared by every
/// forward's op: the base `W0 [out, in]` (dense or NF4) with its bias, DoRA's cached
/// `||W0||_row^2 [out]`, VeRA's shared projections.
#[derive(Clone)]
pub(crate) struct Frozen {
    pub base: Arc<Linear<Cpu>>,
    pub row_sq: Option<Arc<Tensor<Cpu>>>,
    pub vera: Option<Arc<VeraShared<Cpu>>>,
}

/// Which low-rank term the op adds, with its scalar scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Method {
    /// `s (x A^T) B^T`.
    Lora { scale: f32 },
    /// `(m / n) ⊙ (x W0^T + s (x A^T) B^T)`, n detached.
    Dora { scale: f32 },
    /// `lambda_b ⊙ ((x vera_A^T) ⊙ lambda_d) vera_B^T`.
    Vera,
    /// `factor ((x (A ⊙ E)^T) B^T`, `factor = scaling / (ranknum + 1e-5)`.
    AdaLora { factor: f32 },
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Lora { .. } => "lorafuse-lora",
            Method::Dora { .. } => "lorafuse-dora",
            Method::Vera => "lorafuse-vera",
            Method::AdaLora { .. } => "lorafuse-adalora",
        }
    }
}

/// The trainable tensors of one call, unpacked from `(p1, p2)`.
enum Params {
    Lora {
        a: Tensor<Cpu>,
        b: Tensor<Cpu>,
    },
    Dora {
        a: Tensor<Cpu>,
        b: Tensor<Cpu>,
        m: Tensor<Cpu>,
    },
    Vera {
        lambda_d: Tensor<Cpu>,
        lambda_b: Tensor<Cpu>,
    },
    AdaLora {
        a: Tensor<Cpu>,
        b: Tensor<Cpu>,
        e: Tensor<Cpu>,
    },
}

/// Splits the last `k` columns off a row-major `[rows, cols]` matrix: `([rows, cols - k],
/// [rows, k])`.
fn split_cols(t: Tensor<Cpu>, k: usize, left: &str) -> crate::Result<[Tensor<Cpu>; 2]> {
    let (rows, cols) = t.dims2(left)?;
    if cols <= k {
        return Err(Error::shape(left, format!("[{rows}, > {k}]"), t.shape()));
    }
    let w = cols - k;
    let d = t.data();
    let l: Vec<f32> = d.chunks(cols).flat_map(|row| &row[..w]).copied().collect();
    let r: Vec<f32> = d.chunks(cols).flat_map(|row| &row[w..]).copied().collect();
    Ok([Cpu.from_vec(l, &[rows, w])?, Cpu.from_vec(r, &[rows, k])?])
}

/// Joins `[rows, w]` and `[rows, k]` (or `[rows]`) column-wise into `[rows, w + k]`, the
/// inverse of [`split_cols`] (for packed gradients).
fn join_cols(l: &Tensor<Cpu>, r: &Tensor<Cpu>) -> Vec<f32> {
    let rows = l.dim(0);
    let (w, k) = (l.len() / rows.max(1), r.len() / rows.max(1));
    let mut out = Vec::with_capacity(l.len() + r.len());
    for i in 0..rows {
        out.extend_from_slice(&l.data()[i * w..(i + 1) * w]);
        out.extend_from_slice(&r.data()[i * k..(i + 1) * k]);
    }
    out
}

impl Params {
    fn unpack(method: Method, p1: Tensor<Cpu>, p2: Tensor<Cpu>) -> crate::Result<Self> {
        Ok(match method {
            Method::Lora { .. } => Params::Lora { a: p1, b: p2 },
            Method::Dora { .. } => {
                let [b, m] = split_cols(p2, 1, "lora_B")?;
                let m = m.into_shape(&[b.dim(0)])?;
                Params::Dora { a: p1, b, m }
            }
            Method::Vera => Params::Vera {
                lambda_d: p1,
                lambda_b: p2,
            },
            Method::AdaLora { .. } => {
                let [a, e] = split_cols(p1, 1, "lora_A")?;
                Params::AdaLora { a, b: p2, e }
            }
        })
    }
}

/// What a forward keeps for its backward: `h = x A^T [T, r]`, and for DoRA the unscaled
/// output `z [T, out]` and the detached weight norm `n [out]`.
struct Saved {
    /// The forward's copies of `x [T, in]` and of the parameters, kept so the backward needs no
    /// second copy.
    x: Tensor<Cpu>,
    p: Params,
    h: Tensor<Cpu>,
    z: Option<Tensor<Cpu>>,
    weight_norm: Option<Tensor<Cpu>>,
}

/// One fused adapted-linear call: `y = x W0^T + bias + term(x)` for x `[T, in]` (f32, CPU),
/// `y [T, out]`. A new op is made per forward (it keeps that forward's saved tensors).
pub(crate) struct FusedLinear {
    pub frozen: Frozen,
    pub method: Method,
    saved: OnceLock<Saved>,
}

impl FusedLinear {
    pub fn new(frozen: Frozen, method: Method) -> Self {
        FusedLinear {
            frozen,
            method,
            saved: OnceLock::new(),
        }
    }

    fn base(&self) -> Base<'_, Cpu> {
        self.frozen.base.weight.as_base()
    }

    /// The fused op's term for these parameters (`n`: DoRA's weight norm, `None` = computed by
    /// the forward).
    fn term<'a>(
        &'a self,
        p: &'a Params,
        n: Option<&'a Tensor<Cpu>>,
    ) -> crate::Result<LowRank<'a, Cpu>> {
        Ok(match (p, self.method) {
            (Params::Lora { a, b }, Method::Lora { scale }) => LowRank::lora(a, b, scale),
            (Params::Dora { a, b, m }, Method::Dora { scale }) => LowRank::dora(a, b, scale, m, n),
            (Params::Vera { lambda_d, lambda_b }, Method::Vera) => {
                let sh = self.frozen.vera.as_deref().ok_or_else(|| {
                    Error::arg("vera", "a VeRA layer without its shared projections")
                })?;
                LowRank::vera(&sh.vera_a, &sh.vera_b, lambda_d, lambda_b)
            }
            (Params::AdaLora { a, b, e }, Method::AdaLora { factor }) => {
                LowRank::adalora(a, b, e, factor)
            }
            _ => return Err(Error::arg("method", "parameters of another method")),
        })
    }

    fn forward(&self, x: Tensor<Cpu>, p: Params) -> crate::Result<Tensor<Cpu>> {
        let be = Cpu;
        let bias = self.frozen.base.bias.as_ref();
        let out = {
            let term = self.term(&p, None)?;
            match self.method {
                Method::Dora { .. } => {
                    let row_sq = self.frozen.row_sq.as_deref().ok_or_else(|| {
                        Error::arg("row_sq", "a DoRA layer without its cached ||W0||_row^2")
                    })?;
                    be.linear_lowrank_with_norm(&x, self.base(), row_sq, bias, &term)?
                }
                _ => be.linear_lowrank(&x, self.base(), bias, Some(&term))?,
            }
        };
        let h = out
            .h
            .ok_or_else(|| Error::arg("h", "the fused forward kept no h"))?;
        // One forward per op: a second set (never made by the layers) keeps the first.
        let _ = self.saved.set(Saved {
            x,
            p,
            h,
            z: out.z,
            weight_norm: out.weight_norm,
        });
        Ok(out.y)
    }

    /// `(dx [T, in], d p1, d p2)`, the parameter gradients packed as the inputs are.
    fn backward(&self, dy: Tensor<Cpu>) -> crate::Result<[Tensor<Cpu>; 3]> {
        let saved = self
            .saved
            .get()
            .ok_or_else(|| Error::arg("saved", "backward before the forward ran"))?;
        let p = &saved.p;
        let term = self.term(p, saved.weight_norm.as_ref())?;
        let wants = match self.method {
            Method::Lora { .. } => GradWants::LORA,
            Method::Dora { .. } => GradWants::DORA,
            Method::Vera => GradWants::VERA,
            Method::AdaLora { .. } => GradWants::ADALORA,
        };
        let g = Cpu.linear_lowrank_backward(
            &dy,
            &saved.x,
            &saved.h,
            saved.z.as_ref(),
            self.base(),
            &term,
            wants,
        )?;
        let need = |t: Option<Tensor<Cpu>>, what: &str| {
            t.ok_or_else(|| Error::arg("grads", format!("the backward gave no d{what}")))
        };
        Ok(match p {
            Params::Lora { .. } => [
                g.dx,
                need(g.d_lora_a, "lora_A")?,
                need(g.d_lora_b, "lora_B")?,
            ],
            Params::Dora { b, .. } => {
                let db = need(g.d_lora_b, "lora_B")?;
                let dm = need(g.d_magnitude, "lora_magnitude_vector")?;
                let packed = join_cols(&db, &dm);
                [
                    g.dx,
                    need(g.d_lora_a, "lora_A")?,
                    Cpu.from_vec(packed, &[b.dim(0), b.dim(1) + 1])?,
                ]
            }
            Params::Vera { .. } => [
                g.dx,
                need(g.d_rank_scale, "vera_lambda_d")?,
                need(g.d_out_scale, "vera_lambda_b")?,
            ],
            Params::AdaLora { a, .. } => {
                let da = need(g.d_lora_a, "lora_A")?;
                let de = need(g.d_rank_scale, "lora_E")?;
                let packed = join_cols(&da, &de);
                [
                    g.dx,
                    Cpu.from_vec(packed, &[a.dim(0), a.dim(1) + 1])?,
                    need(g.d_lora_b, "lora_B")?,
                ]
            }
        })
    }
}

/// A CPU f32 storage under a contiguous layout as a lorafuse tensor (one copy).
fn host(s: &CpuStorage, l: &Layout, name: &str) -> candle_core::Result<Tensor<Cpu>> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!(
            "lorafuse: `{name}` must be f32, got {:?} (lorafuse's CPU kernels compute in f32)",
            s.dtype()
        );
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("lorafuse: `{name}` must be contiguous (call .contiguous() first)");
    };
    Cpu.from_vec(v[start..end].to_vec(), l.dims()).map_err(lf)
}

/// A candle tensor on the CPU as a lorafuse tensor (one copy, any layout).
pub(crate) fn host_tensor(t: &CTensor, name: &str) -> candle_core::Result<Tensor<Cpu>> {
    if !t.device().is_cpu() {
        candle_core::bail!(
            "lorafuse: `{name}` is on {:?}; the layers run on the CPU",
            t.device()
        );
    }
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(s) => host(s, l, name),
        _ => candle_core::bail!("lorafuse: `{name}` is not in CPU storage"),
    }
}

/// A lorafuse tensor as a candle CPU tensor (no copy of the data).
pub(crate) fn to_candle(t: Tensor<Cpu>) -> candle_core::Result<CTensor> {
    let shape = t.shape().to_vec();
    CTensor::from_vec(t.into_vec(), shape, &Device::Cpu)
}

fn out(t: Tensor<Cpu>) -> (CpuStorage, Shape) {
    let shape = Shape::from(t.shape().to_vec());
    (CpuStorage::F32(t.into_vec()), shape)
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        self.method.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = host(s1, l1, "x")?;
        let p =
            Params::unpack(self.method, host(s2, l2, "p1")?, host(s3, l3, "p2")?).map_err(lf)?;
        Ok(out(self.forward(x, p).map_err(lf)?))
    }

    fn bwd(
        &self,
        _x: &CTensor,
        _p1: &CTensor,
        _p2: &CTensor,
        _res: &CTensor,
        grad_res: &CTensor,
    ) -> candle_core::Result<(Option<CTensor>, Option<CTensor>, Option<CTensor>)> {
        // x and the parameters are the forward's own copies, kept in `saved`.
        let [dx, d1, d2] = self.backward(host_tensor(grad_res, "dy")?).map_err(lf)?;
        Ok((
            Some(to_candle(dx)?),
            Some(to_candle(d1)?),
            Some(to_candle(d2)?),
        ))
    }
}

/// The frozen base product `y = x W0^T + bias` (dense or NF4 `W0`), whose backward gives only
/// `dx = dy W0` (the base trains nothing).
pub(crate) struct FrozenOp {
    pub base: Arc<Linear<Cpu>>,
}

impl CustomOp1 for FrozenOp {
    fn name(&self) -> &'static str {
        "lorafuse-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = host(s, l, "x")?;
        Ok(out(self.base.forward(&Cpu, &x).map_err(lf)?))
    }

    fn bwd(
        &self,
        _x: &CTensor,
        _res: &CTensor,
        grad_res: &CTensor,
    ) -> candle_core::Result<Option<CTensor>> {
        let dy = host_tensor(grad_res, "dy")?;
        let dx = self.base.backward_input(&Cpu, &dy).map_err(lf)?;
        Ok(Some(to_candle(dx)?))
    }
}
