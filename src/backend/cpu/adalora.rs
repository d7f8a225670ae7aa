//! AdaLoRA's rank allocator and orthogonal regularizer on the CPU, and the reference math they
//! run (PEFT 0.21.2 `RankAllocator` and `AdaLoraModel.forward`; paper: Zhang et al. 2023,
//! sec. 3-4): the host allocator (`adapter::rank_allocator`) runs these very functions, so the
//! device-resident allocator on this backend is bit-identical to it.

use super::{Cpu, new};
use crate::backend::check::EmaCoefs;
use crate::backend::{AdaLoraIpt, Tensor};
use crate::error::{Error, Result};
use std::cmp::Ordering;

// ---- the reference math ------------------------------------------------------------------------

/// PEFT `update_ipt` over slices, paper eq. (8)-(9), elementwise in f32 like torch:
/// `I = |p * g|`, `Ī = b1 Ī + (1 - b1) I`, `Ū = b2 Ū + (1 - b2) |I - Ī|` (with the new Ī).
pub fn update_ipt(p: &[f32], g: &[f32], ipt: &mut [f32], unc: &mut [f32], c: &EmaCoefs) {
    for (((ipt_bar, unc_bar), &p), &g) in ipt.iter_mut().zip(unc.iter_mut()).zip(p).zip(g) {
        let ipt = (p * g).abs();
        *ipt_bar = c.b1 * *ipt_bar + c.one_minus_b1 * ipt;
        *unc_bar = c.b2 * *unc_bar + c.one_minus_b2 * (ipt - *ipt_bar).abs();
    }
}

/// PEFT `_element_score` over slices: `ipt * unc` per entry.
pub fn element_scores(ipt: &[f32], unc: &[f32]) -> Vec<f32> {
    ipt.iter().zip(unc).map(|(i, u)| i * u).collect()
}

/// `torch.kthvalue(values, k)`: the 1-based k-th smallest in the total order of
/// [`f32::total_cmp`] (NaN above +inf, as torch sorts it). `values` is reordered. Assumes
/// `1 <= k <= values.len()`.
pub fn kthvalue(values: &mut [f32], k: usize) -> f32 {
    *values.select_nth_unstable_by(k - 1, f32::total_cmp).1
}

/// PEFT's mask predicate `score <= threshold`: a NaN on either side compares false, so a NaN
/// score is kept (and a NaN threshold masks nothing).
pub fn masked(score: f32, threshold: f32) -> bool {
    matches!(
        score.partial_cmp(&threshold),
        Some(Ordering::Less | Ordering::Equal)
    )
}

/// PEFT `_combine_ipt` over `mask_to_budget`'s row/column means: the score of rank `i` is
/// `s(λ_i) + mean_j s(A_ij) + mean_k s(B_ki)` (paper eq. (7) uses the same averages), from the
/// `(exp_avg_ipt, exp_avg_unc)` of A `[r, in]`, B `[out, r]` and E `[r]`. The means are
/// accumulated in f64 and rounded to f32; the two means are added first, then E's score (as
/// PEFT's `ipt_E + ipt_AB.sum(dim=1)`). A mean over no entries (`in` or `out` 0) is NaN.
pub fn triplet_scores(
    [(ia, ua), (ib, ub), (ie, ue)]: [(&[f32], &[f32]); 3],
    r: usize,
    inp: usize,
    out: usize,
) -> Vec<f32> {
    let sa = element_scores(ia, ua);
    let sb = element_scores(ib, ub);
    let se = element_scores(ie, ue);
    (0..r)
        .map(|i| {
            let mean_a = if inp == 0 {
                f32::NAN
            } else {
                (sa[i * inp..(i + 1) * inp]
                    .iter()
                    .map(|&x| x as f64)
                    .sum::<f64>()
                    / inp as f64) as f32
            };
            let mean_b = if out == 0 {
                f32::NAN
            } else {
                ((0..out).map(|k| sb[k * r + i] as f64).sum::<f64>() / out as f64) as f32
            };
            se[i] + (mean_a + mean_b)
        })
        .collect()
}

