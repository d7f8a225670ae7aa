//! Many adapters in one batch (`Backend::linear_multi` over a `LowRankPool`): every row adds
//! its own adapter's term to one base product. Each case mixes LoRA (r 1), rsLoRA (r 7), VeRA
//! (shared projections wider than the layer, r 5), AdaLoRA (r 64, two ranks masked to 0) and an
//! adapter that leaves the projection alone (rank 0), over a dense and an NF4 base, with and
//! without bias, under four row layouts: prefill segments (a run of rows per sequence, a
//! base-only sequence among them), a decode step (one row per sequence, adapters interleaved),
//! every row on one adapter, and no row on any.
//!
//! Each case runs twice: with all four terms, and without AdaLoRA's (few ranks in all, which
//! the CPU computes as two masked GEMMs over the whole batch). `mixed` checks the backend against the CPU, and the CPU itself against the spec: row t of the
//! mixed product equals `linear_lowrank` of that row alone with its adapter's own term (or the
//! plain product for -1), so the CPU instance runs it too.

use super::harness::*;
use lorafuse::backend::{Base, LowRank, LowRankPool};
use lorafuse::{Backend, Cpu, Tensor};

/// `(in, out)`: odd sizes, one wider than a 64-wide tile, one of a single output.
const DIMS: [(usize, usize); 4] = [(37, 29), (130, 67), (5, 3), (67, 1)];

/// Rows of each layout: the adapter of every row (-1: the base only), 4 adapters + rank 0.
fn layouts() -> Vec<(&'static str, Vec<i32>)> {
    let seg = |runs: &[(usize, i32)]| -> Vec<i32> {
        runs.iter()
            .flat_map(|&(n, i)| std::iter::repeat_n(i, n))
            .collect()
    };
    vec![
        (
            "prefill",
            seg(&[(9, 0), (3, 1), (5, -1), (17, 2), (1, 3), (4, 4), (2, 0)]),
        ),
        ("decode", vec![2, 0, -1, 3, 1, 4, 0, 2, 3, -1, 1]),
        ("one adapter", seg(&[(13, 3)])),
        ("base only", seg(&[(6, -1)])),
    ]
}

/// The host values of the four terms and their tensors on one backend.
struct Terms<B: Backend> {
    lora: (Tensor<B>, Tensor<B>),
    rslora: (Tensor<B>, Tensor<B>),
    vera: (Tensor<B>, Tensor<B>, Tensor<B>, Tensor<B>),
    adalora: (Tensor<B>, Tensor<B>, Tensor<B>),
}

fn terms<B: Backend>(be: &B, tol: &Tol, din: usize, dout: usize, s: u64) -> (Terms<Cpu>, Terms<B>) {
    let p = |shape: &[usize], k: u64, b: f32| rand(be, tol, shape, s + k, b);
    let (la, lb) = (p(&[1, din], 1, 0.5), p(&[dout, 1], 2, 0.5));
    let (ra, rb) = (p(&[7, din], 3, 0.5), p(&[dout, 7], 4, 0.5));
    let (va, vb) = (p(&[5, din + 9], 5, 0.5), p(&[dout + 4, 5], 6, 0.5));
    let (vd, vbl) = (p(&[5], 7, 1.0), p(&[dout], 8, 1.0));
    let (aa, ab) = (p(&[64, din], 9, 0.3), p(&[dout, 64], 10, 0.3));
    let mut e = vals(64, s + 11, 1.0);
    e[3] = 0.0;
    e[40] = 0.0;
    let ae = pair(be, tol, &e, &[64, 1]);
    let side = |f: fn(&Pair<B>) -> Tensor<Cpu>| -> Terms<Cpu> {
        Terms {
            lora: (f(&la), f(&lb)),
            rslora: (f(&ra), f(&rb)),
            vera: (f(&va), f(&vb), f(&vd), f(&vbl)),
            adalora: (f(&aa), f(&ab), f(&ae)),
        }
    };
    let cpu = side(|p| p.c.clone());
    let dev = Terms {
        lora: (la.g, lb.g),
        rslora: (ra.g, rb.g),
        vera: (va.g, vb.g, vd.g, vbl.g),
        adalora: (aa.g, ab.g, ae.g),
    };
    (cpu, dev)
}

/// Adapter order of the pool: LoRA, rsLoRA, VeRA, AdaLoRA, then one without a term here.
fn list<B: Backend>(t: &Terms<B>) -> Vec<Option<LowRank<'_, B>>> {
    vec![
        Some(LowRank::lora(&t.lora.0, &t.lora.1, 2.0)),
        Some(LowRank::lora(&t.rslora.0, &t.rslora.1, 8.0 / 7f32.sqrt())),
        Some(LowRank::vera(&t.vera.0, &t.vera.1, &t.vera.2, &t.vera.3)),
        Some(LowRank::adalora(
            &t.adalora.0,
            &t.adalora.1,
            &t.adalora.2,
            1.5,
        )),
        None,
    ]
}

