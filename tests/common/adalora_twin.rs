//! One AdaLoRA allocation run driven twice: by the host `RankAllocator` over slices and by the
//! device-resident `DeviceRankAllocator` on a backend, over the same seeded values and
//! gradients, recording after each step what both expose (the returned mask, `lora_E`, the
//! EMAs, the triplet scores and threshold of a mask, the rank pattern), so that tests can
//! compare the two (bit for bit on the CPU backend) or two backends.

#![allow(dead_code)]

use lorafuse::adapter::device_rank_allocator::{AdaLoraDeviceLayer, DeviceRankAllocator};
use lorafuse::adapter::rank_allocator::{
    AdaLoraLayerView, AdaLoraSchedule, RankAllocator, RankPattern,
};
use lorafuse::{Backend, Tensor};

/// Layers `(name, r, in, out)`, a schedule and the steps to run (1-based, PEFT's).
pub struct Scenario {
    pub layers: Vec<(String, usize, usize, usize)>,
    pub schedule: AdaLoraSchedule,
    pub betas: (f64, f64),
    pub steps: u64,
    pub seed: u64,
    /// A NaN gradient at `(step, layer, entry of grad_A)`, if any.
    pub nan_at: Option<(u64, usize, usize)>,
}

/// What one step left behind.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    /// The budget masked to, when a mask was computed from the scores.
    pub masked_to: Option<usize>,
    /// `lora_E` of each layer after the step.
    pub e: Vec<Vec<f32>>,
    /// Per layer `[ipt_A, unc_A, ipt_B, unc_B, ipt_E, unc_E]`, while the EMAs exist.
    pub ema: Option<Vec<[Vec<f32>; 6]>>,
    /// Every layer's triplet scores (layers in order) and the threshold, on mask steps.
    pub scores: Option<Vec<f32>>,
    pub threshold: Option<f32>,
    pub pattern: Option<RankPattern>,
}

fn lcg(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// Seeded `(A, grad_A, B, grad_B, the optimizer's move of E, grad_E)` of layer `l` at `step`.
fn data(sc: &Scenario, step: u64, l: usize) -> [Vec<f32>; 6] {
    let (_, r, inp, out) = sc.layers[l];
    let s = sc.seed ^ (step * 1000 + l as u64 * 10);
    let mut ga = lcg(s + 2, r * inp, 0.5);
    if let Some((st, ll, j)) = sc.nan_at
        && st == step
        && ll == l
        && j < ga.len()
    {
        ga[j] = f32::NAN;
    }
    [
        lcg(s + 1, r * inp, 0.3),
        ga,
        lcg(s + 3, out * r, 0.3),
        lcg(s + 4, out * r, 0.5),
        lcg(s + 5, r, 0.1),
        lcg(s + 6, r, 0.5),
    ]
}

fn names(sc: &Scenario) -> Vec<(&str, usize)> {
    sc.layers
        .iter()
        .map(|(n, r, _, _)| (n.as_str(), *r))
        .collect()
}

/// The host allocator's run.
pub fn run_host(sc: &Scenario) -> Vec<StepRecord> {
    let mut alloc = RankAllocator::new(sc.schedule, sc.betas.0, sc.betas.1, &names(sc)).unwrap();
    let mut es: Vec<Vec<f32>> = sc.layers.iter().map(|l| vec![0.0; l.1]).collect();
    let mut out = Vec::new();
    for step in 1..=sc.steps {
        let d: Vec<[Vec<f32>; 6]> = (0..sc.layers.len()).map(|l| data(sc, step, l)).collect();
        for (e, d) in es.iter_mut().zip(&d) {
            e.iter_mut().zip(&d[4]).for_each(|(e, m)| *e += m);
        }
        let mut views: Vec<AdaLoraLayerView<'_>> = es
            .iter_mut()
            .zip(&d)
            .zip(&sc.layers)
            .map(|((e, d), (name, r, inp, o))| AdaLoraLayerView {
                name,
                lora_a: &d[0],
                grad_a: &d[1],
                lora_b: &d[2],
                grad_b: &d[3],
                lora_e: e,
                grad_e: &d[5],
                r: *r,
                in_features: *inp,
                out_features: *o,
            })
            .collect();
        let got = alloc.update_and_allocate(step, &mut views).unwrap();
        drop(views);
        let ema = sc
            .layers
            .iter()
            .map(|(n, ..)| {
                alloc.ema(n).map(|e| {
                    [
                        e.a.exp_avg_ipt.clone(),
                        e.a.exp_avg_unc.clone(),
                        e.b.exp_avg_ipt.clone(),
                        e.b.exp_avg_unc.clone(),
                        e.e.exp_avg_ipt.clone(),
                        e.e.exp_avg_unc.clone(),
                    ]
                })
            })
            .collect::<Option<Vec<_>>>();
        out.push(StepRecord {
            step,
            masked_to: got.as_ref().map(|a| a.budget),
            e: es.clone(),
            ema,
            scores: got.as_ref().map(|a| {
                sc.layers
                    .iter()
                    .flat_map(|(n, ..)| a.triplet_scores[n].clone())
                    .collect()
            }),
            threshold: got.as_ref().map(|a| a.threshold),
            pattern: alloc.rank_pattern().cloned(),
        });
    }
    out
}

/// The device allocator's run on `be` (downloads only to record, after each step).
/// The device allocator's view of each layer: `lora_E` from `es`, the other factors and all
/// gradients from `d` (`[A, dA, B, dB, E-step, dE]` per layer, the order `run_device` uploads).
pub fn device_views<'a, B: Backend>(
    sc: &'a Scenario,
    es: &'a mut [Tensor<B>],
    d: &'a [[Tensor<B>; 6]],
) -> Vec<AdaLoraDeviceLayer<'a, B>> {
    es.iter_mut()
        .zip(d)
        .zip(&sc.layers)
        .map(|((e, d), (name, ..))| AdaLoraDeviceLayer {
            name,
            lora_a: &d[0],
            grad_a: &d[1],
            lora_b: &d[2],
            grad_b: &d[3],
            lora_e: e,
            grad_e: &d[5],
        })
        .collect()
}

