//! The one fused low-rank op, per term kind, over a dense and an NF4 base (blocksize 64, double
//! quant): forward (y, h, z), the input gradient (dx, g, dx added into an accumulator), every
//! gradient the method trains, the norms DoRA needs, merge and unmerge. LoRA / rsLoRA (the
//! same term with another scale), DoRA, VeRA (shared projections wider than the layer, sliced
//! in the kernels) and AdaLoRA (masked ranks, whose dE stays non-zero).
//!
//! Each grid is the union of the per-backend tests' grids: odd in/out (not multiples of 4 or
//! 8), T = 1, 3, 8 (the decode threshold on CUDA), 17, 70, 130, r from 1 to 64.

use super::harness::*;
use lorafuse::Backend;
use lorafuse::backend::{Base, GradWants, LowRank, check};

/// `(T, in, out)` of the old wgpu grids.
const WGPU_SHAPES: [(usize, usize, usize); 5] = [
    (1, 5, 3),
    (3, 67, 70),
    (17, 130, 9),
    (130, 33, 129),
    (2, 300, 1),
];
const RANKS: [usize; 3] = [1, 7, 64];
/// `(T, in, out, r)` of the old CUDA grid: decode (T <= 8) and cuBLAS paths.
const CUDA_CASES: [(usize, usize, usize, usize); 5] = [
    (1, 37, 29, 1),
    (3, 61, 45, 7),
    (17, 37, 29, 64),
    (130, 83, 67, 16),
    (8, 136, 72, 5),
];
/// `(out, in)` NF4 weights (odd element counts, short last blocks) and `(T, r)` of the old
/// wgpu QVeRA / QAdaLoRA grid.
const NF4_WEIGHTS: [(usize, usize); 4] = [(70, 67), (33, 67), (9, 130), (130, 67)];
const NF4_TR: [(usize, usize); 3] = [(1, 1), (17, 7), (3, 16)];

/// One case: shape, rank, and the bound of the weights and factors (the CUDA grid's 0.3).
#[derive(Clone, Copy, Debug)]
struct Case {
    t: usize,
    din: usize,
    dout: usize,
    r: usize,
    wb: f32,
}

fn wgpu_cases(shapes: &[(usize, usize, usize)]) -> Vec<Case> {
    let mut v = Vec::new();
    for &(t, din, dout) in shapes {
        for r in RANKS {
            v.push(Case {
                t,
                din,
                dout,
                r,
                wb: 1.0,
            });
        }
    }
    v
}

fn cuda_cases() -> Vec<Case> {
    CUDA_CASES
        .iter()
        .map(|&(t, din, dout, r)| Case {
            t,
            din,
            dout,
            r,
            wb: 0.3,
        })
        .collect()
}

fn nf4_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for &(dout, din) in &NF4_WEIGHTS {
        for &(t, r) in &NF4_TR {
            v.push(Case {
                t,
                din,
                dout,
                r,
                wb: 1.0,
            });
        }
    }
    v
}

/// LoRA (scale `2 / r`): over the dense base and its NF4 twin (QLoRA), merge and unmerge.
pub fn lora<B: Backend>(be: &B, tol: &Tol) {
    let cases = [wgpu_cases(&WGPU_SHAPES), cuda_cases()].concat();
    for (i, c) in cases.into_iter().enumerate() {
        let Case {
            t,
            din,
            dout,
            r,
            wb,
        } = c;
        let s = 1000 * i as u64 + r as u64;
        let what = format!("lora {t}x{din}->{dout} r={r}");
        let x = rand(be, tol, &[t, din], s, 1.0);
        let w = rand(be, tol, &[dout, din], s + 1, wb);
        let bias = rand(be, tol, &[dout], s + 2, 1.0);
        let a = rand(be, tol, &[r, din], s + 3, wb);
        let b = rand(be, tol, &[dout, r], s + 4, wb);
        let dy = rand(be, tol, &[t, dout], s + 5, 1.0);
        let sc = 2.0 / r as f32;
        let terms = (
            &LowRank::lora(&a.c, &b.c, sc),
            &LowRank::lora(&a.g, &b.g, sc),
        );
        fused(
            be,
            tol,
            &format!("{what} dense"),
            (Base::Dense(&w.c), Base::Dense(&w.g)),
            &x,
            Some(&bias),
            &dy,
            terms,
            GradWants::LORA,
            s + 6,
        );
        let (qc, qg) = nf4_of(be, &w);
        fused(
            be,
            tol,
            &format!("{what} nf4"),
            (Base::Nf4(&qc), Base::Nf4(&qg)),
            &x,
            Some(&bias),
            &dy,
            terms,
            GradWants::LORA,
            s + 7,
        );
        merge_round_trip(be, tol, &what, &w, terms, tol.lora_round_trip);
    }
}

