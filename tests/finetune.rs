//! End-to-end fine-tuning on a tiny random Llama (no download): the loss falls, the saved
//! adapter follows PEFT's layout, and a packed batch gives the same loss as each sequence
//! alone.

use lorafuse::Cpu;
use lorafuse::adapter::LoraConfig;
use lorafuse::io::peft;
use lorafuse::model::LlamaConfig;
use lorafuse::model::llama::{Llama, PackedBatch, random_tensors};
use lorafuse::train::data::Example;
use lorafuse::train::trainer::{TrainConfig, evaluate, train};

fn tiny_cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 128,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 2,
    }
}

/// Sequences with a learnable rule: a prompt of 3 tokens, then an answer that repeats the
/// prompt's tokens shifted by one; only the answer is a target.
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

#[test]
fn tiny_llama_finetune_lowers_loss_and_saves_a_peft_adapter() {
    let cfg = tiny_cfg();
    let mut model = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 5)).unwrap();
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..LoraConfig::default()
    };
    model.add_lora(&Cpu, &lora, 9).unwrap();
    let data = examples(60);
    let (tr, ev) = data.split_at(48);
    let base_eval = evaluate(&Cpu, &model, ev, 4).unwrap();
    let tcfg = TrainConfig {
        steps: 40,
        lr: 1e-2,
        warmup_steps: 2,
        ..TrainConfig::default()
    };
    let mut seen = 0;
    let m = train(&Cpu, &mut model, tr, ev, &tcfg, |_| seen += 1).unwrap();
    assert_eq!(seen, 40);
    assert_eq!(m.steps.len(), 40);
    let before = m.eval_loss_before.unwrap();
    let after = m.eval_loss_after.unwrap();
    assert!(
        (before - base_eval).abs() < 1e-9,
        "B = 0 at init: eval equals the base model"
    );
    println!("eval loss {before:.4} -> {after:.4}");
    assert!(
        after < 0.8 * before,
        "eval loss fell from {before} to {after}"
    );
    let first: f64 = m.steps[..5].iter().map(|s| s.loss).sum::<f64>() / 5.0;
    let last: f64 = m.steps[35..].iter().map(|s| s.loss).sum::<f64>() / 5.0;
    assert!(last < first, "train loss fell from {first} to {last}");
    // 7 projections x 2 layers, each r * (in + out).
    let expect: usize = 2 * (4 * (32 + 32) * 2 + 4 * (32 + 16) * 2 + 4 * (32 + 64) * 3);
    assert_eq!(m.trainable_params, expect);

    let dir = std::env::temp_dir().join(format!("lorafuse-finetune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tensors = peft::llama_adapter_tensors(&Cpu, &model).unwrap();
    let acfg = peft::adapter_config_for(&lora, None);
    peft::save_lora_adapter(&dir, &acfg, &tensors).unwrap();
    let (cfg2, loaded) = peft::load_adapter(&dir).unwrap();
    assert_eq!(cfg2.rank(), 4);
    assert_eq!(loaded.len(), 2 * 7 * 2);
    for (name, shape, _) in &loaded {
        assert!(name.starts_with("base_model.model.model.layers."), "{name}");
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let want = if name.ends_with("lora_A.weight") {
            let inp = if name.contains("down_proj") { 64 } else { 32 };
            vec![4, inp]
        } else {
            assert!(name.ends_with("lora_B.weight"), "{name}");
            let out = if name.contains("k_proj") || name.contains("v_proj") {
                kv
            } else if name.contains("gate_proj") || name.contains("up_proj") {
                64
            } else {
                32
            };
            vec![out, 4]
        };
        assert_eq!(shape, &want, "{name}");
    }
    assert!(
        loaded
            .iter()
            .any(|(n, _, _)| n == "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    );
    // Loading the adapter into a fresh base reproduces the trained model's eval loss.
    let mut fresh = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 5)).unwrap();
    peft::apply_lora_adapter(&Cpu, &mut fresh, &cfg2, &loaded).unwrap();
    let reloaded = evaluate(&Cpu, &fresh, ev, 4).unwrap();
    assert!((reloaded - after).abs() < 1e-5, "{reloaded} vs {after}");
    // Merging gives the same outputs without adapters.
    fresh.merge_and_unload(&Cpu).unwrap();
    assert_eq!(fresh.n_trainable(), 0);
    let merged = evaluate(&Cpu, &fresh, ev, 4).unwrap();
    assert!((merged - after).abs() < 1e-4, "{merged} vs {after}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn packed_batch_equals_sequences_alone() {
    let cfg = tiny_cfg();
    let model = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 11)).unwrap();
    let ex = examples(5);
    let packed =
        PackedBatch::from_examples(ex.iter().map(|e| (&e.input_ids[..], &e.labels[..]))).unwrap();
    let (sum, n) = model.loss(&Cpu, &packed).unwrap();
    let mut sum1 = 0.0;
    let mut n1 = 0;
    for e in &ex {
        let b = PackedBatch::from_examples([(&e.input_ids[..], &e.labels[..])]).unwrap();
        let (s, k) = model.loss(&Cpu, &b).unwrap();
        sum1 += s;
        n1 += k;
    }
    assert_eq!(n, n1);
    assert!((sum - sum1).abs() < 1e-4, "{sum} vs {sum1}");
}