/// The orthogonality penalty of one layer and its gradient (unweighted).
#[derive(Clone, Debug, PartialEq)]
pub struct OrthReg {
    /// `||A A^T - I_r||_F + ||B^T B - I_r||_F` (Frobenius norms, **not** squared: PEFT uses
    /// `torch.norm(·, p="fro")`; the paper's eq. (4) writes squared norms).
    pub loss: f32,
    /// `||A A^T - I||_F`.
    pub norm_a: f32,
    /// `||B^T B - I||_F`.
    pub norm_b: f32,
    /// `d loss / d A = 2 (A A^T - I) A / ||A A^T - I||_F` (0 where the norm is 0, as torch).
    pub grad_a: Vec<f32>,
    /// `d loss / d B = 2 B (B^T B - I) / ||B^T B - I||_F` (0 where the norm is 0, as torch).
    pub grad_b: Vec<f32>,
}

/// The orthogonality penalty of one layer, `lora_a [r, in]`, `lora_b [out, r]` (paper sec. 3,
/// `R(P, Q)`, in PEFT's unsquared form), with its gradients; f64 inside.
///
/// As in PEFT, every rank counts, masked or not (masking only zeroes `lora_E`).
///
/// Errors: slice lengths that do not match `r`, `in_features`, `out_features`.
pub fn orth_reg(
    lora_a: &[f32],
    lora_b: &[f32],
    r: usize,
    in_features: usize,
    out_features: usize,
) -> Result<OrthReg> {
    if lora_a.len() != r * in_features {
        return Err(Error::shape(
            "lora_A",
            format!("[{r}, {in_features}]"),
            &[lora_a.len()],
        ));
    }
    if lora_b.len() != out_features * r {
        return Err(Error::shape(
            "lora_B",
            format!("[{out_features}, {r}]"),
            &[lora_b.len()],
        ));
    }
    // A: rows are the r vectors (length in); B: columns are the r vectors (length out).
    let (norm_a, grad_a) = gram_penalty(r, in_features, |i, j| lora_a[i * in_features + j]);
    let (norm_b, grad_b) = gram_penalty(r, out_features, |i, k| lora_b[k * r + i]);
    // grad_b comes back indexed [i][k] (vector-major); B is [out, r].
    let mut gb = vec![0.0f32; out_features * r];
    for i in 0..r {
        for k in 0..out_features {
            gb[k * r + i] = grad_b[i * out_features + k] as f32;
        }
    }
    Ok(OrthReg {
        loss: (norm_a + norm_b) as f32,
        norm_a: norm_a as f32,
        norm_b: norm_b as f32,
        grad_a: grad_a.into_iter().map(|x| x as f32).collect(),
        grad_b: gb,
    })
}

/// For r vectors `v_i` of length n (`at(i, j)`), `G = V V^T - I`: `(||G||_F, 2 G V / ||G||_F)`,
/// the gradient laid out `[r, n]`.
fn gram_penalty(r: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> (f64, Vec<f64>) {
    let v: Vec<f64> = (0..r * n)
        .map(|x| at(x / n.max(1), x % n.max(1)) as f64)
        .collect();
    let mut g = vec![0.0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            let dot: f64 = (0..n).map(|t| v[i * n + t] * v[j * n + t]).sum();
            g[i * r + j] = dot - if i == j { 1.0 } else { 0.0 };
        }
    }
    let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut grad = vec![0.0f64; r * n];
    if norm > 0.0 {
        for i in 0..r {
            for t in 0..n {
                let s: f64 = (0..r).map(|j| g[i * r + j] * v[j * n + t]).sum();
                grad[i * n + t] = 2.0 * s / norm;
            }
        }
    }
    (norm, grad)
}

/// One layer's factors for [`orth_reg_total`].
#[derive(Clone, Copy, Debug)]
pub struct OrthRegInput<'a> {
    pub lora_a: &'a [f32],
    pub lora_b: &'a [f32],
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// The term PEFT's `AdaLoraModel.forward` adds to the loss, and its gradient per layer.
#[derive(Clone, Debug, PartialEq)]
pub struct OrthRegTotal {
    /// `orth_reg_weight * (Σ_layers ||A A^T - I||_F + ||B^T B - I||_F) / (2 n_layers)`.
    pub loss: f32,
    /// Per layer `(d loss / d A, d loss / d B)`, already weighted and averaged.
    pub grads: Vec<(Vec<f32>, Vec<f32>)>,
}

