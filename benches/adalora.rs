//! Criterion benches of the AdaLoRA kernels: layer forward+backward and merge
//! (see `benches/common/mod.rs` for the shapes).

mod common;

use criterion::{Criterion, criterion_group, criterion_main};
use lorafuse::Cpu;
use lorafuse::adapter::bench::BenchMethod;

fn benches(c: &mut Criterion) {
    common::bench_method(c, &Cpu, BenchMethod::Adalora, true);
}

criterion_group! {
    name = group;
    config = common::config();
    targets = benches
}
criterion_main!(group);
