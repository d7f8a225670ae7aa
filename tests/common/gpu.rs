//! Helpers for testing a GPU backend against the CPU reference: open the backend or skip
//! loudly, seeded data, and a comparison whose tolerance scales with the values compared.
//! (The generic suite, `tests/backend_ops.rs`, builds its own on these in `tests/ops/harness.rs`.)

#![allow(dead_code)]

use crate::common::skip_or_fail;
use lorafuse::{Backend, Cpu, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The wgpu backend, or `None` after printing why (a failure under `LORAFUSE_REQUIRE=wgpu`).
#[cfg(feature = "wgpu")]
pub fn wgpu(test: &str) -> Option<lorafuse::Wgpu> {
    match lorafuse::Wgpu::new() {
        Ok(be) => Some(be),
        Err(e) => {
            skip_or_fail("wgpu", &format!("{test}: {e}"));
            None
        }
    }
}

/// The CUDA backend on device 0, or `None` after printing why (a failure under
/// `LORAFUSE_REQUIRE=cuda`).
#[cfg(feature = "cuda")]
pub fn cuda(test: &str) -> Option<lorafuse::backend::cuda::Cuda> {
    match lorafuse::backend::cuda::Cuda::new(0) {
        Ok(be) => Some(be),
        Err(e) => {
            skip_or_fail("cuda", &format!("{test}: {e}"));
            None
        }
    }
}

/// The wgpu backend with `opts`, or `None` after printing why (a failure under
/// `LORAFUSE_REQUIRE=wgpu`).
#[cfg(feature = "wgpu")]
pub fn wgpu_with(test: &str, opts: &lorafuse::WgpuOptions) -> Option<lorafuse::Wgpu> {
    match lorafuse::Wgpu::with_options(opts) {
        Ok(be) => Some(be),
        Err(e) => {
            skip_or_fail("wgpu", &format!("{test}: {e}"));
            None
        }
    }
}

/// The wgpu backend storing frozen weights as f16 (with storage bindings of at most
/// `max_binding` bytes, subgroup reductions where available when `subgroups`), or `None`
/// after printing why: no adapter (a failure under `LORAFUSE_REQUIRE=wgpu`) or an adapter
/// without `SHADER_F16` (a failure under `LORAFUSE_REQUIRE=wgpu-f16`).
#[cfg(feature = "wgpu")]
pub fn wgpu_f16(test: &str, max_binding: Option<u64>, subgroups: bool) -> Option<lorafuse::Wgpu> {
    let opts = lorafuse::WgpuOptions {
        max_binding,
        subgroups,
        f16: true,
    };
    let be = wgpu_with(test, &opts)?;
    if !be.has_f16() {
        skip_or_fail(
            "wgpu-f16",
            &format!("{test}: {} has no SHADER_F16", be.adapter_name()),
        );
        return None;
    }
    Some(be)
}

/// `n` values uniform in `[-1, 1)` from `seed`.
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// The same data on the CPU and on `be`.
pub fn pair<B: Backend>(be: &B, data: &[f32], shape: &[usize]) -> (Tensor<Cpu>, Tensor<B>) {
    (
        Cpu.upload(data, shape).expect("cpu upload"),
        be.upload(data, shape).expect("gpu upload"),
    )
}

/// Random data of `shape` on both backends.
pub fn rand_pair<B: Backend>(be: &B, shape: &[usize], seed: u64) -> (Tensor<Cpu>, Tensor<B>) {
    pair(be, &rand_vec(shape.iter().product(), seed), shape)
}

/// Asserts `got` equals `want` elementwise within `rtol * max|want| + atol`, naming `what`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let tol = rtol * scale + atol;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol && g.is_finite() == w.is_finite(),
            "{what}[{i}]: got {g}, want {w} (tolerance {tol}, max |want| {scale})"
        );
    }
}

/// Compares a backend tensor with the CPU reference's.
pub fn assert_tensor<B: Backend>(
    be: &B,
    what: &str,
    got: &Tensor<B>,
    want: &Tensor<Cpu>,
    rtol: f32,
) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let g = be.download(got).expect("download");
    assert_close(what, &g, want.data(), rtol, 1e-6);
}