pub fn run_device<B: Backend>(be: &B, sc: &Scenario) -> Vec<StepRecord> {
    let mut alloc =
        DeviceRankAllocator::new(be, sc.schedule, sc.betas.0, sc.betas.1, &names(sc)).unwrap();
    let mut es: Vec<Tensor<B>> = sc
        .layers
        .iter()
        .map(|l| be.zeros(&[l.1, 1]).unwrap())
        .collect();
    let dl = |t: &Tensor<B>| be.download(t).unwrap();
    let mut out = Vec::new();
    for step in 1..=sc.steps {
        let d: Vec<[Tensor<B>; 6]> = (0..sc.layers.len())
            .map(|l| {
                let (_, r, inp, o) = sc.layers[l];
                let h = data(sc, step, l);
                let shapes = [
                    vec![r, inp],
                    vec![r, inp],
                    vec![o, r],
                    vec![o, r],
                    vec![r, 1],
                    vec![r, 1],
                ];
                std::array::from_fn(|i| be.upload(&h[i], &shapes[i]).unwrap())
            })
            .collect();
        for (e, d) in es.iter_mut().zip(&d) {
            be.axpy(e, 1.0, &d[4]).unwrap();
        }
        let mut views = device_views(sc, &mut es, &d);
        let got = alloc.update_and_allocate(be, step, &mut views).unwrap();
        drop(views);
        let ema = sc
            .layers
            .iter()
            .map(|(n, ..)| {
                alloc.ema(n).map(|e| {
                    [
                        dl(&e.ipt_a),
                        dl(&e.unc_a),
                        dl(&e.ipt_b),
                        dl(&e.unc_b),
                        dl(&e.ipt_e),
                        dl(&e.unc_e),
                    ]
                })
            })
            .collect::<Option<Vec<_>>>();
        out.push(StepRecord {
            step,
            masked_to: got,
            e: es.iter().map(dl).collect(),
            ema,
            scores: got.map(|_| dl(alloc.scores())),
            threshold: got.map(|_| dl(alloc.threshold().unwrap())[0]),
            pattern: alloc.rank_pattern(be).unwrap(),
        });
    }
    out
}

/// Three layers of different shapes and ranks (one with `in = 1`), budgeting from step 3 to
/// 11, masked every 2 steps, then the final mask at 12 and 4 steps of the frozen pattern.
pub fn scenario(seed: u64) -> Scenario {
    Scenario {
        layers: vec![
            ("model.layers.0.self_attn.q_proj".into(), 6, 7, 5),
            ("model.layers.0.mlp.up_proj".into(), 4, 3, 9),
            ("model.layers.1.mlp.down_proj".into(), 6, 1, 2),
        ],
        schedule: AdaLoraSchedule {
            init_r: 6,
            target_r: 2,
            tinit: 2,
            tfinal: 4,
            delta_t: 2,
            total_step: 16,
        },
        betas: (0.85, 0.9),
        steps: 16,
        seed,
        nan_at: None,
    }
}

/// The f32 bits of a slice (to compare NaNs and signed zeros too).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
