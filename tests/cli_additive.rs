//! `lorafuse finetune --method NAME` for the additive and selective methods (IA3, BEFT, LN
//! tuning, prompt/P-/prefix tuning, Houlsby, Pfeiffer, AdapterFusion) end to end on a tiny
//! random Llama GGUF written by the test: each run saves its reference library's files with the
//! config fields of the golden folders (`golden/seeds/<case>/`), `logits` and `generate` load
//! the saved adapter and it changes the logits, `merge` merges what can be merged and refuses
//! the rest, and bad input fails with a message naming the problem and leaves no output.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use serde_json::Value;

mod common;
#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;
use tiny_gguf::*;

struct Fixture {
    dir: PathBuf,
    cache: PathBuf,
    gguf: PathBuf,
    data: PathBuf,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let s = tiny_setup("lorafuse-cli-additive");
        Fixture {
            dir: s.dir,
            cache: s.cache,
            gguf: s.gguf,
            data: s.data,
        }
    })
}

/// Runs the binary with `LORAFUSE_CACHE` at the empty cache and prints its output.
fn run(args: &[&str]) -> Output {
    run_lorafuse(&fixture().cache, args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `lorafuse finetune` on the tiny model, 4 steps at lr 1e-2, into `out`.
fn finetune(out: &Path, extra: &[&str]) -> Output {
    let fx = fixture();
    let mut args = vec![
        "finetune",
        "--model",
        p(&fx.gguf),
        "--data",
        p(&fx.data),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "1",
        "--out",
        p(out),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn out_dir(name: &str) -> PathBuf {
    let d = fixture().dir.join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

/// The golden folder of a case (its config shows the fields the library writes).
fn golden(case: &str) -> PathBuf {
    let d = common::golden_dir().join("seeds").join(case);
    assert!(d.is_dir(), "golden folder {} is missing", d.display());
    println!("comparing with golden folder {}", d.display());
    d
}

/// The last-position logits `lorafuse logits` writes, with an adapter or without.
fn logits(adapter: Option<&Path>, name: &str) -> Vec<f32> {
    let fx = fixture();
    let out = fx.dir.join(format!("{name}.safetensors"));
    let mut args = vec![
        "logits",
        "--model",
        p(&fx.gguf),
        "--text",
        "hello there how are you",
        "--out",
        p(&out),
    ];
    if let Some(a) = adapter {
        args.extend_from_slice(&["--adapter", p(a)]);
    }
    assert_ok(&run(&args), "logits");
    let st = read_st(&out);
    f32_of(&st["logits"].2)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Trains `method`, checks the saved config's fields against the golden case's, that the saved
/// adapter loads in `logits` and `generate` and moves the logits; returns the output folder.
fn train_and_load(method: &str, extra: &[&str], golden_case: &str, config_file: &str) -> PathBuf {
    let out = out_dir(method);
    assert_ok(&finetune(&out, extra), method);
    for f in ["metrics.json", "loss_curve.png", config_file] {
        assert!(out.join(f).is_file(), "{method}: {f} missing");
    }
    let ours = read_json(&out.join(config_file));
    let theirs = read_json(&golden(golden_case).join(config_file));
    assert_eq!(
        keys(&ours),
        keys(&theirs),
        "{method}: the fields of {config_file} differ from the golden folder's"
    );
    if let Some(c) = theirs.get("config") {
        assert_eq!(
            keys(c),
            keys(&ours["config"]),
            "{method}: the fields of {config_file}'s config differ"
        );
    }
    let metrics = read_json(&out.join("metrics.json"));
    assert_eq!(metrics["steps"].as_array().unwrap().len(), 4, "{method}");
    let base = logits(None, &format!("{method}-base"));
    let with = logits(Some(&out), &format!("{method}-adapter"));
    let moved = max_abs_diff(&base, &with);
    println!("{method}: the trained adapter moves the logits by {moved:.3e}");
    assert!(
        moved > 1e-4,
        "{method}: the saved adapter does not change the logits"
    );
    let fx = fixture();
    let g = run(&[
        "generate",
        "--model",
        p(&fx.gguf),
        "--adapter",
        p(&out),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "4",
    ]);
    assert_ok(&g, &format!("{method} generate"));
    out
}

/// `merge` of `adapter`: Ok with the file written, or Err with the message (and no file).
fn merge(adapter: &Path, name: &str) -> Result<(), String> {
    let fx = fixture();
    let out = fx.dir.join(format!("merged-{name}.safetensors"));
    let _ = std::fs::remove_file(&out);
    let o = run(&[
        "merge",
        "--model",
        p(&fx.gguf),
        "--adapter",
        p(adapter),
        "--out",
        p(&out),
    ]);
    if o.status.success() {
        assert!(out.is_file(), "{name}: merge succeeded but wrote nothing");
        Ok(())
    } else {
        assert!(
            !out.exists(),
            "{name}: a failed merge left {}",
            out.display()
        );
        Err(stderr(&o))
    }
}

#[test]
fn ia3_trains_saves_loads_and_merges() {
    let out = train_and_load("ia3", &["--method", "ia3"], "ia3", "adapter_config.json");
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "IA3");
    assert_eq!(cfg["feedforward_modules"], serde_json::json!(["down_proj"]));
    let t: BTreeSet<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(t, BTreeSet::from(["k_proj", "v_proj", "down_proj"]));
    merge(&out, "ia3").expect("IA3 merges into the weights");
}

#[test]
fn beft_trains_and_refuses_to_merge_into_bias_free_layers() {
    let out = train_and_load("beft", &["--method", "beft"], "beft", "adapter_config.json");
    assert_eq!(
        read_json(&out.join("adapter_config.json"))["peft_type"],
        "BEFT"
    );
    let e = merge(&out, "beft").expect_err("BEFT on a bias-free layer cannot merge");
    assert!(e.contains("without a bias"), "{e}");
}

#[test]
fn ln_tuning_trains_and_merges_into_the_norms() {
    let out = train_and_load(
        "ln_tuning",
        &["--method", "ln_tuning"],
        "ln_tuning",
        "adapter_config.json",
    );
    assert_eq!(
        read_json(&out.join("adapter_config.json"))["peft_type"],
        "LN_TUNING"
    );
    merge(&out, "ln_tuning").expect("LN tuning merges into the norms");
}

#[test]
fn soft_prompts_train_save_load_and_refuse_to_merge() {
    for (method, extra, case, peft_type) in [
        (
            "prompt_tuning",
            &["--num-virtual-tokens", "5"][..],
            "prompt_tuning",
            "PROMPT_TUNING",
        ),
        (
            "p_tuning",
            &["--num-virtual-tokens", "5", "--encoder-hidden-size", "16"][..],
            "p_tuning_mlp",
            "P_TUNING",
        ),
        (
            "prefix_tuning",
            &["--num-virtual-tokens", "5"][..],
            "prefix_tuning",
            "PREFIX_TUNING",
        ),
    ] {
        let mut args = vec!["--method", method];
        args.extend_from_slice(extra);
        let out = train_and_load(method, &args, case, "adapter_config.json");
        let cfg = read_json(&out.join("adapter_config.json"));
        assert_eq!(cfg["peft_type"], peft_type);
        assert_eq!(cfg["num_virtual_tokens"], 5);
        let e = merge(&out, method).expect_err("a soft prompt cannot merge");
        assert!(e.contains("soft prompt"), "{e}");
    }
}

#[test]
fn prompt_tuning_text_init_is_recorded_as_peft_records_it() {
    let out = out_dir("prompt_text");
    let o = finetune(
        &out,
        &[
            "--method",
            "prompt_tuning",
            "--num-virtual-tokens",
            "6",
            "--prompt-tuning-init",
            "TEXT",
            "--prompt-tuning-init-text",
            "hello there",
        ],
    );
    assert_ok(&o, "prompt tuning TEXT");
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["prompt_tuning_init"], "TEXT");
    assert_eq!(cfg["prompt_tuning_init_text"], "hello there");
    assert!(cfg["tokenizer_name_or_path"].is_string(), "{cfg}");
}

#[test]
fn bottleneck_adapters_and_their_fusion_train_save_load_and_refuse_to_merge() {
    let h = train_and_load(
        "houlsby",
        &["--method", "houlsby", "--reduction-factor", "4"],
        "houlsby",
        "adapter_config.json",
    );
    // Houlsby: adapters after attention (mh_adapter) and after the MLP (output_adapter).
    let c = read_json(&h.join("adapter_config.json"));
    assert_eq!(c["config"]["mh_adapter"], true);
    assert_eq!(c["config"]["output_adapter"], true);
    assert_eq!(c["name"], "lorafuse");
    let e = merge(&h, "houlsby").expect_err("bottleneck adapters cannot merge");
    assert!(e.contains("cannot be merged"), "{e}");
    let a = train_and_load(
        "pfeiffer",
        &[
            "--method",
            "pfeiffer",
            "--reduction-factor",
            "4",
            "--adapter-name",
            "a",
        ],
        "pfeiffer",
        "adapter_config.json",
    );
    let out_b = out_dir("pfeiffer_b");
    let b = finetune(
        &out_b,
        &[
            "--method",
            "pfeiffer",
            "--reduction-factor",
            "4",
            "--adapter-name",
            "b",
            "--seed",
            "3",
        ],
    );
    assert_ok(&b, "second Pfeiffer adapter");
    let fuse = format!("{},{}", p(&a), p(&out_b));
    let f = train_and_load(
        "adapter_fusion",
        &["--method", "adapter_fusion", "--fuse", &fuse],
        "adapter_fusion",
        "adapter_fusion_config.json",
    );
    for sub in ["a", "b"] {
        assert!(
            f.join(sub).join("adapter.safetensors").is_file(),
            "the fusion folder holds each fused adapter"
        );
    }
    let e = merge(&f, "fusion").expect_err("a fusion cannot merge");
    assert!(e.contains("cannot be merged"), "{e}");
    // A fusion of adapters made for another model (the golden tiny transformers Llama).
    let other = golden("pfeiffer");
    let out = out_dir("fusion_other_model");
    let o = finetune(
        &out,
        &[
            "--method",
            "adapter_fusion",
            "--fuse",
            &format!("{},{}", p(&a), p(&other)),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("hidden_size"), "{}", stderr(&o));
    assert!(!out.join("adapter_fusion_config.json").exists());
    // Two adapters of one name.
    let o = finetune(
        &out,
        &[
            "--method",
            "adapter_fusion",
            "--fuse",
            &format!("{},{}", p(&a), p(&a)),
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("two adapters are named"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_additive_input_is_a_clear_error_and_writes_nothing() {
    let cases: &[(&[&str], &str)] = &[
        // 250 virtual tokens + 128 tokens exceed the tiny model's 256 positions.
        (
            &["--method", "prompt_tuning", "--num-virtual-tokens", "250"],
            "num_virtual_tokens",
        ),
        (
            &["--method", "prompt_tuning", "--num-virtual-tokens", "0"],
            "num_virtual_tokens",
        ),
        (
            &["--method", "prompt_tuning", "--prompt-tuning-init", "TEXT"],
            "--prompt-tuning-init-text",
        ),
        (
            &["--method", "prefix_tuning", "--target-modules", "q"],
            "target_modules",
        ),
        (
            &["--method", "ia3", "--feedforward-modules", "gate"],
            "feedforward_modules",
        ),
        (
            &["--method", "ln_tuning", "--target-modules", "q"],
            "unknown norm",
        ),
        (
            &["--method", "houlsby", "--reduction-factor", "0"],
            "reduction_factor",
        ),
        (
            &["--method", "houlsby", "--reduction-factor", "64"],
            "reduction_factor",
        ),
        (
            &["--method", "pfeiffer", "--non-linearity", "gelu2"],
            "non_linearity",
        ),
        (&["--method", "adapter_fusion"], "--fuse"),
        (&["--method", "lora", "--fuse", "x,y"], "fuse"),
    ];
    for (i, (args, want)) in cases.iter().enumerate() {
        let out = out_dir(&format!("bad-{i}"));
        let o = finetune(&out, args);
        assert!(!o.status.success(), "{args:?} should fail");
        let e = stderr(&o);
        assert!(
            e.contains(want),
            "{args:?}: {e:?} does not mention {want:?}"
        );
        assert!(
            !out.join("adapter_config.json").exists() && !out.join("metrics.json").exists(),
            "{args:?}: a failed run wrote its output"
        );
    }
}

#[test]
fn adapters_made_for_another_model_are_refused_when_loaded() {
    // The golden tiny transformers Llama (hidden 48) is not this GGUF's (hidden 32).
    let fx = fixture();
    for case in [
        "ia3",
        "ln_tuning",
        "prompt_tuning",
        "houlsby",
        "adapter_fusion",
    ] {
        let dir = golden(case);
        let out = fx.dir.join(format!("other-{case}.safetensors"));
        let o = run(&[
            "logits",
            "--model",
            p(&fx.gguf),
            "--text",
            "hello",
            "--adapter",
            p(&dir),
            "--out",
            p(&out),
        ]);
        assert!(!o.status.success(), "{case}: loaded onto the wrong model");
        let e = stderr(&o);
        println!("{case}: {e}");
        assert!(
            [
                "shape",
                "hidden_size",
                "token_dim",
                "num_layers",
                "expected"
            ]
            .iter()
            .any(|w| e.contains(w)),
            "{case}: {e:?} does not say what does not fit"
        );
        assert!(!out.exists(), "{case}: a failed run wrote logits");
    }
}

#[test]
fn every_method_runs_with_its_default_flags() {
    // Each method's defaults (targets, lr, settings) validate and train: full fine-tuning has
    // no target modules of its own, the additive methods none at all. (AdaLoRA's default
    // schedule needs more than tinit + tfinal = 30 steps; its runs are in tests/finetune.rs.)
    for m in [
        "full",
        "lora",
        "qlora",
        "dora",
        "vera",
        "ia3",
        "beft",
        "ln_tuning",
        "prompt_tuning",
        "p_tuning",
        "prefix_tuning",
        "houlsby",
        "pfeiffer",
    ] {
        let out = out_dir(&format!("defaults-{m}"));
        let fx = fixture();
        let o = run(&[
            "finetune",
            "--model",
            p(&fx.gguf),
            "--data",
            p(&fx.data),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--no-eval",
            "--method",
            m,
            "--out",
            p(&out),
        ]);
        assert_ok(&o, m);
        assert!(out.join("metrics.json").is_file(), "{m}");
    }
}
