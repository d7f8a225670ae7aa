//! PEFT adapter folders for every method (LoRA, rsLoRA, DoRA, VeRA, AdaLoRA): PEFT's golden
//! folders (`tests/golden/adapters/mlp_*`, README sections 2, 3, 4, 7) load, apply and
//! reproduce PEFT's output, and save back to the same keys, shapes, values and config; a tiny
//! Llama with each method round-trips through a saved folder.

mod common;

use lorafuse::adapter::{Adapter, BaseWeight, Linear, LoraConfig, MethodKind};
use lorafuse::io::peft::{
    AdaLoraMask, AdapterConfig, AdapterTensor, MethodOptions, VERA_A_KEY, VERA_B_KEY,
    adapter_config_for_method, adapter_layers_from_adapter, apply_adapter, llama_adapter_export,
    llama_adapter_tensors, load_adapter, save_adapter,
};
use lorafuse::model::LlamaConfig;
use lorafuse::model::llama::{Llama, PROJ_NAMES, PackedBatch, random_tensors};
use lorafuse::torch_cpu::TorchCapability;
use lorafuse::torch_cpu::rng::TorchGenerator;
use lorafuse::{Cpu, Tensor};
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

const ATOL: f32 = 1e-5;

fn adapters_dir() -> PathBuf {
    let dir = common::golden_dir().join("adapters");
    assert!(
        dir.is_dir(),
        "{} not found (set LORAFUSE_GOLDEN_DIR)",
        dir.display()
    );
    dir
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "lorafuse-golden-adapters-{}-{}-{tag}",
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

/// Tensors of a safetensors file read with the safetensors crate directly.
fn read_st(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let d = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, (v.shape().to_vec(), d))
        })
        .collect()
}

fn tensor(m: &HashMap<String, (Vec<usize>, Vec<f32>)>, name: &str) -> Tensor<Cpu> {
    let (s, d) = &m[name];
    Cpu.from_vec(d.clone(), s).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
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

/// erf in f64 (Taylor series below 2.5, continued fraction of erfc above).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let v = if z < 2.5 {
        let (mut term, mut sum) = (z, z);
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
        let mut f = z;
        for k in (1..=80).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        1.0 - (-z * z).exp() / std::f64::consts::PI.sqrt() / f
    };
    v.copysign(x)
}

/// torch's exact GELU.
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// The config's JSON object as PEFT wrote it / as lorafuse writes it.
fn config_json(dir: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
}

// ---- golden MLP folders -----------------------------------------------------------------------

