//! The candle Llama with lorafuse's layers injected, on the random tiny transformers Llama of
//! the golden set (`seeds/base/`): its logits equal transformers' and, with PEFT's three LoRA
//! adapters loaded by `load_peft`, PEFT's (`seeds/multi_lora/`, 1e-4 as the golden README
//! states); a few AdamW steps lower the loss, and the adapter they leave, saved by
//! `save_peft`, gives the same logits in lorafuse's own model.
//!
//! With the real SmolLM2 (`LORAFUSE_MODEL`), the model `load_llama` hands over from lorafuse's
//! loader gives transformers' logits (`golden/smollm2/`, 1e-3 as that README states), dense and
//! over an NF4 base within NF4's own error of the dense logits.
#![cfg(feature = "candle")]

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use common::candle::max_abs_diff;
use lorafuse::Backend;
use lorafuse::candle::{AdaptedLinear, Llama, LoraLinear, causal_lm_loss, load_peft, save_peft};
use lorafuse::io::hf::HfFolder;
use lorafuse::io::peft::{MethodOptions, load_adapter};
use lorafuse::model::batch::PackedBatch;

fn base_model() -> Llama {
    let dir = common::golden_dir().join("seeds/base");
    let cfg = HfFolder::open(&dir).unwrap().llama_config().clone();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).unwrap();
    Llama::load(vb, &cfg).unwrap()
}

/// `(input_ids [4, 9] u32, attention_mask [4, 9], adapter_index [4], logits [4, 9, 96])`.
fn multi_lora_io() -> (Tensor, Tensor, Vec<i64>, Tensor) {
    let p = common::golden_dir().join("seeds/multi_lora/io.safetensors");
    let t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
    let idx = t["adapter_index"].to_vec1::<i64>().unwrap();
    (ids, t["attention_mask"].clone(), idx, t["logits"].clone())
}

/// The model with LoRA layers (the adapter folder's r, alpha, rsLoRA and targets) over every
/// targeted projection, built from `vb`.
fn with_lora(dir: &Path, vb: &VarBuilder) -> Llama {
    let (cfg, _) = load_adapter(dir).unwrap();
    let lora = cfg.to_lora_config().unwrap();
    let mut m = base_model();
    let targets: Vec<&str> = lora.target_modules.iter().map(String::as_str).collect();
    m.adapt(&targets, |path, base| {
        Ok(LoraLinear::new(base, &lora, vb.pp(path))?.into())
    })
    .unwrap();
    m
}

fn named(m: &Llama) -> Vec<(String, &AdaptedLinear)> {
    m.projections()
}

#[test]
fn peft_mixed_batch_rows_are_reproduced_one_adapter_at_a_time() {
    let (ids, mask, idx, want) = multi_lora_io();
    let names = ["a", "b", "c"];
    for (row, &ai) in idx.iter().enumerate() {
        let model = if ai < 0 {
            base_model()
        } else {
            let dir = common::golden_dir()
                .join("seeds/multi_lora")
                .join(names[ai as usize]);
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let m = with_lora(&dir, &vb);
            let n = named(&m);
            let refs: Vec<(&str, &AdaptedLinear)> =
                n.iter().map(|(p, l)| (p.as_str(), *l)).collect();
            load_peft(&dir, &refs).unwrap();
            m
        };
        let r_ids = ids.narrow(0, row, 1).unwrap();
        let r_mask = mask.narrow(0, row, 1).unwrap();
        let got = model.forward(&r_ids, Some(&r_mask)).unwrap();
        let exp = want.narrow(0, row, 1).unwrap();
        let d = max_abs_diff(&got, &exp);
        assert!(
            d <= 1e-4,
            "row {row} (adapter {ai}): max |logits - PEFT| = {d}"
        );
    }
    // The adapters change the logits (the comparison above is not of the base alone).
    let base = base_model()
        .forward(&ids.narrow(0, 0, 1).unwrap(), None)
        .unwrap();
    assert!(max_abs_diff(&base, &want.narrow(0, 0, 1).unwrap()) > 1e-3);
}

