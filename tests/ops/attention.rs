//! Causal grouped-query attention over packed sequences (forward, log-sum-exp, backward) and
//! attention of new tokens over a KV cache. A head_dim beyond what the backend's kernels take
//! ([`Tol::max_head_dim`]) must be an error, not a wrong answer.

use super::harness::*;
use lorafuse::backend::SeqSpan;
use lorafuse::{Backend, Cpu};

pub fn spans(list: &[(usize, usize)]) -> Vec<SeqSpan> {
    list.iter()
        .map(|&(start, len)| SeqSpan { start, len })
        .collect()
}

/// One attention case: T, spans, heads, kv heads, head_dim, and the bound of q (3: a sharper
/// softmax than uniform data gives).
pub struct Case {
    pub t: usize,
    pub seqs: Vec<SeqSpan>,
    pub hq: usize,
    pub hkv: usize,
    pub hd: usize,
    pub qb: f32,
}

/// The cases of both old grids: rows in no sequence (zero output and lse, as on the CPU),
/// empty sequences, GQA 3:1, 4:2, 6:2, head dims 6 to 160.
pub fn cases() -> Vec<Case> {
    let c = |t, seqs: &[(usize, usize)], hq, hkv, hd, qb| Case {
        t,
        seqs: spans(seqs),
        hq,
        hkv,
        hd,
        qb,
    };
    let cuda_spans = [(0, 5), (5, 0), (6, 41), (47, 1)];
    vec![
        c(1, &[(0, 1)], 3, 1, 8, 3.0),
        c(3, &[(0, 3)], 2, 2, 64, 3.0),
        c(17, &[(0, 5), (7, 9)], 3, 1, 128, 3.0),
        c(17, &[(0, 17)], 6, 2, 8, 3.0),
        c(65, &[(0, 20), (20, 1), (21, 0), (21, 44)], 3, 1, 64, 3.0),
        c(65, &[(0, 33), (33, 32)], 2, 2, 128, 3.0),
        c(40, &[(3, 37)], 3, 3, 6, 3.0),
        c(48, &cuda_spans, 4, 2, 16, 1.0),
        c(48, &cuda_spans, 3, 1, 64, 1.0),
        c(48, &cuda_spans, 2, 2, 160, 1.0),
    ]
}

/// Inputs of a case on both backends.
pub fn inputs<B: Backend>(
    be: &B,
    tol: &Tol,
    c: &Case,
    s: u64,
) -> (Pair<B>, Pair<B>, Pair<B>, Pair<B>) {
    let q = rand(be, tol, &[c.t, c.hq * c.hd], s, c.qb);
    let k = rand(be, tol, &[c.t, c.hkv * c.hd], s + 1, 1.0);
    let v = rand(be, tol, &[c.t, c.hkv * c.hd], s + 2, 1.0);
    let d_out = rand(be, tol, &[c.t, c.hq * c.hd], s + 3, 1.0);
    (q, k, v, d_out)
}

/// Forward (out, lse), backward (from the backend's saved state on both), and the cached
/// attention with the same spans as queries and context (attention's output, against the
/// CPU's and the backend's own attention).
pub fn attention<B: Backend>(be: &B, tol: &Tol) {
    for (i, c) in cases().iter().enumerate() {
        let s = 300 + 10 * i as u64;
        let (hq, hkv, seqs) = (c.hq, c.hkv, &c.seqs);
        let what = format!("attention T={} {hq}/{hkv} heads hd={} {seqs:?}", c.t, c.hd);
        let scale = 1.0 / (c.hd as f32).sqrt();
        let (q, k, v, d_out) = inputs(be, tol, c, s);
        if c.hd > tol.max_head_dim {
            let r = be.attention(&q.g, &k.g, &v.g, seqs, hq, hkv, scale);
            ensure(r.is_err(), || {
                format!("{what}: beyond max_head_dim, not an error")
            });
            let r = be.attention_cached(&q.g, &k.g, &v.g, seqs, seqs, hq, hkv, scale);
            ensure(r.is_err(), || {
                format!("{what}: cached beyond max_head_dim, not an error")
            });
            continue;
        }
        let saved = be
            .attention(&q.g, &k.g, &v.g, seqs, hq, hkv, scale)
            .unwrap();
        let want = Cpu
            .attention(&q.c, &k.c, &v.c, seqs, hq, hkv, scale)
            .unwrap();
        tol.close(be, &format!("{what} out"), &saved.out, &want.out, tol.rel);
        tol.close(be, &format!("{what} lse"), &saved.lse, &want.lse, tol.lse);
        let saved_c = lorafuse::backend::AttentionSaved {
            out: back(be, tol, &saved.out).c,
            lse: Cpu
                .upload(&be.download(&saved.lse).unwrap(), saved.lse.shape())
                .unwrap(),
        };
        let (dq, dk, dv) = be
            .attention_backward(&d_out.g, &q.g, &k.g, &v.g, &saved, seqs, hq, hkv, scale)
            .unwrap();
        let (dqc, dkc, dvc) = Cpu
            .attention_backward(&d_out.c, &q.c, &k.c, &v.c, &saved_c, seqs, hq, hkv, scale)
            .unwrap();
        tol.close(be, &format!("{what} dq"), &dq, &dqc, tol.attn_grad);
        tol.close(be, &format!("{what} dk"), &dk, &dkc, tol.attn_grad);
        tol.close(be, &format!("{what} dv"), &dv, &dvc, tol.attn_grad);
        let cached = be
            .attention_cached(&q.g, &k.g, &v.g, seqs, seqs, hq, hkv, scale)
            .unwrap();
        tol.close(
            be,
            &format!("{what} cached (same spans)"),
            &cached,
            &want.out,
            tol.rel,
        );
        let own = be.download(&saved.out).unwrap();
        tol.close_to(
            be,
            &format!("{what} cached vs attention"),
            &cached,
            &own,
            tol.rel,
        );
    }
    if tol.max_head_dim < usize::MAX {
        // just beyond the limit, with zeros
        let hd = tol.max_head_dim + 2;
        let (q, k) = (be.zeros(&[2, 2 * hd]).unwrap(), be.zeros(&[2, hd]).unwrap());
        let r = be.attention(&q, &k, &k, &spans(&[(0, 2)]), 2, 1, 0.1);
        ensure(r.is_err(), || format!("head_dim {hd}: not an error"));
    }
}

