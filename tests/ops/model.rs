//! The Llama block's other ops: RMSNorm (forward, rstd, backward with and without dweight),
//! RoPE (forward, inverse, round trip), SwiGLU and its backward, cross-entropy (loss, dlogits,
//! ignored rows) and its device-resident per-row statistics.

use super::harness::*;
use lorafuse::backend::cross_entropy_loss;
use lorafuse::{Backend, Cpu};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `(T, d, bound of x)`: odd and tiny widths, rows wider than a 1 KiB binding, the CUDA grid
/// (x in [-2, 2)).
pub const RMSNORM: [(usize, usize, f32); 10] = [
    (1, 5, 1.0),
    (3, 67, 1.0),
    (17, 300, 1.0),
    (65, 576, 1.0),
    (2, 1, 1.0),
    (65, 37, 1.0),
    (9, 190, 1.0),
    (1, 37, 2.0),
    (17, 64, 2.0),
    (130, 83, 2.0),
];

pub fn rmsnorm<B: Backend>(be: &B, tol: &Tol) {
    for (i, &(t, d, xb)) in RMSNORM.iter().enumerate() {
        let s = 100 + 10 * i as u64;
        let what = format!("rmsnorm {t}x{d}");
        let x = rand(be, tol, &[t, d], s, xb);
        let w = rand(be, tol, &[d], s + 1, 1.0);
        if d > tol.max_row {
            let r = be.rmsnorm(&x.g, &w.g, 1e-5);
            ensure(r.is_err(), || {
                format!("{what}: a row beyond max_row, not an error")
            });
            continue;
        }
        let (y, r) = be.rmsnorm(&x.g, &w.g, 1e-5).unwrap();
        let (yc, rc) = Cpu.rmsnorm(&x.c, &w.c, 1e-5).unwrap();
        tol.close(be, &format!("{what} y"), &y, &yc, tol.rel);
        tol.close(be, &format!("{what} rstd"), &r, &rc, tol.rstd);
        let dy = rand(be, tol, &[t, d], s + 2, 1.0);
        let mut dw = rand(be, tol, &[d], s + 3, 1.0);
        let dx = be
            .rmsnorm_backward(&dy.g, &x.g, &w.g, &r, Some(&mut dw.g))
            .unwrap();
        let dxc = Cpu
            .rmsnorm_backward(&dy.c, &x.c, &w.c, &rc, Some(&mut dw.c))
            .unwrap();
        tol.close(be, &format!("{what} dx"), &dx, &dxc, tol.rel);
        tol.close(be, &format!("{what} dweight"), &dw.g, &dw.c, tol.rel);
        let dx2 = be.rmsnorm_backward(&dy.g, &x.g, &w.g, &r, None).unwrap();
        tol.close(be, &format!("{what} dx (no dweight)"), &dx2, &dxc, tol.rel);
    }
}

/// How a RoPE case numbers its rows.
#[derive(Clone, Copy, Debug)]
enum Positions {
    /// Packed sequences (`r % 7`) and every fifth a large position.
    Mixed,
    /// `0..T`.
    Seq,
    /// `37 r % 101`.
    Stride,
}

pub fn rope<B: Backend>(be: &B, tol: &Tol) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let cases = [
        (1usize, 3usize, 8usize, Positions::Mixed),
        (3, 2, 64, Positions::Mixed),
        (17, 1, 128, Positions::Mixed),
        (65, 5, 6, Positions::Mixed),
        (33, 3, 8, Positions::Seq),
        (5, 3, 8, Positions::Stride),
        (19, 2, 64, Positions::Stride),
    ];
    for (i, (t, heads, hd, pos)) in cases.into_iter().enumerate() {
        let width = heads * hd;
        let what = format!("rope T={t} {heads}x{hd} {pos:?}");
        let positions: Vec<u32> = (0..t)
            .map(|r| match pos {
                Positions::Mixed if r % 5 == 4 => rng.random_range(1000..9000),
                Positions::Mixed => (r % 7) as u32,
                Positions::Seq => r as u32,
                Positions::Stride => (r * 37 % 101) as u32,
            })
            .collect();
        let mut x = rand(be, tol, &[t, width], 200 + i as u64, 1.0);
        let x0 = x.c.data().to_vec();
        for theta in [10000.0f32, 100000.0] {
            be.rope(&mut x.g, &positions, hd, theta, false).unwrap();
            Cpu.rope(&mut x.c, &positions, hd, theta, false).unwrap();
            tol.close(be, &format!("{what} theta={theta}"), &x.g, &x.c, tol.rel);
            be.rope(&mut x.g, &positions, hd, theta, true).unwrap();
            Cpu.rope(&mut x.c, &positions, hd, theta, true).unwrap();
            let inv = format!("{what} theta={theta} inverse");
            tol.close(be, &inv, &x.g, &x.c, tol.rope_inverse);
            tol.close_to(
                be,
                &format!("{inv} round trip"),
                &x.g,
                &x0,
                tol.rope_inverse,
            );
        }
    }
}

