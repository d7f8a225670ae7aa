//! Kernel benchmark harness, generic over [`Backend`]: one layer of one adapter method on one
//! shape, timed as a training step would run it (forward + backward) or as a merge.
//!
//! Used by `lorafuse bench` (whose JSON `scripts/peft_bench.py` reads to time PEFT on the same
//! cases in the same run) and by the criterion benches in `benches/`. Timings are reported with
//! the machine's limits measured in the same process: the SGEMM peak ([`measure_peak`], a
//! `2048^3` [`Backend::linear`]) and the memory bandwidth of the memory the backend computes in
//! (the host's for the CPU backend, a parallel in-place update; the device's own for a GPU
//! backend, a device-to-device [`Backend::copy_into`]; see [`Bandwidth`]), so every number is
//! also a fraction of what the machine can do.
//!
//! What is timed, per method (the layer types of [`crate::adapter`], dense f32 base unless
//! noted, x `[T, in]`, dy `[T, out]`, every adapter tensor random and non-zero so no term is
//! trivially skipped):
//!
//! * `fwd_bwd`: `layer.forward` then `layer.backward` (dx and every adapter gradient). DoRA's
//!   forward recomputes its detached weight norm `||W0 + s B A||_row` on every call, as PEFT
//!   does; `||W0||_row^2` is cached at layer creation (W0 is frozen), which PEFT does not do.
//!   `qlora` / `qdora` run over an NF4 base (blocksize 64, double quantization); a case with
//!   `base_dtype: bf16` over a bf16 base (`--compute-dtype bf16`), which PEFT's side runs with
//!   a bf16 base weight under `torch.autocast("cpu", torch.bfloat16)`.
//! * `merge`: `layer.merge` into the dense base (DoRA's includes its weight norm), timed alone;
//!   the untimed `unmerge` after it restores the base.

use crate::adapter::{AdaLoraLayer, DoraLayer, Linear, LoraConfig, LoraLayer, VeraLayer};
use crate::adapter::{BaseWeight, VeraShared};
use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::quant::nf4::quantize_nf4;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// The adapter method of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMethod {
    Lora,
    /// LoRA over an NF4 base.
    Qlora,
    Dora,
    /// DoRA over an NF4 base.
    Qdora,
    Vera,
    Adalora,
}

impl BenchMethod {
    /// Lower-case name, as in the JSON and in PEFT's terms.
    pub fn name(self) -> &'static str {
        match self {
            BenchMethod::Lora => "lora",
            BenchMethod::Qlora => "qlora",
            BenchMethod::Dora => "dora",
            BenchMethod::Qdora => "qdora",
            BenchMethod::Vera => "vera",
            BenchMethod::Adalora => "adalora",
        }
    }
    fn is_nf4(self) -> bool {
        matches!(self, BenchMethod::Qlora | BenchMethod::Qdora)
    }
}

/// What a case times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchOp {
    /// Forward then backward of the layer.
    FwdBwd,
    /// Merge of the adapter into the base weight.
    Merge,
}

/// How a case's dense base weight is stored (NF4 methods ignore it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    #[default]
    F32,
    /// A [`crate::backend::Bf16Weight`] base.
    Bf16,
}

/// One benchmark case: a method, an op, a shape (`out x in`, rank r, T tokens; T is unused
/// by a merge and written as 0) and the storage of the dense base.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchCase {
    pub method: BenchMethod,
    pub op: BenchOp,
    pub out: usize,
    #[serde(rename = "in")]
    pub in_: usize,
    pub r: usize,
    pub tokens: usize,
    #[serde(default)]
    pub base_dtype: BaseDtype,
}

impl BenchCase {
    /// A forward+backward case.
    pub fn fwd_bwd(method: BenchMethod, out: usize, in_: usize, r: usize, tokens: usize) -> Self {
        BenchCase {
            method,
            op: BenchOp::FwdBwd,
            out,
            in_,
            r,
            tokens,
            base_dtype: BaseDtype::F32,
        }
    }
    /// The case over a bf16 base.
    pub fn bf16(self) -> Self {
        BenchCase {
            base_dtype: BaseDtype::Bf16,
            ..self
        }
    }
    /// A merge case.
    pub fn merge(method: BenchMethod, out: usize, in_: usize, r: usize) -> Self {
        BenchCase {
            method,
            op: BenchOp::Merge,
            out,
            in_,
            r,
            tokens: 0,
            base_dtype: BaseDtype::F32,
        }
    }

