//! Shared by the criterion benches: one kernel family's cases on small real shapes, timed
//! through `lorafuse::adapter::bench` (the harness `lorafuse bench` uses), for every available
//! backend (the CPU reference in this build).
//!
//! The shapes are SmolLM2-135M's MLP up-projection (`1536x576`, rank 16) at 16 and 128 tokens,
//! so `cargo bench` finishes in a few minutes on 2 cores. Llama-size shapes and the comparison
//! against PEFT are `scripts/bench-vs-peft.sh` (see BENCHMARKS.md).

#![allow(dead_code)]

use criterion::{BenchmarkId, Criterion, Throughput};
use lorafuse::adapter::bench::{BenchCase, BenchMethod, Prepared};
use lorafuse::backend::Backend;
use std::time::Duration;

/// Short runs: 10 samples, 1 s of measurement per bench.
pub fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args()
}

/// SmolLM2-135M MLP up-projection `[out, in]` and rank.
pub const SMOL: (usize, usize, usize) = (1536, 576, 16);

/// Forward+backward at T 16 and 128, and (when `merge`) the merge, of `method` on `be`.
pub fn bench_method<B: Backend>(c: &mut Criterion, be: &B, method: BenchMethod, merge: bool) {
    let (o, i, r) = SMOL;
    let mut cases: Vec<BenchCase> = [16, 128]
        .iter()
        .map(|&t| BenchCase::fwd_bwd(method, o, i, r, t))
        .collect();
    if merge {
        cases.push(BenchCase::merge(method, o, i, r));
    }
    let mut g = c.benchmark_group(format!("{}/{}", method.name(), be.name()));
    for case in cases {
        let mut p = Prepared::new(be, &case, 7).expect("bench case");
        g.throughput(Throughput::Elements(case.dense_flop() as u64));
        g.bench_function(BenchmarkId::from_parameter(case.name()), |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| p.run().expect("bench run"))
                    .sum::<Duration>()
            })
        });
    }
    g.finish();
}
