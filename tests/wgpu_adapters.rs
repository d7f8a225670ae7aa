//! The wgpu backend's DoRA, VeRA and AdaLoRA kernels against the CPU reference over odd shapes
//! (T = 1, 3, 17; in/out not multiples of 4; r from 1 to 64), merge/unmerge round trips, the
//! splitting of tensors wider than one storage binding, and bad inputs giving the CPU's errors.
//! DoRA also over an NF4 base (QDoRA: weight norm, forward, backward) and with the forward
//! taking its own weight norm over either base.
//! DoRA, VeRA and AdaLoRA (whose row sums use the shared reduction prelude) run with subgroup
//! reductions and with the workgroup-memory fallback. Skips loudly without a Vulkan/Metal/DX12
//! adapter, `LORAFUSE_REQUIRE=wgpu` fails; likewise for the subgroup mode without `SUBGROUP`
//! and `LORAFUSE_REQUIRE=wgpu-subgroups`.
#![cfg(feature = "wgpu")]

mod common;
#[path = "common/gpu.rs"]
mod gpu;
#[path = "common/per_method.rs"]
mod per_method;

use gpu::*;
use lorafuse::backend::{Base, GradWants, LowRank};
use lorafuse::quant::nf4::quantize_nf4;
use lorafuse::{Backend, Cpu, Tensor, Wgpu};
use per_method::PerMethod;

/// `(T, in, out)`.
const SHAPES: [(usize, usize, usize); 3] = [(1, 5, 3), (3, 67, 70), (17, 130, 9)];
const RANKS: [usize; 3] = [1, 7, 64];

/// Values in `[0.5, 1.5)`: magnitudes and AdaLoRA-like scales that keep `m / n` away from 0.
fn positive_pair(be: &Wgpu, n: usize, seed: u64) -> (Tensor<Cpu>, Tensor<Wgpu>) {
    let v: Vec<f32> = rand_vec(n, seed).iter().map(|v| 1.0 + 0.5 * v).collect();
    pair(be, &v, &[n])
}

