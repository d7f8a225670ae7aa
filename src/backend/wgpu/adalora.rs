//! AdaLoRA's rank allocator and orthogonal regularizer on the wgpu backend. Same contracts as
//! the trait docs; same math as `adapter/rank_allocator.rs` (the CPU reference), in f32.
//!
//! * The EMA update is the elementwise kernel `adalora_update_ipt` of
//!   `shaders/elementwise.wgsl`.
//! * The triplet scores sum A's rows and B's columns of `ipt * unc` with the compensated
//!   row/column sums of `shaders/adapters.wgsl` (`dense.rs`; where the CPU sums in f64), then
//!   `triplet_combine` of `shaders/adalora.wgsl` adds E's score to the two means.
//! * `torch.kthvalue` counts ranks (`kthvalue`): every invocation counts the scores below its
//!   own, O(n^2 / 256) per workgroup for n scores, which is nothing for the few thousand ranks of
//!   a model; the keep-mask and the masking of `lora_E` are elementwise.
//! * The regularizer forms each Gram matrix with the matmul, subtracts I, takes its norm and
//!   scales it by `2 w / norm` in one workgroup (`orth_gram`, the norm kept in a device buffer),
//!   and adds `G' A` (or `B G'`) into the gradient with a second matmul (`beta = 1`); a last
//!   workgroup sums the norms into the loss (`orth_total`). Nothing is read back.

use super::Wgpu;
use super::ctx::{Bind, GpuBuf};
use super::dense::{colsum, rowdot};
use super::matmul::Operand;
use super::memory::{Rows, grid};
use crate::backend::check::EmaCoefs;
use crate::backend::{AdaLoraIpt, Tensor};
use crate::error::{Error, Result};

const SRC: &str = include_str!("../../../shaders/adalora.wgsl");

/// The parameter block of `shaders/adalora.wgsl`.
#[derive(Default)]
struct Params {
    n: usize,
    k: usize,
    off: usize,
    in_f: usize,
    out_f: usize,
    s: f32,
}

/// Binds the first `len` elements of `buf` whole. Errors: more than one storage binding.
fn whole<'a>(be: &Wgpu, what: &str, buf: &'a GpuBuf, len: usize) -> Result<Bind<'a>> {
    super::memory::whole(&be.ctx, what, buf, len)
}

