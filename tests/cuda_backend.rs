//! Every `Backend` method of the CUDA backend against the CPU reference, over odd shapes
//! (T = 1, 3, 17, 130 tokens: the decode and the cuBLAS paths; in/out not multiples of 8;
//! r from 1 to 64), in f32, f16 and bf16 storage, plus bad-input errors and NF4 bit-exactness.
//! The per-method calls are the test-only [`PerMethod`] descriptions of the one fused op; every
//! method is also checked over an NF4 base (QLoRA, QDoRA, QVeRA, QAdaLoRA), forward and backward.
//!
//! Inputs are rounded to the storage dtype before the CPU sees them, so only the GPU's own
//! arithmetic is measured. Tolerance: `max |gpu - cpu| <= tol * max(|cpu|)` per output with
//! tol 2e-4 (f32), 1e-2 (f16), 4e-2 (bf16); NF4 dequantize and quantize are compared bit for bit.
//!
//! Without a GPU (or libcuda/libnvrtc/libcublas) each test prints why and passes, unless
//! `LORAFUSE_REQUIRE` contains `cuda`, which turns the absence into a failure.
#![cfg(feature = "cuda")]

mod common;
#[path = "common/per_method.rs"]
mod per_method;
#[path = "common/adalora_twin.rs"]
mod twin;

use half::{bf16, f16};
use lorafuse::adapter::DoraSaved;
use lorafuse::backend::cuda::{Cuda, DType};
use lorafuse::backend::{
    AdaLoraIpt, AdamWParams, AttentionSaved, Backend, Base, GradWants, LowRank, Nf4Weight, SeqSpan,
    check, cross_entropy_loss,
};
use lorafuse::quant::nf4::quantize_nf4;
use lorafuse::{Cpu, Error, Tensor};
use per_method::PerMethod;

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

fn tol(d: DType) -> f32 {
    match d {
        DType::F32 => 2e-4,
        DType::F16 => 1e-2,
        DType::BF16 => 4e-2,
    }
}

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

/// One host tensor uploaded to both backends (rounded to the GPU dtype first).
struct Pair {
    c: Tensor<Cpu>,
    g: Tensor<Cuda>,
}

fn pair(cpu: &Cpu, gpu: &Cuda, data: &[f32], shape: &[usize]) -> Pair {
    let r = round(gpu.dtype(), data);
    Pair {
        c: cpu.upload(&r, shape).unwrap(),
        g: gpu.upload(&r, shape).unwrap(),
    }
}

fn rand_pair(cpu: &Cpu, gpu: &Cuda, shape: &[usize], seed: u64, b: f32) -> Pair {
    pair(cpu, gpu, &vals(shape.iter().product(), seed, b), shape)
}

#[track_caller]
fn close(what: &str, gpu: &Cuda, g: &Tensor<Cuda>, c: &Tensor<Cpu>, tol: f32) {
    assert_eq!(g.shape(), c.shape(), "{what}: shape");
    let got = gpu.download(g).unwrap();
    let want = c.data();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            a.is_finite() || !b.is_finite(),
            "{what}[{i}]: {a} (cpu {b})"
        );
        let e = (a - b).abs();
        if e > worst.0 {
            worst = (e, i);
        }
    }
    assert!(
        worst.0 <= tol * scale,
        "{what} ({:?}): max error {} at {} (gpu {}, cpu {}) > {tol} x {scale}",
        gpu.dtype(),
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1]
    );
}

/// (T, in, out, r) cases: decode (T <= 8) and cuBLAS paths, odd sizes, ranks 1..64.
const CASES: [(usize, usize, usize, usize); 5] = [
    (1, 37, 29, 1),
    (3, 61, 45, 7),
    (17, 37, 29, 64),
    (130, 83, 67, 16),
    (8, 136, 72, 5),
];

/// The NF4 twin of a test weight (its values as the CPU holds them, already rounded to the GPU
/// dtype): quantized once (blocksize 64, double quant), the same bytes on both backends.
fn nf4_pair(
    cpu: &Cpu,
    g: &Cuda,
    w: &Pair,
    dout: usize,
    din: usize,
) -> (Nf4Weight<Cpu>, Nf4Weight<Cuda>) {
    let q = quantize_nf4(w.c.data(), &[dout, din], 64, true).unwrap();
    (cpu.upload_nf4(&q).unwrap(), g.upload_nf4(&q).unwrap())
}

/// A GPU tensor as a pair (the GPU's values, on both backends), to feed both backwards the same
/// saved state.
fn from_gpu(cpu: &Cpu, g: &Cuda, t: &Tensor<Cuda>) -> Pair {
    pair(cpu, g, &g.download(t).unwrap(), t.shape())
}