/// DoRA: `||W||_row^2` and the weight norm `||W + ΔW||_row` over either base, the fused op
/// with the column scale over either base (also without bias, and taking its own weight
/// norm), merge / unmerge with the forward's norm, and PEFT's merge that takes the norm of the
/// merged rows.
pub fn dora<B: Backend>(be: &B, tol: &Tol) {
    // (case, scale): the wgpu grid at 2 / r, T = 70 (a column reduction of dm over several
    // row ranges under 1 KiB bindings), the CUDA grid at 0.5.
    let mut cases: Vec<(Case, f32)> = wgpu_cases(&WGPU_SHAPES[..3])
        .into_iter()
        .chain([
            Case {
                t: 70,
                din: 67,
                dout: 70,
                r: 7,
                wb: 1.0,
            },
            Case {
                t: 3,
                din: 130,
                dout: 9,
                r: 7,
                wb: 1.0,
            },
        ])
        .map(|c| (c, 2.0 / c.r as f32))
        .collect();
    cases.extend(cuda_cases().into_iter().map(|c| (c, 0.5)));
    for (i, (c, sc)) in cases.into_iter().enumerate() {
        let Case {
            t,
            din,
            dout,
            r,
            wb,
        } = c;
        let s = 2000 + 1000 * i as u64 + r as u64;
        let what = format!("dora {t}x{din}->{dout} r={r}");
        let x = rand(be, tol, &[t, din], s, 1.0);
        let w = rand(be, tol, &[dout, din], s + 1, wb);
        let bias = rand(be, tol, &[dout], s + 2, 1.0);
        let a = rand(be, tol, &[r, din], s + 3, wb);
        let b = rand(be, tol, &[dout, r], s + 4, wb);
        let m = positive(be, tol, dout, s + 5);
        let dy = rand(be, tol, &[t, dout], s + 6, 1.0);
        let (qc, qg) = nf4_of(be, &w);
        let lora = (LowRank::lora(&a.c, &b.c, sc), LowRank::lora(&a.g, &b.g, sc));

        for (name, bc, bg) in [
            ("dense", Base::Dense(&w.c), Base::Dense(&w.g)),
            ("nf4", Base::Nf4(&qc), Base::Nf4(&qg)),
        ] {
            let what = format!("{what} {name}");
            let sqc = lorafuse::Cpu.row_sq_norms(bc).unwrap();
            let sqg = be.row_sq_norms(bg).unwrap();
            tol.close(be, &format!("{what} row_sq_norms"), &sqg, &sqc, tol.row_sq);
            let sq = from_cpu(be, tol, &sqc);
            let nc = lorafuse::Cpu.lowrank_row_norms(bc, &sq.c, &lora.0).unwrap();
            let ng = be.lowrank_row_norms(bg, &sq.g, &lora.1).unwrap();
            tol.close(be, &format!("{what} weight_norm"), &ng, &nc, tol.rel);
            let n = from_cpu(be, tol, &nc);
            let terms = (
                &LowRank::dora(&a.c, &b.c, sc, &m.c, Some(&n.c)),
                &LowRank::dora(&a.g, &b.g, sc, &m.g, Some(&n.g)),
            );
            fused(
                be,
                tol,
                &what,
                (bc, bg),
                &x,
                Some(&bias),
                &dy,
                terms,
                GradWants::DORA,
                s + 7,
            );
            // without bias: the forward and what it saves
            let og = be.linear_lowrank(&x.g, bg, None, Some(terms.1)).unwrap();
            let oc = lorafuse::Cpu
                .linear_lowrank(&x.c, bc, None, Some(terms.0))
                .unwrap();
            tol.close(be, &format!("{what} no bias y"), &og.y, &oc.y, tol.rel);
            tol.close(
                be,
                &format!("{what} no bias h"),
                &og.h.unwrap(),
                &oc.h.unwrap(),
                tol.rel,
            );
            tol.close(
                be,
                &format!("{what} no bias z"),
                &og.z.unwrap(),
                &oc.z.unwrap(),
                tol.rel,
            );
            // the forward that takes its own weight norm (over NF4 from the same dequantized
            // tiles as the product)
            let og = be
                .linear_lowrank_with_norm(
                    &x.g,
                    bg,
                    &sq.g,
                    Some(&bias.g),
                    &LowRank::dora(&a.g, &b.g, sc, &m.g, None),
                )
                .unwrap();
            let oc = lorafuse::Cpu
                .linear_lowrank_with_norm(
                    &x.c,
                    bc,
                    &sq.c,
                    Some(&bias.c),
                    &LowRank::dora(&a.c, &b.c, sc, &m.c, None),
                )
                .unwrap();
            let wn = format!("{what} with_norm");
            tol.close(be, &format!("{wn} y"), &og.y, &oc.y, tol.rel);
            tol.close(
                be,
                &format!("{wn} z"),
                &og.z.unwrap(),
                &oc.z.unwrap(),
                tol.rel,
            );
            let (n1g, n1c) = (og.weight_norm.unwrap(), oc.weight_norm.unwrap());
            tol.close(be, &format!("{wn} n"), &n1g, &n1c, tol.rel);
            if name == "dense" {
                merge_round_trip(be, tol, &what, &w, terms, tol.dora_round_trip);
                // PEFT's merge that takes the norm of the merged rows
                let (mut wg, mut wc) = (w.g.clone(), w.c.clone());
                let nmg = be
                    .lowrank_merge_with_norm(
                        &mut wg,
                        &sq.g,
                        &LowRank::dora(&a.g, &b.g, sc, &m.g, None),
                    )
                    .unwrap();
                let nmc = lorafuse::Cpu
                    .lowrank_merge_with_norm(
                        &mut wc,
                        &sq.c,
                        &LowRank::dora(&a.c, &b.c, sc, &m.c, None),
                    )
                    .unwrap();
                tol.close(
                    be,
                    &format!("{what} merge_with_norm n"),
                    &nmg,
                    &nmc,
                    tol.rel,
                );
                tol.close(be, &format!("{what} merge_with_norm w"), &wg, &wc, tol.rel);
            }
        }
    }
}

