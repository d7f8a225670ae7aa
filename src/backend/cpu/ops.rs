//! CPU reference implementations of the Llama block ops (norms, RoPE, attention, SwiGLU, loss)
//! and AdamW. Arguments arrive checked (`Backend`'s provided methods).

use super::gemm::{Op, sgemm};
use super::{Cpu, new};
use crate::backend::check::AdamWFactors;
use crate::backend::{AdamWParams, AttentionSaved, SeqSpan, Tensor};
use rayon::prelude::*;

/// `x * sigmoid(x)`.
#[inline]
pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub(super) fn rmsnorm(x: &Tensor<Cpu>, w: &Tensor<Cpu>, eps: f32) -> (Tensor<Cpu>, Tensor<Cpu>) {
    let (t, d) = (x.dim(0), x.dim(1));
    let mut y = vec![0.0f32; t * d];
    let mut rstd = vec![0.0f32; t];
    y.par_chunks_mut(d.max(1))
        .zip(rstd.par_iter_mut())
        .zip(x.buf.par_chunks(d.max(1)))
        .for_each(|((yr, rs), xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            *rs = r;
            for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(&w.buf) {
                *o = wv * (xv * r);
            }
        });
    (new(y, &[t, d]), new(rstd, &[t]))
}

pub(super) fn rmsnorm_backward(
    dy: &Tensor<Cpu>,
    x: &Tensor<Cpu>,
    w: &Tensor<Cpu>,
    rstd: &Tensor<Cpu>,
    dweight: Option<&mut Tensor<Cpu>>,
) -> Tensor<Cpu> {
    let (t, d) = (x.dim(0), x.dim(1));
    // y = w * x * r with r = (mean(x^2) + eps)^(-1/2); dr/dx = -r^3 x / d.
    // dx = r (dy*w) - x r^3 mean(dy*w*x)
    let mut dx = vec![0.0f32; t * d];
    dx.par_chunks_mut(d.max(1))
        .zip(x.buf.par_chunks(d.max(1)))
        .zip(dy.buf.par_chunks(d.max(1)))
        .zip(rstd.buf.par_iter())
        .for_each(|(((dxr, xr), dyr), &r)| {
            let dot: f32 = xr
                .iter()
                .zip(dyr)
                .zip(&w.buf)
                .map(|((&xv, &g), &wv)| g * wv * xv)
                .sum();
            let c = r * r * r * dot / d as f32;
            for (((o, &xv), &g), &wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(&w.buf) {
                *o = r * g * wv - c * xv;
            }
        });
    if let Some(dw) = dweight {
        for ((xr, dyr), &r) in x
            .buf
            .chunks(d.max(1))
            .zip(dy.buf.chunks(d.max(1)))
            .zip(&rstd.buf)
        {
            for ((o, &xv), &g) in dw.buf.iter_mut().zip(xr).zip(dyr) {
                *o += g * xv * r;
            }
        }
    }
    new(dx, &[t, d])
}

pub(super) fn rope(
    x: &mut Tensor<Cpu>,
    positions: &[u32],
    head_dim: usize,
    theta: f32,
    inverse: bool,
) {
    let width = x.dim(1);
    let half = head_dim / 2;
    let inv_freq = crate::backend::rope_inv_freq(head_dim, theta);
    let sign = if inverse { -1.0f32 } else { 1.0 };
    x.buf
        .par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = pos as f32 * f;
                    (a.cos(), sign * a.sin())
                })
                .unzip();
            for head in row.chunks_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * cos[i] - b * sin[i];
                    x2[i] = b * cos[i] + a * sin[i];
                }
            }
        });
}

/// Copies head `h` (width `hd`) of rows `span` of a `[T, H*hd]` buffer into `[len, hd]`.
fn head_rows(src: &[f32], width: usize, span: SeqSpan, h: usize, hd: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(span.len * hd);
    for t in span.start..span.start + span.len {
        out.extend_from_slice(&src[t * width + h * hd..t * width + (h + 1) * hd]);
    }
    out
}

/// Writes `[len, hd]` back into head `h` of rows `span` of a `[T, H*hd]` buffer.
fn put_head_rows(dst: &mut [f32], width: usize, span: SeqSpan, h: usize, hd: usize, src: &[f32]) {
    for (i, t) in (span.start..span.start + span.len).enumerate() {
        dst[t * width + h * hd..t * width + (h + 1) * hd]
            .copy_from_slice(&src[i * hd..(i + 1) * hd]);
    }
}

