//! Property tests of merge/unmerge for every adapter method on the CPU reference, over random
//! shapes (in/out 1..70, odd sizes included), ranks 1..=16, 1..9 tokens, with and without bias,
//! and random non-zero adapter values (B != 0, lambda_b != 0, E != 0, a DoRA magnitude that is
//! not the weight norm):
//!
//! * forward through the merged base (`Linear::forward` after `Adapter::merge`) equals the
//!   adapter's forward over the unmerged base;
//! * `unmerge(merge(W)) == W`;
//! * QLoRA/QDoRA: the same over an NF4 base, merging into `Linear::dequantized` (and merging
//!   into the NF4 base itself is an error);
//! * AdaLoRA: masking ranks (E entries to 0) equals the layer with those ranks physically
//!   removed (ranknum kept), and never changes what the unmasked ranks contribute.
//!
//! The NF4 round-trip bound (half the local code gap times absmax) is in tests/golden_nf4.rs.
//!
//! Tolerances scale with the magnitudes involved: for an output element, `1e-4` times
//! `sum_i |x_i| (|W0_ji| + |dW|_ji) + |b_j|`, where `|dW|` is the sum of the absolute values of
//! the adapter's rank-1 terms (times the largest DoRA factor `m / n`); for a weight element of
//! the round trip, `1e-5` times `|W0| + |dW|` (times the largest `n / m` for DoRA).

use lorafuse::adapter::{
    AdaLoraLayer, Adapter, DoraLayer, Linear, LoraConfig, LoraLayer, VeraLayer, VeraShared,
};
use lorafuse::quant::nf4::quantize_nf4;
use lorafuse::{Backend, Cpu, Tensor};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// random values
// ---------------------------------------------------------------------------------------------

/// splitmix64: a tiny deterministic generator driven by the proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [-b, b).
    fn sym(&mut self, b: f32) -> f32 {
        (2.0 * self.unit() - 1.0) * b
    }
    /// Non-zero: magnitude in [lo, hi), random sign.
    fn nonzero(&mut self, lo: f32, hi: f32) -> f32 {
        let m = lo + (hi - lo) * self.unit();
        if self.next_u64() & 1 == 0 { m } else { -m }
    }
    fn vec_sym(&mut self, n: usize, b: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym(b)).collect()
    }
    fn vec_nonzero(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.nonzero(lo, hi)).collect()
    }
    fn bool(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

/// One drawn layer: shapes, the base weight `[out, in]`, the optional bias, and `x [t, in]`.
#[derive(Clone, Debug)]
struct Case {
    out: usize,
    inp: usize,
    r: usize,
    t: usize,
    bias: bool,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        1usize..70,
        1usize..70,
        1usize..=16,
        1usize..9,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(out, inp, r, t, bias, seed)| Case {
            out,
            inp,
            r,
            t,
            bias,
            seed,
        })
}

fn up(data: &[f32], shape: &[usize]) -> Tensor<Cpu> {
    Cpu.upload(data, shape).unwrap()
}

/// The base layer (dense), `x`, and the generator positioned after them.
fn base_and_x(c: &Case) -> (Linear<Cpu>, Tensor<Cpu>, Rng) {
    let mut rng = Rng(c.seed);
    let w = rng.vec_sym(c.out * c.inp, 1.0 / (c.inp as f32).sqrt());
    let mut base = Linear::dense(up(&w, &[c.out, c.inp])).unwrap();
    if c.bias {
        base.bias = Some(up(&rng.vec_sym(c.out, 0.5), &[c.out]));
    }
    let x = up(&rng.vec_sym(c.t * c.inp, 1.0), &[c.t, c.inp]);
    (base, x, rng)
}

// ---------------------------------------------------------------------------------------------
// the adapters
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Lora,
    RsLora,
    Dora,
    Vera,
    AdaLora,
}

const METHODS: [Method; 5] = [
    Method::Lora,
    Method::RsLora,
    Method::Dora,
    Method::Vera,
    Method::AdaLora,
];