#[test]
fn golden_mlp_adapters_reproduce_peft_output_and_save_back() {
    let be = Cpu;
    let mut seen = Vec::new();
    for name in [
        "mlp_lora",
        "mlp_rslora",
        "mlp_dora",
        "mlp_vera",
        "mlp_adalora",
    ] {
        let dir = adapters_dir().join(name);
        println!("checking {}", dir.display());
        let (cfg, tensors) = load_adapter(&dir).unwrap();
        let base = read_st(&dir.join("base_model.safetensors"));
        let io = read_st(&dir.join("io.safetensors"));
        let linear = |n: &str| Linear {
            weight: BaseWeight::Dense(tensor(&base, &format!("{n}.weight"))),
            bias: Some(tensor(&base, &format!("{n}.bias"))),
        };
        let (fc1, fc2) = (linear("fc1"), linear("fc2"));
        let modules = [("fc1".to_string(), &fc1), ("fc2".to_string(), &fc2)];
        let built = adapter_layers_from_adapter(&be, &cfg, &tensors, &modules).unwrap();
        assert_eq!(built.layers.len(), 2);
        let want_kind = match name {
            "mlp_dora" => MethodKind::Dora,
            "mlp_vera" => MethodKind::Vera,
            "mlp_adalora" => MethodKind::AdaLora,
            _ => MethodKind::Lora,
        };
        assert_eq!(built.method, want_kind);
        let sh = built.vera_shared.as_ref();
        assert_eq!(sh.is_some(), want_kind == MethodKind::Vera);
        if let Adapter::AdaLora(l) = &built.layers[1].1 {
            assert_eq!((l.r(), l.ranknum), (3, 6.0), "fc2 keeps 3 of init_r 6");
            assert_eq!(l.scaling, 8.0, "AdaLoRA scaling is lora_alpha");
        }

        // fc1 -> GELU(erf) -> fc2, each with its adapter (eval mode).
        let x = tensor(&io, "x");
        let (h, _) = built.layers[0].1.forward(&be, &fc1, sh, &x).unwrap();
        let shape = h.shape().to_vec();
        let h = Cpu
            .from_vec(h.data().iter().map(|&v| gelu(v)).collect(), &shape)
            .unwrap();
        let (y, _) = built.layers[1].1.forward(&be, &fc2, sh, &h).unwrap();
        let d = max_diff(y.data(), &io["y"].1);
        println!("    y = peft_model(x): max |diff| {d:.2e}");
        assert!(d <= ATOL, "{name}: y differs by {d}");

        // Save what was built (as a model would: its parameters under PEFT's keys) and compare
        // with PEFT's folder: same keys, shapes, values and config.
        let mut out: Vec<AdapterTensor> = Vec::new();
        if let Some(sh) = sh {
            out.push((
                VERA_A_KEY.into(),
                sh.vera_a.shape().to_vec(),
                sh.vera_a.data().to_vec(),
            ));
            out.push((
                VERA_B_KEY.into(),
                sh.vera_b.shape().to_vec(),
                sh.vera_b.data().to_vec(),
            ));
        }
        for (path, a) in &built.layers {
            for (suffix, t) in a.params() {
                out.push((
                    format!("base_model.model.{path}.{suffix}"),
                    t.shape().to_vec(),
                    t.data().to_vec(),
                ));
            }
        }
        let tmp = TempDir::new(name);
        let saved = tmp.path().join("adapter");
        save_adapter(&saved, &cfg, &out).unwrap();
        let (cfg2, t2) = load_adapter(&saved).unwrap();
        assert_eq!(
            t2, tensors,
            "{name}: keys, shapes and values as PEFT saved them"
        );
        assert_eq!(cfg2, cfg);
        assert_eq!(
            config_json(&saved),
            config_json(&dir),
            "{name}: config as PEFT wrote it"
        );
        seen.push(name);
    }
    assert_eq!(seen.len(), 5);
}

// ---- tiny Llama round trips ---------------------------------------------------------------------

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        max_position_embeddings: 128,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 0,
    }
}

fn tiny_llama() -> Llama<Cpu> {
    let cfg = tiny_config();
    Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 11)).unwrap()
}

fn batch() -> PackedBatch {
    let ids: Vec<Vec<u32>> = (0..3)
        .map(|s| {
            (0..12)
                .map(|i| ((i * 7 + s * 13 + 3) % 64) as u32)
                .collect()
        })
        .collect();
    let labels: Vec<Vec<i32>> = ids
        .iter()
        .map(|v| v.iter().skip(1).map(|&t| t as i32).chain([-100]).collect())
        .collect();
    PackedBatch::from_examples(ids.iter().zip(&labels).map(|(i, l)| (&i[..], &l[..]))).unwrap()
}

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        use_rslora: false,
        target_modules: PROJ_NAMES.iter().map(|s| s.to_string()).collect(),
    }
}

fn options() -> MethodOptions {
    let mut o = MethodOptions::default();
    o.adalora.total_step = Some(100);
    o.adalora.tinit = 10;
    o.adalora.tfinal = 10;
    o
}

