//! Error contracts: bad input fails on every backend with the CPU's error (the checks of
//! `src/backend/check.rs`, run before any kernel), and a failed in-place op changes nothing.
//! These run on the CPU too (against itself: that it fails at all, and with what).

use super::attention::spans;
use super::harness::*;
use crate::per_method::PerMethod;
use lorafuse::backend::{Activation, AdamWParams, Axis, Base, LowRank};
use lorafuse::quant::nf4::quantize_nf4;
use lorafuse::{Backend, Cpu};

/// `(T, in, out, r)` over which the old CUDA test checked the per-case errors.
const CASES: [(usize, usize, usize, usize); 5] = [
    (1, 37, 29, 1),
    (3, 61, 45, 7),
    (17, 37, 29, 64),
    (130, 83, 67, 16),
    (8, 136, 72, 5),
];

fn p0() -> AdamWParams {
    AdamWParams {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 0,
    }
}

pub fn memory<B: Backend>(be: &B, tol: &Tol) {
    same_error(
        "upload, 3 values for [2, 2]",
        Cpu.upload(&[1.0; 3], &[2, 2]),
        be.upload(&[1.0; 3], &[2, 2]),
    );
    same_error(
        "upload, 131 values for [130]",
        Cpu.upload(&[1.0; 131], &[130]),
        be.upload(&[1.0; 131], &[130]),
    );
    let t = rand(be, tol, &[4, 3], 1, 1.0);
    same_error(
        "gather index",
        Cpu.gather_rows(&t.c, &[0, 4]),
        be.gather_rows(&t.g, &[0, 4]),
    );
    let table = rand(be, tol, &[11, 13], 2, 1.0);
    same_error(
        "gather index 11 of 11 rows",
        Cpu.gather_rows(&table.c, &[11]),
        be.gather_rows(&table.g, &[11]),
    );
    let src = rand(be, tol, &[2, 3], 2, 1.0);
    let mut d = t.clone();
    same_error(
        "scatter index",
        Cpu.scatter_add_rows(&mut d.c, &[1, 9], &src.c),
        be.scatter_add_rows(&mut d.g, &[1, 9], &src.g),
    );
    same_error(
        "scatter src rows",
        Cpu.scatter_add_rows(&mut d.c, &[1], &src.c),
        be.scatter_add_rows(&mut d.g, &[1], &src.g),
    );
    let src5 = rand(be, tol, &[5, 13], 3, 1.0);
    let mut d2 = table.clone();
    same_error(
        "scatter, 2 indices for 5 rows",
        Cpu.scatter_add_rows(&mut d2.c, &[1, 2], &src5.c),
        be.scatter_add_rows(&mut d2.g, &[1, 2], &src5.g),
    );
    // nothing was changed by the failed scatters
    bits_t(be, "failed scatter leaves dst", &d.g, &t.c);
    bits_t(be, "failed scatter leaves dst (2)", &d2.g, &table.c);
    let mut a = rand(be, tol, &[7, 9], 4, 1.0);
    let wrong = rand(be, tol, &[9, 7], 5, 1.0);
    same_shape_error(
        "axpy, shapes that differ",
        Cpu.axpy(&mut a.c, 1.0, &wrong.c),
        be.axpy(&mut a.g, 1.0, &wrong.g),
    );
    let mut dst = rand(be, tol, &[9, 7], 6, 1.0);
    same_shape_error(
        "copy_into, shapes that differ",
        Cpu.copy_into(&a.c, &mut dst.c),
        be.copy_into(&a.g, &mut dst.g),
    );
}

