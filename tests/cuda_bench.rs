//! GPU benchmark driver for `scripts/gpu-check.sh` (ignored by default: it measures, it does not
//! test). Run with `--ignored --nocapture`; with `LORAFUSE_BENCH_OUT=<file>` it writes the
//! timings as JSON for the script, which times torch/PEFT/bitsandbytes on the same cases in the
//! same run and writes the ratios into BENCHMARKS.md.
//!
//! Each case: 3 warm-up runs, then runs until 0.5 s or 200 runs, each followed by a device
//! synchronize; the median is reported, with the bytes the kernel must move (for the fraction
//! of the measured device-to-device copy bandwidth).
#![cfg(feature = "cuda")]

mod common;
#[path = "common/per_method.rs"]
mod per_method;

use lorafuse::Result;
use lorafuse::backend::cuda::{Cuda, DType};
use lorafuse::backend::{Backend, Base};
use lorafuse::quant::nf4::quantize_nf4;
use per_method::PerMethod;
use std::time::Instant;

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

/// Median seconds of `f` (each run synchronized).
fn time(be: &Cuda, mut f: impl FnMut() -> Result<()>) -> f64 {
    for _ in 0..3 {
        f().unwrap();
    }
    be.synchronize().unwrap();
    let mut v = Vec::new();
    let start = Instant::now();
    while v.len() < 200 && (v.len() < 5 || start.elapsed().as_secs_f64() < 0.5) {
        let t = Instant::now();
        f().unwrap();
        be.synchronize().unwrap();
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    name: String,
    s: f64,
    bytes: f64,
}

#[test]
#[ignore = "benchmark driver for scripts/gpu-check.sh"]
fn bench_cuda_kernels() {
    let be = match Cuda::with_dtype(0, DType::BF16) {
        Ok(b) => b,
        Err(e) => {
            common::skip_or_fail("cuda", &format!("bench_cuda_kernels: {e}"));
            return;
        }
    };
    be.warm_up().unwrap();
    let mut rows = Vec::new();
    // Copy bandwidth: 1 GiB device-to-device, bytes read + written.
    let big = be.zeros(&[1 << 29]).unwrap();
    let mut dst = be.zeros(&[1 << 29]).unwrap();
    let s = time(&be, || be.copy_into(&big, &mut dst));
    let copy_bps = 2.0 * (1u64 << 30) as f64 / s;
    rows.push(Row {
        name: "copy_1GiB".into(),
        s,
        bytes: 2.0 * (1u64 << 30) as f64,
    });
    // NF4 dequantize and GEMV / dequant-GEMM.
    for &(out, inp) in &[(4096usize, 4096usize), (14336, 4096)] {
        let w = quantize_nf4(&vals(out * inp, 1, 0.05), &[out, inp], 64, true).unwrap();
        let wq = be.upload_nf4(&w).unwrap();
        let n = (out * inp) as f64;
        let stats = w.bytes() as f64 - n / 2.0;
        let s = time(&be, || be.nf4_dequantize(&wq).map(|_| ()));
        rows.push(Row {
            name: format!("nf4_dequantize_{out}x{inp}"),
            s,
            bytes: n / 2.0 + stats + 2.0 * n,
        });
        for t in [1usize, 16, 64] {
            let x = be.upload(&vals(t * inp, 2, 1.0), &[t, inp]).unwrap();
            let s = time(&be, || be.nf4_linear(&x, &wq, None).map(|_| ()));
            let bytes = n / 2.0 + stats + 2.0 * (t * (inp + out)) as f64;
            rows.push(Row {
                name: format!("nf4_linear_t{t}_{out}x{inp}"),
                s,
                bytes,
            });
        }
    }
    // LoRA and DoRA layers, forward + backward, bf16, 4096x4096, r = 16.
    let (dim, r) = (4096usize, 16usize);
    let w0 = be.upload(&vals(dim * dim, 3, 0.02), &[dim, dim]).unwrap();
    let a = be.upload(&vals(r * dim, 4, 0.02), &[r, dim]).unwrap();
    let b = be.upload(&vals(dim * r, 5, 0.02), &[dim, r]).unwrap();
    let m = be.upload(&vec![1.0; dim], &[dim]).unwrap();
    let sq = be.row_sq_norms(Base::Dense(&w0)).unwrap();
    for t in [256usize, 4096] {
        let x = be.upload(&vals(t * dim, 6, 1.0), &[t, dim]).unwrap();
        let dy = be.upload(&vals(t * dim, 7, 1.0), &[t, dim]).unwrap();
        let s = time(&be, || {
            let (_, h) = be.lora_forward(&x, &w0, None, &a, &b, 2.0)?;
            be.lora_backward(&dy, &x, &h, &w0, &a, &b, 2.0).map(|_| ())
        });
        let bytes = 2.0 * (dim * dim + 4 * t * dim) as f64;
        rows.push(Row {
            name: format!("lora_fwd_bwd_t{t}_{dim}x{dim}_r{r}"),
            s,
            bytes,
        });
        let s = time(&be, || {
            let n = be.dora_weight_norm(&w0, &sq, &a, &b, 2.0)?;
            let (_, saved) = be.dora_forward(&x, &w0, None, &a, &b, 2.0, &m, &n)?;
            be.dora_backward(&dy, &x, &saved, &w0, &a, &b, 2.0, &m, &n)
                .map(|_| ())
        });
        rows.push(Row {
            name: format!("dora_fwd_bwd_t{t}_{dim}x{dim}_r{r}"),
            s,
            bytes,
        });
    }
    let device = be.device_name().unwrap_or_default();
    println!("device {device}; copy bandwidth {:.0} GB/s", copy_bps / 1e9);
    let mut json = format!(
        "{{\"device\": {device:?}, \"copy_gbps\": {}, \"cases\": [",
        copy_bps / 1e9
    );
    for (i, r) in rows.iter().enumerate() {
        let frac = r.bytes / r.s / copy_bps;
        println!(
            "{:<40} {:>10.4} ms {:>7.0} GB/s {:>5.0}% of copy",
            r.name,
            r.s * 1e3,
            r.bytes / r.s / 1e9,
            100.0 * frac
        );
        assert!(r.s > 0.0 && r.s.is_finite(), "{}: no time measured", r.name);
        json += &format!(
            "{}{{\"name\": {:?}, \"ms\": {}, \"gbps\": {}, \"frac_copy\": {}}}",
            if i > 0 { ", " } else { "" },
            r.name,
            r.s * 1e3,
            r.bytes / r.s / 1e9,
            frac
        );
    }
    json += "]}\n";
    if let Some(p) = std::env::var_os("LORAFUSE_BENCH_OUT") {
        std::fs::write(&p, json).unwrap();
    }
}