/// Overwrites every trainable tensor with seeded values of a visible size, so that each method's
/// adapter changes the model (PEFT's inits would leave it equal to the base).
fn perturb(model: &mut Llama<Cpu>, seed: u32) {
    let mut k = seed;
    for t in model.trainable_params_mut() {
        let shape = t.shape().to_vec();
        let data: Vec<f32> = t
            .data()
            .iter()
            .map(|&v| {
                k = k.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let u = (k >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                if v.abs() > 0.5 {
                    v * (1.0 + 0.3 * u)
                } else {
                    0.3 * u
                }
            })
            .collect();
        *t = Cpu.from_vec(data, &shape).unwrap();
    }
}

/// Trains nothing: builds a model with `method`, saves it, loads it into a fresh base, and
/// checks outputs and tensors. Returns the saved folder's tensors.
fn round_trip(method: MethodKind, mask_some: bool) -> Vec<AdapterTensor> {
    let be = Cpu;
    let lora = lora_cfg();
    let mut model = tiny_llama();
    let (base_loss, n) = model.loss(&be, &batch()).unwrap();
    model.add_adapters(&be, method, &lora, 42).unwrap();
    perturb(&mut model, 7);
    if mask_some {
        // Mask ranks as PEFT's RankAllocator does: E = 0 exactly.
        for (l, block) in model.layers.iter_mut().enumerate() {
            for (p, proj) in block.proj.iter_mut().enumerate() {
                if let Some(Adapter::AdaLora(a)) = &mut proj.adapter {
                    let keep: Vec<bool> = (0..4).map(|i| (i + l + p) % 3 != 0).collect();
                    a.apply_rank_mask(&be, &keep).unwrap();
                }
            }
        }
    }
    let (loss, _) = model.loss(&be, &batch()).unwrap();
    println!(
        "{method:?}: base loss {:.5}, adapted {:.5}",
        base_loss / n as f64,
        loss / n as f64
    );
    assert!(
        (loss - base_loss).abs() > 1e-3,
        "the adapter changes the model"
    );

    let mask = if mask_some {
        AdaLoraMask::ZeroE
    } else {
        AdaLoraMask::KeepAll
    };
    let (tensors, pattern) = llama_adapter_export(&be, &model, mask).unwrap();
    let mut opts = options();
    if !pattern.is_empty() {
        opts.adalora.rank_pattern = Some(pattern.clone());
    }
    let cfg = adapter_config_for_method(method, &lora, &opts).unwrap();
    let tmp = TempDir::new(&format!("{method:?}"));
    let dir = tmp.path().join("adapter");
    save_adapter(&dir, &cfg, &tensors).unwrap();

    let (cfg2, loaded) = load_adapter(&dir).unwrap();
    assert_eq!(cfg2, cfg, "config read back as written");
    assert_eq!(loaded.len(), tensors.len());
    let mut sorted = tensors.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(loaded, sorted, "tensors read back as written");

    let mut fresh = tiny_llama();
    apply_adapter(&be, &mut fresh, &cfg2, &loaded).unwrap();
    let (loss2, _) = fresh.loss(&be, &batch()).unwrap();
    println!(
        "    reloaded: {:.7} vs {:.7}",
        loss2 / n as f64,
        loss / n as f64
    );
    assert!(
        (loss2 - loss).abs() <= 1e-5 * loss.abs().max(1.0),
        "{loss2} vs {loss}"
    );
    if !mask_some {
        assert_eq!(loss2, loss, "identical tensors give the identical loss");
        assert_eq!(
            llama_adapter_tensors(&be, &fresh).unwrap(),
            llama_adapter_tensors(&be, &model).unwrap(),
            "identical tensors after reload"
        );
    } else {
        assert_eq!(
            llama_adapter_tensors(&be, &fresh).unwrap(),
            tensors,
            "the reloaded model holds the kept ranks"
        );
        for (_, a) in fresh
            .trainable_params()
            .iter()
            .filter(|(n, _)| n.ends_with("lora_E"))
        {
            assert!(a.dim(0) < 4 || a.data().iter().all(|&e| e != 0.0));
        }
        for b in &fresh.layers {
            for p in &b.proj {
                if let Some(Adapter::AdaLora(a)) = &p.adapter {
                    assert_eq!(a.ranknum, 4.0, "ranknum stays init_r after reload");
                }
            }
        }
    }
    tensors
}

#[test]
fn llama_lora_round_trip() {
    let t = round_trip(MethodKind::Lora, false);
    assert!(
        t.iter()
            .all(|(k, _, _)| k.ends_with("lora_A.weight") || k.ends_with("lora_B.weight"))
    );
}

#[test]
fn llama_dora_round_trip() {
    let t = round_trip(MethodKind::Dora, false);
    let m = t
        .iter()
        .find(|(k, _, _)| {
            k == "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
        })
        .expect("DoRA magnitude saved without .weight");
    assert_eq!(m.1, vec![32]);
}

#[test]
fn llama_vera_round_trip() {
    let t = round_trip(MethodKind::Vera, false);
    assert_eq!(t[0].0, VERA_A_KEY);
    assert_eq!(t[0].1, vec![4, 64], "vera_A [r, max_in]");
    assert_eq!(t[1].0, VERA_B_KEY);
    assert_eq!(t[1].1, vec![64, 4], "vera_B [max_out, r]");
    assert_eq!(
        t.iter()
            .filter(|(k, _, _)| k.starts_with("base_model.vera_"))
            .count(),
        2
    );
    let cfg = adapter_config_for_method(MethodKind::Vera, &lora_cfg(), &options()).unwrap();
    let j: Value = serde_json::from_str(&cfg.to_peft_json().unwrap()).unwrap();
    let golden = config_json(&adapters_dir().join("mlp_vera"));
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&j),
        keys(&golden),
        "VeRA config keys as PEFT writes them"
    );
    assert_eq!(j["save_projection"], Value::Bool(true));
}