pub fn dense<B: Backend>(be: &B, tol: &Tol) {
    let w = rand(be, tol, &[3, 10], 1, 1.0);
    let bad_x = rand(be, tol, &[1, 9], 1, 1.0);
    let (c, g) = (
        Cpu.linear(&bad_x.c, &w.c, None),
        be.linear(&bad_x.g, &w.g, None),
    );
    ensure(
        g.as_ref().is_err_and(|e| e.to_string().contains("`w`")),
        || format!("linear, bad x: {g:?}"),
    );
    same_error("linear, bad x", c, g);
    let a = rand(be, tol, &[4, 10], 2, 1.0);
    let bad_bias = pair(be, tol, &[0.0; 4], &[4]);
    let (c, g) = (
        Cpu.linear(&a.c, &w.c, Some(&bad_bias.c)),
        be.linear(&a.g, &w.g, Some(&bad_bias.g)),
    );
    ensure(
        g.as_ref().is_err_and(|e| e.to_string().contains("bias")),
        || format!("linear, bad bias: {g:?}"),
    );
    same_error("linear, bad bias", c, g);
    for (i, &(t, din, dout, _)) in CASES.iter().enumerate() {
        let x = rand(be, tol, &[t, din], 10 + i as u64, 1.0);
        // w given as W^T [in, out]: its in-dim is x's only when in == out (none here)
        let wt = rand(be, tol, &[din, dout], 20 + i as u64, 0.3);
        same_shape_error(
            &format!("linear, W^T for W ({t}x{din}->{dout})"),
            Cpu.linear(&x.c, &wt.c, None),
            be.linear(&x.g, &wt.g, None),
        );
    }
}

