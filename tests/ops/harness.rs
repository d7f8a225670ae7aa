//! What every check of the suite shares: the tolerances of a backend instance ([`Tol`]), the
//! backends' constructors (each skipping loudly through [`skip_or_fail`]), seeded data on both
//! the CPU reference and the backend under test ([`Pair`]), and the comparisons, each of which
//! counts itself (the count is printed at the end of every test: `N checks`).
//!
//! Inputs are rounded to the backend's storage precision before the CPU sees them, and what a
//! forward saves for its backward (h, z, attention's out and lse) is the backend's own, given
//! to both backwards, so that each comparison measures only the backend's arithmetic of the op
//! compared.

#![allow(dead_code)] // the CPU instance uses only part of this

use crate::common::skip_or_fail;
use lorafuse::backend::{Base, GradWants, LowRank, LowRankGrads, Nf4Weight};
use lorafuse::quant::nf4::quantize_nf4;
use lorafuse::{Backend, Cpu, Tensor};
use std::cell::Cell;

thread_local! {
    static CHECKS: Cell<usize> = const { Cell::new(0) };
}

/// Counts one assertion (every helper of this module calls it once per comparison).
pub fn counted() {
    CHECKS.with(|c| c.set(c.get() + 1));
}

/// The assertions this thread (this test) has made.
pub fn checks() -> usize {
    CHECKS.with(|c| c.get())
}

/// Storage precision of a backend instance: inputs are rounded to it before the CPU sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prec {
    F32,
    F16,
    Bf16,
}

impl Prec {
    /// `v` rounded to this precision (and back to f32).
    pub fn round(self, v: &[f32]) -> Vec<f32> {
        match self {
            Prec::F32 => v.to_vec(),
            Prec::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
            Prec::Bf16 => v
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect(),
        }
    }
}

/// The tolerances of one backend instance, per kind of result, as the per-backend tests had
/// them. A comparison passes when `max |got - want| <= rtol * max(max |want|, floor) + atol`
/// elementwise (and finiteness agrees); the kinds give `rtol`.
#[derive(Clone, Debug)]
pub struct Tol {
    pub prec: Prec,
    pub atol: f32,
    pub floor: f32,
    /// Products and their gradients (linear, every low-rank term, NF4 matmuls, merges), RMSNorm
    /// y / dx / dweight, RoPE, attention's output, cross-entropy's dlogits, AdamW.
    pub rel: f32,
    /// Row norms `||W||_row^2`.
    pub row_sq: f32,
    /// Elementwise kernels: SwiGLU and its backward, axpy.
    pub elementwise: f32,
    /// `Backend::scale`.
    pub scale: f32,
    /// RMSNorm's saved rstd.
    pub rstd: f32,
    /// Attention's saved log-sum-exp.
    pub lse: f32,
    /// Attention's dq, dk, dv.
    pub attn_grad: f32,
    /// RoPE's inverse (against the CPU's and as a round trip to the input).
    pub rope_inverse: f32,
    /// Merge then unmerge of LoRA, VeRA, AdaLoRA terms.
    pub lora_round_trip: f32,
    /// Merge then unmerge of DoRA.
    pub dora_round_trip: f32,
    /// Cross-entropy's summed loss, relative.
    pub ce_loss: f64,
    /// Cross-entropy's per-row statistics.
    pub ce_stats: f32,
    /// Sum of squares, relative.
    pub sum_squares: f64,
    /// AdaLoRA's EMA update and triplet scores.
    pub ema: f32,
    /// AdaLoRA's orthogonal regularizer: the loss and the gradients.
    pub orth_loss: f32,
    pub orth_grad: f32,
    /// The device allocator's lora_E and scores (and threshold), relative.
    pub alloc_e: f32,
    pub alloc_scores: f32,
    /// Whether scatter-add equals the CPU's bit for bit (no atomics: same sources, same order).
    pub exact_scatter: bool,
    /// The largest head_dim the attention kernels take; beyond it they must fail.
    pub max_head_dim: usize,
    /// The widest row (floats) the row reductions (RMSNorm, cross-entropy) take; beyond it
    /// they must fail.
    pub max_row: usize,
}

