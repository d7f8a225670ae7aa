//! The additive and selective methods on the tiny transformers Llama of `golden/seeds/`
//! against PEFT and the `adapters` library: logits, loss and every gradient of each case
//! (`<case>/io.safetensors`), on the CPU reference and, where an adapter is present, on wgpu.
//! Each test names the file it checks. Tolerances (seeds/README.md): logits and loss 1e-4
//! absolute, gradients 1e-4 relative to the largest entry of the same tensor.

mod common;
#[path = "common/seeds.rs"]
mod seeds;

use seeds::{Io, base_model, case_dir, peft_case, peft_name, read_io, upload};

use std::path::{Path, PathBuf};

use lorafuse::Cpu;
use lorafuse::adapter::{
    AdapterFusion, BnAdapter, BnLayer, Bottleneck, BottleneckConfig, BottleneckKind, FuseLayer,
    Mlp, PromptMethod, SoftPrompt,
};
use lorafuse::backend::{Activation, Backend};
use lorafuse::io::adapters_lib::{load_bottleneck, load_fusion, save_bottleneck, save_fusion};
use lorafuse::io::peft::{additive, llama_adapter_tensors, save_adapter};
use lorafuse::model::llama::Llama;
use serde_json::Value;

const ATOL: f32 = 1e-4;
const GRAD_RTOL: f32 = 1e-4;
/// An absolute floor for gradients that are zero in exact arithmetic (AdapterFusion's key
/// bias: adding `q . bk` to every adapter's score leaves the softmax unchanged), where both
/// sides hold only rounding noise of order 1e-10.
const GRAD_ATOL_FLOOR: f32 = 1e-7;

/// Compares the model's logits at every real position (and the virtual ones a prepended
/// prompt adds) and its loss and gradients with the case's. `name_of` maps a lorafuse
/// trainable name to the golden `param.`/`grad.` name.
fn check_case<B: Backend>(be: &B, model: &Llama<B>, io: &Io, name_of: &dyn Fn(&str) -> String) {
    let path = io.path.display().to_string();
    let (batch, lens) = io.batch();
    let nvt_prepended: usize = io
        .meta
        .get("virtual_tokens_prepended")
        .map_or(0, |v| v.parse().unwrap());
    // Logits: golden [B, T', V] with T' = nvt + T for prepended prompts.
    let (gshape, glog) = io.get("logits");
    let (tp, vocab) = (gshape[1], gshape[2]);
    let (logits, spans) = model.logits_all(be, &batch).unwrap();
    let ours = be.download(&logits).unwrap();
    let mut worst = 0f32;
    for (r, (span, &n)) in spans.iter().zip(&lens).enumerate() {
        assert_eq!(span.len, n + nvt_prepended, "{path}: row {r} length");
        for j in 0..span.len {
            for v in 0..vocab {
                let a = ours[(span.start + j) * vocab + v];
                let b = glog[(r * tp + j) * vocab + v];
                worst = worst.max((a - b).abs());
            }
        }
    }
    assert!(worst <= ATOL, "{path}: logits differ by {worst}");
    // Generation with the KV cache (soft prompts pre-filled) = recomputing the whole prefix.
    let prompt: Vec<u32> = batch.ids[..lens[0]].to_vec();
    let cached = model.generate_greedy(be, &prompt, 6, u32::MAX).unwrap();
    let full = model
        .generate_greedy_uncached(be, &prompt, 6, u32::MAX)
        .unwrap();
    assert_eq!(
        cached, full,
        "{path}: cached and uncached generation differ"
    );
    // Loss and gradients.
    let out = model.loss_and_grads(be, &batch).unwrap();
    let loss = out.loss_sum / out.n_targets as f64;
    let gl = io.get("loss").1[0] as f64;
    assert!(
        (loss - gl).abs() <= ATOL as f64,
        "{path}: loss {loss} vs {gl}"
    );
    let names: Vec<String> = model
        .trainable_params()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    seeds::check_grads(
        be,
        io,
        &names,
        &out.grads,
        name_of,
        GRAD_RTOL,
        GRAD_ATOL_FLOOR,
    );
}

fn run_peft_case<B: Backend>(be: &B, case: &str) {
    let (model, io) = peft_case(be, case);
    // logits_eval from the folder PEFT saved: the loaded adapter gives PEFT's eval logits.
    let (batch, _) = io.batch();
    let (logits, spans) = model.logits_all(be, &batch).unwrap();
    let ours = be.download(&logits).unwrap();
    let (gs, ge) = io.get("logits_eval");
    let (tp, vocab) = (gs[1], gs[2]);
    let mut worst = 0f32;
    for (r, span) in spans.iter().enumerate() {
        for j in 0..span.len {
            for v in 0..vocab {
                worst = worst
                    .max((ours[(span.start + j) * vocab + v] - ge[(r * tp + j) * vocab + v]).abs());
            }
        }
    }
    assert!(
        worst <= ATOL,
        "{}: logits of the loaded adapter differ from logits_eval by {worst}",
        io.path.display()
    );
}

