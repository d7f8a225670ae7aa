//! QLoRA / QDoRA on the CPU reference: the NF4 kernels against the dense kernels over the
//! dequantized weight (odd shapes, T = 1, `out` not a multiple of the tile, blocksize 64 and
//! 256, with and without double quant), the adapters over an NF4 base against the same adapters
//! over the dequantized dense base, their backwards against central finite differences, the
//! memory of an NF4 base, and the errors.

use lorafuse::adapter::{BaseWeight, DoraLayer, DoraLayerSaved, DoraSaved, Linear, LoraLayer};
use lorafuse::backend::{Backend, Base, LowRank};
use lorafuse::quant::nf4::quantize_nf4;
use lorafuse::{Cpu, Tensor};

#[path = "common/fd.rs"]
mod fd;
#[path = "common/per_method.rs"]
mod per_method;
use fd::*;
use per_method::PerMethod;

fn t(data: &[f32], shape: &[usize]) -> Tensor<Cpu> {
    Cpu.from_vec(data.to_vec(), shape).unwrap()
}

/// An NF4 base `[out, in]` quantized from deterministic values, and its dense dequantized twin.
fn bases(dout: usize, din: usize, bs: usize, dq: bool, seed: u64) -> (Linear<Cpu>, Linear<Cpu>) {
    let w: Vec<f32> = vals(dout * din, seed).iter().map(|v| 0.1 * v).collect();
    let q = quantize_nf4(&w, &[dout, din], bs, dq).unwrap();
    let nf4 = Linear::nf4(&Cpu, &q).unwrap();
    let dense = Linear::dense(t(&q.dequantize(), &[dout, din])).unwrap();
    (nf4, dense)
}

/// Asserts `|got - want| <= tol * (1 + max|want|)` and prints the worst difference.
fn assert_near(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = 1.0 + want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        worst = worst.max(err);
        assert!(
            err <= tol * scale,
            "{what}[{i}]: {g:e} vs {w:e} (|diff| {err:e}, scale {scale})"
        );
    }
    println!(
        "{what}: {} values, max |diff| {worst:.2e} (scale {scale:.1})",
        got.len()
    );
}

/// `(T, out, in, blocksize, double quant)`: T = 1, odd sizes, an `out` below / above / not a
/// multiple of the tile rows (16..=256, a multiple of 16), several backward waves, a small
/// `out` with a large T (the GEMM, not the tiles, is parallel), and T >= 64 with the larger
/// many-token tiles (a ragged last tile; two backward waves).
const SHAPES: &[(usize, usize, usize, usize, bool)] = &[
    (1, 1, 1, 64, false),
    (1, 48, 64, 64, true),
    (5, 48, 64, 64, true),
    (3, 300, 70, 64, true),
    (1, 257, 33, 256, false),
    (2, 513, 33, 256, true),
    (7, 1000, 1030, 256, true),
    (4, 1001, 1030, 64, false),
    (600, 20, 64, 64, true),
    (17, 37, 129, 256, false),
    (70, 300, 70, 64, true),
    (96, 1001, 1030, 64, false),
];

#[test]
fn nf4_linear_equals_dense_linear_over_the_dequantized_weight() {
    for (case, &(tk, dout, din, bs, dq)) in SHAPES.iter().enumerate() {
        let (nf4, dense) = bases(dout, din, bs, dq, 10 + case as u64);
        let x = t(&vals(tk * din, 20 + case as u64), &[tk, din]);
        let bias = t(&vals(dout, 30 + case as u64), &[dout]);
        let BaseWeight::Nf4(w) = &nf4.weight else {
            panic!("an NF4 base")
        };
        let BaseWeight::Dense(wd) = &dense.weight else {
            panic!("a dense base")
        };
        println!("T {tk} out {dout} in {din} blocksize {bs} double quant {dq}:");
        for b in [None, Some(&bias)] {
            let got = Cpu.nf4_linear(&x, w, b).unwrap();
            let want = Cpu.linear(&x, wd, b).unwrap();
            assert_eq!(got.shape(), &[tk, dout]);
            assert_near("  nf4_linear", got.data(), want.data(), 1e-6);
        }
        // backward_input, fresh and accumulated.
        let dy = t(&vals(tk * dout, 40 + case as u64), &[tk, dout]);
        let got = Cpu
            .nf4_linear_backward_input(&dy, w, None)
            .unwrap()
            .unwrap();
        let want = Cpu.linear_backward_input(&dy, wd, None).unwrap().unwrap();
        assert_near("  nf4_linear_backward_input", got.data(), want.data(), 1e-6);
        let start = vals(tk * din, 50 + case as u64);
        let mut acc = t(&start, &[tk, din]);
        assert!(
            Cpu.nf4_linear_backward_input(&dy, w, Some(&mut acc))
                .unwrap()
                .is_none()
        );
        let want_acc: Vec<f32> = start.iter().zip(want.data()).map(|(a, b)| a + b).collect();
        assert_near(
            "  nf4_linear_backward_input acc",
            acc.data(),
            &want_acc,
            1e-6,
        );
        // Linear's own arms.
        let y = nf4.forward(&Cpu, &x).unwrap();
        assert_near(
            "  Linear::forward",
            y.data(),
            &dense.forward(&Cpu, &x).unwrap().into_vec(),
            1e-6,
        );
        // Row norms: same values, same order, bit for bit.
        let got = Cpu.nf4_row_sq_norms(w).unwrap();
        let want = Cpu.row_sq_norms(Base::Dense(wd)).unwrap();
        assert_eq!(got.data(), want.data(), "nf4_row_sq_norms");
        // The dequantized copy is the same dense weight.
        let deq = nf4.dequantized(&Cpu).unwrap();
        let BaseWeight::Dense(wq) = &deq.weight else {
            panic!("dequantized is dense")
        };
        assert_eq!(wq.data(), wd.data(), "Linear::dequantized");
    }
}

