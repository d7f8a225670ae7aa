//! Criterion benches of the NF4 kernels (QLoRA's frozen base): quantization (blocksize 64,
//! double quant), the tiled `nf4_linear` forward and `nf4_linear_backward_input`, against the
//! dense `linear` on the same shape, SmolLM2-135M's MLP up-projection `1536x576`.

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lorafuse::adapter::bench::{random_tensor, random_vec};
use lorafuse::backend::{Backend, Base};
use lorafuse::quant::nf4::quantize_nf4;
use lorafuse::{Cpu, Tensor};
use std::hint::black_box;

fn benches(c: &mut Criterion) {
    let be = Cpu;
    let (o, i, _) = common::SMOL;
    let w = random_vec(o * i, 0.05, 1);
    let mut g = c.benchmark_group(format!("nf4/{}", be.name()));
    g.throughput(Throughput::Elements((o * i) as u64));
    g.bench_function(format!("quantize {o}x{i} bs64 dq"), |b| {
        b.iter(|| black_box(quantize_nf4(&w, &[o, i], 64, true).unwrap()))
    });
    let q = quantize_nf4(&w, &[o, i], 64, true).unwrap();
    let wq = be.upload_nf4(&q).unwrap();
    let wd: Tensor<Cpu> = be.upload(&w, &[o, i]).unwrap();
    for t in [16, 128] {
        let x = random_tensor(&be, &[t, i], 1.0, 2).unwrap();
        let dy = random_tensor(&be, &[t, o], 1.0, 3).unwrap();
        g.throughput(Throughput::Elements((2 * t * o * i) as u64));
        g.bench_function(format!("nf4_linear {o}x{i} T{t}"), |b| {
            b.iter(|| black_box(be.linear_lowrank(&x, Base::Nf4(&wq), None, None).unwrap().y))
        });
        g.bench_function(format!("dense linear {o}x{i} T{t}"), |b| {
            b.iter(|| black_box(be.linear(&x, &wd, None).unwrap()))
        });
        g.bench_function(format!("nf4_linear_backward_input {o}x{i} T{t}"), |b| {
            b.iter(|| {
                black_box(
                    be.backward_input(&dy, Base::Nf4(&wq), None, None)
                        .unwrap()
                        .0,
                )
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = group;
    config = common::config();
    targets = benches
}
criterion_main!(group);