// ---- projection adapters and norms: the saved folder holds every trained tensor ------------

fn check_loaded<B: Backend>(be: &B, case: &str) {
    let (model, io) = peft_case(be, case);
    check_case(be, &model, &io, &peft_name);
    run_peft_case(be, case);
    save_like_peft(be, &model, case);
}

/// lorafuse saves the model's adapter with the keys, shapes, values and config PEFT saved.
fn save_like_peft<B: Backend>(be: &B, model: &Llama<B>, case: &str) {
    let dir = case_dir(case);
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let list = |k: &str| -> Vec<String> {
        golden[k].as_array().map_or(Vec::new(), |a| {
            a.iter().map(|x| x.as_str().unwrap().to_string()).collect()
        })
    };
    let cfg = match golden["peft_type"].as_str().unwrap() {
        "IA3" => additive::ia3_config(&list("target_modules"), &list("feedforward_modules"), None),
        "BEFT" => additive::beft_config(&list("target_modules"), None),
        "LN_TUNING" => additive::ln_tuning_config(&list("target_modules"), None),
        t => {
            let method = match t {
                "PROMPT_TUNING" => PromptMethod::PromptTuning,
                "P_TUNING" => PromptMethod::PTuning,
                _ => PromptMethod::PrefixTuning,
            };
            let opts = additive::PromptOptions {
                encoder_hidden_size: golden["encoder_hidden_size"].as_u64().map(|x| x as usize),
                prefix_projection: golden["prefix_projection"].as_bool().unwrap_or(false),
                ..Default::default()
            };
            let nvt = golden["num_virtual_tokens"].as_u64().unwrap() as usize;
            additive::prompt_config(model, method, nvt, &opts, None)
        }
    };
    let tensors = llama_adapter_tensors(be, model).unwrap();
    let out = tempdir(case);
    save_adapter(&out, &cfg, &tensors).unwrap();
    same_folder(&dir, &out, &["adapter_config.json"], &[]);
    // Values: equal to what PEFT saved within f32 rounding of the encoder's output.
    let ta = read_io(&dir.join("adapter_model.safetensors"));
    let tb = read_io(&out.join("adapter_model.safetensors"));
    let mut ka: Vec<_> = ta.t.keys().collect();
    let mut kb: Vec<_> = tb.t.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "{}: keys", out.display());
    for k in ka {
        assert_eq!(ta.t[k].0, tb.t[k].0, "{k}: shape");
        let err = ta.t[k]
            .1
            .iter()
            .zip(&tb.t[k].1)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-5, "{}: {k} differs by {err}", out.display());
    }
}

// ---- soft prompts: the encoder's parameters come from io.safetensors ----------------------

fn prompt_case<B: Backend>(be: &B, case: &str) -> (Llama<B>, Io) {
    let dir = case_dir(case);
    let io = read_io(&dir.join("io.safetensors"));
    let mut model = base_model(be);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let method = match cfg["peft_type"].as_str().unwrap() {
        "PROMPT_TUNING" => PromptMethod::PromptTuning,
        "P_TUNING" => PromptMethod::PTuning,
        "PREFIX_TUNING" => PromptMethod::PrefixTuning,
        t => panic!("{}: peft_type {t}", dir.display()),
    };
    let p = |k: &str| upload(be, &io, &format!("param.prompt_encoder.default.{k}"));
    let encoder = match method {
        PromptMethod::PromptTuning => None,
        PromptMethod::PTuning => Some(Mlp {
            layers: (0..3)
                .map(|i| {
                    (
                        p(&format!("mlp_head.{}.weight", 2 * i)),
                        p(&format!("mlp_head.{}.bias", 2 * i)),
                    )
                })
                .collect(),
            act: Activation::Relu,
        }),
        PromptMethod::PrefixTuning => cfg["prefix_projection"].as_bool().unwrap().then(|| Mlp {
            layers: (0..2)
                .map(|i| {
                    (
                        p(&format!("transform.{}.weight", 2 * i)),
                        p(&format!("transform.{}.bias", 2 * i)),
                    )
                })
                .collect(),
            act: Activation::Tanh,
        }),
    };
    model.soft_prompt = Some(SoftPrompt {
        method,
        embedding: p("embedding.weight"),
        encoder,
    });
    (model, io)
}

fn check_prompt<B: Backend>(be: &B, case: &str) {
    let (model, io) = prompt_case(be, case);
    check_case(be, &model, &io, &peft_name);
    save_like_peft(be, &model, case);
    // The folder PEFT saved (the prompt's output only) reproduces the eval logits.
    run_peft_case(be, case);
}

