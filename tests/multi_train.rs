//! Several LoRA adapters trained in one pass (`train_multi`) against each trained alone
//! (`recipe::run`, the path of `lorafuse finetune`) with the same recipe and data, on the
//! golden tiny Llama: three adapters of different r, alpha, rsLoRA, target modules, learning
//! rates, batch sizes, step counts, init and data-order seeds, each on its own data. Every
//! step's loss, the eval losses and every trained weight agree within 1e-5, on the CPU and on
//! wgpu when present. And what cannot train together is refused by name.

mod common;
#[path = "common/gpu.rs"]
mod gpu;
#[path = "common/seeds.rs"]
mod seeds;

use lorafuse::Cpu;
use lorafuse::adapter::LoraConfig;
use lorafuse::backend::Backend;
use lorafuse::train::data::Example;
use lorafuse::train::multi::{MultiSpec, train_multi};
use lorafuse::train::recipe::{self, Method, Recipe};
use lorafuse::train::trainer::TrainConfig;
use rand::{RngExt, SeedableRng};
use seeds::base_model;

/// `n` examples of random ids in 3..96, prompt (label -100) then answer, from `seed`.
fn data(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(5..14);
            let prompt = rng.random_range(1..len - 1);
            let input_ids: Vec<u32> = (0..len).map(|_| rng.random_range(3..96)).collect();
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < prompt { -100 } else { t as i32 })
                .collect();
            Example { input_ids, labels }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn recipe(
    r: usize,
    alpha: f32,
    rslora: bool,
    targets: &[&str],
    lr: f32,
    batch_size: usize,
    steps: usize,
    seed: u64,
) -> Recipe {
    Recipe {
        method: Method::Lora,
        lora: LoraConfig {
            r,
            lora_alpha: alpha,
            use_rslora: rslora,
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
        },
        vera: Default::default(),
        adalora: Default::default(),
        full: Default::default(),
        additive: Default::default(),
        compute_dtype: Default::default(),
        train: TrainConfig {
            steps,
            batch_size,
            lr,
            warmup_steps: 2,
            seed: seed + 100,
            eval_batch_size: 5,
            ..TrainConfig::default()
        },
        seed,
        nf4: Default::default(),
    }
}

fn specs() -> Vec<MultiSpec> {
    let all = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    // Random data does not generalize: the eval split is part of the training set, so that
    // training visibly lowers it.
    let mk = |name: &str, recipe: Recipe, seed: u64| {
        let train = data(23, seed);
        MultiSpec {
            name: name.into(),
            recipe,
            eval: train[..7].to_vec(),
            train,
        }
    };
    vec![
        mk(
            "a",
            recipe(4, 8.0, false, &["q_proj", "v_proj"], 1e-2, 4, 7, 1),
            10,
        ),
        mk("b", recipe(8, 8.0, true, &all, 5e-3, 3, 9, 2), 20),
        mk(
            "c",
            recipe(2, 16.0, false, &["o_proj", "down_proj"], 2e-2, 5, 4, 3),
            30,
        ),
    ]
}

fn close(what: &str, got: f64, want: f64) {
    assert!((got - want).abs() <= 1e-5, "{what}: {got} vs alone {want}");
}

fn check<B: Backend>(be: &B) {
    let specs = specs();
    let mut model = base_model(be);
    let mut seen = vec![0usize; specs.len()];
    let results = train_multi(be, &mut model, &specs, |name, m| {
        let k = ["a", "b", "c"].iter().position(|n| *n == name).unwrap();
        assert_eq!(m.step, seen[k], "{name}: steps in order");
        seen[k] += 1;
    })
    .unwrap();
    assert_eq!(seen, [7, 9, 4], "each adapter trains its own step count");
    assert!(model.multi_lora.is_none() && model.n_trainable() == 0);
    for (spec, got) in specs.iter().zip(results) {
        assert_eq!(got.name, spec.name);
        let mut alone = base_model(be);
        let want = recipe::run(
            be,
            &mut alone,
            &spec.recipe,
            &spec.train,
            &spec.eval,
            |_| {},
        )
        .unwrap();
        let name = &spec.name;
        assert_eq!(got.metrics.steps.len(), want.steps.len(), "{name}: steps");
        for (g, w) in got.metrics.steps.iter().zip(&want.steps) {
            close(&format!("{name} step {} loss", w.step), g.loss, w.loss);
            assert_eq!(
                (g.tokens, g.targets),
                (w.tokens, w.targets),
                "{name}: batch"
            );
            assert_eq!(g.lr, w.lr, "{name}: schedule");
        }
        close(
            &format!("{name} eval before"),
            got.metrics.eval_loss_before.unwrap(),
            want.eval_loss_before.unwrap(),
        );
        close(
            &format!("{name} eval after"),
            got.metrics.eval_loss_after.unwrap(),
            want.eval_loss_after.unwrap(),
        );
        assert!(
            want.eval_loss_after.unwrap() < want.eval_loss_before.unwrap(),
            "{name}: training lowers the eval loss"
        );
        assert_eq!(got.metrics.trainable_params, want.trainable_params);
        // Every weight: put the adapter on a base and compare the tensors by name.
        let mut ours = base_model(be);
        ours.put_adapters(got.adapter).unwrap();
        let (a, b) = (ours.trainable_params(), alone.trainable_params());
        assert_eq!(a.len(), b.len(), "{name}: tensor count");
        let mut worst = 0.0f32;
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            let (va, vb) = (be.download(ta).unwrap(), be.download(tb).unwrap());
            for (x, y) in va.iter().zip(&vb) {
                worst = worst.max((x - y).abs());
            }
        }
        println!("{name}: max |weight - alone| = {worst:e}");
        assert!(
            worst <= 1e-5,
            "{name}: weights differ from alone by {worst}"
        );
    }
}

#[test]
fn adapters_trained_together_equal_each_trained_alone_on_cpu() {
    check(&Cpu);
}

#[cfg(feature = "wgpu")]
#[test]
fn adapters_trained_together_equal_each_trained_alone_on_wgpu() {
    let Some(be) = gpu::wgpu("multi_train") else {
        return;
    };
    check(&be);
}

#[cfg(feature = "cuda")]
#[test]
fn adapters_trained_together_equal_each_trained_alone_on_cuda() {
    let Some(be) = gpu::cuda("multi_train") else {
        return;
    };
    check(&be);
}

#[test]
fn what_cannot_train_together_is_refused_by_name() {
    let be = Cpu;
    let mut model = base_model(&be);
    let mut s = specs();
    s[1].recipe.method = Method::Dora;
    let err = train_multi(&be, &mut model, &s, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("`b`") && err.contains("dora"), "{err}");
    let mut s = specs();
    s[2].name = "a".into();
    let err = train_multi(&be, &mut model, &s, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("twice"), "{err}");
    let mut s = specs();
    s[0].train.clear();
    let err = train_multi(&be, &mut model, &s, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("`a`") && err.contains("empty"), "{err}");
    assert!(train_multi(&be, &mut model, &[], |_, _| {}).is_err());
    assert!(
        model.multi_lora.is_none(),
        "a refused run leaves no adapter on the model"
    );
}