#[test]
fn qlora_equals_lora_over_the_dequantized_weight_and_matches_finite_differences() {
    for (case, &(tk, dout, din, r, bs, dq)) in [
        (5, 48, 64, 4, 64, true),
        (1, 37, 129, 3, 256, false),
        (9, 300, 70, 8, 64, true),
    ]
    .iter()
    .enumerate()
    {
        let c = case as u64;
        let (mut nf4, mut dense) = bases(dout, din, bs, dq, 100 + c);
        let bias = t(&vals(dout, 110 + c), &[dout]);
        nf4.bias = Some(bias.clone());
        dense.bias = Some(bias);
        let (a, b) = (vals(r * din, 120 + c), vals(dout * r, 130 + c));
        let s = 1.7f32;
        let layer = |base: &Linear<Cpu>, a: &[f32], b: &[f32]| {
            LoraLayer::from_factors(base, t(a, &[r, din]), t(b, &[dout, r]), s).unwrap()
        };
        let x = vals(tk * din, 140 + c);
        let g = vals(tk * dout, 150 + c);
        let xt = t(&x, &[tk, din]);
        let gt = t(&g, &[tk, dout]);
        println!("QLoRA T {tk} out {dout} in {din} r {r} blocksize {bs} double quant {dq}:");
        let (lq, ld) = (layer(&nf4, &a, &b), layer(&dense, &a, &b));
        let (yq, hq) = lq.forward(&Cpu, &nf4, &xt).unwrap();
        let (yd, hd) = ld.forward(&Cpu, &dense, &xt).unwrap();
        assert_near("  y", yq.data(), yd.data(), 1e-6);
        assert_eq!(hq.data(), hd.data(), "h");
        let (dxq, (daq, dbq)) = lq.backward(&Cpu, &nf4, &xt, &hq, &gt).unwrap();
        let (dxd, (dad, dbd)) = ld.backward(&Cpu, &dense, &xt, &hd, &gt).unwrap();
        assert_near("  dx", dxq.data(), dxd.data(), 1e-6);
        assert_near("  dA", daq.data(), dad.data(), 1e-6);
        assert_near("  dB", dbq.data(), dbd.data(), 1e-6);
        // Finite differences of L = sum(y * g) through the NF4 layer.
        let f = |x: &[f32], a: &[f32], b: &[f32]| {
            let (y, _) = layer(&nf4, a, b)
                .forward(&Cpu, &nf4, &t(x, &[tk, din]))
                .unwrap();
            dot(y.data(), &g)
        };
        check("  qlora dx", &x, dxq.data(), &|v| f(v, &a, &b));
        check("  qlora dA", &a, daq.data(), &|v| f(&x, v, &b));
        check("  qlora dB", &b, dbq.data(), &|v| f(&x, &a, v));
    }
}