/// An adapter of `method` on `base` with random non-zero values, its VeRA projections (larger
/// than the layer), and `|dW| [out, in]`: the sum over ranks of the absolute rank-1 terms of
/// the weight update (before DoRA's `m / n`), the scale of the merge's rounding errors.
fn make_adapter(
    method: Method,
    c: &Case,
    base: &Linear<Cpu>,
    rng: &mut Rng,
) -> (Adapter<Cpu>, Option<VeraShared<Cpu>>, Vec<f32>) {
    let (out, inp, r) = (c.out, c.inp, c.r);
    let a = rng.vec_nonzero(r * inp, 0.05, 1.0 / (inp as f32).sqrt() + 0.05);
    let b = rng.vec_nonzero(out * r, 0.05, 0.5);
    let alpha = 0.5 + 31.5 * rng.unit();
    // |dW|_ji = sum_k |coef_k B_jk A_ki| for the per-rank coefficients `coef`.
    let abs_delta = |bm: &[f32], am: &[f32], coef: &[f32], b_row: &dyn Fn(usize) -> f32| {
        let mut d = vec![0f32; out * inp];
        for j in 0..out {
            for i in 0..inp {
                d[j * inp + i] = (0..coef.len())
                    .map(|k| (coef[k] * bm[j * coef.len() + k] * am[k * inp + i] * b_row(j)).abs())
                    .sum();
            }
        }
        d
    };
    match method {
        Method::Lora | Method::RsLora | Method::Dora => {
            let cfg = LoraConfig {
                r,
                lora_alpha: alpha,
                use_rslora: method == Method::RsLora || (method == Method::Dora && rng.bool()),
                ..LoraConfig::default()
            };
            let s = cfg.scaling();
            let d = abs_delta(&b, &a, &vec![s; r], &|_| 1.0);
            let (ta, tb) = (up(&a, &[r, inp]), up(&b, &[out, r]));
            let adapter = if method == Method::Dora {
                // m = factor * ||W0 + s B A||_row with factor in [0.5, 1.5) away from 1.
                let norm = DoraLayer::from_factors(&Cpu, base, ta.clone(), tb.clone(), s, None)
                    .unwrap()
                    .lora_magnitude_vector;
                let m: Vec<f32> = norm
                    .data()
                    .iter()
                    .map(|&n| {
                        let f = 1.0 + rng.nonzero(0.05, 0.5);
                        n * f
                    })
                    .collect();
                Adapter::Dora(
                    DoraLayer::from_factors(&Cpu, base, ta, tb, s, Some(up(&m, &[out]))).unwrap(),
                )
            } else {
                Adapter::Lora(LoraLayer::from_factors(base, ta, tb, s).unwrap())
            };
            (adapter, None, d)
        }
        Method::Vera => {
            let extra_in = (rng.next_u64() % 6) as usize;
            let extra_out = (rng.next_u64() % 6) as usize;
            let shared =
                VeraShared::init(&Cpu, r, inp + extra_in, out + extra_out, rng.next_u64()).unwrap();
            let ld = rng.vec_nonzero(r, 0.05, 1.0);
            let lb = rng.vec_nonzero(out, 0.05, 1.0);
            // Bs = vera_B[:out, :], As = vera_A[:, :in].
            let (mi, va, vb) = (inp + extra_in, shared.vera_a.data(), shared.vera_b.data());
            let bs: Vec<f32> = vb[..out * r].to_vec();
            let as_: Vec<f32> = (0..r)
                .flat_map(|k| va[k * mi..k * mi + inp].to_vec())
                .collect();
            let d = abs_delta(&bs, &as_, &ld, &|j| lb[j]);
            let layer =
                VeraLayer::from_vectors(&shared, base, up(&ld, &[r]), up(&lb, &[out])).unwrap();
            (Adapter::Vera(layer), Some(shared), d)
        }
        Method::AdaLora => {
            let e = rng.vec_nonzero(r, 0.05, 1.0);
            let mut layer = AdaLoraLayer::from_factors(
                base,
                up(&a, &[r, inp]),
                up(&b, &[out, r]),
                up(&e, &[r, 1]),
                AdaLoraLayer::<Cpu>::scaling_for(alpha, r),
                r as f32,
            )
            .unwrap();
            // A random rank mask (possibly all or nothing).
            let keep: Vec<bool> = (0..r).map(|_| rng.bool()).collect();
            layer.apply_rank_mask(&Cpu, &keep).unwrap();
            let cf = layer.factor();
            let coef: Vec<f32> = e.iter().map(|&v| cf * v).collect();
            let d = abs_delta(&b, &a, &coef, &|_| 1.0);
            (Adapter::AdaLora(layer), None, d)
        }
    }
}