#[test]
fn llama_adalora_round_trip_full_rank() {
    let t = round_trip(MethodKind::AdaLora, false);
    assert!(
        t.iter()
            .any(|(k, s, _)| k.ends_with(".lora_E") && s == &vec![4, 1])
    );
    let cfg = adapter_config_for_method(MethodKind::AdaLora, &lora_cfg(), &options()).unwrap();
    let j: Value = serde_json::from_str(&cfg.to_peft_json().unwrap()).unwrap();
    let golden = config_json(&adapters_dir().join("mlp_adalora"));
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&j),
        keys(&golden),
        "AdaLoRA config keys as PEFT writes them"
    );
    assert_eq!(j["init_r"], 4);
    assert_eq!(j["rank_pattern"], Value::Null);
}

#[test]
fn llama_adalora_masked_ranks_are_dropped() {
    let t = round_trip(MethodKind::AdaLora, true);
    let shape = |k: &str| t.iter().find(|(n, _, _)| n == k).unwrap().1.clone();
    // layer 0, q_proj (p 0): ranks with (i + 0 + 0) % 3 == 0 masked: 0 and 3 -> 2 kept.
    let q0 = "base_model.model.model.layers.0.self_attn.q_proj";
    assert_eq!(shape(&format!("{q0}.lora_A")), vec![2, 32]);
    assert_eq!(shape(&format!("{q0}.lora_B")), vec![32, 2]);
    assert_eq!(shape(&format!("{q0}.lora_E")), vec![2, 1]);
    // layer 0, k_proj (p 1): rank 2 masked -> 3 kept.
    assert_eq!(
        shape("base_model.model.model.layers.0.self_attn.k_proj.lora_E"),
        vec![3, 1]
    );
}