    /// Short stable name, e.g. `lora fwd+bwd 4096x4096 r16 T512`, `dora merge 576x1536 r16`,
    /// `lora fwd+bwd 4096x4096 r16 T512 bf16`.
    pub fn name(&self) -> String {
        let name = self.name_f32();
        match self.base_dtype {
            BaseDtype::F32 => name,
            BaseDtype::Bf16 => format!("{name} bf16"),
        }
    }

    fn name_f32(&self) -> String {
        match self.op {
            BenchOp::FwdBwd => format!(
                "{} fwd+bwd {}x{} r{} T{}",
                self.method.name(),
                self.out,
                self.in_,
                self.r,
                self.tokens
            ),
            BenchOp::Merge => format!(
                "{} merge {}x{} r{}",
                self.method.name(),
                self.out,
                self.in_,
                self.r
            ),
        }
    }

    /// Multiply-add FLOPs of the dense part: `4 T in out` for forward+backward (`x W0^T` and
    /// `dy W0`, 2 FLOP per multiply-add), `2 out in r` for a merge (forming `B A`).
    pub fn dense_flop(&self) -> f64 {
        let (o, i) = (self.out as f64, self.in_ as f64);
        match self.op {
            BenchOp::FwdBwd => 4.0 * self.tokens as f64 * i * o,
            BenchOp::Merge => 2.0 * o * i * self.r as f64,
        }
    }

    /// The fewest bytes the op must move through memory: the base weight read twice plus x, y,
    /// dy, dx for forward+backward; `W` read and written once for a merge.
    pub fn min_bytes(&self) -> f64 {
        let (o, i, t) = (self.out as f64, self.in_ as f64, self.tokens as f64);
        match self.op {
            BenchOp::FwdBwd => {
                // NF4 with double quant at blocksize 64: 0.5 byte + ~1/64 byte per weight.
                let w = if self.method.is_nf4() {
                    o * i * (0.5 + 1.0 / 64.0)
                } else if self.base_dtype == BaseDtype::Bf16 {
                    2.0 * o * i
                } else {
                    4.0 * o * i
                };
                2.0 * w + 4.0 * (2.0 * t * i + 2.0 * t * o)
            }
            BenchOp::Merge => 8.0 * o * i,
        }
    }
}

/// Which case list to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaseSet {
    /// A few minutes on 2 cores: SmolLM2-135M's MLP up-projection (`1536x576`) and a
    /// Llama-7B `4096x4096` projection, rank 16, T 16 and 512, every method, and LoRA over a
    /// bf16 base; merges.
    Default,
    /// Default plus T 1 and 4096, ranks 8 and 64, the `4096x11008` and `14336x4096` MLP
    /// projections of Llama-7B / Llama-3-8B, and QDoRA. Long (tens of minutes on 2 cores).
    Full,
    /// Tiny shapes for criterion and smoke tests.
    Small,
}

const FWD_METHODS: [BenchMethod; 5] = [
    BenchMethod::Lora,
    BenchMethod::Qlora,
    BenchMethod::Dora,
    BenchMethod::Vera,
    BenchMethod::Adalora,
];
const MERGE_METHODS: [BenchMethod; 4] = [
    BenchMethod::Lora,
    BenchMethod::Dora,
    BenchMethod::Vera,
    BenchMethod::Adalora,
];