fn dora_cases(be: &Wgpu, label: &str, shapes: &[(usize, usize, usize)], ranks: &[usize]) {
    for (i, &(t, din, dout)) in shapes.iter().enumerate() {
        for &r in ranks {
            let s = 1000 * i as u64 + r as u64;
            let what = format!("{label} dora {t}x{din}->{dout} r={r}");
            let (xc, xg) = rand_pair(be, &[t, din], s);
            let (wc, wg) = rand_pair(be, &[dout, din], s + 1);
            let (bc, bg) = rand_pair(be, &[dout], s + 2);
            let (ac, ag) = rand_pair(be, &[r, din], s + 3);
            let (lbc, lbg) = rand_pair(be, &[dout, r], s + 4);
            let (mc, mg) = positive_pair(be, dout, s + 5);
            let sc = 2.0 / r as f32;

            let sq = be.row_sq_norms(Base::Dense(&wg)).unwrap();
            let sqc = Cpu.row_sq_norms(Base::Dense(&wc)).unwrap();
            assert_tensor(be, &format!("{what} row_sq_norms"), &sq, &sqc, 1e-6);
            let n = be.dora_weight_norm(&wg, &sq, &ag, &lbg, sc).unwrap();
            let nc = Cpu.dora_weight_norm(&wc, &sqc, &ac, &lbc, sc).unwrap();
            assert_tensor(be, &format!("{what} weight_norm"), &n, &nc, 1e-5);

            let (y, saved) = be
                .dora_forward(&xg, &wg, Some(&bg), &ag, &lbg, sc, &mg, &n)
                .unwrap();
            let (yc, savedc) = Cpu
                .dora_forward(&xc, &wc, Some(&bc), &ac, &lbc, sc, &mc, &nc)
                .unwrap();
            assert_tensor(be, &format!("{what} y"), &y, &yc, 1e-5);
            assert_tensor(be, &format!("{what} h"), &saved.h, &savedc.h, 1e-5);
            assert_tensor(be, &format!("{what} z"), &saved.z, &savedc.z, 1e-5);
            // over an NF4 base (QDoRA), without bias: the norm, the forward and its saved z
            let q = quantize_nf4(&be.download(&wg).unwrap(), &[dout, din], 64, true).unwrap();
            let (qg, qc) = (be.upload_nf4(&q).unwrap(), Cpu.upload_nf4(&q).unwrap());
            let qsq = be.row_sq_norms(Base::Nf4(&qg)).unwrap();
            let qsqc = Cpu.row_sq_norms(Base::Nf4(&qc)).unwrap();
            assert_tensor(be, &format!("{what} nf4 row_sq_norms"), &qsq, &qsqc, 1e-6);
            let qn = be
                .lowrank_row_norms(Base::Nf4(&qg), &qsq, &LowRank::lora(&ag, &lbg, sc))
                .unwrap();
            let qnc = Cpu
                .lowrank_row_norms(Base::Nf4(&qc), &qsqc, &LowRank::lora(&ac, &lbc, sc))
                .unwrap();
            assert_tensor(be, &format!("{what} nf4 weight_norm"), &qn, &qnc, 1e-5);
            let tq = LowRank::dora(&ag, &lbg, sc, &mg, Some(&qn));
            let tqc = LowRank::dora(&ac, &lbc, sc, &mc, Some(&qnc));
            let oq = be
                .linear_lowrank(&xg, Base::Nf4(&qg), None, Some(&tq))
                .unwrap();
            let oqc = Cpu
                .linear_lowrank(&xc, Base::Nf4(&qc), None, Some(&tqc))
                .unwrap();
            assert_tensor(be, &format!("{what} nf4 y"), &oq.y, &oqc.y, 1e-5);
            let (qh, qhc) = (oq.h.unwrap(), oqc.h.unwrap());
            let (qz, qzc) = (oq.z.unwrap(), oqc.z.unwrap());
            assert_tensor(be, &format!("{what} nf4 h"), &qh, &qhc, 1e-5);
            assert_tensor(be, &format!("{what} nf4 z"), &qz, &qzc, 1e-5);
            // the forward that takes its own weight norm, over either base (over NF4 from the
            // same dequantized tiles as the product)
            for (base, basec, sqg, sqcc, name) in [
                (Base::Dense(&wg), Base::Dense(&wc), &sq, &sqc, "dense"),
                (Base::Nf4(&qg), Base::Nf4(&qc), &qsq, &qsqc, "nf4"),
            ] {
                let o = be
                    .linear_lowrank_with_norm(
                        &xg,
                        base,
                        sqg,
                        Some(&bg),
                        &LowRank::dora(&ag, &lbg, sc, &mg, None),
                    )
                    .unwrap();
                let oc = Cpu
                    .linear_lowrank_with_norm(
                        &xc,
                        basec,
                        sqcc,
                        Some(&bc),
                        &LowRank::dora(&ac, &lbc, sc, &mc, None),
                    )
                    .unwrap();
                let what = format!("{what} {name} with_norm");
                assert_tensor(be, &format!("{what} y"), &o.y, &oc.y, 1e-5);
                assert_tensor(
                    be,
                    &format!("{what} z"),
                    &o.z.unwrap(),
                    &oc.z.unwrap(),
                    1e-5,
                );
                let (n1, n1c) = (o.weight_norm.unwrap(), oc.weight_norm.unwrap());
                assert_tensor(be, &format!("{what} n"), &n1, &n1c, 1e-5);
            }

            let (dyc, dyg) = rand_pair(be, &[t, dout], s + 6);
            let g = be
                .dora_backward(&dyg, &xg, &saved, &wg, &ag, &lbg, sc, &mg, &n)
                .unwrap();
            let gc = Cpu
                .dora_backward(&dyc, &xc, &savedc, &wc, &ac, &lbc, sc, &mc, &nc)
                .unwrap();
            assert_tensor(be, &format!("{what} dx"), &g.dx, &gc.dx, 1e-5);
            assert_tensor(be, &format!("{what} dA"), &g.d_lora_a, &gc.d_lora_a, 1e-5);
            assert_tensor(be, &format!("{what} dB"), &g.d_lora_b, &gc.d_lora_b, 1e-5);
            assert_tensor(
                be,
                &format!("{what} dm"),
                &g.d_magnitude,
                &gc.d_magnitude,
                1e-5,
            );
            // the backward over the NF4 base: g = (dy ⊙ m / n) B, dx, the gradients
            let (_, gq) = be
                .backward_input(&dyg, Base::Nf4(&qg), Some(&tq), None)
                .unwrap();
            let (_, gqc) = Cpu
                .backward_input(&dyc, Base::Nf4(&qc), Some(&tqc), None)
                .unwrap();
            assert_tensor(
                be,
                &format!("{what} nf4 g"),
                &gq.unwrap(),
                &gqc.unwrap(),
                1e-5,
            );
            let ga = be
                .linear_lowrank_backward(
                    &dyg,
                    &xg,
                    &qh,
                    Some(&qz),
                    Base::Nf4(&qg),
                    &tq,
                    GradWants::DORA,
                )
                .unwrap();
            let gac = Cpu
                .linear_lowrank_backward(
                    &dyc,
                    &xc,
                    &qhc,
                    Some(&qzc),
                    Base::Nf4(&qc),
                    &tqc,
                    GradWants::DORA,
                )
                .unwrap();
            assert_tensor(be, &format!("{what} nf4 dx"), &ga.dx, &gac.dx, 1e-5);
            for (name, got, want) in [
                ("dA", &ga.d_lora_a, &gac.d_lora_a),
                ("dB", &ga.d_lora_b, &gac.d_lora_b),
                ("dm", &ga.d_magnitude, &gac.d_magnitude),
            ] {
                let (got, want) = (got.as_ref().unwrap(), want.as_ref().unwrap());
                assert_tensor(be, &format!("{what} nf4 {name}"), got, want, 1e-5);
            }

            // merge, then unmerge back to W0
            let (mut wm, mut wmc) = (wg.clone(), wc.clone());
            be.dora_merge(&mut wm, &ag, &lbg, sc, &mg, &n).unwrap();
            Cpu.dora_merge(&mut wmc, &ac, &lbc, sc, &mc, &nc).unwrap();
            assert_tensor(be, &format!("{what} merged"), &wm, &wmc, 1e-5);
            be.dora_unmerge(&mut wm, &ag, &lbg, sc, &mg, &n).unwrap();
            Cpu.dora_unmerge(&mut wmc, &ac, &lbc, sc, &mc, &nc).unwrap();
            assert_tensor(be, &format!("{what} unmerged"), &wm, &wmc, 1e-5);
            assert_tensor(be, &format!("{what} round trip"), &wm, &wc, 1e-5);
        }
    }
}

