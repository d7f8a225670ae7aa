//! Every backward of the CPU reference against central finite differences.
//!
//! Each check builds a scalar `L = sum(out * g)` with a fixed random `g`, perturbs sampled input
//! coordinates by ±eps and compares `(L+ - L-) / 2eps` with the analytic gradient.

use lorafuse::adapter::MethodKind;
use lorafuse::backend::{AttentionSaved, Backend, SeqSpan};
use lorafuse::model::LlamaConfig;
use lorafuse::model::llama::{FullFinetune, Llama, PackedBatch, random_tensors};
use lorafuse::{Cpu, Tensor};

#[path = "common/fd.rs"]
mod fd;
#[path = "common/per_method.rs"]
mod per_method;
use fd::*;
use per_method::PerMethod;

fn t(data: Vec<f32>, shape: &[usize]) -> Tensor<Cpu> {
    Cpu.from_vec(data, shape).unwrap()
}

#[test]
fn lora_backward_matches_finite_differences() {
    let (tk, din, dout, r, s) = (5, 12, 9, 3, 1.7f32);
    let x = vals(tk * din, 1);
    let w0 = vals(dout * din, 2);
    let a = vals(r * din, 3);
    let b = vals(dout * r, 4);
    let g = vals(tk * dout, 5);
    let f = |x: &[f32], a: &[f32], b: &[f32]| -> f64 {
        let (y, _) = Cpu
            .lora_forward(
                &t(x.to_vec(), &[tk, din]),
                &t(w0.clone(), &[dout, din]),
                None,
                &t(a.to_vec(), &[r, din]),
                &t(b.to_vec(), &[dout, r]),
                s,
            )
            .unwrap();
        dot(y.data(), &g)
    };
    let (_, h) = Cpu
        .lora_forward(
            &t(x.clone(), &[tk, din]),
            &t(w0.clone(), &[dout, din]),
            None,
            &t(a.clone(), &[r, din]),
            &t(b.clone(), &[dout, r]),
            s,
        )
        .unwrap();
    let (dx, da, db) = Cpu
        .lora_backward(
            &t(g.clone(), &[tk, dout]),
            &t(x.clone(), &[tk, din]),
            &h,
            &t(w0.clone(), &[dout, din]),
            &t(a.clone(), &[r, din]),
            &t(b.clone(), &[dout, r]),
            s,
        )
        .unwrap();
    check("lora dx", &x, dx.data(), &|v| f(v, &a, &b));
    check("lora dA", &a, da.data(), &|v| f(&x, v, &b));
    check("lora dB", &b, db.data(), &|v| f(&x, &a, v));
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let (tk, d) = (4, 10);
    let x = vals(tk * d, 11);
    let w = vals(d, 12);
    let g = vals(tk * d, 13);
    let f = |x: &[f32], w: &[f32]| {
        let (y, _) = Cpu
            .rmsnorm(&t(x.to_vec(), &[tk, d]), &t(w.to_vec(), &[d]), 1e-5)
            .unwrap();
        dot(y.data(), &g)
    };
    let (_, rstd) = Cpu
        .rmsnorm(&t(x.clone(), &[tk, d]), &t(w.clone(), &[d]), 1e-5)
        .unwrap();
    let mut dw = Cpu.zeros(&[d]).unwrap();
    let dx = Cpu
        .rmsnorm_backward(
            &t(g.clone(), &[tk, d]),
            &t(x.clone(), &[tk, d]),
            &t(w.clone(), &[d]),
            &rstd,
            Some(&mut dw),
        )
        .unwrap();
    check("rmsnorm dx", &x, dx.data(), &|v| f(v, &w));
    check("rmsnorm dweight", &w, dw.data(), &|v| f(&x, v));
}

#[test]
fn rope_inverse_is_backward() {
    let (tk, hd, heads) = (6, 8, 3);
    let x = vals(tk * hd * heads, 21);
    let g = vals(tk * hd * heads, 22);
    let pos: Vec<u32> = vec![0, 1, 2, 0, 1, 7];
    let f = |x: &[f32]| {
        let mut y = t(x.to_vec(), &[tk, hd * heads]);
        Cpu.rope(&mut y, &pos, hd, 10000.0, false).unwrap();
        dot(y.data(), &g)
    };
    let mut dx = t(g.clone(), &[tk, hd * heads]);
    Cpu.rope(&mut dx, &pos, hd, 10000.0, true).unwrap();
    check("rope dx", &x, dx.data(), &f);
    // Position 0 is the identity, and a rotation keeps each pair's norm.
    let mut y = t(x.clone(), &[tk, hd * heads]);
    Cpu.rope(&mut y, &pos, hd, 10000.0, false).unwrap();
    assert_eq!(&y.data()[..hd * heads], &x[..hd * heads]);
}

