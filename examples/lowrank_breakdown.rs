//! Where one LoRA layer's forward + backward goes on the CPU: the eight products of the fused
//! step (`y = x W^T + s (x A^T) B^T`, then `dx`, `dA`, `dB`), each timed alone through
//! lorafuse's `sgemm` (best of REPS, default 40), next to the layer itself (`lorafuse bench`'s
//! case, median and best) run in alternation with them.
//!
//! `cargo run --release --example lowrank_breakdown`; `DOUT`, `DIN`, `T`, `R` set the shape
//! (default SmolLM2's gate/up projection, 1536 x 576, rank 16, 512 tokens).

use lorafuse::adapter::bench::{BenchCase, BenchMethod, Prepared};
use lorafuse::backend::cpu::Cpu;
use lorafuse::backend::cpu::gemm::{Op, sgemm};
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (dout, din, t, r) = (
        env("DOUT", 1536),
        env("DIN", 576),
        env("T", 512),
        env("R", 16),
    );
    let reps = env("REPS", 40);
    let fill =
        |n: usize, k: usize| -> Vec<f32> { (0..n).map(|i| ((i * k) % 17) as f32 * 0.01).collect() };
    let (x, w, a, b, dy) = (
        fill(t * din, 3),
        fill(dout * din, 5),
        fill(r * din, 7),
        fill(dout * r, 11),
        fill(t * dout, 13),
    );
    let (mut y, mut h, mut dx, mut g) = (
        vec![0.0; t * dout],
        vec![0.0; t * r],
        vec![0.0; t * din],
        vec![0.0; t * r],
    );
    let (mut db, mut da) = (vec![0.0; dout * r], vec![0.0; r * din]);
    let names = [
        "y = x W^T",
        "h = x A^T",
        "y += s h B^T",
        "dx = dy W",
        "g = dy B",
        "dx += s g A",
        "dB = dy^T h",
        "dA = g^T x",
    ];
    let case = BenchCase::fwd_bwd(BenchMethod::Lora, dout, din, r, t);
    let mut layer = Prepared::new(&Cpu, &case, 1).expect("bench case");
    let mut best = [f64::MAX; 8];
    let mut layer_times = Vec::with_capacity(reps);
    for _ in 0..reps {
        layer_times.push(layer.run().expect("layer").as_secs_f64());
        let mut took = [0f64; 8];
        let mut time = |i: usize, f: &mut dyn FnMut()| {
            let t0 = Instant::now();
            f();
            took[i] = t0.elapsed().as_secs_f64();
        };
        time(0, &mut || {
            sgemm(Op::N, Op::T, t, dout, din, 1.0, &x, &w, 0.0, &mut y)
        });
        time(1, &mut || {
            sgemm(Op::N, Op::T, t, r, din, 1.0, &x, &a, 0.0, &mut h)
        });
        time(2, &mut || {
            sgemm(Op::N, Op::T, t, dout, r, 2.0, &h, &b, 1.0, &mut y)
        });
        time(3, &mut || {
            sgemm(Op::N, Op::N, t, din, dout, 1.0, &dy, &w, 0.0, &mut dx)
        });
        time(4, &mut || {
            sgemm(Op::N, Op::N, t, r, dout, 1.0, &dy, &b, 0.0, &mut g)
        });
        time(5, &mut || {
            sgemm(Op::N, Op::N, t, din, r, 2.0, &g, &a, 1.0, &mut dx)
        });
        time(6, &mut || {
            sgemm(Op::T, Op::N, dout, r, t, 1.0, &dy, &h, 0.0, &mut db)
        });
        time(7, &mut || {
            sgemm(Op::T, Op::N, r, din, t, 2.0, &g, &x, 0.0, &mut da)
        });
        for (b, t) in best.iter_mut().zip(took) {
            *b = b.min(t);
        }
    }
    println!("LoRA {dout}x{din} r{r} T{t}, best of {reps} (ms):");
    for (name, b) in names.iter().zip(best) {
        println!("  {name:14} {:8.3}", b * 1e3);
    }
    let base = best[0] + best[3];
    let sum: f64 = best.iter().sum();
    layer_times.sort_by(f64::total_cmp);
    println!(
        "  base products {:.3}, low-rank products {:.3} ({:.0}% of the sum {:.3})",
        base * 1e3,
        (sum - base) * 1e3,
        100.0 * (sum - base) / sum,
        sum * 1e3
    );
    println!(
        "  the layer (lorafuse bench's case): median {:.3}, best {:.3}",
        layer_times[reps / 2] * 1e3,
        layer_times[0] * 1e3
    );
}