#[test]
fn qdora_equals_dora_over_the_dequantized_weight_and_matches_finite_differences() {
    for (case, &(tk, dout, din, r, bs, dq)) in [
        (6, 56, 72, 6, 64, true),
        (1, 37, 129, 3, 256, false),
        (4, 300, 70, 20, 64, true),
    ]
    .iter()
    .enumerate()
    {
        let c = case as u64;
        let (mut nf4, mut dense) = bases(dout, din, bs, dq, 200 + c);
        let bias = t(&vals(dout, 210 + c), &[dout]);
        nf4.bias = Some(bias.clone());
        dense.bias = Some(bias);
        let (a, b) = (vals(r * din, 220 + c), vals(dout * r, 230 + c));
        let (at, bt) = (t(&a, &[r, din]), t(&b, &[dout, r]));
        let s = 2.0f32;
        println!("QDoRA T {tk} out {dout} in {din} r {r} blocksize {bs} double quant {dq}:");
        // PEFT's creation-time magnitude ||W0 + s B A||_row, over each base.
        let lq = DoraLayer::from_factors(&Cpu, &nf4, at.clone(), bt.clone(), s, None).unwrap();
        let ld = DoraLayer::from_factors(&Cpu, &dense, at.clone(), bt.clone(), s, None).unwrap();
        assert_near(
            "  magnitude",
            lq.lora_magnitude_vector.data(),
            ld.lora_magnitude_vector.data(),
            1e-6,
        );
        // A magnitude away from the norm, so that k = m / n != 1.
        let m: Vec<f32> = ld
            .lora_magnitude_vector
            .data()
            .iter()
            .zip(vals(dout, 240 + c))
            .map(|(n, v)| n * (1.0 + 0.3 * v))
            .collect();
        let mt = t(&m, &[dout]);
        let lq = DoraLayer::from_factors(&Cpu, &nf4, at.clone(), bt.clone(), s, Some(mt.clone()))
            .unwrap();
        let ld = DoraLayer::from_factors(&Cpu, &dense, at.clone(), bt.clone(), s, Some(mt.clone()))
            .unwrap();
        let x = vals(tk * din, 250 + c);
        let g = vals(tk * dout, 260 + c);
        let (xt, gt) = (t(&x, &[tk, din]), t(&g, &[tk, dout]));
        let (yq, sq) = lq.forward(&Cpu, &nf4, &xt).unwrap();
        let (yd, sd) = ld.forward(&Cpu, &dense, &xt).unwrap();
        assert_near(
            "  weight norm",
            sq.weight_norm.data(),
            sd.weight_norm.data(),
            1e-6,
        );
        assert_near("  y", yq.data(), yd.data(), 1e-6);
        assert_near("  z", sq.kernel.z.data(), sd.kernel.z.data(), 1e-6);
        let gq = lq.backward(&Cpu, &nf4, &xt, &sq, &gt).unwrap();
        let gd = ld.backward(&Cpu, &dense, &xt, &sd, &gt).unwrap();
        assert_near("  dx", gq.dx.data(), gd.dx.data(), 1e-6);
        assert_near("  dA", gq.d_lora_a.data(), gd.d_lora_a.data(), 1e-6);
        assert_near("  dB", gq.d_lora_b.data(), gd.d_lora_b.data(), 1e-6);
        assert_near("  dm", gq.d_magnitude.data(), gd.d_magnitude.data(), 1e-6);

        // Finite differences with the norm held constant (PEFT detaches it): the forward is
        // the NF4 base product plus the DoRA epilogue at the fixed n.
        let n = sq.weight_norm.clone();
        let fwd = |x: &[f32], a: &[f32], b: &[f32], m: &[f32]| -> (Tensor<Cpu>, DoraSaved<Cpu>) {
            let xt = t(x, &[tk, din]);
            let (at, bt, mt) = (t(a, &[r, din]), t(b, &[dout, r]), t(m, &[dout]));
            let o = Cpu
                .linear_lowrank(
                    &xt,
                    nf4.weight.as_base(),
                    nf4.bias.as_ref(),
                    Some(&LowRank::dora(&at, &bt, s, &mt, Some(&n))),
                )
                .unwrap();
            let saved = DoraSaved {
                h: o.h.unwrap(),
                z: o.z.unwrap(),
            };
            (o.y, saved)
        };
        let f = |x: &[f32], a: &[f32], b: &[f32], m: &[f32]| dot(fwd(x, a, b, m).0.data(), &g);
        let (y0, kernel) = fwd(&x, &a, &b, &m);
        assert_near("  epilogue y", y0.data(), yq.data(), 0.0);
        let saved = DoraLayerSaved {
            kernel,
            weight_norm: n.clone(),
        };
        let gr = lq.backward(&Cpu, &nf4, &xt, &saved, &gt).unwrap();
        check("  qdora dx", &x, gr.dx.data(), &|v| f(v, &a, &b, &m));
        check("  qdora dA", &a, gr.d_lora_a.data(), &|v| f(&x, v, &b, &m));
        check("  qdora dB", &b, gr.d_lora_b.data(), &|v| f(&x, &a, v, &m));
        check("  qdora dm", &m, gr.d_magnitude.data(), &|v| {
            f(&x, &a, &b, v)
        });
    }
}