#[test]
fn attention_backward_matches_finite_differences() {
    // Two packed sequences, GQA with 2 query heads per kv head.
    let (hq, hkv, hd) = (4, 2, 4);
    let seqs = [SeqSpan { start: 0, len: 3 }, SeqSpan { start: 3, len: 4 }];
    let tk = 7;
    let q = vals(tk * hq * hd, 31);
    let k = vals(tk * hkv * hd, 32);
    let v = vals(tk * hkv * hd, 33);
    let g = vals(tk * hq * hd, 34);
    let scale = 0.5;
    let run = |q: &[f32], k: &[f32], v: &[f32]| -> AttentionSaved<Cpu> {
        Cpu.attention(
            &t(q.to_vec(), &[tk, hq * hd]),
            &t(k.to_vec(), &[tk, hkv * hd]),
            &t(v.to_vec(), &[tk, hkv * hd]),
            &seqs,
            hq,
            hkv,
            scale,
        )
        .unwrap()
    };
    let f = |q: &[f32], k: &[f32], v: &[f32]| dot(run(q, k, v).out.data(), &g);
    let saved = run(&q, &k, &v);
    let (dq, dk, dv) = Cpu
        .attention_backward(
            &t(g.clone(), &[tk, hq * hd]),
            &t(q.clone(), &[tk, hq * hd]),
            &t(k.clone(), &[tk, hkv * hd]),
            &t(v.clone(), &[tk, hkv * hd]),
            &saved,
            &seqs,
            hq,
            hkv,
            scale,
        )
        .unwrap();
    check("attention dq", &q, dq.data(), &|x| f(x, &k, &v));
    check("attention dk", &k, dk.data(), &|x| f(&q, x, &v));
    check("attention dv", &v, dv.data(), &|x| f(&q, &k, x));
    // Causality and packing: the first token of each sequence attends only to itself, so its
    // output is its own value row (kv head h/2 for query head h).
    for s in seqs {
        for h in 0..hq {
            let o = &saved.out.data()[s.start * hq * hd + h * hd..][..hd];
            let vv = &v[s.start * hkv * hd + (h / 2) * hd..][..hd];
            for (a, b) in o.iter().zip(vv) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let n = 30;
    let gate = vals(n, 41).iter().map(|x| 3.0 * x).collect::<Vec<_>>();
    let up = vals(n, 42);
    let g = vals(n, 43);
    let f = |a: &[f32], b: &[f32]| {
        dot(
            Cpu.swiglu(&t(a.to_vec(), &[3, 10]), &t(b.to_vec(), &[3, 10]))
                .unwrap()
                .data(),
            &g,
        )
    };
    let (dg, du) = Cpu
        .swiglu_backward(
            &t(g.clone(), &[3, 10]),
            &t(gate.clone(), &[3, 10]),
            &t(up.clone(), &[3, 10]),
        )
        .unwrap();
    check("swiglu dgate", &gate, dg.data(), &|v| f(v, &up));
    check("swiglu dup", &up, du.data(), &|v| f(&gate, v));
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let (n, v) = (4, 11);
    let logits: Vec<f32> = vals(n * v, 51).iter().map(|x| 4.0 * x).collect();
    let labels = [3, -100, 0, 10];
    let f = |l: &[f32]| {
        Cpu.cross_entropy(&t(l.to_vec(), &[n, v]), &labels, 1.0)
            .unwrap()
            .0
    };
    let (loss, grad) = Cpu
        .cross_entropy(&t(logits.clone(), &[n, v]), &labels, 1.0)
        .unwrap();
    check("cross_entropy dlogits", &logits, grad.data(), &f);
    // The ignored row has no loss and no gradient.
    assert!(grad.data()[v..2 * v].iter().all(|&g| g == 0.0));
    assert!(loss > 0.0);
    assert!(
        Cpu.cross_entropy(&t(logits, &[n, v]), &[0, 0, 0, 11], 1.0)
            .is_err()
    );
}

#[test]
fn linear_weight_gradient_matches_finite_differences() {
    let (tk, din, dout) = (3, 5, 4);
    let x = vals(tk * din, 61);
    let w = vals(dout * din, 62);
    let g = vals(tk * dout, 63);
    let f = |w: &[f32]| {
        let y = Cpu
            .linear(
                &t(x.clone(), &[tk, din]),
                &t(w.to_vec(), &[dout, din]),
                None,
            )
            .unwrap();
        dot(y.data(), &g)
    };
    let mut dw = Cpu.zeros(&[dout, din]).unwrap();
    Cpu.linear_backward_weight(
        &t(g.clone(), &[tk, dout]),
        &t(x.clone(), &[tk, din]),
        &mut dw,
    )
    .unwrap();
    check("linear dW", &w, dw.data(), &f);
}

fn tiny_cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 23,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 64,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 2,
    }
}