#[test]
fn adalora_rank_pattern_is_written_as_peft_does() {
    let be = Cpu;
    let mut model = tiny_llama();
    model
        .add_adapters(&be, MethodKind::AdaLora, &lora_cfg(), 1)
        .unwrap();
    perturb(&mut model, 3);
    let mut pat = BTreeMap::new();
    pat.insert(
        "model.layers.1.mlp.down_proj".to_string(),
        vec![true, false, false, true],
    );
    let (t, p) = llama_adapter_export(&be, &model, AdaLoraMask::Pattern(&pat)).unwrap();
    assert_eq!(p, pat);
    let e = t
        .iter()
        .find(|(k, _, _)| k == "base_model.model.model.layers.1.mlp.down_proj.lora_E")
        .unwrap();
    assert_eq!(e.1, vec![2, 1]);
    let mut o = options();
    o.adalora.rank_pattern = Some(p);
    let cfg = adapter_config_for_method(MethodKind::AdaLora, &lora_cfg(), &o).unwrap();
    let j: Value = serde_json::from_str(&cfg.to_peft_json().unwrap()).unwrap();
    assert_eq!(
        j["rank_pattern"],
        serde_json::json!({"model.layers.1.mlp.down_proj.lora_E": [true, false, false, true]})
    );
    // A pattern naming nothing, or of the wrong length, is an error.
    let mut bad = BTreeMap::new();
    bad.insert("model.layers.9.mlp.down_proj".to_string(), vec![true; 4]);
    assert_contains(
        &err_msg(llama_adapter_export(
            &be,
            &model,
            AdaLoraMask::Pattern(&bad),
        )),
        &["model.layers.9.mlp.down_proj"],
    );
    let mut o = options();
    o.adalora.total_step = None;
    assert_contains(
        &err_msg(adapter_config_for_method(
            MethodKind::AdaLora,
            &lora_cfg(),
            &o,
        )),
        &["total_step"],
    );
}

// ---- bad input ----------------------------------------------------------------------------------

fn golden(name: &str) -> (AdapterConfig, Vec<AdapterTensor>) {
    load_adapter(&adapters_dir().join(name)).unwrap()
}

fn mlp_err(cfg: &AdapterConfig, t: &[AdapterTensor]) -> String {
    let w = |o: usize, i: usize| Linear {
        weight: BaseWeight::Dense(Cpu.from_vec(vec![0.01; o * i], &[o, i]).unwrap()),
        bias: None,
    };
    let (fc1, fc2) = (w(48, 32), w(16, 48));
    let modules = [("fc1".to_string(), &fc1), ("fc2".to_string(), &fc2)];
    err_msg(adapter_layers_from_adapter(&Cpu, cfg, t, &modules).map(|l| l.layers.len()))
}

fn without(t: &[AdapterTensor], key: &str) -> Vec<AdapterTensor> {
    let out: Vec<AdapterTensor> = t.iter().filter(|x| x.0 != key).cloned().collect();
    assert_eq!(out.len() + 1, t.len(), "{key} present");
    out
}

