//! Generation with the KV cache: `attention_cached` against full causal attention, cached
//! greedy decoding against the recompute-everything reference (same tokens), batched prompts
//! against one at a time, adapters included, and the sampler (seeded, temperature, top-p).
//! On a random tiny Llama; the real model's check is in `golden_smollm2.rs`.

mod common;

use lorafuse::adapter::{LoraConfig, MethodKind};
use lorafuse::backend::{Backend, SeqSpan};
use lorafuse::model::LlamaConfig;
use lorafuse::model::generate::{KvCache, Sampling};
use lorafuse::model::llama::{Llama, random_tensors};
use lorafuse::{Cpu, Error, Tensor};

fn cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 41,
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        head_dim: 4,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 128,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 2,
    }
}

fn model() -> Llama<Cpu> {
    let c = cfg();
    Llama::from_tensors(&Cpu, c.clone(), random_tensors(&c, 11)).unwrap()
}

fn vals(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104729) % 211) as f32 / 105.5 - 1.0)
        .collect()
}

fn t(data: Vec<f32>, shape: &[usize]) -> Tensor<Cpu> {
    Cpu.upload(&data, shape).unwrap()
}

/// Every new query of a cached attention equals the same row of full causal attention over
/// the whole sequence, for prefixes of every length (GQA, two sequences of different lengths).
#[test]
fn cached_attention_equals_full_attention() {
    let (hq, hkv, hd) = (6, 2, 4);
    let lens = [7usize, 3];
    let total: usize = lens.iter().sum();
    let q = t(vals(total * hq * hd, 1), &[total, hq * hd]);
    let k = t(vals(total * hkv * hd, 2), &[total, hkv * hd]);
    let v = t(vals(total * hkv * hd, 3), &[total, hkv * hd]);
    let seqs = [SeqSpan { start: 0, len: 7 }, SeqSpan { start: 7, len: 3 }];
    let full = Cpu.attention(&q, &k, &v, &seqs, hq, hkv, 0.5).unwrap().out;
    for new in 1..=3 {
        // The last `new` tokens of each sequence as queries, the whole sequence as context.
        let q_seqs: Vec<SeqSpan> = seqs
            .iter()
            .map(|s| SeqSpan {
                start: s.start + s.len - new,
                len: new,
            })
            .collect();
        let got = Cpu
            .attention_cached(&q, &k, &v, &q_seqs, &seqs, hq, hkv, 0.5)
            .unwrap();
        for qs in &q_seqs {
            for row in qs.start..qs.start + qs.len {
                let w = hq * hd;
                let (a, b) = (
                    &got.data()[row * w..(row + 1) * w],
                    &full.data()[row * w..(row + 1) * w],
                );
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(err <= 1e-6, "new {new} row {row}: {err}");
            }
        }
    }
    // Bad input: more queries than context, mismatched span lists.
    let e = Cpu.attention_cached(
        &q,
        &k,
        &v,
        &seqs,
        &[SeqSpan { start: 0, len: 2 }, seqs[1]],
        hq,
        hkv,
        0.5,
    );
    assert!(
        matches!(e, Err(Error::InvalidArgument { ref name, .. }) if name == "kv_seqs"),
        "{e:?}"
    );
    let e = Cpu.attention_cached(&q, &k, &v, &seqs, &seqs[..1], hq, hkv, 0.5);
    assert!(e.is_err());
}

/// Cached greedy decoding gives the reference's tokens, with and without an adapter.
#[test]
fn cached_greedy_matches_the_recomputing_reference() {
    let mut m = model();
    let prompt: Vec<u32> = vec![1, 5, 9, 3, 7, 11, 4];
    let eos = 40; // never produced by this random model in 12 steps (checked below)
    for adapter in [None, Some(MethodKind::Lora), Some(MethodKind::Dora)] {
        if let Some(kind) = adapter {
            m = model();
            m.add_adapters(&Cpu, kind, &LoraConfig::default(), 5)
                .unwrap();
            for p in m.trainable_params_mut() {
                let v: Vec<f32> = vals(p.len(), 9).iter().map(|x| 0.3 * x).collect();
                p.data_mut().copy_from_slice(&v);
            }
        }
        let want = m.generate_greedy_uncached(&Cpu, &prompt, 12, eos).unwrap();
        let got = m.generate_greedy(&Cpu, &prompt, 12, eos).unwrap();
        assert_eq!(got, want, "adapter {adapter:?}");
        assert_eq!(want.len(), 12);
    }
}

