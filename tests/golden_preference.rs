//! Preference alignment on the tiny transformers Llama of `golden/seeds/` against PEFT + the
//! DPO formula (`dpo_lora/`) and PEFT + transformers' sequence classification (`reward_lora/`):
//! log-probabilities, losses, TRL's logged rewards and every gradient, on the CPU reference and
//! on wgpu when present. Tolerances (seeds/README.md): values 1e-4 absolute, gradients 1e-4
//! relative to the largest entry of the same tensor.

mod common;
#[path = "common/gpu.rs"]
mod gpu;
#[path = "common/seeds.rs"]
mod seeds;

use lorafuse::Cpu;
use lorafuse::backend::{Backend, Tensor};
use lorafuse::io::peft::llama_adapter_tensors;
use lorafuse::model::llama::Llama;
use lorafuse::train::data::Example;
use lorafuse::train::dpo::{
    DpoConfig, DpoLossType, Reference, dpo_grads, dpo_loss, pack_pairs, sequence_logps,
};
use lorafuse::train::preference::PreferencePair;
use lorafuse::train::reward::{RewardConfig, reward_grads, reward_loss, score_pairs};
use seeds::{Io, peft_case, peft_name};

const ATOL: f64 = 1e-4;
const GRAD_RTOL: f32 = 1e-4;

/// The case's pairs: rows `0..n` prompt + chosen, `n..2n` prompt + rejected, right-padded;
/// the targets are the tokens `mask` marks (a row's label at position t is its token at t + 1).
fn pairs(io: &Io, mask: Option<&str>) -> Vec<PreferencePair> {
    let (shape, ids) = io.get("input_ids");
    let (_, att) = io.get("attention_mask");
    let m = mask.map(|k| &io.get(k).1);
    let (rows, t) = (shape[0], shape[1]);
    let row = |r: usize| {
        let len = (0..t).filter(|&j| att[r * t + j] > 0.5).count();
        let input_ids: Vec<u32> = (0..len).map(|j| ids[r * t + j] as u32).collect();
        // Example labels are unshifted: labels[j] is the target predicted at j - 1.
        let labels = (0..len)
            .map(|j| {
                if m.is_some_and(|m| m[r * t + j] > 0.5) {
                    input_ids[j] as i32
                } else {
                    -100
                }
            })
            .collect();
        Example { input_ids, labels }
    };
    let n = rows / 2;
    (0..n)
        .map(|i| PreferencePair {
            chosen: row(i),
            rejected: row(n + i),
            reference: None,
            margin: None,
        })
        .collect()
}

fn close(path: &str, what: &str, ours: &[f64], golden: &[f32]) {
    assert_eq!(ours.len(), golden.len(), "{path}: {what} length");
    for (i, (a, b)) in ours.iter().zip(golden).enumerate() {
        assert!(
            (a - *b as f64).abs() <= ATOL,
            "{path}: {what}[{i}] = {a}, golden {b}"
        );
    }
}

fn check_grads<B: Backend>(be: &B, model: &Llama<B>, io: &Io, grads: &[Tensor<B>]) {
    let names: Vec<String> = model
        .trainable_params()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    seeds::check_grads(be, io, &names, grads, &peft_name, GRAD_RTOL, 0.0);
}

fn check_dpo<B: Backend>(be: &B) {
    let (mut model, io) = peft_case(be, "dpo_lora");
    let path = io.path.display().to_string();
    let meta = |k: &str| -> f64 {
        io.meta
            .get(k)
            .unwrap_or_else(|| panic!("{path}: metadata {k}"))
            .parse()
            .unwrap()
    };
    let cfg = DpoConfig {
        beta: meta("beta"),
        label_smoothing: meta("label_smoothing"),
        loss_type: DpoLossType::Sigmoid,
    };
    let pairs = pairs(&io, Some("completion_mask"));
    let refs: Vec<&PreferencePair> = pairs.iter().collect();
    let (batch, counts) = pack_pairs(&refs).unwrap();
    let policy = sequence_logps(be, &model, &batch, &counts, false).unwrap();
    close(&path, "policy_logps", &policy, &io.get("policy_logps").1);
    // TRL's reference for a PEFT model: the same model with the adapter disabled.
    let mut reference = Reference::base_of(&model);
    let refl = reference
        .logps(be, &mut model, &batch, &counts, false)
        .unwrap();
    close(
        &path,
        "reference_logps",
        &refl,
        &io.get("reference_logps").1,
    );
    // The adapter came back after the reference forward.
    let again = sequence_logps(be, &model, &batch, &counts, false).unwrap();
    assert_eq!(
        again, policy,
        "{path}: the policy changed after the reference forward"
    );
    let (out, grads) = dpo_grads(be, &model, &batch, &counts, &refl, &cfg).unwrap();
    close(&path, "loss", &[out.loss], &io.get("loss").1);
    close(
        &path,
        "rewards_chosen",
        &out.rewards_chosen,
        &io.get("rewards_chosen").1,
    );
    close(
        &path,
        "rewards_rejected",
        &out.rewards_rejected,
        &io.get("rewards_rejected").1,
    );
    let logs = out.logs();
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
    ] {
        let ours = logs[k];
        let golden = meta(k);
        assert!(
            (ours - golden).abs() <= ATOL,
            "{path}: {k} = {ours}, golden {golden}"
        );
    }
    check_grads(be, &model, &io, &grads);
}

#[test]
fn dpo_lora_matches_peft_and_the_dpo_formula_on_cpu() {
    check_dpo(&Cpu);
}

#[cfg(feature = "wgpu")]
#[test]
fn dpo_lora_matches_on_wgpu() {
    let Some(be) = gpu::wgpu("golden_preference") else {
        return;
    };
    check_dpo(&be);
}