/// Row t of `linear_lowrank` on that row alone with its adapter's term: the spec.
fn per_row(
    x: &Tensor<Cpu>,
    base: Base<'_, Cpu>,
    bias: Option<&Tensor<Cpu>>,
    terms: &[Option<LowRank<'_, Cpu>>],
    rows: &[i32],
) -> Vec<f32> {
    let din = x.dim(1);
    let mut out = Vec::new();
    for (t, &i) in rows.iter().enumerate() {
        let xt = Cpu
            .upload(&x.data()[t * din..(t + 1) * din], &[1, din])
            .unwrap();
        let term = if i < 0 {
            None
        } else {
            terms[i as usize].as_ref()
        };
        out.extend(
            Cpu.linear_lowrank(&xt, base, bias, term)
                .unwrap()
                .y
                .into_vec(),
        );
    }
    out
}

pub fn mixed<B: Backend>(be: &B, tol: &Tol) {
    for (d, &(din, dout)) in DIMS.iter().enumerate() {
        let s = 100 * d as u64;
        let w = rand(be, tol, &[dout, din], s, 0.5);
        let (nc, ng) = nf4_of(be, &w);
        let bias = rand(be, tol, &[dout], s + 20, 1.0);
        let (tc, tg) = terms(be, tol, din, dout, s + 30);
        // All four terms (77 ranks in all), and without AdaLoRA's 64 (13 ranks: the CPU's
        // whole-batch masked form).
        for small in [false, true] {
            let (mut lc, mut lg) = (list(&tc), list(&tg));
            if small {
                (lc[3], lg[3]) = (None, None);
            }
            let pc = Cpu.lowrank_pool(din, dout, &lc).unwrap();
            let pg: LowRankPool<B> = be.lowrank_pool(din, dout, &lg).unwrap();
            let want: [usize; 5] = if small {
                [1, 7, 5, 0, 0]
            } else {
                [1, 7, 5, 64, 0]
            };
            ensure(pg.ranks() == want, || {
                format!("pool ranks {:?}", pg.ranks())
            });
            for (name, rows) in layouts() {
                let x = rand(be, tol, &[rows.len(), din], s + 50, 1.0);
                let bases = [
                    ("dense", Base::Dense(&w.c), Base::Dense(&w.g)),
                    ("nf4", Base::Nf4(&nc), Base::Nf4(&ng)),
                ];
                for (bname, bc, bg) in bases {
                    for with_bias in [false, true] {
                        let what = format!(
                            "multi {din}->{dout} {name} {bname} bias={with_bias} small={small}"
                        );
                        let (bsc, bsg) = if with_bias {
                            (Some(&bias.c), Some(&bias.g))
                        } else {
                            (None, None)
                        };
                        let yc = Cpu.linear_multi(&x.c, bc, bsc, &pc, &rows).unwrap();
                        let spec = per_row(&x.c, bc, bsc, &lc, &rows);
                        Tol::cpu().close_vec(
                            &format!("{what} cpu vs per-row"),
                            yc.data(),
                            &spec,
                            1e-5,
                        );
                        let yg = be
                            .linear_multi(&x.g, bg, bsg, &pg, &rows)
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                        tol.close(be, &what, &yg, &yc, tol.rel);
                    }
                }
            }
        }
    }
}

pub fn errors<B: Backend>(be: &B, tol: &Tol) {
    let (din, dout) = (11, 6);
    let w = rand(be, tol, &[dout, din], 1, 0.5);
    let (tc, tg) = terms(be, tol, din, dout, 2);
    let pc = Cpu.lowrank_pool(din, dout, &list(&tc)).unwrap();
    let pg = be.lowrank_pool(din, dout, &list(&tg)).unwrap();
    let x = rand(be, tol, &[3, din], 3, 1.0);
    same_arg_error(
        "adapter index 5 of 5",
        Cpu.linear_multi(&x.c, Base::Dense(&w.c), None, &pc, &[0, 5, -1]),
        be.linear_multi(&x.g, Base::Dense(&w.g), None, &pg, &[0, 5, -1]),
    );
    same_arg_error(
        "adapter index -2",
        Cpu.linear_multi(&x.c, Base::Dense(&w.c), None, &pc, &[0, -2, -1]),
        be.linear_multi(&x.g, Base::Dense(&w.g), None, &pg, &[0, -2, -1]),
    );
    same_arg_error(
        "2 indices for 3 rows",
        Cpu.linear_multi(&x.c, Base::Dense(&w.c), None, &pc, &[0, 1]),
        be.linear_multi(&x.g, Base::Dense(&w.g), None, &pg, &[0, 1]),
    );
    let w2 = rand(be, tol, &[dout + 1, din], 4, 0.5);
    same_shape_error(
        "pool of another projection",
        Cpu.linear_multi(&x.c, Base::Dense(&w2.c), None, &pc, &[0, 1, 2]),
        be.linear_multi(&x.g, Base::Dense(&w2.g), None, &pg, &[0, 1, 2]),
    );
    // DoRA cannot share the base product.
    let m = positive(be, tol, dout, 5);
    let n = positive(be, tol, dout, 6);
    let dc = [Some(LowRank::dora(
        &tc.lora.0,
        &tc.lora.1,
        2.0,
        &m.c,
        Some(&n.c),
    ))];
    let dg = [Some(LowRank::dora(
        &tg.lora.0,
        &tg.lora.1,
        2.0,
        &m.g,
        Some(&n.g),
    ))];
    let (ec, eg) = (
        Cpu.lowrank_pool(din, dout, &dc).map(|_| ()),
        be.lowrank_pool(din, dout, &dg).map(|_| ()),
    );
    ensure(
        ec.as_ref().is_err_and(|e| e.to_string().contains("DoRA")),
        || format!("DoRA pool on the CPU: {ec:?}"),
    );
    same_arg_error("DoRA in a pool", ec, eg);
    // A term of the wrong shape is named by its place.
    let bad = [None, Some(LowRank::lora(&tc.lora.0, &tc.rslora.1, 1.0))];
    let badg = [None, Some(LowRank::lora(&tg.lora.0, &tg.rslora.1, 1.0))];
    let (ec, eg) = (
        Cpu.lowrank_pool(din, dout, &bad).map(|_| ()),
        be.lowrank_pool(din, dout, &badg).map(|_| ()),
    );
    ensure(
        ec.as_ref()
            .is_err_and(|e| e.to_string().contains("terms[1].lora_B")),
        || format!("bad term on the CPU: {ec:?}"),
    );
    same_shape_error("bad term in a pool", ec, eg);
}