pub fn swiglu<B: Backend>(be: &B, tol: &Tol) {
    // (shape, bound of gate, bound of up)
    let cases: [(&[usize], f32, f32); 6] = [
        (&[1], 1.0, 1.0),
        (&[255], 1.0, 1.0),
        (&[1000], 1.0, 1.0),
        (&[1, 37], 4.0, 2.0),
        (&[17, 64], 4.0, 2.0),
        (&[130, 83], 4.0, 2.0),
    ];
    for (i, (shape, gb, ub)) in cases.into_iter().enumerate() {
        let s = 10 * i as u64 + 1;
        let what = format!("swiglu {shape:?}");
        let gate = rand(be, tol, shape, s, gb);
        let up = rand(be, tol, shape, s + 1, ub);
        let d = rand(be, tol, shape, s + 2, 1.0);
        let y = be.swiglu(&gate.g, &up.g).unwrap();
        let yc = Cpu.swiglu(&gate.c, &up.c).unwrap();
        tol.close(be, &what, &y, &yc, tol.elementwise);
        let (dg, du) = be.swiglu_backward(&d.g, &gate.g, &up.g).unwrap();
        let (dgc, duc) = Cpu.swiglu_backward(&d.c, &gate.c, &up.c).unwrap();
        tol.close(be, &format!("{what} dgate"), &dg, &dgc, tol.elementwise);
        tol.close(be, &format!("{what} dup"), &du, &duc, tol.elementwise);
    }
}

/// How a cross-entropy case labels its rows.
#[derive(Clone, Copy, Debug)]
enum Labels {
    /// Random labels, every third row `-100`, row 2 `-1`, the last row `vocab - 1`.
    Random,
    /// Every fourth row (from 1) `-100`, else `mult * i % vocab`.
    Every4(usize),
}

/// `(rows, vocab, bound of the logits, labels, grad_scale)`: a 49152 vocabulary, rows wider
/// than a 1 KiB binding, one column, and the grids of the old CUDA and deferred-loss tests.
fn ce_cases() -> Vec<(usize, usize, f32, Labels, f32)> {
    let mut v: Vec<(usize, usize, f32, Labels, f32)> = [
        (1usize, 5usize),
        (3, 67),
        (17, 1000),
        (4, 49152),
        (37, 100),
        (5, 190),
        (300, 1),
    ]
    .into_iter()
    .map(|(n, vocab)| (n, vocab, 8.0, Labels::Random, 1.0 / n as f32))
    .collect();
    for (n, vocab) in [(1, 37), (17, 64), (130, 83)] {
        v.push((n, vocab, 2.0, Labels::Every4(7), 0.25));
    }
    for (n, vocab) in [(1, 3), (9, 97), (33, 1000)] {
        v.push((n, vocab, 1.0, Labels::Every4(31), 0.25));
    }
    v
}

fn labels(n: usize, vocab: usize, rule: Labels, seed: u64) -> Vec<i32> {
    match rule {
        Labels::Random => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut l: Vec<i32> = (0..n)
                .map(|r| {
                    let l = rng.random_range(0..vocab as u32) as i32;
                    if r % 3 == 1 { -100 } else { l }
                })
                .collect();
            if n > 2 {
                l[2] = -1;
                l[n - 1] = (vocab - 1) as i32;
            }
            l
        }
        Labels::Every4(mult) => (0..n)
            .map(|i| {
                if i % 4 == 1 {
                    -100
                } else {
                    (i * mult % vocab) as i32
                }
            })
            .collect(),
    }
}