impl Tol {
    /// The CPU instance: it checks only error contracts and determinism, no numerics.
    pub fn cpu() -> Tol {
        Tol {
            max_head_dim: usize::MAX,
            ..Tol::wgpu()
        }
    }

    /// The wgpu backend (f32 storage): the tolerances of the old `tests/wgpu_*.rs`.
    pub fn wgpu() -> Tol {
        Tol {
            prec: Prec::F32,
            atol: 1e-6,
            floor: 0.0,
            rel: 1e-5,
            row_sq: 1e-6,
            elementwise: 1e-6,
            scale: 1e-7,
            rstd: 1e-5,
            lse: 1e-5,
            attn_grad: 1e-5,
            rope_inverse: 1e-5,
            lora_round_trip: 1e-5,
            dora_round_trip: 1e-5,
            ce_loss: 1e-5,
            ce_stats: 2e-6,
            sum_squares: 1e-6,
            ema: 2e-6,
            orth_loss: 2e-5,
            orth_grad: 2e-5,
            alloc_e: 1e-6,
            alloc_scores: 1e-5,
            exact_scatter: true,
            max_head_dim: 128,
            max_row: usize::MAX,
        }
    }

    /// The wgpu backend with 1 KiB storage bindings: as [`Tol::wgpu`]; a row must fit one
    /// binding (256 floats).
    pub fn wgpu_1k() -> Tol {
        Tol {
            max_row: 256,
            ..Tol::wgpu()
        }
    }

    /// The CUDA backend in `prec` storage: the tolerances of the old `tests/cuda_backend.rs`
    /// (`max |gpu - cpu| <= tol * max |cpu|`, tol 2e-4 f32, 1e-2 f16, 4e-2 bf16, and the
    /// multiples and fixed values it used per result).
    pub fn cuda(prec: Prec) -> Tol {
        let tl = match prec {
            Prec::F32 => 2e-4,
            Prec::F16 => 1e-2,
            Prec::Bf16 => 4e-2,
        };
        Tol {
            prec,
            atol: 0.0,
            floor: 1e-6,
            rel: tl,
            row_sq: tl,
            elementwise: tl,
            scale: tl,
            rstd: 2e-4,
            lse: 2e-3,
            attn_grad: 2.0 * tl,
            rope_inverse: 2.0 * tl,
            lora_round_trip: 4.0 * tl,
            dora_round_trip: 8.0 * tl,
            ce_loss: 1e-4,
            ce_stats: 2e-4,
            sum_squares: 1e-9,
            ema: tl,
            orth_loss: tl,
            orth_grad: 2.0 * tl,
            alloc_e: tl,
            alloc_scores: tl,
            exact_scatter: false,
            max_head_dim: usize::MAX,
            max_row: usize::MAX,
        }
    }

    /// `v` rounded to the storage precision.
    pub fn round(&self, v: &[f32]) -> Vec<f32> {
        self.prec.round(v)
    }

    /// Asserts `got` equals `want` within `rtol` (see [`Tol`]), naming `what` and the worst
    /// element.
    #[track_caller]
    pub fn close_vec(&self, what: &str, got: &[f32], want: &[f32], rtol: f32) {
        self.close_vec_atol(what, got, want, rtol, self.atol);
    }