pub fn lowrank<B: Backend>(be: &B, tol: &Tol) {
    let (t, din, dout, r) = (3, 10, 6, 2);
    let x = rand(be, tol, &[t, din], 1, 1.0);
    let w = rand(be, tol, &[dout, din], 2, 1.0);
    let a = rand(be, tol, &[r, din], 3, 1.0);
    let lb = rand(be, tol, &[dout, r], 4, 1.0);
    let bad_b = rand(be, tol, &[dout + 1, r], 5, 1.0);
    let m = positive(be, tol, dout, 6);
    let bad_m = positive(be, tol, dout + 1, 7);
    let sqc = Cpu.row_sq_norms(Base::Dense(&w.c)).unwrap();
    let sq = from_cpu(be, tol, &sqc);
    let nc = Cpu.dora_weight_norm(&w.c, &sq.c, &a.c, &lb.c, 1.0).unwrap();
    let n = from_cpu(be, tol, &nc);

    same_error(
        "dora norm, bad lora_B",
        Cpu.dora_weight_norm(&w.c, &sq.c, &a.c, &bad_b.c, 1.0),
        be.dora_weight_norm(&w.g, &sq.g, &a.g, &bad_b.g, 1.0),
    );
    same_error(
        "dora norm, bad row norms",
        Cpu.dora_weight_norm(&w.c, &bad_m.c, &a.c, &lb.c, 1.0),
        be.dora_weight_norm(&w.g, &bad_m.g, &a.g, &lb.g, 1.0),
    );
    same_error(
        "dora forward, bad magnitude",
        Cpu.dora_forward(&x.c, &w.c, None, &a.c, &lb.c, 1.0, &bad_m.c, &n.c),
        be.dora_forward(&x.g, &w.g, None, &a.g, &lb.g, 1.0, &bad_m.g, &n.g),
    );
    same_error(
        "dora forward, bad bias",
        Cpu.dora_forward(&x.c, &w.c, Some(&bad_m.c), &a.c, &lb.c, 1.0, &m.c, &n.c),
        be.dora_forward(&x.g, &w.g, Some(&bad_m.g), &a.g, &lb.g, 1.0, &m.g, &n.g),
    );
    let (_, saved) = be
        .dora_forward(&x.g, &w.g, None, &a.g, &lb.g, 1.0, &m.g, &n.g)
        .unwrap();
    let (_, saved_c) = Cpu
        .dora_forward(&x.c, &w.c, None, &a.c, &lb.c, 1.0, &m.c, &n.c)
        .unwrap();
    same_error(
        "dora backward, bad dy",
        Cpu.dora_backward(&x.c, &x.c, &saved_c, &w.c, &a.c, &lb.c, 1.0, &m.c, &n.c),
        be.dora_backward(&x.g, &x.g, &saved, &w.g, &a.g, &lb.g, 1.0, &m.g, &n.g),
    );
    // an m / n that is zero is not invertible: unmerge refuses, naming the row
    let mut zm = be.download(&m.g).unwrap();
    zm[4] = 0.0;
    let zm = pair(be, tol, &zm, &[dout]);
    let mut w1 = w.clone();
    same_arg_error(
        "dora unmerge, m = 0",
        Cpu.dora_unmerge(&mut w1.c, &a.c, &lb.c, 1.0, &zm.c, &n.c),
        be.dora_unmerge(&mut w1.g, &a.g, &lb.g, 1.0, &zm.g, &n.g),
    );
    bits_t(be, "failed unmerge leaves W", &w1.g, &w.c);

    // VeRA: projections narrower than the layer, a wrong lambda
    let va = rand(be, tol, &[r, din - 1], 8, 1.0);
    let vb = rand(be, tol, &[dout, r], 9, 1.0);
    let ld = rand(be, tol, &[r], 10, 1.0);
    let lbv = rand(be, tol, &[dout], 11, 1.0);
    same_shape_error(
        "vera forward, max_in < in",
        Cpu.vera_forward(&x.c, &w.c, None, &va.c, &vb.c, &ld.c, &lbv.c),
        be.vera_forward(&x.g, &w.g, None, &va.g, &vb.g, &ld.g, &lbv.g),
    );
    let va2 = rand(be, tol, &[r, din + 2], 12, 1.0);
    same_error(
        "vera merge, bad lambda_b",
        Cpu.vera_merge(&mut w.c.clone(), &va2.c, &vb.c, &ld.c, &ld.c, 1.0),
        be.vera_merge(&mut w.g.clone(), &va2.g, &vb.g, &ld.g, &ld.g, 1.0),
    );
    same_error(
        "vera backward, bad h",
        Cpu.vera_backward(&x.c, &x.c, &x.c, &w.c, &va2.c, &vb.c, &ld.c, &lbv.c),
        be.vera_backward(&x.g, &x.g, &x.g, &w.g, &va2.g, &vb.g, &ld.g, &lbv.g),
    );

    // AdaLoRA: E of the wrong shape, a ranknum that is not positive
    let e = rand(be, tol, &[r, 1], 13, 1.0);
    let bad_e = rand(be, tol, &[r + 1, 1], 14, 1.0);
    same_error(
        "adalora forward, bad E",
        Cpu.adalora_forward(&x.c, &w.c, None, &a.c, &lb.c, &bad_e.c, 8.0, 2.0),
        be.adalora_forward(&x.g, &w.g, None, &a.g, &lb.g, &bad_e.g, 8.0, 2.0),
    );
    same_arg_error(
        "adalora merge, ranknum 0",
        Cpu.adalora_merge(&mut w.c.clone(), &a.c, &lb.c, &e.c, 8.0, 0.0, 1.0),
        be.adalora_merge(&mut w.g.clone(), &a.g, &lb.g, &e.g, 8.0, 0.0, 1.0),
    );
    same_error(
        "adalora backward, bad dy",
        Cpu.adalora_backward(&w.c, &x.c, &x.c, &w.c, &a.c, &lb.c, &e.c, 8.0, 2.0),
        be.adalora_backward(&w.g, &x.g, &x.g, &w.g, &a.g, &lb.g, &e.g, 8.0, 2.0),
    );

    // over the old CUDA grid: a mismatched B, r = 0, a zero magnitude, a short magnitude, a
    // VeRA projection narrower than the layer, ranknum 0
    for (i, &(t, din, dout, r)) in CASES.iter().enumerate() {
        let s = 100 * i as u64;
        let what = format!("{t}x{din}->{dout} r={r}");
        let x = rand(be, tol, &[t, din], s, 1.0);
        let w = rand(be, tol, &[dout, din], s + 1, 0.3);
        let a = rand(be, tol, &[r, din], s + 2, 0.3);
        let b = rand(be, tol, &[dout, r], s + 3, 0.3);
        let sc = 2.0 / r as f32;
        let b_bad = pair(be, tol, &vec![0.0; (dout + 1) * r], &[dout + 1, r]);
        same_shape_error(
            &format!("{what} lora, mismatched B"),
            Cpu.lora_forward(&x.c, &w.c, None, &a.c, &b_bad.c, sc),
            be.lora_forward(&x.g, &w.g, None, &a.g, &b_bad.g, sc),
        );
        let a0 = pair(be, tol, &[], &[0, din]);
        let b0 = pair(be, tol, &[], &[dout, 0]);
        same_error(
            &format!("{what} lora, r = 0"),
            Cpu.lora_forward(&x.c, &w.c, None, &a0.c, &b0.c, sc),
            be.lora_forward(&x.g, &w.g, None, &a0.g, &b0.g, sc),
        );
        let n = positive(be, tol, dout, s + 4);
        let m0 = pair(be, tol, &vec![0.0; dout], &[dout]);
        let (mut wg, mut wc) = (w.g.clone(), w.c.clone());
        same_arg_error(
            &format!("{what} dora unmerge, m = 0"),
            Cpu.dora_unmerge(&mut wc, &a.c, &b.c, 0.5, &m0.c, &n.c),
            be.dora_unmerge(&mut wg, &a.g, &b.g, 0.5, &m0.g, &n.g),
        );
        let short = pair(be, tol, &vec![0.0; dout + 1], &[dout + 1]);
        same_error(
            &format!("{what} dora forward, short magnitude"),
            Cpu.dora_forward(&x.c, &w.c, None, &a.c, &b.c, 0.5, &short.c, &n.c),
            be.dora_forward(&x.g, &w.g, None, &a.g, &b.g, 0.5, &short.g, &n.g),
        );
        let small_a = pair(be, tol, &vec![0.0; r * (din - 1)], &[r, din - 1]);
        let vb = rand(be, tol, &[dout + 3, r], s + 5, 0.3);
        let ld = rand(be, tol, &[r], s + 6, 1.0);
        let lbv = rand(be, tol, &[dout], s + 7, 1.0);
        same_shape_error(
            &format!("{what} vera forward, max_in < in"),
            Cpu.vera_forward(&x.c, &w.c, None, &small_a.c, &vb.c, &ld.c, &lbv.c),
            be.vera_forward(&x.g, &w.g, None, &small_a.g, &vb.g, &ld.g, &lbv.g),
        );
        let e = rand(be, tol, &[r, 1], s + 8, 1.0);
        same_arg_error(
            &format!("{what} adalora forward, ranknum 0"),
            Cpu.adalora_forward(&x.c, &w.c, None, &a.c, &b.c, &e.c, 8.0, 0.0),
            be.adalora_forward(&x.g, &w.g, None, &a.g, &b.g, &e.g, 8.0, 0.0),
        );
    }
}

