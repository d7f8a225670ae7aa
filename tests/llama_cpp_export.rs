//! Adapters as llama.cpp's LoRA adapter GGUF and merged models as GGUF model files, on a tiny
//! random Llama (no download): the written factors, applied with llama.cpp's scale rule
//! (`alpha ? alpha / rank : 1`) and with their q/k rows put back in transformers' order, equal
//! the update lorafuse's own merge applies, for LoRA, rsLoRA, VeRA and AdaLoRA (pruned ranks
//! dropped); the file reads back with the names, shapes and metadata llama.cpp checks; the
//! methods that have no LoRA form are refused by name; a merged GGUF model loads back as the
//! merged weights (exactly in F32, within each type's rounding in F16/BF16/Q8_0) with the
//! source's metadata and tokenizer.

use lorafuse::Cpu;
use lorafuse::adapter::{Adapter, LoraConfig, MethodKind};
use lorafuse::io::gguf::{GgmlType, GgufFile, GgufValue, unpermute_qk};
use lorafuse::io::llama_cpp::{GgufDtype, GgufLora, gguf_lora, write_gguf_lora, write_gguf_model};
use lorafuse::io::load::llama_from_gguf;
use lorafuse::model::llama::{Llama, PROJ_NAMES};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::sync::OnceLock;

#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;
use tiny_gguf::*;

fn setup() -> &'static TinySetup {
    static S: OnceLock<TinySetup> = OnceLock::new();
    S.get_or_init(|| tiny_setup("lorafuse-llama-cpp-export"))
}

fn out_path(name: &str) -> PathBuf {
    setup().dir.join(name)
}

fn base_model() -> Llama<Cpu> {
    let g = GgufFile::open(&setup().gguf).unwrap();
    llama_from_gguf(&Cpu, &g).unwrap()
}

fn cfg(r: usize, alpha: f32, rslora: bool, targets: &[&str]) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: alpha,
        use_rslora: rslora,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
    }
}

