//! Golden tests of LoRA / rsLoRA against vectors made by PEFT 0.21.2 (see
//! `tests/golden/README.md`, sections 1 and 7), and of PEFT adapter folders in and out
//! (`lorafuse::io::peft`).
//!
//! The golden folder is `$LORAFUSE_GOLDEN_DIR`, or `tests/golden` beside the crate. Files are
//! found by name pattern (`lora_*.safetensors`, `adapters/*/`), never from a fixed list, and each
//! file checked is printed (`cargo test --test golden_lora -- --nocapture`).
//!
//! Tolerances are the README's: atol 1e-5 + rtol 1e-5 on outputs and merged weights, atol 5e-5
//! on gradients.

mod common;
#[path = "common/per_method.rs"]
mod per_method;
use per_method::PerMethod;

use lorafuse::adapter::{Adapter, BaseWeight, Linear, LoraConfig, LoraLayer};
use lorafuse::backend::Backend;
use lorafuse::io::peft::{
    self, AdapterConfig, AdapterTensor, TargetModules, adapter_config_for, apply_lora_adapter,
    llama_adapter_tensors, load_adapter, lora_layers_from_adapter, save_lora_adapter,
};
use lorafuse::model::LlamaConfig;
use lorafuse::model::llama::{Llama, PROJ_NAMES, proj_path, random_tensors};
use lorafuse::{Cpu, Error, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-5;
const GRAD_ATOL: f32 = 5e-5;

// ---- helpers -----------------------------------------------------------------------------------

/// The golden folder (`common::golden_dir`: `$LORAFUSE_GOLDEN_DIR` or `tests/golden`
/// beside the crate), which must exist: golden files ship with the repository.
fn golden_dir() -> PathBuf {
    let dir = common::golden_dir();
    assert!(
        dir.is_dir(),
        "golden folder {} not found (set LORAFUSE_GOLDEN_DIR)",
        dir.display()
    );
    dir
}

fn adapters_dir() -> PathBuf {
    golden_dir().join("adapters")
}

/// Entries of `dir` whose name passes `keep`, sorted.
fn list(dir: &Path, keep: impl Fn(&str, &Path) -> bool) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| keep(p.file_name().unwrap().to_str().unwrap(), p))
        .collect();
    out.sort();
    out
}

/// Every adapter folder under `adapters/`.
fn adapter_folders() -> Vec<PathBuf> {
    let dirs = list(&adapters_dir(), |_, p| p.is_dir());
    assert!(
        !dirs.is_empty(),
        "no adapter folder under {}",
        adapters_dir().display()
    );
    dirs
}

fn folder_name(p: &Path) -> String {
    p.file_name().unwrap().to_str().unwrap().to_string()
}

/// An f32 safetensors file read with the safetensors crate directly (independent of the code
/// under test), with its metadata.
struct Golden {
    path: PathBuf,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    meta: HashMap<String, String>,
}

impl Golden {
    fn read(path: &Path) -> Golden {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (name, v) in st.tensors() {
            if v.dtype() != Dtype::F32 {
                continue;
            }
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name, (v.shape().to_vec(), data));
        }
        Golden {
            path: path.to_path_buf(),
            tensors,
            meta: md.metadata().clone().unwrap_or_default(),
        }
    }
    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor `{name}`", self.path.display()))
    }
    fn data(&self, name: &str) -> &[f32] {
        &self.get(name).1
    }
    fn tensor(&self, name: &str) -> Tensor<Cpu> {
        let (shape, data) = self.get(name);
        Cpu.from_vec(data.clone(), shape).unwrap()
    }
    /// A metadata value, JSON-decoded (the README: non-strings are JSON-encoded).
    fn meta_json(&self, key: &str) -> Value {
        let s = self
            .meta
            .get(key)
            .unwrap_or_else(|| panic!("{}: no metadata `{key}`", self.path.display()));
        serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
    }
}

/// Asserts `|got - want| <= atol + rtol |want|` everywhere and prints the worst difference.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} values, want {}",
        got.len(),
        want.len()
    );
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        let tol = atol + rtol * w.abs();
        assert!(
            d <= tol,
            "{what}[{i}]: got {g}, want {w}, |diff| {d:e} > {tol:e}"
        );
        worst = worst.max(d);
    }
    println!("    {what}: max |diff| {worst:.2e} (tol {atol:e} + {rtol:e}|want|)");
}

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "lorafuse-golden-lora-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Names in `dir`'s parent that belong to an unfinished save of `dir` (`.NAME.tmp-*` etc.).
fn leftover_siblings(dir: &Path) -> Vec<String> {
    let prefix = format!(".{}.", folder_name(dir));
    fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Copies a folder's files (flat).
fn copy_folder(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn err_msg<T: std::fmt::Debug>(r: lorafuse::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(
            msg.contains(p),
            "error message {msg:?} does not mention {p:?}"
        );
    }
    println!("    error as expected: {msg}");
}

/// `{key: shape}` of a tensor list.
fn layout(tensors: &[AdapterTensor]) -> BTreeMap<String, Vec<usize>> {
    tensors
        .iter()
        .map(|(k, s, _)| (k.clone(), s.clone()))
        .collect()
}

fn key_layout() -> Value {
    let p = adapters_dir().join("key_layout.json");
    serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap()
}

/// The expected `{key: shape}` of one adapter folder from `key_layout.json`.
fn expected_layout(name: &str) -> BTreeMap<String, Vec<usize>> {
    let kl = key_layout();
    let entry = kl
        .get(name)
        .unwrap_or_else(|| panic!("key_layout.json has no entry for adapter folder `{name}`"));
    serde_json::from_value(entry.clone()).unwrap()
}

/// A LoRA config from JSON, through the public serde path.
fn config(v: Value) -> AdapterConfig {
    serde_json::from_value(v).unwrap()
}

/// `LlamaConfig` from a transformers `config.json`.
fn llama_config(v: &Value) -> LlamaConfig {
    let u = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("config.json: `{k}` missing")) as usize
    };
    let rope_theta = v
        .get("rope_theta")
        .and_then(Value::as_f64)
        .or_else(|| v["rope_parameters"]["rope_theta"].as_f64())
        .unwrap_or(10000.0) as f32;
    let head_dim = v
        .get("head_dim")
        .and_then(Value::as_u64)
        .map_or(u("hidden_size") / u("num_attention_heads"), |h| h as usize);
    LlamaConfig {
        vocab_size: u("vocab_size"),
        hidden_size: u("hidden_size"),
        intermediate_size: u("intermediate_size"),
        num_hidden_layers: u("num_hidden_layers"),
        num_attention_heads: u("num_attention_heads"),
        num_key_value_heads: u("num_key_value_heads"),
        head_dim,
        rope_theta,
        rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap() as f32,
        tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
        max_position_embeddings: u("max_position_embeddings"),
        bos_token_id: v["bos_token_id"].as_u64().unwrap_or(0) as u32,
        eos_token_id: v["eos_token_id"].as_u64().unwrap_or(0) as u32,
        pad_token_id: v["pad_token_id"].as_u64().unwrap_or(0) as u32,
    }
}

