//! Gradual unfreezing (Howard & Ruder 2018) for full fine-tuning on a tiny random Llama:
//! `TrainConfig::unfreeze_every = Some(every)` trains the top layer first and one more layer,
//! downwards, every `every` steps; the embeddings (tied LM head) join once every layer is
//! trainable, unless `freeze_embeddings`. Checked by comparing every weight before and after `k`
//! steps, for each k.
//!
//! Step `s` (0-based) trains the top `min(L, 1 + s / every)` layers, so after `k` steps exactly
//! the top `min(L, 1 + (k - 1) / every)` layers have changed, and the embeddings have changed
//! iff some step had all layers trainable (`1 + (k - 1) / every >= L`). The final norm is
//! trained from the first step.

use lorafuse::Cpu;
use lorafuse::adapter::{BaseWeight, LoraConfig};
use lorafuse::model::LlamaConfig;
use lorafuse::model::llama::{FullFinetune, Llama, random_tensors};
use lorafuse::train::data::Example;
use lorafuse::train::trainer::{TrainConfig, train};

const LAYERS: usize = 4;

fn tiny_cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: LAYERS,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 64,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 2,
    }
}

/// A prompt of 3 tokens and an answer repeating it shifted by one; only the answer is a target.
fn examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let p = [
                (i * 7 % 50) as u32 + 3,
                (i * 13 % 50) as u32 + 3,
                (i * 5 % 50) as u32 + 3,
            ];
            let mut ids = p.to_vec();
            ids.extend(p.iter().map(|t| t + 1));
            ids.push(2);
            let mut labels = vec![-100i32; 3];
            labels.extend(ids[3..].iter().map(|&t| t as i32));
            Example {
                input_ids: ids,
                labels,
            }
        })
        .collect()
}

fn model(freeze_embeddings: bool) -> Llama<Cpu> {
    let cfg = tiny_cfg();
    let mut m = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 3)).unwrap();
    m.full_finetune = Some(FullFinetune {
        freeze_embeddings,
        trainable_from: 0,
    });
    m
}

fn tcfg(steps: usize, every: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 4,
        lr: 1e-3,
        // No warmup: the first step's learning rate is the peak, so every step moves what it
        // trains.
        warmup_steps: 0,
        unfreeze_every: Some(every),
        ..TrainConfig::default()
    }
}

/// Every tensor of layer `l` (its two norms and seven projection weights), as plain data.
fn layer_data(m: &Llama<Cpu>, l: usize) -> Vec<Vec<f32>> {
    let b = &m.layers[l];
    let mut out = vec![
        b.input_layernorm.data().to_vec(),
        b.post_attention_layernorm.data().to_vec(),
    ];
    for p in &b.proj {
        match &p.base.weight {
            BaseWeight::Dense(w) => out.push(w.data().to_vec()),
            BaseWeight::Nf4(_) | BaseWeight::Bf16(_) => {
                panic!("full fine-tuning runs over dense weights")
            }
        }
    }
    out
}

/// Which layers changed (every one of its tensors) and which stayed bit for bit; panics on a
/// layer where only some tensors changed.
fn changed_layers(before: &Llama<Cpu>, after: &Llama<Cpu>) -> Vec<bool> {
    (0..LAYERS)
        .map(|l| {
            let (b, a) = (layer_data(before, l), layer_data(after, l));
            let diff: Vec<bool> = b.iter().zip(&a).map(|(x, y)| x != y).collect();
            assert!(
                diff.iter().all(|&d| d) || diff.iter().all(|&d| !d),
                "layer {l}: only some tensors changed: {diff:?}"
            );
            diff[0]
        })
        .collect()
}

/// Runs `k = 1..=max_k` steps from the same start and checks which tensors moved.
fn check_schedule(every: usize, freeze_embeddings: bool, max_k: usize) {
    let data = examples(32);
    let start = model(freeze_embeddings);
    let mut embeddings_changed_at = None;
    for k in 1..=max_k {
        let mut m = start.clone();
        let metrics = train(&Cpu, &mut m, &data, &[], &tcfg(k, every), |_| {}).unwrap();
        assert_eq!(metrics.steps.len(), k);
        let top = LAYERS.min(1 + (k - 1) / every);
        let want: Vec<bool> = (0..LAYERS).map(|l| l >= LAYERS - top).collect();
        let got = changed_layers(&start, &m);
        assert_eq!(
            got, want,
            "every {every}, after {k} steps: changed layers (bottom to top)"
        );
        assert_ne!(
            m.norm.data(),
            start.norm.data(),
            "the final norm trains from the first step"
        );
        let emb_changed = m.embed_tokens.data() != start.embed_tokens.data();
        let emb_want = !freeze_embeddings && 1 + (k - 1) / every >= LAYERS;
        assert_eq!(
            emb_changed, emb_want,
            "every {every}, freeze_embeddings {freeze_embeddings}, after {k} steps: embeddings"
        );
        if emb_changed && embeddings_changed_at.is_none() {
            embeddings_changed_at = Some(k);
        }
        println!("every {every}, k {k}: changed layers {got:?}, embeddings {emb_changed}");
    }
    if freeze_embeddings {
        assert_eq!(embeddings_changed_at, None);
    } else {
        // The first step with every layer trainable is step (L - 1) * every.
        assert_eq!(embeddings_changed_at, Some((LAYERS - 1) * every + 1));
    }
}

#[test]
fn unfreezes_one_layer_from_the_top_every_n_steps_then_the_embeddings() {
    check_schedule(2, false, 2 * LAYERS + 1);
}

#[test]
fn unfreezing_every_step_reaches_the_embeddings_after_all_layers() {
    check_schedule(1, false, LAYERS + 1);
}

#[test]
fn freeze_embeddings_keeps_them_fixed_even_when_every_layer_is_unfrozen() {
    check_schedule(2, true, 2 * LAYERS + 1);
}

#[test]
fn without_unfreezing_full_finetuning_trains_every_layer_and_the_embeddings_at_once() {
    let data = examples(32);
    let start = model(false);
    let mut m = start.clone();
    let cfg = TrainConfig {
        unfreeze_every: None,
        ..tcfg(1, 1)
    };
    train(&Cpu, &mut m, &data, &[], &cfg, |_| {}).unwrap();
    assert_eq!(changed_layers(&start, &m), vec![true; LAYERS]);
    assert_ne!(m.embed_tokens.data(), start.embed_tokens.data());
}

#[test]
fn unfreeze_every_without_full_finetuning_is_an_error_naming_it() {
    let data = examples(8);
    let cfg = tiny_cfg();
    let mut m = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 3)).unwrap();
    let lora = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        ..LoraConfig::default()
    };
    m.add_lora(&Cpu, &lora, 1).unwrap();
    let before = m.clone();
    let err = train(&Cpu, &mut m, &data, &[], &tcfg(3, 1), |_| {})
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(err.contains("unfreeze_every"), "{err}");
    assert!(err.contains("full fine-tuning"), "{err}");
    // Nothing trained.
    for l in 0..LAYERS {
        assert_eq!(layer_data(&before, l), layer_data(&m, l));
    }
    assert!(m.full_finetune.is_none());
}