/// The cases of a set, in a stable order.
pub fn cases(set: CaseSet) -> Vec<BenchCase> {
    let mut v = Vec::new();
    let grid = |v: &mut Vec<BenchCase>, shapes: &[(usize, usize)], ts: &[usize], r: usize| {
        for &(o, i) in shapes {
            for &t in ts {
                for m in FWD_METHODS {
                    v.push(BenchCase::fwd_bwd(m, o, i, r, t));
                }
            }
            for m in MERGE_METHODS {
                v.push(BenchCase::merge(m, o, i, r));
            }
        }
    };
    match set {
        CaseSet::Small => {
            grid(&mut v, &[(256, 128)], &[16], 8);
            v.push(BenchCase::fwd_bwd(BenchMethod::Lora, 256, 128, 8, 16).bf16());
        }
        CaseSet::Default | CaseSet::Full => {
            grid(&mut v, &[(1536, 576), (4096, 4096)], &[16, 512], 16);
            for (o, i) in [(1536, 576), (4096, 4096)] {
                for t in [16, 512] {
                    v.push(BenchCase::fwd_bwd(BenchMethod::Lora, o, i, 16, t).bf16());
                }
            }
        }
    }
    if set == CaseSet::Full {
        for t in [1, 4096] {
            for m in FWD_METHODS {
                v.push(BenchCase::fwd_bwd(m, 4096, 4096, 16, t));
            }
        }
        for r in [8, 64] {
            for m in [BenchMethod::Lora, BenchMethod::Dora] {
                v.push(BenchCase::fwd_bwd(m, 4096, 4096, r, 512));
                v.push(BenchCase::merge(m, 4096, 4096, r));
            }
        }
        v.push(BenchCase::fwd_bwd(BenchMethod::Qdora, 4096, 4096, 16, 512));
        grid(&mut v, &[(4096, 11008), (14336, 4096)], &[512], 16);
    }
    v
}

