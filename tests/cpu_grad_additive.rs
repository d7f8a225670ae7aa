//! The whole-model backward of the additive and selective methods (IA3, BEFT, LN tuning,
//! prompt tuning, P-tuning, prefix tuning with and without projection, Houlsby, Pfeiffer,
//! AdapterFusion) on the CPU reference against central finite differences of the loss, on a
//! small random Llama (GQA, two layers) and a batch of two sequences. Sampled coordinates of
//! every trainable tensor are perturbed by ±eps.

use lorafuse::Cpu;
use lorafuse::adapter::{
    AdapterFusion, BnAdapter, Bottleneck, BottleneckConfig, BottleneckKind, FuseLayer,
    PromptMethod, SoftPrompt,
};
use lorafuse::backend::Activation;
use lorafuse::model::LlamaConfig;
use lorafuse::model::llama::{Llama, PackedBatch, random_tensors};
use rand::{RngExt, SeedableRng};

fn cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 40,
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 6,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 64,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 0,
    }
}

fn model() -> Llama<Cpu> {
    let c = cfg();
    Llama::from_tensors(&Cpu, c.clone(), random_tensors(&c, 3)).unwrap()
}

fn batch() -> PackedBatch {
    let a: Vec<u32> = vec![5, 9, 13, 2, 7, 21, 3];
    let la: Vec<i32> = vec![-100, -100, 13, 2, 7, 21, 3];
    let b: Vec<u32> = vec![11, 4, 30, 8, 1];
    let lb: Vec<i32> = vec![-100, 4, 30, 8, 1];
    PackedBatch::from_examples([(&a[..], &la[..]), (&b[..], &lb[..])]).unwrap()
}

/// Adds `scale * U(-1, 1)` to every trainable value, so that no parameter sits at a no-op init.
fn perturb(m: &mut Llama<Cpu>, scale: f32, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for t in m.trainable_params_mut() {
        for v in t.data_mut() {
            *v += scale * rng.random_range(-1.0f32..1.0);
        }
    }
}

fn mean_loss(m: &Llama<Cpu>, b: &PackedBatch) -> f64 {
    let (s, n) = m.loss(&Cpu, b).unwrap();
    s / n as f64
}

/// Central differences on `per_tensor` sampled entries of every trainable tensor.
fn check_fd(mut m: Llama<Cpu>, what: &str) {
    let b = batch();
    let out = m.loss_and_grads(&Cpu, &b).unwrap();
    let names: Vec<String> = m.trainable_params().into_iter().map(|(n, _)| n).collect();
    assert!(!names.is_empty(), "{what}: nothing trainable");
    let grads: Vec<Vec<f32>> = out.grads.iter().map(|g| g.data().to_vec()).collect();
    let eps = 2e-3f32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut checked = 0;
    for (ti, name) in names.iter().enumerate() {
        let n = grads[ti].len();
        for _ in 0..4 {
            let i = rng.random_range(0..n);
            let orig = m.trainable_params()[ti].1.data()[i];
            m.trainable_params_mut()[ti].data_mut()[i] = orig + eps;
            let up = mean_loss(&m, &b);
            m.trainable_params_mut()[ti].data_mut()[i] = orig - eps;
            let down = mean_loss(&m, &b);
            m.trainable_params_mut()[ti].data_mut()[i] = orig;
            let fd = (up - down) / (2.0 * eps as f64);
            let an = grads[ti][i] as f64;
            let tol = 2e-2 * an.abs().max(fd.abs()) + 2e-4;
            assert!(
                (fd - an).abs() <= tol,
                "{what}: {name}[{i}]: analytic {an}, finite difference {fd}"
            );
            checked += 1;
        }
    }
    println!(
        "{what}: {checked} coordinates of {} tensors agree",
        names.len()
    );
}

