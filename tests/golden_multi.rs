//! Many adapters in one batch on the tiny transformers Llama of `golden/seeds/` against PEFT's
//! mixed batch (`multi_lora/`: adapters `a` r 4, `b` r 8 with rsLoRA, `c` r 2, rows `a, b,
//! base, c`, logits in eval mode): every row of a KV-cached prefill and of token-by-token
//! decoding (one row per sequence, adapters interleaved), on the CPU reference and on every GPU
//! backend present; mixed generation equals each prompt generated alone with its adapter; and
//! the parts that cannot share a batch are refused by name. Tolerance (seeds/README.md): logits
//! 1e-4 absolute.

mod common;
#[path = "common/gpu.rs"]
mod gpu;
#[path = "common/seeds.rs"]
mod seeds;

use lorafuse::Cpu;
use lorafuse::adapter::{LoraConfig, MethodKind};
use lorafuse::backend::Backend;
use lorafuse::io::peft::{apply_adapter, load_adapter};
use lorafuse::model::generate::{KvCache, Sampling};
use lorafuse::model::inject::AdapterSet;
use lorafuse::model::llama::Llama;
use lorafuse::model::multi::{Mixed, MultiAdapters};
use seeds::{Io, base_model, case_dir, read_io};

const ATOL: f32 = 1e-4;

/// Named adapter sets.
type Sets<B> = Vec<(String, AdapterSet<B>)>;

/// The base model with no adapter, and the three adapter sets of the case, named.
fn load<B: Backend>(be: &B) -> (Llama<B>, Sets<B>, Io) {
    let dir = case_dir("multi_lora");
    let io = read_io(&dir.join("io.safetensors"));
    let mut model = base_model(be);
    let mut sets = Vec::new();
    for name in ["a", "b", "c"] {
        let (cfg, tensors) = load_adapter(&dir.join(name)).unwrap();
        apply_adapter(be, &mut model, &cfg, &tensors).unwrap();
        sets.push((name.to_string(), model.take_adapters()));
    }
    (model, sets, io)
}

/// Each row's tokens (up to its mask) and its adapter index.
fn rows(io: &Io) -> (Vec<Vec<u32>>, Vec<i32>) {
    let (shape, ids) = io.get("input_ids");
    let (_, mask) = io.get("attention_mask");
    let (_, idx) = io.get("adapter_index");
    let (n, t) = (shape[0], shape[1]);
    let toks = (0..n)
        .map(|r| {
            (0..t)
                .filter(|&j| mask[r * t + j] > 0.5)
                .map(|j| ids[r * t + j] as u32)
                .collect()
        })
        .collect();
    (toks, idx.iter().map(|&i| i as i32).collect())
}

/// Golden logits of row r at position j.
fn golden(io: &Io, r: usize, j: usize) -> &[f32] {
    let (shape, l) = io.get("logits");
    let (t, v) = (shape[1], shape[2]);
    &l[(r * t + j) * v..(r * t + j + 1) * v]
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    assert!(e <= ATOL, "{what}: max |logit - PEFT| = {e} > {ATOL}");
}

