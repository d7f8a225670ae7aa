//! The `lorafuse` binary end to end on a tiny random Llama GGUF written by the test (no
//! download): `finetune`, `logits`, `generate` and `merge` succeed and write what they promise,
//! and bad input of every kind fails with a message naming the problem and leaves no output.
//!
//! Every command runs with `LORAFUSE_CACHE` pointed at an empty folder and `--model` given, and
//! the folder is checked to stay empty (nothing is fetched).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

use lorafuse::Cpu;
use lorafuse::backend::Backend;
use lorafuse::io::gguf::GgufFile;
use lorafuse::io::load::llama_from_gguf;
use lorafuse::io::peft;
use lorafuse::model::LlamaConfig;
use lorafuse::model::llama::{Llama, PROJ_NAMES, PackedBatch, proj_path};
use lorafuse::model::tokenizer::Tokenizer;
use safetensors::Dtype;
use serde_json::Value;

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

mod common;
#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;
use tiny_gguf::*;
/// Everything the tests share: the folder, the model, the data and one finetuned adapter.
struct Fixture {
    dir: PathBuf,
    cache: PathBuf,
    gguf: PathBuf,
    data: PathBuf,
    cfg: LlamaConfig,
    /// The base weights under transformers' names (q/k in transformers' order).
    base: HashMap<String, (Vec<f32>, Vec<usize>)>,
    /// The adapter folder written by `finetune` and that run's output.
    adapter: PathBuf,
    finetune: Output,
    finetune_seconds: f64,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let TinySetup {
            dir,
            cache,
            gguf,
            data,
            cfg,
            base,
        } = tiny_setup("lorafuse-cli");

        let mut fx = Fixture {
            adapter: dir.join("adapter"),
            dir,
            cache,
            gguf,
            data,
            cfg,
            base,
            finetune: Output {
                status: Default::default(),
                stdout: Vec::new(),
                stderr: Vec::new(),
            },
            finetune_seconds: 0.0,
        };
        let t = Instant::now();
        fx.finetune = lorafuse(
            &fx,
            &[
                "finetune".as_ref(),
                "--model".as_ref(),
                fx.gguf.as_os_str(),
                "--data".as_ref(),
                fx.data.as_os_str(),
                "--steps".as_ref(),
                "6".as_ref(),
                "--batch-size".as_ref(),
                "4".as_ref(),
                // A larger step than the default so that the adapter moves measurably.
                "--lr".as_ref(),
                "1e-2".as_ref(),
                "--warmup-steps".as_ref(),
                "1".as_ref(),
                "--out".as_ref(),
                fx.adapter.as_os_str(),
            ],
        );
        fx.finetune_seconds = t.elapsed().as_secs_f64();
        fx
    })
}

// ---------------------------------------------------------------------------------------------
// running the binary
// ---------------------------------------------------------------------------------------------