/// VeRA: shared projections `[r, in + pad_in]`, `[out + pad_out, r]` of which the layer uses
/// the leading columns and rows; `lambda_d`, `lambda_b` trained; over either base, merge and
/// unmerge.
pub fn vera<B: Backend>(be: &B, tol: &Tol) {
    let mut cases: Vec<(Case, usize, usize)> = Vec::new();
    for (i, c) in wgpu_cases(&WGPU_SHAPES[..3]).into_iter().enumerate() {
        cases.push((c, 3 + i / RANKS.len(), 5));
    }
    cases.extend(cuda_cases().into_iter().map(|c| (c, 5, 3)));
    cases.extend(nf4_cases().into_iter().map(|c| (c, 3, 5)));
    for (i, (c, pad_in, pad_out)) in cases.into_iter().enumerate() {
        let Case {
            t,
            din,
            dout,
            r,
            wb,
        } = c;
        let s = 3000 + 1000 * i as u64 + r as u64;
        let (max_in, max_out) = (din + pad_in, dout + pad_out);
        let what = format!("vera {t}x{din}->{dout} r={r} (max {max_in}, {max_out})");
        let x = rand(be, tol, &[t, din], s, 1.0);
        let w = rand(be, tol, &[dout, din], s + 1, wb);
        let bias = rand(be, tol, &[dout], s + 2, 1.0);
        let va = rand(be, tol, &[r, max_in], s + 3, wb);
        let vb = rand(be, tol, &[max_out, r], s + 4, wb);
        let ld = rand(be, tol, &[r], s + 5, 1.0);
        let lb = rand(be, tol, &[dout], s + 6, 1.0);
        let dy = rand(be, tol, &[t, dout], s + 7, 1.0);
        let terms = (
            &LowRank::vera(&va.c, &vb.c, &ld.c, &lb.c),
            &LowRank::vera(&va.g, &vb.g, &ld.g, &lb.g),
        );
        fused(
            be,
            tol,
            &format!("{what} dense"),
            (Base::Dense(&w.c), Base::Dense(&w.g)),
            &x,
            Some(&bias),
            &dy,
            terms,
            GradWants::VERA,
            s + 8,
        );
        let (qc, qg) = nf4_of(be, &w);
        fused(
            be,
            tol,
            &format!("{what} nf4"),
            (Base::Nf4(&qc), Base::Nf4(&qg)),
            &x,
            Some(&bias),
            &dy,
            terms,
            GradWants::VERA,
            s + 9,
        );
        merge_round_trip(be, tol, &what, &w, terms, tol.lora_round_trip);
    }
}