#[test]
fn bad_adapter_settings_are_errors() {
    let cfg = tiny_cfg();
    let mut model = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 1)).unwrap();
    let r0 = LoraConfig {
        r: 0,
        ..LoraConfig::default()
    };
    let e = model.add_lora(&Cpu, &r0, 1).unwrap_err().to_string();
    assert!(e.contains("rank"), "{e}");
    let unknown = LoraConfig {
        target_modules: vec!["q_proj".into(), "qkv_proj".into()],
        ..LoraConfig::default()
    };
    let e = model.add_lora(&Cpu, &unknown, 1).unwrap_err().to_string();
    assert!(e.contains("qkv_proj"), "{e}");
    let tcfg = TrainConfig::default();
    let e = train(&Cpu, &mut model, &examples(4), &[], &tcfg, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("no trainable parameter"), "{e}");
    model.add_lora(&Cpu, &LoraConfig::default(), 1).unwrap();
    let e = train(&Cpu, &mut model, &[], &[], &tcfg, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty"), "{e}");
}

/// The recipe of the quantized-base test: a method with small hyperparameters.
fn quant_recipe(method: lorafuse::train::recipe::Method) -> lorafuse::train::recipe::Recipe {
    use lorafuse::train::recipe::{AdaLoraSettings, Recipe};
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
        additive: Default::default(),
        compute_dtype: Default::default(),
        train: TrainConfig {
            steps: 6,
            batch_size: 4,
            lr: 1e-2,
            warmup_steps: 1,
            eval_batch_size: 8,
            ..TrainConfig::default()
        },
        seed: 3,
        nf4: lorafuse::model::llama::Nf4Spec::default(),
    }
}

/// QVeRA and QAdaLoRA (and QLoRA, QDoRA) need no code of their own: each trains over the NF4
/// base as its dense method trains over the dequantized weights (the same losses, to f32
/// summation order), and lowers the loss.
#[test]
fn quantized_base_methods_train_as_their_dense_method_on_the_dequantized_weights() {
    use lorafuse::adapter::BaseWeight;
    use lorafuse::train::recipe::{self, Method};
    let cfg = tiny_cfg();
    let data = examples(40);
    let (tr, ev) = data.split_at(32);
    for (quantized, dense) in [
        (Method::Qlora, Method::Lora),
        (Method::Qdora, Method::Dora),
        (Method::Qvera, Method::Vera),
        (Method::Qadalora, Method::AdaLora),
    ] {
        assert!(quantized.quantized_base() && !dense.quantized_base());
        let rec = quant_recipe(quantized);
        let mut q = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 5)).unwrap();
        let mq = recipe::run(&Cpu, &mut q, &rec, tr, ev, |_| {}).unwrap();
        assert!(
            q.layers[0].proj[0].base.weight.is_quantized(),
            "{}: the base is NF4",
            quantized.name()
        );
        // The dense twin: the same weights, quantized and dequantized, kept dense.
        let mut d = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 5)).unwrap();
        d.quantize_bases(&Cpu, rec.nf4).unwrap();
        for b in &mut d.layers {
            for p in &mut b.proj {
                p.base = p.base.dequantized(&Cpu).unwrap();
                assert!(matches!(p.base.weight, BaseWeight::Dense(_)));
            }
        }
        let md = recipe::run(&Cpu, &mut d, &quant_recipe(dense), tr, ev, |_| {}).unwrap();
        let (qb, db) = (mq.eval_loss_before.unwrap(), md.eval_loss_before.unwrap());
        let (qa, da) = (mq.eval_loss_after.unwrap(), md.eval_loss_after.unwrap());
        println!(
            "{}: eval {qb:.5} -> {qa:.5}; {} on the dequantized base {db:.5} -> {da:.5}",
            quantized.name(),
            dense.name()
        );
        assert!(
            (qb - db).abs() <= 1e-5 * db,
            "{}: eval before",
            quantized.name()
        );
        assert!(
            (qa - da).abs() <= 1e-3 * da,
            "{}: eval after",
            quantized.name()
        );
        assert!(
            qa < qb,
            "{}: training lowers the eval loss",
            quantized.name()
        );
        assert_eq!(mq.trainable_params, md.trainable_params);
    }
}

