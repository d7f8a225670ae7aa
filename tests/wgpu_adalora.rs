//! AdaLoRA's rank allocator and orthogonal regularizer on the wgpu backend against the CPU
//! reference: every allocator kernel over odd shapes (in/out not multiples of 4, in = 1) and
//! ranks 1 to 64, kthvalue and the masks bit for bit (ties, NaN, signed zeros), the
//! regularizer's loss and gradients, the deferred cross-entropy, one readback for several
//! tensors, and the device-resident allocator over a whole schedule giving the CPU's rank
//! patterns with nothing read back. Runs with subgroup reductions and with the
//! workgroup-memory fallback. Skips loudly without a Vulkan/Metal/DX12 adapter;
//! `LORAFUSE_REQUIRE=wgpu` fails instead.
#![cfg(feature = "wgpu")]

mod common;
#[path = "common/gpu.rs"]
mod gpu;
#[path = "common/adalora_twin.rs"]
mod twin;

use gpu::*;
use lorafuse::adapter::device_rank_allocator::DeviceRankAllocator;
use lorafuse::backend::{AdaLoraIpt, cross_entropy_loss};
use lorafuse::{Backend, Cpu, Tensor, Wgpu};

/// `(in, out)` of the layers.
const DIMS: [(usize, usize); 4] = [(5, 3), (67, 70), (130, 9), (1, 2)];
const RANKS: [usize; 3] = [1, 7, 64];

/// Values in `[0, 1)`: EMAs are non-negative.
fn nonneg_pair(be: &Wgpu, shape: &[usize], seed: u64) -> (Tensor<Cpu>, Tensor<Wgpu>) {
    let v: Vec<f32> = rand_vec(shape.iter().product(), seed)
        .iter()
        .map(|v| 0.5 * (v + 1.0))
        .collect();
    pair(be, &v, shape)
}

fn ipt_pair(
    be: &Wgpu,
    r: usize,
    din: usize,
    dout: usize,
    s: u64,
) -> (AdaLoraIpt<Cpu>, AdaLoraIpt<Wgpu>) {
    let p = |shape: &[usize], k: u64| nonneg_pair(be, shape, s + k);
    let (ia, ia_g) = p(&[r, din], 1);
    let (ua, ua_g) = p(&[r, din], 2);
    let (ib, ib_g) = p(&[dout, r], 3);
    let (ub, ub_g) = p(&[dout, r], 4);
    let (ie, ie_g) = p(&[r, 1], 5);
    let (ue, ue_g) = p(&[r, 1], 6);
    (
        AdaLoraIpt {
            ipt_a: ia,
            unc_a: ua,
            ipt_b: ib,
            unc_b: ub,
            ipt_e: ie,
            unc_e: ue,
        },
        AdaLoraIpt {
            ipt_a: ia_g,
            unc_a: ua_g,
            ipt_b: ib_g,
            unc_b: ub_g,
            ipt_e: ie_g,
            unc_e: ue_g,
        },
    )
}

fn update_and_score_cases(be: &Wgpu, label: &str) {
    for (i, &(din, dout)) in DIMS.iter().enumerate() {
        for &r in &RANKS {
            let s = 100 * i as u64 + r as u64;
            let what = format!("{label} in={din} out={dout} r={r}");
            // The EMA update, on each of the three factor shapes.
            for (shape, k) in [([r, din], 0u64), ([dout, r], 10), ([r, 1], 20)] {
                let (pc, pg) = rand_pair(be, &shape, s + k);
                let (gc, gg) = rand_pair(be, &shape, s + k + 1);
                let (mut ic, mut ig) = nonneg_pair(be, &shape, s + k + 2);
                let (mut uc, mut ug) = nonneg_pair(be, &shape, s + k + 3);
                for _ in 0..2 {
                    be.adalora_update_ipt(&pg, &gg, &mut ig, &mut ug, 0.85, 0.95)
                        .unwrap();
                    Cpu.adalora_update_ipt(&pc, &gc, &mut ic, &mut uc, 0.85, 0.95)
                        .unwrap();
                }
                assert_tensor(be, &format!("{what} {shape:?} ipt"), &ig, &ic, 2e-6);
                assert_tensor(be, &format!("{what} {shape:?} unc"), &ug, &uc, 2e-6);
            }
            // The triplet scores into a slice of a larger buffer (the rest untouched).
            let (ec, eg) = ipt_pair(be, r, din, dout, s);
            let (off, n) = (5, 5 + r + 3);
            let (mut sc, mut sg) = rand_pair(be, &[n], s + 30);
            be.adalora_triplet_scores(&eg, &mut sg, off).unwrap();
            Cpu.adalora_triplet_scores(&ec, &mut sc, off).unwrap();
            assert_tensor(be, &format!("{what} scores"), &sg, &sc, 2e-6);
        }
    }
}