/// `(Tq, q spans, Tk, kv spans, heads, kv heads, head_dim)`.
type CachedCase = (
    usize,
    Vec<SeqSpan>,
    usize,
    Vec<SeqSpan>,
    usize,
    usize,
    usize,
    f32,
);

/// New tokens over a longer context: one-token decoding over a cache, several new tokens, q
/// rows in no sequence (left zero), an empty sequence, the self-attention case, and (the CUDA
/// grid) 2, 0, 3 and 1 new queries over the packed context of [`cases`].
pub fn cached<B: Backend>(be: &B, tol: &Tol) {
    let cuda_ctx = spans(&[(0, 5), (5, 0), (6, 41), (47, 1)]);
    let cuda_q = spans(&[(0, 2), (2, 0), (2, 3), (5, 1)]);
    let mut list: Vec<CachedCase> = vec![
        (1, spans(&[(0, 1)]), 9, spans(&[(0, 9)]), 3, 1, 8, 3.0),
        (
            2,
            spans(&[(0, 1), (1, 1)]),
            40,
            spans(&[(0, 17), (17, 23)]),
            2,
            2,
            64,
            3.0,
        ),
        (
            7,
            spans(&[(0, 3), (4, 0), (4, 2)]),
            50,
            spans(&[(0, 20), (20, 0), (25, 25)]),
            6,
            2,
            128,
            3.0,
        ),
        (17, spans(&[(0, 17)]), 17, spans(&[(0, 17)]), 3, 3, 6, 3.0),
        (33, spans(&[(0, 33)]), 70, spans(&[(5, 65)]), 4, 1, 32, 3.0),
    ];
    for (hq, hkv, hd) in [(4usize, 2usize, 16usize), (3, 1, 64), (2, 2, 160)] {
        list.push((6, cuda_q.clone(), 48, cuda_ctx.clone(), hq, hkv, hd, 1.0));
    }
    for (i, (tq, qs, tk, ks, hq, hkv, hd, qb)) in list.into_iter().enumerate() {
        let s = 700 + 10 * i as u64;
        let what =
            format!("cached attention Tq={tq} Tk={tk} {hq}/{hkv} heads hd={hd} {qs:?} {ks:?}");
        let scale = 1.0 / (hd as f32).sqrt();
        let q = rand(be, tol, &[tq, hq * hd], s, qb);
        let k = rand(be, tol, &[tk, hkv * hd], s + 1, 1.0);
        let v = rand(be, tol, &[tk, hkv * hd], s + 2, 1.0);
        let got = be.attention_cached(&q.g, &k.g, &v.g, &qs, &ks, hq, hkv, scale);
        if hd > tol.max_head_dim {
            ensure(got.is_err(), || {
                format!("{what}: beyond max_head_dim, not an error")
            });
            continue;
        }
        let got = got.unwrap();
        let want = Cpu
            .attention_cached(&q.c, &k.c, &v.c, &qs, &ks, hq, hkv, scale)
            .unwrap();
        tol.close(be, &format!("{what} out"), &got, &want, tol.rel);
        if qs == ks {
            let full = be.attention(&q.g, &k.g, &v.g, &qs, hq, hkv, scale).unwrap();
            let full = be.download(&full.out).unwrap();
            tol.close_to(be, &format!("{what} vs attention"), &got, &full, tol.rel);
        }
    }
}
