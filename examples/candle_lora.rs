//! Fine-tunes SmolLM2-135M-Instruct with LoRA in candle: the model loaded by lorafuse (the GGUF
//! `lorafuse fetch` downloads, or `--model` a GGUF / transformers folder), lorafuse's
//! `LoraLinear` on every projection, candle-nn's AdamW, the embedded chatterbot Q&A pairs in
//! the model's ChatML with the prompt tokens masked, and the result saved as a PEFT adapter
//! (which `lorafuse generate --adapter DIR` or PEFT load).
//!
//! ```text
//! cargo run --release --features candle --example candle_lora -- \
//!     [--model PATH] [--steps 30] [--batch 8] [--lr 2e-4] [--qlora] [--out runs/candle-lora]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use lorafuse::adapter::LoraConfig;
use lorafuse::candle::{AdaptedLinear, LoraLinear, causal_lm_loss, load_llama, save_peft};
use lorafuse::io::peft::MethodOptions;
use lorafuse::model::llama::Nf4Spec;
use lorafuse::train::data::{Example, default_records, split_train_eval, tokenize_records};

struct Args {
    model: Option<PathBuf>,
    steps: usize,
    batch: usize,
    lr: f64,
    qlora: bool,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: None,
        steps: 30,
        batch: 8,
        lr: 2e-4,
        qlora: false,
        out: PathBuf::from("runs/candle-lora"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = Some(PathBuf::from(value()?)),
            "--steps" => a.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--batch" => a.batch = value()?.parse().map_err(|e| format!("--batch: {e}"))?,
            "--lr" => a.lr = value()?.parse().map_err(|e| format!("--lr: {e}"))?,
            "--out" => a.out = PathBuf::from(value()?),
            "--qlora" => a.qlora = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if a.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    Ok(a)
}

/// Right-padded `input_ids [b, t]`, `attention_mask [b, t]` and labels (-100 on the prompt
/// and the padding).
fn collate(batch: &[&Example], pad: u32) -> candle_core::Result<(Tensor, Tensor, Vec<Vec<i64>>)> {
    let t = batch.iter().map(|e| e.input_ids.len()).max().unwrap_or(1);
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for e in batch {
        let n = e.input_ids.len();
        ids.extend(
            e.input_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad, t - n)),
        );
        mask.extend((0..t).map(|i| if i < n { 1f32 } else { 0.0 }));
        labels.push(
            e.labels
                .iter()
                .map(|&l| l as i64)
                .chain(std::iter::repeat_n(-100, t - n))
                .collect(),
        );
    }
    let b = batch.len();
    Ok((
        Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
        Tensor::from_vec(mask, (b, t), &Device::Cpu)?,
        labels,
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let nf4 = args.qlora.then_some(Nf4Spec {
        blocksize: 64,
        double_quant: true,
    });
    let (tok, mut model) = load_llama(args.model.as_deref(), nf4, &mut |s| eprintln!("{s}"))?;
    let pad = model.config().pad_token_id;

    let lora = LoraConfig::default(); // r 8, alpha 16, all seven projections
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let targets: Vec<&str> = lora.target_modules.iter().map(String::as_str).collect();
    model.adapt(&targets, |path, base| {
        Ok(LoraLinear::new(base, &lora, vb.pp(path))?.into())
    })?;
    let n_params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    eprintln!(
        "LoRA r {} on {targets:?}: {n_params} trainable parameters",
        lora.r
    );

    let (train, eval) = split_train_eval(default_records()?);
    let encode = |s: &str| tok.encode(s);
    let train = tokenize_records(encode, &train, 128)?;
    let eval = tokenize_records(encode, &eval[..16.min(eval.len())], 128)?;
    let eval_refs: Vec<&Example> = eval.iter().collect();
    let eval_loss = |m: &lorafuse::candle::Llama| -> candle_core::Result<f32> {
        let (ids, mask, labels) = collate(&eval_refs, pad)?;
        causal_lm_loss(&m.forward(&ids, Some(&mask))?, &labels)?.to_scalar::<f32>()
    };
    eprintln!("eval loss before: {:.4}", eval_loss(&model)?);

    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for step in 0..args.steps {
        let t0 = Instant::now();
        let batch: Vec<&Example> = (0..args.batch)
            .map(|i| &train[(step * args.batch + i) % train.len()])
            .collect();
        let (ids, mask, labels) = collate(&batch, pad)?;
        let loss = causal_lm_loss(&model.forward(&ids, Some(&mask))?, &labels)?;
        opt.backward_step(&loss)?;
        eprintln!(
            "step {:>3}  loss {:.4}  {:.2} s",
            step + 1,
            loss.to_scalar::<f32>()?,
            t0.elapsed().as_secs_f64()
        );
    }
    eprintln!("eval loss after: {:.4}", eval_loss(&model)?);

    let projections = model.projections();
    let named: Vec<(&str, &AdaptedLinear)> =
        projections.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    save_peft(&args.out, &named, &MethodOptions::default())?;
    println!("{}", args.out.display());
    Ok(())
}