fn targets(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn ia3_gradients_match_finite_differences() {
    let mut m = model();
    m.add_ia3(
        &Cpu,
        &targets(&["k_proj", "v_proj", "down_proj"]),
        &targets(&["down_proj"]),
    )
    .unwrap();
    perturb(&mut m, 0.3, 1);
    check_fd(m, "ia3");
}

#[test]
fn beft_gradients_match_finite_differences() {
    let mut m = model();
    m.add_beft(&Cpu, &targets(&["q_proj", "v_proj", "down_proj"]))
        .unwrap();
    perturb(&mut m, 0.1, 2);
    check_fd(m, "beft");
}

#[test]
fn ln_tuning_gradients_match_finite_differences() {
    let mut m = model();
    m.add_ln_tuning(
        &Cpu,
        &targets(&["input_layernorm", "post_attention_layernorm", "norm"]),
    )
    .unwrap();
    perturb(&mut m, 0.1, 3);
    check_fd(m, "ln_tuning");
}

fn with_prompt(method: PromptMethod, hidden: Option<usize>) -> Llama<Cpu> {
    let mut m = model();
    let c = cfg();
    let kv = c.num_key_value_heads * c.head_dim;
    let (td, out) = match method {
        PromptMethod::PrefixTuning => (kv, 2 * c.num_hidden_layers * kv),
        _ => (c.hidden_size, c.hidden_size),
    };
    m.soft_prompt = Some(SoftPrompt::init(&Cpu, method, 3, td, out, hidden, None, 5).unwrap());
    m
}

#[test]
fn prompt_tuning_gradients_match_finite_differences() {
    check_fd(
        with_prompt(PromptMethod::PromptTuning, None),
        "prompt_tuning",
    );
}

#[test]
fn p_tuning_gradients_match_finite_differences() {
    check_fd(with_prompt(PromptMethod::PTuning, Some(16)), "p_tuning");
}

#[test]
fn prefix_tuning_gradients_match_finite_differences() {
    check_fd(
        with_prompt(PromptMethod::PrefixTuning, None),
        "prefix_tuning",
    );
    check_fd(
        with_prompt(PromptMethod::PrefixTuning, Some(16)),
        "prefix_tuning with projection",
    );
}

fn bottleneck(kind: BottleneckKind) -> Llama<Cpu> {
    let mut m = model();
    let config = BottleneckConfig {
        kind,
        name: "bn".into(),
        reduction_factor: 4.0,
        non_linearity: kind.default_activation(),
    };
    m.bottleneck = Some(Bottleneck::init(&Cpu, config, 2, 24, 9).unwrap());
    perturb(&mut m, 0.3, 4);
    m
}

#[test]
fn houlsby_gradients_match_finite_differences() {
    check_fd(bottleneck(BottleneckKind::Houlsby), "houlsby");
}

#[test]
fn pfeiffer_gradients_match_finite_differences() {
    check_fd(bottleneck(BottleneckKind::Pfeiffer), "pfeiffer");
}

#[test]
fn adapter_fusion_gradients_match_finite_differences() {
    let mut m = model();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let mut noisy = |a: BnAdapter<Cpu>| -> BnAdapter<Cpu> {
        let mut a = a;
        for t in a.params_mut() {
            for v in t.data_mut() {
                *v += 0.3 * rng.random_range(-1.0f32..1.0);
            }
        }
        a
    };
    let layers = (0..2)
        .map(|l| {
            let ads = vec![
                noisy(BnAdapter::init(&Cpu, 24, 6, 100 + l).unwrap()),
                noisy(BnAdapter::init(&Cpu, 24, 6, 200 + l).unwrap()),
            ];
            FuseLayer::init(&Cpu, ads, 24, 300 + l).unwrap()
        })
        .collect();
    let conf = |name: &str, act| BottleneckConfig {
        kind: BottleneckKind::Pfeiffer,
        name: name.into(),
        reduction_factor: 4.0,
        non_linearity: act,
    };
    m.fusion = Some(AdapterFusion {
        adapters: vec![conf("a", Activation::Relu), conf("b", Activation::Silu)],
        layers,
        reg_weight: 0.01,
    });
    perturb(&mut m, 0.2, 6);
    check_fd(m, "adapter_fusion");
}