#[test]
fn update_ipt_and_triplet_scores_match_cpu() {
    for (mode, be) in wgpu_modes("update_ipt_and_triplet_scores_match_cpu") {
        update_and_score_cases(&be, mode);
    }
    // 1 KiB bindings: the row and column sums of the scores and the EMA update run in ranges.
    let Ok(be) = Wgpu::with_max_binding(1024) else {
        let _ = wgpu("update_ipt_and_triplet_scores_match_cpu");
        return;
    };
    update_and_score_cases(&be, "1 KiB bindings");
}

/// Scores with ties, signed zeros, negative values and (with `nan`) NaNs of both signs.
fn tricky_scores(n: usize, seed: u64, nan: bool) -> Vec<f32> {
    let mut v: Vec<f32> = rand_vec(n, seed).iter().map(|x| x * 0.5 + 0.25).collect();
    for i in (0..n).step_by(7) {
        v[i] = v[i / 2]; // ties
    }
    if n > 8 {
        v[1] = 0.0;
        v[2] = -0.0;
        v[3] = v[0];
        if nan {
            v[4] = f32::NAN;
            v[n - 1] = -f32::NAN;
        }
    }
    v
}

#[test]
fn kthvalue_and_masks_match_cpu_bit_for_bit() {
    let Some(be) = wgpu("kthvalue_and_masks_match_cpu_bit_for_bit") else {
        return;
    };
    for (case, &n) in [1usize, 5, 255, 256, 257, 700, 3001].iter().enumerate() {
        for nan in [false, true] {
            let v = tricky_scores(n, 7 + case as u64, nan);
            let (sc, sg) = pair(&be, &v, &[n]);
            for k in [1, n.div_ceil(3), n.div_ceil(2), n] {
                let what = format!("n={n} k={k} nan={nan}");
                let tc = Cpu.adalora_threshold(&sc, k).unwrap();
                let tg = be.adalora_threshold(&sg, k).unwrap();
                assert_eq!(
                    twin::bits(&be.download(&tg).unwrap()),
                    twin::bits(tc.data()),
                    "{what}: threshold"
                );
                let kc = Cpu.adalora_rank_mask(&sc, &tc).unwrap();
                let kg = be.adalora_rank_mask(&sg, &tg).unwrap();
                assert_eq!(
                    twin::bits(&be.download(&kg).unwrap()),
                    twin::bits(kc.data()),
                    "{what}: keep"
                );
                // Masking lora_E of layers laid out along the scores.
                let mut off = 0;
                for r in [1usize, 3, 64] {
                    if off + r > n {
                        break;
                    }
                    let (mut ec, mut eg) = rand_pair(&be, &[r, 1], (off + r) as u64);
                    Cpu.adalora_apply_mask(&mut ec, &kc, off).unwrap();
                    be.adalora_apply_mask(&mut eg, &kg, off).unwrap();
                    assert_eq!(
                        twin::bits(&be.download(&eg).unwrap()),
                        twin::bits(ec.data()),
                        "{what}: lora_E at {off}"
                    );
                    off += r;
                }
            }
        }
    }
}

type Layer = (Tensor<Cpu>, Tensor<Cpu>, Tensor<Wgpu>, Tensor<Wgpu>);