/// Dispatches `entry` of `shaders/adalora.wgsl` over `groups` workgroups.
fn run(
    be: &Wgpu,
    entry: &str,
    p: &Params,
    binds: Vec<(u32, Bind<'_>)>,
    groups: usize,
) -> Result<()> {
    let kernel = be.ctx.reduce_kernel("adalora", SRC, entry)?;
    let words = [
        p.n as u32,
        p.k as u32,
        p.off as u32,
        p.in_f as u32,
        p.out_f as u32,
        p.s.to_bits(),
    ];
    be.ctx
        .dispatch(&kernel, &words, &binds, grid(&be.ctx, groups))
}

/// Errors unless `n` fits the 32-bit indices of the kernels.
fn fits(what: &str, n: usize) -> Result<()> {
    if n > u32::MAX as usize {
        return Err(Error::arg(what, format!("{n} values exceed 2^32 - 1")));
    }
    Ok(())
}

pub(super) fn update_ipt(
    be: &Wgpu,
    param: &Tensor<Wgpu>,
    grad: &Tensor<Wgpu>,
    ipt: &mut Tensor<Wgpu>,
    unc: &mut Tensor<Wgpu>,
    c: &EmaCoefs,
) -> Result<()> {
    Wgpu::mutable("adalora_update_ipt exp_avg_ipt", ipt)?;
    Wgpu::mutable("adalora_update_ipt exp_avg_unc", unc)?;
    be.elementwise(
        "adalora_update_ipt",
        param.len(),
        &[
            (2, &param.buf),
            (3, &grad.buf),
            (5, &ipt.buf),
            (6, &unc.buf),
        ],
        &[],
        0,
        0,
        &[c.b1, c.one_minus_b1, c.b2, c.one_minus_b2],
    )
}

pub(super) fn triplet_scores(
    be: &Wgpu,
    ema: &AdaLoraIpt<Wgpu>,
    scores: &mut Tensor<Wgpu>,
    offset: usize,
) -> Result<()> {
    let (r, din, dout) = (ema.ipt_a.dim(0), ema.ipt_a.dim(1), ema.ipt_b.dim(0));
    Wgpu::mutable("adalora_triplet_scores", scores)?;
    fits("scores", scores.len())?;
    // Row sums of A's and column sums of B's element scores, compensated.
    let sum_a = be.alloc(&[r]);
    let sum_b = be.alloc(&[r]);
    rowdot(
        be,
        r,
        din,
        Rows::new(&ema.ipt_a.buf, din),
        Rows::new(&ema.unc_a.buf, din),
        None,
        Rows::vec(&sum_a.buf, 0),
    )?;
    colsum(
        be,
        dout,
        r,
        Rows::new(&ema.ipt_b.buf, r),
        Rows::new(&ema.unc_b.buf, r),
        None,
        &sum_b.buf,
    )?;
    let p = Params {
        n: r,
        off: offset,
        in_f: din,
        out_f: dout,
        ..Default::default()
    };
    let binds = vec![
        (1, whole(be, "exp_avg_ipt[lora_E]", &ema.ipt_e.buf, r)?),
        (2, whole(be, "exp_avg_unc[lora_E]", &ema.unc_e.buf, r)?),
        (3, whole(be, "row sums", &sum_a.buf, r)?),
        (4, whole(be, "column sums", &sum_b.buf, r)?),
        (5, whole(be, "scores", &scores.buf, scores.len())?),
    ];
    run(be, "triplet_combine", &p, binds, r.div_ceil(256))
}

pub(super) fn threshold(be: &Wgpu, scores: &Tensor<Wgpu>, k: usize) -> Result<Tensor<Wgpu>> {
    let n = scores.len();
    fits("scores", n)?;
    let out = be.alloc(&[1]);
    let p = Params {
        n,
        k,
        ..Default::default()
    };
    let binds = vec![
        (1, whole(be, "scores", &scores.buf, n)?),
        (5, Bind::all(&out.buf)),
    ];
    run(be, "kthvalue", &p, binds, n.div_ceil(256))?;
    Ok(out)
}

pub(super) fn rank_mask(
    be: &Wgpu,
    scores: &Tensor<Wgpu>,
    threshold: &Tensor<Wgpu>,
) -> Result<Tensor<Wgpu>> {
    let n = scores.len();
    fits("scores", n)?;
    let keep = be.alloc(&[n]);
    if n == 0 {
        return Ok(keep);
    }
    let p = Params {
        n,
        ..Default::default()
    };
    let binds = vec![
        (1, whole(be, "scores", &scores.buf, n)?),
        (2, Bind::all(&threshold.buf)),
        (5, whole(be, "keep", &keep.buf, n)?),
    ];
    run(be, "rank_mask", &p, binds, n.div_ceil(256))?;
    Ok(keep)
}

pub(super) fn apply_mask(
    be: &Wgpu,
    lora_e: &mut Tensor<Wgpu>,
    keep: &Tensor<Wgpu>,
    offset: usize,
) -> Result<()> {
    let r = lora_e.dim(0);
    Wgpu::mutable("adalora_apply_mask", lora_e)?;
    fits("keep", keep.len())?;
    if r == 0 {
        return Ok(());
    }
    let p = Params {
        n: r,
        off: offset,
        ..Default::default()
    };
    let binds = vec![
        (1, whole(be, "keep", &keep.buf, keep.len())?),
        (5, whole(be, "lora_E", &lora_e.buf, r)?),
    ];
    run(be, "apply_mask", &p, binds, r.div_ceil(256))
}

pub(super) fn orth_reg(
    be: &Wgpu,
    factors: &[(&Tensor<Wgpu>, &Tensor<Wgpu>)],
    grads: &mut [(&mut Tensor<Wgpu>, &mut Tensor<Wgpu>)],
    orth_reg_weight: f32,
) -> Result<Tensor<Wgpu>> {
    for (ga, gb) in grads.iter() {
        Wgpu::mutable("adalora_orth_reg grad_A", ga)?;
        Wgpu::mutable("adalora_orth_reg grad_B", gb)?;
    }
    let loss = be.alloc(&[1]);
    if factors.is_empty() {
        return Ok(loss);
    }
    // PEFT averages over the lora_A and lora_B parameters: w = weight / (2 n_layers).
    let n_params = 2 * factors.len();
    let w = (orth_reg_weight as f64 / n_params as f64) as f32;
    let norms = be.alloc(&[n_params]);
    // G (r x r, scaled in place by 2 w / ||G - I||), its norm into norms[slot].
    let gram = |g: &Tensor<Wgpu>, r: usize, slot: usize| -> Result<()> {
        let p = Params {
            n: r,
            off: slot,
            s: 2.0 * w,
            ..Default::default()
        };
        let binds = vec![
            (5, whole(be, "Gram matrix", &g.buf, r * r)?),
            (6, Bind::all(&norms.buf)),
        ];
        run(be, "orth_gram", &p, binds, 1)
    };
    for (l, (&(a, b), (ga, gb))) in factors.iter().zip(grads.iter()).enumerate() {
        let (r, din, dout) = (a.dim(0), a.dim(1), b.dim(0));
        // ||A A^T - I||: G = A A^T [r, r]; grad_A += G' A.
        let g = be.gemm(
            r,
            r,
            din,
            Operand::n(&a.buf, din),
            Operand::t(&a.buf, din),
            1.0,
        )?;
        gram(&g, r, 2 * l)?;
        be.gemm_into(
            r,
            din,
            r,
            Operand::n(&g.buf, r),
            Operand::n(&a.buf, din),
            1.0,
            1.0,
            &ga.buf,
        )?;
        // ||B^T B - I||: G = B^T B [r, r]; grad_B += B G' (G' is symmetric).
        let g = be.gemm(
            r,
            r,
            dout,
            Operand::t(&b.buf, r),
            Operand::n(&b.buf, r),
            1.0,
        )?;
        gram(&g, r, 2 * l + 1)?;
        be.gemm_into(
            dout,
            r,
            r,
            Operand::n(&b.buf, r),
            Operand::n(&g.buf, r),
            1.0,
            1.0,
            &gb.buf,
        )?;
    }
    let p = Params {
        n: n_params,
        s: w,
        ..Default::default()
    };
    let binds = vec![
        (1, whole(be, "norms", &norms.buf, n_params)?),
        (5, Bind::all(&loss.buf)),
    ];
    run(be, "orth_total", &p, binds, 1)?;
    Ok(loss)
}