fn check_mixed_batch<B: Backend>(be: &B) {
    let (model, sets, io) = load(be);
    let multi = MultiAdapters::new(be, &model, &sets).unwrap();
    assert_eq!(multi.names(), ["a", "b", "c"]);
    let (toks, idx) = rows(&io);
    assert_eq!(idx, [0, 1, -1, 2], "the case's row layout");
    let n = toks.len();
    let longest = toks.iter().map(Vec::len).max().unwrap();

    // Prefill: every sequence's whole prompt in one batch, logits at each last token.
    let mut cache = KvCache::new(be, &model, n, longest).unwrap();
    let new: Vec<&[u32]> = toks.iter().map(|t| &t[..]).collect();
    let out = be
        .download(
            &model
                .forward_cached_multi(
                    be,
                    &mut cache,
                    &new,
                    Mixed {
                        adapters: &multi,
                        adapter_of_seq: &idx,
                    },
                )
                .unwrap(),
        )
        .unwrap();
    let v = out.len() / n;
    for (r, t) in toks.iter().enumerate() {
        close(
            &format!("prefill row {r} (adapter {})", idx[r]),
            &out[r * v..(r + 1) * v],
            golden(&io, r, t.len() - 1),
        );
    }

    // Decode: one token per sequence per step, so the adapters interleave row by row.
    let mut cache = KvCache::new(be, &model, n, longest).unwrap();
    for j in 0..longest {
        let new: Vec<&[u32]> = toks
            .iter()
            .map(|t| if j < t.len() { &t[j..j + 1] } else { &[][..] })
            .collect();
        let live: Vec<usize> = (0..n).filter(|&r| j < toks[r].len()).collect();
        let out = be
            .download(
                &model
                    .forward_cached_multi(
                        be,
                        &mut cache,
                        &new,
                        Mixed {
                            adapters: &multi,
                            adapter_of_seq: &idx,
                        },
                    )
                    .unwrap(),
            )
            .unwrap();
        for (k, &r) in live.iter().enumerate() {
            close(
                &format!("decode row {r} position {j}"),
                &out[k * v..(k + 1) * v],
                golden(&io, r, j),
            );
        }
    }

    // Mixed generation = each prompt alone on the model with its own adapter.
    let mixed = model
        .generate_multi(
            be,
            &toks,
            Mixed {
                adapters: &multi,
                adapter_of_seq: &idx,
            },
            6,
            u32::MAX,
            Sampling::GREEDY,
        )
        .unwrap();
    let mut solo = model.clone();
    for (r, t) in toks.iter().enumerate() {
        let set = if idx[r] < 0 {
            AdapterSet::none(solo.layers.len())
        } else {
            sets[idx[r] as usize].1.clone()
        };
        solo.put_adapters(set).unwrap();
        let alone = solo.generate_greedy(be, t, 6, u32::MAX).unwrap();
        assert_eq!(mixed[r], alone, "row {r}: mixed generation vs alone");
        solo.take_adapters();
    }
}

#[test]
fn mixed_batch_matches_peft_on_cpu() {
    check_mixed_batch(&Cpu);
}

#[cfg(feature = "wgpu")]
#[test]
fn mixed_batch_matches_peft_on_wgpu() {
    let Some(be) = gpu::wgpu("golden_multi") else {
        return;
    };
    check_mixed_batch(&be);
}

#[cfg(feature = "cuda")]
#[test]
fn mixed_batch_matches_peft_on_cuda() {
    let Some(be) = gpu::cuda("golden_multi") else {
        return;
    };
    check_mixed_batch(&be);
}

#[test]
fn what_cannot_share_a_batch_is_refused_by_name() {
    let be = Cpu;
    let (mut model, mut sets, io) = load(&be);
    let (toks, idx) = rows(&io);
    // A DoRA adapter: its column scale rescales the base product.
    let cfg = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: vec!["q_proj".into()],
        ..LoraConfig::default()
    };
    model.add_adapters(&be, MethodKind::Dora, &cfg, 1).unwrap();
    let dora = model.take_adapters();
    let err = MultiAdapters::new(&be, &model, &[("d".into(), dora)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`d`") && err.contains("Dora"), "{err}");
    // IA3: no low-rank term.
    model
        .add_ia3(&be, &["k_proj".into()], &[])
        .unwrap_or_else(|e| panic!("ia3: {e}"));
    let ia3 = model.take_adapters();
    let err = MultiAdapters::new(&be, &model, &[("i".into(), ia3)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`i`") && err.contains("Ia3"), "{err}");
    // A repeated name, no adapter at all.
    let twice = vec![sets[0].clone(), sets[0].clone()];
    let err = MultiAdapters::new(&be, &model, &twice)
        .unwrap_err()
        .to_string();
    assert!(err.contains("twice"), "{err}");
    assert!(MultiAdapters::<Cpu>::new(&be, &model, &[]).is_err());
    // Indices out of range, a count that is not one per sequence, a model with its own adapter.
    let multi = MultiAdapters::new(&be, &model, &sets).unwrap();
    let mut cache = KvCache::new(&be, &model, toks.len(), 16).unwrap();
    let new: Vec<&[u32]> = toks.iter().map(|t| &t[..]).collect();
    let err = model
        .forward_cached_multi(
            &be,
            &mut cache,
            &new,
            Mixed {
                adapters: &multi,
                adapter_of_seq: &[0, 3, -1, 2],
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("sequence 1") && err.contains("-1..3"), "{err}");
    let err = model
        .forward_cached_multi(
            &be,
            &mut cache,
            &new,
            Mixed {
                adapters: &multi,
                adapter_of_seq: &idx[..3],
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 adapter indices for 4 sequences"), "{err}");
    model.put_adapters(sets.remove(0).1).unwrap();
    let err = model
        .generate_multi(
            &be,
            &toks,
            Mixed {
                adapters: &multi,
                adapter_of_seq: &idx,
            },
            2,
            0,
            Sampling::GREEDY,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapters of its own"), "{err}");
}