fn orth_case(be: &Wgpu, dims: &[(usize, usize, usize)], weight: f32, scale: f32, what: &str) {
    let layers: Vec<Layer> = dims
        .iter()
        .enumerate()
        .map(|(i, &(r, din, dout))| {
            let a: Vec<f32> = rand_vec(r * din, 50 + i as u64)
                .iter()
                .map(|x| x * scale)
                .collect();
            let b: Vec<f32> = rand_vec(dout * r, 60 + i as u64)
                .iter()
                .map(|x| x * scale)
                .collect();
            let (ac, ag) = pair(be, &a, &[r, din]);
            let (bc, bg) = pair(be, &b, &[dout, r]);
            (ac, bc, ag, bg)
        })
        .collect();
    let mut gc: Vec<(Tensor<Cpu>, Tensor<Cpu>)> = Vec::new();
    let mut gg: Vec<(Tensor<Wgpu>, Tensor<Wgpu>)> = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let (ac, ag) = rand_pair(be, l.0.shape(), 70 + i as u64);
        let (bc, bg) = rand_pair(be, l.1.shape(), 80 + i as u64);
        gc.push((ac, bc));
        gg.push((ag, bg));
    }
    let fc: Vec<(&Tensor<Cpu>, &Tensor<Cpu>)> = layers.iter().map(|l| (&l.0, &l.1)).collect();
    let fg: Vec<(&Tensor<Wgpu>, &Tensor<Wgpu>)> = layers.iter().map(|l| (&l.2, &l.3)).collect();
    let lc = {
        let mut p: Vec<_> = gc.iter_mut().map(|(a, b)| (a, b)).collect();
        Cpu.adalora_orth_reg(&fc, &mut p, weight).unwrap()
    };
    let lg = {
        let mut p: Vec<_> = gg.iter_mut().map(|(a, b)| (a, b)).collect();
        be.adalora_orth_reg(&fg, &mut p, weight).unwrap()
    };
    assert_tensor(be, &format!("{what} loss"), &lg, &lc, 2e-5);
    for (i, ((ga, gb), (ca, cb))) in gg.iter().zip(&gc).enumerate() {
        assert_tensor(be, &format!("{what} grad_A {i}"), ga, ca, 2e-5);
        assert_tensor(be, &format!("{what} grad_B {i}"), gb, cb, 2e-5);
    }
}

#[test]
fn orth_reg_matches_cpu() {
    for (mode, be) in wgpu_modes("orth_reg_matches_cpu") {
        let dims = [(1, 5, 3), (7, 67, 70), (64, 130, 9), (3, 1, 2)];
        // Far from orthogonal (large norms), and near PEFT's N(0, 0.02) init (norm ~ sqrt(2r)).
        orth_case(&be, &dims, 0.5, 0.5, &format!("{mode} 0.5"));
        orth_case(&be, &dims, 0.1, 0.02, &format!("{mode} init"));
        orth_case(&be, &dims[..1], 0.0, 0.5, &format!("{mode} weight 0"));
        orth_case(&be, &[], 0.5, 0.5, &format!("{mode} no layers"));
        // Orthonormal rows of A and columns of B: norm 0, gradient 0 (exactly, as torch).
        let (ac, ag) = pair(&be, &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], &[2, 3]);
        let (bc, bg) = pair(&be, &[0.0, 1.0, 1.0, 0.0, 0.0, 0.0], &[3, 2]);
        let (mut g1c, mut g1g) = rand_pair(&be, &[2, 3], 1);
        let (mut g2c, mut g2g) = rand_pair(&be, &[3, 2], 2);
        let l = be
            .adalora_orth_reg(&[(&ag, &bg)], &mut [(&mut g1g, &mut g2g)], 0.5)
            .unwrap();
        Cpu.adalora_orth_reg(&[(&ac, &bc)], &mut [(&mut g1c, &mut g2c)], 0.5)
            .unwrap();
        assert_eq!(be.download(&l).unwrap(), vec![0.0]);
        assert_tensor(&be, "orthonormal grad_A", &g1g, &g1c, 0.0);
        assert_tensor(&be, "orthonormal grad_B", &g2g, &g2c, 0.0);
    }
}

#[test]
fn cross_entropy_stats_match_cpu() {
    for (mode, be) in wgpu_modes("cross_entropy_stats_match_cpu") {
        for (n, vocab) in [(1, 3), (9, 97), (33, 1000)] {
            let (lc, lg) = rand_pair(&be, &[n, vocab], (n * vocab) as u64);
            let lab: Vec<i32> = (0..n)
                .map(|i| {
                    if i % 4 == 1 {
                        -100
                    } else {
                        (i * 31 % vocab) as i32
                    }
                })
                .collect();
            let what = format!("{mode} {n}x{vocab}");
            let (sc, dc) = Cpu.cross_entropy_stats(&lc, &lab, 0.25).unwrap();
            let (sg, dg) = be.cross_entropy_stats(&lg, &lab, 0.25).unwrap();
            assert_eq!(sg.shape(), sc.shape(), "{what}: stats shape");
            assert_tensor(&be, &format!("{what} stats"), &sg, &sc, 2e-6);
            assert_tensor(&be, &format!("{what} dlogits"), &dg, &dc, 1e-5);
            let (want, _) = Cpu.cross_entropy(&lc, &lab, 0.25).unwrap();
            let got = cross_entropy_loss(&be.download(&sg).unwrap());
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "{what}: loss {got} vs {want}"
            );
            assert!(
                (cross_entropy_loss(sc.data()) - want).abs() <= 1e-12 * want.abs(),
                "{what}: the CPU's stats give its loss"
            );
        }
        // No counted row: no stats, a zero gradient.
        let (_, lg) = rand_pair(&be, &[2, 5], 3);
        let (sg, dg) = be.cross_entropy_stats(&lg, &[-100, -1], 1.0).unwrap();
        assert_eq!(sg.shape(), &[0, 3]);
        assert_eq!(be.download(&dg).unwrap(), vec![0.0; 10]);
    }
}

