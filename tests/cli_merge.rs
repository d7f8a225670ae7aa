//! `lorafuse merge` for QLoRA/QDoRA adapters on a tiny random Llama GGUF written by the test
//! (no download): `--base nf4` merges into the dequantized NF4 base the adapter was trained
//! over, `--requantize-nf4` writes the merged projections as bitsandbytes NF4 tensors, and bad
//! flag combinations fail by name leaving no output. The tiny-model helpers are copied from
//! tests/cli.rs (that file's behaviour is untouched).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use lorafuse::io::bnb::{nf4_from_bnb_tensors, nf4_to_bnb_tensors};
use lorafuse::quant::nf4::{NF4_CODE, quantize_nf4};
use safetensors::Dtype;
use serde_json::Value;

#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;
use tiny_gguf::*;

/// The tiny model, its data and three adapters trained by `finetune` (QLoRA, QDoRA over NF4,
/// plain LoRA over the dense base).
struct Fixture {
    dir: PathBuf,
    cache: PathBuf,
    gguf: PathBuf,
    /// The base weights under transformers' names (q/k in transformers' order).
    base: HashMap<String, (Vec<f32>, Vec<usize>)>,
    qlora: PathBuf,
    qdora: PathBuf,
    lora: PathBuf,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let TinySetup {
            dir,
            cache,
            gguf,
            data,
            cfg: _,
            base,
        } = tiny_setup("lorafuse-cli-merge");
        let fx = Fixture {
            qlora: dir.join("qlora"),
            qdora: dir.join("qdora"),
            lora: dir.join("lora"),
            dir,
            cache,
            gguf,
            base,
        };
        for (method, out) in [
            ("qlora", &fx.qlora),
            ("qdora", &fx.qdora),
            ("lora", &fx.lora),
        ] {
            let o = run(
                &fx,
                &[
                    "finetune",
                    "--method",
                    method,
                    "--model",
                    p(&fx.gguf),
                    "--data",
                    p(&data),
                    "--steps",
                    "4",
                    "--batch-size",
                    "4",
                    // A large step so that the adapter moves measurably.
                    "--lr",
                    "1e-2",
                    "--warmup-steps",
                    "1",
                    "--no-eval",
                    "--out",
                    p(out),
                ],
            );
            assert_ok(&o, &format!("finetune --method {method} (fixture)"));
        }
        fx
    })
}

/// Runs the binary with `LORAFUSE_CACHE` at the empty cache and prints its output.
fn run(fx: &Fixture, args: &[&str]) -> Output {
    run_lorafuse(&fx.cache, args)
}