pub fn nf4<B: Backend>(be: &B, tol: &Tol) {
    let q = quantize_nf4(&vals(60, 1, 1.0), &[6, 10], 64, true).unwrap();
    let (wg, wc) = (be.upload_nf4(&q).unwrap(), Cpu.upload_nf4(&q).unwrap());
    let x = rand(be, tol, &[3, 9], 2, 1.0);
    same_error(
        "nf4 linear, bad x",
        Cpu.nf4_linear(&x.c, &wc, None),
        be.nf4_linear(&x.g, &wg, None),
    );
    let x2 = rand(be, tol, &[3, 10], 3, 1.0);
    same_error(
        "nf4 linear, bad bias",
        Cpu.nf4_linear(&x2.c, &wc, Some(&x2.c)),
        be.nf4_linear(&x2.g, &wg, Some(&x2.g)),
    );
    same_error(
        "nf4 backward, bad dy",
        Cpu.nf4_linear_backward_input(&x2.c, &wc, None),
        be.nf4_linear_backward_input(&x2.g, &wg, None),
    );
    let dy = rand(be, tol, &[3, 6], 4, 1.0);
    let mut acc = rand(be, tol, &[2, 10], 5, 1.0);
    same_error(
        "nf4 backward, bad acc",
        Cpu.nf4_linear_backward_input(&dy.c, &wc, Some(&mut acc.c)),
        be.nf4_linear_backward_input(&dy.g, &wg, Some(&mut acc.g)),
    );
    let a = rand(be, tol, &[2, 10], 6, 1.0);
    let b = rand(be, tol, &[5, 2], 7, 1.0);
    let sq = rand(be, tol, &[6], 8, 1.0);
    same_error(
        "nf4 dora norm, bad lora_B",
        Cpu.nf4_dora_weight_norm(&wc, &sq.c, &a.c, &b.c, 1.0),
        be.nf4_dora_weight_norm(&wg, &sq.g, &a.g, &b.g, 1.0),
    );
    let flat = quantize_nf4(&vals(60, 9, 1.0), &[60], 64, false).unwrap();
    same_error(
        "nf4 upload, 1-D",
        Cpu.upload_nf4(&flat),
        be.upload_nf4(&flat),
    );
    // x one wider than the weight, over NF4 weights of the old CUDA grid
    for (k, (dout, din, bs, dq)) in [(29, 37, 64, false), (67, 83, 64, true)]
        .into_iter()
        .enumerate()
    {
        let q = quantize_nf4(
            &vals(dout * din, 5000 + k as u64, 0.5),
            &[dout, din],
            bs,
            dq,
        )
        .unwrap();
        let (wg, wc) = (be.upload_nf4(&q).unwrap(), Cpu.upload_nf4(&q).unwrap());
        let xbad = pair(be, tol, &vec![0.0; 2 * (din + 1)], &[2, din + 1]);
        same_error(
            &format!("nf4 [{dout}, {din}] linear, x too wide"),
            Cpu.linear_lowrank(&xbad.c, Base::Nf4(&wc), None, None),
            be.linear_lowrank(&xbad.g, Base::Nf4(&wg), None, None),
        );
        let x = rand(be, tol, &[2, din], 3, 1.0);
        let a = rand(be, tol, &[3, din], 1, 0.3);
        let b = rand(be, tol, &[dout + 1, 3], 2, 0.3);
        let (tc, tg) = (
            LowRank::lora(&a.c, &b.c, 1.0),
            LowRank::lora(&a.g, &b.g, 1.0),
        );
        same_shape_error(
            &format!("nf4 [{dout}, {din}] fused lora, mismatched B"),
            Cpu.linear_lowrank(&x.c, Base::Nf4(&wc), None, Some(&tc)),
            be.linear_lowrank(&x.g, Base::Nf4(&wg), None, Some(&tg)),
        );
    }
}

