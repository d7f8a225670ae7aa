//! Criterion benches of preference training's step against SFT's on the same tokens: a Llama
//! with SmolLM2-135M's shapes (d 576, 9/3 heads of 64, MLP 1536, vocabulary 49152) but 4 layers,
//! LoRA r 8 on all seven projections, 8 preference pairs (prompt 32 tokens, completions 24):
//! 16 rows, 896 tokens. `sft` is the forward + backward of the cross-entropy on the 16 rows'
//! completion tokens; `dpo` adds the reference forward (the adapter taken off) and runs DPO's
//! forward + backward; `reward` is the reward model's step (score head on the last tokens).
//! The bar: dpo <= 2.3x sft.

mod common;

use criterion::{Criterion, criterion_group, criterion_main};
use lorafuse::Cpu;
use lorafuse::adapter::LoraConfig;
use lorafuse::backend::Backend;
use lorafuse::model::LlamaConfig;
use lorafuse::model::llama::{Llama, random_tensors};
use lorafuse::train::data::Example;
use lorafuse::train::dpo::{DpoConfig, Reference, dpo_grads, pack_pairs};
use lorafuse::train::preference::PreferencePair;
use lorafuse::train::reward::{RewardConfig, reward_grads};
use std::hint::black_box;

fn example(seed: u32, prompt: usize, completion: usize, vocab: u32) -> Example {
    let ids: Vec<u32> = (0..(prompt + completion) as u32)
        .map(|i| (i * 7919 + seed * 104729) % vocab)
        .collect();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i > prompt { t as i32 } else { -100 })
        .collect();
    Example {
        input_ids: ids,
        labels,
    }
}

fn benches(c: &mut Criterion) {
    let be = Cpu;
    let cfg = LlamaConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 4,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rope_theta: 100000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 2048,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 2,
    };
    let vocab = cfg.vocab_size as u32;
    let tensors = random_tensors(&cfg, 7);
    let mut model = Llama::from_tensors(&be, cfg, tensors).unwrap();
    model.add_lora(&be, &LoraConfig::default(), 1).unwrap();
    let pairs: Vec<PreferencePair> = (0..8)
        .map(|i| PreferencePair {
            chosen: example(2 * i, 32, 24, vocab),
            rejected: example(2 * i + 1, 32, 24, vocab),
            reference: None,
            margin: None,
        })
        .collect();
    let refs: Vec<&PreferencePair> = pairs.iter().collect();
    let (batch, counts) = pack_pairs(&refs).unwrap();
    let dpo = DpoConfig::default();
    let mut g = c.benchmark_group(format!("align/{}", be.name()));
    g.bench_function("sft step, 16 rows x 56 tokens", |b| {
        b.iter(|| black_box(model.loss_and_grads(&be, &batch).unwrap()))
    });
    let mut reference = Reference::base_of(&model);
    g.bench_function("dpo step (reference forward included)", |b| {
        b.iter(|| {
            let r = reference
                .logps(&be, &mut model, &batch, &counts, false)
                .unwrap();
            black_box(dpo_grads(&be, &model, &batch, &counts, &r, &dpo).unwrap())
        })
    });
    model.attach_score_head(&be, 0.02, 3).unwrap();
    let margins = [None; 8];
    g.bench_function("reward step", |b| {
        b.iter(|| {
            black_box(
                reward_grads(&be, &model, &batch, &margins, &RewardConfig::default()).unwrap(),
            )
        })
    });
    g.finish();
}

criterion_group! {
    name = group;
    config = common::config();
    targets = benches
}
criterion_main!(group);