    /// [`Tol::close_vec`] with an explicit absolute term (0: purely relative).
    #[track_caller]
    pub fn close_vec_atol(&self, what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
        counted();
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let bound = rtol * scale.max(self.floor) + atol;
        let mut worst = (0.0f32, 0usize);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g.is_finite() == w.is_finite(),
                "{what}[{i}]: got {g}, want {w} (finiteness differs)"
            );
            let e = (g - w).abs();
            if e > worst.0 {
                worst = (e, i);
            }
        }
        let (e, i) = worst;
        assert!(
            e <= bound,
            "{what}: max error {e} at [{i}] (got {}, want {}) > tolerance {bound} = {rtol} x {scale} + {atol} ({:?})",
            got[i],
            want[i],
            self.prec
        );
    }

    /// Asserts a backend tensor equals the CPU's within `rtol`.
    #[track_caller]
    pub fn close<B: Backend>(
        &self,
        be: &B,
        what: &str,
        got: &Tensor<B>,
        want: &Tensor<Cpu>,
        rtol: f32,
    ) {
        assert_eq!(got.shape(), want.shape(), "{what}: shape");
        let g = be.download(got).expect("download");
        self.close_vec(what, &g, want.data(), rtol);
    }

    /// Asserts a backend tensor equals host values within `rtol`.
    #[track_caller]
    pub fn close_to<B: Backend>(
        &self,
        be: &B,
        what: &str,
        got: &Tensor<B>,
        want: &[f32],
        rtol: f32,
    ) {
        let g = be.download(got).expect("download");
        self.close_vec(what, &g, want, rtol);
    }
}