pub fn model<B: Backend>(be: &B, tol: &Tol) {
    let t = rand(be, tol, &[4, 3], 1, 1.0);
    let w = rand(be, tol, &[4], 3, 1.0);
    same_error(
        "rmsnorm weight",
        Cpu.rmsnorm(&t.c, &w.c, 1e-5),
        be.rmsnorm(&t.g, &w.g, 1e-5),
    );
    let rs = rand(be, tol, &[3], 4, 1.0);
    same_error(
        "rmsnorm_backward rstd",
        Cpu.rmsnorm_backward(&t.c, &t.c, &w.c, &rs.c, None),
        be.rmsnorm_backward(&t.g, &t.g, &w.g, &rs.g, None),
    );
    let mut x = rand(be, tol, &[2, 12], 5, 1.0);
    same_error(
        "rope odd head_dim",
        Cpu.rope(&mut x.c, &[0, 1], 3, 1e4, false),
        be.rope(&mut x.g, &[0, 1], 3, 1e4, false),
    );
    same_error(
        "rope positions",
        Cpu.rope(&mut x.c, &[0], 4, 1e4, false),
        be.rope(&mut x.g, &[0], 4, 1e4, false),
    );
    let mut x5 = rand(be, tol, &[5, 24], 6, 1.0);
    same_error(
        "rope, one position short",
        Cpu.rope(&mut x5.c, &[0, 1, 2, 3], 8, 1e4, false),
        be.rope(&mut x5.g, &[0, 1, 2, 3], 8, 1e4, false),
    );
    for (name, labels) in [
        ("cross_entropy label", &[0, 1, 3, -100][..]),
        ("cross_entropy label count", &[0, 1][..]),
    ] {
        same_error(
            name,
            Cpu.cross_entropy(&t.c, labels, 1.0),
            be.cross_entropy(&t.g, labels, 1.0),
        );
        same_error(
            &format!("{name} (stats)"),
            Cpu.cross_entropy_stats(&t.c, labels, 1.0),
            be.cross_entropy_stats(&t.g, labels, 1.0),
        );
    }
    for (n, vocab) in [(1usize, 37usize), (17, 64), (130, 83)] {
        let l = rand(be, tol, &[n, vocab], 7, 2.0);
        let bad = vec![vocab as i32; n];
        same_error(
            &format!("cross_entropy {n}x{vocab}, label = vocab"),
            Cpu.cross_entropy(&l.c, &bad, 1.0),
            be.cross_entropy(&l.g, &bad, 1.0),
        );
        same_error(
            &format!("cross_entropy_stats {n}x{vocab}, label = vocab"),
            Cpu.cross_entropy_stats(&l.c, &bad, 1.0),
            be.cross_entropy_stats(&l.g, &bad, 1.0),
        );
    }
}