#[test]
fn download_many_reads_back_once() {
    let Some(be) = wgpu("download_many_reads_back_once") else {
        return;
    };
    let a = be.upload(&rand_vec(1000, 1), &[10, 100]).unwrap();
    let b = be.upload(&[3.5], &[1]).unwrap();
    let empty = be.zeros(&[0, 3]).unwrap();
    let frozen = be.upload_frozen(&[0.5, -1.25, 2.0], &[3]).unwrap();
    let c = be.upload(&rand_vec(7, 2), &[7]).unwrap();
    let ts = [&a, &b, &empty, &frozen, &c];
    let one_by_one: Vec<Vec<f32>> = ts.iter().map(|t| be.download(t).unwrap()).collect();
    let before = be.readbacks();
    let all = be.download_many(&ts).unwrap();
    assert_eq!(be.readbacks() - before, 1, "one readback for every tensor");
    assert_eq!(all, one_by_one);
    // Nothing to read: no readback.
    let before = be.readbacks();
    assert_eq!(
        be.download_many(&[&empty]).unwrap(),
        vec![Vec::<f32>::new()]
    );
    assert_eq!(be.readbacks(), before);
}

#[test]
fn device_allocator_matches_cpu_and_reads_nothing_back() {
    let Some(be) = wgpu("device_allocator_matches_cpu_and_reads_nothing_back") else {
        return;
    };
    let with_nan = twin::Scenario {
        nan_at: Some((5, 1, 4)),
        ..twin::scenario(7)
    };
    for sc in [twin::scenario(1), twin::scenario(2), with_nan] {
        let cpu = twin::run_device(&Cpu, &sc);
        let gpu = twin::run_device(&be, &sc);
        for (c, g) in cpu.iter().zip(&gpu) {
            let step = c.step;
            assert_eq!(c.masked_to, g.masked_to, "step {step}");
            assert_eq!(c.pattern, g.pattern, "rank pattern at step {step}");
            for (l, (ce, ge)) in c.e.iter().zip(&g.e).enumerate() {
                assert_close(&format!("lora_E {l} at {step}"), ge, ce, 1e-6, 0.0);
            }
            if let (Some(cs), Some(gs)) = (&c.scores, &g.scores) {
                // A NaN score (from the NaN gradient) must be NaN on both.
                let nan: Vec<bool> = cs.iter().map(|v| v.is_nan()).collect();
                assert_eq!(nan, gs.iter().map(|v| v.is_nan()).collect::<Vec<_>>());
                let finite = |v: &[f32]| -> Vec<f32> {
                    v.iter()
                        .map(|&x| if x.is_nan() { 0.0 } else { x })
                        .collect()
                };
                assert_close(
                    &format!("scores at {step}"),
                    &finite(gs),
                    &finite(cs),
                    1e-5,
                    0.0,
                );
                let (ct, gt) = (c.threshold.unwrap(), g.threshold.unwrap());
                assert!(
                    (ct - gt).abs() <= 1e-5 * ct.abs(),
                    "threshold at {step}: {gt} vs {ct}"
                );
            }
        }
    }
    // The same schedule without recording: no readback at any step, masks included.
    let sc = twin::scenario(3);
    let names: Vec<(&str, usize)> = sc.layers.iter().map(|l| (l.0.as_str(), l.1)).collect();
    let mut alloc =
        DeviceRankAllocator::new(&be, sc.schedule, sc.betas.0, sc.betas.1, &names).unwrap();
    let t: Vec<[Tensor<Wgpu>; 6]> = sc
        .layers
        .iter()
        .enumerate()
        .map(|(i, &(_, r, din, dout))| {
            let shapes = [[r, din], [r, din], [dout, r], [dout, r], [r, 1], [r, 1]];
            std::array::from_fn(|k| {
                let s = &shapes[k];
                be.upload(&rand_vec(s[0] * s[1], (10 * i + k) as u64), s)
                    .unwrap()
            })
        })
        .collect();
    let mut es: Vec<Tensor<Wgpu>> = t.iter().map(|d| d[4].clone()).collect();
    let before = be.readbacks();
    for step in 1..=sc.steps {
        let mut views = twin::device_views(&sc, &mut es, &t);
        alloc.update_and_allocate(&be, step, &mut views).unwrap();
    }
    be.synchronize().unwrap();
    assert_eq!(be.readbacks(), before, "the allocator read something back");
    // The pattern, when asked for: one readback.
    assert!(alloc.rank_pattern(&be).unwrap().is_some());
    assert_eq!(be.readbacks(), before + 1);
}