fn ignored_rows_zero(what: &str, d: &[f32], labels: &[i32], vocab: usize) {
    for (r, &l) in labels.iter().enumerate() {
        if l < 0 {
            ensure(
                d[r * vocab..(r + 1) * vocab].iter().all(|&v| v == 0.0),
                || format!("{what}: ignored row {r} not zero"),
            );
        }
    }
}

pub fn cross_entropy<B: Backend>(be: &B, tol: &Tol) {
    for (i, (n, vocab, lb, rule, gs)) in ce_cases().into_iter().enumerate() {
        let s = 400 + 10 * i as u64;
        let what = format!("cross_entropy {n}x{vocab}");
        let logits = rand(be, tol, &[n, vocab], s, lb);
        let lab = labels(n, vocab, rule, s + 1);
        if vocab > tol.max_row {
            let r = be.cross_entropy(&logits.g, &lab, gs);
            ensure(r.is_err(), || {
                format!("{what}: a row beyond max_row, not an error")
            });
            let r = be.cross_entropy_stats(&logits.g, &lab, gs);
            ensure(r.is_err(), || {
                format!("{what} stats: a row beyond max_row, not an error")
            });
            continue;
        }
        let (loss, d) = be.cross_entropy(&logits.g, &lab, gs).unwrap();
        let (lossc, dc) = Cpu.cross_entropy(&logits.c, &lab, gs).unwrap();
        ensure(
            (loss - lossc).abs() <= tol.ce_loss * lossc.abs().max(1.0),
            || format!("{what} loss: got {loss}, want {lossc}"),
        );
        tol.close(be, &format!("{what} dlogits"), &d, &dc, tol.rel);
        ignored_rows_zero(&what, &be.download(&d).unwrap(), &lab, vocab);
    }
    // every label ignored
    let logits = rand(be, tol, &[2, 7], 1, 1.0);
    let (loss, d) = be.cross_entropy(&logits.g, &[-100, -100], 1.0).unwrap();
    ensure(loss == 0.0, || format!("no counted row: loss {loss}"));
    bits(
        "no counted row: dlogits",
        &be.download(&d).unwrap(),
        &[0.0; 14],
    );
}

pub fn cross_entropy_stats<B: Backend>(be: &B, tol: &Tol) {
    for (i, (n, vocab, lb, rule, gs)) in ce_cases().into_iter().enumerate() {
        let s = 400 + 10 * i as u64;
        let what = format!("cross_entropy_stats {n}x{vocab}");
        let logits = rand(be, tol, &[n, vocab], s, lb);
        let lab = labels(n, vocab, rule, s + 1);
        if vocab > tol.max_row {
            continue; // an error (cross_entropy checks it)
        }
        let (sc, dc) = Cpu.cross_entropy_stats(&logits.c, &lab, gs).unwrap();
        let (sg, dg) = be.cross_entropy_stats(&logits.g, &lab, gs).unwrap();
        if vocab <= 1000 {
            tol.close(be, &format!("{what} stats"), &sg, &sc, tol.ce_stats);
        } else {
            // The CPU sums exp over a row in order in f32: over 49152 terms its sum is itself
            // only ~5e-5 relative, beyond `ce_stats`; the loss and dlogits are compared below.
            ensure(sg.shape() == sc.shape(), || format!("{what}: stats shape"));
        }
        tol.close(be, &format!("{what} dlogits"), &dg, &dc, tol.rel);
        ignored_rows_zero(&what, &be.download(&dg).unwrap(), &lab, vocab);
        let (want, _) = Cpu.cross_entropy(&logits.c, &lab, gs).unwrap();
        let got = cross_entropy_loss(&be.download(&sg).unwrap());
        ensure((got - want).abs() <= tol.ce_loss * want.abs(), || {
            format!("{what}: loss {got} vs {want}")
        });
        let cpu = cross_entropy_loss(sc.data());
        ensure((cpu - want).abs() <= 1e-12 * want.abs(), || {
            format!("{what}: the CPU's stats give its loss ({cpu} vs {want})")
        });
    }
    // No counted row: no stats, a zero gradient.
    let logits = rand(be, tol, &[2, 5], 3, 1.0);
    let (sg, dg) = be.cross_entropy_stats(&logits.g, &[-100, -1], 1.0).unwrap();
    ensure(sg.shape() == [0, 3], || {
        format!("no counted row: stats {:?}", sg.shape())
    });
    bits(
        "no counted row: dlogits",
        &be.download(&dg).unwrap(),
        &[0.0; 10],
    );
}
