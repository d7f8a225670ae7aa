//! `lorafuse dpo`, `lorafuse reward` and `lorafuse score` end to end on a tiny random Llama GGUF
//! written by the test: what each run writes (PEFT files, metrics under TRL's names, plots), the
//! properties that hold whatever the weights (a fresh or continued adapter starts at the
//! reference, so the first DPO loss is log 2; precomputing the reference changes nothing),
//! the reward model's score head saved and read back, wgpu against the CPU, and bad input.

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
    sft_data: PathBuf,
    pairs: PathBuf,
    hidden: usize,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// 20 preference records from the tiny chat lines: chosen the line's answer, rejected an
/// evasive one in another style (so that what DPO learns carries over to the eval pairs).
fn preference_lines() -> Vec<String> {
    chat_lines(20)
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l).unwrap();
            serde_json::json!({
                "prompt": v["question"],
                "chosen": v["answer"],
                "rejected": format!("no idea, ask me later {i}"),
            })
            .to_string()
        })
        .collect()
}

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let s = tiny_setup("lorafuse-cli-align");
        let pairs = s.dir.join("pairs.jsonl");
        std::fs::write(&pairs, preference_lines().join("\n") + "\n").unwrap();
        Fixture {
            hidden: s.cfg.hidden_size,
            dir: s.dir,
            cache: s.cache,
            gguf: s.gguf,
            sft_data: s.data,
            pairs,
        }
    })
}

fn run(args: &[&str]) -> Output {
    run_lorafuse(&fixture().cache, args)
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

/// `lorafuse CMD` on the tiny model and the preference pairs: 4 steps of 4 pairs at lr 3e-3,
/// unless `extra` sets those flags.
fn align(cmd: &str, out: &Path, extra: &[&str]) -> Output {
    let fx = fixture();
    let mut args = vec![cmd, "--model", p(&fx.gguf), "--out", p(out)];
    let defaults = [
        ("--data", p(&fx.pairs)),
        ("--steps", "4"),
        ("--batch-size", "4"),
        ("--lr", "3e-3"),
        ("--warmup-steps", "1"),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend_from_slice(&[flag, value]);
        }
    }
    args.extend_from_slice(extra);
    run(&args)
}

