//! One generic test suite per op family (`tests/ops/`), instantiated for every backend present
//! (as candle's `test_device!`): each check is a `fn check<B: Backend>(be: &B, tol: &Tol)`
//! comparing `be` with the CPU reference over the shape grids of the old per-backend tests
//! (odd in/out, T = 1 to 130, r from 1 to 64, NF4 blocksizes 32 to 256 with and without double
//! quant), at the tolerances those tests used per backend and storage dtype ([`Tol`]).
//!
//! Instances (test names are `instance::family::check`, e.g. `cuda_bf16::lowrank::dora`):
//! * `cpu`: the error contracts and determinism only (numerics against itself prove nothing);
//! * `wgpu`: every check, default options (subgroup reductions where the adapter has them);
//! * `wgpu_workgroup`: the checks whose kernels reduce (subgroups off: the workgroup-memory
//!   fallback);
//! * `wgpu_1k`: the checks whose kernels split operands wider than one storage binding, with
//!   1 KiB bindings;
//! * `cuda_f32`, `cuda_f16`, `cuda_bf16`: every check in each storage dtype (the device
//!   allocator's whole schedules in f32 only: near-ties between scores rounded to 16 bits may
//!   break differently).
//!
//! A missing backend skips loudly (`common::skip_or_fail`: a `SKIP:` line and
//! `$LORAFUSE_SKIP_LOG`); `LORAFUSE_REQUIRE=wgpu`, `wgpu-subgroups` or `cuda` turns the
//! absence into a failure. Each test prints how many assertions it made (`N checks`).
//! What only one backend has (wgpu: f16 frozen weights, readback counting, out-of-memory;
//! CUDA: construction without hardware, dtype mismatches, quantization on the GPU) stays in
//! `wgpu_*.rs` and `cuda_backend.rs`.

mod common;
#[path = "common/gpu.rs"]
mod gpu;
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
mod ops;
#[path = "common/per_method.rs"]
mod per_method;
#[path = "common/adalora_twin.rs"]
mod twin;

/// `backend_suite!(module, open, tol)` instantiates every check as a `#[test]` in `module`,
/// for the backend `open(test_name) -> Option<B>` gives (`None` after a loud skip), at `tol`
/// (a [`ops::harness::Tol`]); `backend_suite!(module, open, tol, { family: [check, ...], ...
/// })` instantiates only the checks listed.
macro_rules! backend_suite {
    ($m:ident, $open:expr, $tol:expr) => {
        backend_suite!($m, $open, $tol, {
            memory: [round_trip, clones_are_values, gather_scatter, elementwise, sum_squares],
            dense: [linear],
            lowrank: [lora, dora, vera, adalora],
            multi: [mixed, errors],
            nf4: [dequantize, golden_dequantize, linear],
            bf16: [products, errors],
            attention: [attention, cached],
            model: [rmsnorm, rope, swiglu, cross_entropy, cross_entropy_stats],
            pointwise: [mul_vector, sum_product, activation, softmax],
            adamw: [adamw],
            adalora_alloc: [update_and_scores, kthvalue_and_masks, orth_reg, device_allocator],
            errors: [memory, dense, lowrank, nf4, model, attention, adamw, adalora, pointwise],
            determinism: [rmsnorm, attention],
        });
    };
    ($m:ident, $open:expr, $tol:expr, { $($family:ident : [$($check:ident),* $(,)?]),* $(,)? }) => {
        mod $m {
            $(
                mod $family {
                    $(
                        #[test]
                        fn $check() {
                            let test = concat!(
                                stringify!($m), "::", stringify!($family), "::", stringify!($check)
                            );
                            let Some(be) = ($open)(test) else {
                                return;
                            };
                            let tol = $tol;
                            let t0 = std::time::Instant::now();
                            crate::ops::$family::$check(&be, &tol);
                            println!(
                                "{test}: {} checks in {:.1} s",
                                crate::ops::harness::checks(),
                                t0.elapsed().as_secs_f64()
                            );
                        }
                    )*
                }
            )*
        }
    };
}

