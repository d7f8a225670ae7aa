//! `lorafuse export --to gguf-lora` and `lorafuse merge --to gguf` through the binary, on a tiny
//! random Llama GGUF written by the test (no download): a trained LoRA adapter becomes a LoRA
//! adapter GGUF with PEFT's alpha, a DoRA adapter is refused naming `merge --to gguf` and leaves
//! no file, the merged GGUF model loads back, and flag combinations that cannot be written fail
//! by name before anything is loaded.

use std::path::PathBuf;
use std::sync::OnceLock;

use lorafuse::Cpu;
use lorafuse::io::gguf::{GgmlType, GgufFile};
use lorafuse::io::load::llama_from_gguf;

#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;
use tiny_gguf::*;

struct Fixture {
    setup: TinySetup,
    lora: PathBuf,
    dora: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let setup = tiny_setup("lorafuse-cli-export");
        let (lora, dora) = (setup.dir.join("lora"), setup.dir.join("dora"));
        for (method, out) in [("lora", &lora), ("dora", &dora)] {
            let o = run_lorafuse(
                &setup.cache,
                &[
                    "finetune",
                    "--method",
                    method,
                    "--model",
                    p(&setup.gguf),
                    "--data",
                    p(&setup.data),
                    "--steps",
                    "3",
                    "--batch-size",
                    "4",
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
        Fixture { setup, lora, dora }
    })
}

fn run(args: &[&str]) -> std::process::Output {
    run_lorafuse(&fixture().setup.cache, args)
}

#[test]
fn export_writes_a_lora_adapter_gguf_and_refuses_dora() {
    let fx = fixture();
    let out = fx.setup.dir.join("lora.gguf");
    let o = run(&[
        "export",
        "--model",
        p(&fx.setup.gguf),
        "--adapter",
        p(&fx.lora),
        "--to",
        "gguf-lora",
        "--dtype",
        "f16",
        "--out",
        p(&out),
    ]);
    assert_ok(&o, "export");
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.get_str("general.type").unwrap(), "adapter");
    // finetune's defaults: r 8, lora_alpha 16 on all seven projections of both layers
    assert_eq!(g.get_f32("adapter.lora.alpha").unwrap(), 16.0);
    assert_eq!(g.tensors().len(), 2 * 7 * 2);
    let a = g.tensor_info("blk.1.ffn_down.weight.lora_a").unwrap();
    assert_eq!((a.ggml_type, a.shape.clone()), (GgmlType::F16, vec![8, 48]));

    let bad = fx.setup.dir.join("dora.gguf");
    let o = run(&[
        "export",
        "--model",
        p(&fx.setup.gguf),
        "--adapter",
        p(&fx.dora),
        "--out",
        p(&bad),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("DoRA") && err.contains("merge --to gguf"),
        "{err}"
    );
    assert!(!bad.exists());
}

#[test]
fn merge_to_gguf_loads_back_and_bad_combinations_fail_by_name() {
    let fx = fixture();
    let out = fx.setup.dir.join("merged-dora.gguf");
    let o = run(&[
        "merge",
        "--model",
        p(&fx.setup.gguf),
        "--adapter",
        p(&fx.dora),
        "--to",
        "gguf",
        "--dtype",
        "bf16",
        "--out",
        p(&out),
    ]);
    assert_ok(&o, "merge --to gguf");
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.get_u32("general.file_type").unwrap(), 32);
    assert_eq!(
        g.tensor_info("blk.0.attn_norm.weight").unwrap().ggml_type,
        GgmlType::F32
    );
    assert_eq!(
        g.tensor_info("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::BF16
    );
    let m = llama_from_gguf(&Cpu, &g).unwrap();
    assert_eq!(m.cfg, fx.setup.cfg);

    for (args, what) in [
        (vec!["--to", "gguf", "--requantize-nf4"], "requantize-nf4"),
        (vec!["--dtype", "q8_0"], "--to gguf"),
    ] {
        let bad = fx.setup.dir.join("bad.out");
        let mut a = vec![
            "merge",
            "--model",
            p(&fx.setup.gguf),
            "--adapter",
            p(&fx.lora),
        ];
        a.extend(args);
        a.extend(["--out", p(&bad)]);
        let o = run(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(what), "{err}");
        assert!(!bad.exists());
    }
}
