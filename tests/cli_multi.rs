//! `lorafuse logits --rows` and `lorafuse generate` with several `--adapter NAME=DIR` on the
//! golden tiny Llama (`golden/seeds/base`, as a transformers folder with a word-level
//! tokenizer written here) and PEFT's three adapters of `seeds/multi_lora`: the CLI's mixed
//! batch gives PEFT's `adapter_names` logits; mixed generation prints every prompt's section
//! and equals the single-adapter run; what cannot be mixed or is not given is refused by name.

mod common;
#[path = "common/seeds.rs"]
mod seeds;
#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;

use seeds::{case_dir, read_io};
use std::path::{Path, PathBuf};
use tiny_gguf::{assert_ok, f32_of, p, read_st, run_lorafuse};

/// A copy of the golden base folder with a word-level `tokenizer.json` (`t0` .. `t95`).
fn model_dir(name: &str) -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("lorafuse-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let model = root.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(case_dir("base").join(f), model.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..96).map(|i| (format!("t{i}"), i.into())).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(model.join("tokenizer.json"), tok.to_string()).unwrap();
    let cache = root.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    (model, cache)
}

fn adapter_args(names: &[&str]) -> Vec<String> {
    let dir = case_dir("multi_lora");
    names
        .iter()
        .flat_map(|n| {
            [
                "--adapter".to_string(),
                format!("{n}={}", dir.join(n).display()),
            ]
        })
        .collect()
}

fn run(cache: &Path, args: &[String]) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run_lorafuse(cache, &a)
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn logits_rows_give_peft_mixed_batch() {
    let (model, cache) = model_dir("cli-multi-logits");
    let io = read_io(&case_dir("multi_lora").join("io.safetensors"));
    let (shape, ids) = io.get("input_ids");
    let (_, mask) = io.get("attention_mask");
    let (_, idx) = io.get("adapter_index");
    let (_, gl) = io.get("logits");
    let (n, t, v) = (shape[0], shape[1], 96);
    let names = ["a", "b", "c"];
    let mut lines = String::new();
    let mut lens = Vec::new();
    for r in 0..n {
        let row: Vec<u32> = (0..t)
            .filter(|&j| mask[r * t + j] > 0.5)
            .map(|j| ids[r * t + j] as u32)
            .collect();
        lens.push(row.len());
        let adapter = if idx[r] < 0.0 {
            serde_json::Value::Null
        } else {
            names[idx[r] as usize].into()
        };
        lines += &format!(
            "{}\n",
            serde_json::json!({"input_ids": row, "adapter": adapter})
        );
    }
    let rows = model.parent().unwrap().join("rows.jsonl");
    std::fs::write(&rows, lines).unwrap();
    let out = model.parent().unwrap().join("logits.safetensors");
    let mut args = s(&[
        "logits",
        "--model",
        p(&model),
        "--rows",
        p(&rows),
        "--out",
        p(&out),
    ]);
    args.extend(adapter_args(&names));
    let o = run(&cache, &args);
    assert_ok(&o, "logits --rows");
    let st = read_st(&out);
    let (_, ishape, ibytes) = &st["adapter_index"];
    assert_eq!(ishape, &[n]);
    let got_idx: Vec<i64> = ibytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got_idx, [0, 1, -1, 2]);
    let (_, lshape, lbytes) = &st["logits"];
    assert_eq!(lshape, &[n, v]);
    let got = f32_of(lbytes);
    for (r, len) in lens.iter().enumerate() {
        let want = &gl[(r * t + len - 1) * v..(r * t + len) * v];
        let e = got[r * v..(r + 1) * v]
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f32, f32::max);
        assert!(e <= 1e-4, "row {r}: max |logit - PEFT| = {e}");
    }

    // A row naming an adapter that was not given; IA3 cannot share a batch.
    std::fs::write(&rows, "{\"input_ids\": [1, 5], \"adapter\": \"z\"}\n").unwrap();
    let o = run(&cache, &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("`z`"), "{err}");
    std::fs::write(&rows, "{\"input_ids\": [1, 5]}\n").unwrap();
    let mut bad = s(&[
        "logits",
        "--model",
        p(&model),
        "--rows",
        p(&rows),
        "--out",
        p(&out),
    ]);
    bad.extend([
        "--adapter".into(),
        format!("i={}", case_dir("ia3").display()),
    ]);
    let o = run(&cache, &bad);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("`i`") && err.contains("mixed batch"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(model.parent().unwrap());
}

