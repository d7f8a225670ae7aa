//! Frozen f16 weights on the wgpu backend (`WgpuOptions { f16: true }` on an adapter with
//! `SHADER_F16`): every kernel that reads a frozen weight matches the CPU reference run on the
//! same weights rounded to f16 (so the comparison is as tight as for f32), over odd shapes and
//! with 1 KiB storage bindings (f16 ranges that start mid-word); in-place kernels refuse an f16
//! tensor with an error, as do the kernels that only read f32; with `f16: false` a frozen upload
//! is bit for bit an ordinary one. Skips loudly without an adapter (`LORAFUSE_REQUIRE=wgpu`
//! fails) or without SHADER_F16 (`LORAFUSE_REQUIRE=wgpu-f16` fails). The end-to-end finetune
//! over f16 bases is in `wgpu_finetune.rs`.
#![cfg(feature = "wgpu")]

mod common;
#[path = "common/gpu.rs"]
mod gpu;
#[path = "common/per_method.rs"]
mod per_method;

use gpu::*;
use lorafuse::backend::{AdamWParams, Base};
use lorafuse::{Backend, Cpu, Tensor, Wgpu, WgpuOptions};
use per_method::PerMethod;

/// `(T, in, out)`: odd widths, so rows of an f16 weight start at odd elements (mid-word).
const SHAPES: [(usize, usize, usize); 3] = [(1, 5, 3), (3, 67, 71), (17, 130, 9)];
const RANKS: [usize; 2] = [1, 7];

fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// A random frozen weight: the f16-rounded values on the CPU, the frozen upload on `be`.
fn frozen_pair(be: &Wgpu, shape: &[usize], seed: u64) -> (Tensor<Cpu>, Tensor<Wgpu>) {
    let data = rand_vec(shape.iter().product(), seed);
    let w = be.upload_frozen(&data, shape).unwrap();
    assert!(Wgpu::is_f16(&w), "upload_frozen must store f16 here");
    let rounded = round_f16(&data);
    assert_eq!(be.download(&w).unwrap(), rounded, "f16 round trip");
    (Cpu.upload(&rounded, shape).unwrap(), w)
}

fn positive_pair(be: &Wgpu, n: usize, seed: u64) -> (Tensor<Cpu>, Tensor<Wgpu>) {
    let v: Vec<f32> = rand_vec(n, seed).iter().map(|v| 1.0 + 0.5 * v).collect();
    pair(be, &v, &[n])
}

