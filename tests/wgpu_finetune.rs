//! Every fine-tuning method end to end on the wgpu backend (lavapipe in CI): a few steps on a
//! tiny random Llama land within 1% of the CPU reference's eval loss for the same seed and
//! recipe, and the step losses track the CPU's; all in f32, and LoRA and DoRA again with the
//! frozen bases stored as f16. AdaLoRA's device-resident rank allocator ends on the CPU's rank
//! pattern, and a training step reads back exactly one thing, its loss, on mask steps too. Skips loudly without an adapter; `LORAFUSE_REQUIRE=wgpu` fails
//! instead (`LORAFUSE_REQUIRE=wgpu-f16` also fails the f16 run on an adapter without
//! SHADER_F16).
#![cfg(feature = "wgpu")]

mod common;
#[path = "common/gpu.rs"]
mod gpu;

use lorafuse::adapter::LoraConfig;
use lorafuse::model::LlamaConfig;
use lorafuse::model::llama::{Llama, Nf4Spec, random_tensors};
use lorafuse::train::data::Example;
use lorafuse::train::recipe::{self, AdaLoraHook, AdaLoraSettings, Method, Recipe};
use lorafuse::train::trainer::{Metrics, TrainConfig, train_with};
use lorafuse::{Backend, Cpu, WgpuOptions};

fn tiny_cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 128,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 2,
    }
}

/// Prompt of 3 + i % 4 tokens, then the prompt shifted by one as the answer (the only
/// targets); lengths differ so packed batches hold sequences of several lengths.
fn examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let p: Vec<u32> = (0..3 + i % 4)
                .map(|j| ((i * 7 + j * 13) % 80) as u32 + 3)
                .collect();
            let mut ids = p.clone();
            ids.extend(p.iter().map(|t| t + 1));
            ids.push(2);
            let mut labels = vec![-100i32; p.len()];
            labels.extend(ids[p.len()..].iter().map(|&t| t as i32));
            Example {
                input_ids: ids,
                labels,
            }
        })
        .collect()
}

fn recipe(method: Method) -> Recipe {
    Recipe {
        method,
        lora: LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            ..LoraConfig::default()
        },
        vera: Default::default(),
        adalora: AdaLoraSettings {
            init_r: 6,
            target_r: 3,
            tinit: 2,
            tfinal: 2,
            delta_t: 1,
            ..AdaLoraSettings::default()
        },
        full: Default::default(),
        train: TrainConfig {
            steps: 8,
            batch_size: 4,
            lr: if method == Method::Full { 1e-3 } else { 1e-2 },
            warmup_steps: 1,
            eval_batch_size: 8,
            ..TrainConfig::default()
        },
        seed: 3,
        nf4: Nf4Spec::default(),
        additive: Default::default(),
        compute_dtype: Default::default(),
    }
}

fn run<B: Backend>(be: &B, method: Method) -> Metrics {
    run_recipe(be, &recipe(method))
}

fn run_recipe<B: Backend>(be: &B, rec: &Recipe) -> Metrics {
    let cfg = tiny_cfg();
    let mut model = Llama::from_tensors(be, cfg.clone(), random_tensors(&cfg, 11)).unwrap();
    let data = examples(40);
    let (tr, ev) = data.split_at(32);
    recipe::run(be, &mut model, rec, tr, ev, |_| {}).unwrap()
}

#[test]
fn every_method_matches_the_cpu_reference() {
    // f32 storage throughout, so the eval loss before training agrees to f32 rounding.
    let opts = WgpuOptions {
        f16: false,
        ..WgpuOptions::default()
    };
    let Some(be) = gpu::wgpu_with("every_method_matches_the_cpu_reference", &opts) else {
        return;
    };
    for method in [
        Method::Lora,
        Method::Qlora,
        Method::Dora,
        Method::Qdora,
        Method::Vera,
        Method::AdaLora,
        Method::Full,
    ] {
        let cpu = run(&Cpu, method);
        let gpu = run(&be, method);
        let (cb, gb) = (cpu.eval_loss_before.unwrap(), gpu.eval_loss_before.unwrap());
        let (ca, ga) = (cpu.eval_loss_after.unwrap(), gpu.eval_loss_after.unwrap());
        eprintln!(
            "{:<8} eval before cpu {cb:.5} wgpu {gb:.5}; after cpu {ca:.5} wgpu {ga:.5}",
            method.name()
        );
        assert!(
            (cb - gb).abs() <= 1e-4 * cb,
            "{}: eval loss before",
            method.name()
        );
        assert!(
            (ca - ga).abs() <= 0.01 * ca,
            "{}: eval loss after",
            method.name()
        );
        assert!(
            ca < cb,
            "{}: training must lower the eval loss",
            method.name()
        );
        for (c, g) in cpu.steps.iter().zip(&gpu.steps) {
            assert!(
                (c.loss - g.loss).abs() <= 0.01 * c.loss,
                "{} step {}: loss cpu {} wgpu {}",
                method.name(),
                c.step,
                c.loss,
                g.loss
            );
        }
        assert_eq!(cpu.trainable_params, gpu.trainable_params);
    }
}

