//! AdaLoRA's rank allocator kernels (PEFT `RankAllocator`) and its orthogonal regularizer:
//! the EMA update and the triplet scores within the backend's tolerance, kthvalue, the
//! keep-mask and the masking of lora_E bit for bit (ties, signed zeros, NaNs of both signs),
//! the regularizer's loss and gradients, and the device-resident allocator over whole
//! schedules giving the CPU's rank patterns.

use super::harness::*;
use crate::twin;
use lorafuse::backend::AdaLoraIpt;
use lorafuse::{Backend, Cpu, Tensor};

/// `(in, out, r)`: the old wgpu grid (in/out not multiples of 4, in = 1; r 1 to 64) and the
/// old CUDA grid.
fn dims() -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for (din, dout) in [(5, 3), (67, 70), (130, 9), (1, 2)] {
        for r in [1, 7, 64] {
            v.push((din, dout, r));
        }
    }
    v.extend([
        (37, 29, 1),
        (61, 45, 7),
        (37, 29, 64),
        (83, 67, 16),
        (136, 72, 5),
    ]);
    v
}

fn ipt<B: Backend>(
    be: &B,
    tol: &Tol,
    r: usize,
    din: usize,
    dout: usize,
    s: u64,
) -> (AdaLoraIpt<Cpu>, AdaLoraIpt<B>) {
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
        AdaLoraIpt {
            ipt_a: ia.c,
            unc_a: ua.c,
            ipt_b: ib.c,
            unc_b: ub.c,
            ipt_e: ie.c,
            unc_e: ue.c,
        },
        AdaLoraIpt {
            ipt_a: ia.g,
            unc_a: ua.g,
            ipt_b: ib.g,
            unc_b: ub.g,
            ipt_e: ie.g,
            unc_e: ue.g,
        },
    )
}

/// Two EMA updates on each of the three factor shapes; the triplet scores into a slice of a
/// larger buffer (the rest untouched).
pub fn update_and_scores<B: Backend>(be: &B, tol: &Tol) {
    for (i, (din, dout, r)) in dims().into_iter().enumerate() {
        let s = 100 * i as u64 + r as u64;
        let what = format!("in={din} out={dout} r={r}");
        for (shape, k) in [([r, din], 0u64), ([dout, r], 10), ([r, 1], 20)] {
            let p = rand(be, tol, &shape, s + k, 1.0);
            let g = rand(be, tol, &shape, s + k + 1, 1.0);
            let mut ipt = nonneg(be, tol, &shape, s + k + 2);
            let mut unc = nonneg(be, tol, &shape, s + k + 3);
            for _ in 0..2 {
                be.adalora_update_ipt(&p.g, &g.g, &mut ipt.g, &mut unc.g, 0.85, 0.95)
                    .unwrap();
                Cpu.adalora_update_ipt(&p.c, &g.c, &mut ipt.c, &mut unc.c, 0.85, 0.95)
                    .unwrap();
            }
            tol.close(
                be,
                &format!("{what} {shape:?} ipt"),
                &ipt.g,
                &ipt.c,
                tol.ema,
            );
            tol.close(
                be,
                &format!("{what} {shape:?} unc"),
                &unc.g,
                &unc.c,
                tol.ema,
            );
        }
        let (ec, eg) = ipt(be, tol, r, din, dout, s);
        let (off, n) = (5, 5 + r + 3);
        let mut sc = rand(be, tol, &[n], s + 30, 1.0);
        be.adalora_triplet_scores(&eg, &mut sc.g, off).unwrap();
        Cpu.adalora_triplet_scores(&ec, &mut sc.c, off).unwrap();
        tol.close(be, &format!("{what} scores"), &sc.g, &sc.c, tol.ema);
    }
}