/// The random tiny Llama shaped like `adapters/tiny_llama_lora/base_model_config.json`.
fn tiny_llama() -> Llama<Cpu> {
    let p = adapters_dir().join("tiny_llama_lora/base_model_config.json");
    let v: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    let cfg = llama_config(&v);
    let tensors = random_tensors(&cfg, 7);
    Llama::from_tensors(&Cpu, cfg, tensors).unwrap()
}

/// The golden tiny Llama adapter.
fn tiny_llama_adapter() -> (AdapterConfig, Vec<AdapterTensor>) {
    load_adapter(&adapters_dir().join("tiny_llama_lora")).unwrap()
}

/// `erf` in f64: Taylor series for |x| < 2.5, continued fraction of erfc beyond (both far
/// below 1e-12 absolute error here).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let v = if z < 2.5 {
        let mut term = z;
        let mut sum = z;
        for n in 1..200 {
            term *= -z * z / n as f64;
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(z) = exp(-z^2)/sqrt(pi) * 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + 2/(z + ...)))))
        let mut f = z;
        for k in (1..=80).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        1.0 - (-z * z).exp() / std::f64::consts::PI.sqrt() / f
    };
    v.copysign(x)
}

/// torch's exact GELU: `x/2 (1 + erf(x/sqrt 2))`.
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

// ---- LoRA layers: lora_*.safetensors -------------------------------------------------------------

#[test]
fn golden_erf_is_accurate() {
    // Reference values of erf (Abramowitz & Stegun table / mpmath).
    for (x, want) in [
        (0.0, 0.0),
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (2.5, 0.999_593_047_982_555),
        (3.0, 0.999_977_909_503_001_4),
        (4.0, 0.999_999_984_582_742_1),
        (-1.0, -0.842_700_792_949_714_9),
    ] {
        assert!(
            (erf(x) - want).abs() < 1e-13,
            "erf({x}) = {}, want {want}",
            erf(x)
        );
    }
}