/// Causal softmax of `scale * s` in place over `[n, n]` rows; returns each row's log-sum-exp.
fn causal_softmax(s: &mut [f32], n: usize, scale: f32) -> Vec<f32> {
    let mut lse = vec![0.0f32; n];
    for i in 0..n {
        let row = &mut s[i * n..(i + 1) * n];
        let mut m = f32::NEG_INFINITY;
        for v in row[..=i].iter_mut() {
            *v *= scale;
            m = m.max(*v);
        }
        let mut l = 0.0f32;
        for v in row[..=i].iter_mut() {
            *v = (*v - m).exp();
            l += *v;
        }
        for v in row[..=i].iter_mut() {
            *v /= l;
        }
        row[i + 1..].fill(0.0);
        lse[i] = m + l.ln();
    }
    lse
}

/// One unit of attention work: a sequence and a kv head (with its group of query heads), so
/// that kv gradients of a group are reduced inside one task.
fn tasks(seqs: &[SeqSpan], n_kv_heads: usize) -> Vec<(SeqSpan, usize)> {
    seqs.iter()
        .filter(|s| s.len > 0)
        .flat_map(|&s| (0..n_kv_heads).map(move |h| (s, h)))
        .collect()
}

pub(super) fn attention(
    q: &Tensor<Cpu>,
    k: &Tensor<Cpu>,
    v: &Tensor<Cpu>,
    seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    scale: f32,
) -> AttentionSaved<Cpu> {
    let (t, hd, group) = (q.dim(0), q.dim(1) / n_heads, n_heads / n_kv_heads);
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    // Per task: outputs of the group's query heads, [group][len*hd] and lse [group][len].
    let results: Vec<_> = tasks(seqs, n_kv_heads)
        .into_par_iter()
        .map(|(span, kvh)| {
            let n = span.len;
            let kh = head_rows(&k.buf, kw, span, kvh, hd);
            let vh = head_rows(&v.buf, kw, span, kvh, hd);
            let mut s = vec![0.0f32; n * n];
            let mut outs = Vec::with_capacity(group);
            for g in 0..group {
                let h = kvh * group + g;
                let qh = head_rows(&q.buf, qw, span, h, hd);
                sgemm(Op::N, Op::T, n, n, hd, 1.0, &qh, &kh, 0.0, &mut s);
                let lse = causal_softmax(&mut s, n, scale);
                let mut o = vec![0.0f32; n * hd];
                sgemm(Op::N, Op::N, n, hd, n, 1.0, &s, &vh, 0.0, &mut o);
                outs.push((h, o, lse));
            }
            (span, outs)
        })
        .collect();
    let mut out = vec![0.0f32; t * qw];
    let mut lse = vec![0.0f32; n_heads * t];
    for (span, outs) in results {
        for (h, o, l) in outs {
            put_head_rows(&mut out, qw, span, h, hd, &o);
            lse[h * t + span.start..h * t + span.start + span.len].copy_from_slice(&l);
        }
    }
    AttentionSaved {
        out: new(out, &[t, qw]),
        lse: new(lse, &[n_heads, t]),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    d_out: &Tensor<Cpu>,
    q: &Tensor<Cpu>,
    k: &Tensor<Cpu>,
    v: &Tensor<Cpu>,
    saved: &AttentionSaved<Cpu>,
    seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    scale: f32,
) -> (Tensor<Cpu>, Tensor<Cpu>, Tensor<Cpu>) {
    let (t, hd, group) = (q.dim(0), q.dim(1) / n_heads, n_heads / n_kv_heads);
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    let results: Vec<_> = tasks(seqs, n_kv_heads)
        .into_par_iter()
        .map(|(span, kvh)| {
            let n = span.len;
            let kh = head_rows(&k.buf, kw, span, kvh, hd);
            let vh = head_rows(&v.buf, kw, span, kvh, hd);
            let mut dk = vec![0.0f32; n * hd];
            let mut dv = vec![0.0f32; n * hd];
            let mut p = vec![0.0f32; n * n];
            let mut dp = vec![0.0f32; n * n];
            let mut dqs = Vec::with_capacity(group);
            for g in 0..group {
                let h = kvh * group + g;
                let qh = head_rows(&q.buf, qw, span, h, hd);
                let doh = head_rows(&d_out.buf, qw, span, h, hd);
                let oh = head_rows(&saved.out.buf, qw, span, h, hd);
                let lse = &saved.lse.buf[h * t + span.start..h * t + span.start + n];
                // P recomputed from the saved log-sum-exp: p_ij = exp(scale q_i.k_j - lse_i).
                sgemm(Op::N, Op::T, n, n, hd, 1.0, &qh, &kh, 0.0, &mut p);
                for i in 0..n {
                    let row = &mut p[i * n..(i + 1) * n];
                    for v in row[..=i].iter_mut() {
                        *v = (*v * scale - lse[i]).exp();
                    }
                    row[i + 1..].fill(0.0);
                }
                // dV += P^T dO;  dP = dO V^T
                sgemm(Op::T, Op::N, n, hd, n, 1.0, &p, &doh, 1.0, &mut dv);
                sgemm(Op::N, Op::T, n, n, hd, 1.0, &doh, &vh, 0.0, &mut dp);
                // dS = P (dP - rowsum(dO * O)) * scale
                for i in 0..n {
                    let delta: f32 = doh[i * hd..(i + 1) * hd]
                        .iter()
                        .zip(&oh[i * hd..(i + 1) * hd])
                        .map(|(a, b)| a * b)
                        .sum();
                    for j in 0..=i {
                        dp[i * n + j] = p[i * n + j] * (dp[i * n + j] - delta) * scale;
                    }
                    dp[i * n + i + 1..(i + 1) * n].fill(0.0);
                }
                // dQ = dS K;  dK += dS^T Q
                let mut dq = vec![0.0f32; n * hd];
                sgemm(Op::N, Op::N, n, hd, n, 1.0, &dp, &kh, 0.0, &mut dq);
                sgemm(Op::T, Op::N, n, hd, n, 1.0, &dp, &qh, 1.0, &mut dk);
                dqs.push((h, dq));
            }
            (span, kvh, dqs, dk, dv)
        })
        .collect();
    let mut dq = vec![0.0f32; t * qw];
    let mut dk = vec![0.0f32; t * kw];
    let mut dv = vec![0.0f32; t * kw];
    for (span, kvh, dqs, dkh, dvh) in results {
        for (h, d) in dqs {
            put_head_rows(&mut dq, qw, span, h, hd, &d);
        }
        put_head_rows(&mut dk, kw, span, kvh, hd, &dkh);
        put_head_rows(&mut dv, kw, span, kvh, hd, &dvh);
    }
    (new(dq, &[t, qw]), new(dk, &[t, kw]), new(dv, &[t, kw]))
}

/// [`attention`] of each sequence's newest `q_span.len` tokens over its whole context
/// `kv_span` (the cached tokens, then the new ones): query j attends to kv rows
/// `0..=kv_len - q_len + j`. Output `[Tq, Hq*hd]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_cached(
    q: &Tensor<Cpu>,
    k: &Tensor<Cpu>,
    v: &Tensor<Cpu>,
    q_seqs: &[SeqSpan],
    kv_seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    scale: f32,
) -> Tensor<Cpu> {
    let (tq, hd, group) = (q.dim(0), q.dim(1) / n_heads, n_heads / n_kv_heads);
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    let work: Vec<(usize, usize)> = (0..q_seqs.len())
        .filter(|&i| q_seqs[i].len > 0)
        .flat_map(|i| (0..n_kv_heads).map(move |h| (i, h)))
        .collect();
    let results: Vec<_> = work
        .into_par_iter()
        .map(|(i, kvh)| {
            let (qs, ks) = (q_seqs[i], kv_seqs[i]);
            let (nq, nk) = (qs.len, ks.len);
            let past = nk - nq;
            let kh = head_rows(&k.buf, kw, ks, kvh, hd);
            let vh = head_rows(&v.buf, kw, ks, kvh, hd);
            let mut s = vec![0.0f32; nq * nk];
            let mut outs = Vec::with_capacity(group);
            for g in 0..group {
                let h = kvh * group + g;
                let qh = head_rows(&q.buf, qw, qs, h, hd);
                sgemm(Op::N, Op::T, nq, nk, hd, 1.0, &qh, &kh, 0.0, &mut s);
                for j in 0..nq {
                    let row = &mut s[j * nk..(j + 1) * nk];
                    let last = past + j;
                    let mut m = f32::NEG_INFINITY;
                    for x in row[..=last].iter_mut() {
                        *x *= scale;
                        m = m.max(*x);
                    }
                    let mut l = 0.0f32;
                    for x in row[..=last].iter_mut() {
                        *x = (*x - m).exp();
                        l += *x;
                    }
                    for x in row[..=last].iter_mut() {
                        *x /= l;
                    }
                    row[last + 1..].fill(0.0);
                }
                let mut o = vec![0.0f32; nq * hd];
                sgemm(Op::N, Op::N, nq, hd, nk, 1.0, &s, &vh, 0.0, &mut o);
                outs.push((h, o));
            }
            (qs, outs)
        })
        .collect();
    let mut out = vec![0.0f32; tq * qw];
    for (span, outs) in results {
        for (h, o) in outs {
            put_head_rows(&mut out, qw, span, h, hd, &o);
        }
    }
    new(out, &[tq, qw])
}