/// Scores with ties, signed zeros, negative values and (with `nan`) NaNs of both signs.
fn tricky_scores(n: usize, seed: u64, nan: bool) -> Vec<f32> {
    let mut v: Vec<f32> = vals(n, seed, 1.0).iter().map(|x| x * 0.5 + 0.25).collect();
    for i in (0..n).step_by(7) {
        v[i] = v[i / 2]; // ties
    }
    for i in (0..n).step_by(5) {
        v[i] = v[i / 3]; // more ties
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

/// kthvalue, the keep-mask and the masking of lora_E of layers laid out along the scores, on
/// scores rounded to the storage precision: bit for bit.
pub fn kthvalue_and_masks<B: Backend>(be: &B, tol: &Tol) {
    for (case, &n) in [1usize, 5, 7, 255, 256, 257, 700, 3001].iter().enumerate() {
        for nan in [false, true] {
            let v = tol.round(&tricky_scores(n, 7 + case as u64, nan));
            let sp = pair(be, tol, &v, &[n]);
            for k in [1, n.div_ceil(3), n.div_ceil(2), n] {
                let what = format!("n={n} k={k} nan={nan}");
                let tc = Cpu.adalora_threshold(&sp.c, k).unwrap();
                let tg = be.adalora_threshold(&sp.g, k).unwrap();
                bits_t(be, &format!("{what}: threshold"), &tg, &tc);
                let kc = Cpu.adalora_rank_mask(&sp.c, &tc).unwrap();
                let kg = be.adalora_rank_mask(&sp.g, &tg).unwrap();
                bits_t(be, &format!("{what}: keep"), &kg, &kc);
                // layers at offsets 0, 1, 4 (while they fit), and one ending at the last score
                let mut layers = Vec::new();
                let mut off = 0;
                for r in [1usize, 3, 64] {
                    if off + r > n {
                        break;
                    }
                    layers.push((off, r));
                    off += r;
                }
                layers.push((n - n.min(5), n.min(5)));
                for (off, r) in layers {
                    let mut e = rand(be, tol, &[r, 1], (off + r + k) as u64, 1.0);
                    Cpu.adalora_apply_mask(&mut e.c, &kc, off).unwrap();
                    be.adalora_apply_mask(&mut e.g, &kg, off).unwrap();
                    bits_t(be, &format!("{what}: lora_E at {off}"), &e.g, &e.c);
                }
            }
        }
    }
}

type Layer<B> = (Pair<B>, Pair<B>);

/// The regularizer over `dims` `(r, in, out)` layers with factors within `scale`: the loss
/// and the gradients it adds into random ones.
fn orth_case<B: Backend>(
    be: &B,
    tol: &Tol,
    dims: &[(usize, usize, usize)],
    weight: f32,
    scale: f32,
    what: &str,
) {
    let layers: Vec<Layer<B>> = dims
        .iter()
        .enumerate()
        .map(|(i, &(r, din, dout))| {
            (
                rand(be, tol, &[r, din], 50 + i as u64, scale),
                rand(be, tol, &[dout, r], 60 + i as u64, scale),
            )
        })
        .collect();
    let mut grads: Vec<Layer<B>> = layers
        .iter()
        .enumerate()
        .map(|(i, (a, b))| {
            (
                rand(be, tol, a.c.shape(), 70 + i as u64, 1.0),
                rand(be, tol, b.c.shape(), 80 + i as u64, 1.0),
            )
        })
        .collect();
    let fc: Vec<(&Tensor<Cpu>, &Tensor<Cpu>)> = layers.iter().map(|(a, b)| (&a.c, &b.c)).collect();
    let fg: Vec<(&Tensor<B>, &Tensor<B>)> = layers.iter().map(|(a, b)| (&a.g, &b.g)).collect();
    let lc = {
        let mut p: Vec<_> = grads
            .iter_mut()
            .map(|(a, b)| (&mut a.c, &mut b.c))
            .collect();
        Cpu.adalora_orth_reg(&fc, &mut p, weight).unwrap()
    };
    let lg = {
        let mut p: Vec<_> = grads
            .iter_mut()
            .map(|(a, b)| (&mut a.g, &mut b.g))
            .collect();
        be.adalora_orth_reg(&fg, &mut p, weight).unwrap()
    };
    tol.close(be, &format!("{what} loss"), &lg, &lc, tol.orth_loss);
    for (i, (ga, gb)) in grads.iter().enumerate() {
        tol.close(
            be,
            &format!("{what} grad_A {i}"),
            &ga.g,
            &ga.c,
            tol.orth_grad,
        );
        tol.close(
            be,
            &format!("{what} grad_B {i}"),
            &gb.g,
            &gb.c,
            tol.orth_grad,
        );
    }
}

pub fn orth_reg<B: Backend>(be: &B, tol: &Tol) {
    let dims = [(1, 5, 3), (7, 67, 70), (64, 130, 9), (3, 1, 2)];
    // Far from orthogonal (large norms), and near PEFT's N(0, 0.02) init (norm ~ sqrt(2r)).
    orth_case(be, tol, &dims, 0.5, 0.5, "0.5");
    orth_case(be, tol, &dims, 0.1, 0.02, "init");
    orth_case(be, tol, &dims[..1], 0.0, 0.5, "weight 0");
    orth_case(be, tol, &[], 0.5, 0.5, "no layers");
    orth_case(
        be,
        tol,
        &[(1, 37, 29), (7, 61, 45), (64, 83, 67)],
        0.5,
        0.3,
        "cuda grid",
    );
    // Orthonormal rows of A and columns of B: norm 0, gradient 0 (exactly, as torch).
    let a = pair(be, tol, &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], &[2, 3]);
    let b = pair(be, tol, &[0.0, 1.0, 1.0, 0.0, 0.0, 0.0], &[3, 2]);
    let mut g1 = rand(be, tol, &[2, 3], 1, 1.0);
    let mut g2 = rand(be, tol, &[3, 2], 2, 1.0);
    let l = be
        .adalora_orth_reg(&[(&a.g, &b.g)], &mut [(&mut g1.g, &mut g2.g)], 0.5)
        .unwrap();
    Cpu.adalora_orth_reg(&[(&a.c, &b.c)], &mut [(&mut g1.c, &mut g2.c)], 0.5)
        .unwrap();
    bits("orthonormal loss", &be.download(&l).unwrap(), &[0.0]);
    bits_t(be, "orthonormal grad_A", &g1.g, &g1.c);
    bits_t(be, "orthonormal grad_B", &g2.g, &g2.c);
}

/// The device-resident allocator over whole schedules (one with a NaN gradient) against the
/// CPU's run of it: the mask budgets, the rank patterns, lora_E, the scores (NaN where the
/// CPU's is) and the threshold of every masking step. (f32 storage only: near-ties between
/// scores rounded to f16 could break differently.)
pub fn device_allocator<B: Backend>(be: &B, tol: &Tol) {
    let with_nan = twin::Scenario {
        nan_at: Some((5, 1, 4)),
        ..twin::scenario(7)
    };
    for sc in [
        twin::scenario(1),
        twin::scenario(2),
        twin::scenario(4),
        with_nan,
    ] {
        let cpu = twin::run_device(&Cpu, &sc);
        let got = twin::run_device(be, &sc);
        ensure(cpu.len() == got.len(), || "steps recorded".into());
        for (c, g) in cpu.iter().zip(&got) {
            let step = c.step;
            ensure(c.masked_to == g.masked_to, || {
                format!("masked_to at step {step}")
            });
            ensure(c.pattern == g.pattern, || {
                format!("rank pattern at step {step}")
            });
            for (l, (ce, ge)) in c.e.iter().zip(&g.e).enumerate() {
                let what = format!("lora_E {l} at {step}");
                tol.close_vec_atol(&what, ge, ce, tol.alloc_e, 0.0);
            }
            ensure(c.scores.is_some() == g.scores.is_some(), || {
                format!("scores at {step} on one side only")
            });
            if let (Some(cs), Some(gs)) = (&c.scores, &g.scores) {
                // A NaN score (from the NaN gradient) must be NaN on both.
                let nan = |v: &[f32]| v.iter().map(|v| v.is_nan()).collect::<Vec<_>>();
                ensure(nan(cs) == nan(gs), || format!("NaN scores at {step}"));
                let finite = |v: &[f32]| -> Vec<f32> {
                    v.iter()
                        .map(|&x| if x.is_nan() { 0.0 } else { x })
                        .collect()
                };
                tol.close_vec_atol(
                    &format!("scores at {step}"),
                    &finite(gs),
                    &finite(cs),
                    tol.alloc_scores,
                    0.0,
                );
                let (ct, gt) = (c.threshold.unwrap(), g.threshold.unwrap());
                ensure((ct - gt).abs() <= tol.alloc_scores * ct.abs(), || {
                    format!("threshold at {step}: {gt} vs {ct}")
                });
            }
        }
    }
}