#[test]
fn bad_inputs_give_the_cpu_errors() {
    let Some(be) = wgpu("bad_inputs_give_the_cpu_errors") else {
        return;
    };
    let (pc, pg) = rand_pair(&be, &[3, 4], 1);
    let (qc, qg) = rand_pair(&be, &[4, 3], 2);
    let (mut ic, mut ig) = rand_pair(&be, &[3, 4], 3);
    let (mut uc, mut ug) = rand_pair(&be, &[3, 4], 4);
    same_error(
        "update_ipt, grad of another shape",
        be.adalora_update_ipt(&pg, &qg, &mut ig, &mut ug, 0.85, 0.85),
        Cpu.adalora_update_ipt(&pc, &qc, &mut ic, &mut uc, 0.85, 0.85),
    );
    same_error(
        "update_ipt, beta2 = 1",
        be.adalora_update_ipt(&pg, &pg, &mut ig, &mut ug, 0.85, 1.0),
        Cpu.adalora_update_ipt(&pc, &pc, &mut ic, &mut uc, 0.85, 1.0),
    );
    let (ec, eg) = ipt_pair(&be, 3, 4, 5, 9);
    let (mut sc, mut sg) = rand_pair(&be, &[6], 5);
    same_error(
        "triplet scores beyond the buffer",
        be.adalora_triplet_scores(&eg, &mut sg, 4),
        Cpu.adalora_triplet_scores(&ec, &mut sc, 4),
    );
    let mut bad_g = eg.clone();
    let mut bad_c = ec.clone();
    bad_g.unc_b = be.zeros(&[5, 2]).unwrap();
    bad_c.unc_b = Cpu.zeros(&[5, 2]).unwrap();
    same_error(
        "triplet scores, EMAs that disagree",
        be.adalora_triplet_scores(&bad_g, &mut sg, 0),
        Cpu.adalora_triplet_scores(&bad_c, &mut sc, 0),
    );
    for k in [0, 7] {
        same_error(
            &format!("kthvalue k = {k}"),
            be.adalora_threshold(&sg, k),
            Cpu.adalora_threshold(&sc, k),
        );
    }
    same_error(
        "rank mask, threshold of 2 values",
        be.adalora_rank_mask(&sg, &sg),
        Cpu.adalora_rank_mask(&sc, &sc),
    );
    let (mut e2c, mut e2g) = rand_pair(&be, &[3], 6);
    same_error(
        "apply mask, E not [r, 1]",
        be.adalora_apply_mask(&mut e2g, &sg, 0),
        Cpu.adalora_apply_mask(&mut e2c, &sc, 0),
    );
    let (mut e3c, mut e3g) = rand_pair(&be, &[3, 1], 7);
    same_error(
        "apply mask beyond the keep-mask",
        be.adalora_apply_mask(&mut e3g, &sg, 5),
        Cpu.adalora_apply_mask(&mut e3c, &sc, 5),
    );
    let (mut gac, mut gag) = rand_pair(&be, &[3, 4], 8);
    let (mut gbc, mut gbg) = rand_pair(&be, &[4, 3], 9);
    same_error(
        "orth reg, a negative weight",
        be.adalora_orth_reg(&[(&pg, &qg)], &mut [(&mut gag, &mut gbg)], -0.5),
        Cpu.adalora_orth_reg(&[(&pc, &qc)], &mut [(&mut gac, &mut gbc)], -0.5),
    );
    same_error(
        "orth reg, more layers than gradients",
        be.adalora_orth_reg(&[(&pg, &qg), (&pg, &qg)], &mut [(&mut gag, &mut gbg)], 0.5),
        Cpu.adalora_orth_reg(&[(&pc, &qc), (&pc, &qc)], &mut [(&mut gac, &mut gbc)], 0.5),
    );
    same_error(
        "orth reg, grad_B of another shape",
        be.adalora_orth_reg(&[(&pg, &qg)], &mut [(&mut gag, &mut ug)], 0.5),
        Cpu.adalora_orth_reg(&[(&pc, &qc)], &mut [(&mut gac, &mut uc)], 0.5),
    );
}