/// One counted row of the cross-entropy: writes `grad_scale * (softmax - onehot)` into `g`
/// and returns `(max, sum of exp(x - max))`.
fn ce_row(g: &mut [f32], row: &[f32], label: usize, grad_scale: f32) -> (f32, f32) {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    for (gv, &x) in g.iter_mut().zip(row) {
        let e = (x - m).exp();
        *gv = e;
        sum += e;
    }
    let inv = grad_scale / sum;
    g.iter_mut().for_each(|gv| *gv *= inv);
    g[label] -= grad_scale;
    (m, sum)
}

pub(super) fn cross_entropy(
    logits: &Tensor<Cpu>,
    labels: &[i32],
    grad_scale: f32,
) -> (f64, Tensor<Cpu>) {
    let (n, vocab) = (logits.dim(0), logits.dim(1));
    let mut grad = vec![0.0f32; n * vocab];
    let loss: f64 = grad
        .par_chunks_mut(vocab.max(1))
        .zip(logits.buf.par_chunks(vocab.max(1)))
        .zip(labels.par_iter())
        .map(|((g, row), &label)| {
            if label < 0 {
                return 0.0;
            }
            let (m, sum) = ce_row(g, row, label as usize, grad_scale);
            let lse = m as f64 + (sum as f64).ln();
            lse - row[label as usize] as f64
        })
        .sum();
    (loss, new(grad, &[n, vocab]))
}