#[test]
fn golden_lora_layer_files() {
    let be = Cpu;
    let files = list(&golden_dir(), |n, _| {
        n.starts_with("lora_") && n.ends_with(".safetensors")
    });
    assert!(
        !files.is_empty(),
        "no lora_*.safetensors in {}",
        golden_dir().display()
    );
    let (mut plain, mut rslora) = (0, 0);
    for f in &files {
        println!("checking {}", f.display());
        let g = Golden::read(f);
        assert_eq!(g.meta_json("kind"), json!("lora"), "{}: kind", f.display());
        let r = g.meta_json("r").as_u64().unwrap() as usize;
        let alpha = g.meta_json("lora_alpha").as_f64().unwrap();
        let use_rslora = g.meta.get("use_rslora").is_some_and(|s| s == "true");
        assert_eq!(g.meta_json("fan_in_fan_out"), json!(false));
        let (inp, out, t) = (
            g.meta_json("in_features").as_u64().unwrap() as usize,
            g.meta_json("out_features").as_u64().unwrap() as usize,
            g.meta_json("tokens").as_u64().unwrap() as usize,
        );
        if use_rslora {
            rslora += 1;
        } else {
            plain += 1;
        }

        // Scaling: the file's tensor, the metadata and the config rule all agree.
        let s = g.data("scaling")[0];
        let cfg = config(json!({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                "use_rslora": use_rslora}));
        let s_rule = cfg.scaling().unwrap();
        let s_meta = g.meta_json("scaling").as_f64().unwrap();
        println!("    r {r}, alpha {alpha}, use_rslora {use_rslora}: scaling {s} (rule {s_rule})");
        assert!(
            (s - s_rule).abs() <= 1e-6 * s.abs(),
            "scaling {s} vs rule {s_rule}"
        );
        assert!((s_meta - s_rule as f64).abs() <= 1e-6 * s_meta.abs());
        assert!(s_rule != 1.0, "scaling 1 would not test the scaling");

        let x = g.tensor("x");
        let w0 = g.tensor("W0");
        let bias = g.tensor("bias");
        let a = g.tensor("lora_A.weight");
        let b = g.tensor("lora_B.weight");
        let dy = g.tensor("g");
        x.expect_shape("x", &[t, inp]).unwrap();
        w0.expect_shape("W0", &[out, inp]).unwrap();
        a.expect_shape("lora_A", &[r, inp]).unwrap();
        b.expect_shape("lora_B", &[out, r]).unwrap();

        // Forward through the fused kernel, and the base layer alone.
        let (y, h) = be.lora_forward(&x, &w0, Some(&bias), &a, &b, s).unwrap();
        assert_close("y", y.data(), g.data("y"), ATOL, RTOL);
        let y_base = be.linear(&x, &w0, Some(&bias)).unwrap();
        assert_close("y_base", y_base.data(), g.data("y_base"), ATOL, RTOL);

        // Backward with dL/dy = g.
        let (dx, da, db) = be.lora_backward(&dy, &x, &h, &w0, &a, &b, s).unwrap();
        assert_close("grad.x", dx.data(), g.data("grad.x"), GRAD_ATOL, 0.0);
        assert_close(
            "grad.lora_A.weight",
            da.data(),
            g.data("grad.lora_A.weight"),
            GRAD_ATOL,
            0.0,
        );
        assert_close(
            "grad.lora_B.weight",
            db.data(),
            g.data("grad.lora_B.weight"),
            GRAD_ATOL,
            0.0,
        );

        // Merge gives PEFT's merged weight, the bias is unchanged, unmerge gives W0 back.
        let mut w = w0.clone();
        be.lora_merge(&mut w, &a, &b, s, 1.0).unwrap();
        assert_close(
            "merged.weight",
            w.data(),
            g.data("merged.weight"),
            ATOL,
            RTOL,
        );
        assert_eq!(
            bias.data(),
            g.data("merged.bias"),
            "merged.bias must equal bias"
        );
        be.lora_merge(&mut w, &a, &b, s, -1.0).unwrap();
        assert_close("unmerged weight vs W0", w.data(), g.data("W0"), ATOL, RTOL);

        // The same through the adapter types (LoraLayer over a Linear).
        let mut base = Linear {
            weight: BaseWeight::Dense(w0.clone()),
            bias: Some(bias.clone()),
        };
        let layer = LoraLayer::from_factors(&base, a.clone(), b.clone(), s_rule).unwrap();
        let (y2, _) = layer.forward(&be, &base, &x).unwrap();
        assert_close("LoraLayer y", y2.data(), g.data("y"), ATOL, RTOL);
        layer.merge(&be, &mut base).unwrap();
        let wm = base.weight.dense_or_err("test").unwrap();
        assert_close(
            "LoraLayer merged",
            wm.data(),
            g.data("merged.weight"),
            ATOL,
            RTOL,
        );
        layer.unmerge(&be, &mut base).unwrap();
        let wu = base.weight.dense_or_err("test").unwrap();
        assert_close("LoraLayer unmerged", wu.data(), g.data("W0"), ATOL, RTOL);
    }
    assert!(
        plain > 0 && rslora > 0,
        "want plain and rsLoRA files, got {plain} and {rslora}"
    );
}

// ---- adapter folders -------------------------------------------------------------------------

#[test]
fn golden_adapter_folders_load_with_key_layout() {
    let mut names = BTreeSet::new();
    for dir in adapter_folders() {
        let name = folder_name(&dir);
        println!("checking {}", dir.display());
        let (cfg, tensors) = load_adapter(&dir).unwrap();
        assert_eq!(
            layout(&tensors),
            expected_layout(&name),
            "{name}: keys and shapes"
        );
        for (k, s, d) in &tensors {
            assert_eq!(d.len(), s.iter().product::<usize>(), "{name}: {k}");
            assert!(d.iter().all(|v| v.is_finite()), "{name}: {k} not finite");
        }
        println!("    {} tensors, peft_type {}", tensors.len(), cfg.peft_type);

        // The config keeps every key and value, and is written back exactly as PEFT wrote it.
        let text = fs::read_to_string(dir.join("adapter_config.json")).unwrap();
        let raw: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            serde_json::to_value(&cfg).unwrap(),
            raw,
            "{name}: config round trip"
        );
        assert_eq!(
            cfg.to_peft_json().unwrap(),
            text,
            "{name}: config text round trip"
        );
        names.insert(name);
    }
    // Every folder key_layout.json describes exists.
    let kl = key_layout();
    for k in kl
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !k.starts_with('_'))
    {
        assert!(
            names.contains(k),
            "key_layout.json lists `{k}`, no such folder"
        );
    }
}