fn step_losses(m: &Value) -> Vec<f64> {
    m["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn dpo_from_the_base_writes_peft_files_and_trl_metrics() {
    let out = out_dir("dpo-base");
    assert_ok(&align("dpo", &out, &[]), "dpo");
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert!(out.join("adapter_model.safetensors").is_file());
    for png in ["loss_curve.png", "rewards.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }
    let m = read_json(&out.join("metrics.json"));
    assert_eq!(m["reference"], "base model (adapter disabled)");
    assert_eq!(m["dpo"]["beta"], 0.1);
    let losses = step_losses(&m);
    assert_eq!(losses.len(), 4);
    // A fresh LoRA adapter (B = 0) is the reference: every margin is 0 and the loss log 2.
    assert!(
        (losses[0] - 2f64.ln()).abs() < 1e-6,
        "first loss {}",
        losses[0]
    );
    let first = &m["steps"][0];
    for k in ["rewards/chosen", "rewards/rejected", "rewards/margins"] {
        assert!(
            first[k].as_f64().unwrap().abs() < 1e-6,
            "{k} at step 0: {}",
            first[k]
        );
    }
    for s in m["steps"].as_array().unwrap() {
        for k in ["rewards/accuracies", "logps/chosen", "logps/rejected"] {
            assert!(s[k].is_number(), "step without {k}: {s}");
        }
        let (c, r, mg) = (
            s["rewards/chosen"].as_f64().unwrap(),
            s["rewards/rejected"].as_f64().unwrap(),
            s["rewards/margins"].as_f64().unwrap(),
        );
        assert!(
            (c - r - mg).abs() < 1e-9,
            "margin is chosen - rejected: {s}"
        );
    }
    assert!(
        losses[3] < losses[0],
        "DPO did not lower its loss: {losses:?}"
    );
    let (before, after) = (&m["eval_before"], &m["eval_after"]);
    assert!((before["loss"].as_f64().unwrap() - 2f64.ln()).abs() < 1e-6);
    assert!(after["rewards/margins"].as_f64().unwrap() > 0.0, "{after}");
}

#[test]
fn dpo_continues_an_sft_adapter_with_it_frozen_as_the_reference() {
    let fx = fixture();
    let sft = out_dir("sft");
    let o = run(&[
        "finetune",
        "--model",
        p(&fx.gguf),
        "--data",
        p(&fx.sft_data),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--out",
        p(&sft),
    ]);
    assert_ok(&o, "finetune");
    let plain = out_dir("dpo-sft");
    assert_ok(
        &align("dpo", &plain, &["--adapter", p(&sft)]),
        "dpo --adapter",
    );
    let m = read_json(&plain.join("metrics.json"));
    assert_eq!(m["reference"], "the starting adapter, frozen");
    let losses = step_losses(&m);
    // The policy starts as the reference, whatever the SFT adapter learned.
    assert!(
        (losses[0] - 2f64.ln()).abs() < 1e-6,
        "first loss {}",
        losses[0]
    );
    // ... and the start is the SFT adapter, not the base: their log-probs differ. With the
    // first loss at log 2, the reference is that adapter too.
    let from_base = out_dir("dpo-base-1");
    assert_ok(
        &align("dpo", &from_base, &["--steps", "1"]),
        "dpo from the base",
    );
    let lp = |m: &Value| m["eval_before"]["logps/chosen"].as_f64().unwrap();
    let mb = read_json(&from_base.join("metrics.json"));
    assert!(
        (lp(&m) - lp(&mb)).abs() > 1e-3,
        "SFT {} vs base {}",
        lp(&m),
        lp(&mb)
    );
    // Precomputing the reference gives the same run.
    let pre = out_dir("dpo-sft-pre");
    assert_ok(
        &align("dpo", &pre, &["--adapter", p(&sft), "--precompute-ref"]),
        "dpo --precompute-ref",
    );
    let mp = read_json(&pre.join("metrics.json"));
    assert_eq!(mp["precompute_ref"], true);
    for (a, b) in losses.iter().zip(step_losses(&mp)) {
        assert!(
            (a - b).abs() < 1e-5,
            "precomputed reference changed the run: {a} vs {b}"
        );
    }
    // A DoRA --method for a LoRA adapter is refused, naming both.
    let bad = out_dir("dpo-mismatch");
    let o = align("dpo", &bad, &["--adapter", p(&sft), "--method", "dora"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("LORA") && err.contains("--method lora"),
        "{err}"
    );
    assert!(!bad.join("adapter_model.safetensors").exists());
}

/// `finetune --method METHOD` on the tiny model's chat data, 2 steps, into a fresh folder.
fn sft(method: &str) -> PathBuf {
    let fx = fixture();
    let out = out_dir(&format!("sft-{method}"));
    let o = run(&[
        "finetune",
        "--model",
        p(&fx.gguf),
        "--data",
        p(&fx.sft_data),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--method",
        method,
        "--out",
        p(&out),
    ]);
    assert_ok(&o, method);
    out
}

#[test]
fn other_methods_continue_and_train_from_the_base() {
    // VeRA, IA3 and LN tuning adapters continue, saved with their own config.
    for method in ["vera", "ia3", "ln_tuning"] {
        let start = sft(method);
        let out = out_dir(&format!("dpo-{method}"));
        assert_ok(
            &align(
                "dpo",
                &out,
                &["--adapter", p(&start), "--method", method, "--no-eval"],
            ),
            method,
        );
        let m = read_json(&out.join("metrics.json"));
        assert!(
            (step_losses(&m)[0] - 2f64.ln()).abs() < 1e-6,
            "{method}: {:?}",
            step_losses(&m)
        );
        let (a, b) = (
            read_json(&start.join("adapter_config.json")),
            read_json(&out.join("adapter_config.json")),
        );
        for k in [
            "peft_type",
            "target_modules",
            "r",
            "projection_prng_key",
            "feedforward_modules",
        ] {
            assert_eq!(a.get(k), b.get(k), "{method}: config field {k}");
        }
    }
    // Soft prompts train from the base (not at the reference: their virtual tokens change the
    // logits from the first step) and are saved as PEFT saves them; continuing one is refused.
    for cmd in ["dpo", "reward"] {
        let out = out_dir(&format!("{cmd}-prompt"));
        let o = align(
            cmd,
            &out,
            &[
                "--method",
                "prompt_tuning",
                "--num-virtual-tokens",
                "4",
                "--no-eval",
            ],
        );
        assert_ok(&o, cmd);
        let cfg = read_json(&out.join("adapter_config.json"));
        assert_eq!(cfg["peft_type"], "PROMPT_TUNING", "{cmd}");
        assert!(
            step_losses(&read_json(&out.join("metrics.json")))
                .iter()
                .all(|l| l.is_finite())
        );
    }
    let start = sft("prompt_tuning");
    let out = out_dir("dpo-prompt-continued");
    let o = align(
        "dpo",
        &out,
        &["--adapter", p(&start), "--method", "prompt_tuning"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not supported"));
}

#[test]
fn full_fine_tuning_keeps_a_frozen_copy_as_the_reference() {
    let fx = fixture();
    let out = out_dir("dpo-full");
    assert_ok(
        &align(
            "dpo",
            &out,
            &["--method", "full", "--lr", "1e-4", "--no-eval"],
        ),
        "dpo --method full",
    );
    let m = read_json(&out.join("metrics.json"));
    assert_eq!(m["reference"], "frozen copy of the starting model");
    assert!(m["reference_bytes"].as_u64().unwrap() > 0);
    assert!((step_losses(&m)[0] - 2f64.ln()).abs() < 1e-6);
    assert!(out.join("model.safetensors").is_file());
    // A fully trained reward model keeps its head: transformers' `score.weight`.
    let rw = out_dir("reward-full");
    assert_ok(
        &align(
            "reward",
            &rw,
            &["--method", "full", "--lr", "1e-4", "--no-eval"],
        ),
        "reward --method full",
    );
    let st = read_st(&rw.join("model.safetensors"));
    assert_eq!(st["score.weight"].1, vec![1, fx.hidden]);
}

#[test]
fn dpo_ipo_and_label_smoothing_run_and_are_recorded() {
    let ipo = out_dir("dpo-ipo");
    assert_ok(
        &align("dpo", &ipo, &["--loss-type", "ipo", "--beta", "0.5"]),
        "ipo",
    );
    let m = read_json(&ipo.join("metrics.json"));
    assert_eq!(m["dpo"]["loss_type"], "ipo");
    // IPO at the reference: (0 - 1/(2 beta))^2 = 1.
    assert!(
        (step_losses(&m)[0] - 1.0).abs() < 1e-6,
        "{:?}",
        step_losses(&m)
    );
    let cdpo = out_dir("dpo-cdpo");
    assert_ok(&align("dpo", &cdpo, &["--label-smoothing", "0.1"]), "cdpo");
    let m = read_json(&cdpo.join("metrics.json"));
    assert_eq!(m["dpo"]["label_smoothing"], 0.1);
    assert!((step_losses(&m)[0] - 2f64.ln()).abs() < 1e-6);
}

#[test]
fn reward_model_saves_its_score_head_as_peft_and_score_reads_it_back() {
    let fx = fixture();
    let out = out_dir("reward");
    assert_ok(&align("reward", &out, &[]), "reward");
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    let st = read_st(&out.join("adapter_model.safetensors"));
    let (_, shape, _) = &st["base_model.model.score.weight"];
    assert_eq!(shape, &vec![1, fx.hidden]);
    let m = read_json(&out.join("metrics.json"));
    let losses = step_losses(&m);
    assert!(
        losses[3] < losses[0],
        "the pairwise loss did not fall: {losses:?}"
    );
    for s in m["steps"].as_array().unwrap() {
        assert!(s["accuracy"].is_number() && s["margin"].is_number(), "{s}");
    }
    // `score` on the eval split (records 9 and 19) reproduces the run's eval after training.
    let eval = fx.dir.join("pairs-eval.jsonl");
    let lines = preference_lines();
    std::fs::write(&eval, format!("{}\n{}\n", lines[9], lines[19])).unwrap();
    let o = run(&[
        "score",
        "--model",
        p(&fx.gguf),
        "--adapter",
        p(&out),
        "--data",
        p(&eval),
    ]);
    assert_ok(&o, "score");
    let text = String::from_utf8_lossy(&o.stdout);
    let acc = m["eval_after"]["accuracy"].as_f64().unwrap();
    let margin = m["eval_after"]["margin"].as_f64().unwrap();
    let want = format!("2 pairs: accuracy {acc:.4}");
    assert!(text.contains(&want), "expected `{want}` in\n{text}");
    assert!(
        text.contains(&format!("mean margin {margin:.4}")),
        "margin {margin} in\n{text}"
    );
    // A causal-LM adapter is not a reward model.
    let dpo = out_dir("dpo-for-score");
    assert_ok(&align("dpo", &dpo, &["--steps", "1"]), "dpo");
    let o = run(&[
        "score",
        "--model",
        p(&fx.gguf),
        "--adapter",
        p(&dpo),
        "--data",
        p(&eval),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a reward model"));
}

#[test]
fn dpo_on_wgpu_follows_the_cpu_run() {
    if let Err(e) = lorafuse::Wgpu::new() {
        common::skip_or_fail("wgpu", &format!("cli_align: {e}"));
        return;
    }
    let cpu = out_dir("dpo-cpu");
    let gpu = out_dir("dpo-wgpu");
    assert_ok(
        &align("dpo", &cpu, &["--device", "cpu", "--no-eval"]),
        "cpu",
    );
    assert_ok(
        &align("dpo", &gpu, &["--device", "wgpu", "--no-eval"]),
        "wgpu",
    );
    let (a, b) = (
        step_losses(&read_json(&cpu.join("metrics.json"))),
        step_losses(&read_json(&gpu.join("metrics.json"))),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 2e-3, "cpu {a:?} vs wgpu {b:?}");
    }
}

#[test]
fn bad_preference_input_fails_clearly_and_writes_nothing() {
    let fx = fixture();
    let bad = fx.dir.join("bad-pairs.jsonl");
    let mut lines = preference_lines();
    lines[2] = r#"{"prompt": "hi", "chosen": "hello"}"#.into();
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["--data", p(&bad)], &["line 3", "rejected"]),
        (vec!["--beta", "0"], &["beta"]),
        (vec!["--loss-type", "hinge"], &["hinge", "sigmoid"]),
        (
            vec!["--loss-type", "ipo", "--label-smoothing", "0.1"],
            &["label_smoothing"],
        ),
        (vec!["--label-smoothing", "0.5"], &["label_smoothing"]),
    ];
    for (i, (extra, words)) in cases.iter().enumerate() {
        let out = out_dir(&format!("dpo-bad-{i}"));
        let o = align("dpo", &out, extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} should fail");
        for w in *words {
            assert!(err.contains(w), "{extra:?}: `{w}` not in {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.join("adapter_model.safetensors").exists());
    }
    // Skipping reports the line and trains on the rest.
    let out = out_dir("dpo-skip");
    let o = align(
        "dpo",
        &out,
        &["--data", p(&bad), "--bad-records", "skip", "--steps", "1"],
    );
    assert_ok(&o, "dpo --bad-records skip");
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 3"));
}