/// The model with `method` adapters whose trainable tensors are all random (so that every
/// factor, B and lambda_b included, is non-zero).
fn adapted(method: MethodKind, c: &LoraConfig, seed: u64) -> Llama<Cpu> {
    let mut m = base_model();
    m.add_adapters(&Cpu, method, c, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for t in m.trainable_params_mut() {
        for v in t.data_mut() {
            *v = rng.random_range(-0.3f32..0.3);
        }
    }
    m
}

/// Parses `blk.{l}.{g}.weight` into (layer, projection index).
fn layer_proj(name: &str) -> (usize, usize) {
    let rest = name.strip_prefix("blk.").unwrap();
    let (l, rest) = rest.split_once('.').unwrap();
    let g = rest.strip_suffix(".weight").unwrap();
    let p = lorafuse::io::gguf::GGUF_PROJ_NAMES
        .iter()
        .position(|n| *n == g)
        .unwrap();
    (l.parse().unwrap(), p)
}

/// The dense base weight of projection `p` in layer `l`.
fn proj_weight(m: &Llama<Cpu>, l: usize, p: usize) -> &[f32] {
    m.layers[l].proj[p]
        .base
        .weight
        .dense_or_err("w")
        .unwrap()
        .data()
}

/// Applies `lora` as llama.cpp does and checks it against lorafuse's merge of `model`: every
/// projection's `merged - W0` equals `scale * B A` with llama.cpp's scale, q/k rows
/// un-permuted, and unlisted projections are unchanged. Returns the largest update entry.
fn check_against_merge(model: &Llama<Cpu>, lora: &GgufLora) -> f64 {
    let mut merged = model.clone();
    merged.merge_and_unload(&Cpu).unwrap();
    let c = &model.cfg;
    let mut listed = vec![[false; 7]; c.num_hidden_layers];
    let mut biggest = 0f64;
    for (name, f) in &lora.tensors {
        let (l, p) = layer_proj(name);
        listed[l][p] = true;
        // llama_adapter_lora_weight::get_scale, rank from lora_b's ne[0]
        let scale = if lora.alpha != 0.0 {
            lora.alpha / f.r as f32
        } else {
            1.0
        };
        let mut g = f.clone();
        g.scale = scale;
        let mut delta: Vec<f32> = g.delta().iter().map(|&v| v as f32).collect();
        if p < 2 {
            let heads = [c.num_attention_heads, c.num_key_value_heads][p];
            unpermute_qk(&mut delta, f.dout, f.din, heads).unwrap();
        }
        let w0 = proj_weight(model, l, p);
        let w1 = proj_weight(&merged, l, p);
        for ((d, a), b) in delta.iter().zip(w0).zip(w1) {
            let want = (b - a) as f64;
            assert!(
                (*d as f64 - want).abs() <= 1e-5 + 1e-5 * want.abs(),
                "{name}: llama.cpp's update {d} vs lorafuse's merge {want}"
            );
            biggest = biggest.max(want.abs());
        }
    }
    for (l, row) in listed.iter().enumerate() {
        for (p, &is) in row.iter().enumerate() {
            if !is {
                let w0 = proj_weight(model, l, p);
                let w1 = proj_weight(&merged, l, p);
                assert_eq!(
                    w0, w1,
                    "layer {l} {} changed but was not exported",
                    PROJ_NAMES[p]
                );
            }
        }
    }
    biggest
}

#[test]
fn lora_and_rslora_keep_their_factors_and_write_alpha() {
    let all = PROJ_NAMES.to_vec();
    for (rslora, want_alpha) in [(false, 8.0f32), (true, 16.0)] {
        let m = adapted(MethodKind::Lora, &cfg(4, 8.0, rslora, &all), 3);
        let lora = gguf_lora(&Cpu, &m).unwrap();
        // uniform scale * r: alpha = 8/4*4 (LoRA), 8/sqrt(4)*4 (rsLoRA)
        assert_eq!(lora.alpha, want_alpha);
        assert_eq!(lora.tensors.len(), 7 * m.layers.len());
        // lora_A is written as it is; lora_B permuted only for q and k
        for (name, f) in &lora.tensors {
            let (l, p) = layer_proj(name);
            let Some(Adapter::Lora(a)) = &m.layers[l].proj[p].adapter else {
                panic!("{name}: not LoRA")
            };
            assert_eq!(f.lora_a, a.lora_a.data());
            assert_eq!(f.lora_b == a.lora_b.data(), p >= 2, "{name}");
        }
        assert!(check_against_merge(&m, &lora) > 0.05);
    }
}

#[test]
fn vera_folds_its_scales_into_plain_factors() {
    let m = adapted(
        MethodKind::Vera,
        &cfg(6, 1.0, false, &["q_proj", "v_proj", "down_proj"]),
        5,
    );
    let lora = gguf_lora(&Cpu, &m).unwrap();
    // scale 1 and one rank everywhere: alpha = r, so llama.cpp's alpha / rank is 1
    assert_eq!(lora.alpha, 6.0);
    assert_eq!(lora.tensors.len(), 3 * m.layers.len());
    assert!(check_against_merge(&m, &lora) > 0.01);
}

#[test]
fn adalora_drops_pruned_ranks_and_folds_the_scale() {
    let mut m = adapted(
        MethodKind::AdaLora,
        &cfg(4, 8.0, false, &["k_proj", "up_proj", "o_proj"]),
        9,
    );
    // prune: layer 0 k_proj keeps ranks 1, 3; layer 1 up_proj keeps none; o_proj keeps all
    let mut set_e = |l: usize, p: usize, zero: &[usize]| {
        let Some(Adapter::AdaLora(a)) = &mut m.layers[l].proj[p].adapter else {
            panic!("not AdaLoRA")
        };
        for &k in zero {
            a.lora_e.data_mut()[k] = 0.0;
        }
    };
    set_e(0, 1, &[0, 2]);
    set_e(1, 5, &[0, 1, 2, 3]);
    let lora = gguf_lora(&Cpu, &m).unwrap();
    // ranks differ now, so the scales are folded into lora_b and alpha is 0
    assert_eq!(lora.alpha, 0.0);
    let rank_of = |n: &str| lora.tensors.iter().find(|(t, _)| t == n).map(|(_, f)| f.r);
    assert_eq!(rank_of("blk.0.attn_k.weight"), Some(2));
    assert_eq!(rank_of("blk.1.ffn_up.weight"), None);
    assert_eq!(rank_of("blk.1.attn_output.weight"), Some(4));
    assert!(lora.tensors.iter().all(|(_, f)| f.scale == 1.0));
    assert!(check_against_merge(&m, &lora) > 0.001);
}

fn bytes_f32(g: &GgufFile, name: &str) -> (Vec<f32>, Vec<usize>, GgmlType) {
    let info = g.tensor_info(name).unwrap().clone();
    let (v, s) = g.tensor_f32(name).unwrap();
    (v, s, info.ggml_type)
}

#[test]
fn the_adapter_file_has_llama_cpp_names_shapes_and_metadata() {
    let m = adapted(
        MethodKind::Lora,
        &cfg(4, 16.0, false, &["q_proj", "k_proj", "gate_proj"]),
        11,
    );
    let lora = gguf_lora(&Cpu, &m).unwrap();
    for dtype in [GgufDtype::F32, GgufDtype::F16, GgufDtype::Bf16] {
        let path = out_path(&format!("adapter-{dtype:?}.gguf"));
        write_gguf_lora(&path, "llama", "tiny-lora", &lora, dtype).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get_str("general.type").unwrap(), "adapter");
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_str("adapter.type").unwrap(), "lora");
        assert_eq!(g.get_f32("adapter.lora.alpha").unwrap(), 16.0);
        assert_eq!(g.tensors().len(), 2 * lora.tensors.len());
        let tol = match dtype {
            GgufDtype::F32 => 0.0,
            GgufDtype::F16 => 2f32.powi(-11),
            _ => 2f32.powi(-8),
        };
        for (base, f) in &lora.tensors {
            let (a, sa, ta) = bytes_f32(&g, &format!("{base}.lora_a"));
            let (b, sb, tb) = bytes_f32(&g, &format!("{base}.lora_b"));
            assert_eq!((ta, tb), (dtype.ggml_type(), dtype.ggml_type()));
            // torch order [r, in] / [out, r]: GGUF ne [in, r] / [r, out], what llama.cpp checks
            // against the base's ne [in, out]
            assert_eq!(sa, [f.r, f.din]);
            assert_eq!(sb, [f.dout, f.r]);
            for (x, y) in a.iter().zip(&f.lora_a).chain(b.iter().zip(&f.lora_b)) {
                assert!((x - y).abs() <= tol * y.abs(), "{base}: {x} vs {y}");
            }
        }
    }
    let e = write_gguf_lora(&out_path("q8.gguf"), "llama", "x", &lora, GgufDtype::Q8_0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("f32, f16 or bf16"), "{e}");
    assert!(!out_path("q8.gguf").exists());
}