// ---- bottleneck adapters and AdapterFusion (the `adapters` library) -----------------------

fn bn_from<B: Backend>(be: &B, io: &Io, prefix: &str) -> BnAdapter<B> {
    let g = |s: &str| upload(be, io, &format!("{prefix}.{s}"));
    BnAdapter {
        down_w: g("adapter_down.0.weight"),
        down_b: g("adapter_down.0.bias"),
        up_w: g("adapter_up.weight"),
        up_b: g("adapter_up.bias"),
    }
}

fn bottleneck_case<B: Backend>(be: &B, case: &str, kind: BottleneckKind) {
    let dir = case_dir(case);
    let io = read_io(&dir.join("io.safetensors"));
    let mut model = base_model(be);
    let cfg: Value = serde_json::from_str(&io.meta["config"]).unwrap();
    let act = Activation::from_name(cfg["non_linearity"].as_str().unwrap()).unwrap();
    let config = BottleneckConfig {
        kind,
        name: case.to_string(),
        reduction_factor: cfg["reduction_factor"].as_f64().unwrap(),
        non_linearity: act,
    };
    let layers = (0..model.layers.len())
        .map(|l| BnLayer {
            attention: (kind == BottleneckKind::Houlsby).then(|| {
                bn_from(
                    be,
                    &io,
                    &format!("param.model.layers.{l}.attention_adapters.adapters.{case}"),
                )
            }),
            output: Some(bn_from(
                be,
                &io,
                &format!("param.model.layers.{l}.output_adapters.adapters.{case}"),
            )),
        })
        .collect();
    model.bottleneck = Some(Bottleneck { config, layers });
    check_case(be, &model, &io, &|n| n.to_string());
    // The folder the library saved loads to the same adapter, and lorafuse saves the same files.
    let mut loaded = base_model(be);
    load_bottleneck(be, &mut loaded, &dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    check_case(be, &loaded, &io, &|n| n.to_string());
    let out = tempdir(case);
    save_bottleneck(be, &loaded, &out, "base").unwrap();
    same_folder(
        &dir,
        &out,
        &["adapter_config.json"],
        &["adapter.safetensors"],
    );
}

/// A fresh temporary folder path (not created).
fn tempdir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("lorafuse-seeds-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// Folders `a` (golden) and `b` (lorafuse's) hold the same JSON configs (as values;
/// `target_modules` and `feedforward_modules` as sets) and the same tensors, bit for bit.
fn same_folder(a: &Path, b: &Path, jsons: &[&str], tensors: &[&str]) {
    for f in jsons {
        let read = |d: &Path| -> Value {
            let mut v: Value =
                serde_json::from_str(&std::fs::read_to_string(d.join(f)).unwrap()).unwrap();
            for k in ["target_modules", "feedforward_modules"] {
                if let Some(Value::Array(x)) = v.get_mut(k) {
                    x.sort_by_key(|e| e.to_string());
                }
            }
            v
        };
        assert_eq!(
            read(a),
            read(b),
            "{} vs {}",
            a.join(f).display(),
            b.join(f).display()
        );
    }
    for f in tensors {
        let ta = read_io(&a.join(f));
        let tb = read_io(&b.join(f));
        let mut ka: Vec<_> = ta.t.keys().collect();
        let mut kb: Vec<_> = tb.t.keys().collect();
        ka.sort();
        kb.sort();
        assert_eq!(ka, kb, "{}: keys", b.join(f).display());
        for k in ka {
            assert_eq!(ta.t[k], tb.t[k], "{}: tensor {k}", b.join(f).display());
        }
    }
}

fn fusion_case<B: Backend>(be: &B) {
    let dir = case_dir("adapter_fusion");
    let io = read_io(&dir.join("io.safetensors"));
    let mut model = base_model(be);
    // The two frozen Pfeiffer adapters from their saved folders.
    let mut adapters = Vec::new();
    let mut per_layer: Vec<Vec<BnAdapter<B>>> = vec![Vec::new(); model.layers.len()];
    for name in ["a", "b"] {
        let ad = dir.join(name);
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap())
                .unwrap();
        let c = &cfg["config"];
        adapters.push(BottleneckConfig {
            kind: BottleneckKind::Pfeiffer,
            name: name.into(),
            reduction_factor: c["reduction_factor"].as_f64().unwrap(),
            non_linearity: Activation::from_name(c["non_linearity"].as_str().unwrap()).unwrap(),
        });
        let st = read_io(&ad.join("adapter.safetensors"));
        for (l, v) in per_layer.iter_mut().enumerate() {
            v.push(bn_from(
                be,
                &st,
                &format!("model.layers.{l}.output_adapters.adapters.{name}"),
            ));
        }
    }
    let layers = per_layer
        .into_iter()
        .enumerate()
        .map(|(l, ads)| {
            let p = |s: &str| {
                upload(
                    be,
                    &io,
                    &format!("param.model.layers.{l}.output_adapters.adapter_fusion_layer.a,b.{s}"),
                )
            };
            FuseLayer {
                adapters: ads,
                query_w: p("query.weight"),
                query_b: p("query.bias"),
                key_w: p("key.weight"),
                key_b: p("key.bias"),
                value_w: p("value.weight"),
            }
        })
        .collect();
    model.fusion = Some(AdapterFusion {
        adapters,
        layers,
        reg_weight: 0.01,
    });
    check_case(be, &model, &io, &|n| n.to_string());
    // The fusion folder the library saved loads to the same fusion, and lorafuse saves it so.
    let mut loaded = base_model(be);
    load_fusion(be, &mut loaded, &dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    check_case(be, &loaded, &io, &|n| n.to_string());
    let out = tempdir("fusion");
    save_fusion(be, &loaded, &out, "base").unwrap();
    same_folder(
        &dir,
        &out,
        &["adapter_fusion_config.json"],
        &["model_adapter_fusion.safetensors"],
    );
    for n in ["a", "b"] {
        same_folder(
            &dir.join(n),
            &out.join(n),
            &["adapter_config.json"],
            &["adapter.safetensors"],
        );
    }
}

#[test]
fn base_model_loss_matches_transformers() {
    let be = Cpu;
    let model = base_model(&be);
    let io = read_io(&case_dir("ia3").join("io.safetensors"));
    let (batch, _) = io.batch();
    let (sum, n) = model.loss(&be, &batch).unwrap();
    let loss = sum / n as f64;
    assert!(
        (loss - 4.560689).abs() < 1e-4,
        "{}: base loss {loss}",
        case_dir("base").display()
    );
}

/// Every case on one backend: `cases!(module, backend expression or None to skip)`.
macro_rules! cases {
    ($m:ident, $be:expr) => {
        mod $m {
            use super::*;
            #[test]
            fn ia3_matches_peft() {
                if let Some(be) = $be {
                    check_loaded(&be, "ia3")
                }
            }
            #[test]
            fn beft_matches_peft() {
                if let Some(be) = $be {
                    check_loaded(&be, "beft")
                }
            }
            #[test]
            fn ln_tuning_matches_peft() {
                if let Some(be) = $be {
                    check_loaded(&be, "ln_tuning")
                }
            }
            #[test]
            fn prompt_tuning_matches_peft() {
                if let Some(be) = $be {
                    check_prompt(&be, "prompt_tuning")
                }
            }
            #[test]
            fn p_tuning_mlp_matches_peft() {
                if let Some(be) = $be {
                    check_prompt(&be, "p_tuning_mlp")
                }
            }
            #[test]
            fn prefix_tuning_matches_peft() {
                if let Some(be) = $be {
                    check_prompt(&be, "prefix_tuning")
                }
            }
            #[test]
            fn prefix_tuning_projection_matches_peft() {
                if let Some(be) = $be {
                    check_prompt(&be, "prefix_tuning_projection")
                }
            }
            #[test]
            fn houlsby_matches_adapters_library() {
                if let Some(be) = $be {
                    bottleneck_case(&be, "houlsby", BottleneckKind::Houlsby)
                }
            }
            #[test]
            fn pfeiffer_matches_adapters_library() {
                if let Some(be) = $be {
                    bottleneck_case(&be, "pfeiffer", BottleneckKind::Pfeiffer)
                }
            }
            #[test]
            fn adapter_fusion_matches_adapters_library() {
                if let Some(be) = $be {
                    fusion_case(&be)
                }
            }
        }
    };
}

cases!(cpu, Some(Cpu));

#[cfg(feature = "wgpu")]
fn wgpu_backend() -> Option<lorafuse::Wgpu> {
    match lorafuse::Wgpu::new() {
        Ok(be) => Some(be),
        Err(e) => {
            common::skip_or_fail("wgpu", &format!("golden_seeds: {e}"));
            None
        }
    }
}

#[cfg(feature = "wgpu")]
cases!(wgpu, wgpu_backend());

#[cfg(feature = "cuda")]
fn cuda_backend() -> Option<lorafuse::backend::cuda::Cuda> {
    match lorafuse::backend::cuda::Cuda::new(0) {
        Ok(be) => Some(be),
        Err(e) => {
            common::skip_or_fail("cuda", &format!("golden_seeds: {e}"));
            None
        }
    }
}

#[cfg(feature = "cuda")]
cases!(cuda, cuda_backend());