fn frozen_cases(be: &Wgpu, label: &str) {
    for (i, &(t, din, dout)) in SHAPES.iter().enumerate() {
        let s = 100 * i as u64;
        let what = format!("{label} {t}x{din}->{dout}");
        let (xc, xg) = rand_pair(be, &[t, din], s);
        let (wc, wg) = frozen_pair(be, &[dout, din], s + 1);
        let (bc, bg) = rand_pair(be, &[dout], s + 2);
        let (dyc, dyg) = rand_pair(be, &[t, dout], s + 3);
        // a clone is the same f16 data
        assert_eq!(be.download(&wg.clone()).unwrap(), wc.data(), "{what} clone");
        assert_eq!(<Wgpu as Backend>::stored_bytes(&wg), 2 * dout * din);

        let y = be.linear(&xg, &wg, Some(&bg)).unwrap();
        let yc = Cpu.linear(&xc, &wc, Some(&bc)).unwrap();
        assert_tensor(be, &format!("{what} linear"), &y, &yc, 1e-5);
        let dx = be.linear_backward_input(&dyg, &wg, None).unwrap().unwrap();
        let dxc = Cpu.linear_backward_input(&dyc, &wc, None).unwrap().unwrap();
        assert_tensor(be, &format!("{what} linear dx"), &dx, &dxc, 1e-5);
        let (mut accc, mut accg) = rand_pair(be, &[t, din], s + 4);
        be.linear_backward_input(&dyg, &wg, Some(&mut accg))
            .unwrap();
        Cpu.linear_backward_input(&dyc, &wc, Some(&mut accc))
            .unwrap();
        assert_tensor(be, &format!("{what} linear dx acc"), &accg, &accc, 1e-5);
        let sq = be.row_sq_norms(Base::Dense(&wg)).unwrap();
        let sqc = Cpu.row_sq_norms(Base::Dense(&wc)).unwrap();
        assert_tensor(be, &format!("{what} row_sq_norms"), &sq, &sqc, 1e-6);

        for r in RANKS {
            let s = s + 10 * r as u64;
            let what = format!("{what} r={r}");
            let (ac, ag) = rand_pair(be, &[r, din], s + 5);
            let (lbc, lbg) = rand_pair(be, &[dout, r], s + 6);
            let sc = 2.0 / r as f32;

            let (y, h) = be.lora_forward(&xg, &wg, Some(&bg), &ag, &lbg, sc).unwrap();
            let (yc, hc) = Cpu
                .lora_forward(&xc, &wc, Some(&bc), &ac, &lbc, sc)
                .unwrap();
            assert_tensor(be, &format!("{what} lora y"), &y, &yc, 1e-5);
            let (dx, da, db) = be.lora_backward(&dyg, &xg, &h, &wg, &ag, &lbg, sc).unwrap();
            let (dxc, dac, dbc) = Cpu
                .lora_backward(&dyc, &xc, &hc, &wc, &ac, &lbc, sc)
                .unwrap();
            assert_tensor(be, &format!("{what} lora dx"), &dx, &dxc, 1e-5);
            assert_tensor(be, &format!("{what} lora dA"), &da, &dac, 1e-5);
            assert_tensor(be, &format!("{what} lora dB"), &db, &dbc, 1e-5);

            // DoRA: W0 is the matmul's A operand in the norm, B in the products.
            let (mc, mg) = positive_pair(be, dout, s + 7);
            let n = be.dora_weight_norm(&wg, &sq, &ag, &lbg, sc).unwrap();
            let nc = Cpu.dora_weight_norm(&wc, &sqc, &ac, &lbc, sc).unwrap();
            assert_tensor(be, &format!("{what} dora norm"), &n, &nc, 1e-5);
            let (y, saved) = be
                .dora_forward(&xg, &wg, Some(&bg), &ag, &lbg, sc, &mg, &n)
                .unwrap();
            let (yc, savedc) = Cpu
                .dora_forward(&xc, &wc, Some(&bc), &ac, &lbc, sc, &mc, &nc)
                .unwrap();
            assert_tensor(be, &format!("{what} dora y"), &y, &yc, 1e-5);
            let g = be
                .dora_backward(&dyg, &xg, &saved, &wg, &ag, &lbg, sc, &mg, &n)
                .unwrap();
            let gc = Cpu
                .dora_backward(&dyc, &xc, &savedc, &wc, &ac, &lbc, sc, &mc, &nc)
                .unwrap();
            assert_tensor(be, &format!("{what} dora dx"), &g.dx, &gc.dx, 1e-5);
            assert_tensor(
                be,
                &format!("{what} dora dm"),
                &g.d_magnitude,
                &gc.d_magnitude,
                1e-5,
            );

            // VeRA, with shared projections wider than the layer
            let (max_in, max_out) = (din + 3, dout + 5);
            let (vac, vag) = rand_pair(be, &[r, max_in], s + 8);
            let (vbc, vbg) = rand_pair(be, &[max_out, r], s + 9);
            let (ldc, ldg) = rand_pair(be, &[r], s + 10);
            let (lbc2, lbg2) = rand_pair(be, &[dout], s + 11);
            let (y, h) = be
                .vera_forward(&xg, &wg, Some(&bg), &vag, &vbg, &ldg, &lbg2)
                .unwrap();
            let (yc, hc) = Cpu
                .vera_forward(&xc, &wc, Some(&bc), &vac, &vbc, &ldc, &lbc2)
                .unwrap();
            assert_tensor(be, &format!("{what} vera y"), &y, &yc, 1e-5);
            let (dx, _, dlb) = be
                .vera_backward(&dyg, &xg, &h, &wg, &vag, &vbg, &ldg, &lbg2)
                .unwrap();
            let (dxc, _, dlbc) = Cpu
                .vera_backward(&dyc, &xc, &hc, &wc, &vac, &vbc, &ldc, &lbc2)
                .unwrap();
            assert_tensor(be, &format!("{what} vera dx"), &dx, &dxc, 1e-5);
            assert_tensor(be, &format!("{what} vera dlambda_b"), &dlb, &dlbc, 1e-5);

            // AdaLoRA
            let (ec, eg) = rand_pair(be, &[r, 1], s + 12);
            let (y, h) = be
                .adalora_forward(&xg, &wg, Some(&bg), &ag, &lbg, &eg, 16.0, r as f32)
                .unwrap();
            let (yc, hc) = Cpu
                .adalora_forward(&xc, &wc, Some(&bc), &ac, &lbc, &ec, 16.0, r as f32)
                .unwrap();
            assert_tensor(be, &format!("{what} adalora y"), &y, &yc, 1e-5);
            let g = be
                .adalora_backward(&dyg, &xg, &h, &wg, &ag, &lbg, &eg, 16.0, r as f32)
                .unwrap();
            let gc = Cpu
                .adalora_backward(&dyc, &xc, &hc, &wc, &ac, &lbc, &ec, 16.0, r as f32)
                .unwrap();
            assert_tensor(be, &format!("{what} adalora dx"), &g.dx, &gc.dx, 1e-5);
            assert_tensor(
                be,
                &format!("{what} adalora dA"),
                &g.d_lora_a,
                &gc.d_lora_a,
                1e-5,
            );
        }
    }
}