/// DoRA's largest `m / n` and `n / m` (1 for the other methods).
fn dora_factors(adapter: &Adapter<Cpu>, base: &Linear<Cpu>) -> (f32, f32) {
    match adapter {
        Adapter::Dora(l) => {
            let n = l.weight_norm(&Cpu, base).unwrap();
            let (mut up_, mut down) = (1f32, 1f32);
            for (&m, &n) in l.lora_magnitude_vector.data().iter().zip(n.data()) {
                if !(m / n).is_finite() || !(n / m).is_finite() {
                    // f32::max would skip a NaN; report it to the caller instead.
                    return (f32::NAN, f32::NAN);
                }
                up_ = up_.max((m / n).abs());
                down = down.max((n / m).abs());
            }
            (up_, down)
        }
        _ => (1.0, 1.0),
    }
}

/// `|got - want| <= tol[k]` elementwise, with a message naming `what` and the worst element.
fn check_close(what: &str, got: &[f32], want: &[f32], tol: &[f32]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    let mut worst = (0usize, 0f32);
    for k in 0..got.len() {
        let err = (got[k] - want[k]).abs();
        prop_assert!(err.is_finite(), "{}: non-finite at {}", what, k);
        if err - tol[k] > worst.1 {
            worst = (k, err - tol[k]);
        }
    }
    let k = worst.0;
    prop_assert!(
        worst.1 <= 0.0,
        "{}: element {} got {} want {} (|err| {} > tol {})",
        what,
        k,
        got[k],
        want[k],
        (got[k] - want[k]).abs(),
        tol[k]
    );
    Ok(())
}

/// The tolerance of each output `[t, out]`: `rel * (sum_i |x_ti| mag_ji + |b_j|)`.
fn out_tol(c: &Case, x: &[f32], mag: &[f32], bias: Option<&[f32]>, rel: f32) -> Vec<f32> {
    let mut tol = vec![0f32; c.t * c.out];
    for t in 0..c.t {
        for j in 0..c.out {
            let s: f32 = (0..c.inp)
                .map(|i| x[t * c.inp + i].abs() * mag[j * c.inp + i])
                .sum();
            tol[t * c.out + j] = rel * (s + bias.map_or(0.0, |b| b[j].abs())) + 1e-30;
        }
    }
    tol
}

/// Properties (a) and (b) for one adapter over `base` (dense, or NF4 when `nf4`): the merged
/// forward equals the adapter forward, and unmerging gives the (dequantized) base back.
fn merge_roundtrip(
    method: Method,
    c: &Case,
    base: &Linear<Cpu>,
    x: &Tensor<Cpu>,
    rng: &mut Rng,
) -> Result<(), TestCaseError> {
    let (mut adapter, shared, abs_d) = make_adapter(method, c, base, rng);
    let (m_over_n, n_over_m) = dora_factors(&adapter, base);
    // A row whose adapted weight W0 + s B A is numerically zero (possible with in = 1) has
    // no direction for DoRA to rescale: m / n is 0 / 0 there, in PEFT as here. Such draws are
    // outside the property's domain.
    prop_assume!(m_over_n.is_finite() && n_over_m.is_finite());
    let (y_adapter, _) = adapter.forward(&Cpu, base, shared.as_ref(), x).unwrap();

    if base.weight.is_quantized() {
        // Merging into the NF4 base itself is refused with a pointer to `dequantized`.
        let mut q = base.clone();
        let err = adapter
            .clone()
            .merge(&Cpu, &mut q, shared.as_ref())
            .unwrap_err()
            .to_string();
        prop_assert!(err.contains("dequantized"), "{}", err);
    }
    let mut merged = base.dequantized(&Cpu).unwrap();
    let w0 = Cpu
        .download(match &merged.weight {
            lorafuse::adapter::BaseWeight::Dense(w) => w,
            _ => unreachable!(),
        })
        .unwrap();
    adapter.merge(&Cpu, &mut merged, shared.as_ref()).unwrap();
    let y_merged = merged.forward(&Cpu, x).unwrap();

    let mag: Vec<f32> = w0
        .iter()
        .zip(&abs_d)
        .map(|(w, d)| m_over_n * (w.abs() + d))
        .collect();
    let bias = base.bias.as_ref().map(|b| b.data().to_vec());
    let tol = out_tol(c, x.data(), &mag, bias.as_deref(), 1e-4);
    check_close(
        &format!("{method:?} merged forward vs adapter forward"),
        y_merged.data(),
        y_adapter.data(),
        &tol,
    )?;

    adapter.unmerge(&Cpu, &mut merged, shared.as_ref()).unwrap();
    let w_back = Cpu
        .download(match &merged.weight {
            lorafuse::adapter::BaseWeight::Dense(w) => w,
            _ => unreachable!(),
        })
        .unwrap();
    let tol: Vec<f32> = w0
        .iter()
        .zip(&abs_d)
        .map(|(w, d)| 1e-5 * n_over_m * m_over_n * (w.abs() + d) + 1e-30)
        .collect();
    check_close(&format!("{method:?} unmerge(merge(W))"), &w_back, &w0, &tol)?;
    // After the round trip the adapter forwards over the base again, as before.
    let (y_again, _) = adapter.forward(&Cpu, base, shared.as_ref(), x).unwrap();
    prop_assert_eq!(y_again.data(), y_adapter.data());
    Ok(())
}

