//! AdaLoRA's rank allocator and orthogonal regulariser
//! (`lorafuse::adapter::rank_allocator`) against PEFT 0.21.2.
//!
//! `tests/data/adalora_allocator/reference.json` was made by `gen.py` beside it (see the README
//! there): a 2-layer MLP under PEFT's AdaLoRA, 14 steps of fixed random gradients through
//! `AdaLoraModel.update_and_allocate`, recording the EMAs, the triplet scores and threshold fed
//! to `torch.kthvalue`, the budgets, the masked `lora_E` and the rank pattern; then the
//! orthogonal regulariser's loss and gradients through `AdaLoraModel.forward`.

mod common;
#[path = "common/adalora_twin.rs"]
mod twin;

use lorafuse::adapter::rank_allocator::{
    AdaLoraLayerView, AdaLoraSchedule, KeptFactors, OrthRegInput, Phase, RankAllocator,
    RankPattern, drop_masked_ranks, expand_masked_ranks, orth_reg, orth_reg_total,
    rank_pattern_from_adapter_config, rank_pattern_from_json, rank_pattern_to_json,
};
use lorafuse::adapter::{AdaLoraLayer, Linear};
use lorafuse::{Backend, Cpu, Error, Tensor};
use proptest::prelude::*;
use serde_json::Value;
use std::path::Path;

const TOL: f64 = 1e-5;

fn reference() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/adalora_allocator/reference.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        assert!(
            err <= TOL + TOL * (w as f64).abs(),
            "{what}[{i}]: got {g}, PEFT {w} (|diff| {err:e})"
        );
    }
}

fn schedule_of(cfg: &Value) -> AdaLoraSchedule {
    let u = |k: &str| cfg[k].as_u64().unwrap();
    AdaLoraSchedule {
        init_r: u("init_r") as usize,
        target_r: u("target_r") as usize,
        tinit: u("tinit"),
        tfinal: u("tfinal"),
        delta_t: u("delta_t"),
        total_step: u("total_step"),
    }
}

const LAYERS: [&str; 2] = ["fc1", "fc2"];