/// Runs the binary with `LORAFUSE_CACHE` at the empty cache; prints its output; checks that the
/// cache is still empty afterwards.
fn lorafuse(fx: &Fixture, args: &[&OsStr]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_lorafuse"))
        .args(args)
        .env("LORAFUSE_CACHE", &fx.cache)
        .output()
        .expect("run the lorafuse binary");
    let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
    println!(
        "$ lorafuse {}\n-> {}\n--- stdout\n{}--- stderr\n{}",
        shown.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cached: Vec<_> = std::fs::read_dir(&fx.cache).unwrap().collect();
    assert!(
        cached.is_empty(),
        "the command wrote into LORAFUSE_CACHE: {cached:?}"
    );
    out
}

/// [`lorafuse`] with string arguments.
fn run(fx: &Fixture, args: &[&str]) -> Output {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    lorafuse(fx, &args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh, empty folder for one test's outputs.
fn case_dir(name: &str) -> PathBuf {
    let dir = fixture().dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The (in, out) features of projection `p`.
fn proj_dims(cfg: &LlamaConfig, p: usize) -> (usize, usize) {
    let d = cfg.hidden_size;
    let qd = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let i = cfg.intermediate_size;
    [(d, qd), (d, kv), (d, kv), (qd, d), (d, i), (d, i), (i, d)][p]
}

/// The model of the tiny GGUF, loaded in-process, and its tokenizer.
fn load_tiny(fx: &Fixture) -> (Tokenizer, Llama<Cpu>) {
    let g = GgufFile::open(&fx.gguf).unwrap();
    (
        Tokenizer::from_gguf(&g).unwrap(),
        llama_from_gguf(&Cpu, &g).unwrap(),
    )
}

fn last_logits(model: &Llama<Cpu>, ids: &[u32]) -> Vec<f32> {
    let labels = vec![-100i32; ids.len()];
    let batch = PackedBatch::from_examples([(ids, &labels[..])]).unwrap();
    Cpu.download(
        &model
            .logits_at(&Cpu, &batch, &[(ids.len() - 1) as u32])
            .unwrap(),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// the fixture itself
// ---------------------------------------------------------------------------------------------

#[test]
fn tiny_gguf_loads_with_the_weights_and_tokenizer_written() {
    let fx = fixture();
    let (tok, model) = load_tiny(fx);
    assert_eq!(model.cfg, fx.cfg);
    // The loader's un-permute gives the q/k rows back in transformers' order, exactly.
    let q = model.layers[1].proj[0].base.weight.dims();
    assert_eq!(q, (32, 32));
    for (l, block) in model.layers.iter().enumerate() {
        for (pi, proj) in block.proj.iter().enumerate() {
            let w = proj.base.weight.dense_or_err("test").unwrap();
            let name = format!("{}.weight", proj_path(l, pi));
            assert_eq!(w.data(), &fx.base[&name].0[..], "{name}");
        }
    }
    let text = "<|im_start|>user\nthe<|im_end|>";
    let ids = tok.encode(text).unwrap();
    println!("{text:?} -> {ids:?}");
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    assert_eq!(*ids.last().unwrap(), 2, "<|im_end|> is one special token");
    assert_eq!(
        ids.len(),
        1 + 4 + 1 + 2 + 1,
        "start, u s e r, \\n, t he, end"
    );
    assert!(
        tok.token_to_id("the").is_none(),
        "no `the` token without a space"
    );
    let sp_the = tok.token_to_id("Ġthe").unwrap();
    assert_eq!(tok.encode(" the").unwrap(), [sp_the], "merges apply");
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

// ---------------------------------------------------------------------------------------------
// finetune
// ---------------------------------------------------------------------------------------------

#[test]
fn finetune_writes_peft_adapter_metrics_and_loss_curve() {
    let fx = fixture();
    assert_ok(&fx.finetune, "finetune");
    println!("finetune took {:.2}s", fx.finetune_seconds);
    let out = stdout(&fx.finetune);
    assert!(
        out.contains("eval loss"),
        "stdout reports the eval loss:\n{out}"
    );
    assert!(out.contains("6 steps"), "stdout reports the steps:\n{out}");

    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
        "loss_curve.png",
    ] {
        assert!(
            fx.adapter.join(f).is_file(),
            "{f} missing in the output dir"
        );
    }
    let png = std::fs::read(fx.adapter.join("loss_curve.png")).unwrap();
    assert!(
        png.starts_with(PNG_SIGNATURE),
        "loss_curve.png is not a PNG"
    );
    assert!(
        png.len() > 1000,
        "loss_curve.png has only {} bytes",
        png.len()
    );

    let m: Value =
        serde_json::from_slice(&std::fs::read(fx.adapter.join("metrics.json")).unwrap()).unwrap();
    let steps = m["steps"].as_array().expect("metrics.steps");
    assert_eq!(steps.len(), 6);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"].as_u64(), Some(i as u64));
        let loss = s["loss"].as_f64().expect("step loss");
        assert!(loss.is_finite() && loss > 0.0, "step {i} loss {loss}");
        assert!(s["targets"].as_u64().unwrap() > 0);
    }
    let before = m["eval_loss_before"].as_f64().expect("eval_loss_before");
    let after = m["eval_loss_after"].as_f64().expect("eval_loss_after");
    println!("eval loss {before} -> {after}");
    assert!(before.is_finite() && after.is_finite());
    assert!(
        (before - after).abs() > 1e-6,
        "training did not change the eval loss ({before} -> {after})"
    );
    let trainable = m["trainable_params"].as_u64().expect("trainable_params");
    assert!(trainable > 0);
    assert!(m["total_params"].as_u64().unwrap() > trainable);
    assert!(
        m["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0),
        "peak_rss_bytes: {}",
        m["peak_rss_bytes"]
    );

    // adapter_config.json: PEFT's LoRA config with the CLI defaults.
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(fx.adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"].as_f64(), Some(16.0));
    let r = 8;

    // adapter_model.safetensors: exactly PEFT's keys and shapes, all f32.
    let st = read_st(&fx.adapter.join("adapter_model.safetensors"));
    let mut want = BTreeMap::new();
    for l in 0..fx.cfg.num_hidden_layers {
        for pi in 0..PROJ_NAMES.len() {
            let (i, o) = proj_dims(&fx.cfg, pi);
            let key = format!("base_model.model.{}", proj_path(l, pi));
            want.insert(format!("{key}.lora_A.weight"), vec![r, i]);
            want.insert(format!("{key}.lora_B.weight"), vec![o, r]);
        }
    }
    assert!(want.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(want.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    let got: BTreeMap<String, Vec<usize>> =
        st.iter().map(|(k, v)| (k.clone(), v.1.clone())).collect();
    assert_eq!(got, want, "adapter keys and shapes");
    assert!(st.values().all(|v| v.0 == Dtype::F32));
    let n: usize = want.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(trainable, n as u64, "trainable_params = adapter elements");
    // B started at zero and was trained.
    let b = f32_of(&st["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].2);
    assert!(b.iter().any(|&x| x != 0.0), "lora_B is still zero");
}

// ---------------------------------------------------------------------------------------------
// logits, generate, merge
// ---------------------------------------------------------------------------------------------

#[test]
fn logits_with_and_without_adapter() {
    let fx = fixture();
    assert_ok(&fx.finetune, "finetune (fixture)");
    let dir = case_dir("logits");
    let text = "<|im_start|>user\nwhat comes after the one?<|im_end|>\n<|im_start|>assistant\n";
    let (tok, mut model) = load_tiny(fx);
    let ids = tok.encode(text).unwrap();

    let mut results = Vec::new();
    for with_adapter in [false, true] {
        let out = dir.join(format!("logits-{with_adapter}.safetensors"));
        let mut args = vec![
            "logits",
            "--model",
            p(&fx.gguf),
            "--text",
            text,
            "--out",
            p(&out),
        ];
        if with_adapter {
            args.extend(["--adapter", p(&fx.adapter)]);
        }
        let o = run(fx, &args);
        assert_ok(&o, "logits");
        let st = read_st(&out);
        assert_eq!(st.len(), 2, "input_ids and logits only: {:?}", st.keys());
        let (dt, shape, bytes) = &st["input_ids"];
        assert_eq!((*dt, &shape[..]), (Dtype::I64, &[ids.len()][..]));
        let got_ids: Vec<u32> = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect();
        assert_eq!(got_ids, ids, "input_ids are the tokenizer's");
        let (dt, shape, bytes) = &st["logits"];
        assert_eq!((*dt, &shape[..]), (Dtype::F32, &[fx.cfg.vocab_size][..]));
        let logits = f32_of(bytes);
        assert!(logits.iter().all(|x| x.is_finite()));

        // The same numbers in-process.
        if with_adapter {
            let (cfg, tensors) = peft::load_adapter(&fx.adapter).unwrap();
            peft::apply_lora_adapter(&Cpu, &mut model, &cfg, &tensors).unwrap();
        }
        let want = last_logits(&model, &ids);
        let d = max_abs_diff(&logits, &want);
        println!("adapter {with_adapter}: max |diff| to in-process logits {d:e}");
        assert!(d <= 1e-4, "CLI logits differ from the library's by {d}");
        results.push(logits);
    }
    let d = max_abs_diff(&results[0], &results[1]);
    println!("adapter changes the logits by up to {d:e}");
    assert!(d > 1e-4, "the adapter did not change the logits");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_prints_base_and_adapter_sections() {
    let fx = fixture();
    assert_ok(&fx.finetune, "finetune (fixture)");
    let o = run(
        fx,
        &[
            "generate",
            "--model",
            p(&fx.gguf),
            "--adapter",
            p(&fx.adapter),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "4",
        ],
    );
    assert_ok(&o, "generate");
    let out = stdout(&o);
    let base = out.find("--- base model ---").expect("base section");
    let tuned = out.find("--- with adapter").expect("adapter section");
    assert!(base < tuned, "base section first:\n{out}");
    assert!(out[tuned..].contains(p(&fx.adapter)), "names the adapter");

    // Without --adapter only the base section is printed.
    let o = run(
        fx,
        &[
            "generate",
            "--model",
            p(&fx.gguf),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ],
    );
    assert_ok(&o, "generate without adapter");
    let out = stdout(&o);
    assert!(out.contains("--- base model ---") && !out.contains("--- with adapter"));
}

#[test]
fn merge_writes_base_plus_scaled_b_times_a() {
    let fx = fixture();
    assert_ok(&fx.finetune, "finetune (fixture)");
    let dir = case_dir("merge");
    let out = dir.join("m.safetensors");
    let o = run(
        fx,
        &[
            "merge",
            "--model",
            p(&fx.gguf),
            "--adapter",
            p(&fx.adapter),
            "--out",
            p(&out),
        ],
    );
    assert_ok(&o, "merge");
    let merged = read_st(&out);

    // Every weight under transformers' name with its shape (tied head: no lm_head).
    let want: BTreeMap<String, Vec<usize>> = fx
        .base
        .iter()
        .map(|(k, v)| (k.clone(), v.1.clone()))
        .collect();
    let got: BTreeMap<String, Vec<usize>> = merged
        .iter()
        .map(|(k, v)| (k.clone(), v.1.clone()))
        .collect();
    assert_eq!(got, want, "merged tensor names and shapes");
    assert!(merged.values().all(|v| v.0 == Dtype::F32));

    let cfg: Value =
        serde_json::from_slice(&std::fs::read(fx.adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    let r = cfg["r"].as_u64().unwrap() as usize;
    let s = cfg["lora_alpha"].as_f64().unwrap() as f32 / r as f32;
    assert_eq!(cfg["use_rslora"], false);
    let adapter = read_st(&fx.adapter.join("adapter_model.safetensors"));
    let mut largest_delta = 0.0f32;
    for (name, (_, shape, bytes)) in &merged {
        let got = f32_of(bytes);
        let base = &fx.base[name].0;
        let Some(module) = name.strip_suffix(".weight").filter(|m| m.contains("_proj")) else {
            assert_eq!(&got, base, "{name}: not adapted, must equal the base");
            continue;
        };
        let a = f32_of(&adapter[&format!("base_model.model.{module}.lora_A.weight")].2);
        let b = f32_of(&adapter[&format!("base_model.model.{module}.lora_B.weight")].2);
        let (out_f, in_f) = (shape[0], shape[1]);
        let mut max_err = 0.0f32;
        for i in 0..out_f {
            for j in 0..in_f {
                let ba: f32 = (0..r).map(|k| b[i * r + k] * a[k * in_f + j]).sum();
                let delta = got[i * in_f + j] - base[i * in_f + j];
                max_err = max_err.max((delta - s * ba).abs());
                largest_delta = largest_delta.max(delta.abs());
            }
        }
        assert!(
            max_err <= 1e-5,
            "{name}: merged - base differs from s*B*A by {max_err}"
        );
    }
    println!("largest merged delta {largest_delta:e}");
    assert!(largest_delta > 1e-4, "the merge changed nothing measurable");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `finetune --device wgpu` runs the same recipe on the WGSL backend (lavapipe in CI): same
/// eval losses as the CPU run of the fixture (within 1%), and the same files.
#[test]
fn finetune_on_wgpu_matches_the_cpu_run() {
    let fx = fixture();
    assert_ok(&fx.finetune, "finetune");
    if let Err(e) = probe_wgpu() {
        common::skip_or_fail(
            "wgpu",
            &format!("finetune_on_wgpu_matches_the_cpu_run: {e}"),
        );
        return;
    }
    let out = fx.dir.join("adapter-wgpu");
    let o = run(
        fx,
        &[
            "finetune",
            "--device",
            "wgpu",
            "--model",
            p(&fx.gguf),
            "--data",
            p(&fx.data),
            "--steps",
            "6",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "1",
            "--out",
            p(&out),
        ],
    );
    assert_ok(&o, "finetune --device wgpu");
    assert!(
        stderr(&o).contains("on wgpu"),
        "the run reports its backend"
    );
    let read = |dir: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap()
    };
    let (cpu, gpu) = (read(&fx.adapter), read(&out));
    for key in ["eval_loss_before", "eval_loss_after"] {
        let (c, g) = (cpu[key].as_f64().unwrap(), gpu[key].as_f64().unwrap());
        println!("{key}: cpu {c} wgpu {g}");
        assert!((c - g).abs() <= 0.01 * c.abs(), "{key}: cpu {c} wgpu {g}");
    }
    assert!(out.join("adapter_model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

#[cfg(feature = "wgpu")]
fn probe_wgpu() -> Result<(), String> {
    lorafuse::Wgpu::new().map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(not(feature = "wgpu"))]
fn probe_wgpu() -> Result<(), String> {
    Err("built without the `wgpu` feature".into())
}

// ---------------------------------------------------------------------------------------------
// bad input
// ---------------------------------------------------------------------------------------------

/// Runs a command that must fail: non-zero exit, stderr naming every one of `words`, and nothing
/// left in `dir` (the folder that would hold the output).
fn assert_fails(fx: &Fixture, dir: &Path, args: &[&str], words: &[&str]) {
    let o = run(fx, args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure of {args:?}");
    assert_ne!(o.status.code(), Some(0));
    for w in words {
        assert!(
            err.contains(w),
            "stderr of {args:?} should mention {w:?}:\n{err}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "{args:?} left {left:?} behind in {}",
        dir.display()
    );
}

/// `finetune` of `data` into `out`; the default --steps (60) never runs in the failing cases.
fn finetune_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["finetune", "--model", model, "--data", data, "--out", out]
}

#[test]
fn missing_truncated_and_non_gguf_models_fail_cleanly() {
    let fx = fixture();
    let inputs = case_dir("bad-model-inputs");
    let dir = case_dir("bad-model-out");
    let out = dir.join("run");
    let data = p(&fx.data);

    let missing = inputs.join("does-not-exist.gguf");
    assert_fails(
        fx,
        &dir,
        &finetune_args(p(&missing), data, p(&out)),
        &["does-not-exist.gguf"],
    );
    assert_fails(
        fx,
        &dir,
        &[
            "logits",
            "--model",
            p(&missing),
            "--text",
            "hi",
            "--out",
            p(&dir.join("l.safetensors")),
        ],
        &["does-not-exist.gguf"],
    );

    let bytes = std::fs::read(&fx.gguf).unwrap();
    // The end of the last tensor's data: cutting one byte before it truncates that tensor.
    let data_end = {
        let g = GgufFile::open(&fx.gguf).unwrap();
        g.tensors()
            .iter()
            .map(|t| t.data_offset + t.n_bytes)
            .max()
            .unwrap()
    };
    for cut in [10, 1000, bytes.len() / 3, data_end - 1] {
        let truncated = inputs.join(format!("cut{cut}.gguf"));
        std::fs::write(&truncated, &bytes[..cut]).unwrap();
        assert_fails(
            fx,
            &dir,
            &finetune_args(p(&truncated), data, p(&out)),
            &[&format!("cut{cut}.gguf"), "truncated"],
        );
    }
    let truncated = inputs.join(format!("cut{}.gguf", bytes.len() / 3));
    assert_fails(
        fx,
        &dir,
        &[
            "merge",
            "--model",
            p(&truncated),
            "--adapter",
            p(&fx.adapter),
            "--out",
            p(&dir.join("m.safetensors")),
        ],
        &["truncated"],
    );

    let not_gguf = inputs.join("notes.gguf");
    std::fs::write(&not_gguf, "these are plain text notes, not a model file\n").unwrap();
    assert_fails(
        fx,
        &dir,
        &finetune_args(p(&not_gguf), data, p(&out)),
        &["notes.gguf", "not a GGUF file"],
    );
    assert_fails(
        fx,
        &dir,
        &[
            "generate",
            "--model",
            p(&not_gguf),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "1",
        ],
        &["not a GGUF file"],
    );
    let _ = std::fs::remove_dir_all(&inputs);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_training_arguments_fail_cleanly() {
    let fx = fixture();
    let dir = case_dir("bad-args-out");
    let out = dir.join("run");
    let (model, data, out) = (p(&fx.gguf), p(&fx.data), p(&out));
    let with = |extra: &[&'static str]| {
        let mut a = finetune_args(model, data, out);
        a.extend_from_slice(extra);
        a
    };
    assert_fails(fx, &dir, &with(&["--r", "0"]), &["rank r", "at least 1"]);
    assert_fails(
        fx,
        &dir,
        &with(&["--target-modules", "q,qkv"]),
        &["unknown target module", "qkv"],
    );
    assert_fails(fx, &dir, &with(&["--steps", "0"]), &["steps", "at least 1"]);
    assert_fails(
        fx,
        &dir,
        &with(&["--method", "full", "--compute-dtype", "bf16"]),
        &["compute_dtype", "full"],
    );
    assert_fails(
        fx,
        &dir,
        &with(&["--method", "qlora", "--compute-dtype", "bf16"]),
        &["compute_dtype", "NF4"],
    );
    assert_fails(
        fx,
        &dir,
        &with(&["--compute-dtype", "fp8"]),
        &["--compute-dtype", "fp8"],
    );
    assert_fails(
        fx,
        &dir,
        &with(&["--device", "cuda"]),
        &["cuda", "unavailable"],
    );
    assert_fails(
        fx,
        &dir,
        &[
            "logits",
            "--model",
            model,
            "--device",
            "cuda",
            "--text",
            "hi",
            "--out",
            p(&dir.join("l.safetensors")),
        ],
        &["cuda", "unavailable"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--compute-dtype bf16` trains over bf16 bases from the CLI: a run finishes, saves the same
/// adapter files, and ends near the f32 fixture's eval loss (the tiny model's weights move by
/// bf16's relative 2^-9 at most).
#[test]
fn finetune_with_bf16_bases_trains_and_saves() {
    let fx = fixture();
    assert_ok(&fx.finetune, "finetune");
    let dir = case_dir("bf16-out");
    let out = dir.join("run");
    let mut args = finetune_args(p(&fx.gguf), p(&fx.data), p(&out));
    args.extend_from_slice(&["--steps", "6", "--batch-size", "4", "--lr", "1e-2"]);
    args.extend_from_slice(&["--warmup-steps", "1", "--compute-dtype", "bf16"]);
    let o = run(fx, &args);
    assert_ok(&o, "finetune --compute-dtype bf16");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let metrics = |d: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(d.join("metrics.json")).unwrap()).unwrap()
    };
    let (b, f) = (metrics(&out), metrics(&fx.adapter));
    let (bb, fb) = (
        b["eval_loss_before"].as_f64(),
        f["eval_loss_before"].as_f64(),
    );
    let (ba, fa) = (b["eval_loss_after"].as_f64(), f["eval_loss_after"].as_f64());
    println!("bf16 eval {bb:?} -> {ba:?}; f32 {fb:?} -> {fa:?}");
    let (bb, fb, ba, fa) = (bb.unwrap(), fb.unwrap(), ba.unwrap(), fa.unwrap());
    assert!((bb - fb).abs() <= 1e-2 * fb, "eval before: {bb} vs {fb}");
    assert!((ba - fa).abs() <= 1e-2 * fa, "eval after: {ba} vs {fa}");
    assert!(ba < bb, "training lowers the eval loss: {bb} -> {ba}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_datasets_fail_cleanly_and_skip_reports_the_line() {
    let fx = fixture();
    let inputs = case_dir("bad-data-inputs");
    let dir = case_dir("bad-data-out");
    let out = dir.join("run");
    let model = p(&fx.gguf);

    let empty = inputs.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    assert_fails(
        fx,
        &dir,
        &finetune_args(model, p(&empty), p(&out)),
        &["empty.jsonl", "no usable records"],
    );

    // Line 5 is cut short (invalid JSON).
    let mut lines = chat_lines(30);
    lines[4] = r#"{"question": "what comes after two?", "answer": "thr"#.to_string();
    let bad = inputs.join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    assert_fails(
        fx,
        &dir,
        &finetune_args(model, p(&bad), p(&out)),
        &["bad.jsonl", "line 5", "invalid JSON"],
    );

    // --bad-records skip trains on the other 29 and says which record it skipped.
    let mut args = finetune_args(model, p(&bad), p(&out));
    args.extend(["--bad-records", "skip", "--steps", "2", "--batch-size", "4"]);
    let o = run(fx, &args);
    assert_ok(&o, "finetune --bad-records skip");
    let err = stderr(&o);
    let line = err
        .lines()
        .find(|l| l.contains("skipped"))
        .unwrap_or_else(|| panic!("no `skipped` message on stderr:\n{err}"));
    assert!(
        line.contains("bad.jsonl") && line.contains(" 5 ") && line.contains("invalid JSON"),
        "skip message should name the file, line 5 and the problem: {line}"
    );
    assert_eq!(
        err.lines().filter(|l| l.contains("skipped")).count(),
        1,
        "exactly one record skipped:\n{err}"
    );
    assert!(err.contains("27 train / 2 eval"), "29 records used:\n{err}");
    assert!(out.join("adapter_model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&inputs);
    let _ = std::fs::remove_dir_all(&dir);
}