/// Uniform random values in `[-bound, bound)` from ChaCha8 seeded by `seed`.
pub fn random_vec(n: usize, bound: f32, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

/// A random tensor of `shape`, uniform in `[-bound, bound)`.
pub fn random_tensor<B: Backend>(
    be: &B,
    shape: &[usize],
    bound: f32,
    seed: u64,
) -> Result<Tensor<B>> {
    let n = shape.iter().product();
    be.upload(&random_vec(n, bound, seed), shape)
}

enum Layer<B: Backend> {
    Lora(LoraLayer<B>),
    Dora(DoraLayer<B>),
    Vera(VeraShared<B>, VeraLayer<B>),
    AdaLora(AdaLoraLayer<B>),
}

/// A case made ready to run: base, adapter, x and dy uploaded.
pub struct Prepared<B: Backend> {
    be: B,
    case: BenchCase,
    base: Linear<B>,
    layer: Layer<B>,
    x: Tensor<B>,
    dy: Tensor<B>,
}

impl<B: Backend> Prepared<B> {
    /// Builds the base (`W0` uniform in `±1/sqrt(in)`, quantized to NF4 for `qlora`/`qdora`),
    /// the adapter with every trained tensor random and non-zero, and x, dy.
    /// Errors: a zero dimension, or a merge case of an NF4 method (merging needs a dense base).
    pub fn new(be: &B, case: &BenchCase, seed: u64) -> Result<Self> {
        let (o, i, r) = (case.out, case.in_, case.r);
        if o == 0 || i == 0 || r == 0 || (case.op == BenchOp::FwdBwd && case.tokens == 0) {
            return Err(Error::arg(
                "case",
                format!("zero dimension in {}", case.name()),
            ));
        }
        if case.op == BenchOp::Merge && (case.method.is_nf4() || case.base_dtype == BaseDtype::Bf16)
        {
            return Err(Error::arg(
                "case",
                "merge over an NF4 or bf16 base is a widening then a dense merge; bench the f32 \
                 lora/dora merge",
            ));
        }
        let wb = 1.0 / (i as f32).sqrt();
        let w0 = random_vec(o * i, wb, seed);
        let base = if case.method.is_nf4() {
            Linear::nf4(be, &quantize_nf4(&w0, &[o, i], 64, true)?)?
        } else if case.base_dtype == BaseDtype::Bf16 {
            Linear {
                weight: BaseWeight::Bf16(be.upload_bf16(&w0, &[o, i])?),
                bias: None,
            }
        } else {
            Linear::dense(be.upload(&w0, &[o, i])?)?
        };
        let a = || random_tensor(be, &[r, i], wb, seed + 1);
        let b = || random_tensor(be, &[o, r], 0.05, seed + 2);
        let cfg = LoraConfig {
            r,
            lora_alpha: 2.0 * r as f32,
            ..Default::default()
        };
        let layer = match case.method {
            BenchMethod::Lora | BenchMethod::Qlora => {
                Layer::Lora(LoraLayer::from_factors(&base, a()?, b()?, cfg.scaling())?)
            }
            BenchMethod::Dora | BenchMethod::Qdora => {
                // m = the creation-time norm, perturbed so that m / n != 1.
                let mut d = DoraLayer::from_factors(be, &base, a()?, b()?, cfg.scaling(), None)?;
                let mut m = be.download(&d.lora_magnitude_vector)?;
                for (k, v) in m.iter_mut().enumerate() {
                    *v *= 1.0 + 0.01 * (k % 7) as f32;
                }
                d.lora_magnitude_vector = be.upload(&m, &[o])?;
                Layer::Dora(d)
            }
            BenchMethod::Vera => {
                let shared = VeraShared::init(be, r, i, o, seed + 3)?;
                let ld = random_tensor(be, &[r], 0.2, seed + 4)?;
                let lb = random_tensor(be, &[o], 0.2, seed + 5)?;
                let l = VeraLayer::from_vectors(&shared, &base, ld, lb)?;
                Layer::Vera(shared, l)
            }
            BenchMethod::Adalora => {
                let e = random_tensor(be, &[r, 1], 1.0, seed + 6)?;
                let scaling = AdaLoraLayer::<B>::scaling_for(cfg.lora_alpha, r);
                Layer::AdaLora(AdaLoraLayer::from_factors(
                    &base,
                    a()?,
                    b()?,
                    e,
                    scaling,
                    r as f32,
                )?)
            }
        };
        let t = case.tokens.max(1);
        Ok(Prepared {
            be: be.clone(),
            case: case.clone(),
            x: random_tensor(be, &[t, i], 1.0, seed + 7)?,
            dy: random_tensor(be, &[t, o], 1.0, seed + 8)?,
            base,
            layer,
        })
    }

    /// The case.
    pub fn case(&self) -> &BenchCase {
        &self.case
    }

    /// Runs the case once and returns the time of the timed part (all of forward+backward; the
    /// merge alone, not the unmerge that restores the base after it).
    pub fn run(&mut self) -> Result<Duration> {
        let be = &self.be;
        let (x, dy) = (&self.x, &self.dy);
        match self.case.op {
            BenchOp::FwdBwd => {
                let t0 = Instant::now();
                match &self.layer {
                    Layer::Lora(l) => {
                        let (y, h) = l.forward(be, &self.base, x)?;
                        black_box((y, l.backward(be, &self.base, x, &h, dy)?));
                    }
                    Layer::Dora(l) => {
                        let (y, saved) = l.forward(be, &self.base, x)?;
                        black_box((y, l.backward(be, &self.base, x, &saved, dy)?));
                    }
                    Layer::Vera(s, l) => {
                        let (y, h) = l.forward(be, s, &self.base, x)?;
                        black_box((y, l.backward(be, s, &self.base, x, &h, dy)?));
                    }
                    Layer::AdaLora(l) => {
                        let (y, h) = l.forward(be, &self.base, x)?;
                        black_box((y, l.backward(be, &self.base, x, &h, dy)?));
                    }
                }
                be.synchronize()?;
                Ok(t0.elapsed())
            }
            BenchOp::Merge => {
                let base = &mut self.base;
                let t0 = Instant::now();
                match &mut self.layer {
                    Layer::Lora(l) => l.merge(be, base)?,
                    Layer::Dora(l) => l.merge(be, base)?,
                    Layer::Vera(s, l) => l.merge(be, s, base)?,
                    Layer::AdaLora(l) => l.merge(be, base)?,
                }
                be.synchronize()?;
                let dt = t0.elapsed();
                if let BaseWeight::Dense(w) = &base.weight {
                    black_box(w);
                }
                match &mut self.layer {
                    Layer::Lora(l) => l.unmerge(be, base)?,
                    Layer::Dora(l) => l.unmerge(be, base)?,
                    Layer::Vera(s, l) => l.unmerge(be, s, base)?,
                    Layer::AdaLora(l) => l.unmerge(be, base)?,
                }
                Ok(dt)
            }
        }
    }
}

/// How long to time each case.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Untimed runs first.
    pub warmup: usize,
    /// At least this many timed runs ...
    pub min_reps: usize,
    /// ... and more until this much time is spent timing ...
    pub min_time: Duration,
    /// ... but never more than this many.
    pub max_reps: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            warmup: 1,
            min_reps: 3,
            min_time: Duration::from_millis(1000),
            max_reps: 50,
        }
    }
}

/// Median of the timed runs of one case, in seconds, and how many runs.
pub fn time_case<B: Backend>(p: &mut Prepared<B>, timing: &Timing) -> Result<(f64, usize)> {
    for _ in 0..timing.warmup {
        p.run()?;
    }
    let mut ts = Vec::new();
    let mut total = Duration::ZERO;
    while ts.len() < timing.max_reps.max(1)
        && (ts.len() < timing.min_reps.max(1) || total < timing.min_time)
    {
        let dt = p.run()?;
        total += dt;
        ts.push(dt.as_secs_f64());
    }
    Ok((median(&mut ts), ts.len()))
}