/// A fresh, empty folder for one test's outputs.
fn case_dir(name: &str) -> PathBuf {
    let dir = fixture().dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn bf16_of(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
        .collect()
}

fn is_proj(name: &str) -> bool {
    name.contains("_proj.")
}

/// `lorafuse merge --model tiny --adapter ADAPTER --out DIR/OUT EXTRA...`; the output path.
fn merge(fx: &Fixture, dir: &Path, adapter: &Path, out: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(out);
    let mut args = vec![
        "merge",
        "--model",
        p(&fx.gguf),
        "--adapter",
        p(adapter),
        "--out",
        p(&out),
    ];
    args.extend_from_slice(extra);
    let o = run(fx, &args);
    assert_ok(&o, &format!("merge {extra:?}"));
    out
}

/// The adapter's `(r, scaling, tensors)`.
fn adapter(dir: &Path) -> (usize, f32, St) {
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    let r = cfg["r"].as_u64().unwrap() as usize;
    assert_eq!(cfg["use_rslora"], false);
    let s = cfg["lora_alpha"].as_f64().unwrap() as f32 / r as f32;
    (r, s, read_st(&dir.join("adapter_model.safetensors")))
}

/// `W0 + s B A` of `module` in f64, `W0` given `[out, in]`.
fn plus_sba(w0: &[f32], shape: &[usize], r: usize, s: f32, ad: &St, module: &str) -> Vec<f64> {
    let a = f32_of(&ad[&format!("base_model.model.{module}.lora_A.weight")].2);
    let b = f32_of(&ad[&format!("base_model.model.{module}.lora_B.weight")].2);
    let (out_f, in_f) = (shape[0], shape[1]);
    let mut w = vec![0f64; out_f * in_f];
    for i in 0..out_f {
        for j in 0..in_f {
            let ba: f64 = (0..r)
                .map(|k| b[i * r + k] as f64 * a[k * in_f + j] as f64)
                .sum();
            w[i * in_f + j] = w0[i * in_f + j] as f64 + s as f64 * ba;
        }
    }
    w
}

/// `dequantize(NF4(W))` as the loader quantizes for QLoRA (blocksize 64, double quant).
fn dequant_nf4(w: &[f32], shape: &[usize]) -> Vec<f32> {
    quantize_nf4(w, shape, 64, true).unwrap().dequantize()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// Every non-projection tensor equals the base (in f32, or rounded to bf16).
fn check_unadapted(fx: &Fixture, merged: &St, dtype: Dtype) {
    for (name, (dt, shape, bytes)) in merged.iter().filter(|(n, _)| !is_proj(n)) {
        let (base, bshape) = &fx.base[name];
        assert_eq!(shape, bshape, "{name}");
        assert_eq!(*dt, dtype, "{name}");
        let got = match dtype {
            Dtype::F32 => f32_of(bytes),
            _ => bf16_of(bytes),
        };
        let want: Vec<f32> = match dtype {
            Dtype::F32 => base.clone(),
            _ => base
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect(),
        };
        assert_eq!(got, want, "{name}: not adapted, must equal the base");
    }
}

// ---------------------------------------------------------------------------------------------
// --base nf4
// ---------------------------------------------------------------------------------------------

#[test]
fn qlora_merge_over_nf4_base_is_dequantized_base_plus_scaled_b_times_a() {
    let fx = fixture();
    let dir = case_dir("qlora-nf4-f32");
    let out = merge(
        fx,
        &dir,
        &fx.qlora,
        "m.safetensors",
        &["--base", "nf4", "--dtype", "f32"],
    );
    let merged = read_st(&out);
    let names: Vec<&String> = merged.keys().collect();
    let mut want: Vec<&String> = fx.base.keys().collect();
    want.sort();
    assert_eq!(names, want, "merged tensor names");
    check_unadapted(fx, &merged, Dtype::F32);
    let (r, s, ad) = adapter(&fx.qlora);
    let mut largest_delta = 0f64;
    for (name, (dt, shape, bytes)) in merged.iter().filter(|(n, _)| is_proj(n)) {
        assert_eq!(*dt, Dtype::F32);
        let module = name.strip_suffix(".weight").unwrap();
        let w0 = &fx.base[name].0;
        let dq = dequant_nf4(w0, shape);
        let want = plus_sba(&dq, shape, r, s, &ad, module);
        let got = f32_of(bytes);
        let err = max_abs_diff(&got, &want);
        assert!(
            err <= 1e-5,
            "{name}: merged differs from dequant(NF4(W)) + s B A by {err}"
        );
        let dqd: Vec<f64> = dq.iter().map(|&v| v as f64).collect();
        largest_delta = largest_delta.max(max_abs_diff(&got, &dqd));
        // ...and it is not the dense merge: the NF4 quantization error is visible.
        let dense = plus_sba(w0, shape, r, s, &ad, module);
        assert!(
            max_abs_diff(&got, &dense) > 1e-3,
            "{name}: --base nf4 gave the dense-base merge"
        );
    }
    println!("largest merged delta {largest_delta:e}");
    assert!(largest_delta > 1e-4, "the merge changed nothing measurable");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qdora_merge_over_nf4_base_rescales_rows_by_magnitude_over_norm() {
    let fx = fixture();
    let dir = case_dir("qdora-nf4-f32");
    let out = merge(fx, &dir, &fx.qdora, "m.safetensors", &["--base", "nf4"]);
    let merged = read_st(&out);
    check_unadapted(fx, &merged, Dtype::F32);
    let (r, s, ad) = adapter(&fx.qdora);
    for (name, (_, shape, bytes)) in merged.iter().filter(|(n, _)| is_proj(n)) {
        let module = name.strip_suffix(".weight").unwrap();
        let m = f32_of(&ad[&format!("base_model.model.{module}.lora_magnitude_vector")].2);
        let dq = dequant_nf4(&fx.base[name].0, shape);
        let mut want = plus_sba(&dq, shape, r, s, &ad, module);
        let in_f = shape[1];
        for (i, row) in want.chunks_mut(in_f).enumerate() {
            let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            row.iter_mut().for_each(|v| *v *= m[i] as f64 / n);
        }
        let got = f32_of(bytes);
        let err = max_abs_diff(&got, &want);
        assert!(
            err <= 1e-5,
            "{name}: merged differs from (m / n) (dequant(NF4(W)) + s B A) by {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// --requantize-nf4
// ---------------------------------------------------------------------------------------------

/// Half the gap to the neighbouring NF4 code on the side of `code[q]` that `v` lies on.
fn half_gap(q: usize, v: f32) -> f32 {
    let c = NF4_CODE[q];
    if v >= c {
        if q == 15 {
            0.0
        } else {
            (NF4_CODE[q + 1] - c) / 2.0
        }
    } else if q == 0 {
        0.0
    } else {
        (c - NF4_CODE[q - 1]) / 2.0
    }
}

/// Checks a `--requantize-nf4` output against the `--dtype f32` merge of the same adapter:
/// the other tensors are the base in `dtype`; every projection's bitsandbytes tensors are
/// exactly `nf4_to_bnb_tensors(quantize_nf4(merged f32))`, and they read back (with
/// `nf4_from_bnb_tensors`) to values within half the local code gap times the block's absmax
/// of the merged f32 weights (plus the double-quantized absmax's own error).
fn check_requantized(fx: &Fixture, nf4: &St, f32_merged: &St, dtype: Dtype) {
    check_unadapted(fx, nf4, dtype);
    let mut n_proj = 0;
    for (name, (dt, shape, bytes)) in f32_merged.iter().filter(|(n, _)| is_proj(n)) {
        assert_eq!(*dt, Dtype::F32);
        n_proj += 1;
        let w = f32_of(bytes);
        // The exact tensors bitsandbytes would store for the merged weight.
        let q = quantize_nf4(&w, shape, 64, true).unwrap();
        for (key, kdt, kshape, kbytes) in nf4_to_bnb_tensors(name, &q) {
            let got = nf4.get(&key).unwrap_or_else(|| panic!("missing {key}"));
            assert_eq!((&got.0, &got.1), (&kdt, &kshape), "{key}");
            assert_eq!(got.2, kbytes, "{key}");
        }
        let back = nf4_from_bnb_tensors(name, |k: &str| {
            nf4.get(k).map(|(d, s, b)| (*d, s.clone(), &b[..]))
        })
        .unwrap();
        assert_eq!(back.shape(), &shape[..], "{name}");
        let (dq, am2) = (back.dequantize(), back.absmax_f32());
        let mut worst = 0f32;
        for (blk, chunk) in w.chunks(64).enumerate() {
            let a = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let am_err = (am2[blk] - a).abs();
            for (k, &v) in chunk.iter().enumerate() {
                let j = blk * 64 + k;
                let byte = back.packed()[j / 2];
                let qi = if j % 2 == 0 { byte >> 4 } else { byte & 15 } as usize;
                let bound = half_gap(qi, if a > 0.0 { v / a } else { 0.0 }) * a
                    + am_err
                    + 4.0 * f32::EPSILON * a;
                let err = (dq[j] - v).abs();
                assert!(
                    err <= bound,
                    "{name}[{j}]: merged {v}, NF4 {} (err {err} > bound {bound})",
                    dq[j]
                );
                worst = worst.max(err / a.max(f32::MIN_POSITIVE));
            }
        }
        println!("{name}: largest |NF4 - merged| / absmax {worst:.4}");
    }
    assert_eq!(n_proj, 2 * 7);
    // Nothing but the bnb tensors of the projections and the other weights.
    let other = nf4.keys().filter(|k| !is_proj(k)).count();
    assert_eq!(
        nf4.len(),
        other + n_proj * 6,
        "6 bitsandbytes tensors per projection"
    );
}

#[test]
fn qlora_requantize_nf4_writes_bitsandbytes_tensors_of_the_merged_weights() {
    let fx = fixture();
    let dir = case_dir("qlora-requantize");
    let f32_out = merge(fx, &dir, &fx.qlora, "f32.safetensors", &["--base", "nf4"]);
    let nf4_out = merge(
        fx,
        &dir,
        &fx.qlora,
        "nf4.safetensors",
        &["--base", "nf4", "--requantize-nf4", "--dtype", "bf16"],
    );
    check_requantized(fx, &read_st(&nf4_out), &read_st(&f32_out), Dtype::BF16);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qdora_requantize_nf4_in_f32() {
    let fx = fixture();
    let dir = case_dir("qdora-requantize");
    let f32_out = merge(fx, &dir, &fx.qdora, "f32.safetensors", &["--base", "nf4"]);
    let nf4_out = merge(
        fx,
        &dir,
        &fx.qdora,
        "nf4.safetensors",
        &["--base", "nf4", "--requantize-nf4"],
    );
    check_requantized(fx, &read_st(&nf4_out), &read_st(&f32_out), Dtype::F32);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--requantize-nf4` with a dense-base adapter is allowed: the merged f32 result is quantized.
#[test]
fn dense_lora_requantize_nf4_quantizes_the_merged_result() {
    let fx = fixture();
    let dir = case_dir("lora-requantize");
    let f32_out = merge(fx, &dir, &fx.lora, "f32.safetensors", &[]);
    let nf4_out = merge(fx, &dir, &fx.lora, "nf4.safetensors", &["--requantize-nf4"]);
    check_requantized(fx, &read_st(&nf4_out), &read_st(&f32_out), Dtype::F32);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// bad flags
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_merge_flag_combinations_fail_by_name_and_write_nothing() {
    let fx = fixture();
    let dir = case_dir("bad-flags");
    let out = dir.join("m.safetensors");
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &["--nf4-blocksize", "64"],
            &["nf4_blocksize", "--base nf4", "--requantize-nf4"],
        ),
        (
            &["--base", "nf4", "--nf4-blocksize", "48"],
            &["nf4_blocksize", "power of two", "48"],
        ),
        (
            &["--requantize-nf4", "--nf4-blocksize", "8192"],
            &["nf4_blocksize", "8192"],
        ),
        (&["--base", "fp4"], &["--base", "fp4"]),
    ];
    for (extra, words) in cases {
        let mut args = vec![
            "merge",
            "--model",
            p(&fx.gguf),
            "--adapter",
            p(&fx.qlora),
            "--out",
            p(&out),
        ];
        args.extend_from_slice(extra);
        let o = run(fx, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "expected failure of {extra:?}");
        for w in words {
            assert!(
                err.contains(w),
                "stderr of {extra:?} should mention {w:?}:\n{err}"
            );
        }
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "{extra:?} left {left:?} behind");
        // Refused before loading anything.
        assert!(
            !err.contains("loaded "),
            "{extra:?} loaded the model first:\n{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
