//! Our packed GEMM (`src/backend/cpu/packed.rs`) against the `gemm` crate, in one process,
//! on the products of a training step (SmolLM2-135M's 576/1536/49152 widths and Llama's 4096 at
//! 512 tokens, both layouts of each, and the thin LoRA products of rank 16).
//!
//! The two alternate call by call and the best time of each is kept, so that a noisy machine
//! moves both alike. `cargo run --release --example sgemm_packed`; `REPS=n` sets the pairs of
//! calls per shape (default 9); `RAYON_NUM_THREADS=1` times one core.

use lorafuse::backend::cpu::gemm::{ManyRows, Op, set_many_rows, sgemm};
use std::time::Instant;

fn main() {
    let shapes = [
        (2048, 2048, 2048, Op::N, Op::T),
        (512, 576, 576, Op::N, Op::T),
        (512, 1536, 576, Op::N, Op::T),
        (512, 576, 1536, Op::N, Op::T),
        (512, 576, 1536, Op::N, Op::N),
        (512, 1536, 576, Op::N, Op::N),
        (1536, 576, 512, Op::T, Op::N),
        (576, 1536, 512, Op::T, Op::N),
        (512, 49152, 576, Op::N, Op::T),
        (512, 4096, 4096, Op::N, Op::T),
        (512, 4096, 4096, Op::N, Op::N),
        (512, 16, 576, Op::N, Op::T),
        (512, 576, 16, Op::N, Op::N),
        (16, 576, 512, Op::T, Op::N),
        (576, 16, 512, Op::T, Op::N),
    ];
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    println!(
        "shape (m x n x k, op a, op b): ours, gemm crate GFLOP/s (best of {reps}), gemm time / ours"
    );
    for (m, n, k, ta, tb) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut c = vec![0.0f32; m * n];
        let mut best = [f64::MAX; 2];
        for r in 0..reps * 2 {
            let which = r % 2;
            set_many_rows(if which == 0 {
                ManyRows::Packed
            } else {
                ManyRows::GemmCrate
            });
            let t = Instant::now();
            sgemm(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c);
            best[which] = best[which].min(t.elapsed().as_secs_f64());
        }
        let gflops = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
        println!(
            "{m}x{n}x{k} {ta:?}{tb:?}: {:.1}, {:.1}, {:.3}",
            gflops(best[0]),
            gflops(best[1]),
            best[1] / best[0]
        );
    }
}