fn median(ts: &mut [f64]) -> f64 {
    ts.sort_by(f64::total_cmp);
    let n = ts.len();
    if n % 2 == 1 {
        ts[n / 2]
    } else {
        0.5 * (ts[n / 2 - 1] + ts[n / 2])
    }
}

/// Which memory [`MachinePeak::copy_gbps`] measured, and how.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bandwidth {
    /// Host memory (the CPU backend): a rayon-parallel in-place update of 768 MiB (`v = v * a`,
    /// every byte read and written once: the access pattern of a merge).
    #[default]
    HostMemory,
    /// The device's own memory (GPU backends): device-to-device copies of a 256 MiB tensor
    /// through [`Backend::copy_into`], four between synchronizations, no host memory involved.
    DeviceCopy,
}

impl Bandwidth {
    /// Short description for reports, e.g. `device copy (device-to-device, read + write)`.
    pub fn describe(self) -> &'static str {
        match self {
            Bandwidth::HostMemory => "host memory (in-place update, read + write)",
            Bandwidth::DeviceCopy => "device copy (device-to-device, read + write)",
        }
    }
}

impl std::fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// The machine's limits as measured by [`measure_peak`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachinePeak {
    /// SGEMM throughput of [`Backend::linear`] on `2048 x 2048 x 2048`, GFLOP/s.
    pub sgemm_gflops: f64,
    /// Memory bandwidth, GB/s counting bytes read + written, of the memory [`bandwidth`]
    /// names: the host's for the CPU backend, the device's own for a GPU backend (whose
    /// kernels never touch host memory, so a host figure would be the wrong roofline).
    ///
    /// [`bandwidth`]: MachinePeak::bandwidth
    pub copy_gbps: f64,
    /// What [`MachinePeak::copy_gbps`] measured (absent in older JSON: host memory).
    #[serde(default)]
    pub bandwidth: Bandwidth,
}

impl std::fmt::Display for MachinePeak {
    /// `SGEMM peak (linear 2048^3) X GFLOP/s; bandwidth Y GB/s, <what it is>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SGEMM peak (linear 2048^3) {:.1} GFLOP/s; bandwidth {:.1} GB/s, {}",
            self.sgemm_gflops, self.copy_gbps, self.bandwidth
        )
    }
}

/// Measures the SGEMM peak through `be.linear` on `2048^3` (median of 5 after a warm-up; the
/// large square product is the GEMM's best case) and the memory bandwidth (median of 5 after
/// a warm-up): for the CPU backend the host's, with a rayon-parallel in-place update; for any
/// other backend the device's own, with device-to-device copies through
/// [`Backend::copy_into`] timed with [`Backend::synchronize`] (see [`Bandwidth`]).
pub fn measure_peak<B: Backend>(be: &B) -> Result<MachinePeak> {
    let n = 2048;
    let x = random_tensor(be, &[n, n], 1.0, 11)?;
    let w = random_tensor(be, &[n, n], 1.0, 12)?;
    let mut ts = Vec::new();
    for k in 0..6 {
        let t0 = Instant::now();
        black_box(be.linear(&x, &w, None)?);
        be.synchronize()?;
        if k >= 1 {
            ts.push(t0.elapsed().as_secs_f64());
        }
    }
    let sgemm_gflops = 2.0 * (n * n * n) as f64 / median(&mut ts) / 1e9;
    drop((x, w));
    let (copy_gbps, bandwidth) = if be.name() == "cpu" {
        (host_update_gbps(), Bandwidth::HostMemory)
    } else {
        (device_copy_gbps(be, 64 << 20)?, Bandwidth::DeviceCopy)
    };
    Ok(MachinePeak {
        sgemm_gflops,
        copy_gbps,
        bandwidth,
    })
}