/// Several prompts decode in one batch to the tokens each gets alone; a sequence stops at its
/// eos while the others go on.
#[test]
fn batched_prompts_decode_as_each_alone() {
    let m = model();
    let prompts: Vec<Vec<u32>> = vec![vec![1, 5, 9], vec![3], vec![7, 8, 9, 10, 11, 12]];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| m.generate_greedy(&Cpu, p, 9, 40).unwrap())
        .collect();
    let together = m.generate(&Cpu, &prompts, 9, 40, Sampling::GREEDY).unwrap();
    assert_eq!(together, alone);
    // Stop the second prompt at its third token by declaring that token the eos.
    let eos = alone[1][2];
    let stopped = m
        .generate(&Cpu, &prompts, 9, eos, Sampling::GREEDY)
        .unwrap();
    let first = alone[1].iter().position(|&x| x == eos).unwrap();
    assert_eq!(stopped[1], alone[1][..=first].to_vec());
    for s in [0, 2] {
        let cut = alone[s].iter().position(|&x| x == eos).map_or(9, |i| i + 1);
        assert_eq!(stopped[s], alone[s][..cut].to_vec(), "prompt {s}");
    }
}

/// The sampler: the same seed gives the same tokens, another seed other tokens; a tiny top_p
/// keeps only the most likely token (greedy); bad rules are errors.
#[test]
fn sampling_is_seeded_and_top_p_narrows_it() {
    let m = model();
    let prompt = vec![vec![1u32, 5, 9, 3]];
    let hot = |seed| Sampling {
        temperature: 1.5,
        top_p: 1.0,
        seed,
    };
    let a = m.generate(&Cpu, &prompt, 20, 40, hot(1)).unwrap();
    let b = m.generate(&Cpu, &prompt, 20, 40, hot(1)).unwrap();
    let c = m.generate(&Cpu, &prompt, 20, 40, hot(2)).unwrap();
    assert_eq!(a, b);
    assert_ne!(
        a, c,
        "a random model at T 1.5 over 20 tokens: another seed differs"
    );
    let narrow = Sampling {
        temperature: 1.0,
        top_p: 1e-6,
        seed: 3,
    };
    assert_eq!(
        m.generate(&Cpu, &prompt, 20, 40, narrow).unwrap(),
        m.generate(&Cpu, &prompt, 20, 40, Sampling::GREEDY).unwrap()
    );
    for bad in [
        Sampling {
            temperature: -1.0,
            ..Sampling::GREEDY
        },
        Sampling {
            top_p: 0.0,
            ..Sampling::GREEDY
        },
        Sampling {
            top_p: 1.5,
            ..Sampling::GREEDY
        },
    ] {
        assert!(m.generate(&Cpu, &prompt, 3, 40, bad).is_err(), "{bad:?}");
    }
}

/// The cache refuses to grow past its capacity and names the sequence.
#[test]
fn cache_capacity_is_enforced() {
    let m = model();
    let mut cache = KvCache::new(&Cpu, &m, 2, 4).unwrap();
    let first: [&[u32]; 2] = [&[1, 2, 3], &[4]];
    m.forward_cached(&Cpu, &mut cache, &first).unwrap();
    assert_eq!(cache.lens(), &[3, 1]);
    let too_many: [&[u32]; 2] = [&[5, 6], &[]];
    let e = m.forward_cached(&Cpu, &mut cache, &too_many).unwrap_err();
    assert!(e.to_string().contains("sequence 0"), "{e}");
    assert!(
        m.generate(&Cpu, &[vec![]], 3, 40, Sampling::GREEDY)
            .is_err()
    );
}
