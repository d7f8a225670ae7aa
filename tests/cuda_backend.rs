//! What only the CUDA backend has, beyond the generic suite (`tests/backend_ops.rs`, whose
//! `cuda_f32`, `cuda_f16` and `cuda_bf16` instances compare every `Backend` method with the CPU
//! reference in each storage dtype): construction without hardware is an error, not a panic;
//! tensors of two storage dtypes do not mix; and NF4 quantization on the GPU
//! (`Cuda::quantize_nf4`, `Cuda::download_nf4`) gives the CPU's bytes, refusing a non-finite
//! value and a bad blocksize.
//!
//! Without a GPU (or libcuda/libnvrtc/libcublas) each test prints why and passes, unless
//! `LORAFUSE_REQUIRE` contains `cuda`, which turns the absence into a failure.
#![cfg(feature = "cuda")]

mod common;

use half::{bf16, f16};
use lorafuse::backend::cuda::{Cuda, DType};
use lorafuse::quant::nf4::quantize_nf4;
use lorafuse::{Backend, Error};

/// The backend in `dtype`, or None (with a printed reason) when no GPU is usable.
fn gpu(dtype: DType, test: &str) -> Option<Cuda> {
    match Cuda::with_dtype(0, dtype) {
        Ok(be) => Some(be),
        Err(e) => {
            common::skip_or_fail("cuda", &format!("{test}: {e}"));
            None
        }
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn round(d: DType, v: &[f32]) -> Vec<f32> {
    match d {
        DType::F32 => v.to_vec(),
        DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
    }
}

/// Deterministic values in [-b, b).
fn vals(n: usize, seed: u64, b: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * b
        })
        .collect()
}

#[test]
fn new_without_hardware_is_an_error_not_a_panic() {
    match Cuda::new(0) {
        Ok(be) => {
            assert_eq!(be.name(), "cuda");
            // A device index far past the last must be BackendUnavailable.
            assert!(matches!(
                Cuda::new(1 << 20),
                Err(Error::BackendUnavailable { .. })
            ));
        }
        Err(e) => {
            assert!(matches!(e, Error::BackendUnavailable { .. }), "{e}");
            common::skip_or_fail("cuda", &format!("(GPU part of) new_without_hardware: {e}"));
        }
    }
}

/// The GPU's NF4 quantization of a dense weight (rounded to the storage dtype) equals the
/// CPU's bit for bit, packed data and statistics, in every dtype; a NaN is refused naming its
/// index, a blocksize that is not a power of two is refused.
#[test]
fn nf4_quantize_on_the_gpu_is_bit_exact() {
    for d in DTYPES {
        let Some(g) = gpu(d, "nf4_quantize_on_the_gpu_is_bit_exact") else {
            return;
        };
        // [out, in] with n not a multiple of the blocksize (short last block) and odd in.
        for (k, &(dout, din, bs, dq)) in [
            (29usize, 37usize, 64usize, false),
            (67, 83, 64, true),
            (300, 128, 128, true),
            (45, 64, 32, false),
        ]
        .iter()
        .enumerate()
        {
            let wv = round(d, &vals(dout * din, 5000 + k as u64, 0.5));
            let qt = quantize_nf4(&wv, &[dout, din], bs, dq).unwrap();
            let dense = g.upload(&wv, &[dout, din]).unwrap();
            let gq = g.quantize_nf4(&dense, bs, dq).unwrap();
            let back = g.download_nf4(&gq).unwrap();
            assert_eq!(
                back, qt,
                "GPU quantize_nf4 differs from the CPU ({d:?}, {dout}x{din}, bs {bs}, dq {dq})"
            );
            assert_eq!(gq.bytes(), qt.bytes());
        }
        // non-finite input and a bad blocksize
        let mut wv = vals(64 * 3, 1, 1.0);
        wv[70] = f32::NAN;
        let wt = g.upload(&wv, &[3, 64]).unwrap();
        assert!(matches!(
            g.quantize_nf4(&wt, 64, false),
            Err(Error::NonFinite { index: 70, .. })
        ));
        assert!(g.quantize_nf4(&wt, 48, false).is_err());
    }
}

#[test]
fn dtype_mismatch_is_an_error() {
    let Some(g32) = gpu(DType::F32, "dtype_mismatch") else {
        return;
    };
    let g16 = g32.to_dtype(DType::BF16);
    let x = g32.upload(&[1.0; 6], &[2, 3]).unwrap();
    let w = g16.upload(&[1.0; 12], &[4, 3]).unwrap();
    assert!(matches!(
        g32.linear(&x, &w, None),
        Err(Error::InvalidArgument { .. })
    ));
}