#[test]
fn lora_and_dora_over_f16_frozen_bases_match_the_cpu_reference() {
    let Some(be) = gpu::wgpu_f16(
        "lora_and_dora_over_f16_frozen_bases_match_the_cpu_reference",
        None,
        true,
    ) else {
        return;
    };
    for method in [Method::Lora, Method::Dora] {
        let cpu = run(&Cpu, method);
        let gpu = run(&be, method);
        let (cb, gb) = (cpu.eval_loss_before.unwrap(), gpu.eval_loss_before.unwrap());
        let (ca, ga) = (cpu.eval_loss_after.unwrap(), gpu.eval_loss_after.unwrap());
        eprintln!(
            "{:<8} f16 bases: eval before cpu {cb:.5} wgpu {gb:.5}; after cpu {ca:.5} wgpu {ga:.5}",
            method.name()
        );
        // The projections are stored as f16 (half the bytes), the rest of the model in f32.
        assert_eq!(2 * gpu.base_weight_bytes, cpu.base_weight_bytes);
        // f16 rounding of the bases moves the untrained loss by ~1e-5 relative here.
        assert!(
            (cb - gb).abs() <= 1e-3 * cb,
            "{}: eval loss before",
            method.name()
        );
        assert!(
            (ca - ga).abs() <= 0.01 * ca,
            "{}: eval loss after",
            method.name()
        );
        assert!(
            ga < gb,
            "{}: training must lower the eval loss",
            method.name()
        );
        for (c, g) in cpu.steps.iter().zip(&gpu.steps) {
            assert!(
                (c.loss - g.loss).abs() <= 0.01 * c.loss,
                "{} step {}: loss cpu {} wgpu {}",
                method.name(),
                c.step,
                c.loss,
                g.loss
            );
        }
    }
}

/// An AdaLoRA recipe over 12 steps that masks every other budgeting step: warm-up steps 1-2,
/// budgeting 3-7 (masks at 4 and 6), the final mask at 8, the frozen pattern for 9-12.
fn adalora_recipe() -> Recipe {
    let mut r = recipe(Method::AdaLora);
    r.adalora = AdaLoraSettings {
        init_r: 6,
        target_r: 3,
        tinit: 2,
        tfinal: 4,
        delta_t: 2,
        ..AdaLoraSettings::default()
    };
    r.train.steps = 12;
    r
}

#[test]
fn adalora_on_the_device_ends_on_the_cpu_rank_pattern() {
    let opts = WgpuOptions {
        f16: false,
        ..WgpuOptions::default()
    };
    let Some(be) = gpu::wgpu_with("adalora_on_the_device_ends_on_the_cpu_rank_pattern", &opts)
    else {
        return;
    };
    let rec = adalora_recipe();
    let cpu = run_recipe(&Cpu, &rec);
    let gpu = run_recipe(&be, &rec);
    let (cp, gp) = (
        cpu.adalora_rank_pattern.as_ref().unwrap(),
        gpu.adalora_rank_pattern.as_ref().unwrap(),
    );
    let kept = |p: &std::collections::BTreeMap<String, Vec<bool>>| -> usize {
        p.values().map(|v| v.iter().filter(|&&k| k).count()).sum()
    };
    eprintln!(
        "adalora: {} of {} ranks kept; eval after cpu {:.5} wgpu {:.5}",
        kept(cp),
        cp.values().map(Vec::len).sum::<usize>(),
        cpu.eval_loss_after.unwrap(),
        gpu.eval_loss_after.unwrap()
    );
    assert_eq!(gp, cp, "rank pattern");
    assert!(
        kept(cp) <= 3 * cp.len(),
        "the final budget is target_r per layer"
    );
    let (ca, ga) = (cpu.eval_loss_after.unwrap(), gpu.eval_loss_after.unwrap());
    assert!(
        (ca - ga).abs() <= 0.01 * ca,
        "eval loss after: cpu {ca} wgpu {ga}"
    );
    for (c, g) in cpu.steps.iter().zip(&gpu.steps) {
        assert!(
            (c.loss - g.loss).abs() <= 0.01 * c.loss,
            "step {}: loss cpu {} wgpu {}",
            c.step,
            c.loss,
            g.loss
        );
    }
}

#[test]
fn an_adalora_step_reads_back_only_its_loss() {
    let Some(be) = gpu::wgpu("an_adalora_step_reads_back_only_its_loss") else {
        return;
    };
    let cfg = tiny_cfg();
    let data = examples(32);
    let rec = adalora_recipe();
    let mut model = Llama::from_tensors(&be, cfg.clone(), random_tensors(&cfg, 11)).unwrap();
    recipe::prepare(&be, &mut model, &rec).unwrap();
    let mut hook = AdaLoraHook::new(&be, &model, &rec.adalora, rec.train.steps as u64).unwrap();
    let start = be.readbacks();
    let mut at_step_end = Vec::new();
    // No eval set: nothing but the steps runs inside train_with.
    train_with(
        &be,
        &mut model,
        &data,
        &[],
        &rec.train,
        |_| at_step_end.push(be.readbacks()),
        &mut hook,
    )
    .unwrap();
    let per_step: Vec<u64> = std::iter::once(start)
        .chain(at_step_end.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect();
    eprintln!("readbacks per step: {per_step:?}");
    assert_eq!(per_step.len(), rec.train.steps);
    // Warm-up, budgeting with and without a mask, the final mask, the frozen pattern: one each.
    assert!(
        per_step.iter().all(|&n| n == 1),
        "readbacks per step {per_step:?}: the loss (with the regularizer) is the only one"
    );
    // The rank pattern is read back when asked for, once.
    let before = be.readbacks();
    assert!(hook.allocator().rank_pattern(&be).unwrap().is_some());
    assert_eq!(be.readbacks(), before + 1);
}