#[test]
fn dora_matches_cpu() {
    for (mode, be) in wgpu_modes("dora_matches_cpu") {
        dora_cases(&be, &format!("{mode}, full binding"), &SHAPES, &RANKS);
    }
}

fn vera_cases(be: &Wgpu, label: &str) {
    for (i, &(t, din, dout)) in SHAPES.iter().enumerate() {
        for r in RANKS {
            let s = 2000 * i as u64 + r as u64;
            // the shared projections are wider than this layer: sliced inside the kernels
            let (max_in, max_out) = (din + 3 + i, dout + 5);
            let what = format!("{label} vera {t}x{din}->{dout} r={r} (max {max_in}, {max_out})");
            let (xc, xg) = rand_pair(be, &[t, din], s);
            let (wc, wg) = rand_pair(be, &[dout, din], s + 1);
            let (bc, bg) = rand_pair(be, &[dout], s + 2);
            let (vac, vag) = rand_pair(be, &[r, max_in], s + 3);
            let (vbc, vbg) = rand_pair(be, &[max_out, r], s + 4);
            let (ldc, ldg) = rand_pair(be, &[r], s + 5);
            let (lbc, lbg) = rand_pair(be, &[dout], s + 6);
            let (y, h) = be
                .vera_forward(&xg, &wg, Some(&bg), &vag, &vbg, &ldg, &lbg)
                .unwrap();
            let (yc, hc) = Cpu
                .vera_forward(&xc, &wc, Some(&bc), &vac, &vbc, &ldc, &lbc)
                .unwrap();
            assert_tensor(be, &format!("{what} y"), &y, &yc, 1e-5);
            assert_tensor(be, &format!("{what} h"), &h, &hc, 1e-5);
            let (dyc, dyg) = rand_pair(be, &[t, dout], s + 7);
            let (dx, dld, dlb) = be
                .vera_backward(&dyg, &xg, &h, &wg, &vag, &vbg, &ldg, &lbg)
                .unwrap();
            let (dxc, dldc, dlbc) = Cpu
                .vera_backward(&dyc, &xc, &hc, &wc, &vac, &vbc, &ldc, &lbc)
                .unwrap();
            assert_tensor(be, &format!("{what} dx"), &dx, &dxc, 1e-5);
            assert_tensor(be, &format!("{what} dlambda_d"), &dld, &dldc, 1e-5);
            assert_tensor(be, &format!("{what} dlambda_b"), &dlb, &dlbc, 1e-5);
            let (mut wm, mut wmc) = (wg.clone(), wc.clone());
            be.vera_merge(&mut wm, &vag, &vbg, &ldg, &lbg, 1.0).unwrap();
            Cpu.vera_merge(&mut wmc, &vac, &vbc, &ldc, &lbc, 1.0)
                .unwrap();
            assert_tensor(be, &format!("{what} merged"), &wm, &wmc, 1e-5);
            be.vera_merge(&mut wm, &vag, &vbg, &ldg, &lbg, -1.0)
                .unwrap();
            assert_tensor(be, &format!("{what} unmerged"), &wm, &wc, 1e-5);
        }
    }
}

