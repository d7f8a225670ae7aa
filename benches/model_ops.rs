//! Criterion benches of the Llama block ops on SmolLM2-135M's shapes (d 576, 9 query heads,
//! 3 kv heads of 64, MLP 1536, vocabulary 49152), 256 tokens in one sequence: RMSNorm,
//! causal GQA attention forward and backward, SwiGLU, cross-entropy (with its gradient).

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lorafuse::Cpu;
use lorafuse::adapter::bench::random_tensor;
use lorafuse::backend::{Backend, SeqSpan};
use std::hint::black_box;

fn benches(c: &mut Criterion) {
    let be = Cpu;
    let (t, d, hq, hkv, hd, inter, vocab) = (256, 576, 9, 3, 64, 1536, 49152);
    let mut g = c.benchmark_group(format!("model_ops/{}", be.name()));

    let x = random_tensor(&be, &[t, d], 1.0, 1).unwrap();
    let nw = random_tensor(&be, &[d], 1.0, 2).unwrap();
    g.throughput(Throughput::Bytes((2 * 4 * t * d) as u64));
    g.bench_function(format!("rmsnorm T{t} d{d}"), |b| {
        b.iter(|| black_box(be.rmsnorm(&x, &nw, 1e-5).unwrap()))
    });

    let q = random_tensor(&be, &[t, hq * hd], 1.0, 3).unwrap();
    let k = random_tensor(&be, &[t, hkv * hd], 1.0, 4).unwrap();
    let v = random_tensor(&be, &[t, hkv * hd], 1.0, 5).unwrap();
    let seqs = [SeqSpan { start: 0, len: t }];
    let scale = 1.0 / (hd as f32).sqrt();
    // Causal: about T^2/2 query-key pairs per head, 2 products (QK^T, PV) of hd multiply-adds.
    let attn_flop = (hq * t * t * 2 * hd) as u64;
    g.throughput(Throughput::Elements(attn_flop));
    g.bench_function(format!("attention T{t} {hq}/{hkv}x{hd}"), |b| {
        b.iter(|| black_box(be.attention(&q, &k, &v, &seqs, hq, hkv, scale).unwrap()))
    });
    let saved = be.attention(&q, &k, &v, &seqs, hq, hkv, scale).unwrap();
    let dout = random_tensor(&be, &[t, hq * hd], 1.0, 6).unwrap();
    g.throughput(Throughput::Elements(2 * attn_flop));
    g.bench_function(format!("attention_backward T{t} {hq}/{hkv}x{hd}"), |b| {
        b.iter(|| {
            black_box(
                be.attention_backward(&dout, &q, &k, &v, &saved, &seqs, hq, hkv, scale)
                    .unwrap(),
            )
        })
    });

    let gate = random_tensor(&be, &[t, inter], 2.0, 7).unwrap();
    let up = random_tensor(&be, &[t, inter], 2.0, 8).unwrap();
    g.throughput(Throughput::Bytes((3 * 4 * t * inter) as u64));
    g.bench_function(format!("swiglu T{t} x{inter}"), |b| {
        b.iter(|| black_box(be.swiglu(&gate, &up).unwrap()))
    });

    let n = 64;
    let logits = random_tensor(&be, &[n, vocab], 4.0, 9).unwrap();
    let labels: Vec<i32> = (0..n as i32).map(|i| (i * 769) % vocab as i32).collect();
    g.throughput(Throughput::Bytes((2 * 4 * n * vocab) as u64));
    g.bench_function(format!("cross_entropy N{n} V{vocab}"), |b| {
        b.iter(|| black_box(be.cross_entropy(&logits, &labels, 1.0 / n as f32).unwrap()))
    });
    g.finish();
}

criterion_group! {
    name = group;
    config = common::config();
    targets = benches
}
criterion_main!(group);