#[test]
fn nf4_base_bytes_per_parameter() {
    let (dout, din) = (576, 1536);
    let w: Vec<f32> = vals(dout * din, 7).iter().map(|v| 0.05 * v).collect();
    for (bs, dq, lo, hi) in [
        (64, true, 0.5, 0.52),
        (64, false, 0.5, 0.57),
        (256, true, 0.5, 0.51),
    ] {
        let q = quantize_nf4(&w, &[dout, din], bs, dq).unwrap();
        let base = Linear::nf4(&Cpu, &q).unwrap();
        let per = base.bytes() as f64 / (dout * din) as f64;
        println!("NF4 blocksize {bs} double quant {dq}: {per:.4} bytes/param");
        assert!(per > lo && per < hi && per < 0.6, "{per} bytes/param");
        assert_eq!(base.bytes(), q.bytes());
    }
    let dense = Linear::dense(t(&w, &[dout, din])).unwrap();
    assert_eq!(dense.bytes(), 4 * dout * din);
}

#[test]
fn nf4_errors_name_the_problem() {
    let (nf4, dense) = bases(12, 20, 64, true, 300);
    let BaseWeight::Nf4(w) = &nf4.weight else {
        panic!("an NF4 base")
    };
    // Wrong x / dy widths.
    let msg = err_msg(Cpu.nf4_linear(&t(&vals(3 * 19, 1), &[3, 19]), w, None));
    assert!(msg.contains("nf4 weight"), "{msg}");
    let msg = err_msg(Cpu.nf4_linear(&t(&vals(20, 1), &[20]), w, None));
    assert!(msg.contains("`x`"), "{msg}");
    let msg = err_msg(Cpu.nf4_linear(&t(&vals(40, 1), &[2, 20]), w, Some(&t(&[0.0; 11], &[11]))));
    assert!(msg.contains("`bias`"), "{msg}");
    let msg = err_msg(Cpu.nf4_linear_backward_input(&t(&vals(3 * 11, 1), &[3, 11]), w, None));
    assert!(msg.contains("nf4 weight"), "{msg}");
    let mut bad_acc = t(&vals(3 * 21, 1), &[3, 21]);
    let msg = err_msg(Cpu.nf4_linear_backward_input(
        &t(&vals(3 * 12, 1), &[3, 12]),
        w,
        Some(&mut bad_acc),
    ));
    assert!(msg.contains("`dx`"), "{msg}");
    // Not a 2-D weight.
    let q3 = quantize_nf4(&vals(24, 1), &[2, 3, 4], 64, false).unwrap();
    let msg = err_msg(Linear::nf4(&Cpu, &q3));
    assert!(msg.contains("nf4 weight"), "{msg}");
    // A LoRA over NF4 with a wrong lora_A.
    assert!(
        LoraLayer::from_factors(
            &nf4,
            t(&vals(40, 1), &[2, 20]),
            t(&vals(24, 1), &[12, 2]),
            1.0
        )
        .is_ok()
    );
    let msg = err_msg(LoraLayer::from_factors(
        &nf4,
        t(&vals(38, 1), &[2, 19]),
        t(&vals(24, 1), &[12, 2]),
        1.0,
    ));
    assert!(msg.contains("lora_A"), "{msg}");
    // Merging into an NF4 base is refused with the way out; merging into the dequantized copy
    // equals merging into the dense base.
    let lora = LoraLayer::from_factors(
        &nf4,
        t(&vals(40, 2), &[2, 20]),
        t(&vals(24, 3), &[12, 2]),
        1.5,
    )
    .unwrap();
    let mut q = nf4.clone();
    let msg = err_msg(lora.merge(&Cpu, &mut q));
    assert!(msg.contains("dequantize"), "{msg}");
    println!("ok: {msg}");
    let msg = err_msg(lora.unmerge(&Cpu, &mut q));
    assert!(msg.contains("dequantize"), "{msg}");
    let mut dora = DoraLayer::from_factors(
        &Cpu,
        &nf4,
        t(&vals(40, 2), &[2, 20]),
        t(&vals(24, 3), &[12, 2]),
        1.5,
        None,
    )
    .unwrap();
    let msg = err_msg(dora.merge(&Cpu, &mut q));
    assert!(msg.contains("dequantize"), "{msg}");
    assert!(!dora.is_merged());
    let mut deq = nf4.dequantized(&Cpu).unwrap();
    let mut dense2 = dense.clone();
    lora.merge(&Cpu, &mut deq).unwrap();
    lora.merge(&Cpu, &mut dense2).unwrap();
    let (BaseWeight::Dense(a), BaseWeight::Dense(b)) = (&deq.weight, &dense2.weight) else {
        panic!("dense after dequantize")
    };
    assert_eq!(a.data(), b.data());
    // The DoRA layer built over the NF4 base merges into the dequantized copy (same ||W0||^2).
    let mut deq = nf4.dequantized(&Cpu).unwrap();
    dora.merge(&Cpu, &mut deq).unwrap();
    assert!(dora.is_merged());
}