backend_suite!(cpu, crate::ops::harness::cpu, crate::ops::harness::Tol::cpu(), {
    // `mixed` checks the CPU's mixed batch against its own per-row single-adapter product;
    // `bf16` the tiled bf16 products against the plain GEMMs on the rounded weight.
    multi: [mixed, errors],
    bf16: [products, errors],
    errors: [memory, dense, lowrank, nf4, model, attention, adamw, adalora, pointwise],
    determinism: [rmsnorm, attention],
});

#[cfg(feature = "wgpu")]
backend_suite!(
    wgpu,
    crate::ops::harness::wgpu,
    crate::ops::harness::Tol::wgpu()
);

#[cfg(feature = "wgpu")]
backend_suite!(wgpu_workgroup, crate::ops::harness::wgpu_workgroup, crate::ops::harness::Tol::wgpu(), {
    memory: [sum_squares],
    lowrank: [dora, vera, adalora],
    model: [rmsnorm, cross_entropy, cross_entropy_stats],
    pointwise: [sum_product, softmax],
    adalora_alloc: [update_and_scores, orth_reg],
    determinism: [rmsnorm],
});

#[cfg(feature = "wgpu")]
backend_suite!(wgpu_1k, crate::ops::harness::wgpu_1k, crate::ops::harness::Tol::wgpu_1k(), {
    memory: [gather_scatter, elementwise, sum_squares],
    multi: [mixed],
    dense: [linear],
    lowrank: [dora, vera, adalora],
    nf4: [dequantize, linear],
    model: [rmsnorm, rope, cross_entropy],
    pointwise: [mul_vector, sum_product, activation],
    adalora_alloc: [update_and_scores],
    determinism: [rmsnorm],
});

#[cfg(feature = "cuda")]
backend_suite!(
    cuda_f32,
    |t| crate::ops::harness::cuda(crate::ops::harness::Prec::F32, t),
    crate::ops::harness::Tol::cuda(crate::ops::harness::Prec::F32)
);

#[cfg(feature = "cuda")]
backend_suite!(
    cuda_f16,
    |t| crate::ops::harness::cuda(crate::ops::harness::Prec::F16, t),
    crate::ops::harness::Tol::cuda(crate::ops::harness::Prec::F16),
    {
        memory: [round_trip, clones_are_values, gather_scatter, elementwise, sum_squares],
        dense: [linear],
        lowrank: [lora, dora, vera, adalora],
        multi: [mixed, errors],
        nf4: [dequantize, golden_dequantize, linear],
        bf16: [products, errors],
        attention: [attention, cached],
        model: [rmsnorm, rope, swiglu, cross_entropy, cross_entropy_stats],
        pointwise: [mul_vector, sum_product, activation, softmax],
        adamw: [adamw],
        adalora_alloc: [update_and_scores, kthvalue_and_masks, orth_reg],
        errors: [memory, dense, lowrank, nf4, model, attention, adamw, adalora, pointwise],
        determinism: [rmsnorm, attention],
    }
);

#[cfg(feature = "cuda")]
backend_suite!(
    cuda_bf16,
    |t| crate::ops::harness::cuda(crate::ops::harness::Prec::Bf16, t),
    crate::ops::harness::Tol::cuda(crate::ops::harness::Prec::Bf16),
    {
        memory: [round_trip, clones_are_values, gather_scatter, elementwise, sum_squares],
        dense: [linear],
        lowrank: [lora, dora, vera, adalora],
        multi: [mixed, errors],
        nf4: [dequantize, golden_dequantize, linear],
        bf16: [products, errors],
        attention: [attention, cached],
        model: [rmsnorm, rope, swiglu, cross_entropy, cross_entropy_stats],
        pointwise: [mul_vector, sum_product, activation, softmax],
        adamw: [adamw],
        adalora_alloc: [update_and_scores, kthvalue_and_masks, orth_reg],
        errors: [memory, dense, lowrank, nf4, model, attention, adamw, adalora, pointwise],
        determinism: [rmsnorm, attention],
    }
);