#[test]
fn methods_without_a_lora_form_are_refused_by_name() {
    let all = PROJ_NAMES.to_vec();
    let err = |m: &Llama<Cpu>| gguf_lora(&Cpu, m).unwrap_err().to_string();
    let dora = adapted(MethodKind::Dora, &cfg(4, 8.0, false, &all), 1);
    let e = err(&dora);
    assert!(
        e.contains("DoRA") && e.contains("lorafuse merge --to gguf"),
        "{e}"
    );
    let mut ia3 = base_model();
    ia3.add_ia3(
        &Cpu,
        &["v_proj".into(), "down_proj".into()],
        &["down_proj".into()],
    )
    .unwrap();
    let e = err(&ia3);
    assert!(e.contains("IA3") && e.contains("merge"), "{e}");
    let mut beft = base_model();
    beft.add_beft(&Cpu, &["q_proj".into()]).unwrap();
    assert!(err(&beft).contains("bias tuning"));
    let mut ln = base_model();
    ln.add_ln_tuning(&Cpu, &["input_layernorm".into()]).unwrap();
    assert!(err(&ln).contains("LN tuning"));
    let mut sp = base_model();
    sp.add_soft_prompt(
        &Cpu,
        lorafuse::adapter::PromptMethod::PromptTuning,
        4,
        None,
        None,
        1,
    )
    .unwrap();
    assert!(err(&sp).contains("soft prompt"));
    assert!(err(&base_model()).contains("nothing to export"));
}