pub fn attention<B: Backend>(be: &B, tol: &Tol) {
    let q = rand(be, tol, &[4, 12], 6, 1.0);
    let k = rand(be, tol, &[4, 4], 7, 1.0);
    let seqs = spans(&[(0, 4)]);
    same_error(
        "attention heads",
        Cpu.attention(&q.c, &k.c, &k.c, &seqs, 3, 2, 0.5),
        be.attention(&q.g, &k.g, &k.g, &seqs, 3, 2, 0.5),
    );
    same_error(
        "attention kv width",
        Cpu.attention(&q.c, &k.c, &k.c, &seqs, 2, 1, 0.5),
        be.attention(&q.g, &k.g, &k.g, &seqs, 2, 1, 0.5),
    );
    let far = spans(&[(2, 3)]);
    same_error(
        "attention span",
        Cpu.attention(&q.c, &k.c, &k.c, &far, 3, 1, 0.5),
        be.attention(&q.g, &k.g, &k.g, &far, 3, 1, 0.5),
    );
    let saved = be.attention(&q.g, &k.g, &k.g, &seqs, 3, 1, 0.5).unwrap();
    let saved_c = Cpu.attention(&q.c, &k.c, &k.c, &seqs, 3, 1, 0.5).unwrap();
    same_error(
        "attention_backward d_out",
        Cpu.attention_backward(&k.c, &q.c, &k.c, &k.c, &saved_c, &seqs, 3, 1, 0.5),
        be.attention_backward(&k.g, &q.g, &k.g, &k.g, &saved, &seqs, 3, 1, 0.5),
    );
    // spans past the end, over the old CUDA grid's heads
    for (hq, hkv, hd) in [(4usize, 2usize, 16usize), (3, 1, 64), (2, 2, 160)] {
        let q = rand(be, tol, &[48, hq * hd], 1, 1.0);
        let k = rand(be, tol, &[48, hkv * hd], 2, 1.0);
        let bad = spans(&[(40, 9)]);
        let scale = 1.0 / (hd as f32).sqrt();
        same_error(
            &format!("attention {hq}/{hkv} hd={hd}, span past the end"),
            Cpu.attention(&q.c, &k.c, &k.c, &bad, hq, hkv, scale),
            be.attention(&q.g, &k.g, &k.g, &bad, hq, hkv, scale),
        );
        let ok = spans(&[(0, 48)]);
        same_error(
            &format!("attention_cached {hq}/{hkv} hd={hd}, pair lists of different lengths"),
            Cpu.attention_cached(&q.c, &k.c, &k.c, &bad, &[ok[0], ok[0]], hq, hkv, scale),
            be.attention_cached(&q.g, &k.g, &k.g, &bad, &[ok[0], ok[0]], hq, hkv, scale),
        );
    }
}

pub fn adamw<B: Backend>(be: &B, tol: &Tol) {
    for shape in [&[4usize, 10][..], &[1, 37], &[17, 64]] {
        let mut p = rand(be, tol, shape, 1, 1.0);
        let g = rand(be, tol, shape, 2, 1.0);
        let (mut mg, mut mc) = (be.zeros(shape).unwrap(), Cpu.zeros(shape).unwrap());
        let (mut vg, mut vc) = (be.zeros(shape).unwrap(), Cpu.zeros(shape).unwrap());
        same_error(
            &format!("adamw {shape:?}, step 0"),
            Cpu.adamw_step(&mut p.c, &g.c, &mut mc, &mut vc, &p0()),
            be.adamw_step(&mut p.g, &g.g, &mut mg, &mut vg, &p0()),
        );
    }
}