/// PEFT's regulariser over all layers: the sum of one Frobenius norm per `lora_A` and per
/// `lora_B` parameter, divided by the number of such parameters (`2 n_layers`), times
/// `orth_reg_weight`. No layers give 0.
///
/// Errors: `orth_reg_weight < 0` or not finite (PEFT raises for < 0); see [`orth_reg`].
pub fn orth_reg_total(layers: &[OrthRegInput<'_>], orth_reg_weight: f32) -> Result<OrthRegTotal> {
    if !(orth_reg_weight >= 0.0 && orth_reg_weight.is_finite()) {
        return Err(Error::arg(
            "orth_reg_weight",
            format!("must be finite and >= 0, got {orth_reg_weight}"),
        ));
    }
    if layers.is_empty() {
        return Ok(OrthRegTotal {
            loss: 0.0,
            grads: Vec::new(),
        });
    }
    let scale = orth_reg_weight as f64 / (2 * layers.len()) as f64;
    let mut sum = 0.0f64;
    let mut grads = Vec::with_capacity(layers.len());
    for l in layers {
        let o = orth_reg(l.lora_a, l.lora_b, l.r, l.in_features, l.out_features)?;
        sum += o.norm_a as f64 + o.norm_b as f64;
        let s = |g: Vec<f32>| g.into_iter().map(|x| (x as f64 * scale) as f32).collect();
        grads.push((s(o.grad_a), s(o.grad_b)));
    }
    Ok(OrthRegTotal {
        loss: (sum * scale) as f32,
        grads,
    })
}

// ---- the kernels -----------------------------------------------------------------------------------

pub(super) fn update_ipt_kernel(
    param: &Tensor<Cpu>,
    grad: &Tensor<Cpu>,
    ipt: &mut Tensor<Cpu>,
    unc: &mut Tensor<Cpu>,
    c: &EmaCoefs,
) {
    update_ipt(&param.buf, &grad.buf, &mut ipt.buf, &mut unc.buf, c);
}

pub(super) fn triplet_scores_kernel(
    ema: &AdaLoraIpt<Cpu>,
    scores: &mut Tensor<Cpu>,
    offset: usize,
) {
    let (r, din, dout) = (ema.ipt_a.dim(0), ema.ipt_a.dim(1), ema.ipt_b.dim(0));
    let s = triplet_scores(
        [
            (&ema.ipt_a.buf, &ema.unc_a.buf),
            (&ema.ipt_b.buf, &ema.unc_b.buf),
            (&ema.ipt_e.buf, &ema.unc_e.buf),
        ],
        r,
        din,
        dout,
    );
    scores.buf[offset..offset + r].copy_from_slice(&s);
}

pub(super) fn threshold_kernel(scores: &Tensor<Cpu>, k: usize) -> Tensor<Cpu> {
    let mut all = scores.buf.clone();
    new(vec![kthvalue(&mut all, k)], &[1])
}

pub(super) fn rank_mask_kernel(scores: &Tensor<Cpu>, threshold: &Tensor<Cpu>) -> Tensor<Cpu> {
    let t = threshold.buf[0];
    let keep: Vec<f32> = scores
        .buf
        .iter()
        .map(|&s| if masked(s, t) { 0.0 } else { 1.0 })
        .collect();
    let n = keep.len();
    new(keep, &[n])
}

pub(super) fn apply_mask_kernel(lora_e: &mut Tensor<Cpu>, keep: &Tensor<Cpu>, offset: usize) {
    let r = lora_e.dim(0);
    for (e, &k) in lora_e.buf.iter_mut().zip(&keep.buf[offset..offset + r]) {
        if k == 0.0 {
            *e = 0.0;
        }
    }
}

pub(super) fn orth_reg_kernel(
    factors: &[(&Tensor<Cpu>, &Tensor<Cpu>)],
    grads: &mut [(&mut Tensor<Cpu>, &mut Tensor<Cpu>)],
    orth_reg_weight: f32,
) -> Result<Tensor<Cpu>> {
    let inputs: Vec<OrthRegInput<'_>> = factors
        .iter()
        .map(|&(a, b)| OrthRegInput {
            lora_a: &a.buf,
            lora_b: &b.buf,
            r: a.dim(0),
            in_features: a.dim(1),
            out_features: b.dim(0),
        })
        .collect();
    let total = orth_reg_total(&inputs, orth_reg_weight)?;
    // `+= g`, i.e. `axpy(1.0)`: what the host path did with the uploaded gradients.
    for ((ga, gb), (da, db)) in grads.iter_mut().zip(&total.grads) {
        for (g, d) in ga.buf.iter_mut().zip(da) {
            *g += d;
        }
        for (g, d) in gb.buf.iter_mut().zip(db) {
            *g += d;
        }
    }
    Ok(new(vec![total.loss], &[1]))
}