#[test]
fn allocator_matches_peft_step_by_step() {
    let rf = reference();
    assert_eq!(rf["peft_version"], "0.21.2");
    let cfg = &rf["config"];
    let sched = schedule_of(cfg);
    let r = sched.init_r;
    let dims: Vec<(usize, usize)> = LAYERS
        .iter()
        .map(|l| {
            let d = &rf["layers"][*l];
            (
                d["in"].as_u64().unwrap() as usize,
                d["out"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    let mut alloc = RankAllocator::new(
        sched,
        cfg["beta1"].as_f64().unwrap(),
        cfg["beta2"].as_f64().unwrap(),
        &[("fc1", r), ("fc2", r)],
    )
    .unwrap();
    let mut n_masks = 0;
    let mut saw_final = false;
    for st in rf["steps"].as_array().unwrap() {
        let step = st["step"].as_u64().unwrap();
        let get = |group: &str, l: &str, k: &str| floats(&st[group][format!("{l}.{k}")]);
        let vals: Vec<[Vec<f32>; 6]> = LAYERS
            .iter()
            .map(|l| {
                [
                    get("values", l, "lora_A"),
                    get("grads", l, "lora_A"),
                    get("values", l, "lora_B"),
                    get("grads", l, "lora_B"),
                    get("values", l, "lora_E"),
                    get("grads", l, "lora_E"),
                ]
            })
            .collect();
        let mut es: Vec<Vec<f32>> = vals.iter().map(|v| v[4].clone()).collect();
        // Give the layers in reverse order: matching is by name.
        let mut views: Vec<AdaLoraLayerView> = es
            .iter_mut()
            .enumerate()
            .rev()
            .map(|(i, e)| AdaLoraLayerView {
                name: LAYERS[i],
                lora_a: &vals[i][0],
                grad_a: &vals[i][1],
                lora_b: &vals[i][2],
                grad_b: &vals[i][3],
                lora_e: e,
                grad_e: &vals[i][5],
                r,
                in_features: dims[i].0,
                out_features: dims[i].1,
            })
            .collect();
        let got = alloc.update_and_allocate(step, &mut views).unwrap();
        drop(views);

        // Budget recorded by PEFT's budget_schedule (not called in the final phase).
        if let Some(b) = st["budget"].as_u64() {
            assert_eq!(
                alloc.budget(step).budget,
                b as usize,
                "budget at step {step}"
            );
            assert_eq!(
                alloc.budget(step).mask,
                st["mask_ind"].as_bool().unwrap(),
                "mask_ind at step {step}"
            );
        }
        // A mask was computed iff PEFT called kthvalue.
        match (&got, st["k"].as_u64()) {
            (Some(a), Some(k)) => {
                n_masks += 1;
                assert_eq!(alloc.init_budget() - a.budget, k as usize, "k at {step}");
                let mut all = a.triplet_scores["fc1"].clone();
                all.extend_from_slice(&a.triplet_scores["fc2"]);
                assert_close(
                    &format!("scores at step {step}"),
                    &all,
                    &floats(&st["scores"]),
                );
                assert_close(
                    &format!("threshold at step {step}"),
                    &[a.threshold],
                    &[st["threshold"].as_f64().unwrap() as f32],
                );
            }
            (None, None) => {}
            (g, k) => panic!("step {step}: allocation {g:?}, PEFT k {k:?}"),
        }
        if sched.phase(step) == Phase::Final {
            saw_final = true;
        }
        // Masked E, entry by entry.
        for (i, l) in LAYERS.iter().enumerate() {
            assert_close(
                &format!("{l}.lora_E after step {step}"),
                &es[i],
                &floats(&st["e_after"][*l]),
            );
        }
        // Rank pattern (PEFT keeps the last one in the config).
        match st["rank_pattern"] {
            Value::Null => assert!(alloc.rank_pattern().is_none(), "step {step}"),
            ref p => assert_eq!(
                alloc.rank_pattern().unwrap(),
                &rank_pattern_from_json(p, "default").unwrap(),
                "rank pattern at step {step}"
            ),
        }
        // EMAs (PEFT drops them at the final mask).
        let ema = st["exp_avg_ipt"].as_object().unwrap();
        if ema.is_empty() {
            assert!(alloc.ema("fc1").is_none(), "EMAs kept at step {step}");
        } else {
            for l in LAYERS {
                let e = alloc.ema(l).unwrap();
                for (k, ent) in [("lora_A", &e.a), ("lora_B", &e.b), ("lora_E", &e.e)] {
                    let key = format!("{l}.{k}.default");
                    assert_close(
                        &format!("exp_avg_ipt {key} at {step}"),
                        &ent.exp_avg_ipt,
                        &floats(&st["exp_avg_ipt"][&key]),
                    );
                    assert_close(
                        &format!("exp_avg_unc {key} at {step}"),
                        &ent.exp_avg_unc,
                        &floats(&st["exp_avg_unc"][&key]),
                    );
                }
            }
        }
    }
    assert!(n_masks >= 3, "the reference should mask several times");
    assert!(saw_final, "the reference should reach the final phase");
}

#[test]
fn orth_reg_matches_peft() {
    let rf = reference();
    let o = &rf["orth"];
    let r = rf["config"]["init_r"].as_u64().unwrap() as usize;
    let vals: Vec<(Vec<f32>, Vec<f32>, usize, usize)> = LAYERS
        .iter()
        .map(|l| {
            let d = &rf["layers"][*l];
            (
                floats(&o["values"][format!("{l}.lora_A")]),
                floats(&o["values"][format!("{l}.lora_B")]),
                d["in"].as_u64().unwrap() as usize,
                d["out"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    for (i, l) in LAYERS.iter().enumerate() {
        let (a, b, inp, out) = &vals[i];
        let one = orth_reg(a, b, r, *inp, *out).unwrap();
        assert_close(
            &format!("{l} norms"),
            &[one.norm_a, one.norm_b],
            &[
                o["norms"][format!("{l}.lora_A")].as_f64().unwrap() as f32,
                o["norms"][format!("{l}.lora_B")].as_f64().unwrap() as f32,
            ],
        );
        assert_eq!(one.loss, one.norm_a + one.norm_b);
    }
    let inputs: Vec<OrthRegInput> = vals
        .iter()
        .map(|(a, b, inp, out)| OrthRegInput {
            lora_a: a,
            lora_b: b,
            r,
            in_features: *inp,
            out_features: *out,
        })
        .collect();
    let w = o["weight"].as_f64().unwrap() as f32;
    let tot = orth_reg_total(&inputs, w).unwrap();
    assert_close(
        "orth loss",
        &[tot.loss],
        &[o["loss"].as_f64().unwrap() as f32],
    );
    for (i, l) in LAYERS.iter().enumerate() {
        assert_close(
            &format!("{l} dA"),
            &tot.grads[i].0,
            &floats(&o["grads"][format!("{l}.lora_A")]),
        );
        assert_close(
            &format!("{l} dB"),
            &tot.grads[i].1,
            &floats(&o["grads"][format!("{l}.lora_B")]),
        );
    }
}

#[test]
fn orth_reg_gradient_matches_finite_differences_and_is_zero_at_orthonormal() {
    let (r, inp, out) = (3, 5, 4);
    let a: Vec<f32> = (0..r * inp)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.13)
        .collect();
    let b: Vec<f32> = (0..out * r)
        .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.11)
        .collect();
    let o = orth_reg(&a, &b, r, inp, out).unwrap();
    let h = 1e-3f32;
    for (which, base) in [("A", &a), ("B", &b)] {
        for j in 0..base.len() {
            let mut p = base.clone();
            let mut m = base.clone();
            p[j] += h;
            m[j] -= h;
            let f = |x: &Vec<f32>| {
                if which == "A" {
                    orth_reg(x, &b, r, inp, out).unwrap().loss as f64
                } else {
                    orth_reg(&a, x, r, inp, out).unwrap().loss as f64
                }
            };
            let fd = (f(&p) - f(&m)) / (2.0 * h as f64);
            let an = if which == "A" {
                o.grad_a[j]
            } else {
                o.grad_b[j]
            } as f64;
            assert!(
                (fd - an).abs() < 2e-3,
                "d{which}[{j}]: fd {fd}, analytic {an}"
            );
        }
    }
    // Orthonormal rows of A and columns of B: zero penalty, zero gradient (torch's choice).
    let a = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
    let b = vec![0.0, 1.0, 1.0, 0.0, 0.0, 0.0];
    let o = orth_reg(&a, &b, 2, 3, 3).unwrap();
    assert_eq!(o.loss, 0.0);
    assert!(o.grad_a.iter().chain(&o.grad_b).all(|&g| g == 0.0));
    assert!(matches!(
        orth_reg_total(&[], -0.1),
        Err(Error::InvalidArgument { ref name, .. }) if name == "orth_reg_weight"
    ));
    assert_eq!(orth_reg_total(&[], 0.5).unwrap().loss, 0.0);
}

fn sched(init_r: usize, target_r: usize, tinit: u64, tfinal: u64, total: u64) -> AdaLoraSchedule {
    AdaLoraSchedule {
        init_r,
        target_r,
        tinit,
        tfinal,
        delta_t: 1,
        total_step: total,
    }
}

proptest! {
    #[test]
    fn budget_is_monotone_and_exact_at_the_boundaries(
        init_r in 2usize..16,
        target_frac in 0.0f64..1.0,
        n_layers in 1usize..6,
        tinit in 0u64..50,
        window in 1u64..200,
        tfinal in 0u64..50,
        delta_t in 1u64..7,
    ) {
        let target_r = ((init_r as f64 * target_frac) as usize).min(init_r - 1);
        let s = AdaLoraSchedule {
            init_r, target_r, tinit, tfinal, delta_t, total_step: tinit + window + tfinal,
        };
        prop_assert!(s.validate().is_ok());
        let (ib, tb) = (init_r * n_layers, target_r * n_layers);
        let mut prev = usize::MAX;
        for step in 0..=s.total_step + 3 {
            let b = s.budget(step, n_layers);
            prop_assert!(b.budget <= prev, "budget rose at step {}", step);
            prop_assert!(b.budget >= tb && b.budget <= ib);
            prev = b.budget;
            match s.phase(step) {
                Phase::Warmup => prop_assert!(!b.mask && b.budget == ib),
                Phase::Budgeting => {
                    prop_assert_eq!(b.mask, step % delta_t == 0);
                    prop_assert!(b.budget < ib, "no drop at step {}", step);
                }
                Phase::Finalize => prop_assert_eq!(b.budget, tb),
                Phase::Final => prop_assert!(b.mask && b.budget == tb),
            }
        }
        prop_assert_eq!(s.budget(tinit, n_layers).budget, ib);
        prop_assert_eq!(s.budget(s.final_step(), n_layers).budget, tb);
        prop_assert_eq!(s.phase(s.final_step()), Phase::Finalize);
        prop_assert_eq!(s.phase(tinit + 1), if window == 1 { Phase::Finalize } else { Phase::Budgeting });
    }
}

#[test]
fn budget_matches_hand_computed_cubic() {
    // init_bgt 8, target_bgt 4, tinit 2, window 7 (as in the PEFT reference).
    let s = AdaLoraSchedule {
        delta_t: 2,
        ..sched(4, 2, 2, 3, 12)
    };
    let b: Vec<usize> = (1..=12).map(|t| s.budget(t, 2).budget).collect();
    // t=3: 4 (6/7)^3 + 4 = 6.51 -> 6; t=4: 4 (5/7)^3 + 4 = 5.46 -> 5; t=5: 4.94 -> 4.
    assert_eq!(b, vec![8, 8, 6, 5, 4, 4, 4, 4, 4, 4, 4, 4]);
    assert!(s.budget(4, 2).mask && !s.budget(5, 2).mask && !s.budget(2, 2).mask);
}

fn arg_name(e: Error) -> String {
    match e {
        Error::InvalidArgument { name, .. } => name,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn invalid_settings_are_rejected_naming_the_setting() {
    let ok = sched(6, 3, 10, 10, 100);
    assert!(ok.validate().is_ok());
    let cases = [
        (
            AdaLoraSchedule {
                total_step: 0,
                tinit: 0,
                tfinal: 0,
                ..ok
            },
            "total_step",
        ),
        (
            AdaLoraSchedule {
                tinit: 50,
                tfinal: 50,
                ..ok
            },
            "tinit",
        ),
        (
            AdaLoraSchedule {
                tinit: 60,
                tfinal: 50,
                ..ok
            },
            "tinit",
        ),
        (AdaLoraSchedule { delta_t: 0, ..ok }, "delta_t"),
        (AdaLoraSchedule { target_r: 7, ..ok }, "target_r"),
        (AdaLoraSchedule { target_r: 6, ..ok }, "target_r"),
    ];
    for (s, name) in cases {
        assert_eq!(arg_name(s.validate().unwrap_err()), name, "{s:?}");
        assert_eq!(
            arg_name(RankAllocator::new(s, 0.85, 0.85, &[("a", 6)]).unwrap_err()),
            name
        );
    }
    let new = |b1, b2, layers: &[(&str, usize)]| RankAllocator::new(ok, b1, b2, layers);
    assert_eq!(arg_name(new(1.0, 0.85, &[("a", 6)]).unwrap_err()), "beta1");
    assert_eq!(arg_name(new(0.85, 0.0, &[("a", 6)]).unwrap_err()), "beta2");
    assert_eq!(
        arg_name(new(f64::NAN, 0.85, &[("a", 6)]).unwrap_err()),
        "beta1"
    );
    assert_eq!(arg_name(new(0.85, 0.85, &[]).unwrap_err()), "layers");
    assert_eq!(
        arg_name(new(0.85, 0.85, &[("a", 6), ("a", 6)]).unwrap_err()),
        "layers"
    );
    // Layers smaller than init_r: target budget 2 * 3 = 6 >= 3 + 3 ranks.
    assert_eq!(
        arg_name(new(0.85, 0.85, &[("a", 3), ("b", 3)]).unwrap_err()),
        "target_r"
    );
    assert!(new(0.85, 0.85, &[("a", 6), ("b", 4)]).is_ok());
}

/// A tiny allocator state: one layer, r = 3, in = 2, out = 2.
fn tiny_views<'a>(
    name: &'a str,
    a: &'a [f32],
    b: &'a [f32],
    e: &'a mut [f32],
    g: &'a [f32],
) -> AdaLoraLayerView<'a> {
    AdaLoraLayerView {
        name,
        lora_a: a,
        grad_a: &g[..6],
        lora_b: b,
        grad_b: &g[..6],
        lora_e: e,
        grad_e: &g[..3],
        r: 3,
        in_features: 2,
        out_features: 2,
    }
}

#[test]
fn view_mismatches_and_phase_errors() {
    let s = AdaLoraSchedule {
        delta_t: 1,
        ..sched(3, 1, 0, 2, 6)
    };
    let (a, b, g) = (vec![1.0; 6], vec![1.0; 6], vec![0.5; 6]);
    let mut e = vec![1.0; 3];
    // Final mask without any update before: PEFT has no scores either.
    let mut alloc = RankAllocator::new(s, 0.85, 0.85, &[("x", 3)]).unwrap();
    let err = alloc
        .update_and_allocate(4, &mut [tiny_views("x", &a, &b, &mut e, &g)])
        .unwrap_err();
    assert_eq!(arg_name(err), "step");
    // Final phase without a rank pattern.
    let err = alloc
        .update_and_allocate(5, &mut [tiny_views("x", &a, &b, &mut e, &g)])
        .unwrap_err();
    assert_eq!(arg_name(err), "step");
    // ... works once one is set, and only zeroes E.
    let mut p = RankPattern::new();
    p.insert("x".into(), vec![true, false, true]);
    alloc.set_rank_pattern(p).unwrap();
    alloc
        .update_and_allocate(5, &mut [tiny_views("x", &a, &b, &mut e, &g)])
        .unwrap();
    assert_eq!(e, vec![1.0, 0.0, 1.0]);
    // Unknown name, wrong slice length.
    let err = alloc
        .update_and_allocate(1, &mut [tiny_views("y", &a, &b, &mut e, &g)])
        .unwrap_err();
    assert_eq!(arg_name(err), "layers");
    let mut v = tiny_views("x", &a, &b, &mut e, &g);
    v.grad_e = &g[..2];
    assert!(matches!(
        alloc.update_and_allocate(1, &mut [v]),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn ties_at_the_threshold_are_all_masked() {
    // Identical values and gradients in every rank: all triplet scores tie, so `<= threshold`
    // masks every rank even though the budget keeps some (PEFT's masked_fill with `<=`).
    let s = AdaLoraSchedule {
        delta_t: 1,
        ..sched(3, 1, 0, 2, 6)
    };
    let mut alloc = RankAllocator::new(s, 0.85, 0.85, &[("x", 3)]).unwrap();
    let (a, b, g) = (vec![1.0; 6], vec![1.0; 6], vec![0.5; 6]);
    let mut e = vec![1.0; 3];
    let got = alloc
        .update_and_allocate(1, &mut [tiny_views("x", &a, &b, &mut e, &g)])
        .unwrap()
        .unwrap();
    assert!(got.budget > 0);
    assert_eq!(e, vec![0.0; 3]);
    assert_eq!(alloc.rank_pattern().unwrap()["x"], vec![false; 3]);
}

fn lcg(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

#[test]
fn masking_equals_physically_dropping_the_ranks() {
    let be = Cpu;
    let (r, inp, out, t) = (6, 7, 5, 4);
    let keep = vec![true, false, true, true, false, true];
    let w = be.upload(&lcg(1, out * inp, 0.5), &[out, inp]).unwrap();
    let base = Linear::dense(w).unwrap();
    let a = lcg(2, r * inp, 0.4);
    let b = lcg(3, out * r, 0.4);
    let mut e = lcg(4, r, 1.0);
    let x = be.upload(&lcg(5, t * inp, 1.0), &[t, inp]).unwrap();
    let scaling = AdaLoraLayer::<Cpu>::scaling_for(8.0, r);

    // Mask through the allocator's final-phase path (zeroes E in place).
    let s = AdaLoraSchedule {
        delta_t: 1,
        ..sched(r, 2, 0, 1, 4)
    };
    let mut alloc = RankAllocator::new(s, 0.85, 0.85, &[("fc", r)]).unwrap();
    let mut p = RankPattern::new();
    p.insert("fc".into(), keep.clone());
    alloc.set_rank_pattern(p).unwrap();
    let zeros_a = vec![0.0; r * inp];
    let zeros_b = vec![0.0; out * r];
    let zeros_e = vec![0.0; r];
    alloc
        .update_and_allocate(
            10,
            &mut [AdaLoraLayerView {
                name: "fc",
                lora_a: &a,
                grad_a: &zeros_a,
                lora_b: &b,
                grad_b: &zeros_b,
                lora_e: &mut e,
                grad_e: &zeros_e,
                r,
                in_features: inp,
                out_features: out,
            }],
        )
        .unwrap();
    let layer = |a: &[f32], b: &[f32], e: &[f32], rr: usize| {
        AdaLoraLayer::from_factors(
            &base,
            be.upload(a, &[rr, inp]).unwrap(),
            be.upload(b, &[out, rr]).unwrap(),
            be.upload(e, &[rr, 1]).unwrap(),
            scaling,
            r as f32, // ranknum stays init_r after dropping, as PEFT's resize
        )
        .unwrap()
    };
    let masked = layer(&a, &b, &e, r);
    let y_masked = be
        .download(&masked.forward(&be, &base, &x).unwrap().0)
        .unwrap();

    let kept: KeptFactors = drop_masked_ranks(&a, &b, &e, inp, out, &keep).unwrap();
    assert_eq!(kept.kept, 4);
    assert_eq!(
        (kept.lora_a.len(), kept.lora_b.len(), kept.lora_e.len()),
        (4 * inp, out * 4, 4)
    );
    let dropped = layer(&kept.lora_a, &kept.lora_b, &kept.lora_e, 4);
    let y_dropped = be
        .download(&dropped.forward(&be, &base, &x).unwrap().0)
        .unwrap();
    for (i, (m, d)) in y_masked.iter().zip(&y_dropped).enumerate() {
        assert!((m - d).abs() <= 1e-5 + 1e-5 * d.abs(), "y[{i}]: {m} vs {d}");
    }

    // AdaLoraLayer::apply_rank_mask agrees with the allocator's in-place mask.
    let e_orig = lcg(4, r, 1.0);
    let mut l2 = layer(&a, &b, &e_orig, r);
    l2.apply_rank_mask(&be, &keep).unwrap();
    assert_eq!(be.download(&l2.lora_e).unwrap(), e);

    // Re-expanding: masked ranks come back as zeros, kept ones unchanged.
    let (a2, b2, e2) = expand_masked_ranks(&kept, inp, out, &keep).unwrap();
    assert_eq!(e2, e);
    for i in 0..r {
        let row = &a2[i * inp..(i + 1) * inp];
        if keep[i] {
            assert_eq!(row, &a[i * inp..(i + 1) * inp]);
        } else {
            assert!(row.iter().all(|&v| v == 0.0));
        }
        for k in 0..out {
            assert_eq!(b2[k * r + i], if keep[i] { b[k * r + i] } else { 0.0 });
        }
    }
    let y_expanded = be
        .download(&layer(&a2, &b2, &e2, r).forward(&be, &base, &x).unwrap().0)
        .unwrap();
    assert_eq!(y_expanded, y_masked);
    // All kept: unchanged; pattern length mismatch: error.
    let all = drop_masked_ranks(&a, &b, &e, inp, out, &[true; 6]).unwrap();
    assert_eq!(
        (all.lora_a, all.lora_b, all.lora_e),
        (a.clone(), b.clone(), e.clone())
    );
    assert!(drop_masked_ranks(&a, &b, &e, inp, out, &[true; 5]).is_err());
}

#[test]
fn rank_pattern_round_trips_through_peft_adapter_config() {
    let path = common::golden_file("adapters/mlp_adalora/adapter_config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let pattern = rank_pattern_from_adapter_config(&text, "default")
        .unwrap()
        .expect("the golden adapter has a rank pattern");
    assert_eq!(pattern["fc1"], vec![true, false, true, true, false, true]);
    assert_eq!(pattern["fc2"], vec![false, true, true, false, false, true]);
    let cfg: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(rank_pattern_to_json(&pattern), cfg["rank_pattern"]);
    // The in-training key form (`fc1.lora_E.default`) reads the same.
    let training = serde_json::json!({
        "fc1.lora_E.default": [true, false, true, true, false, true],
        "fc2.lora_E.default": [false, true, true, false, false, true],
    });
    assert_eq!(
        rank_pattern_from_json(&training, "default").unwrap(),
        pattern
    );
    // null / absent → None; bad keys and values → JSON errors.
    assert!(
        rank_pattern_from_adapter_config(r#"{"rank_pattern": null}"#, "default")
            .unwrap()
            .is_none()
    );
    assert!(
        rank_pattern_from_adapter_config("{}", "default")
            .unwrap()
            .is_none()
    );
    for bad in [
        serde_json::json!({"fc1.lora_A": [true]}),
        serde_json::json!({"fc1.lora_E": [2]}),
        serde_json::json!({"fc1.lora_E": true}),
        serde_json::json!([true]),
        serde_json::json!({"fc1.lora_E": [true], "fc1.lora_E.default": [true]}),
    ] {
        assert!(
            matches!(
                rank_pattern_from_json(&bad, "default"),
                Err(Error::Json { .. })
            ),
            "{bad}"
        );
    }
}

/// The device-resident allocator over the CPU backend runs the host allocator's own functions:
/// every step leaves the same bits (lora_E, EMAs, scores, threshold, rank pattern), with a NaN
/// gradient in one run (its rank's score is NaN: kept, as PEFT's `<=` keeps it).
#[test]
fn device_allocator_on_the_cpu_is_bit_identical_to_the_host_allocator() {
    let with_nan = twin::Scenario {
        nan_at: Some((5, 1, 4)),
        ..twin::scenario(7)
    };
    for sc in [twin::scenario(1), twin::scenario(2), with_nan] {
        let host = twin::run_host(&sc);
        let dev = twin::run_device(&Cpu, &sc);
        let masks = host.iter().filter(|h| h.masked_to.is_some()).count();
        assert!(masks >= 4, "the scenario should mask several times");
        for (h, d) in host.iter().zip(&dev) {
            let step = h.step;
            assert_eq!(h.masked_to, d.masked_to, "step {step}");
            for (l, (he, de)) in h.e.iter().zip(&d.e).enumerate() {
                assert_eq!(
                    twin::bits(he),
                    twin::bits(de),
                    "lora_E of layer {l}, step {step}"
                );
            }
            assert_eq!(h.ema.is_some(), d.ema.is_some(), "EMAs at step {step}");
            for (he, de) in h.ema.iter().flatten().zip(d.ema.iter().flatten()) {
                for (hv, dv) in he.iter().zip(de) {
                    assert_eq!(twin::bits(hv), twin::bits(dv), "EMA at step {step}");
                }
            }
            assert_eq!(
                h.scores.as_deref().map(twin::bits),
                d.scores.as_deref().map(twin::bits),
                "scores at step {step}"
            );
            assert_eq!(
                h.threshold.map(f32::to_bits),
                d.threshold.map(f32::to_bits),
                "threshold at step {step}"
            );
            assert_eq!(h.pattern, d.pattern, "rank pattern at step {step}");
        }
    }
}

/// The device allocator's argument and phase errors are the host's.
#[test]
fn device_allocator_errors_match_the_host_allocator() {
    use lorafuse::adapter::device_rank_allocator::{AdaLoraDeviceLayer, DeviceRankAllocator};
    let be = Cpu;
    let s = AdaLoraSchedule {
        delta_t: 1,
        ..sched(3, 1, 0, 2, 6)
    };
    let up = |v: &[f32], shape: &[usize]| be.upload(v, shape).unwrap();
    let (a, b, g) = (
        up(&[1.0; 6], &[3, 2]),
        up(&[1.0; 6], &[2, 3]),
        up(&[0.5; 6], &[3, 2]),
    );
    let gb = up(&[0.5; 6], &[2, 3]);
    let ge = up(&[0.5; 3], &[3, 1]);
    let mut e = up(&[1.0; 3], &[3, 1]);
    let mut alloc = DeviceRankAllocator::new(&be, s, 0.85, 0.85, &[("x", 3)]).unwrap();
    let mut run =
        |alloc: &mut DeviceRankAllocator<Cpu>, name: &str, step: u64, ge: &Tensor<Cpu>| {
            alloc.update_and_allocate(
                &be,
                step,
                &mut [AdaLoraDeviceLayer {
                    name,
                    lora_a: &a,
                    grad_a: &g,
                    lora_b: &b,
                    grad_b: &gb,
                    lora_e: &mut e,
                    grad_e: ge,
                }],
            )
        };
    // The final mask without any update, the final phase without a pattern: "step".
    assert_eq!(arg_name(run(&mut alloc, "x", 4, &ge).unwrap_err()), "step");
    assert_eq!(arg_name(run(&mut alloc, "x", 5, &ge).unwrap_err()), "step");
    assert!(alloc.rank_pattern(&be).unwrap().is_none());
    // Unknown layer; a gradient of the wrong shape.
    assert_eq!(
        arg_name(run(&mut alloc, "y", 1, &ge).unwrap_err()),
        "layers"
    );
    let bad = up(&[0.5; 2], &[2, 1]);
    assert!(matches!(
        run(&mut alloc, "x", 1, &bad),
        Err(Error::Shape { .. })
    ));
    // A set pattern is re-applied in the final phase, and read back as set.
    let mut p = RankPattern::new();
    p.insert("x".into(), vec![true, false, true]);
    alloc.set_rank_pattern(&be, p.clone()).unwrap();
    run(&mut alloc, "x", 5, &ge).unwrap();
    assert_eq!(e.data(), &[1.0, 0.0, 1.0]);
    assert_eq!(alloc.rank_pattern(&be).unwrap(), Some(p));
    // Invalid settings are refused as the host refuses them.
    assert_eq!(
        arg_name(
            DeviceRankAllocator::new(&be, s, 1.0, 0.85, &[("x", 3)])
                .err()
                .unwrap()
        ),
        "beta1"
    );
}

/// The CPU backend's regularizer is `orth_reg_total` added into the gradients, bit for bit
/// (what the host path did: upload the gradients and `axpy` them with 1).
#[test]
fn orth_reg_on_the_cpu_backend_is_orth_reg_total() {
    let be = Cpu;
    let dims = [(3usize, 5usize, 4usize), (1, 2, 7), (6, 9, 3)];
    let host: Vec<(Vec<f32>, Vec<f32>)> = dims
        .iter()
        .enumerate()
        .map(|(i, &(r, inp, out))| {
            (
                lcg(10 + i as u64, r * inp, 0.7),
                lcg(20 + i as u64, out * r, 0.7),
            )
        })
        .collect();
    let inputs: Vec<OrthRegInput> = host
        .iter()
        .zip(&dims)
        .map(|((a, b), &(r, inp, out))| OrthRegInput {
            lora_a: a,
            lora_b: b,
            r,
            in_features: inp,
            out_features: out,
        })
        .collect();
    let want = orth_reg_total(&inputs, 0.3).unwrap();
    let t: Vec<(Tensor<Cpu>, Tensor<Cpu>)> = host
        .iter()
        .zip(&dims)
        .map(|((a, b), &(r, inp, out))| {
            (
                be.upload(a, &[r, inp]).unwrap(),
                be.upload(b, &[out, r]).unwrap(),
            )
        })
        .collect();
    let g0: Vec<(Vec<f32>, Vec<f32>)> = (0..dims.len())
        .map(|i| {
            (
                lcg(30 + i as u64, host[i].0.len(), 1.0),
                lcg(40 + i as u64, host[i].1.len(), 1.0),
            )
        })
        .collect();
    let mut grads: Vec<(Tensor<Cpu>, Tensor<Cpu>)> = g0
        .iter()
        .zip(&t)
        .map(|((ga, gb), (a, b))| {
            (
                be.upload(ga, a.shape()).unwrap(),
                be.upload(gb, b.shape()).unwrap(),
            )
        })
        .collect();
    let factors: Vec<(&Tensor<Cpu>, &Tensor<Cpu>)> = t.iter().map(|(a, b)| (a, b)).collect();
    let mut pairs: Vec<(&mut Tensor<Cpu>, &mut Tensor<Cpu>)> =
        grads.iter_mut().map(|(a, b)| (a, b)).collect();
    let loss = be.adalora_orth_reg(&factors, &mut pairs, 0.3).unwrap();
    assert_eq!(loss.data(), &[want.loss]);
    // A negative weight is refused (naming it) before any gradient moves.
    assert_eq!(
        arg_name(be.adalora_orth_reg(&factors, &mut pairs, -1.0).unwrap_err()),
        "orth_reg_weight"
    );
    for (i, ((ga, gb), (wa, wb))) in grads.iter().zip(&want.grads).enumerate() {
        let sum = |g: &[f32], w: &[f32]| -> Vec<u32> {
            g.iter()
                .zip(w)
                .map(|(g, w)| (g + 1.0 * w).to_bits())
                .collect()
        };
        assert_eq!(twin::bits(ga.data()), sum(&g0[i].0, wa), "grad_A {i}");
        assert_eq!(twin::bits(gb.data()), sum(&g0[i].1, wb), "grad_B {i}");
    }
    // No layers: 0.
    assert_eq!(
        be.adalora_orth_reg(&[], &mut [], 0.5).unwrap().data(),
        &[0.0]
    );
}