#[test]
fn vera_matches_cpu() {
    for (mode, be) in wgpu_modes("vera_matches_cpu") {
        vera_cases(&be, &format!("{mode}, full binding"));
    }
}

fn adalora_cases(be: &Wgpu, label: &str) {
    for (i, &(t, din, dout)) in SHAPES.iter().enumerate() {
        for r in RANKS {
            let s = 3000 * i as u64 + r as u64;
            let what = format!("{label} adalora {t}x{din}->{dout} r={r}");
            let (xc, xg) = rand_pair(be, &[t, din], s);
            let (wc, wg) = rand_pair(be, &[dout, din], s + 1);
            let (bc, bg) = rand_pair(be, &[dout], s + 2);
            let (ac, ag) = rand_pair(be, &[r, din], s + 3);
            let (lbc, lbg) = rand_pair(be, &[dout, r], s + 4);
            // E with its last rank masked (zero): dE stays non-zero there
            let mut e = rand_vec(r, s + 5);
            e[r - 1] = 0.0;
            let (ec, eg) = pair(be, &e, &[r, 1]);
            let (scaling, ranknum) = (16.0, r as f32);
            let (y, h) = be
                .adalora_forward(&xg, &wg, Some(&bg), &ag, &lbg, &eg, scaling, ranknum)
                .unwrap();
            let (yc, hc) = Cpu
                .adalora_forward(&xc, &wc, Some(&bc), &ac, &lbc, &ec, scaling, ranknum)
                .unwrap();
            assert_tensor(be, &format!("{what} y"), &y, &yc, 1e-5);
            assert_tensor(be, &format!("{what} h"), &h, &hc, 1e-5);
            let (dyc, dyg) = rand_pair(be, &[t, dout], s + 6);
            let g = be
                .adalora_backward(&dyg, &xg, &h, &wg, &ag, &lbg, &eg, scaling, ranknum)
                .unwrap();
            let gc = Cpu
                .adalora_backward(&dyc, &xc, &hc, &wc, &ac, &lbc, &ec, scaling, ranknum)
                .unwrap();
            assert_tensor(be, &format!("{what} dx"), &g.dx, &gc.dx, 1e-5);
            assert_tensor(be, &format!("{what} dA"), &g.d_lora_a, &gc.d_lora_a, 1e-5);
            assert_tensor(be, &format!("{what} dB"), &g.d_lora_b, &gc.d_lora_b, 1e-5);
            assert_tensor(be, &format!("{what} dE"), &g.d_lora_e, &gc.d_lora_e, 1e-5);
            assert_ne!(
                be.download(&g.d_lora_e).unwrap()[r - 1],
                0.0,
                "{what}: dE of a masked rank"
            );
            let (mut wm, mut wmc) = (wg.clone(), wc.clone());
            be.adalora_merge(&mut wm, &ag, &lbg, &eg, scaling, ranknum, 1.0)
                .unwrap();
            Cpu.adalora_merge(&mut wmc, &ac, &lbc, &ec, scaling, ranknum, 1.0)
                .unwrap();
            assert_tensor(be, &format!("{what} merged"), &wm, &wmc, 1e-5);
            be.adalora_merge(&mut wm, &ag, &lbg, &eg, scaling, ranknum, -1.0)
                .unwrap();
            assert_tensor(be, &format!("{what} unmerged"), &wm, &wc, 1e-5);
        }
    }
}