/// Sets every trainable tensor to small deterministic values (so `B != 0` and every gradient
/// path is exercised), then checks the gradients of the mean loss of a two-sequence packed
/// batch against finite differences on the tensors at `picks` (indices into
/// `trainable_params`, wrapped around).
fn check_model_gradients(mut model: Llama<Cpu>, perturb: bool, picks: &[usize]) {
    if perturb {
        for (i, p) in model.trainable_params_mut().into_iter().enumerate() {
            let n = p.len();
            let v: Vec<f32> = vals(n, 100 + i as u64).iter().map(|x| 0.2 * x).collect();
            p.data_mut().copy_from_slice(&v);
        }
    }
    let ids_a: Vec<u32> = vec![1, 5, 9, 3, 7];
    let lab_a: Vec<i32> = vec![-100, -100, 9, 3, 7];
    let ids_b: Vec<u32> = vec![4, 8, 15, 16];
    let lab_b: Vec<i32> = vec![-100, 8, -100, 16];
    let batch =
        PackedBatch::from_examples([(&ids_a[..], &lab_a[..]), (&ids_b[..], &lab_b[..])]).unwrap();
    let out = model.loss_and_grads(&Cpu, &batch).unwrap();
    assert_eq!(out.n_targets, 5);
    let (eval_sum, eval_n) = model.loss(&Cpu, &batch).unwrap();
    assert!(
        (eval_sum - out.loss_sum).abs() < 1e-4,
        "train and eval loss agree"
    );
    assert_eq!(eval_n, 5);
    let names: Vec<String> = model
        .trainable_params()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(out.grads.len(), names.len());
    for &pick in picks {
        let pick = pick % names.len();
        let x: Vec<f32> = model.trainable_params()[pick].1.data().to_vec();
        let f = |v: &[f32]| {
            let mut m = model.clone();
            m.trainable_params_mut()[pick].data_mut().copy_from_slice(v);
            let (s, n) = m.loss(&Cpu, &batch).unwrap();
            s / n as f64
        };
        check(&names[pick], &x, out.grads[pick].data(), &f);
    }
}

fn tiny_model() -> Llama<Cpu> {
    let cfg = tiny_cfg();
    Llama::from_tensors(&Cpu, cfg.clone(), random_tensors(&cfg, 7)).unwrap()
}

#[test]
fn whole_model_adapter_gradients_match_finite_differences() {
    let lora = lorafuse::adapter::LoraConfig::default();
    for method in [
        MethodKind::Lora,
        MethodKind::Dora,
        MethodKind::Vera,
        MethodKind::AdaLora,
    ] {
        println!("{method:?}");
        let mut model = tiny_model();
        model.add_adapters(&Cpu, method, &lora, 3).unwrap();
        // DoRA's norm is detached (PEFT, DoRA paper sec. 4.3), so only the magnitude
        // gradients are true derivatives of the loss; the layer-level golden tests check
        // dA and dB against PEFT's.
        let picks: &[usize] = if method == MethodKind::Dora {
            &[2, 5, 20, 41]
        } else {
            &[0, 3, 9, 14, 27, 40]
        };
        check_model_gradients(model, true, picks);
    }
}

#[test]
fn full_finetune_gradients_match_finite_differences() {
    // Every tensor trained (tied embeddings included), then the top layer only.
    for (freeze_embeddings, trainable_from) in [(false, 0), (true, 1)] {
        let mut model = tiny_model();
        model.full_finetune = Some(FullFinetune {
            freeze_embeddings,
            trainable_from,
        });
        let names: Vec<String> = model
            .trainable_params()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(
            names.iter().any(|n| n == "model.embed_tokens.weight"),
            !freeze_embeddings
        );
        assert_eq!(
            names.iter().any(|n| n.starts_with("model.layers.0.")),
            trainable_from == 0
        );
        println!("trainable: {names:?}");
        check_model_gradients(model, false, &(0..names.len()).collect::<Vec<_>>());
    }
}