pub fn adalora<B: Backend>(be: &B, tol: &Tol) {
    let p = rand(be, tol, &[3, 4], 1, 1.0);
    let q = rand(be, tol, &[4, 3], 2, 1.0);
    let mut i = rand(be, tol, &[3, 4], 3, 1.0);
    let mut u = rand(be, tol, &[3, 4], 4, 1.0);
    same_error(
        "update_ipt, grad of another shape",
        Cpu.adalora_update_ipt(&p.c, &q.c, &mut i.c, &mut u.c, 0.85, 0.85),
        be.adalora_update_ipt(&p.g, &q.g, &mut i.g, &mut u.g, 0.85, 0.85),
    );
    same_error(
        "update_ipt, beta2 = 1",
        Cpu.adalora_update_ipt(&p.c, &p.c, &mut i.c, &mut u.c, 0.85, 1.0),
        be.adalora_update_ipt(&p.g, &p.g, &mut i.g, &mut u.g, 0.85, 1.0),
    );
    let ema = |r: usize, din: usize, dout: usize, s: u64| {
        let p = |shape: &[usize], k: u64| nonneg(be, tol, shape, s + k);
        let [ia, ua, ib, ub, ie, ue] = [
            p(&[r, din], 1),
            p(&[r, din], 2),
            p(&[dout, r], 3),
            p(&[dout, r], 4),
            p(&[r, 1], 5),
            p(&[r, 1], 6),
        ];
        (
            lorafuse::backend::AdaLoraIpt {
                ipt_a: ia.c,
                unc_a: ua.c,
                ipt_b: ib.c,
                unc_b: ub.c,
                ipt_e: ie.c,
                unc_e: ue.c,
            },
            lorafuse::backend::AdaLoraIpt {
                ipt_a: ia.g,
                unc_a: ua.g,
                ipt_b: ib.g,
                unc_b: ub.g,
                ipt_e: ie.g,
                unc_e: ue.g,
            },
        )
    };
    let (ec, eg) = ema(3, 4, 5, 9);
    let mut sc = rand(be, tol, &[6], 5, 1.0);
    same_error(
        "triplet scores beyond the buffer",
        Cpu.adalora_triplet_scores(&ec, &mut sc.c, 4),
        be.adalora_triplet_scores(&eg, &mut sc.g, 4),
    );
    let (mut bad_c, mut bad_g) = (ec.clone(), eg.clone());
    bad_c.unc_b = Cpu.zeros(&[5, 2]).unwrap();
    bad_g.unc_b = be.zeros(&[5, 2]).unwrap();
    same_error(
        "triplet scores, EMAs that disagree",
        Cpu.adalora_triplet_scores(&bad_c, &mut sc.c, 0),
        be.adalora_triplet_scores(&bad_g, &mut sc.g, 0),
    );
    for k in [0, 7] {
        same_error(
            &format!("kthvalue k = {k}"),
            Cpu.adalora_threshold(&sc.c, k),
            be.adalora_threshold(&sc.g, k),
        );
    }
    same_error(
        "rank mask, threshold of 2 values",
        Cpu.adalora_rank_mask(&sc.c, &sc.c),
        be.adalora_rank_mask(&sc.g, &sc.g),
    );
    let mut e2 = rand(be, tol, &[3], 6, 1.0);
    same_error(
        "apply mask, E not [r, 1]",
        Cpu.adalora_apply_mask(&mut e2.c, &sc.c, 0),
        be.adalora_apply_mask(&mut e2.g, &sc.g, 0),
    );
    let mut e3 = rand(be, tol, &[3, 1], 7, 1.0);
    same_error(
        "apply mask beyond the keep-mask",
        Cpu.adalora_apply_mask(&mut e3.c, &sc.c, 5),
        be.adalora_apply_mask(&mut e3.g, &sc.g, 5),
    );
    let mut ga = rand(be, tol, &[3, 4], 8, 1.0);
    let mut gb = rand(be, tol, &[4, 3], 9, 1.0);
    same_error(
        "orth reg, a negative weight",
        Cpu.adalora_orth_reg(&[(&p.c, &q.c)], &mut [(&mut ga.c, &mut gb.c)], -0.5),
        be.adalora_orth_reg(&[(&p.g, &q.g)], &mut [(&mut ga.g, &mut gb.g)], -0.5),
    );
    same_error(
        "orth reg, more layers than gradients",
        Cpu.adalora_orth_reg(
            &[(&p.c, &q.c), (&p.c, &q.c)],
            &mut [(&mut ga.c, &mut gb.c)],
            0.5,
        ),
        be.adalora_orth_reg(
            &[(&p.g, &q.g), (&p.g, &q.g)],
            &mut [(&mut ga.g, &mut gb.g)],
            0.5,
        ),
    );
    same_error(
        "orth reg, grad_B of another shape",
        Cpu.adalora_orth_reg(&[(&p.c, &q.c)], &mut [(&mut ga.c, &mut u.c)], 0.5),
        be.adalora_orth_reg(&[(&p.g, &q.g)], &mut [(&mut ga.g, &mut u.g)], 0.5),
    );
    // over the old CUDA grid: scores past the buffer, k past the end
    for (i, &(_, din, dout, r)) in CASES.iter().enumerate() {
        let (ec, eg) = ema(r, din, dout, 9000 + 100 * i as u64);
        let mut sc = rand(be, tol, &[r + 8], 40 + i as u64, 1.0);
        same_error(
            &format!("triplet scores r={r} at 9 of {}", r + 8),
            Cpu.adalora_triplet_scores(&ec, &mut sc.c, 9),
            be.adalora_triplet_scores(&eg, &mut sc.g, 9),
        );
    }
    for n in [1usize, 7, 256, 257, 3001] {
        let s = rand(be, tol, &[n], n as u64, 1.0);
        same_error(
            &format!("kthvalue n={n} k={}", n + 1),
            Cpu.adalora_threshold(&s.c, n + 1),
            be.adalora_threshold(&s.g, n + 1),
        );
    }
}