#[test]
fn adalora_matches_cpu() {
    for (mode, be) in wgpu_modes("adalora_matches_cpu") {
        adalora_cases(&be, &format!("{mode}, full binding"));
    }
}

#[test]
fn tensors_wider_than_one_binding_are_split() {
    // 1 KiB bindings: the reductions and row scalings run over bound ranges of rows.
    let Ok(be) = Wgpu::with_max_binding(1024) else {
        let _ = wgpu("tensors_wider_than_one_binding_are_split");
        return;
    };
    assert!(be.max_binding() <= 1024);
    // T = 70 rows of dy and z: the column reduction of dm accumulates over row ranges
    dora_cases(&be, "1 KiB bindings", &[(70, 67, 70), (3, 130, 9)], &[7]);
    // a [130, 67] weight: 8710 values, row norms and merges in ranges of rows
    let (wc, wg) = rand_pair(&be, &[130, 67], 7);
    let sq = be.row_sq_norms(Base::Dense(&wg)).unwrap();
    assert_tensor(
        &be,
        "1 KiB row_sq_norms",
        &sq,
        &Cpu.row_sq_norms(Base::Dense(&wc)).unwrap(),
        1e-6,
    );
    adalora_cases(&be, "1 KiB bindings");
}

#[test]
fn bad_inputs_give_the_cpu_errors() {
    let Some(be) = wgpu("bad_inputs_give_the_cpu_errors") else {
        return;
    };
    let (t, din, dout, r) = (3, 10, 6, 2);
    let (xc, xg) = rand_pair(&be, &[t, din], 1);
    let (wc, wg) = rand_pair(&be, &[dout, din], 2);
    let (ac, ag) = rand_pair(&be, &[r, din], 3);
    let (lbc, lbg) = rand_pair(&be, &[dout, r], 4);
    let (bad_bc, bad_bg) = rand_pair(&be, &[dout + 1, r], 5);
    let (mc, mg) = positive_pair(&be, dout, 6);
    let (bad_mc, bad_mg) = positive_pair(&be, dout + 1, 7);
    let sqc = Cpu.row_sq_norms(Base::Dense(&wc)).unwrap();
    let sqg = be.row_sq_norms(Base::Dense(&wg)).unwrap();
    let nc = Cpu.dora_weight_norm(&wc, &sqc, &ac, &lbc, 1.0).unwrap();
    let ng = be.dora_weight_norm(&wg, &sqg, &ag, &lbg, 1.0).unwrap();

    same_error(
        "dora norm, bad lora_B",
        be.dora_weight_norm(&wg, &sqg, &ag, &bad_bg, 1.0),
        Cpu.dora_weight_norm(&wc, &sqc, &ac, &bad_bc, 1.0),
    );
    same_error(
        "dora norm, bad row norms",
        be.dora_weight_norm(&wg, &bad_mg, &ag, &lbg, 1.0),
        Cpu.dora_weight_norm(&wc, &bad_mc, &ac, &lbc, 1.0),
    );
    same_error(
        "dora forward, bad magnitude",
        be.dora_forward(&xg, &wg, None, &ag, &lbg, 1.0, &bad_mg, &ng),
        Cpu.dora_forward(&xc, &wc, None, &ac, &lbc, 1.0, &bad_mc, &nc),
    );
    same_error(
        "dora forward, bad bias",
        be.dora_forward(&xg, &wg, Some(&bad_mg), &ag, &lbg, 1.0, &mg, &ng),
        Cpu.dora_forward(&xc, &wc, Some(&bad_mc), &ac, &lbc, 1.0, &mc, &nc),
    );
    let (_, saved) = be
        .dora_forward(&xg, &wg, None, &ag, &lbg, 1.0, &mg, &ng)
        .unwrap();
    let (_, savedc) = Cpu
        .dora_forward(&xc, &wc, None, &ac, &lbc, 1.0, &mc, &nc)
        .unwrap();
    same_error(
        "dora backward, bad dy",
        be.dora_backward(&xg, &xg, &saved, &wg, &ag, &lbg, 1.0, &mg, &ng),
        Cpu.dora_backward(&xc, &xc, &savedc, &wc, &ac, &lbc, 1.0, &mc, &nc),
    );
    // an m / n that is zero is not invertible: unmerge refuses, naming the row
    let mut zm = be.download(&mg).unwrap();
    zm[4] = 0.0;
    let (zmc, zmg) = pair(&be, &zm, &[dout]);
    let (mut w1, mut w1c) = (wg.clone(), wc.clone());
    same_error(
        "dora unmerge, m = 0",
        be.dora_unmerge(&mut w1, &ag, &lbg, 1.0, &zmg, &ng),
        Cpu.dora_unmerge(&mut w1c, &ac, &lbc, 1.0, &zmc, &nc),
    );
    assert_tensor(&be, "failed unmerge leaves W", &w1, &wc, 0.0);

    // VeRA: projections narrower than the layer, a wrong lambda
    let (vac, vag) = rand_pair(&be, &[r, din - 1], 8);
    let (vbc, vbg) = rand_pair(&be, &[dout, r], 9);
    let (ldc, ldg) = rand_pair(&be, &[r], 10);
    let (lbv_c, lbv_g) = rand_pair(&be, &[dout], 11);
    same_error(
        "vera forward, max_in < in",
        be.vera_forward(&xg, &wg, None, &vag, &vbg, &ldg, &lbv_g),
        Cpu.vera_forward(&xc, &wc, None, &vac, &vbc, &ldc, &lbv_c),
    );
    let (va2c, va2g) = rand_pair(&be, &[r, din + 2], 12);
    same_error(
        "vera merge, bad lambda_b",
        be.vera_merge(&mut wg.clone(), &va2g, &vbg, &ldg, &ldg, 1.0),
        Cpu.vera_merge(&mut wc.clone(), &va2c, &vbc, &ldc, &ldc, 1.0),
    );
    same_error(
        "vera backward, bad h",
        be.vera_backward(&xg, &xg, &xg, &wg, &va2g, &vbg, &ldg, &lbv_g),
        Cpu.vera_backward(&xc, &xc, &xc, &wc, &va2c, &vbc, &ldc, &lbv_c),
    );

    // AdaLoRA: E of the wrong shape, a ranknum that is not positive
    let (ec, eg) = rand_pair(&be, &[r, 1], 13);
    let (bad_ec, bad_eg) = rand_pair(&be, &[r + 1, 1], 14);
    same_error(
        "adalora forward, bad E",
        be.adalora_forward(&xg, &wg, None, &ag, &lbg, &bad_eg, 8.0, 2.0),
        Cpu.adalora_forward(&xc, &wc, None, &ac, &lbc, &bad_ec, 8.0, 2.0),
    );
    same_error(
        "adalora merge, ranknum 0",
        be.adalora_merge(&mut wg.clone(), &ag, &lbg, &eg, 8.0, 0.0, 1.0),
        Cpu.adalora_merge(&mut wc.clone(), &ac, &lbc, &ec, 8.0, 0.0, 1.0),
    );
    same_error(
        "adalora backward, bad dy",
        be.adalora_backward(&wg, &xg, &xg, &wg, &ag, &lbg, &eg, 8.0, 2.0),
        Cpu.adalora_backward(&wc, &xc, &xc, &wc, &ac, &lbc, &ec, 8.0, 2.0),
    );
}
