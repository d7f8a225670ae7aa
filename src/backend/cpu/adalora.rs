//! AdaLoRA's rank allocator and orthogonal regularizer on the CPU: the host allocator's own
//! functions (`adapter::rank_allocator`) over the tensors' data, so that the device-resident
//! allocator on this backend is bit-identical to the host [`RankAllocator`].
//!
//! [`RankAllocator`]: crate::adapter::rank_allocator::RankAllocator

use super::{Cpu, new};
use crate::adapter::rank_allocator::{self as ra, OrthRegInput};
use crate::backend::{AdaLoraIpt, Tensor, check};
use crate::error::Result;

pub(super) fn update_ipt(
    param: &Tensor<Cpu>,
    grad: &Tensor<Cpu>,
    ipt: &mut Tensor<Cpu>,
    unc: &mut Tensor<Cpu>,
    beta1: f64,
    beta2: f64,
) -> Result<()> {
    let c = check::adalora_update_ipt(param, grad, ipt, unc, beta1, beta2)?;
    ra::update_ipt(&param.buf, &grad.buf, &mut ipt.buf, &mut unc.buf, &c);
    Ok(())
}

pub(super) fn triplet_scores(
    ema: &AdaLoraIpt<Cpu>,
    scores: &mut Tensor<Cpu>,
    offset: usize,
) -> Result<()> {
    let (r, din, dout) = check::adalora_triplet_scores(ema, scores, offset)?;
    let s = ra::triplet_scores(
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
    Ok(())
}

pub(super) fn threshold(scores: &Tensor<Cpu>, k: usize) -> Result<Tensor<Cpu>> {
    check::adalora_threshold(scores, k)?;
    let mut all = scores.buf.clone();
    Ok(new(vec![ra::kthvalue(&mut all, k)], &[1]))
}

pub(super) fn rank_mask(scores: &Tensor<Cpu>, threshold: &Tensor<Cpu>) -> Result<Tensor<Cpu>> {
    let n = check::adalora_rank_mask(scores, threshold)?;
    let t = threshold.buf[0];
    let keep = scores
        .buf
        .iter()
        .map(|&s| if ra::masked(s, t) { 0.0 } else { 1.0 })
        .collect();
    Ok(new(keep, &[n]))
}

pub(super) fn apply_mask(
    lora_e: &mut Tensor<Cpu>,
    keep: &Tensor<Cpu>,
    offset: usize,
) -> Result<()> {
    let r = check::adalora_apply_mask(lora_e, keep, offset)?;
    for (e, &k) in lora_e.buf.iter_mut().zip(&keep.buf[offset..offset + r]) {
        if k == 0.0 {
            *e = 0.0;
        }
    }
    Ok(())
}

pub(super) fn orth_reg(
    factors: &[(&Tensor<Cpu>, &Tensor<Cpu>)],
    grads: &mut [(&mut Tensor<Cpu>, &mut Tensor<Cpu>)],
    orth_reg_weight: f32,
) -> Result<Tensor<Cpu>> {
    let dims = check::adalora_orth_reg(factors, grads, orth_reg_weight)?;
    let inputs: Vec<OrthRegInput<'_>> = factors
        .iter()
        .zip(&dims)
        .map(|(&(a, b), &(r, din, dout))| OrthRegInput {
            lora_a: &a.buf,
            lora_b: &b.buf,
            r,
            in_features: din,
            out_features: dout,
        })
        .collect();
    let total = ra::orth_reg_total(&inputs, orth_reg_weight)?;
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