/// The AdaLoRA layer with only the `keep` ranks, physically (rows of A and E, columns of B),
/// `ranknum` unchanged; `None` when nothing is kept.
fn adalora_dropped(
    l: &AdaLoraLayer<Cpu>,
    base: &Linear<Cpu>,
    keep: &[bool],
) -> Option<Adapter<Cpu>> {
    let (r, inp, out) = (l.r(), base.in_features(), base.out_features());
    let kept: Vec<usize> = (0..r).filter(|&k| keep[k]).collect();
    if kept.is_empty() {
        return None;
    }
    let (a, b, e) = (l.lora_a.data(), l.lora_b.data(), l.lora_e.data());
    let a2: Vec<f32> = kept
        .iter()
        .flat_map(|&k| a[k * inp..(k + 1) * inp].to_vec())
        .collect();
    let b2: Vec<f32> = (0..out)
        .flat_map(|j| kept.iter().map(move |&k| b[j * r + k]))
        .collect();
    let e2: Vec<f32> = kept.iter().map(|&k| e[k]).collect();
    let n = kept.len();
    Some(Adapter::AdaLora(
        AdaLoraLayer::from_factors(
            base,
            up(&a2, &[n, inp]),
            up(&b2, &[out, n]),
            up(&e2, &[n, 1]),
            l.scaling,
            l.ranknum,
        )
        .unwrap(),
    ))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (a) and (b) for every method over a dense base.
    #[test]
    fn merge_equals_adapter_forward_and_unmerge_restores(c in cases()) {
        for method in METHODS {
            let (base, x, mut rng) = base_and_x(&c);
            rng.0 ^= method as u64;
            merge_roundtrip(method, &c, &base, &x, &mut rng)?;
        }
    }

    /// (c) QLoRA and QDoRA: the same over an NF4 base (blocksize 32..256, with and without
    /// double quant), merged into its dequantized copy.
    #[test]
    fn qlora_qdora_merge_into_the_dequantized_base(
        c in cases(),
        bs in prop::sample::select(vec![32usize, 64, 128, 256]),
        double in any::<bool>(),
    ) {
        let (dense, x, mut rng) = base_and_x(&c);
        let w = dense_data(&dense);
        let q = quantize_nf4(&w, &[c.out, c.inp], bs, double).unwrap();
        let mut base = Linear::nf4(&Cpu, &q).unwrap();
        base.bias = dense.bias.clone();
        for method in [Method::Lora, Method::RsLora, Method::Dora] {
            merge_roundtrip(method, &c, &base, &x, &mut rng)?;
        }
    }

    /// (d) AdaLoRA: a rank mask equals dropping those ranks (ranknum kept), and the unmasked
    /// ranks' contribution is the same whatever else is masked.
    #[test]
    fn adalora_masking_never_changes_the_unmasked_ranks(c in cases()) {
        let (base, x, mut rng) = base_and_x(&c);
        let (r, inp, out) = (c.r, c.inp, c.out);
        let a = rng.vec_nonzero(r * inp, 0.05, 0.5);
        let b = rng.vec_nonzero(out * r, 0.05, 0.5);
        let e = rng.vec_nonzero(r, 0.05, 1.0);
        let alpha = 0.5 + 31.5 * rng.unit();
        let full = AdaLoraLayer::from_factors(
            &base,
            up(&a, &[r, inp]),
            up(&b, &[out, r]),
            up(&e, &[r, 1]),
            AdaLoraLayer::<Cpu>::scaling_for(alpha, r),
            r as f32,
        )
        .unwrap();
        let keep: Vec<bool> = (0..r).map(|_| rng.bool()).collect();
        let not_keep: Vec<bool> = keep.iter().map(|k| !k).collect();

        let y_base = base.forward(&Cpu, &x).unwrap();
        let fwd = |l: &AdaLoraLayer<Cpu>| {
            Adapter::AdaLora(l.clone()).forward(&Cpu, &base, None, &x).unwrap().0
        };
        let y_full = fwd(&full);
        let mut masked = full.clone();
        masked.apply_rank_mask(&Cpu, &keep).unwrap();
        prop_assert_eq!(masked.ranknum, r as f32);
        let y_masked = fwd(&masked);
        let mut comp = full.clone();
        comp.apply_rank_mask(&Cpu, &not_keep).unwrap();
        let y_comp = fwd(&comp);

        // Output scale: |x| (|W0| + |c B diag(E) A|) + |b|.
        let cf = full.factor();
        let w0 = dense_data(&base);
        let mut mag = vec![0f32; out * inp];
        let mut contrib = vec![0f64; c.t * out]; // the kept ranks' term, in f64
        for j in 0..out {
            for i in 0..inp {
                let d: f32 = (0..r).map(|k| (cf * e[k] * b[j * r + k] * a[k * inp + i]).abs()).sum();
                mag[j * inp + i] = w0[j * inp + i].abs() + d;
            }
        }
        let xd = x.data();
        for t in 0..c.t {
            for j in 0..out {
                contrib[t * out + j] = (0..r)
                    .filter(|&k| keep[k])
                    .map(|k| {
                        let h: f64 = (0..inp).map(|i| xd[t * inp + i] as f64 * a[k * inp + i] as f64).sum();
                        cf as f64 * e[k] as f64 * b[j * r + k] as f64 * h
                    })
                    .sum();
            }
        }
        let bias = base.bias.as_ref().map(|b| b.data().to_vec());
        let tol = out_tol(&c, xd, &mag, bias.as_deref(), 1e-5);

        // Masked == physically dropped (or the bare base when nothing is kept).
        let y_dropped = match adalora_dropped(&full, &base, &keep) {
            Some(l) => l.forward(&Cpu, &base, None, &x).unwrap().0,
            None => y_base.clone(),
        };
        check_close("masked vs dropped ranks", y_masked.data(), y_dropped.data(), &tol)?;

        // The kept ranks contribute exactly their own term, whatever the others are.
        let got: Vec<f32> = y_masked.data().iter().zip(y_base.data()).map(|(m, b)| m - b).collect();
        let want: Vec<f32> = contrib.iter().map(|&v| v as f32).collect();
        check_close("kept ranks' contribution", &got, &want, &tol)?;

        // Contributions of complementary masks add up to the unmasked layer's.
        let sum: Vec<f32> = (0..y_full.len())
            .map(|k| y_masked.data()[k] + y_comp.data()[k] - y_base.data()[k])
            .collect();
        check_close("masked + complement = full", &sum, y_full.data(), &tol)?;

        // The masked layer merges to the same forward as well.
        let mut merged = base.clone();
        Adapter::AdaLora(masked.clone()).merge(&Cpu, &mut merged, None).unwrap();
        let tol4: Vec<f32> = tol.iter().map(|t| t * 10.0).collect();
        check_close("masked merged forward", merged.forward(&Cpu, &x).unwrap().data(), y_masked.data(), &tol4)?;
    }
}

fn dense_data(l: &Linear<Cpu>) -> Vec<f32> {
    match &l.weight {
        lorafuse::adapter::BaseWeight::Dense(w) => w.data().to_vec(),
        _ => panic!("dense base expected"),
    }
}

/// A fixed case with every size odd and r > in, so the interesting corner runs on every seed.
#[test]
fn odd_sizes_and_rank_above_in_features() {
    let c = Case {
        out: 7,
        inp: 3,
        r: 5,
        t: 3,
        bias: true,
        seed: 11,
    };
    for method in METHODS {
        let (base, x, mut rng) = base_and_x(&c);
        merge_roundtrip(method, &c, &base, &x, &mut rng).unwrap();
    }
}