pub(super) fn cross_entropy_stats(
    logits: &Tensor<Cpu>,
    labels: &[i32],
    grad_scale: f32,
) -> (Tensor<Cpu>, Tensor<Cpu>) {
    let (n, vocab) = (logits.dim(0), logits.dim(1));
    let mut grad = vec![0.0f32; n * vocab];
    let rows: Vec<Option<[f32; 3]>> = grad
        .par_chunks_mut(vocab.max(1))
        .zip(logits.buf.par_chunks(vocab.max(1)))
        .zip(labels.par_iter())
        .map(|((g, row), &label)| {
            (label >= 0).then(|| {
                let (m, sum) = ce_row(g, row, label as usize, grad_scale);
                [m, sum, row[label as usize]]
            })
        })
        .collect();
    let stats: Vec<f32> = rows.into_iter().flatten().flatten().collect();
    let k = stats.len() / 3;
    (new(stats, &[k, 3]), new(grad, &[n, vocab]))
}

pub(super) fn swiglu(gate: &Tensor<Cpu>, up: &Tensor<Cpu>) -> Tensor<Cpu> {
    let out = gate
        .buf
        .par_iter()
        .with_min_len(1 << 14)
        .zip(up.buf.par_iter())
        .map(|(&g, &u)| silu(g) * u)
        .collect();
    new(out, gate.shape())
}

pub(super) fn swiglu_backward(
    d: &Tensor<Cpu>,
    gate: &Tensor<Cpu>,
    up: &Tensor<Cpu>,
) -> (Tensor<Cpu>, Tensor<Cpu>) {
    let (dg, du): (Vec<f32>, Vec<f32>) = d
        .buf
        .par_iter()
        .with_min_len(1 << 14)
        .zip(gate.buf.par_iter().zip(up.buf.par_iter()))
        .map(|(&d, (&g, &u))| {
            let sig = 1.0 / (1.0 + (-g).exp());
            let silu = g * sig;
            // d silu/dg = sig * (1 + g (1 - sig))
            (d * u * sig * (1.0 + g * (1.0 - sig)), d * silu)
        })
        .unzip();
    (new(dg, gate.shape()), new(du, gate.shape()))
}

/// torch.optim.AdamW (single-tensor path): decay, moments, bias-corrected update with eps
/// added to sqrt(v_hat).
pub(super) fn adamw_step(
    param: &mut Tensor<Cpu>,
    grad: &Tensor<Cpu>,
    m: &mut Tensor<Cpu>,
    v: &mut Tensor<Cpu>,
    f: &AdamWFactors,
    p: &AdamWParams,
) {
    for (((w, &g), m), v) in param
        .buf
        .iter_mut()
        .zip(&grad.buf)
        .zip(m.buf.iter_mut())
        .zip(v.buf.iter_mut())
    {
        *w *= f.decay;
        *m = p.beta1 * *m + (1.0 - p.beta1) * g;
        *v = p.beta2 * *v + (1.0 - p.beta2) * g * g;
        let denom = v.sqrt() / f.bc2_sqrt + p.eps;
        *w -= f.step_size * *m / denom;
    }
}
