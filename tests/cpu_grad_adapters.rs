//! The DoRA, VeRA and AdaLoRA backwards of the CPU reference against central finite
//! differences (as tests/cpu_grad.rs), DoRA's low-rank norm identity against the direct norm,
//! merge/unmerge round trips, the adapters' inits, and bad shapes.
//!
//! Each check builds `L = sum(y * g)` with a fixed random `g`, perturbs sampled coordinates by
//! ±eps and compares `(L+ - L-) / 2eps` with the analytic gradient.

use lorafuse::adapter::DoraSaved;
use lorafuse::adapter::{
    AdaLoraLayer, BaseWeight, DoraLayer, Linear, LoraConfig, VeraLayer, VeraShared,
};
use lorafuse::backend::Backend;
use lorafuse::backend::Base;
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

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts `r` is a shape/argument error whose message names `tensor`.
fn assert_names<T>(r: lorafuse::Result<T>, tensor: &str) {
    let msg = err_msg(r);
    assert!(
        msg.contains(&format!("`{tensor}`")),
        "error should name `{tensor}`: {msg}"
    );
    println!("ok: {msg}");
}

/// Direct `||W0 + s B A||_row` in f64, forming `B A`.
fn direct_norm(
    w0: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    out: usize,
    inp: usize,
    r: usize,
) -> Vec<f64> {
    (0..out)
        .map(|o| {
            (0..inp)
                .map(|i| {
                    let ba: f64 = (0..r)
                        .map(|j| b[o * r + j] as f64 * a[j * inp + i] as f64)
                        .sum();
                    let v = w0[o * inp + i] as f64 + s as f64 * ba;
                    v * v
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

// ---- DoRA ---------------------------------------------------------------------------------------

#[test]
fn dora_norm_low_rank_identity_equals_direct_norm() {
    for (case, &(out, inp, r, s)) in [
        (1, 1, 1, 2.0f32),
        (7, 13, 1, 0.5),
        (56, 72, 6, 2.0),
        (33, 70, 17, 5.66),
        (5, 3, 8, 1.0),
    ]
    .iter()
    .enumerate()
    {
        let w0 = vals(out * inp, 100 + case as u64);
        let a = vals(r * inp, 200 + case as u64);
        let b = vals(out * r, 300 + case as u64);
        let w0t = t(&w0, &[out, inp]);
        let sq = Cpu.row_sq_norms(Base::Dense(&w0t)).unwrap();
        let n = Cpu
            .dora_weight_norm(&w0t, &sq, &t(&a, &[r, inp]), &t(&b, &[out, r]), s)
            .unwrap();
        let want = direct_norm(&w0, &a, &b, s, out, inp, r);
        let worst = n
            .data()
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w).abs() / w.max(1e-3))
            .fold(0.0, f64::max);
        println!("out {out} in {inp} r {r} s {s}: worst relative error {worst:.2e}");
        assert!(worst < 2e-5, "low-rank norm vs direct norm: {worst:e}");
        // With B = 0 the norm is ||W0||_row.
        let n0 = Cpu
            .dora_weight_norm(
                &w0t,
                &sq,
                &t(&a, &[r, inp]),
                &Cpu.zeros(&[out, r]).unwrap(),
                s,
            )
            .unwrap();
        for (o, &v) in n0.data().iter().enumerate() {
            assert!((v * v - sq.data()[o]).abs() <= 1e-5 * sq.data()[o].max(1.0));
        }
    }
}

#[test]
fn dora_backward_matches_finite_differences() {
    let (tk, din, dout, r, s) = (5, 12, 9, 3, 1.7f32);
    let x = vals(tk * din, 1);
    let w0 = vals(dout * din, 2);
    let a = vals(r * din, 3);
    let b = vals(dout * r, 4);
    let g = vals(tk * dout, 5);
    let bias = vals(dout, 6);
    let w0t = t(&w0, &[dout, din]);
    let sq = Cpu.row_sq_norms(Base::Dense(&w0t)).unwrap();
    // The norm is detached (PEFT): a constant in L, computed once from the starting factors.
    let n = Cpu
        .dora_weight_norm(&w0t, &sq, &t(&a, &[r, din]), &t(&b, &[dout, r]), s)
        .unwrap();
    let m: Vec<f32> = n
        .data()
        .iter()
        .zip(vals(dout, 7))
        .map(|(n, v)| n * (1.0 + 0.3 * v))
        .collect();
    let fwd = |x: &[f32], a: &[f32], b: &[f32], m: &[f32]| -> (Tensor<Cpu>, DoraSaved<Cpu>) {
        Cpu.dora_forward(
            &t(x, &[tk, din]),
            &w0t,
            Some(&t(&bias, &[dout])),
            &t(a, &[r, din]),
            &t(b, &[dout, r]),
            s,
            &t(m, &[dout]),
            &n,
        )
        .unwrap()
    };
    let f = |x: &[f32], a: &[f32], b: &[f32], m: &[f32]| dot(fwd(x, a, b, m).0.data(), &g);
    let (_, saved) = fwd(&x, &a, &b, &m);
    let gr = Cpu
        .dora_backward(
            &t(&g, &[tk, dout]),
            &t(&x, &[tk, din]),
            &saved,
            &w0t,
            &t(&a, &[r, din]),
            &t(&b, &[dout, r]),
            s,
            &t(&m, &[dout]),
            &n,
        )
        .unwrap();
    check("dora dx", &x, gr.dx.data(), &|v| f(v, &a, &b, &m));
    check("dora dA", &a, gr.d_lora_a.data(), &|v| f(&x, v, &b, &m));
    check("dora dB", &b, gr.d_lora_b.data(), &|v| f(&x, &a, v, &m));
    check("dora dm", &m, gr.d_magnitude.data(), &|v| f(&x, &a, &b, v));
}

#[test]
fn dora_merge_unmerge_round_trip_and_errors() {
    let (din, dout, r, s) = (19, 11, 4, 2.0f32);
    let w0 = vals(dout * din, 21);
    let (a, b) = (
        t(&vals(r * din, 22), &[r, din]),
        t(&vals(dout * r, 23), &[dout, r]),
    );
    let mut base = Linear {
        weight: BaseWeight::Dense(t(&w0, &[dout, din])),
        bias: None,
    };
    let m = t(
        &vals(dout, 24)
            .iter()
            .map(|v| 1.0 + 0.5 * v)
            .collect::<Vec<_>>(),
        &[dout],
    );
    let mut layer =
        DoraLayer::from_factors(&Cpu, &base, a.clone(), b.clone(), s, Some(m.clone())).unwrap();
    let x = t(&vals(3 * din, 25), &[3, din]);
    let (y, _) = layer.forward(&Cpu, &base, &x).unwrap();
    layer.merge(&Cpu, &mut base).unwrap();
    assert!(layer.is_merged());
    assert_names(layer.merge(&Cpu, &mut base), "base");
    let y_merged = base.forward(&Cpu, &x).unwrap();
    let d = max_abs_diff(y.data(), y_merged.data());
    println!("merged forward vs adapter forward: {d:.2e}");
    assert!(d < 1e-5);
    layer.unmerge(&Cpu, &mut base).unwrap();
    let w = base.weight.dense_or_err("test").unwrap();
    let d = max_abs_diff(w.data(), &w0);
    println!("unmerge round trip: {d:.2e}");
    assert!(d < 1e-5);

    // A zero magnitude makes the merge non-invertible: unmerge refuses.
    let mut mz = m.data().to_vec();
    mz[3] = 0.0;
    let n = Cpu
        .dora_weight_norm(w, &Cpu.row_sq_norms(Base::Dense(w)).unwrap(), &a, &b, s)
        .unwrap();
    let mut wz = w.clone();
    Cpu.dora_merge(&mut wz, &a, &b, s, &t(&mz, &[dout]), &n)
        .unwrap();
    assert_names(
        Cpu.dora_unmerge(&mut wz, &a, &b, s, &t(&mz, &[dout]), &n),
        "lora_magnitude_vector",
    );
}

#[test]
fn dora_init_starts_at_the_base() {
    let (din, dout) = (16, 10);
    let w0 = t(&vals(dout * din, 31), &[dout, din]);
    let base = Linear {
        weight: BaseWeight::Dense(w0.clone()),
        bias: Some(t(&vals(dout, 32), &[dout])),
    };
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..LoraConfig::default()
    };
    let layer = DoraLayer::init(&Cpu, &base, &cfg, 7).unwrap();
    assert!(layer.lora_b.data().iter().all(|&v| v == 0.0));
    let sq = Cpu.row_sq_norms(Base::Dense(&w0)).unwrap();
    for (m, s) in layer.lora_magnitude_vector.data().iter().zip(sq.data()) {
        assert!((m - s.sqrt()).abs() < 1e-6, "m = ||W0||_row at init");
    }
    let x = t(&vals(4 * din, 33), &[4, din]);
    let (y, _) = layer.forward(&Cpu, &base, &x).unwrap();
    let d = max_abs_diff(y.data(), base.forward(&Cpu, &x).unwrap().data());
    assert!(d < 1e-5, "DoRA at init equals the base: {d}");
}

#[test]
fn dora_bad_shapes_name_the_tensor() {
    let (tk, din, dout, r) = (2, 6, 5, 3);
    let x = t(&vals(tk * din, 1), &[tk, din]);
    let w0 = t(&vals(dout * din, 2), &[dout, din]);
    let a = t(&vals(r * din, 3), &[r, din]);
    let b = t(&vals(dout * r, 4), &[dout, r]);
    let m = t(&vals(dout, 5), &[dout]);
    let sq = Cpu.row_sq_norms(Base::Dense(&w0)).unwrap();
    let bad_a = t(&vals(r * (din + 1), 3), &[r, din + 1]);
    let bad_b = t(&vals((dout + 1) * r, 4), &[dout + 1, r]);
    let bad_v = t(&vals(dout + 1, 5), &[dout + 1]);
    assert_names(Cpu.dora_weight_norm(&w0, &sq, &bad_a, &b, 1.0), "lora_A");
    assert_names(Cpu.dora_weight_norm(&w0, &sq, &a, &bad_b, 1.0), "lora_B");
    assert_names(Cpu.dora_weight_norm(&w0, &bad_v, &a, &b, 1.0), "w0_row_sq");
    let n = Cpu.dora_weight_norm(&w0, &sq, &a, &b, 1.0).unwrap();
    assert_names(
        Cpu.dora_forward(&x, &w0, None, &a, &b, 1.0, &bad_v, &n),
        "lora_magnitude_vector",
    );
    assert_names(
        Cpu.dora_forward(&x, &w0, None, &a, &b, 1.0, &m, &bad_v),
        "weight_norm",
    );
    assert_names(
        Cpu.dora_forward(&x, &w0, Some(&bad_v), &a, &b, 1.0, &m, &n),
        "bias",
    );
    let (_, saved) = Cpu
        .dora_forward(&x, &w0, None, &a, &b, 1.0, &m, &n)
        .unwrap();
    let bad_dy = t(&vals(tk * (dout + 1), 6), &[tk, dout + 1]);
    assert_names(
        Cpu.dora_backward(&bad_dy, &x, &saved, &w0, &a, &b, 1.0, &m, &n),
        "dy",
    );
    let mut w = w0.clone();
    assert_names(
        Cpu.dora_merge(&mut w, &a, &b, 1.0, &m, &bad_v),
        "weight_norm",
    );
    let base = Linear::dense(w0.clone()).unwrap();
    assert_names(
        DoraLayer::from_factors(&Cpu, &base, bad_a, b.clone(), 1.0, None),
        "lora_A",
    );
    assert_names(
        DoraLayer::from_factors(&Cpu, &base, a.clone(), b, 1.0, Some(bad_v)),
        "lora_magnitude_vector",
    );
}

// ---- VeRA ---------------------------------------------------------------------------------------

#[test]
fn vera_backward_matches_finite_differences() {
    // Shared projections larger than the layer, so the slicing is exercised.
    let (tk, din, dout, r, max_in, max_out) = (4, 10, 7, 3, 13, 9);
    let x = vals(tk * din, 41);
    let w0 = t(&vals(dout * din, 42), &[dout, din]);
    let bias = t(&vals(dout, 43), &[dout]);
    let va = t(&vals(r * max_in, 44), &[r, max_in]);
    let vb = t(&vals(max_out * r, 45), &[max_out, r]);
    let ld = vals(r, 46);
    let lb = vals(dout, 47);
    let g = vals(tk * dout, 48);
    let fwd = |x: &[f32], ld: &[f32], lb: &[f32]| {
        Cpu.vera_forward(
            &t(x, &[tk, din]),
            &w0,
            Some(&bias),
            &va,
            &vb,
            &t(ld, &[r]),
            &t(lb, &[dout]),
        )
        .unwrap()
    };
    let f = |x: &[f32], ld: &[f32], lb: &[f32]| dot(fwd(x, ld, lb).0.data(), &g);
    let (_, h) = fwd(&x, &ld, &lb);
    let (dx, dld, dlb) = Cpu
        .vera_backward(
            &t(&g, &[tk, dout]),
            &t(&x, &[tk, din]),
            &h,
            &w0,
            &va,
            &vb,
            &t(&ld, &[r]),
            &t(&lb, &[dout]),
        )
        .unwrap();
    check("vera dx", &x, dx.data(), &|v| f(v, &ld, &lb));
    check("vera dlambda_d", &ld, dld.data(), &|v| f(&x, v, &lb));
    check("vera dlambda_b", &lb, dlb.data(), &|v| f(&x, &ld, v));

    // Merge equals the forward; unmerge restores W0.
    let shared = VeraShared::from_tensors(va.clone(), vb.clone()).unwrap();
    let mut base = Linear {
        weight: BaseWeight::Dense(w0.clone()),
        bias: Some(bias.clone()),
    };
    let layer = VeraLayer::from_vectors(&shared, &base, t(&ld, &[r]), t(&lb, &[dout])).unwrap();
    let (y, _) = layer
        .forward(&Cpu, &shared, &base, &t(&x, &[tk, din]))
        .unwrap();
    layer.merge(&Cpu, &shared, &mut base).unwrap();
    let d = max_abs_diff(
        y.data(),
        base.forward(&Cpu, &t(&x, &[tk, din])).unwrap().data(),
    );
    assert!(d < 1e-5, "merged forward: {d}");
    layer.unmerge(&Cpu, &shared, &mut base).unwrap();
    let w = base.weight.dense_or_err("test").unwrap();
    assert!(max_abs_diff(w.data(), w0.data()) < 1e-6);
}

#[test]
fn vera_init_and_bad_shapes() {
    let (r, max_in, max_out) = (4, 20, 12);
    let shared = VeraShared::init(&Cpu, r, max_in, max_out, 3).unwrap();
    let (ba, bb) = ((6.0f32 / max_in as f32).sqrt(), (6.0f32 / r as f32).sqrt());
    assert!(shared.vera_a.data().iter().all(|v| v.abs() <= ba));
    assert!(shared.vera_b.data().iter().all(|v| v.abs() <= bb));
    assert!(
        shared.vera_b.data().iter().any(|v| v.abs() > ba),
        "B's bound uses fan_in = r"
    );
    let again = VeraShared::init(&Cpu, r, max_in, max_out, 3).unwrap();
    assert_eq!(
        again.vera_a.data(),
        shared.vera_a.data(),
        "seeded: deterministic"
    );

    let base = Linear::dense(t(&vals(10 * 16, 5), &[10, 16])).unwrap();
    let layer = VeraLayer::init(&Cpu, &shared, &base, 0.1).unwrap();
    let x = t(&vals(3 * 16, 6), &[3, 16]);
    let (y, _) = layer.forward(&Cpu, &shared, &base, &x).unwrap();
    assert!(max_abs_diff(y.data(), base.forward(&Cpu, &x).unwrap().data()) < 1e-6);

    // A base larger than the shared projections, and wrong vector shapes.
    let big_in = Linear::dense(t(&vals(10 * 21, 5), &[10, 21])).unwrap();
    assert_names(VeraLayer::init(&Cpu, &shared, &big_in, 0.1), "vera_A");
    let big_out = Linear::dense(t(&vals(13 * 16, 5), &[13, 16])).unwrap();
    assert_names(VeraLayer::init(&Cpu, &shared, &big_out, 0.1), "vera_B");
    assert_names(
        VeraLayer::from_vectors(&shared, &base, t(&[0.1; 5], &[5]), t(&[0.0; 10], &[10])),
        "vera_lambda_d",
    );
    assert_names(
        VeraLayer::from_vectors(&shared, &base, t(&[0.1; 4], &[4]), t(&[0.0; 9], &[9])),
        "vera_lambda_b",
    );
    let w0 = t(&vals(10 * 21, 5), &[10, 21]);
    let x21 = t(&vals(3 * 21, 6), &[3, 21]);
    assert_names(
        Cpu.vera_forward(
            &x21,
            &w0,
            None,
            &shared.vera_a,
            &shared.vera_b,
            &layer.vera_lambda_d,
            &layer.vera_lambda_b,
        ),
        "vera_A",
    );
    assert_names(
        VeraShared::from_tensors(shared.vera_a.clone(), t(&vals(12 * 3, 1), &[12, 3])),
        "vera_B",
    );
}

// ---- AdaLoRA ------------------------------------------------------------------------------------

#[test]
fn adalora_backward_matches_finite_differences() {
    let (tk, din, dout, r) = (5, 11, 8, 4);
    let (scaling, ranknum) = (8.0f32, 6.0f32); // ranknum = init_r > r: masked ranks dropped
    let x = vals(tk * din, 51);
    let w0 = t(&vals(dout * din, 52), &[dout, din]);
    let bias = t(&vals(dout, 53), &[dout]);
    let a = vals(r * din, 54);
    let b = vals(dout * r, 55);
    let mut e = vals(r, 56);
    e[2] = 0.0; // a masked rank: its gradient must still be right (and non-zero)
    let g = vals(tk * dout, 57);
    let fwd = |x: &[f32], a: &[f32], b: &[f32], e: &[f32]| {
        Cpu.adalora_forward(
            &t(x, &[tk, din]),
            &w0,
            Some(&bias),
            &t(a, &[r, din]),
            &t(b, &[dout, r]),
            &t(e, &[r, 1]),
            scaling,
            ranknum,
        )
        .unwrap()
    };
    let f = |x: &[f32], a: &[f32], b: &[f32], e: &[f32]| dot(fwd(x, a, b, e).0.data(), &g);
    let (_, h) = fwd(&x, &a, &b, &e);
    let gr = Cpu
        .adalora_backward(
            &t(&g, &[tk, dout]),
            &t(&x, &[tk, din]),
            &h,
            &w0,
            &t(&a, &[r, din]),
            &t(&b, &[dout, r]),
            &t(&e, &[r, 1]),
            scaling,
            ranknum,
        )
        .unwrap();
    check("adalora dx", &x, gr.dx.data(), &|v| f(v, &a, &b, &e));
    check("adalora dA", &a, gr.d_lora_a.data(), &|v| f(&x, v, &b, &e));
    check("adalora dB", &b, gr.d_lora_b.data(), &|v| f(&x, &a, v, &e));
    check("adalora dE", &e, gr.d_lora_e.data(), &|v| f(&x, &a, &b, v));
    assert!(
        gr.d_lora_e.data()[2].abs() > 1e-3,
        "masked rank's dE is non-zero"
    );
    // dA of the masked rank is zero (A ⊙ E with E = 0).
    assert!(
        gr.d_lora_a.data()[2 * din..3 * din]
            .iter()
            .all(|&v| v == 0.0)
    );

    // Merge equals the forward; unmerge restores W0.
    let mut base = Linear {
        weight: BaseWeight::Dense(w0.clone()),
        bias: Some(bias.clone()),
    };
    let layer = AdaLoraLayer::from_factors(
        &base,
        t(&a, &[r, din]),
        t(&b, &[dout, r]),
        t(&e, &[r, 1]),
        scaling,
        ranknum,
    )
    .unwrap();
    let (y, _) = layer.forward(&Cpu, &base, &t(&x, &[tk, din])).unwrap();
    layer.merge(&Cpu, &mut base).unwrap();
    let d = max_abs_diff(
        y.data(),
        base.forward(&Cpu, &t(&x, &[tk, din])).unwrap().data(),
    );
    assert!(d < 1e-5, "merged forward: {d}");
    layer.unmerge(&Cpu, &mut base).unwrap();
    let w = base.weight.dense_or_err("test").unwrap();
    assert!(max_abs_diff(w.data(), w0.data()) < 1e-6);
}

#[test]
fn adalora_init_mask_and_bad_shapes() {
    let (din, dout, r) = (9, 7, 5);
    let w0 = t(&vals(dout * din, 61), &[dout, din]);
    let base = Linear::dense(w0.clone()).unwrap();
    let mut layer = AdaLoraLayer::init(&Cpu, &base, r, 8.0, 1).unwrap();
    assert_eq!(layer.scaling, 8.0, "scaling = lora_alpha, not alpha / r");
    assert_eq!(AdaLoraLayer::<Cpu>::scaling_for(0.0, r), r as f32);
    assert_eq!(layer.ranknum, r as f32);
    assert!(layer.lora_e.data().iter().all(|&v| v == 0.0));
    let sd = (layer.lora_a.data().iter().map(|v| v * v).sum::<f32>() / (r * din) as f32).sqrt();
    assert!((0.01..0.04).contains(&sd), "lora_A ~ N(0, 0.02): std {sd}");
    let x = t(&vals(3 * din, 62), &[3, din]);
    let (y, _) = layer.forward(&Cpu, &base, &x).unwrap();
    assert!(max_abs_diff(y.data(), base.forward(&Cpu, &x).unwrap().data()) < 1e-6);

    layer.lora_e = t(&[1.0, 2.0, 3.0, 4.0, 5.0], &[r, 1]);
    layer
        .apply_rank_mask(&Cpu, &[true, false, true, true, false])
        .unwrap();
    assert_eq!(layer.lora_e.data(), &[1.0, 0.0, 3.0, 4.0, 0.0]);
    assert_eq!(layer.ranknum, r as f32, "masking never changes ranknum");
    assert_names(layer.apply_rank_mask(&Cpu, &[true; 4]), "rank_mask");

    let a = layer.lora_a.clone();
    let b = layer.lora_b.clone();
    assert_names(
        AdaLoraLayer::from_factors(&base, a.clone(), b.clone(), t(&[0.0; 5], &[5]), 8.0, 5.0),
        "lora_E",
    );
    assert_names(
        AdaLoraLayer::from_factors(&base, a.clone(), b.clone(), t(&[0.0; 5], &[5, 1]), 8.0, 0.0),
        "ranknum",
    );
    assert_names(
        AdaLoraLayer::from_factors(
            &base,
            t(&vals(r * 3, 1), &[r, 3]),
            b.clone(),
            t(&[0.0; 5], &[5, 1]),
            8.0,
            5.0,
        ),
        "lora_A",
    );
    assert_names(
        Cpu.adalora_forward(&x, &w0, None, &a, &b, &t(&[0.0; 4], &[4, 1]), 8.0, 5.0),
        "lora_E",
    );
    assert_names(
        Cpu.adalora_forward(&x, &w0, None, &a, &b, &layer.lora_e, 8.0, f32::NAN),
        "ranknum",
    );
    let bad_b = t(&vals((dout + 1) * r, 1), &[dout + 1, r]);
    let mut w = w0.clone();
    assert_names(
        Cpu.adalora_merge(&mut w, &a, &bad_b, &layer.lora_e, 8.0, 5.0, 1.0),
        "lora_B",
    );
    let (_, h) = Cpu
        .adalora_forward(&x, &w0, None, &a, &b, &layer.lora_e, 8.0, 5.0)
        .unwrap();
    let bad_dy = t(&vals(3 * (dout + 1), 1), &[3, dout + 1]);
    assert_names(
        Cpu.adalora_backward(&bad_dy, &x, &h, &w0, &a, &b, &layer.lora_e, 8.0, 5.0),
        "dy",
    );
}