/// Asserts two value lists are equal bit for bit, naming the first element that differs.
#[track_caller]
pub fn bits(what: &str, got: &[f32], want: &[f32]) {
    counted();
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} differs: got {:e} ({:#010x}), want {:e} ({:#010x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

/// Asserts a backend tensor equals the CPU's bit for bit (shape included).
#[track_caller]
pub fn bits_t<B: Backend>(be: &B, what: &str, got: &Tensor<B>, want: &Tensor<Cpu>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    bits(what, &be.download(got).expect("download"), want.data());
}

/// Asserts that the CPU and the backend both fail, with the same message.
#[track_caller]
pub fn same_error<T, U>(what: &str, cpu: lorafuse::Result<T>, be: lorafuse::Result<U>) {
    counted();
    let (Err(c), Err(b)) = (cpu, be) else {
        panic!("{what}: expected both backends to fail");
    };
    assert_eq!(b.to_string(), c.to_string(), "{what}");
}

/// [`same_error`], and the error is an [`lorafuse::Error::Shape`].
#[track_caller]
pub fn same_shape_error<T, U>(what: &str, cpu: lorafuse::Result<T>, be: lorafuse::Result<U>) {
    let b = be.map(|_| ());
    assert!(
        matches!(b, Err(lorafuse::Error::Shape { .. })),
        "{what}: a shape error expected, got {b:?}"
    );
    same_error(what, cpu, b);
}

/// [`same_error`], and the error is an [`lorafuse::Error::InvalidArgument`].
#[track_caller]
pub fn same_arg_error<T, U>(what: &str, cpu: lorafuse::Result<T>, be: lorafuse::Result<U>) {
    let b = be.map(|_| ());
    assert!(
        matches!(b, Err(lorafuse::Error::InvalidArgument { .. })),
        "{what}: an invalid-argument error expected, got {b:?}"
    );
    same_error(what, cpu, b);
}

/// Asserts `cond`, counted.
#[track_caller]
pub fn ensure(cond: bool, what: impl FnOnce() -> String) {
    counted();
    assert!(cond, "{}", what());
}

// ---- data -----------------------------------------------------------------------------------

/// `n` values uniform in `[-b, b)` from `seed` (ChaCha8, as `common/gpu.rs`).
pub fn vals(n: usize, seed: u64, b: f32) -> Vec<f32> {
    crate::gpu::rand_vec(n, seed)
        .into_iter()
        .map(|v| v * b)
        .collect()
}

/// One host tensor on both backends: `c` on the CPU reference, `g` on the backend under test.
pub struct Pair<B: Backend> {
    pub c: Tensor<Cpu>,
    pub g: Tensor<B>,
}

impl<B: Backend> Clone for Pair<B> {
    fn clone(&self) -> Self {
        Pair {
            c: self.c.clone(),
            g: self.g.clone(),
        }
    }
}

/// `data`, rounded to the backend's precision, on both backends.
pub fn pair<B: Backend>(be: &B, tol: &Tol, data: &[f32], shape: &[usize]) -> Pair<B> {
    let r = tol.round(data);
    Pair {
        c: Cpu.upload(&r, shape).expect("cpu upload"),
        g: be.upload(&r, shape).expect("backend upload"),
    }
}

/// Values uniform in `[-b, b)` of `shape` on both backends.
pub fn rand<B: Backend>(be: &B, tol: &Tol, shape: &[usize], seed: u64, b: f32) -> Pair<B> {
    pair(be, tol, &vals(shape.iter().product(), seed, b), shape)
}

/// Values in `[0.5, 1.5)`: DoRA magnitudes that keep `m / n` away from 0.
pub fn positive<B: Backend>(be: &B, tol: &Tol, n: usize, seed: u64) -> Pair<B> {
    let v: Vec<f32> = vals(n, seed, 1.0).iter().map(|v| 1.0 + 0.5 * v).collect();
    pair(be, tol, &v, &[n])
}

/// Values in `[0, 1)`: EMAs are non-negative.
pub fn nonneg<B: Backend>(be: &B, tol: &Tol, shape: &[usize], seed: u64) -> Pair<B> {
    let v: Vec<f32> = vals(shape.iter().product(), seed, 1.0)
        .iter()
        .map(|v| 0.5 * (v + 1.0))
        .collect();
    pair(be, tol, &v, shape)
}

/// A backend result as a pair (the backend's values on both), to give both sides the same
/// saved state.
pub fn back<B: Backend>(be: &B, tol: &Tol, t: &Tensor<B>) -> Pair<B> {
    pair(be, tol, &be.download(t).expect("download"), t.shape())
}

/// A CPU result as a pair (the reference's values, rounded, on both).
pub fn from_cpu<B: Backend>(be: &B, tol: &Tol, t: &Tensor<Cpu>) -> Pair<B> {
    pair(be, tol, t.data(), t.shape())
}

/// The NF4 twin of a weight (its values as the CPU holds them): quantized once (blocksize 64,
/// double quant), the same bytes on both backends.
pub fn nf4_of<B: Backend>(be: &B, w: &Pair<B>) -> (Nf4Weight<Cpu>, Nf4Weight<B>) {
    let q = quantize_nf4(w.c.data(), w.c.shape(), 64, true).expect("quantize");
    (
        Cpu.upload_nf4(&q).expect("cpu nf4"),
        be.upload_nf4(&q).expect("backend nf4"),
    )
}

/// What [`fused`] hands back for further checks: the backend's h and z (as pairs) and its
/// gradients.
pub struct FusedOut<B: Backend> {
    pub h: Pair<B>,
    pub z: Option<Pair<B>>,
    pub grads: LowRankGrads<B>,
}

/// The fused op on both backends over `base`: forward (y, h, and z under a column scale),
/// the input gradient (dx and g; and dx added into an existing accumulator, which returns no
/// dx), and the backward (dx and every gradient `wants` asks for, present where asked), all
/// at `tol.rel`. The backwards get the backend forward's h and z.
#[allow(clippy::too_many_arguments)]
pub fn fused<B: Backend>(
    be: &B,
    tol: &Tol,
    what: &str,
    (bc, bg): (Base<'_, Cpu>, Base<'_, B>),
    x: &Pair<B>,
    bias: Option<&Pair<B>>,
    dy: &Pair<B>,
    (tc, tg): (&LowRank<'_, Cpu>, &LowRank<'_, B>),
    wants: GradWants,
    acc_seed: u64,
) -> FusedOut<B> {
    let rel = tol.rel;
    let og = be
        .linear_lowrank(&x.g, bg, bias.map(|b| &b.g), Some(tg))
        .unwrap_or_else(|e| panic!("{what} forward: {e}"));
    let oc = Cpu
        .linear_lowrank(&x.c, bc, bias.map(|b| &b.c), Some(tc))
        .unwrap();
    tol.close(be, &format!("{what} y"), &og.y, &oc.y, rel);
    let (hg, hc) = (og.h.expect("h"), oc.h.expect("h"));
    tol.close(be, &format!("{what} h"), &hg, &hc, rel);
    let z = match (og.z, oc.z) {
        (Some(zg), Some(zc)) => {
            tol.close(be, &format!("{what} z"), &zg, &zc, rel);
            Some(back(be, tol, &zg))
        }
        (None, None) => None,
        _ => panic!("{what}: z on one backend only"),
    };
    let h = back(be, tol, &hg);

    let (dxg, gg) = be.backward_input(&dy.g, bg, Some(tg), None).unwrap();
    let (dxc, gc) = Cpu.backward_input(&dy.c, bc, Some(tc), None).unwrap();
    let (dxc, gc) = (dxc.expect("dx"), gc.expect("g"));
    tol.close(
        be,
        &format!("{what} backward_input dx"),
        &dxg.expect("dx"),
        &dxc,
        rel,
    );
    tol.close(
        be,
        &format!("{what} backward_input g"),
        &gg.expect("g"),
        &gc,
        rel,
    );
    let mut acc = rand(be, tol, x.c.shape(), acc_seed, 1.0);
    let (none, gg2) = be
        .backward_input(&dy.g, bg, Some(tg), Some(&mut acc.g))
        .unwrap();
    ensure(none.is_none(), || format!("{what}: dx added into acc"));
    Cpu.backward_input(&dy.c, bc, Some(tc), Some(&mut acc.c))
        .unwrap();
    tol.close(be, &format!("{what} dx acc"), &acc.g, &acc.c, rel);
    tol.close(be, &format!("{what} g (acc)"), &gg2.expect("g"), &gc, rel);

    let zg = z.as_ref().map(|z| &z.g);
    let zc = z.as_ref().map(|z| &z.c);
    let dg = be
        .linear_lowrank_backward(&dy.g, &x.g, &h.g, zg, bg, tg, wants)
        .unwrap_or_else(|e| panic!("{what} backward: {e}"));
    let dc = Cpu
        .linear_lowrank_backward(&dy.c, &x.c, &h.c, zc, bc, tc, wants)
        .unwrap();
    tol.close(be, &format!("{what} dx"), &dg.dx, &dc.dx, rel);
    let grads = [
        ("dA", &dg.d_lora_a, &dc.d_lora_a, wants.lora_a),
        ("dB", &dg.d_lora_b, &dc.d_lora_b, wants.lora_b),
        (
            "d rank_scale",
            &dg.d_rank_scale,
            &dc.d_rank_scale,
            wants.rank_scale,
        ),
        (
            "d out_scale",
            &dg.d_out_scale,
            &dc.d_out_scale,
            wants.out_scale,
        ),
        ("dm", &dg.d_magnitude, &dc.d_magnitude, wants.magnitude),
    ];
    for (name, gd, cd, wanted) in grads {
        match (gd, cd) {
            (Some(gd), Some(cd)) => tol.close(be, &format!("{what} {name}"), gd, cd, rel),
            (None, None) => ensure(!wanted, || format!("{what}: {name} wanted but missing")),
            _ => panic!("{what}: {name} on one backend only"),
        }
    }
    FusedOut { h, z, grads: dg }
}

/// Merges the term into a copy of `w` on both (compared at `tol.rel`), then unmerges it:
/// the backend's unmerged weight against the CPU's and against `w` itself, at `round_trip`.
pub fn merge_round_trip<B: Backend>(
    be: &B,
    tol: &Tol,
    what: &str,
    w: &Pair<B>,
    (tc, tg): (&LowRank<'_, Cpu>, &LowRank<'_, B>),
    round_trip: f32,
) {
    let (mut wg, mut wc) = (w.g.clone(), w.c.clone());
    be.lowrank_merge(&mut wg, tg, 1.0).unwrap();
    Cpu.lowrank_merge(&mut wc, tc, 1.0).unwrap();
    tol.close(be, &format!("{what} merged"), &wg, &wc, tol.rel);
    be.lowrank_merge(&mut wg, tg, -1.0).unwrap();
    Cpu.lowrank_merge(&mut wc, tc, -1.0).unwrap();
    tol.close(be, &format!("{what} unmerged"), &wg, &wc, round_trip);
    tol.close(be, &format!("{what} round trip"), &wg, &w.c, round_trip);
}

// ---- the backends ----------------------------------------------------------------------------

/// The CPU reference itself (the instance of the error contracts and determinism checks).
pub fn cpu(_test: &str) -> Option<Cpu> {
    Some(Cpu)
}

#[cfg(feature = "wgpu")]
fn announce(be: &lorafuse::Wgpu) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("wgpu adapter: {}", be.adapter_name()));
}