/// The text of a `--- label ---` section of `generate`'s output.
fn section<'a>(out: &'a str, label: &str) -> &'a str {
    let head = format!("--- {label} ---\n");
    let start = out
        .find(&head)
        .unwrap_or_else(|| panic!("no section `{label}` in:\n{out}"))
        + head.len();
    let rest = &out[start..];
    &rest[..rest.find("\n--- ").unwrap_or(rest.len())]
}

#[test]
fn generate_serves_several_adapters_in_one_batch() {
    let (model, cache) = model_dir("cli-multi-generate");
    let prompts = model.parent().unwrap().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"t5 t9 t17\", \"adapter\": \"b\"}\n{\"prompt\": \"t3 t4\"}\n",
    )
    .unwrap();
    let base = s(&[
        "generate",
        "--model",
        p(&model),
        "--raw",
        "--prompt-file",
        p(&prompts),
        "--max-new-tokens",
        "5",
    ]);
    let mut args = base.clone();
    args.extend(adapter_args(&["a", "b"]));
    let o = run(&cache, &args);
    assert_ok(&o, "generate with two adapters");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    // Prompt 1 names b: one section; prompt 2 names none: base, a and b.
    assert!(!out.contains("--- adapter a (prompt 1) ---"), "{out}");
    for label in [
        "adapter b (prompt 1)",
        "base model (prompt 2)",
        "adapter a (prompt 2)",
        "adapter b (prompt 2)",
    ] {
        section(&out, label);
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("mixed batch of 4 sequences over 2 adapters"),
        "{err}"
    );

    // Each equals the single-adapter run of the same prompt.
    for (name, prompt, label) in [
        ("a", "t3 t4", "adapter a (prompt 2)"),
        ("b", "t5 t9 t17", "adapter b (prompt 1)"),
    ] {
        let o = run(
            &cache,
            &s(&[
                "generate",
                "--model",
                p(&model),
                "--raw",
                "--prompt",
                prompt,
                "--max-new-tokens",
                "5",
                "--adapter",
                p(&case_dir("multi_lora").join(name)),
            ]),
        );
        assert_ok(&o, "generate with one adapter");
        let single = String::from_utf8_lossy(&o.stdout).into_owned();
        let alone = single
            .split("--- with adapter")
            .nth(1)
            .expect("adapter section");
        let alone = &alone[alone.find("---\n").unwrap() + 4..];
        assert_eq!(section(&out, label).trim(), alone.trim(), "{label}");
    }

    // A record naming an adapter without the NAME=DIR form is refused, naming it.
    let mut one = base.clone();
    one.extend([
        "--adapter".into(),
        p(&case_dir("multi_lora").join("a")).into(),
    ]);
    let o = run(&cache, &one);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("`b`") && err.contains("NAME=DIR"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(model.parent().unwrap());
}