#[test]
fn frozen_f16_weights_match_cpu_on_rounded_weights() {
    let Some(be) = wgpu_f16(
        "frozen_f16_weights_match_cpu_on_rounded_weights",
        None,
        true,
    ) else {
        return;
    };
    eprintln!("wgpu adapter: {} (f16)", be.adapter_name());
    frozen_cases(&be, "f16");
}

#[test]
fn frozen_f16_weights_wider_than_one_binding_are_split() {
    // 1 KiB bindings hold 512 halves: the weights above are cut, at odd element offsets too;
    // and the row reductions run on the workgroup-memory fallback (the other test, subgroups
    // where the adapter has them).
    let Some(be) = wgpu_f16(
        "frozen_f16_weights_wider_than_one_binding_are_split",
        Some(1024),
        false,
    ) else {
        return;
    };
    assert!(be.max_binding() <= 1024);
    frozen_cases(&be, "f16, 1 KiB bindings");
    // one weight spanning many bindings in every dimension of the matmul
    let (t, din, dout) = (5, 301, 257);
    let (xc, xg) = rand_pair(&be, &[t, din], 7);
    let (wc, wg) = frozen_pair(&be, &[dout, din], 8);
    let (dyc, dyg) = rand_pair(&be, &[t, dout], 9);
    let y = be.linear(&xg, &wg, None).unwrap();
    assert_tensor(
        &be,
        "wide linear",
        &y,
        &Cpu.linear(&xc, &wc, None).unwrap(),
        1e-5,
    );
    let dx = be.linear_backward_input(&dyg, &wg, None).unwrap().unwrap();
    let dxc = Cpu.linear_backward_input(&dyc, &wc, None).unwrap().unwrap();
    assert_tensor(&be, "wide linear dx", &dx, &dxc, 1e-5);
    let sq = be.row_sq_norms(Base::Dense(&wg)).unwrap();
    assert_tensor(
        &be,
        "wide row_sq_norms",
        &sq,
        &Cpu.row_sq_norms(Base::Dense(&wc)).unwrap(),
        1e-6,
    );
}

/// Asserts `r` is an error that says a frozen f16 weight was refused.
fn refused<T>(what: &str, r: lorafuse::Result<T>) {
    match r {
        Ok(_) => panic!("{what}: an f16 tensor was accepted"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("f16"), "{what}: unexpected error {msg}");
            eprintln!("{what}: {msg}");
        }
    }
}