/// Host memory bandwidth: a rayon-parallel in-place update of 768 MiB, GB/s read + written.
fn host_update_gbps() -> f64 {
    use rayon::prelude::*;
    // 192 Mi f32 = 768 MiB: well past the last-level cache of a server CPU (260 MiB on the
    // 2-core CI VM), so this is DRAM bandwidth.
    let len = 192 << 20;
    let mut v = vec![1.0f32; len];
    let mut ts = Vec::new();
    for k in 0..6 {
        let t0 = Instant::now();
        v.par_chunks_mut(1 << 16).for_each(|c| {
            for e in c {
                *e *= 0.999_999;
            }
        });
        black_box(&v);
        if k >= 1 {
            ts.push(t0.elapsed().as_secs_f64());
        }
    }
    8.0 * len as f64 / median(&mut ts) / 1e9
}

/// The device's copy bandwidth: [`Backend::copy_into`] of a tensor of `len` f32 (64 Mi =
/// 256 MiB in [`measure_peak`]: 4x the L2 of an H200, and wgpu's default largest buffer), four
/// copies between synchronizations so that the launch and wait overheads are a few percent of
/// a timed run, GB/s counting bytes read + written.
fn device_copy_gbps<B: Backend>(be: &B, len: usize) -> Result<f64> {
    const COPIES: usize = 4;
    // Non-zero, varied data (a copy of zeros can run faster than one of real data), integers
    // that f16 and bf16 storage hold exactly, so the check below is exact on every backend.
    let val = |i: usize| 1.0 + (i % 251) as f32;
    let src = be.upload(&(0..len).map(val).collect::<Vec<f32>>(), &[len])?;
    let mut dst = be.zeros(&[len])?;
    let bytes = 2.0 * COPIES as f64 * B::stored_bytes(&src) as f64;
    let mut ts = Vec::new();
    for k in 0..6 {
        be.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..COPIES {
            be.copy_into(&src, &mut dst)?;
        }
        be.synchronize()?;
        if k >= 1 {
            ts.push(t0.elapsed().as_secs_f64());
        }
    }
    // Every element written (dst started as zeros): a timing of a copy that did not happen
    // would be no bandwidth at all.
    let got = be.download(&dst)?;
    if let Some(i) = (0..len).find(|&i| got.get(i) != Some(&val(i))) {
        let msg = format!(
            "copy_into: dst[{i}] is {:?}, src[{i}] is {}",
            got.get(i),
            val(i)
        );
        return Err(Error::Backend {
            backend: be.name().into(),
            msg,
        });
    }
    Ok(bytes / median(&mut ts) / 1e9)
}

/// One timed case, as written to JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// [`BenchCase::name`].
    pub case: String,
    #[serde(flatten)]
    pub spec: BenchCase,
    /// Median seconds of one run.
    pub ours_s: f64,
    /// Timed runs.
    pub reps: usize,
    /// Dense GFLOP/s ([`BenchCase::dense_flop`] / time) and its fraction of the SGEMM peak.
    pub gflops: f64,
    pub frac_peak_flops: f64,
    /// GB/s of the minimum traffic ([`BenchCase::min_bytes`] / time) and its fraction of the
    /// measured bandwidth ([`MachinePeak::copy_gbps`]).
    pub gbps: f64,
    pub frac_peak_bw: f64,
    /// The roofline time `max(flop / peak, bytes / bandwidth)` over the measured time: the
    /// fraction of the machine's limit reached.
    pub frac_limit: f64,
    /// The limits this was measured against.
    pub peak_sgemm_gflops: f64,
    pub peak_copy_gbps: f64,
    /// What `peak_copy_gbps` measured: host memory (CPU) or the device's copy bandwidth.
    #[serde(default)]
    pub peak_bandwidth: Bandwidth,
}

