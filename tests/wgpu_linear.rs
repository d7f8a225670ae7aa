//! The wgpu backend's dense kernels (linear, LoRA, elementwise, AdamW) against the CPU
//! reference over odd shapes, including the splitting of operands wider than one storage
//! binding; LoRA's fused op also over an NF4 base (QLoRA: forward, backward, an input gradient
//! added into an existing dx). Skips loudly without a Vulkan/Metal/DX12 adapter; `LORAFUSE_REQUIRE=wgpu` fails.
#![cfg(feature = "wgpu")]

mod common;
#[path = "common/gpu.rs"]
mod gpu;
#[path = "common/per_method.rs"]
mod per_method;

use gpu::*;
use lorafuse::backend::{AdamWParams, Base, GradWants, LowRank};
use lorafuse::quant::nf4::quantize_nf4;
use lorafuse::{Backend, Cpu, Wgpu};
use per_method::PerMethod;

const SHAPES: [(usize, usize, usize); 5] = [
    (1, 5, 3),
    (3, 67, 70),
    (17, 130, 9),
    (130, 33, 129),
    (2, 300, 1),
];

fn linear_cases(be: &Wgpu, label: &str) {
    for (i, &(t, din, dout)) in SHAPES.iter().enumerate() {
        let s = 100 * i as u64;
        let (xc, xg) = rand_pair(be, &[t, din], s);
        let (wc, wg) = rand_pair(be, &[dout, din], s + 1);
        let (bc, bg) = rand_pair(be, &[dout], s + 2);
        let what = format!("{label} linear {t}x{din}->{dout}");
        let y = be.linear(&xg, &wg, Some(&bg)).unwrap();
        assert_tensor(
            be,
            &what,
            &y,
            &Cpu.linear(&xc, &wc, Some(&bc)).unwrap(),
            1e-5,
        );
        let (dyc, dyg) = rand_pair(be, &[t, dout], s + 3);
        let dx = be.linear_backward_input(&dyg, &wg, None).unwrap().unwrap();
        let dxc = Cpu.linear_backward_input(&dyc, &wc, None).unwrap().unwrap();
        assert_tensor(be, &format!("{what} dx"), &dx, &dxc, 1e-5);
        // accumulate into an existing dx
        let (mut accc, mut accg) = rand_pair(be, &[t, din], s + 4);
        assert!(
            be.linear_backward_input(&dyg, &wg, Some(&mut accg))
                .unwrap()
                .is_none()
        );
        Cpu.linear_backward_input(&dyc, &wc, Some(&mut accc))
            .unwrap();
        assert_tensor(be, &format!("{what} dx acc"), &accg, &accc, 1e-5);
        let (mut dwc, mut dwg) = rand_pair(be, &[dout, din], s + 5);
        be.linear_backward_weight(&dyg, &xg, &mut dwg).unwrap();
        Cpu.linear_backward_weight(&dyc, &xc, &mut dwc).unwrap();
        assert_tensor(be, &format!("{what} dw"), &dwg, &dwc, 1e-5);
    }
}

#[test]
fn linear_matches_cpu() {
    let Some(be) = wgpu("linear_matches_cpu") else {
        return;
    };
    eprintln!("wgpu adapter: {}", be.adapter_name());
    linear_cases(&be, "full binding");
}

#[test]
fn operands_wider_than_one_binding_are_split() {
    // 1 KiB bindings: every operand above 256 floats is cut along M, N or K.
    let Ok(be) = Wgpu::with_max_binding(1024) else {
        let _ = wgpu("operands_wider_than_one_binding_are_split");
        return;
    };
    assert!(be.max_binding() <= 1024);
    linear_cases(&be, "1 KiB bindings");
    // Rows just under one binding (250 of 256 floats) at offsets that are not aligned: the
    // aligned-down start makes the bound range wider than the span, so they must be cut too.
    let (xc, xg) = rand_pair(&be, &[5, 250], 7);
    let (wc, wg) = rand_pair(&be, &[3, 250], 8);
    let (bc, bg) = rand_pair(&be, &[3], 9);
    let y = be.linear(&xg, &wg, Some(&bg)).unwrap();
    assert_tensor(
        &be,
        "rows of 250 floats",
        &y,
        &Cpu.linear(&xc, &wc, Some(&bc)).unwrap(),
        1e-5,
    );
    // elementwise kernels walk the tensor in bound ranges
    let n = 5000;
    let (mut ac, mut ag) = rand_pair(&be, &[n], 1);
    let (bc, bg) = rand_pair(&be, &[n], 2);
    be.axpy(&mut ag, 0.5, &bg).unwrap();
    Cpu.axpy(&mut ac, 0.5, &bc).unwrap();
    assert_tensor(&be, "split axpy", &ag, &ac, 1e-6);
}

