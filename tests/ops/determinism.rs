//! Determinism: the same inputs give the same bits on a second run (no atomics, a fixed
//! summation order; on wgpu in either reduction mode). On the CPU too.

use super::harness::*;
use lorafuse::{Backend, Tensor};

fn same_bits<B: Backend>(be: &B, what: &str, a: &Tensor<B>, b: &Tensor<B>) {
    bits(
        &format!("{what}: two runs differ"),
        &be.download(a).unwrap(),
        &be.download(b).unwrap(),
    );
}

/// RMSNorm's y and rstd over the shapes of `model::rmsnorm`.
pub fn rmsnorm<B: Backend>(be: &B, tol: &Tol) {
    for (i, &(t, d, xb)) in super::model::RMSNORM.iter().enumerate() {
        let s = 100 + 10 * i as u64;
        let what = format!("rmsnorm {t}x{d}");
        if d > tol.max_row {
            continue; // an error there (model::rmsnorm checks it)
        }
        let x = rand(be, tol, &[t, d], s, xb);
        let w = rand(be, tol, &[d], s + 1, 1.0);
        let (y, r) = be.rmsnorm(&x.g, &w.g, 1e-5).unwrap();
        let (y2, r2) = be.rmsnorm(&x.g, &w.g, 1e-5).unwrap();
        same_bits(be, &format!("{what} y"), &y, &y2);
        same_bits(be, &format!("{what} rstd"), &r, &r2);
    }
}

/// Attention's backward (dq, dk, dv) over the cases of `attention::attention` the backend
/// takes.
pub fn attention<B: Backend>(be: &B, tol: &Tol) {
    for (i, c) in super::attention::cases().iter().enumerate() {
        if c.hd > tol.max_head_dim {
            continue; // an error there (attention::attention checks it)
        }
        let s = 300 + 10 * i as u64;
        let (hq, hkv, seqs) = (c.hq, c.hkv, &c.seqs);
        let what = format!("attention T={} {hq}/{hkv} heads hd={} {seqs:?}", c.t, c.hd);
        let scale = 1.0 / (c.hd as f32).sqrt();
        let (q, k, v, d_out) = super::attention::inputs(be, tol, c, s);
        let saved = be
            .attention(&q.g, &k.g, &v.g, seqs, hq, hkv, scale)
            .unwrap();
        let saved2 = be
            .attention(&q.g, &k.g, &v.g, seqs, hq, hkv, scale)
            .unwrap();
        same_bits(be, &format!("{what} out"), &saved.out, &saved2.out);
        same_bits(be, &format!("{what} lse"), &saved.lse, &saved2.lse);
        let run = || {
            be.attention_backward(&d_out.g, &q.g, &k.g, &v.g, &saved, seqs, hq, hkv, scale)
                .unwrap()
        };
        let (dq, dk, dv) = run();
        let (dq2, dk2, dv2) = run();
        for (a, b, name) in [(&dq, &dq2, "dq"), (&dk, &dk2, "dk"), (&dv, &dv2, "dv")] {
            same_bits(be, &format!("{what} {name}"), a, b);
        }
    }
}