#[cfg(feature = "cuda")]
#[test]
fn dpo_lora_matches_on_cuda() {
    let Some(be) = gpu::cuda("golden_preference") else {
        return;
    };
    check_dpo(&be);
}

fn check_reward<B: Backend>(be: &B) {
    let (model, io) = peft_case(be, "reward_lora");
    let path = io.path.display().to_string();
    assert!(
        model.score.is_some(),
        "{path}: the adapter's score head was not loaded"
    );
    let pairs = pairs(&io, None);
    let (c, r) = score_pairs(be, &model, &pairs, 8).unwrap();
    let ours: Vec<f64> = c.iter().chain(&r).copied().collect();
    close(&path, "rewards", &ours, &io.get("rewards").1);
    let refs: Vec<&PreferencePair> = pairs.iter().collect();
    let (batch, _) = pack_pairs(&refs).unwrap();
    let (out, grads) =
        reward_grads(be, &model, &batch, &[None; 2], &RewardConfig::default()).unwrap();
    close(&path, "loss", &[out.loss], &io.get("loss").1);
    let acc = out.logs()["accuracy"];
    let golden: f64 = io.meta["accuracy"].parse().unwrap();
    assert!(
        (acc - golden).abs() < 1e-9,
        "{path}: accuracy {acc} vs {golden}"
    );
    check_grads(be, &model, &io, &grads);
    // Saved as PEFT saves a SEQ_CLS LoRA: the same keys as the golden state dict.
    let mut keys: Vec<String> = llama_adapter_tensors(be, &model)
        .unwrap()
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    keys.sort();
    let mut golden: Vec<String> = serde_json::from_str(&io.meta["peft_state_dict_keys"]).unwrap();
    golden.sort();
    assert_eq!(keys, golden, "{path}: saved keys");
}

#[test]
fn reward_lora_matches_peft_and_transformers_on_cpu() {
    check_reward(&Cpu);
}

#[cfg(feature = "wgpu")]
#[test]
fn reward_lora_matches_on_wgpu() {
    let Some(be) = gpu::wgpu("golden_preference") else {
        return;
    };
    check_reward(&be);
}

#[cfg(feature = "cuda")]
#[test]
fn reward_lora_matches_on_cuda() {
    let Some(be) = gpu::cuda("golden_preference") else {
        return;
    };
    check_reward(&be);
}

/// The pairwise loss with margins and reward centring against central differences.
#[test]
fn reward_loss_has_the_gradient_it_claims() {
    let c = [0.5, -1.25, 2.0];
    let r = [0.75, -2.0, 1.0];
    let margins = [Some(0.25), None, Some(-0.5)];
    let cfg = RewardConfig {
        center_rewards_coefficient: Some(0.01),
    };
    let out = reward_loss(&cfg, &c, &r, &margins).unwrap();
    let h = 1e-5;
    for i in 0..3 {
        for (which, d) in [(0, out.d_chosen[i]), (1, out.d_rejected[i])] {
            let shift = |e: f64| {
                let (mut a, mut b) = (c, r);
                if which == 0 {
                    a[i] += e
                } else {
                    b[i] += e
                }
                reward_loss(&cfg, &a, &b, &margins).unwrap().loss
            };
            let fd = (shift(h) - shift(-h)) / (2.0 * h);
            assert!((fd - d).abs() < 1e-8, "d[{which}][{i}] {d} vs {fd}");
        }
    }
    assert_eq!(out.logs()["accuracy"], 2.0 / 3.0);
}

/// The sigmoid loss with label smoothing and the IPO loss, and their gradients, against
/// central differences of the loss itself (the formulas, independent of any model).
#[test]
fn dpo_losses_have_the_gradients_they_claim() {
    let pc = [-12.5, -3.25, -7.0];
    let pr = [-11.0, -4.5, -6.75];
    let rc = [-12.0, -3.5, -7.5];
    let rr = [-11.5, -4.0, -6.0];
    for cfg in [
        DpoConfig::default(),
        DpoConfig {
            label_smoothing: 0.2,
            beta: 0.5,
            ..Default::default()
        },
        DpoConfig {
            loss_type: DpoLossType::Ipo,
            beta: 0.3,
            ..Default::default()
        },
    ] {
        let out = dpo_loss(&cfg, &pc, &pr, &rc, &rr).unwrap();
        let h = 1e-5;
        for i in 0..3 {
            for (which, d) in [(0, out.d_chosen[i]), (1, out.d_rejected[i])] {
                let shift = |e: f64| {
                    let (mut c, mut r) = (pc, pr);
                    if which == 0 {
                        c[i] += e
                    } else {
                        r[i] += e
                    }
                    dpo_loss(&cfg, &c, &r, &rc, &rr).unwrap().loss
                };
                let fd = (shift(h) - shift(-h)) / (2.0 * h);
                assert!(
                    (fd - d).abs() < 1e-7,
                    "{cfg:?}: d[{which}][{i}] {d} vs {fd}"
                );
            }
        }
    }
    // cDPO: at h = 0 the smoothed loss is still log 2, and with ε it pulls back from certainty.
    let plain = dpo_loss(&DpoConfig::default(), &[0.0], &[-100.0], &[0.0], &[0.0]).unwrap();
    let smooth = dpo_loss(
        &DpoConfig {
            label_smoothing: 0.1,
            ..Default::default()
        },
        &[0.0],
        &[-100.0],
        &[0.0],
        &[0.0],
    )
    .unwrap();
    assert!(plain.d_chosen[0].abs() < 1e-4 && smooth.d_chosen[0] > 0.0);
}