#[test]
fn golden_mlp_lora_adapters_reproduce_peft_output() {
    let be = Cpu;
    let (mut plain, mut rslora) = (0, 0);
    for dir in adapter_folders() {
        if !dir.join("io.safetensors").is_file() || !dir.join("base_model.safetensors").is_file() {
            continue;
        }
        let (cfg, tensors) = load_adapter(&dir).unwrap();
        if cfg.check_lora_supported().is_err() {
            continue; // DoRA/VeRA/AdaLoRA: see golden_unsupported_adapters_not_supported_yet
        }
        println!("checking {}", dir.display());
        let base = Golden::read(&dir.join("base_model.safetensors"));
        let io = Golden::read(&dir.join("io.safetensors"));
        let linear = |n: &str| Linear {
            weight: BaseWeight::Dense(base.tensor(&format!("{n}.weight"))),
            bias: Some(base.tensor(&format!("{n}.bias"))),
        };
        let (fc1, fc2) = (linear("fc1"), linear("fc2"));
        let modules = [("fc1".to_string(), &fc1), ("fc2".to_string(), &fc2)];
        let layers = lora_layers_from_adapter(&be, &cfg, &tensors, &modules).unwrap();
        assert_eq!(layers.len(), 2, "fc1 and fc2 adapted");
        let s = cfg.scaling().unwrap();
        println!(
            "    r {}, alpha {}, use_rslora {}: scaling {s}",
            cfg.rank(),
            cfg.alpha(),
            cfg.rslora()
        );
        for (_, l) in &layers {
            assert_eq!(l.scaling, s);
            assert_eq!(l.r(), cfg.rank());
        }
        if cfg.rslora() {
            rslora += 1;
            assert!((s - 8.0 / 2.0f32).abs() < 1e-6, "rsLoRA r 4 alpha 8 → 4");
        } else {
            plain += 1;
        }

        // fc1 → GELU(erf) → fc2, each with its LoRA.
        let x = io.tensor("x");
        let act = |t: Tensor<Cpu>| {
            let shape = t.shape().to_vec();
            Cpu.from_vec(t.data().iter().map(|&v| gelu(v)).collect(), &shape)
                .unwrap()
        };
        let (h, _) = layers[0].1.forward(&be, &fc1, &x).unwrap();
        let (y, _) = layers[1].1.forward(&be, &fc2, &act(h)).unwrap();
        assert_close("y = peft_model(x)", y.data(), io.data("y"), ATOL, RTOL);

        // The adapter matters: the base MLP alone is far from y.
        let y_base = fc2
            .forward(&be, &act(fc1.forward(&be, &x).unwrap()))
            .unwrap();
        let d = y_base
            .data()
            .iter()
            .zip(io.data("y"))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!("    base MLP alone differs by {d:.3e}");
        assert!(d > 1e-3, "adapter has no visible effect ({d})");
    }
    assert!(
        plain > 0 && rslora > 0,
        "want LoRA and rsLoRA MLP folders, got {plain} and {rslora}"
    );
}

#[test]
fn golden_non_lora_adapters_need_the_generic_path() {
    // DoRA/VeRA/AdaLoRA are applied by apply_adapter / adapter_layers_from_adapter (tested in
    // golden_adapters.rs); the LoRA-only entry points say so instead of building LoRA layers.
    let mut kinds = BTreeSet::new();
    for dir in adapter_folders() {
        let (cfg, tensors) = load_adapter(&dir).unwrap();
        let kind = if cfg.use_dora == Some(true) {
            "DORA".to_string()
        } else {
            cfg.peft_type.clone()
        };
        if kind == "LORA" {
            continue;
        }
        println!("checking {} ({kind})", dir.display());
        assert_eq!(layout(&tensors), expected_layout(&folder_name(&dir)));
        let msg = err_msg(cfg.check_lora_supported());
        assert_contains(&msg, &["not a plain LoRA adapter", "apply_adapter"]);
        let fc = Linear::dense(Cpu.from_vec(vec![0.0; 4], &[2, 2]).unwrap()).unwrap();
        let modules = [("fc1".to_string(), &fc)];
        let msg =
            err_msg(lora_layers_from_adapter(&Cpu, &cfg, &tensors, &modules).map(|l| l.len()));
        assert_contains(&msg, &["not a plain LoRA adapter"]);
        kinds.insert(kind);
    }
    for k in ["DORA", "VERA", "ADALORA"] {
        assert!(
            kinds.contains(k),
            "no {k} adapter folder found (saw {kinds:?})"
        );
    }
}

#[test]
fn golden_tiny_llama_adapter_applies_and_resaves_identically() {
    let be = Cpu;
    let dir = adapters_dir().join("tiny_llama_lora");
    println!("checking {}", dir.display());
    let (cfg, tensors) = load_adapter(&dir).unwrap();
    assert_eq!(layout(&tensors), expected_layout("tiny_llama_lora"));
    assert_eq!(cfg.task_type.as_deref(), Some("CAUSAL_LM"));

    let mut model = tiny_llama();
    apply_lora_adapter(&be, &mut model, &cfg, &tensors).unwrap();
    let by_key: HashMap<&str, &Vec<f32>> =
        tensors.iter().map(|(k, _, d)| (k.as_str(), d)).collect();
    assert_eq!(model.layers.len(), 2);
    for (l, block) in model.layers.iter().enumerate() {
        for (p, proj) in block.proj.iter().enumerate() {
            let Some(Adapter::Lora(lora)) = proj.adapter.as_ref() else {
                panic!("{} has no LoRA", proj_path(l, p))
            };
            assert_eq!(lora.r(), 4, "{}", proj_path(l, p));
            assert_eq!(lora.scaling, 2.0, "{}", proj_path(l, p));
            let key = |f: &str| format!("base_model.model.{}.{f}.weight", proj_path(l, p));
            assert_eq!(lora.lora_a.data(), &by_key[key("lora_A").as_str()][..]);
            assert_eq!(lora.lora_b.data(), &by_key[key("lora_B").as_str()][..]);
        }
    }
    assert_eq!(model.trainable_params().len(), 2 * 2 * PROJ_NAMES.len());

    // Save it again: same keys, shapes and values, same config.
    let tmp = TempDir::new("resave");
    let out = tmp.path().join("resaved");
    let resaved_tensors = llama_adapter_tensors(&be, &model).unwrap();
    save_lora_adapter(&out, &cfg, &resaved_tensors).unwrap();
    let (cfg2, tensors2) = load_adapter(&out).unwrap();
    assert_eq!(layout(&tensors2), layout(&tensors));
    for ((k1, _, d1), (k2, _, d2)) in tensors.iter().zip(&tensors2) {
        assert_eq!(k1, k2);
        assert!(
            d1.iter().zip(d2).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{k1}: values differ after the round trip"
        );
    }
    assert_eq!(cfg2.r, cfg.r);
    assert_eq!(cfg2.lora_alpha, cfg.lora_alpha);
    assert_eq!(cfg2.target_modules, cfg.target_modules);
    assert_eq!(cfg2.peft_type, cfg.peft_type);
    assert_eq!(cfg2.task_type, cfg.task_type);
    assert_eq!(cfg2, cfg);
    let text = |d: &Path| fs::read_to_string(d.join("adapter_config.json")).unwrap();
    assert_eq!(
        text(&out),
        text(&dir),
        "adapter_config.json written as PEFT wrote it"
    );
    // PEFT's safetensors metadata.
    let bytes = fs::read(out.join("adapter_model.safetensors")).unwrap();
    let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
    let want = HashMap::from([("format".to_string(), "pt".to_string())]);
    assert_eq!(md.metadata().as_ref(), Some(&want));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensors().iter().all(|(_, v)| v.dtype() == Dtype::F32));
    assert!(leftover_siblings(&out).is_empty());
}