#[test]
fn lora_matches_cpu() {
    let Some(be) = wgpu("lora_matches_cpu") else {
        return;
    };
    for (i, &(t, din, dout)) in SHAPES.iter().enumerate() {
        for r in [1usize, 7, 64] {
            let s = 1000 * i as u64 + r as u64;
            let what = format!("lora {t}x{din}->{dout} r={r}");
            let (xc, xg) = rand_pair(&be, &[t, din], s);
            let (wc, wg) = rand_pair(&be, &[dout, din], s + 1);
            let (bc, bg) = rand_pair(&be, &[dout], s + 2);
            let (ac, ag) = rand_pair(&be, &[r, din], s + 3);
            let (lbc, lbg) = rand_pair(&be, &[dout, r], s + 4);
            let sc = 2.0 / r as f32;
            let (y, h) = be.lora_forward(&xg, &wg, Some(&bg), &ag, &lbg, sc).unwrap();
            let (yc, hc) = Cpu
                .lora_forward(&xc, &wc, Some(&bc), &ac, &lbc, sc)
                .unwrap();
            assert_tensor(&be, &format!("{what} y"), &y, &yc, 1e-5);
            assert_tensor(&be, &format!("{what} h"), &h, &hc, 1e-5);
            let (dyc, dyg) = rand_pair(&be, &[t, dout], s + 5);
            let (dx, da, db) = be.lora_backward(&dyg, &xg, &h, &wg, &ag, &lbg, sc).unwrap();
            let (dxc, dac, dbc) = Cpu
                .lora_backward(&dyc, &xc, &hc, &wc, &ac, &lbc, sc)
                .unwrap();
            assert_tensor(&be, &format!("{what} dx"), &dx, &dxc, 1e-5);
            assert_tensor(&be, &format!("{what} dA"), &da, &dac, 1e-5);
            assert_tensor(&be, &format!("{what} dB"), &db, &dbc, 1e-5);
            // the same term over an NF4 base (QLoRA): the fused op, its backward and an input
            // gradient added into an existing dx
            let q = quantize_nf4(&be.download(&wg).unwrap(), &[dout, din], 64, true).unwrap();
            let (qg, qc) = (be.upload_nf4(&q).unwrap(), Cpu.upload_nf4(&q).unwrap());
            let (tg, tc) = (LowRank::lora(&ag, &lbg, sc), LowRank::lora(&ac, &lbc, sc));
            let og = be
                .linear_lowrank(&xg, Base::Nf4(&qg), Some(&bg), Some(&tg))
                .unwrap();
            let oc = Cpu
                .linear_lowrank(&xc, Base::Nf4(&qc), Some(&bc), Some(&tc))
                .unwrap();
            assert_tensor(&be, &format!("{what} nf4 y"), &og.y, &oc.y, 1e-5);
            let (h2, h2c) = (og.h.unwrap(), oc.h.unwrap());
            assert_tensor(&be, &format!("{what} nf4 h"), &h2, &h2c, 1e-5);
            let g2 = be
                .linear_lowrank_backward(&dyg, &xg, &h2, None, Base::Nf4(&qg), &tg, GradWants::LORA)
                .unwrap();
            let g2c = Cpu
                .linear_lowrank_backward(
                    &dyc,
                    &xc,
                    &h2c,
                    None,
                    Base::Nf4(&qc),
                    &tc,
                    GradWants::LORA,
                )
                .unwrap();
            assert_tensor(&be, &format!("{what} nf4 dx"), &g2.dx, &g2c.dx, 1e-5);
            let (da2, da2c) = (g2.d_lora_a.unwrap(), g2c.d_lora_a.unwrap());
            assert_tensor(&be, &format!("{what} nf4 dA"), &da2, &da2c, 1e-5);
            let (db2, db2c) = (g2.d_lora_b.unwrap(), g2c.d_lora_b.unwrap());
            assert_tensor(&be, &format!("{what} nf4 dB"), &db2, &db2c, 1e-5);
            let (mut dx2c, mut dx2g) = rand_pair(&be, &[t, din], s + 7);
            let (none, gg) = be
                .backward_input(&dyg, Base::Nf4(&qg), Some(&tg), Some(&mut dx2g))
                .unwrap();
            assert!(none.is_none(), "{what}: dx added into acc");
            let (_, ggc) = Cpu
                .backward_input(&dyc, Base::Nf4(&qc), Some(&tc), Some(&mut dx2c))
                .unwrap();
            assert_tensor(&be, &format!("{what} nf4 dx acc"), &dx2g, &dx2c, 1e-5);
            assert_tensor(
                &be,
                &format!("{what} nf4 g"),
                &gg.unwrap(),
                &ggc.unwrap(),
                1e-5,
            );
            // merge then unmerge
            let mut wm = wg.clone();
            let mut wmc = wc.clone();
            be.lora_merge(&mut wm, &ag, &lbg, sc, 1.0).unwrap();
            Cpu.lora_merge(&mut wmc, &ac, &lbc, sc, 1.0).unwrap();
            assert_tensor(&be, &format!("{what} merged"), &wm, &wmc, 1e-5);
            be.lora_merge(&mut wm, &ag, &lbg, sc, -1.0).unwrap();
            assert_tensor(&be, &format!("{what} unmerged"), &wm, &wc, 1e-5);
        }
    }
}