#[test]
fn in_place_kernels_refuse_frozen_f16_weights() {
    let Some(be) = wgpu_f16("in_place_kernels_refuse_frozen_f16_weights", None, true) else {
        return;
    };
    let (dout, din, r) = (6, 5, 2);
    let (_, w) = frozen_pair(&be, &[dout, din], 1);
    let before = be.download(&w).unwrap();
    let u = |shape: &[usize], seed| {
        be.upload(&rand_vec(shape.iter().product(), seed), shape)
            .unwrap()
    };
    let (a, b, m, e) = (
        u(&[r, din], 2),
        u(&[dout, r], 3),
        u(&[dout], 4),
        u(&[r, 1], 5),
    );
    let n = be.upload(&vec![1.5; dout], &[dout]).unwrap();
    let mut wm = w.clone();
    let msg = |r: lorafuse::Result<()>| r.map_err(|e| e.to_string()).unwrap_err();
    let m1 = msg(be.lora_merge(&mut wm, &a, &b, 0.5, 1.0));
    assert!(
        m1.contains("frozen f16 weight cannot be modified in place"),
        "{m1}"
    );
    refused("dora_merge", be.dora_merge(&mut wm, &a, &b, 0.5, &m, &n));
    refused(
        "dora_unmerge",
        be.dora_unmerge(&mut wm, &a, &b, 0.5, &m, &n),
    );
    let (va, vb, ld) = (u(&[r, din], 6), u(&[dout, r], 7), u(&[r], 8));
    refused("vera_merge", be.vera_merge(&mut wm, &va, &vb, &ld, &m, 1.0));
    refused(
        "adalora_merge",
        be.adalora_merge(&mut wm, &a, &b, &e, 8.0, 2.0, 1.0),
    );
    let full = u(&[dout, din], 9);
    refused("axpy", be.axpy(&mut wm, 1.0, &full));
    refused("scale", be.scale(&mut wm, 2.0));
    let (mut mo, mut vo) = (
        be.zeros(&[dout, din]).unwrap(),
        be.zeros(&[dout, din]).unwrap(),
    );
    let p = AdamWParams {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
    };
    refused(
        "adamw_step",
        be.adamw_step(&mut wm, &full, &mut mo, &mut vo, &p),
    );
    let (dy, x) = (u(&[3, dout], 10), u(&[3, din], 11));
    refused(
        "linear_backward_weight",
        be.linear_backward_weight(&dy, &x, &mut wm),
    );
    assert_eq!(
        be.download(&wm).unwrap(),
        before,
        "a refused kernel changed the weight"
    );
    // kernels that read only f32 refuse an f16 input instead of misreading it
    refused("swiglu", be.swiglu(&w, &full));
    refused("sum_squares", be.sum_squares(&w));
    refused("gather_rows", be.gather_rows(&w, &[0, 2]));
}

#[test]
fn with_f16_off_frozen_uploads_are_bit_identical_f32() {
    let opts = WgpuOptions {
        f16: false,
        ..WgpuOptions::default()
    };
    let Some(be) = wgpu_with("with_f16_off_frozen_uploads_are_bit_identical_f32", &opts) else {
        return;
    };
    assert!(!be.has_f16());
    let (t, din, dout) = (3, 67, 71);
    let data = rand_vec(dout * din, 1);
    let plain = be.upload(&data, &[dout, din]).unwrap();
    let frozen = be.upload_frozen(&data, &[dout, din]).unwrap();
    let frozen2 = be.freeze(be.upload(&data, &[dout, din]).unwrap()).unwrap();
    assert!(!Wgpu::is_f16(&frozen) && !Wgpu::is_f16(&frozen2));
    assert_eq!(<Wgpu as Backend>::stored_bytes(&frozen), 4 * dout * din);
    let bits = |t: &Tensor<Wgpu>| -> Vec<u32> {
        be.download(t)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert_eq!(bits(&frozen), bits(&plain));
    assert_eq!(bits(&frozen2), bits(&plain));
    let x = be.upload(&rand_vec(t * din, 2), &[t, din]).unwrap();
    let (a, b) = (
        be.upload(&rand_vec(4 * din, 3), &[4, din]).unwrap(),
        be.upload(&rand_vec(dout * 4, 4), &[dout, 4]).unwrap(),
    );
    let (y1, _) = be.lora_forward(&x, &plain, None, &a, &b, 0.5).unwrap();
    let (y2, _) = be.lora_forward(&x, &frozen, None, &a, &b, 0.5).unwrap();
    assert_eq!(bits(&y1), bits(&y2));
    // and the weight stays mutable
    let mut w = frozen;
    be.lora_merge(&mut w, &a, &b, 0.5, 1.0).unwrap();
}

#[test]
fn freeze_converts_to_f16() {
    let Some(be) = wgpu_f16("freeze_converts_to_f16", None, true) else {
        return;
    };
    let data = rand_vec(33, 5);
    let t = be.freeze(be.upload(&data, &[3, 11]).unwrap()).unwrap();
    assert!(Wgpu::is_f16(&t));
    assert_eq!(t.shape(), &[3, 11]);
    assert_eq!(be.download(&t).unwrap(), round_f16(&data));
    // freezing twice changes nothing
    let t2 = be.freeze(t).unwrap();
    assert_eq!(be.download(&t2).unwrap(), round_f16(&data));
}