#[test]
fn adapter_config_for_writes_what_peft_writes() {
    // A lorafuse LoRA of the same settings as tiny_llama_lora gives PEFT's adapter_config.json
    // byte for byte: every key, sorted, indent 2, lora_alpha as an integer.
    let golden_text =
        fs::read_to_string(adapters_dir().join("tiny_llama_lora/adapter_config.json")).unwrap();
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        use_rslora: false,
        // Short forms and duplicates are normalized to PEFT's names, sorted.
        target_modules: ["v", "q", "k_proj", "o", "gate", "up", "down", "q_proj"]
            .map(String::from)
            .to_vec(),
    };
    let cfg = adapter_config_for(&lora, None);
    assert_eq!(cfg.scaling().unwrap(), 2.0);
    assert_eq!(cfg.peft_version.as_deref(), Some(peft::PEFT_VERSION));
    assert_eq!(cfg.to_peft_json().unwrap(), golden_text);

    let tmp = TempDir::new("cfg-for");
    let dir = tmp.path().join("a");
    let (_, tensors) = tiny_llama_adapter();
    save_lora_adapter(&dir, &cfg, &tensors).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        golden_text
    );

    // rsLoRA, a base model name with non-ASCII (escaped as Python does), a fractional alpha.
    let lora = LoraConfig {
        r: 16,
        lora_alpha: 2.5,
        use_rslora: true,
        target_modules: vec!["q_proj".into()],
    };
    let cfg = adapter_config_for(&lora, Some("org/modèle".into()));
    let text = cfg.to_peft_json().unwrap();
    assert!(
        text.contains(r#""base_model_name_or_path": "org/mod\u00e8le""#),
        "{text}"
    );
    assert!(text.contains(r#""lora_alpha": 2.5"#));
    assert!(text.contains(r#""use_rslora": true"#));
    let back: AdapterConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(back.base_model_name_or_path.as_deref(), Some("org/modèle"));
    assert_eq!(back.scaling().unwrap(), (2.5f64 / 4.0) as f32);
    let lc = back.to_lora_config().unwrap();
    assert_eq!(lc, lora);
}

#[test]
fn config_keeps_unknown_fields_nulls_and_regex_targets() {
    let raw = json!({
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ".*decoder.*(q|v)_proj",
        "rank_pattern": null,
        "some_future_field": {"nested": [1, 2.5, "x"]},
        "layers_pattern": null
    });
    let cfg = config(raw.clone());
    assert_eq!(
        cfg.target_modules,
        Some(TargetModules::Regex(".*decoder.*(q|v)_proj".into()))
    );
    assert_eq!(cfg.rank_pattern, None);
    assert_eq!(cfg.extra["some_future_field"], raw["some_future_field"]);
    let back = serde_json::to_value(&cfg).unwrap();
    for (k, v) in raw.as_object().unwrap() {
        assert_eq!(&back[k], v, "{k} kept");
    }
    // Base PeftConfig keys are always written, as PEFT does.
    assert_eq!(back["task_type"], Value::Null);
    assert_eq!(back["base_model_name_or_path"], Value::Null);
    // A regex cannot become lorafuse's module list.
    assert_contains(&err_msg(cfg.to_lora_config()), &["target_modules", "regex"]);
    // Missing peft_type is a clear error.
    let e = serde_json::from_value::<AdapterConfig>(json!({"r": 4})).unwrap_err();
    assert!(e.to_string().contains("peft_type"), "{e}");
    let e = serde_json::from_value::<AdapterConfig>(json!({"peft_type": "LORA", "r": "four"}))
        .unwrap_err();
    assert!(e.to_string().contains("`r`"), "{e}");
}

#[test]
fn load_converts_f16_bf16_f64_and_rejects_other_dtypes() {
    let tmp = TempDir::new("dtypes");
    let dir = tmp.path().join("a");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2}"#,
    )
    .unwrap();
    let vals = [0.5f32, -1.25, 3.0, 1.0e-3];
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let f64b: Vec<u8> = vals
        .iter()
        .flat_map(|&v| (v as f64).to_le_bytes())
        .collect();
    let views = vec![
        (
            "h",
            safetensors::tensor::TensorView::new(Dtype::F16, vec![2, 2], &f16).unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(Dtype::BF16, vec![4], &bf16).unwrap(),
        ),
        (
            "d",
            safetensors::tensor::TensorView::new(Dtype::F64, vec![1, 4], &f64b).unwrap(),
        ),
    ];
    let st_path = dir.join("adapter_model.safetensors");
    safetensors::serialize_to_file(views, None, &st_path).unwrap();
    let (_, t) = load_adapter(&dir).unwrap();
    let got: HashMap<&str, (&Vec<usize>, &Vec<f32>)> =
        t.iter().map(|(k, s, d)| (k.as_str(), (s, d))).collect();
    let want16: Vec<f32> = vals
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    let want_bf: Vec<f32> = vals
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(got["h"], (&vec![2, 2], &want16));
    assert_eq!(got["b"], (&vec![4], &want_bf));
    assert_eq!(got["d"], (&vec![1, 4], &vals.to_vec()));

    let i8s = [1u8, 2, 3];
    let views = vec![(
        "weird",
        safetensors::tensor::TensorView::new(Dtype::I8, vec![3], &i8s).unwrap(),
    )];
    safetensors::serialize_to_file(views, None, &st_path).unwrap();
    assert_contains(&err_msg(load_adapter(&dir)), &["weird", "I8"]);
}

// ---- bad input ---------------------------------------------------------------------------------

#[test]
fn load_missing_dir_is_an_error() {
    let p = std::env::temp_dir().join("lorafuse-no-such-adapter-dir-9f3c");
    assert_contains(
        &err_msg(load_adapter(&p)),
        &["lorafuse-no-such-adapter-dir-9f3c"],
    );
}

#[test]
fn load_missing_files_are_errors() {
    let tmp = TempDir::new("missing");
    let dir = tmp.path().join("a");
    copy_folder(&adapters_dir().join("mlp_lora"), &dir);
    fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    let e = load_adapter(&dir);
    assert!(matches!(e, Err(Error::Missing { .. })), "{e:?}");
    assert_contains(&err_msg(e), &["missing", "adapter_model.safetensors"]);

    fs::write(dir.join("adapter_model.bin"), b"pickle").unwrap();
    assert_contains(
        &err_msg(load_adapter(&dir)),
        &["adapter_model.bin", "safetensors"],
    );

    fs::remove_file(dir.join("adapter_config.json")).unwrap();
    assert_contains(
        &err_msg(load_adapter(&dir)),
        &["missing", "adapter_config.json"],
    );
}

#[test]
fn load_truncated_safetensors_is_an_error() {
    let tmp = TempDir::new("trunc");
    let dir = tmp.path().join("a");
    copy_folder(&adapters_dir().join("mlp_lora"), &dir);
    let st = dir.join("adapter_model.safetensors");
    let full = fs::read(&st).unwrap();
    // Cut in the tensor data, in the JSON header, and in the 8-byte size field.
    for cut in [full.len() - 10, 40, 5] {
        fs::write(&st, &full[..cut]).unwrap();
        let e = load_adapter(&dir);
        assert!(matches!(e, Err(Error::Format { .. })), "{e:?}");
        assert_contains(&err_msg(e), &["truncated", "adapter_model.safetensors"]);
    }
    // Garbage header.
    let mut bad = full.clone();
    bad[8] = b'!';
    fs::write(&st, &bad).unwrap();
    assert_contains(
        &err_msg(load_adapter(&dir)),
        &["malformed", "adapter_model.safetensors"],
    );
}

#[test]
fn load_bad_json_is_an_error() {
    let tmp = TempDir::new("badjson");
    let dir = tmp.path().join("a");
    copy_folder(&adapters_dir().join("mlp_lora"), &dir);
    fs::write(
        dir.join("adapter_config.json"),
        "{\"peft_type\": \"LORA\", \"r\": 4,",
    )
    .unwrap();
    let e = load_adapter(&dir);
    assert!(matches!(e, Err(Error::Json { .. })), "{e:?}");
    assert_contains(&err_msg(e), &["JSON", "adapter_config.json"]);
}

/// The tiny Llama adapter with one tensor changed by `edit`.
fn edited(edit: impl FnOnce(&mut Vec<AdapterTensor>)) -> (AdapterConfig, Vec<AdapterTensor>) {
    let (cfg, mut t) = tiny_llama_adapter();
    edit(&mut t);
    (cfg, t)
}

const Q0_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const Q0_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

fn find(t: &mut [AdapterTensor], key: &str) -> usize {
    t.iter().position(|(k, _, _)| k == key).unwrap()
}

/// Applies to a fresh tiny Llama, checks the error and that the model was left untouched.
fn apply_err(cfg: &AdapterConfig, t: &[AdapterTensor]) -> String {
    let mut model = tiny_llama();
    let msg = err_msg(apply_lora_adapter(&Cpu, &mut model, cfg, t));
    assert!(
        model.trainable_params().is_empty(),
        "failed apply changed the model"
    );
    msg
}

#[test]
fn apply_unknown_module_is_an_error() {
    let (cfg, t) = edited(|t| {
        for (k, _, _) in t.iter_mut() {
            *k = k.replace("layers.1.", "layers.5.");
        }
    });
    let msg = apply_err(&cfg, &t);
    assert_contains(&msg, &["layers.5.", "no module", "model.layers.5."]);
    let (cfg, t) = edited(|t| {
        let i = find(t, Q0_A);
        t[i].0 = "base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight".into();
    });
    assert_contains(&apply_err(&cfg, &t), &["qq_proj", "no module"]);
}

#[test]
fn apply_wrong_shape_is_an_error() {
    let (cfg, t) = edited(|t| {
        let i = find(t, Q0_A);
        t[i].1 = vec![4, 31];
        t[i].2.truncate(4 * 31);
    });
    assert_contains(&apply_err(&cfg, &t), &[Q0_A, "[4, 32]", "[4, 31]"]);
    let (cfg, t) = edited(|t| {
        let i = find(t, Q0_B);
        t[i].1 = vec![4, 32];
    });
    assert_contains(&apply_err(&cfg, &t), &[Q0_B, "[32, 4]", "[4, 32]"]);
}

#[test]
fn apply_r_mismatch_is_an_error() {
    let (mut cfg, t) = tiny_llama_adapter();
    cfg.r = Some(8);
    let msg = apply_err(&cfg, &t);
    assert_contains(&msg, &["r = 8", "adapter_config.json", "[4, "]);
}

#[test]
fn apply_half_pair_and_non_lora_keys_are_errors() {
    let (cfg, t) = edited(|t| {
        let i = find(t, Q0_B);
        t.remove(i);
    });
    assert_contains(&apply_err(&cfg, &t), &[Q0_A, "lora_A but no lora_B", Q0_B]);
    let (cfg, t) = edited(|t| {
        let i = find(t, Q0_A);
        t.remove(i);
    });
    assert_contains(&apply_err(&cfg, &t), &[Q0_B, "lora_B but no lora_A"]);
    let (cfg, t) = edited(|t| {
        t.push((
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
            vec![32],
            vec![1.0; 32],
        ));
    });
    assert_contains(
        &apply_err(&cfg, &t),
        &["lora_magnitude_vector", "not a LoRA factor"],
    );
    let (cfg, t) = edited(|t| {
        let i = find(t, Q0_A);
        t[i].2[3] = f32::NAN;
    });
    assert_contains(&apply_err(&cfg, &t), &[Q0_A, "non-finite"]);
    let (cfg, _) = tiny_llama_adapter();
    assert_contains(&apply_err(&cfg, &[]), &["no tensor"]);
}

#[test]
fn apply_unsupported_settings_are_errors() {
    let (base_cfg, t) = tiny_llama_adapter();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("fan_in_fan_out", json!(true), "fan_in_fan_out"),
        ("bias", json!("all"), "bias"),
        ("lora_bias", json!(true), "lora_bias"),
        ("rank_pattern", json!({"q_proj": 8}), "rank_pattern"),
        ("alpha_pattern", json!({"q_proj": 32}), "alpha_pattern"),
        ("layers_to_transform", json!([0]), "layers_to_transform"),
        ("layer_replication", json!([[0, 1]]), "layer_replication"),
        ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
        (
            "init_lora_weights",
            json!("pissa"),
            "rewrites the base weights",
        ),
        ("init_lora_weights", json!("mica"), "not supported yet"),
        // The LoRA tensors lack what the other methods need.
        ("use_dora", json!(true), "no lora_magnitude_vector"),
        (
            "alora_invocation_tokens",
            json!([5, 6]),
            "not supported yet",
        ),
        ("peft_type", json!("LOHA"), "not supported"),
        ("r", json!(0), "at least 1"),
    ];
    for (key, val, want) in cases {
        let mut raw = serde_json::to_value(&base_cfg).unwrap();
        raw[key] = val.clone();
        let cfg = config(raw);
        println!("  {key} = {val}");
        assert_contains(&apply_err(&cfg, &t), &[key, want]);
    }
    for (kind, want) in [("VERA", "VeRA adapter"), ("ADALORA", "AdaLoRA adapter")] {
        let mut raw = serde_json::to_value(&base_cfg).unwrap();
        raw["peft_type"] = json!(kind);
        println!("  peft_type = {kind}");
        let msg = apply_err(&config(raw), &t);
        assert_contains(&msg, &["lora_", "unexpected tensor", want]);
    }
    // Accepted: dropout (no effect in eval) and inits that leave the base alone.
    for (key, val) in [
        ("lora_dropout", json!(0.05)),
        ("init_lora_weights", json!("gaussian")),
        ("init_lora_weights", json!(false)),
    ] {
        let mut raw = serde_json::to_value(&base_cfg).unwrap();
        raw[key] = val;
        let mut model = tiny_llama();
        apply_lora_adapter(&Cpu, &mut model, &config(raw), &t).unwrap();
        assert_eq!(model.trainable_params().len(), t.len());
    }
}

#[test]
fn apply_checks_target_and_exclude_modules() {
    let (mut cfg, t) = tiny_llama_adapter();
    cfg.target_modules = Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
    assert_contains(
        &apply_err(&cfg, &t),
        &[
            "down_proj",
            "is not in target_modules",
            r#"["q_proj","v_proj"]"#,
        ],
    );
    let (mut cfg, t) = tiny_llama_adapter();
    cfg.extra
        .insert("exclude_modules".into(), json!(["down_proj"]));
    assert_contains(&apply_err(&cfg, &t), &["down_proj", "exclude_modules"]);
    // A regex target is kept but not checked (no regex engine): applies.
    let (mut cfg, t) = tiny_llama_adapter();
    cfg.target_modules = Some(TargetModules::Regex(".*_proj".into()));
    let mut model = tiny_llama();
    apply_lora_adapter(&Cpu, &mut model, &cfg, &t).unwrap();
}

#[test]
fn failed_apply_keeps_existing_adapters() {
    let be = Cpu;
    let mut model = tiny_llama();
    model.add_lora(&be, &LoraConfig::default(), 3).unwrap();
    let before: Vec<Vec<f32>> = model
        .trainable_params()
        .iter()
        .map(|(_, t)| t.data().to_vec())
        .collect();
    let (cfg, t) = edited(|t| {
        let i = find(t, Q0_B);
        t.remove(i);
    });
    assert!(apply_lora_adapter(&be, &mut model, &cfg, &t).is_err());
    let after: Vec<Vec<f32>> = model
        .trainable_params()
        .iter()
        .map(|(_, t)| t.data().to_vec())
        .collect();
    assert_eq!(before, after, "a failed apply must not change the model");
}

// ---- atomic saves ------------------------------------------------------------------------------

#[test]
fn save_replaces_an_existing_adapter_completely() {
    let be = Cpu;
    let tmp = TempDir::new("replace");
    let dir = tmp.path().join("nested").join("adapter");
    let (cfg, t) = tiny_llama_adapter();
    save_lora_adapter(&dir, &cfg, &t).unwrap();
    fs::write(dir.join("README.md"), "old model card").unwrap();

    // A different adapter: only q_proj/v_proj, r 2, rsLoRA.
    let lora = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        use_rslora: true,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
    };
    let mut model = tiny_llama();
    model.add_lora(&be, &lora, 11).unwrap();
    let t2 = llama_adapter_tensors(&be, &model).unwrap();
    let cfg2 = adapter_config_for(&lora, Some("tiny".into()));
    save_lora_adapter(&dir, &cfg2, &t2).unwrap();

    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    let (cfg_back, t_back) = load_adapter(&dir).unwrap();
    assert_eq!(cfg_back, cfg2);
    assert_eq!(layout(&t_back), layout(&t2));
    assert_eq!(t_back.len(), 2 * 2 * 2);
    assert!(
        leftover_siblings(&dir).is_empty(),
        "{:?}",
        leftover_siblings(&dir)
    );

    // And it applies back onto a model.
    let mut m2 = tiny_llama();
    apply_lora_adapter(&be, &mut m2, &cfg_back, &t_back).unwrap();
    let Some(Adapter::Lora(l)) = m2.layers[0].proj[0].adapter.as_ref() else {
        panic!("q_proj of layer 0 has no LoRA")
    };
    let s = l.scaling;
    assert_eq!(s, (4.0f64 / 2f64.sqrt()) as f32);
}

