//! lorafuse's candle layers against candle's own composition of the same math, forward +
//! backward of one layer at T = 512 tokens (the training shape), on SmolLM2-135M's projection
//! shapes and Llama's 4096x4096, rank 16 (feature `candle`):
//!
//! - `lorafuse`: `LoraLinear::forward`, one fused custom op, and its `bwd`;
//! - `candle`: `x.matmul(w.t()) + s * x.matmul(a.t()).matmul(b.t())` with candle's autograd.
//!
//! DoRA likewise at the SmolLM2 shapes (candle: PEFT's formula with the detached norm).
//! Both sides take `dx` (x is a `Var`, as inside a model) and the adapter's gradients.
//! `scripts/bench-candle.sh` runs this and prints the same-run ratios (BENCHMARKS.md).

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lorafuse::adapter::LoraConfig;
use lorafuse::candle::{DoraLinear, LoraLinear};
use std::time::Duration;

const T: usize = 512;
const R: usize = 16;

fn rand(shape: &[usize], std: f32) -> Tensor {
    Tensor::randn(0f32, std, shape, &Device::Cpu).expect("randn")
}

fn cfg() -> LoraConfig {
    LoraConfig {
        r: R,
        lora_alpha: 32.0,
        ..Default::default()
    }
}

/// One step: forward, `loss = sum(y)` (so the upstream gradient is `dy = 1`, as it would
/// arrive from the next layer: no `[T, out]` product of the harness's own on either side),
/// backward (all gradients kept until dropped).
fn step(f: impl Fn(&Tensor) -> Tensor, x: &Var) {
    let y = f(x.as_tensor());
    let loss = y.sum_all().expect("sum");
    let grads = loss.backward().expect("backward");
    std::hint::black_box(grads);
}

fn benches(c: &mut Criterion) {
    let shapes = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)];
    for (out, inp) in shapes {
        let w = rand(&[out, inp], 0.02);
        let lin = candle_nn::Linear::new(w.clone(), None);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let layer = LoraLinear::from_linear(&lin, &cfg(), vb.pp("l")).expect("layer");
        let b_init = rand(&[out, R], 0.02);
        layer.lora_b.slice_set(&b_init, 0, 0).expect("set B");
        let a = Var::from_tensor(&layer.lora_a.copy().expect("copy")).expect("var");
        let b = Var::from_tensor(&b_init).expect("var");
        let s = layer.scaling() as f64;
        let x = Var::from_tensor(&rand(&[T, inp], 1.0)).expect("x");
        let mut grp = c.benchmark_group(format!("candle_lora/{out}x{inp}_r{R}_T{T}"));
        grp.bench_function(BenchmarkId::from_parameter("lorafuse"), |bn| {
            bn.iter(|| step(|x| layer.forward(x).expect("forward"), &x))
        });
        grp.bench_function(BenchmarkId::from_parameter("candle"), |bn| {
            bn.iter(|| {
                step(
                    |x| {
                        let lo = x
                            .matmul(&a.t().expect("t"))
                            .and_then(|h| h.matmul(&b.t()?))
                            .expect("lora");
                        (x.matmul(&w.t().expect("t")).expect("base") + (lo * s).expect("scale"))
                            .expect("add")
                    },
                    &x,
                )
            })
        });
        grp.finish();
        if out == 4096 {
            continue;
        }
        let d = DoraLinear::from_linear(&lin, &cfg(), vb.pp("d")).expect("dora");
        d.lora().lora_b.slice_set(&b_init, 0, 0).expect("set B");
        let m = Var::from_tensor(&d.lora_magnitude_vector.copy().expect("copy")).expect("var");
        let mut grp = c.benchmark_group(format!("candle_dora/{out}x{inp}_r{R}_T{T}"));
        grp.bench_function(BenchmarkId::from_parameter("lorafuse"), |bn| {
            bn.iter(|| step(|x| d.forward(x).expect("forward"), &x))
        });
        grp.bench_function(BenchmarkId::from_parameter("candle"), |bn| {
            bn.iter(|| {
                step(
                    |x| {
                        let f = || -> candle_core::Result<Tensor> {
                            let delta = (b.matmul(&a)? * s)?;
                            let n = (&w + delta)?.sqr()?.sum(1)?.sqrt()?.detach();
                            let lo = x.matmul(&a.t()?)?.matmul(&b.t()?)?;
                            let z = (x.matmul(&w.t()?)? + (lo * s)?)?;
                            z.broadcast_mul(&(m.as_tensor() / n)?)
                        };
                        f().expect("dora composition")
                    },
                    &x,
                )
            })
        });
        grp.finish();
    }
}

criterion_group! {
    name = group;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    targets = benches
}
criterion_main!(group);