#[test]
fn a_merged_model_gguf_loads_back_as_the_merged_weights() {
    let source = GgufFile::open(&setup().gguf).unwrap();
    let mut m = adapted(MethodKind::Lora, &cfg(4, 8.0, false, &PROJ_NAMES), 13);
    // writing a model that still carries adapters is refused
    let e = write_gguf_model(&Cpu, &m, &source, &out_path("x.gguf"), GgufDtype::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("merge them first"), "{e}");
    lorafuse::io::export::merge_into_base(&Cpu, &mut m).unwrap();
    for dtype in [
        GgufDtype::F32,
        GgufDtype::F16,
        GgufDtype::Bf16,
        GgufDtype::Q8_0,
    ] {
        let path = out_path(&format!("merged-{dtype:?}.gguf"));
        let n = write_gguf_model(&Cpu, &m, &source, &path, dtype).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(n, source.tensors().len());
        assert_eq!(g.get_u32("general.file_type").unwrap(), dtype.file_type());
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "llama.block_count",
        ] {
            assert_eq!(g.get(key).unwrap(), source.get(key).unwrap(), "{key}");
        }
        for info in g.tensors() {
            let want = match (
                info.shape.len(),
                dtype,
                info.shape[info.shape.len() - 1] % 32,
            ) {
                (1, _, _) => GgmlType::F32,
                (_, GgufDtype::Q8_0, r) if r != 0 => GgmlType::F16,
                (_, d, _) => d.ggml_type(),
            };
            assert_eq!(info.ggml_type, want, "{}", info.name);
        }
        assert_eq!(
            g.tensor_info("blk.0.ffn_down.weight").unwrap().ggml_type,
            if dtype == GgufDtype::Q8_0 {
                GgmlType::F16
            } else {
                dtype.ggml_type()
            }
        );
        let back = llama_from_gguf(&Cpu, &g).unwrap();
        let pairs = lorafuse::io::export::model_weights(&m)
            .into_iter()
            .zip(lorafuse::io::export::model_weights(&back));
        for ((name, a), (_, b)) in pairs {
            use lorafuse::io::export::ModelWeight;
            let data = |w: ModelWeight<'_, Cpu>| match w {
                ModelWeight::Dense(t) => t.data().to_vec(),
                ModelWeight::Projection(w) => w.dense_or_err("w").unwrap().data().to_vec(),
            };
            let (a, b) = (data(a), data(b));
            let amax = a.iter().fold(0f32, |x, v| x.max(v.abs()));
            for (x, y) in a.iter().zip(&b) {
                let tol = match dtype {
                    GgufDtype::F32 => 0.0,
                    GgufDtype::F16 => 2f32.powi(-11) * x.abs() + 1e-7,
                    GgufDtype::Bf16 => 2f32.powi(-8) * x.abs(),
                    // half a step of the block's scale, at most amax/127/2 (f16 scale rounding)
                    GgufDtype::Q8_0 => amax / 127.0 * 0.51 + 2f32.powi(-11) * x.abs(),
                };
                assert!((x - y).abs() <= tol, "{name} {dtype:?}: {y} vs {x}");
            }
        }
        if let GgufValue::String(s) = source.get("general.architecture").unwrap() {
            assert_eq!(g.get_str("general.architecture").unwrap(), s);
        }
    }
}