/// The fused op on both backends over `base`, forward (y, h, and z under a column scale) and
/// backward (dx, g, and every gradient `wants` asks for), compared at `tl`. The backwards get the
/// GPU forward's h and z, so only the backward's own arithmetic is compared.
#[allow(clippy::too_many_arguments)]
fn check_fused(
    what: &str,
    cpu: &Cpu,
    g: &Cuda,
    (bc, bg): (Base<'_, Cpu>, Base<'_, Cuda>),
    x: &Pair,
    bias: Option<&Pair>,
    dy: &Pair,
    (tc, tg): (&LowRank<'_, Cpu>, &LowRank<'_, Cuda>),
    wants: GradWants,
    tl: f32,
) {
    let og = g
        .linear_lowrank(&x.g, bg, bias.map(|b| &b.g), Some(tg))
        .unwrap();
    let oc = cpu
        .linear_lowrank(&x.c, bc, bias.map(|b| &b.c), Some(tc))
        .unwrap();
    close(&format!("{what} forward y"), g, &og.y, &oc.y, tl);
    let (hg, hc) = (og.h.unwrap(), oc.h.unwrap());
    close(&format!("{what} forward h"), g, &hg, &hc, tl);
    let z = match (og.z, oc.z) {
        (Some(zg), Some(zc)) => {
            close(&format!("{what} forward z"), g, &zg, &zc, tl);
            Some(from_gpu(cpu, g, &zg))
        }
        (None, None) => None,
        _ => panic!("{what}: z on one backend only"),
    };
    let h = from_gpu(cpu, g, &hg);
    let (_, gg) = g.backward_input(&dy.g, bg, Some(tg), None).unwrap();
    let (_, gc) = cpu.backward_input(&dy.c, bc, Some(tc), None).unwrap();
    close(
        &format!("{what} backward g"),
        g,
        &gg.unwrap(),
        &gc.unwrap(),
        tl,
    );
    let dg = g
        .linear_lowrank_backward(&dy.g, &x.g, &h.g, z.as_ref().map(|z| &z.g), bg, tg, wants)
        .unwrap();
    let dc = cpu
        .linear_lowrank_backward(&dy.c, &x.c, &h.c, z.as_ref().map(|z| &z.c), bc, tc, wants)
        .unwrap();
    close(&format!("{what} backward dx"), g, &dg.dx, &dc.dx, tl);
    let grads = [
        ("dA", dg.d_lora_a, dc.d_lora_a, wants.lora_a),
        ("dB", dg.d_lora_b, dc.d_lora_b, wants.lora_b),
        (
            "d rank_scale",
            dg.d_rank_scale,
            dc.d_rank_scale,
            wants.rank_scale,
        ),
        (
            "d out_scale",
            dg.d_out_scale,
            dc.d_out_scale,
            wants.out_scale,
        ),
        ("dm", dg.d_magnitude, dc.d_magnitude, wants.magnitude),
    ];
    for (name, gd, cd, wanted) in grads {
        match (gd, cd) {
            (Some(gd), Some(cd)) => close(&format!("{what} backward {name}"), g, &gd, &cd, tl),
            (None, None) => assert!(!wanted, "{what}: {name} wanted but missing"),
            _ => panic!("{what}: {name} on one backend only"),
        }
    }
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

#[test]
fn memory_and_elementwise() {
    let cpu = Cpu;
    for d in DTYPES {
        let Some(g) = gpu(d, "memory_and_elementwise") else {
            return;
        };
        let t = tol(d);
        // upload/download round trip is exact for dtype-representable values
        let v = round(d, &vals(131, 1, 3.0));
        let x = g.upload(&v, &[131]).unwrap();
        assert_eq!(g.download(&x).unwrap(), v);
        assert!(g.upload(&v, &[130]).is_err());
        let z = g.zeros(&[3, 5]).unwrap();
        assert_eq!(g.download(&z).unwrap(), vec![0.0; 15]);
        // gather / scatter
        let table = rand_pair(&cpu, &g, &[11, 13], 2, 1.0);
        let idx = [3u32, 0, 10, 3, 7];
        close(
            "gather_rows",
            &g,
            &g.gather_rows(&table.g, &idx).unwrap(),
            &cpu.gather_rows(&table.c, &idx).unwrap(),
            t,
        );
        assert!(g.gather_rows(&table.g, &[11]).is_err());
        let src = rand_pair(&cpu, &g, &[5, 13], 3, 1.0);
        let (mut dg, mut dc) = (table.g.clone(), table.c.clone());
        g.scatter_add_rows(&mut dg, &idx, &src.g).unwrap();
        cpu.scatter_add_rows(&mut dc, &idx, &src.c).unwrap();
        close("scatter_add_rows", &g, &dg, &dc, t);
        // the clone kept its values (copy on write)
        close("clone after scatter", &g, &table.g, &table.c, 0.0);
        assert!(g.scatter_add_rows(&mut dg, &[1, 2], &src.g).is_err());
        // axpy, scale, sum_squares
        let a = rand_pair(&cpu, &g, &[7, 9], 4, 1.0);
        let b = rand_pair(&cpu, &g, &[7, 9], 5, 1.0);
        let (mut ag, mut ac) = (a.g.clone(), a.c.clone());
        g.axpy(&mut ag, -0.7, &b.g).unwrap();
        cpu.axpy(&mut ac, -0.7, &b.c).unwrap();
        close("axpy", &g, &ag, &ac, t);
        g.scale(&mut ag, 1.5).unwrap();
        cpu.scale(&mut ac, 1.5).unwrap();
        close("scale", &g, &ag, &ac, t);
        let wrong = g.zeros(&[9, 7]).unwrap();
        assert!(matches!(
            g.axpy(&mut ag, 1.0, &wrong),
            Err(Error::Shape { .. })
        ));
        let big = rand_pair(&cpu, &g, &[1000, 37], 6, 1.0);
        let (sg, sc) = (
            g.sum_squares(&big.g).unwrap(),
            cpu.sum_squares(&big.c).unwrap(),
        );
        assert!(
            (sg - sc).abs() <= 1e-9 * sc.max(1.0),
            "sum_squares {sg} vs {sc}"
        );
    }
}

#[test]
fn dense_linear() {
    let cpu = Cpu;
    for d in DTYPES {
        let Some(g) = gpu(d, "dense_linear") else {
            return;
        };
        for (i, &(t, din, dout, _)) in CASES.iter().enumerate() {
            let s = 100 * i as u64;
            let x = rand_pair(&cpu, &g, &[t, din], s, 1.0);
            let w = rand_pair(&cpu, &g, &[dout, din], s + 1, 0.3);
            let b = rand_pair(&cpu, &g, &[dout], s + 2, 1.0);
            for bias in [None, Some(&b)] {
                close(
                    "linear",
                    &g,
                    &g.linear(&x.g, &w.g, bias.map(|p| &p.g)).unwrap(),
                    &cpu.linear(&x.c, &w.c, bias.map(|p| &p.c)).unwrap(),
                    tol(d),
                );
            }
            let dy = rand_pair(&cpu, &g, &[t, dout], s + 3, 1.0);
            let dxg = g.linear_backward_input(&dy.g, &w.g, None).unwrap().unwrap();
            let dxc = cpu
                .linear_backward_input(&dy.c, &w.c, None)
                .unwrap()
                .unwrap();
            close("linear_backward_input", &g, &dxg, &dxc, tol(d));
            let (mut ag, mut ac) = (x.g.clone(), x.c.clone());
            assert!(
                g.linear_backward_input(&dy.g, &w.g, Some(&mut ag))
                    .unwrap()
                    .is_none()
            );
            cpu.linear_backward_input(&dy.c, &w.c, Some(&mut ac))
                .unwrap();
            close("linear_backward_input acc", &g, &ag, &ac, tol(d));
            let (mut dwg, mut dwc) = (w.g.clone(), w.c.clone());
            g.linear_backward_weight(&dy.g, &x.g, &mut dwg).unwrap();
            cpu.linear_backward_weight(&dy.c, &x.c, &mut dwc).unwrap();
            close("linear_backward_weight", &g, &dwg, &dwc, tol(d));
            assert!(matches!(g.linear(&w.g, &x.g, None), Err(Error::Shape { .. })) || din == dout);
        }
    }
}

#[test]
fn lora() {
    let cpu = Cpu;
    for d in DTYPES {
        let Some(g) = gpu(d, "lora") else { return };
        let tl = tol(d);
        for (i, &(t, din, dout, r)) in CASES.iter().enumerate() {
            let s = 1000 + 100 * i as u64;
            let x = rand_pair(&cpu, &g, &[t, din], s, 1.0);
            let w = rand_pair(&cpu, &g, &[dout, din], s + 1, 0.3);
            let a = rand_pair(&cpu, &g, &[r, din], s + 2, 0.3);
            let b = rand_pair(&cpu, &g, &[dout, r], s + 3, 0.3);
            let bias = rand_pair(&cpu, &g, &[dout], s + 4, 1.0);
            let sc = 2.0 / r as f32;
            let (yg, hg) = g
                .lora_forward(&x.g, &w.g, Some(&bias.g), &a.g, &b.g, sc)
                .unwrap();
            let (yc, hc) = cpu
                .lora_forward(&x.c, &w.c, Some(&bias.c), &a.c, &b.c, sc)
                .unwrap();
            close("lora_forward y", &g, &yg, &yc, tl);
            close("lora_forward h", &g, &hg, &hc, tl);
            let dy = rand_pair(&cpu, &g, &[t, dout], s + 5, 1.0);
            let h = pair(&cpu, &g, &g.download(&hg).unwrap(), &[t, r]);
            let (dxg, dag, dbg) = g
                .lora_backward(&dy.g, &x.g, &h.g, &w.g, &a.g, &b.g, sc)
                .unwrap();
            let (dxc, dac, dbc) = cpu
                .lora_backward(&dy.c, &x.c, &h.c, &w.c, &a.c, &b.c, sc)
                .unwrap();
            close("lora_backward dx", &g, &dxg, &dxc, tl);
            close("lora_backward dA", &g, &dag, &dac, tl);
            close("lora_backward dB", &g, &dbg, &dbc, tl);
            // the same term over an NF4 base (QLoRA), forward and backward
            let (qc, qg) = nf4_pair(&cpu, &g, &w, dout, din);
            check_fused(
                "qlora",
                &cpu,
                &g,
                (Base::Nf4(&qc), Base::Nf4(&qg)),
                &x,
                Some(&bias),
                &dy,
                (
                    &LowRank::lora(&a.c, &b.c, sc),
                    &LowRank::lora(&a.g, &b.g, sc),
                ),
                GradWants::LORA,
                tl,
            );
            // dx added into an accumulator over the NF4 base
            let (mut dx2g, mut dx2c) = (x.g.clone(), x.c.clone());
            let (none_g, _) = g
                .backward_input(
                    &dy.g,
                    Base::Nf4(&qg),
                    Some(&LowRank::lora(&a.g, &b.g, sc)),
                    Some(&mut dx2g),
                )
                .unwrap();
            cpu.backward_input(
                &dy.c,
                Base::Nf4(&qc),
                Some(&LowRank::lora(&a.c, &b.c, sc)),
                Some(&mut dx2c),
            )
            .unwrap();
            assert!(none_g.is_none());
            close("qlora backward_input acc", &g, &dx2g, &dx2c, tl);
            // merge / unmerge
            let (mut wg, mut wc) = (w.g.clone(), w.c.clone());
            g.lora_merge(&mut wg, &a.g, &b.g, sc, 1.0).unwrap();
            cpu.lora_merge(&mut wc, &a.c, &b.c, sc, 1.0).unwrap();
            close("lora_merge", &g, &wg, &wc, tl);
            g.lora_merge(&mut wg, &a.g, &b.g, sc, -1.0).unwrap();
            close("lora unmerge round trip", &g, &wg, &w.c, 4.0 * tl);
            // bad input: r = 0, mismatched B
            let b_bad = g.zeros(&[dout + 1, r]).unwrap();
            assert!(matches!(
                g.lora_forward(&x.g, &w.g, None, &a.g, &b_bad, sc),
                Err(Error::Shape { .. })
            ));
            let a0 = g.zeros(&[0, din]).unwrap();
            let b0 = g.zeros(&[dout, 0]).unwrap();
            assert!(g.lora_forward(&x.g, &w.g, None, &a0, &b0, sc).is_err());
        }
    }
}

#[test]
fn dora() {
    let cpu = Cpu;
    for d in DTYPES {
        let Some(g) = gpu(d, "dora") else { return };
        let tl = tol(d);
        for (i, &(t, din, dout, r)) in CASES.iter().enumerate() {
            let s = 2000 + 100 * i as u64;
            let x = rand_pair(&cpu, &g, &[t, din], s, 1.0);
            let w = rand_pair(&cpu, &g, &[dout, din], s + 1, 0.3);
            let a = rand_pair(&cpu, &g, &[r, din], s + 2, 0.3);
            let b = rand_pair(&cpu, &g, &[dout, r], s + 3, 0.3);
            let bias = rand_pair(&cpu, &g, &[dout], s + 4, 1.0);
            let sc = 0.5;
            let sqg = g.row_sq_norms(Base::Dense(&w.g)).unwrap();
            let sqc = cpu.row_sq_norms(Base::Dense(&w.c)).unwrap();
            close("row_sq_norms", &g, &sqg, &sqc, tl);
            let sq = pair(&cpu, &g, sqc.data(), &[dout]);
            let ng = g.dora_weight_norm(&w.g, &sq.g, &a.g, &b.g, sc).unwrap();
            let nc = cpu.dora_weight_norm(&w.c, &sq.c, &a.c, &b.c, sc).unwrap();
            close("dora_weight_norm", &g, &ng, &nc, tl);
            let n = pair(&cpu, &g, nc.data(), &[dout]);
            let m = pair(
                &cpu,
                &g,
                &vals(dout, s + 5, 1.0)
                    .iter()
                    .map(|v| 1.0 + 0.5 * v)
                    .collect::<Vec<_>>(),
                &[dout],
            );
            let (yg, svg) = g
                .dora_forward(&x.g, &w.g, Some(&bias.g), &a.g, &b.g, sc, &m.g, &n.g)
                .unwrap();
            let (yc, svc) = cpu
                .dora_forward(&x.c, &w.c, Some(&bias.c), &a.c, &b.c, sc, &m.c, &n.c)
                .unwrap();
            close("dora_forward y", &g, &yg, &yc, tl);
            close("dora_forward h", &g, &svg.h, &svc.h, tl);
            close("dora_forward z", &g, &svg.z, &svc.z, tl);
            let dy = rand_pair(&cpu, &g, &[t, dout], s + 6, 1.0);
            let saved_g = DoraSaved {
                h: g.upload(&g.download(&svg.h).unwrap(), &[t, r]).unwrap(),
                z: g.upload(&g.download(&svg.z).unwrap(), &[t, dout]).unwrap(),
            };
            let saved_c = DoraSaved {
                h: cpu.upload(&g.download(&svg.h).unwrap(), &[t, r]).unwrap(),
                z: cpu
                    .upload(&g.download(&svg.z).unwrap(), &[t, dout])
                    .unwrap(),
            };
            let gg = g
                .dora_backward(&dy.g, &x.g, &saved_g, &w.g, &a.g, &b.g, sc, &m.g, &n.g)
                .unwrap();
            let gc = cpu
                .dora_backward(&dy.c, &x.c, &saved_c, &w.c, &a.c, &b.c, sc, &m.c, &n.c)
                .unwrap();
            close("dora_backward dx", &g, &gg.dx, &gc.dx, tl);
            close("dora_backward dA", &g, &gg.d_lora_a, &gc.d_lora_a, tl);
            close("dora_backward dB", &g, &gg.d_lora_b, &gc.d_lora_b, tl);
            close("dora_backward dm", &g, &gg.d_magnitude, &gc.d_magnitude, tl);
            // the same term over an NF4 base (QDoRA): its own weight norm, forward, backward
            let (qc, qg) = nf4_pair(&cpu, &g, &w, dout, din);
            let qsqc = cpu.row_sq_norms(Base::Nf4(&qc)).unwrap();
            close(
                "nf4 row_sq_norms",
                &g,
                &g.row_sq_norms(Base::Nf4(&qg)).unwrap(),
                &qsqc,
                tl,
            );
            let qsq = pair(&cpu, &g, qsqc.data(), &[dout]);
            let qnc = cpu
                .lowrank_row_norms(Base::Nf4(&qc), &qsq.c, &LowRank::lora(&a.c, &b.c, sc))
                .unwrap();
            close(
                "qdora weight norm",
                &g,
                &g.lowrank_row_norms(Base::Nf4(&qg), &qsq.g, &LowRank::lora(&a.g, &b.g, sc))
                    .unwrap(),
                &qnc,
                tl,
            );
            let qn = pair(&cpu, &g, qnc.data(), &[dout]);
            check_fused(
                "qdora",
                &cpu,
                &g,
                (Base::Nf4(&qc), Base::Nf4(&qg)),
                &x,
                Some(&bias),
                &dy,
                (
                    &LowRank::dora(&a.c, &b.c, sc, &m.c, Some(&qn.c)),
                    &LowRank::dora(&a.g, &b.g, sc, &m.g, Some(&qn.g)),
                ),
                GradWants::DORA,
                tl,
            );
            // the forward that takes its own weight norm, over the dense base
            let (ywg, _, nwg) = g
                .dora_forward_with_norm(&x.g, &w.g, &sq.g, Some(&bias.g), &a.g, &b.g, sc, &m.g)
                .unwrap();
            let (ywc, _, nwc) = cpu
                .dora_forward_with_norm(&x.c, &w.c, &sq.c, Some(&bias.c), &a.c, &b.c, sc, &m.c)
                .unwrap();
            close("dora_forward_with_norm y", &g, &ywg, &ywc, tl);
            close("dora_forward_with_norm n", &g, &nwg, &nwc, tl);
            // merge / unmerge
            let (mut wg, mut wc) = (w.g.clone(), w.c.clone());
            g.dora_merge(&mut wg, &a.g, &b.g, sc, &m.g, &n.g).unwrap();
            cpu.dora_merge(&mut wc, &a.c, &b.c, sc, &m.c, &n.c).unwrap();
            close("dora_merge", &g, &wg, &wc, tl);
            g.dora_unmerge(&mut wg, &a.g, &b.g, sc, &m.g, &n.g).unwrap();
            close("dora unmerge round trip", &g, &wg, &w.c, 8.0 * tl);
            // PEFT's merge that takes the norm of the merged rows (CUDA: by the identity)
            let (mut wg, mut wc) = (w.g.clone(), w.c.clone());
            let nmg = g
                .dora_merge_with_norm(&mut wg, &sq.g, &a.g, &b.g, sc, &m.g)
                .unwrap();
            let nmc = cpu
                .dora_merge_with_norm(&mut wc, &sq.c, &a.c, &b.c, sc, &m.c)
                .unwrap();
            close("dora_merge_with_norm n", &g, &nmg, &nmc, tl);
            close("dora_merge_with_norm w", &g, &wg, &wc, tl);
            let m0 = g.zeros(&[dout]).unwrap();
            assert!(matches!(
                g.dora_unmerge(&mut wg, &a.g, &b.g, sc, &m0, &n.g),
                Err(Error::InvalidArgument { .. })
            ));
            let short = g.zeros(&[dout + 1]).unwrap();
            assert!(
                g.dora_forward(&x.g, &w.g, None, &a.g, &b.g, sc, &short, &n.g)
                    .is_err()
            );
        }
    }
}

#[test]
fn vera() {
    let cpu = Cpu;
    for d in DTYPES {
        let Some(g) = gpu(d, "vera") else { return };
        let tl = tol(d);
        for (i, &(t, din, dout, r)) in CASES.iter().enumerate() {
            let s = 3000 + 100 * i as u64;
            let (max_in, max_out) = (din + 5, dout + 3);
            let x = rand_pair(&cpu, &g, &[t, din], s, 1.0);
            let w = rand_pair(&cpu, &g, &[dout, din], s + 1, 0.3);
            let va = rand_pair(&cpu, &g, &[r, max_in], s + 2, 0.3);
            let vb = rand_pair(&cpu, &g, &[max_out, r], s + 3, 0.3);
            let ld = rand_pair(&cpu, &g, &[r], s + 4, 1.0);
            let lb = rand_pair(&cpu, &g, &[dout], s + 5, 1.0);
            let bias = rand_pair(&cpu, &g, &[dout], s + 6, 1.0);
            let (yg, hg) = g
                .vera_forward(&x.g, &w.g, Some(&bias.g), &va.g, &vb.g, &ld.g, &lb.g)
                .unwrap();
            let (yc, hc) = cpu
                .vera_forward(&x.c, &w.c, Some(&bias.c), &va.c, &vb.c, &ld.c, &lb.c)
                .unwrap();
            close("vera_forward y", &g, &yg, &yc, tl);
            close("vera_forward h", &g, &hg, &hc, tl);
            let h = pair(&cpu, &g, &g.download(&hg).unwrap(), &[t, r]);
            let dy = rand_pair(&cpu, &g, &[t, dout], s + 7, 1.0);
            let (dxg, dldg, dlbg) = g
                .vera_backward(&dy.g, &x.g, &h.g, &w.g, &va.g, &vb.g, &ld.g, &lb.g)
                .unwrap();
            let (dxc, dldc, dlbc) = cpu
                .vera_backward(&dy.c, &x.c, &h.c, &w.c, &va.c, &vb.c, &ld.c, &lb.c)
                .unwrap();
            close("vera_backward dx", &g, &dxg, &dxc, tl);
            close("vera_backward dlambda_d", &g, &dldg, &dldc, tl);
            close("vera_backward dlambda_b", &g, &dlbg, &dlbc, tl);
            let (mut wg, mut wc) = (w.g.clone(), w.c.clone());
            g.vera_merge(&mut wg, &va.g, &vb.g, &ld.g, &lb.g, 1.0)
                .unwrap();
            cpu.vera_merge(&mut wc, &va.c, &vb.c, &ld.c, &lb.c, 1.0)
                .unwrap();
            close("vera_merge", &g, &wg, &wc, tl);
            // QVeRA: the same shared term over an NF4 base, forward and backward
            let (qc, qg) = nf4_pair(&cpu, &g, &w, dout, din);
            check_fused(
                "qvera",
                &cpu,
                &g,
                (Base::Nf4(&qc), Base::Nf4(&qg)),
                &x,
                Some(&bias),
                &dy,
                (
                    &LowRank::vera(&va.c, &vb.c, &ld.c, &lb.c),
                    &LowRank::vera(&va.g, &vb.g, &ld.g, &lb.g),
                ),
                GradWants::VERA,
                tl,
            );
            let small_a = g.zeros(&[r, din - 1]).unwrap();
            assert!(matches!(
                g.vera_forward(&x.g, &w.g, None, &small_a, &vb.g, &ld.g, &lb.g),
                Err(Error::Shape { .. })
            ));
        }
    }
}

#[test]
fn adalora() {
    let cpu = Cpu;
    for d in DTYPES {
        let Some(g) = gpu(d, "adalora") else { return };
        let tl = tol(d);
        for (i, &(t, din, dout, r)) in CASES.iter().enumerate() {
            let s = 4000 + 100 * i as u64;
            let x = rand_pair(&cpu, &g, &[t, din], s, 1.0);
            let w = rand_pair(&cpu, &g, &[dout, din], s + 1, 0.3);
            let a = rand_pair(&cpu, &g, &[r, din], s + 2, 0.3);
            let b = rand_pair(&cpu, &g, &[dout, r], s + 3, 0.3);
            // every third rank masked (E = 0)
            let ev: Vec<f32> = vals(r, s + 4, 1.0)
                .iter()
                .enumerate()
                .map(|(j, v)| if j % 3 == 2 { 0.0 } else { *v })
                .collect();
            let e = pair(&cpu, &g, &ev, &[r, 1]);
            let (scaling, ranknum) = (8.0, r as f32);
            let (yg, hg) = g
                .adalora_forward(&x.g, &w.g, None, &a.g, &b.g, &e.g, scaling, ranknum)
                .unwrap();
            let (yc, hc) = cpu
                .adalora_forward(&x.c, &w.c, None, &a.c, &b.c, &e.c, scaling, ranknum)
                .unwrap();
            close("adalora_forward y", &g, &yg, &yc, tl);
            close("adalora_forward h", &g, &hg, &hc, tl);
            let h = pair(&cpu, &g, &g.download(&hg).unwrap(), &[t, r]);
            let dy = rand_pair(&cpu, &g, &[t, dout], s + 5, 1.0);
            let gg = g
                .adalora_backward(&dy.g, &x.g, &h.g, &w.g, &a.g, &b.g, &e.g, scaling, ranknum)
                .unwrap();
            let gc = cpu
                .adalora_backward(&dy.c, &x.c, &h.c, &w.c, &a.c, &b.c, &e.c, scaling, ranknum)
                .unwrap();
            close("adalora_backward dx", &g, &gg.dx, &gc.dx, tl);
            close("adalora_backward dA", &g, &gg.d_lora_a, &gc.d_lora_a, tl);
            close("adalora_backward dB", &g, &gg.d_lora_b, &gc.d_lora_b, tl);
            close("adalora_backward dE", &g, &gg.d_lora_e, &gc.d_lora_e, tl);
            let (mut wg, mut wc) = (w.g.clone(), w.c.clone());
            g.adalora_merge(&mut wg, &a.g, &b.g, &e.g, scaling, ranknum, 1.0)
                .unwrap();
            cpu.adalora_merge(&mut wc, &a.c, &b.c, &e.c, scaling, ranknum, 1.0)
                .unwrap();
            close("adalora_merge", &g, &wg, &wc, tl);
            // QAdaLoRA: the same term over an NF4 base, forward and backward (with a bias)
            let (qc, qg) = nf4_pair(&cpu, &g, &w, dout, din);
            let bias = rand_pair(&cpu, &g, &[dout], s + 6, 1.0);
            let c = check::adalora_factor(scaling, ranknum).unwrap();
            check_fused(
                "qadalora",
                &cpu,
                &g,
                (Base::Nf4(&qc), Base::Nf4(&qg)),
                &x,
                Some(&bias),
                &dy,
                (
                    &LowRank::adalora(&a.c, &b.c, &e.c, c),
                    &LowRank::adalora(&a.g, &b.g, &e.g, c),
                ),
                GradWants::ADALORA,
                tl,
            );
            assert!(matches!(
                g.adalora_forward(&x.g, &w.g, None, &a.g, &b.g, &e.g, scaling, 0.0),
                Err(Error::InvalidArgument { .. })
            ));
        }
    }
}

/// AdaLoRA's rank allocator and orthogonal regularizer: the EMA update and triplet scores
/// within the dtype's tolerance, kthvalue and the masks bit for bit (on dtype-rounded scores
/// with ties and NaN), the regularizer's loss and gradients, and in f32 the device-resident
/// allocator over a whole schedule with the CPU's rank patterns.
#[test]
fn adalora_allocator() {
    let cpu = Cpu;
    for d in DTYPES {
        let Some(g) = gpu(d, "adalora_allocator") else {
            return;
        };
        let tl = tol(d);
        for (i, &(_, din, dout, r)) in CASES.iter().enumerate() {
            let s = 9000 + 100 * i as u64;
            // two EMA updates on each factor shape
            for (shape, k) in [([r, din], 0u64), ([dout, r], 10), ([r, 1], 20)] {
                let p = rand_pair(&cpu, &g, &shape, s + k, 1.0);
                let gr = rand_pair(&cpu, &g, &shape, s + k + 1, 1.0);
                let mut ipt = pair(&cpu, &g, &vals(shape[0] * shape[1], s + k + 2, 0.5), &shape);
                let mut unc = pair(&cpu, &g, &vals(shape[0] * shape[1], s + k + 3, 0.5), &shape);
                for _ in 0..2 {
                    g.adalora_update_ipt(&p.g, &gr.g, &mut ipt.g, &mut unc.g, 0.85, 0.95)
                        .unwrap();
                    cpu.adalora_update_ipt(&p.c, &gr.c, &mut ipt.c, &mut unc.c, 0.85, 0.95)
                        .unwrap();
                }
                close("adalora_update_ipt ipt", &g, &ipt.g, &ipt.c, tl);
                close("adalora_update_ipt unc", &g, &unc.g, &unc.c, tl);
            }
            // triplet scores of non-negative EMAs into a slice of a larger buffer
            let nn = |shape: &[usize], k: u64| {
                let v: Vec<f32> = vals(shape.iter().product(), s + k, 1.0)
                    .iter()
                    .map(|x| x.abs())
                    .collect();
                pair(&cpu, &g, &v, shape)
            };
            let e = [
                nn(&[r, din], 31),
                nn(&[r, din], 32),
                nn(&[dout, r], 33),
                nn(&[dout, r], 34),
                nn(&[r, 1], 35),
                nn(&[r, 1], 36),
            ];
            let [ia, ua, ib, ub, ie, ue] = e;
            let ema_g = AdaLoraIpt {
                ipt_a: ia.g,
                unc_a: ua.g,
                ipt_b: ib.g,
                unc_b: ub.g,
                ipt_e: ie.g,
                unc_e: ue.g,
            };
            let ema_c = AdaLoraIpt {
                ipt_a: ia.c,
                unc_a: ua.c,
                ipt_b: ib.c,
                unc_b: ub.c,
                ipt_e: ie.c,
                unc_e: ue.c,
            };
            let mut sc = rand_pair(&cpu, &g, &[r + 8], s + 40, 1.0);
            g.adalora_triplet_scores(&ema_g, &mut sc.g, 5).unwrap();
            cpu.adalora_triplet_scores(&ema_c, &mut sc.c, 5).unwrap();
            close("adalora_triplet_scores", &g, &sc.g, &sc.c, tl);
            assert!(
                g.adalora_triplet_scores(&ema_g, &mut sc.g, 9).is_err(),
                "a range beyond the scores"
            );
        }
        // kthvalue, the keep-mask and the masking of E, bit for bit
        for &n in &[1usize, 7, 256, 257, 3001] {
            let mut v: Vec<f32> = round(d, &vals(n, 9500 + n as u64, 1.0));
            for i in (0..n).step_by(5) {
                v[i] = v[i / 3];
            }
            if n > 8 {
                v[1] = 0.0;
                v[2] = -0.0;
                v[4] = f32::NAN;
            }
            let sp = pair(&cpu, &g, &v, &[n]);
            for k in [1, n.div_ceil(3), n] {
                let tg = g.adalora_threshold(&sp.g, k).unwrap();
                let tc = cpu.adalora_threshold(&sp.c, k).unwrap();
                let bits = |v: &[f32]| twin::bits(v);
                assert_eq!(
                    bits(&g.download(&tg).unwrap()),
                    bits(tc.data()),
                    "kthvalue n={n} k={k}"
                );
                let kg = g.adalora_rank_mask(&sp.g, &tg).unwrap();
                let kc = cpu.adalora_rank_mask(&sp.c, &tc).unwrap();
                assert_eq!(g.download(&kg).unwrap(), kc.data(), "keep n={n} k={k}");
                let r = n.min(5);
                let mut e = rand_pair(&cpu, &g, &[r, 1], 9600 + k as u64, 1.0);
                g.adalora_apply_mask(&mut e.g, &kg, n - r).unwrap();
                cpu.adalora_apply_mask(&mut e.c, &kc, n - r).unwrap();
                assert_eq!(g.download(&e.g).unwrap(), e.c.data(), "lora_E n={n} k={k}");
            }
            assert!(g.adalora_threshold(&sp.g, n + 1).is_err());
        }
        // the orthogonal regularizer over several layers
        let dims = [(1usize, 37usize, 29usize), (7, 61, 45), (64, 83, 67)];
        let f: Vec<(Pair, Pair)> = dims
            .iter()
            .enumerate()
            .map(|(i, &(r, din, dout))| {
                (
                    rand_pair(&cpu, &g, &[r, din], 9700 + i as u64, 0.3),
                    rand_pair(&cpu, &g, &[dout, r], 9710 + i as u64, 0.3),
                )
            })
            .collect();
        let mut gr: Vec<(Pair, Pair)> = f
            .iter()
            .enumerate()
            .map(|(i, (a, b))| {
                (
                    rand_pair(&cpu, &g, a.c.shape(), 9720 + i as u64, 1.0),
                    rand_pair(&cpu, &g, b.c.shape(), 9730 + i as u64, 1.0),
                )
            })
            .collect();
        let fg: Vec<(&Tensor<Cuda>, &Tensor<Cuda>)> = f.iter().map(|(a, b)| (&a.g, &b.g)).collect();
        let fc: Vec<(&Tensor<Cpu>, &Tensor<Cpu>)> = f.iter().map(|(a, b)| (&a.c, &b.c)).collect();
        let lg = {
            let mut p: Vec<_> = gr.iter_mut().map(|(a, b)| (&mut a.g, &mut b.g)).collect();
            g.adalora_orth_reg(&fg, &mut p, 0.5).unwrap()
        };
        let lc = {
            let mut p: Vec<_> = gr.iter_mut().map(|(a, b)| (&mut a.c, &mut b.c)).collect();
            cpu.adalora_orth_reg(&fc, &mut p, 0.5).unwrap()
        };
        close("adalora_orth_reg loss", &g, &lg, &lc, tl);
        for (a, b) in &gr {
            close("adalora_orth_reg grad_A", &g, &a.g, &a.c, 2.0 * tl);
            close("adalora_orth_reg grad_B", &g, &b.g, &b.c, 2.0 * tl);
        }
        // the allocator end to end (f32: near-ties between scores rounded to f16 could differ)
        if d == DType::F32 {
            let sc = twin::scenario(4);
            let want = twin::run_device(&cpu, &sc);
            let got = twin::run_device(&g, &sc);
            for (w, h) in want.iter().zip(&got) {
                assert_eq!(w.masked_to, h.masked_to, "step {}", w.step);
                assert_eq!(w.pattern, h.pattern, "rank pattern at step {}", w.step);
            }
        }
    }
}

#[test]
fn nf4_bit_exact_and_linear() {
    let cpu = Cpu;
    for d in DTYPES {
        let Some(g) = gpu(d, "nf4") else { return };
        let tl = tol(d);
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
            // quantize on the GPU: identical bytes
            let wg_dense = g.upload(&wv, &[dout, din]).unwrap();
            let gq = g.quantize_nf4(&wg_dense, bs, dq).unwrap();
            let back = g.download_nf4(&gq).unwrap();
            assert_eq!(
                back, qt,
                "GPU quantize_nf4 differs from the CPU ({dout}x{din}, bs {bs}, dq {dq})"
            );
            assert_eq!(gq.bytes(), qt.bytes());
            // dequantize: bit-exact in f32, the rounded CPU values otherwise
            let wg = g.upload_nf4(&qt).unwrap();
            let wc = cpu.upload_nf4(&qt).unwrap();
            let deq = g.download(&g.nf4_dequantize(&wg).unwrap()).unwrap();
            let want = round(d, cpu.nf4_dequantize(&wc).unwrap().data());
            assert!(
                deq.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "nf4_dequantize not bit-exact ({d:?}, {dout}x{din})"
            );
            for t in [1usize, 3, 17, 130] {
                let x = rand_pair(&cpu, &g, &[t, din], 5100 + t as u64, 1.0);
                let bias = rand_pair(&cpu, &g, &[dout], 5200, 1.0);
                close(
                    "nf4_linear",
                    &g,
                    &g.nf4_linear(&x.g, &wg, Some(&bias.g)).unwrap(),
                    &cpu.nf4_linear(&x.c, &wc, Some(&bias.c)).unwrap(),
                    tl,
                );
                let dy = rand_pair(&cpu, &g, &[t, dout], 5300 + t as u64, 1.0);
                let dxg = g
                    .nf4_linear_backward_input(&dy.g, &wg, None)
                    .unwrap()
                    .unwrap();
                let dxc = cpu
                    .nf4_linear_backward_input(&dy.c, &wc, None)
                    .unwrap()
                    .unwrap();
                close("nf4_linear_backward_input", &g, &dxg, &dxc, tl);
                let (mut accg, mut accc) = (x.g.clone(), x.c.clone());
                g.nf4_linear_backward_input(&dy.g, &wg, Some(&mut accg))
                    .unwrap();
                cpu.nf4_linear_backward_input(&dy.c, &wc, Some(&mut accc))
                    .unwrap();
                close("nf4_linear_backward_input acc", &g, &accg, &accc, tl);
                // the fused QLoRA forward (one nf4_gemv with the term for T <= 8)
                let r = 1 + t % 9;
                let a = rand_pair(&cpu, &g, &[r, din], 5400, 0.3);
                let b = rand_pair(&cpu, &g, &[dout, r], 5401, 0.3);
                let og = g
                    .linear_lowrank(
                        &x.g,
                        Base::Nf4(&wg),
                        Some(&bias.g),
                        Some(&LowRank::lora(&a.g, &b.g, 0.5)),
                    )
                    .unwrap();
                let oc = cpu
                    .linear_lowrank(
                        &x.c,
                        Base::Nf4(&wc),
                        Some(&bias.c),
                        Some(&LowRank::lora(&a.c, &b.c, 0.5)),
                    )
                    .unwrap();
                close("nf4 fused lora y", &g, &og.y, &oc.y, tl);
                close("nf4 fused lora h", &g, &og.h.unwrap(), &oc.h.unwrap(), tl);
            }
            let sqg = g.nf4_row_sq_norms(&wg).unwrap();
            let sqc = cpu.nf4_row_sq_norms(&wc).unwrap();
            close("nf4_row_sq_norms", &g, &sqg, &sqc, tl);
            let r = 4;
            let a = rand_pair(&cpu, &g, &[r, din], 5500, 0.3);
            let b = rand_pair(&cpu, &g, &[dout, r], 5501, 0.3);
            let sq = pair(&cpu, &g, sqc.data(), &[dout]);
            close(
                "nf4_dora_weight_norm",
                &g,
                &g.nf4_dora_weight_norm(&wg, &sq.g, &a.g, &b.g, 0.7).unwrap(),
                &cpu.nf4_dora_weight_norm(&wc, &sq.c, &a.c, &b.c, 0.7)
                    .unwrap(),
                tl,
            );
            let xbad = g.zeros(&[2, din + 1]).unwrap();
            assert!(g.nf4_linear(&xbad, &wg, None).is_err());
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
fn model_ops() {
    let cpu = Cpu;
    for d in DTYPES {
        let Some(g) = gpu(d, "model_ops") else { return };
        let tl = tol(d);
        for &(t, dim) in &[(1usize, 37usize), (17, 64), (130, 83)] {
            let x = rand_pair(&cpu, &g, &[t, dim], 6000 + t as u64, 2.0);
            let wt = rand_pair(&cpu, &g, &[dim], 6001, 1.0);
            let (yg, rg) = g.rmsnorm(&x.g, &wt.g, 1e-5).unwrap();
            let (yc, rc) = cpu.rmsnorm(&x.c, &wt.c, 1e-5).unwrap();
            close("rmsnorm y", &g, &yg, &yc, tl);
            close("rmsnorm rstd", &g, &rg, &rc, 2e-4);
            let dy = rand_pair(&cpu, &g, &[t, dim], 6002, 1.0);
            let (mut dwg, mut dwc) = (wt.g.clone(), wt.c.clone());
            let dxg = g
                .rmsnorm_backward(&dy.g, &x.g, &wt.g, &rg, Some(&mut dwg))
                .unwrap();
            let dxc = cpu
                .rmsnorm_backward(&dy.c, &x.c, &wt.c, &rc, Some(&mut dwc))
                .unwrap();
            close("rmsnorm_backward dx", &g, &dxg, &dxc, tl);
            close("rmsnorm_backward dweight", &g, &dwg, &dwc, tl);
            let gate = rand_pair(&cpu, &g, &[t, dim], 6003, 4.0);
            let up = rand_pair(&cpu, &g, &[t, dim], 6004, 2.0);
            close(
                "swiglu",
                &g,
                &g.swiglu(&gate.g, &up.g).unwrap(),
                &cpu.swiglu(&gate.c, &up.c).unwrap(),
                tl,
            );
            let (dgg, dug) = g.swiglu_backward(&dy.g, &gate.g, &up.g).unwrap();
            let (dgc, duc) = cpu.swiglu_backward(&dy.c, &gate.c, &up.c).unwrap();
            close("swiglu_backward dgate", &g, &dgg, &dgc, tl);
            close("swiglu_backward dup", &g, &dug, &duc, tl);
            // cross-entropy with ignored rows
            let labels: Vec<i32> = (0..t)
                .map(|i| {
                    if i % 4 == 1 {
                        -100
                    } else {
                        ((i * 7) % dim) as i32
                    }
                })
                .collect();
            let (lg, gg) = g.cross_entropy(&x.g, &labels, 0.25).unwrap();
            let (lc, gc) = cpu.cross_entropy(&x.c, &labels, 0.25).unwrap();
            assert!(
                (lg - lc).abs() <= 1e-4 * lc.abs().max(1.0),
                "cross_entropy loss {lg} vs {lc}"
            );
            close("cross_entropy dlogits", &g, &gg, &gc, tl);
            assert!(g.cross_entropy(&x.g, &vec![dim as i32; t], 1.0).is_err());
            // the same loss left on the device: per-row statistics, read back by the caller
            let (sg, dsg) = g.cross_entropy_stats(&x.g, &labels, 0.25).unwrap();
            let (sc, dsc) = cpu.cross_entropy_stats(&x.c, &labels, 0.25).unwrap();
            close("cross_entropy_stats stats", &g, &sg, &sc, 2e-4);
            close("cross_entropy_stats dlogits", &g, &dsg, &dsc, tl);
            let ls = cross_entropy_loss(&g.download(&sg).unwrap());
            assert!(
                (ls - lc).abs() <= 1e-4 * lc.abs().max(1.0),
                "cross_entropy_stats loss {ls} vs {lc}"
            );
            assert!(
                g.cross_entropy_stats(&x.g, &vec![dim as i32; t], 1.0)
                    .is_err()
            );
            // AdamW, two steps
            let (mut pg, mut pc) = (x.g.clone(), x.c.clone());
            let (mut mg, mut mc) = (g.zeros(&[t, dim]).unwrap(), cpu.zeros(&[t, dim]).unwrap());
            let (mut vg, mut vc) = (g.zeros(&[t, dim]).unwrap(), cpu.zeros(&[t, dim]).unwrap());
            for step in 1..=2 {
                let p = AdamWParams {
                    lr: 1e-2,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.01,
                    step,
                };
                g.adamw_step(&mut pg, &dy.g, &mut mg, &mut vg, &p).unwrap();
                cpu.adamw_step(&mut pc, &dy.c, &mut mc, &mut vc, &p)
                    .unwrap();
            }
            close("adamw param", &g, &pg, &pc, tl);
            close("adamw exp_avg", &g, &mg, &mc, tl);
            close("adamw exp_avg_sq", &g, &vg, &vc, tl);
            let p0 = AdamWParams {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                step: 0,
            };
            assert!(g.adamw_step(&mut pg, &dy.g, &mut mg, &mut vg, &p0).is_err());
        }
        // RoPE: forward against the CPU, then the inverse restores the input
        for &(t, heads, hd) in &[(5usize, 3usize, 8usize), (19, 2, 64)] {
            let x = rand_pair(&cpu, &g, &[t, heads * hd], 6100, 1.0);
            let pos: Vec<u32> = (0..t as u32).map(|i| i * 37 % 101).collect();
            let (mut xg, mut xc) = (x.g.clone(), x.c.clone());
            g.rope(&mut xg, &pos, hd, 10000.0, false).unwrap();
            cpu.rope(&mut xc, &pos, hd, 10000.0, false).unwrap();
            close("rope", &g, &xg, &xc, tl);
            g.rope(&mut xg, &pos, hd, 10000.0, true).unwrap();
            close("rope inverse", &g, &xg, &x.c, 2.0 * tl);
            assert!(g.rope(&mut xg, &pos[1..], hd, 10000.0, false).is_err());
        }
    }
}

#[test]
fn attention() {
    let cpu = Cpu;
    for d in DTYPES {
        let Some(g) = gpu(d, "attention") else { return };
        let tl = tol(d);
        // GQA 4:2 and 3:1, head dims 16, 64, 160; packed spans with a gap row and an empty span.
        for &(hq, hkv, hd) in &[(4usize, 2usize, 16usize), (3, 1, 64), (2, 2, 160)] {
            let seqs = [
                SeqSpan { start: 0, len: 5 },
                SeqSpan { start: 5, len: 0 },
                SeqSpan { start: 6, len: 41 },
                SeqSpan { start: 47, len: 1 },
            ];
            let t = 48;
            let q = rand_pair(&cpu, &g, &[t, hq * hd], 7000 + hd as u64, 1.0);
            let k = rand_pair(&cpu, &g, &[t, hkv * hd], 7001 + hd as u64, 1.0);
            let v = rand_pair(&cpu, &g, &[t, hkv * hd], 7002 + hd as u64, 1.0);
            let scale = 1.0 / (hd as f32).sqrt();
            let sg = g
                .attention(&q.g, &k.g, &v.g, &seqs, hq, hkv, scale)
                .unwrap();
            let sc = cpu
                .attention(&q.c, &k.c, &v.c, &seqs, hq, hkv, scale)
                .unwrap();
            close("attention out", &g, &sg.out, &sc.out, tl);
            close("attention lse", &g, &sg.lse, &sc.lse, 2e-3);
            let dout = rand_pair(&cpu, &g, &[t, hq * hd], 7003, 1.0);
            let saved_c = AttentionSaved {
                out: cpu
                    .upload(&g.download(&sg.out).unwrap(), &[t, hq * hd])
                    .unwrap(),
                lse: cpu.upload(&g.download(&sg.lse).unwrap(), &[hq, t]).unwrap(),
            };
            let (dqg, dkg, dvg) = g
                .attention_backward(&dout.g, &q.g, &k.g, &v.g, &sg, &seqs, hq, hkv, scale)
                .unwrap();
            let (dqc, dkc, dvc) = cpu
                .attention_backward(&dout.c, &q.c, &k.c, &v.c, &saved_c, &seqs, hq, hkv, scale)
                .unwrap();
            close("attention dq", &g, &dqg, &dqc, 2.0 * tl);
            close("attention dk", &g, &dkg, &dkc, 2.0 * tl);
            close("attention dv", &g, &dvg, &dvc, 2.0 * tl);
            let bad = [SeqSpan { start: 40, len: 9 }];
            assert!(g.attention(&q.g, &k.g, &v.g, &bad, hq, hkv, scale).is_err());
            // the same spans as queries and context: attention's output
            let cg = g
                .attention_cached(&q.g, &k.g, &v.g, &seqs, &seqs, hq, hkv, scale)
                .unwrap();
            close("attention_cached (same spans)", &g, &cg, &sc.out, tl);
            // new tokens over a longer context (a KV cache): 2, 0, 3 and 1 new queries, the
            // context's last rows being the new tokens
            let q_seqs = [
                SeqSpan { start: 0, len: 2 },
                SeqSpan { start: 2, len: 0 },
                SeqSpan { start: 2, len: 3 },
                SeqSpan { start: 5, len: 1 },
            ];
            let qn = rand_pair(&cpu, &g, &[6, hq * hd], 7004 + hd as u64, 1.0);
            let cg = g
                .attention_cached(&qn.g, &k.g, &v.g, &q_seqs, &seqs, hq, hkv, scale)
                .unwrap();
            let cc = cpu
                .attention_cached(&qn.c, &k.c, &v.c, &q_seqs, &seqs, hq, hkv, scale)
                .unwrap();
            close("attention_cached", &g, &cg, &cc, tl);
        }
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