#[test]
fn failed_save_leaves_the_existing_adapter_untouched() {
    let tmp = TempDir::new("failsave");
    let dir = tmp.path().join("adapter");
    let (cfg, t) = tiny_llama_adapter();
    save_lora_adapter(&dir, &cfg, &t).unwrap();
    let snapshot = |d: &Path| {
        (
            fs::read(d.join("adapter_config.json")).unwrap(),
            fs::read(d.join("adapter_model.safetensors")).unwrap(),
        )
    };
    let before = snapshot(&dir);

    let mut bad_len = t.clone();
    bad_len[3].2.pop();
    let mut bad_nan = t.clone();
    bad_nan[0].2[0] = f32::INFINITY;
    let mut bad_rank = t.clone();
    let i = find(&mut bad_rank, Q0_A);
    bad_rank[i].1 = vec![2, 64];
    let mut dup = t.clone();
    dup.push(t[0].clone());
    let mut vera = cfg.clone();
    vera.peft_type = "VERA".into();
    let cases: Vec<(AdapterConfig, Vec<AdapterTensor>, Vec<&str>)> = vec![
        (cfg.clone(), bad_len, vec![t[3].0.as_str(), "values"]),
        (cfg.clone(), bad_nan, vec![t[0].0.as_str(), "non-finite"]),
        (cfg.clone(), bad_rank, vec![Q0_A, "r = 4"]),
        (cfg.clone(), dup, vec![t[0].0.as_str(), "twice"]),
        (cfg.clone(), vec![], vec!["no adapter tensor"]),
        (vera, t.clone(), vec!["VERA"]),
    ];
    for (c, tensors, want) in cases {
        let msg = err_msg(save_lora_adapter(&dir, &c, &tensors));
        assert_contains(&msg, &want);
        assert_eq!(
            snapshot(&dir),
            before,
            "existing adapter changed by a failed save"
        );
        assert!(
            leftover_siblings(&dir).is_empty(),
            "{:?}",
            leftover_siblings(&dir)
        );
    }
    assert_eq!(load_adapter(&dir).unwrap().1, t);
}

#[test]
fn save_refuses_to_replace_other_data() {
    let tmp = TempDir::new("refuse");
    let (cfg, t) = tiny_llama_adapter();
    let dir = tmp.path().join("notes");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("notes.txt"), "keep me").unwrap();
    assert_contains(
        &err_msg(save_lora_adapter(&dir, &cfg, &t)),
        &["not a PEFT adapter folder"],
    );
    assert_eq!(
        fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "keep me"
    );
    let file = tmp.path().join("file");
    fs::write(&file, "x").unwrap();
    assert_contains(
        &err_msg(save_lora_adapter(&file, &cfg, &t)),
        &["not a folder"],
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), "x");
    // An empty folder is fine to fill.
    let empty = tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    save_lora_adapter(&empty, &cfg, &t).unwrap();
    assert_eq!(load_adapter(&empty).unwrap().1, t);
    assert!(leftover_siblings(&empty).is_empty());
}
