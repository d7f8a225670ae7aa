//! lorafuse's emulation of torch's CPU arithmetic against torch 2.15 itself, bit for bit under
//! the capability each file names: `sum` and `mean` (the order behind bitsandbytes'
//! double-quant offset; `tests/golden/torch_sum/`, golden/README.md section 11) and the CPU
//! generator's `uniform_` as PEFT's VeRA init draws it (`tests/golden/torch_rng/`, section 12).

mod common;

use lorafuse::torch_cpu::TorchCapability;
use lorafuse::torch_cpu::rng::TorchGenerator;
use lorafuse::torch_cpu::sum::{TorchCpuOrder, torch_mean_f32, torch_sum_f32};

/// The generator's input (`torch_sum_input` in scripts/make_golden.py): an integer hash per
/// index, scaled by a power of two, negated on odd hashes when `signed`.
fn input(n: usize, seed: u64, signed: bool, exp: i32) -> Vec<f32> {
    let base = (seed.wrapping_mul(0x9E37_79B9) % (1 << 32)) as u32;
    let scale = 2f32.powi(exp - 24);
    (0..n as u32)
        .map(|i| {
            let mut x = i.wrapping_add(base);
            x ^= x >> 16;
            x = x.wrapping_mul(0x7FEB_352D);
            x ^= x >> 15;
            x = x.wrapping_mul(0x846C_A68B);
            x ^= x >> 16;
            let v = (x >> 8) as f32 * scale;
            if signed && x & 1 == 1 { -v } else { v }
        })
        .collect()
}

/// The set's files under `folder` (`torch_sum`, `torch_rng`): one per capability the generating
/// machine could run, with that capability. At least one must be there.
fn capability_files(folder: &str) -> Vec<(&'static str, TorchCapability, serde_json::Value)> {
    let mut out = Vec::new();
    for (name, cap) in [
        ("default", TorchCapability::Default),
        ("avx2", TorchCapability::Avx2),
        ("avx512", TorchCapability::Avx512),
    ] {
        let rel = format!("{folder}/{name}.json");
        if !common::golden_dir().join(&rel).is_file() {
            // avx512 is written only by a generator run on an AVX-512 CPU; its 16-lane sum order
            // is checked against the NF4 golden offsets too (tests/golden_nf4.rs).
            println!("no {rel}: that capability is not in the set");
            continue;
        }
        let path = common::golden_file(&rel);
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(doc["capability"], name, "{}", path.display());
        out.push((name, cap, doc));
    }
    assert!(!out.is_empty(), "no {folder}/*.json in the golden set");
    out
}

#[test]
fn sums_and_means_equal_torch_bit_for_bit() {
    for (cap, capability, doc) in capability_files("torch_sum") {
        let cases = doc["cases"].as_array().unwrap();
        assert!(cases.len() > 100, "{cap}: {} cases", cases.len());
        let mut multi_thread = 0;
        for c in cases {
            let n = c["n"].as_u64().unwrap() as usize;
            let threads = c["threads"].as_u64().unwrap() as usize;
            let x = input(
                n,
                c["seed"].as_u64().unwrap(),
                c["signed"].as_bool().unwrap(),
                c["exp"].as_i64().unwrap() as i32,
            );
            let order = TorchCpuOrder {
                capability,
                threads,
            };
            let (sum, mean) = (torch_sum_f32(&x, order), torch_mean_f32(&x, order));
            assert_eq!(
                (sum.to_bits(), mean.to_bits()),
                (
                    c["sum_bits"].as_u64().unwrap() as u32,
                    c["mean_bits"].as_u64().unwrap() as u32
                ),
                "{cap} n {n} threads {threads}: ours sum {sum:e} mean {mean:e}, torch's sum {:e} \
                 mean {:e}",
                f32::from_bits(c["sum_bits"].as_u64().unwrap() as u32),
                f32::from_bits(c["mean_bits"].as_u64().unwrap() as u32),
            );
            multi_thread += usize::from(threads > 1);
        }
        assert!(multi_thread > 0, "{cap}: no multi-thread case");
    }
}

#[test]
fn the_input_hash_is_the_generators() {
    // Two values of the generator's first case, worked by hand from its formula: i = 0, seed 0,
    // h = lowbias32(0) = 0; i = 1: a nonzero hash below 2^32, so a value in [0, 2^exp).
    let x = input(2, 0, false, -9);
    assert_eq!(x[0], 0.0);
    assert!(x[1] > 0.0 && x[1] < 2f32.powi(-9), "{}", x[1]);
    // Signed inputs negate exactly the odd hashes.
    let (p, s) = (input(64, 3, false, 0), input(64, 3, true, 0));
    assert!(p.iter().zip(&s).all(|(a, b)| a.abs() == b.abs()));
    assert!(s.iter().any(|&v| v < 0.0) && s.iter().any(|&v| v > 0.0));
}

/// The generator's FNV-1a 64 over the little-endian bytes of the values' bits.
fn fnv1a64(v: &[f32]) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for b in v.iter().flat_map(|x| x.to_bits().to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

#[test]
fn vera_projection_draws_equal_torch_bit_for_bit() {
    for (cap, capability, doc) in capability_files("torch_rng") {
        for c in doc["cases"].as_array().unwrap() {
            let u = |k: &str| c[k].as_u64().unwrap();
            let (key, r, din, dout) = (
                u("key"),
                u("r") as usize,
                u("in") as usize,
                u("out") as usize,
            );
            let mut g = TorchGenerator::manual_seed(key);
            for (name, rows, cols) in [("a", r, din), ("b", dout, r)] {
                let v = g.peft_kaiming_uniform(rows, cols, capability);
                let head: Vec<u64> = v.iter().take(16).map(|x| x.to_bits() as u64).collect();
                let want: Vec<u64> = c[format!("{name}_head_bits")]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap())
                    .collect();
                assert_eq!(
                    head, want,
                    "{cap} key {key} vera_{name} [{rows}, {cols}]: first values"
                );
                let hash: u64 = c[format!("{name}_fnv1a64")]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(
                    fnv1a64(&v),
                    hash,
                    "{cap} key {key} vera_{name} [{rows}, {cols}]: all values"
                );
            }
        }
    }
}