/// PEFT's saved projections are `torch.Generator().manual_seed(projection_prng_key)` draws;
/// lorafuse draws the same ones, so an adapter saved with `save_projection: false` loads with
/// PEFT's projections.
#[test]
fn vera_projections_are_regenerated_from_the_key_as_peft_does() {
    let (cfg, t) = golden("mlp_vera");
    let get = |key: &str| t.iter().find(|x| x.0 == key).unwrap().clone();
    let (a, b) = (get(VERA_A_KEY), get(VERA_B_KEY));
    let (key, saved) = cfg.vera_projection();
    assert!(saved);
    // The golden machine's torch ran AVX kernels (fused multiply-add in the sampler).
    let mut g = TorchGenerator::manual_seed(key);
    let ours_a = g.peft_kaiming_uniform(a.1[0], a.1[1], TorchCapability::Avx2);
    let ours_b = g.peft_kaiming_uniform(b.1[0], b.1[1], TorchCapability::Avx2);
    assert_eq!(bits(&ours_a), bits(&a.2), "vera_A");
    assert_eq!(bits(&ours_b), bits(&b.2), "vera_B");
    // Without the projections in the file, the load regenerates them from the key.
    let mut no_proj = cfg.clone();
    no_proj
        .extra
        .insert("save_projection".into(), Value::Bool(false));
    let t2 = without(&without(&t, VERA_A_KEY), VERA_B_KEY);
    let w = |o: usize, i: usize| Linear {
        weight: BaseWeight::Dense(Cpu.from_vec(vec![0.01; o * i], &[o, i]).unwrap()),
        bias: None,
    };
    let (fc1, fc2) = (w(48, 32), w(16, 48));
    let modules = [("fc1".to_string(), &fc1), ("fc2".to_string(), &fc2)];
    let layers = adapter_layers_from_adapter(&Cpu, &no_proj, &t2, &modules).unwrap();
    let sh = layers.vera_shared.expect("regenerated projections");
    let (ra, rb) = (sh.vera_a.data(), sh.vera_b.data());
    assert_eq!((sh.vera_a.shape(), sh.vera_b.shape()), (&a.1[..], &b.1[..]));
    if TorchCapability::detected().fuses_multiply_add() {
        assert_eq!((bits(ra), bits(rb)), (bits(&a.2), bits(&b.2)));
    } else {
        // torch's default kernels round the sampler's last step twice: within an ulp.
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-6);
        assert!(close(ra, &a.2) && close(rb, &b.2));
    }
    assert_eq!(layers.layers.len(), 2);
    // A key the file was not made with gives other projections: the key is what is used.
    let mut other = no_proj.clone();
    other
        .extra
        .insert("projection_prng_key".into(), Value::from(1u64));
    let sh1 = adapter_layers_from_adapter(&Cpu, &other, &t2, &modules)
        .unwrap()
        .vera_shared
        .unwrap();
    assert_ne!(bits(sh1.vera_a.data()), bits(&a.2));
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn vera_without_projections_is_an_error() {
    let (cfg, t) = golden("mlp_vera");
    assert_contains(
        &mlp_err(&cfg, &without(&t, VERA_A_KEY)),
        &[VERA_A_KEY, "save_projection"],
    );
    assert_contains(&mlp_err(&cfg, &without(&t, VERA_B_KEY)), &[VERA_B_KEY]);
    let t2 = without(&without(&t, VERA_A_KEY), VERA_B_KEY);
    // Saving one without projections is refused too.
    let tmp = TempDir::new("vera-save");
    assert_contains(
        &err_msg(save_adapter(&tmp.path().join("a"), &cfg, &t2)),
        &[VERA_A_KEY],
    );
    // lambda_d of the wrong rank.
    let mut bad = t.clone();
    let i = bad
        .iter()
        .position(|x| x.0 == "base_model.model.fc1.vera_lambda_d")
        .unwrap();
    bad[i].1 = vec![7];
    bad[i].2.pop();
    assert_contains(
        &mlp_err(&cfg, &bad),
        &["base_model.model.fc1.vera_lambda_d", "r = 8"],
    );
}

#[test]
fn adalora_bad_e_shape_is_an_error() {
    let (cfg, t) = golden("mlp_adalora");
    let key = "base_model.model.fc1.lora_E";
    let mut bad = t.clone();
    let i = bad.iter().position(|x| x.0 == key).unwrap();
    bad[i].1 = vec![1, 4];
    assert_contains(&mlp_err(&cfg, &bad), &[key, "[4, 1]", "rank_pattern"]);
    let tmp = TempDir::new("adalora-save");
    assert_contains(
        &err_msg(save_adapter(&tmp.path().join("a"), &cfg, &bad)),
        &[key],
    );
    // Without the rank_pattern, the saved [4, 32] A disagrees with init_r 6.
    let mut no_pat = cfg.clone();
    no_pat.rank_pattern = None;
    assert_contains(&mlp_err(&no_pat, &t), &["init_r = 6"]);
    // A missing E.
    assert_contains(&mlp_err(&cfg, &without(&t, key)), &["fc1", "no lora_E"]);
    // LoRA keys in an AdaLoRA adapter.
    let (_, lora) = golden("mlp_lora");
    assert_contains(&mlp_err(&cfg, &lora), &["lora_A.weight", "AdaLoRA"]);
}

#[test]
fn dora_missing_magnitude_is_an_error() {
    let (cfg, t) = golden("mlp_dora");
    let key = "base_model.model.fc2.lora_magnitude_vector";
    assert_contains(
        &mlp_err(&cfg, &without(&t, key)),
        &["fc2", "no lora_magnitude_vector", key],
    );
    let mut bad = t.clone();
    let i = bad.iter().position(|x| x.0 == key).unwrap();
    bad[i].1 = vec![4, 4];
    assert_contains(&mlp_err(&cfg, &bad), &[key, "[16]"]);
}