/// The per-axis and softmax contracts: a vector of the wrong length, a 1-D operand, operands of
/// different shapes.
pub fn pointwise<B: Backend>(be: &B, tol: &Tol) {
    let x = rand(be, tol, &[4, 3], 1, 1.0);
    let v4 = rand(be, tol, &[4], 2, 1.0);
    let v3 = rand(be, tol, &[3], 3, 1.0);
    same_error(
        "mul_vector cols with [4] for [4, 3]",
        Cpu.mul_vector(&x.c, &v4.c, Axis::Cols),
        be.mul_vector(&x.g, &v4.g, Axis::Cols),
    );
    same_error(
        "mul_vector rows with [3] for [4, 3]",
        Cpu.mul_vector(&x.c, &v3.c, Axis::Rows),
        be.mul_vector(&x.g, &v3.g, Axis::Rows),
    );
    same_error(
        "mul_vector of a 1-D x",
        Cpu.mul_vector(&v4.c, &v4.c, Axis::Cols),
        be.mul_vector(&v4.g, &v4.g, Axis::Cols),
    );
    let y = rand(be, tol, &[3, 4], 4, 1.0);
    same_error(
        "sum_product of [4, 3] and [3, 4]",
        Cpu.sum_product(&x.c, Some(&y.c), Axis::Cols),
        be.sum_product(&x.g, Some(&y.g), Axis::Cols),
    );
    same_error(
        "sum_product of a 1-D a",
        Cpu.sum_product(&v4.c, None, Axis::Rows),
        be.sum_product(&v4.g, None, Axis::Rows),
    );
    same_error(
        "activation_backward shapes",
        Cpu.activation_backward(&x.c, &y.c, Activation::Relu),
        be.activation_backward(&x.g, &y.g, Activation::Relu),
    );
    same_error(
        "softmax_rows of a 1-D x",
        Cpu.softmax_rows(&v4.c),
        be.softmax_rows(&v4.g),
    );
    same_error(
        "softmax_rows_backward shapes",
        Cpu.softmax_rows_backward(&x.c, &y.c),
        be.softmax_rows_backward(&x.g, &y.g),
    );
}