#[test]
fn finetune_multi_trains_each_adapter_as_its_own_run() {
    let fx = tiny_gguf::tiny_setup("lorafuse-cli-multi-finetune");
    let data_b = fx.dir.join("b.jsonl");
    std::fs::write(&data_b, tiny_gguf::chat_lines(25)[5..].join("\n") + "\n").unwrap();
    let cfg = fx.dir.join("multi.json");
    let out = fx.dir.join("multi");
    std::fs::write(
        &cfg,
        serde_json::json!({"adapters": [
            {"name": "a", "r": 2, "target_modules": ["q_proj", "v_proj"], "lr": 1e-2,
             "seed": 1},
            {"name": "b", "data": p(&data_b), "r": 4, "lora_alpha": 8, "use_rslora": true,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                "up_proj", "down_proj"],
             "lr": 5e-3, "seed": 2, "steps": 5, "batch_size": 3}
        ]})
        .to_string(),
    )
    .unwrap();
    let common = ["--model", p(&fx.gguf), "--warmup-steps", "1"];
    let mut args = vec![
        "finetune",
        "--multi",
        p(&cfg),
        "--out",
        p(&out),
        "--data",
        p(&fx.data),
        "--steps",
        "4",
        "--batch-size",
        "4",
    ];
    args.extend(common);
    let o = run_lorafuse(&fx.cache, &args);
    assert_ok(&o, "finetune --multi");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("a: eval loss") && stdout.contains("b: eval loss"),
        "{stdout}"
    );

    // Each adapter alone, with the flags its entry stands for.
    let alone_a = fx.dir.join("alone-a");
    let alone_b = fx.dir.join("alone-b");
    let runs: [(&Path, Vec<&str>); 2] = [
        (
            &alone_a,
            vec![
                "--steps",
                "4",
                "--batch-size",
                "4",
                "--data",
                p(&fx.data),
                "--r",
                "2",
                "--target-modules",
                "q_proj,v_proj",
                "--lr",
                "1e-2",
                "--seed",
                "1",
            ],
        ),
        (
            &alone_b,
            vec![
                "--data",
                p(&data_b),
                "--r",
                "4",
                "--lora-alpha",
                "8",
                "--use-rslora",
                "--target-modules",
                "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                "--lr",
                "5e-3",
                "--seed",
                "2",
                "--steps",
                "5",
                "--batch-size",
                "3",
            ],
        ),
    ];
    for ((dir, extra), name) in runs.iter().zip(["a", "b"]) {
        let mut args = vec!["finetune", "--out", p(dir)];
        args.extend(common);
        args.extend(extra.iter().copied());
        let o = run_lorafuse(&fx.cache, &args);
        assert_ok(&o, "finetune alone");
        let (got, want) = (
            read_st(&out.join(name).join("adapter_model.safetensors")),
            read_st(&dir.join("adapter_model.safetensors")),
        );
        let keys = |m: &tiny_gguf::St| {
            let mut k: Vec<String> = m.keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&got),
            keys(&want),
            "{name}: the same tensors, under PEFT's names"
        );
        for (k, (_, shape, bytes)) in &want {
            let (_, gshape, gbytes) = &got[k];
            assert_eq!(gshape, shape, "{name} {k}");
            let e = f32_of(gbytes)
                .iter()
                .zip(f32_of(bytes))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(e <= 1e-5, "{name} {k}: differs from the run alone by {e}");
        }
        let cfg_of = |d: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
                .unwrap()
        };
        let (gc, wc) = (cfg_of(&out.join(name)), cfg_of(dir));
        for key in ["r", "lora_alpha", "use_rslora", "peft_type"] {
            assert_eq!(gc[key], wc[key], "{name}: adapter_config {key}");
        }
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(name).join("metrics.json")).unwrap(),
        )
        .unwrap();
        let w: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap())
                .unwrap();
        let losses = |v: &serde_json::Value| -> Vec<f64> {
            v["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["loss"].as_f64().unwrap())
                .collect()
        };
        let (gl, wl) = (losses(&m), losses(&w));
        assert_eq!(gl.len(), wl.len(), "{name}: steps");
        for (g, w) in gl.iter().zip(&wl) {
            assert!((g - w).abs() <= 1e-5, "{name}: loss {g} vs alone {w}");
        }
    }

    // Bad configs name the problem.
    std::fs::write(&cfg, r#"{"adapters": [{"name": "a", "rank": 2}]}"#).unwrap();
    let o = run_lorafuse(&fx.cache, &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("rank"), "{err}");
    std::fs::write(&cfg, r#"{"adapters": [{"name": "a"}, {"name": "a"}]}"#).unwrap();
    let o = run_lorafuse(&fx.cache, &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("twice"), "{err}");
    let mut dora = args.clone();
    dora.extend(["--method", "dora"]);
    std::fs::write(&cfg, r#"{"adapters": [{"name": "a"}]}"#).unwrap();
    let o = run_lorafuse(&fx.cache, &dora);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--multi"), "{err}");
    let _ = std::fs::remove_dir_all(&fx.dir);
}