/// The wgpu backend with default options (subgroup reductions where the adapter has them).
/// Without an adapter: `None` after a loud skip (a failure under `LORAFUSE_REQUIRE=wgpu`);
/// without `SUBGROUP` it runs the workgroup fallback after saying so loudly (a failure under
/// `LORAFUSE_REQUIRE=wgpu-subgroups`).
#[cfg(feature = "wgpu")]
pub fn wgpu(test: &str) -> Option<lorafuse::Wgpu> {
    let be = crate::gpu::wgpu(test)?;
    announce(&be);
    if !be.has_subgroups() {
        skip_or_fail(
            "wgpu-subgroups",
            &format!(
                "{test}: subgroup reductions untested, {} lacks SUBGROUP",
                be.adapter_name()
            ),
        );
    }
    Some(be)
}

/// The wgpu backend with subgroup reductions off (the workgroup-memory fallback).
#[cfg(feature = "wgpu")]
pub fn wgpu_workgroup(test: &str) -> Option<lorafuse::Wgpu> {
    let be = crate::gpu::wgpu_with(
        test,
        &lorafuse::WgpuOptions {
            subgroups: false,
            ..lorafuse::WgpuOptions::default()
        },
    )?;
    announce(&be);
    assert!(
        !be.has_subgroups(),
        "subgroups: false must select the fallback"
    );
    Some(be)
}

/// The wgpu backend with 1 KiB storage bindings: every buffer above 256 floats is split.
#[cfg(feature = "wgpu")]
pub fn wgpu_1k(test: &str) -> Option<lorafuse::Wgpu> {
    let be = crate::gpu::wgpu_with(
        test,
        &lorafuse::WgpuOptions {
            max_binding: Some(1024),
            ..lorafuse::WgpuOptions::default()
        },
    )?;
    announce(&be);
    assert!(be.max_binding() <= 1024);
    Some(be)
}

/// The CUDA backend on device 0 in `prec` storage, or `None` after a loud skip (a failure
/// under `LORAFUSE_REQUIRE=cuda`).
#[cfg(feature = "cuda")]
pub fn cuda(prec: Prec, test: &str) -> Option<lorafuse::backend::cuda::Cuda> {
    use lorafuse::backend::cuda::{Cuda, DType};
    let dtype = match prec {
        Prec::F32 => DType::F32,
        Prec::F16 => DType::F16,
        Prec::Bf16 => DType::BF16,
    };
    match Cuda::with_dtype(0, dtype) {
        Ok(be) => Some(be),
        Err(e) => {
            skip_or_fail("cuda", &format!("{test}: {e}"));
            None
        }
    }
}