/// AdaLoRA: `lora_E [r, 1]` with masked ranks (E = 0: every third rank and the last), whose dE
/// must stay non-zero (masking zeroes E, not its gradient); over either base, merge and
/// unmerge.
pub fn adalora<B: Backend>(be: &B, tol: &Tol) {
    // (case, scaling, bias over the dense base)
    let mut cases: Vec<(Case, f32, bool)> = wgpu_cases(&WGPU_SHAPES[..3])
        .into_iter()
        .map(|c| (c, 16.0, true))
        .collect();
    cases.extend(cuda_cases().into_iter().map(|c| (c, 8.0, false)));
    cases.extend(nf4_cases().into_iter().map(|c| (c, 16.0, true)));
    for (i, (c, scaling, dense_bias)) in cases.into_iter().enumerate() {
        let Case {
            t,
            din,
            dout,
            r,
            wb,
        } = c;
        let s = 4000 + 1000 * i as u64 + r as u64;
        let what = format!("adalora {t}x{din}->{dout} r={r}");
        let x = rand(be, tol, &[t, din], s, 1.0);
        let w = rand(be, tol, &[dout, din], s + 1, wb);
        let bias = rand(be, tol, &[dout], s + 2, 1.0);
        let a = rand(be, tol, &[r, din], s + 3, wb);
        let b = rand(be, tol, &[dout, r], s + 4, wb);
        let masked = |j: usize| j % 3 == 2 || j == r - 1;
        let e: Vec<f32> = vals(r, s + 5, 1.0)
            .into_iter()
            .enumerate()
            .map(|(j, v)| if masked(j) { 0.0 } else { v })
            .collect();
        let e = pair(be, tol, &e, &[r, 1]);
        let dy = rand(be, tol, &[t, dout], s + 6, 1.0);
        let cf = check::adalora_factor(scaling, r as f32).unwrap();
        let terms = (
            &LowRank::adalora(&a.c, &b.c, &e.c, cf),
            &LowRank::adalora(&a.g, &b.g, &e.g, cf),
        );
        let (qc, qg) = nf4_of(be, &w);
        for (name, bases, bias) in [
            (
                "dense",
                (Base::Dense(&w.c), Base::Dense(&w.g)),
                dense_bias.then_some(&bias),
            ),
            ("nf4", (Base::Nf4(&qc), Base::Nf4(&qg)), Some(&bias)),
        ] {
            let what = format!("{what} {name}");
            let out = fused(
                be,
                tol,
                &what,
                bases,
                &x,
                bias,
                &dy,
                terms,
                GradWants::ADALORA,
                s + 7,
            );
            let de = be
                .download(out.grads.d_rank_scale.as_ref().unwrap())
                .unwrap();
            for (j, &d) in de.iter().enumerate().filter(|&(j, _)| masked(j)) {
                ensure(d != 0.0, || {
                    format!("{what}: dE of the masked rank {j} is 0")
                });
            }
        }
        merge_round_trip(be, tol, &what, &w, terms, tol.lora_round_trip);
    }
}