#[test]
fn adamw_fine_tuning_lowers_the_loss_and_saves_a_peft_adapter_lorafuse_reads_the_same() {
    let (ids, _, _, _) = multi_lora_io();
    let labels: Vec<Vec<i64>> = ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let lora = lorafuse::adapter::LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..Default::default()
    };
    let mut model = base_model();
    model
        .adapt(&["q_proj", "v_proj", "down_proj"], |path, base| {
            Ok(LoraLinear::new(base, &lora, vb.pp(path))?.into())
        })
        .unwrap();
    assert_eq!(
        vm.all_vars().len(),
        2 * 3 * 2,
        "A and B per adapted projection"
    );
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let loss = causal_lm_loss(&model.forward(&ids, None).unwrap(), &labels).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    // At step 0 B = 0: the loss is the base model's, transformers' 4.560689 on its own batch
    // is of another batch; here it must simply fall.
    assert!(losses[7] < losses[0] - 0.05, "losses {losses:?}");

    let dir = std::env::temp_dir().join(format!("lorafuse-candle-llama-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let n = named(&model);
    let refs: Vec<(&str, &AdaptedLinear)> = n.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    save_peft(&dir, &refs, &MethodOptions::default()).unwrap();
    let want = model.forward(&ids, None).unwrap();

    // lorafuse's own model (its transformers-folder loader and fused forward) with the adapter.
    let be = lorafuse::Cpu;
    let mut folder = HfFolder::open(&common::golden_dir().join("seeds/base")).unwrap();
    let mut lf_model = lorafuse::io::load::llama_from_hf(&be, &mut folder, None).unwrap();
    let (cfg, tensors) = load_adapter(&dir).unwrap();
    lorafuse::io::peft::apply_adapter(&be, &mut lf_model, &cfg, &tensors).unwrap();
    let (_, t) = ids.dims2().unwrap();
    for (row, r_ids) in ids.to_vec2::<u32>().unwrap().iter().enumerate() {
        let labels = vec![-100i32; r_ids.len()];
        let batch = PackedBatch::from_examples([(&r_ids[..], &labels[..])]).unwrap();
        let (logits, _) = lf_model.logits_all(&be, &batch).unwrap();
        let got =
            Tensor::from_vec(be.download(&logits).unwrap(), (1, t, 96), &Device::Cpu).unwrap();
        let d = max_abs_diff(&got, &want.narrow(0, row, 1).unwrap());
        assert!(
            d <= 1e-4,
            "row {row}: candle vs lorafuse logits differ by {d}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `golden/smollm2/logits.safetensors`: `(input_ids, logits_last [vocab],
/// logits_all_pos_first8 [t, 8])` of prompt `p`.
fn smollm2_golden(p: &str) -> (Tensor, Tensor, Tensor) {
    let path = common::golden_file("smollm2/logits.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let ids = t[&format!("{p}.input_ids")]
        .to_dtype(DType::U32)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    (
        ids,
        t[&format!("{p}.logits_last")].clone(),
        t[&format!("{p}.logits_all_pos_first8")].clone(),
    )
}

#[test]
fn smollm2_from_lorafuses_loader_gives_transformers_logits() {
    let Some(path) =
        common::model_or_skip("smollm2_from_lorafuses_loader_gives_transformers_logits")
    else {
        return;
    };
    let (_, model) = lorafuse::candle::load_llama(Some(&path), None, &mut |_| {}).unwrap();
    let nf4 = lorafuse::model::llama::Nf4Spec {
        blocksize: 64,
        double_quant: true,
    };
    let (_, qmodel) = lorafuse::candle::load_llama(Some(&path), Some(nf4), &mut |_| {}).unwrap();
    let be = lorafuse::Cpu;
    let (_, _, lf_qmodel) =
        lorafuse::train::job::load_model(&be, Some(&path), Some(nf4), &mut |_| {}).unwrap();
    for p in ["p0", "p1"] {
        let (ids, last, first8) = smollm2_golden(p);
        let t = ids.dims2().unwrap().1;
        let logits = model.forward(&ids, None).unwrap().squeeze(0).unwrap();
        let got_last = logits.get(t - 1).unwrap();
        let d = max_abs_diff(&got_last, &last);
        assert!(
            d <= 1e-3,
            "{p}: last-position logits differ from transformers' by {d}"
        );
        let got8 = logits.narrow(1, 0, 8).unwrap();
        let d8 = max_abs_diff(&got8, &first8);
        assert!(
            d8 <= 1e-3,
            "{p}: logits[:, :8] differ from transformers' by {d8}"
        );
        // QLoRA's base: the same NF4 weights as lorafuse's own QLoRA model, so the same
        // logits; and not the dense ones.
        let q = qmodel.forward(&ids, None).unwrap().squeeze(0).unwrap();
        let row: Vec<u32> = ids.squeeze(0).unwrap().to_vec1().unwrap();
        let labels = vec![-100i32; t];
        let batch = PackedBatch::from_examples([(&row[..], &labels[..])]).unwrap();
        let (want_q, _) = lf_qmodel.logits_all(&be, &batch).unwrap();
        let want_q =
            Tensor::from_vec(be.download(&want_q).unwrap(), q.dims(), &Device::Cpu).unwrap();
        let dq = max_abs_diff(&q, &want_q);
        assert!(
            dq <= 1e-3,
            "{p}: NF4 logits differ from lorafuse's QLoRA model by {dq}"
        );
        assert!(
            max_abs_diff(&q, &logits) > 1e-2,
            "{p}: the NF4 logits equal the dense ones"
        );
    }
}