/// `--compute-dtype bf16` stores the frozen dense bases in bf16 (half the bytes) and trains
/// every adapter family over them as over the dense f32 weights of the rounded values (the
/// same losses, to f32 summation order); full fine-tuning and the NF4 methods refuse it,
/// naming the setting; a merge into a bf16 base is refused, and one after widening works.
#[test]
fn bf16_bases_train_as_the_dense_rounded_weights_and_halve_their_bytes() {
    use lorafuse::adapter::BaseWeight;
    use lorafuse::model::llama::ComputeDtype;
    use lorafuse::train::recipe::{self, Method};
    let cfg = tiny_cfg();
    let data = examples(40);
    let (tr, ev) = data.split_at(32);
    for method in [
        Method::Lora,
        Method::Dora,
        Method::Vera,
        Method::AdaLora,
        Method::Ia3,
        Method::PromptTuning,
    ] {
        let mut rec = quant_recipe(method);
        rec.lora.target_modules = method.default_target_modules();
        rec.compute_dtype = ComputeDtype::Bf16;
        let name = method.name();
        let mut b = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 5)).unwrap();
        let f32_bytes = b.base_weight_bytes();
        let mb = recipe::run(&Cpu, &mut b, &rec, tr, ev, |_| {}).unwrap();
        assert!(
            matches!(b.layers[0].proj[0].base.weight, BaseWeight::Bf16(_)),
            "{name}: the base is bf16"
        );
        assert_eq!(
            2 * b.base_weight_bytes(),
            f32_bytes,
            "{name}: half the bytes"
        );
        // The dense twin: the same weights rounded to bf16 and widened back, kept f32.
        let mut d = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 5)).unwrap();
        d.freeze_bases(&Cpu, ComputeDtype::Bf16).unwrap();
        for blk in &mut d.layers {
            for p in &mut blk.proj {
                p.base = p.base.dequantized(&Cpu).unwrap();
            }
        }
        rec.compute_dtype = ComputeDtype::F32;
        let md = recipe::run(&Cpu, &mut d, &rec, tr, ev, |_| {}).unwrap();
        let (bb, db) = (mb.eval_loss_before.unwrap(), md.eval_loss_before.unwrap());
        let (ba, da) = (mb.eval_loss_after.unwrap(), md.eval_loss_after.unwrap());
        println!("{name}: bf16 eval {bb:.5} -> {ba:.5}; rounded f32 {db:.5} -> {da:.5}");
        assert!((bb - db).abs() <= 1e-5 * db, "{name}: eval before");
        assert!((ba - da).abs() <= 1e-3 * da, "{name}: eval after");
        assert!(ba < bb, "{name}: training lowers the eval loss");
    }

    for method in [Method::Full, Method::Qlora] {
        let mut rec = quant_recipe(method);
        rec.compute_dtype = ComputeDtype::Bf16;
        let err = rec.validate().unwrap_err().to_string();
        assert!(
            err.contains("compute_dtype") && err.contains(method.name()),
            "{}: {err}",
            method.name()
        );
    }

    let mut m = Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 5)).unwrap();
    m.freeze_bases(&Cpu, ComputeDtype::Bf16).unwrap();
    let p = &m.layers[0].proj[0];
    let err = p.base.weight.dense_or_err("merge").unwrap_err().to_string();
    assert!(err.contains("bf16"), "{err}");
    assert!(matches!(
        p.base.dequantized(&Cpu).unwrap().weight,
        BaseWeight::Dense(_)
    ));
}