#[test]
fn elementwise_and_adamw_match_cpu() {
    let Some(be) = wgpu("elementwise_and_adamw_match_cpu") else {
        return;
    };
    for (n, s) in [(1usize, 1u64), (255, 2), (1000, 3)] {
        let (gc, gg) = rand_pair(&be, &[n], s);
        let (uc, ug) = rand_pair(&be, &[n], s + 1);
        let (dc, dg) = rand_pair(&be, &[n], s + 2);
        let y = be.swiglu(&gg, &ug).unwrap();
        assert_tensor(&be, "swiglu", &y, &Cpu.swiglu(&gc, &uc).unwrap(), 1e-6);
        let (dga, dua) = be.swiglu_backward(&dg, &gg, &ug).unwrap();
        let (dgc, duc) = Cpu.swiglu_backward(&dc, &gc, &uc).unwrap();
        assert_tensor(&be, "swiglu dgate", &dga, &dgc, 1e-6);
        assert_tensor(&be, "swiglu dup", &dua, &duc, 1e-6);
        let (mut ac, mut ag) = rand_pair(&be, &[n], s + 3);
        be.scale(&mut ag, -1.5).unwrap();
        Cpu.scale(&mut ac, -1.5).unwrap();
        assert_tensor(&be, "scale", &ag, &ac, 1e-7);
        // AdamW over several steps with a fresh gradient each step
        let (mut wc, mut wg) = rand_pair(&be, &[n], s + 4);
        let (mut mc, mut mg) = (Cpu.zeros(&[n]).unwrap(), be.zeros(&[n]).unwrap());
        let (mut vc, mut vg) = (Cpu.zeros(&[n]).unwrap(), be.zeros(&[n]).unwrap());
        for step in 1..=5u64 {
            let (grc, grg) = rand_pair(&be, &[n], 50 + step);
            let p = AdamWParams {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
            };
            be.adamw_step(&mut wg, &grg, &mut mg, &mut vg, &p).unwrap();
            Cpu.adamw_step(&mut wc, &grc, &mut mc, &mut vc, &p).unwrap();
        }
        assert_tensor(&be, "adamw param", &wg, &wc, 1e-5);
        assert_tensor(&be, "adamw exp_avg", &mg, &mc, 1e-5);
        assert_tensor(&be, "adamw exp_avg_sq", &vg, &vc, 1e-5);
    }
}

#[test]
fn clones_are_values_and_bad_shapes_are_errors() {
    let Some(be) = wgpu("clones_are_values_and_bad_shapes_are_errors") else {
        return;
    };
    let data = rand_vec(40, 9);
    let mut a = be.upload(&data, &[4, 10]).unwrap();
    let b = a.clone();
    be.scale(&mut a, 2.0).unwrap();
    assert_eq!(
        be.download(&b).unwrap(),
        data,
        "a clone must not see in-place changes"
    );
    let doubled: Vec<f32> = data.iter().map(|v| v * 2.0).collect();
    assert_eq!(be.download(&a).unwrap(), doubled);
    let w = be.upload(&rand_vec(30, 1), &[3, 10]).unwrap();
    let bad_x = be.upload(&rand_vec(9, 1), &[1, 9]).unwrap();
    let e = be.linear(&bad_x, &w, None).unwrap_err().to_string();
    assert!(e.contains("`w`"), "{e}");
    let bad_bias = be.upload(&[0.0; 4], &[4]).unwrap();
    let e = be.linear(&a, &w, Some(&bad_bias)).unwrap_err().to_string();
    assert!(e.contains("bias"), "{e}");
    assert!(be.upload(&[1.0; 3], &[2, 2]).is_err());
    let p = AdamWParams {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 0,
    };
    let (mut m, mut v) = (be.zeros(&[4, 10]).unwrap(), be.zeros(&[4, 10]).unwrap());
    assert!(be.adamw_step(&mut a, &b, &mut m, &mut v, &p).is_err());
}

#[test]
fn out_of_memory_is_an_error_and_the_device_stays_usable() {
    let Some(be) = wgpu("out_of_memory_is_an_error_and_the_device_stays_usable") else {
        return;
    };
    // 256 GiB: beyond any adapter's buffer limit.
    let e = be.zeros(&[1 << 36]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("wgpu"), "{e}");
    let e = be.upload(&[1.0; 8], &[2, 4]).and_then(|t| be.download(&t));
    assert_eq!(
        e.unwrap(),
        vec![1.0; 8],
        "the device works after the failed allocation"
    );
}