/// Prepares and times one case.
pub fn bench_case<B: Backend>(
    be: &B,
    case: &BenchCase,
    timing: &Timing,
    peak: &MachinePeak,
) -> Result<BenchResult> {
    let mut p = Prepared::new(be, case, 0x5eed)?;
    let (s, reps) = time_case(&mut p, timing)?;
    let flop = case.dense_flop();
    let bytes = case.min_bytes();
    let gflops = flop / s / 1e9;
    let gbps = bytes / s / 1e9;
    let roof = (flop / (peak.sgemm_gflops * 1e9)).max(bytes / (peak.copy_gbps * 1e9));
    Ok(BenchResult {
        case: case.name(),
        spec: case.clone(),
        ours_s: s,
        reps,
        gflops,
        frac_peak_flops: gflops / peak.sgemm_gflops,
        gbps,
        frac_peak_bw: gbps / peak.copy_gbps,
        frac_limit: roof / s,
        peak_sgemm_gflops: peak.sgemm_gflops,
        peak_copy_gbps: peak.copy_gbps,
        peak_bandwidth: peak.bandwidth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    #[test]
    fn every_small_case_runs_and_merge_restores_the_base() {
        let be = Cpu;
        for case in cases(CaseSet::Small) {
            let mut p = Prepared::new(&be, &case, 1).unwrap();
            let before = match &p.base.weight {
                BaseWeight::Dense(w) => Some(be.download(w).unwrap()),
                BaseWeight::Nf4(_) | BaseWeight::Bf16(_) => None,
            };
            assert!(p.run().unwrap() > Duration::ZERO, "{}", case.name());
            if let (Some(before), BaseWeight::Dense(w)) = (before, &p.base.weight) {
                let after = be.download(w).unwrap();
                let err = before
                    .iter()
                    .zip(&after)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4, "{}: base changed by {err}", case.name());
            }
        }
    }

    #[test]
    fn device_copy_path_copies_and_reports_a_bandwidth() {
        // The GPU path of measure_peak, run on the CPU backend's default copy_into.
        let gbps = device_copy_gbps(&Cpu, 1 << 16).unwrap();
        assert!(gbps.is_finite() && gbps > 0.0, "{gbps}");
        let src = Cpu.upload(&[1.0, 2.0, 3.0], &[3]).unwrap();
        let mut dst = Cpu.zeros(&[3]).unwrap();
        Cpu.copy_into(&src, &mut dst).unwrap();
        assert_eq!(Cpu.download(&dst).unwrap(), vec![1.0, 2.0, 3.0]);
        let mut wrong = Cpu.zeros(&[2]).unwrap();
        assert!(Cpu.copy_into(&src, &mut wrong).is_err());
        // The kind travels in the JSON; older JSON without it reads as host memory.
        let peak = MachinePeak {
            sgemm_gflops: 1.0,
            copy_gbps: 2.0,
            bandwidth: Bandwidth::DeviceCopy,
        };
        let json = serde_json::to_string(&peak).unwrap();
        assert!(json.contains("\"bandwidth\":\"device_copy\""), "{json}");
        let old: MachinePeak =
            serde_json::from_str(r#"{"sgemm_gflops": 1.0, "copy_gbps": 2.0}"#).unwrap();
        assert_eq!(old.bandwidth, Bandwidth::HostMemory);
        assert!(peak.to_string().contains("device copy"), "{peak}");
    }

    #[test]
    fn case_sets_and_names() {
        let d = cases(CaseSet::Default);
        assert_eq!(d.len(), 2 * (2 * 5 + 4) + 4);
        assert_eq!(d[0].name(), "lora fwd+bwd 1536x576 r16 T16");
        let last = d.last().unwrap();
        assert_eq!(last.name(), "lora fwd+bwd 4096x4096 r16 T512 bf16");
        assert!(cases(CaseSet::Full).len() > d.len());
        let json = serde_json::to_string(&d[0]).unwrap();
        assert!(json.contains("\"in\":576") && json.contains("\"op\":\"fwd_bwd\""));
        assert!(json.contains("\"base_dtype\":\"f32\""), "{json}");
        let json = serde_json::to_string(last).unwrap();
        assert!(json.contains("\"base_dtype\":\"bf16\""), "{json}");
        // An older case file, without base_dtype, reads as f32.
        let old: BenchCase = serde_json::from_str(
            r#"{"method":"lora","op":"fwd_bwd","out":8,"in":8,"r":2,"tokens":4}"#,
        )
        .unwrap();
        assert_eq!(old.base_dtype, BaseDtype::F32);
        // bf16 halves the weight's share of the minimum traffic.
        let f = BenchCase::fwd_bwd(BenchMethod::Lora, 64, 64, 2, 1);
        let w_bytes = f.min_bytes() - f.clone().bf16().min_bytes();
        assert_eq!(w_bytes, 2.0 * 2.0 * 64.0 * 64.0);
        assert!(Prepared::new(&Cpu, &BenchCase::merge(BenchMethod::Qlora, 8, 8, 2), 0).is_err());
        assert!(
            Prepared::new(
                &Cpu,
                &BenchCase::merge(BenchMethod::Lora, 8, 8, 2).bf16(),
                0
            )
            .is_err()
        );
    }
}
