//! Several adapters in one batch from the command line: `generate` and `logits` with
//! `--adapter NAME=DIR` repeated, over the library's mixed batch
//! ([`lorafuse::model::multi::MultiAdapters`]).

use super::*;
use lorafuse::io::load_adapter_sets;
use lorafuse::model::multi::{Mixed, MultiAdapters};
use lorafuse::train::job::run_finetune_multi;
use lorafuse::train::recipe::Method;
use std::path::PathBuf;

/// The `--adapter` values as `(name, folder)`: `NAME=DIR`, or `DIR` (named by its last path
/// component). `None` for the single-adapter form (one plain `DIR`, or none). Errors: an empty
/// name or folder.
pub(crate) fn named_adapters(values: &[String]) -> Result<Option<Vec<(String, PathBuf)>>> {
    let split = |v: &String| -> Result<(Option<String>, PathBuf)> {
        match v.split_once('=') {
            Some((n, d)) if !n.contains(['/', '\\']) => {
                if n.is_empty() || d.is_empty() {
                    return Err(Error::arg("adapter", format!("`{v}`: expected NAME=DIR")));
                }
                Ok((Some(n.to_string()), PathBuf::from(d)))
            }
            _ => Ok((None, PathBuf::from(v))),
        }
    };
    let parsed = values.iter().map(split).collect::<Result<Vec<_>>>()?;
    if parsed.len() <= 1 && parsed.iter().all(|(n, _)| n.is_none()) {
        return Ok(None);
    }
    Ok(Some(
        parsed
            .into_iter()
            .map(|(n, d)| {
                let name = n.unwrap_or_else(|| {
                    d.file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_else(|| d.display().to_string())
                });
                (name, d)
            })
            .collect(),
    ))
}

/// The adapter a JSON record names (`"adapter": NAME`; absent or null: none). Errors: a
/// value that is not a string.
pub(crate) fn adapter_field(v: &serde_json::Value) -> std::result::Result<Option<&str>, String> {
    match v.get("adapter") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err("`adapter` is not a string".into()),
    }
}

/// Loads the named adapters and packs them for mixed batches.
pub(crate) fn load_multi<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    named: &[(String, PathBuf)],
) -> Result<MultiAdapters<B>> {
    let sets = load_adapter_sets(be, model, named)?;
    MultiAdapters::new(be, model, &sets)
}

/// The index of the adapter a record names (-1: none). Errors: a name not given with
/// `--adapter`.
fn index_of<B: Backend>(multi: &MultiAdapters<B>, name: Option<&str>) -> Result<i32> {
    match name {
        None => Ok(-1),
        Some(n) => multi.index(n).map(|i| i as i32).ok_or_else(|| {
            Error::arg(
                "adapter",
                format!(
                    "a prompt names adapter `{n}`, which is not among --adapter ({})",
                    multi.names().join(", ")
                ),
            )
        }),
    }
}

/// `generate` with several adapters: a prompt that names its adapter (`"adapter": NAME` in
/// the prompt file) decodes with it; one that names none decodes on the base model and on
/// every adapter. All of them decode in ONE batch with the KV cache.
pub(crate) fn generate_mixed<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    named: &[(String, PathBuf)],
    prompts: &[(Vec<u32>, Option<String>)],
    settings: (usize, u32, Sampling),
    tok: &Tokenizer,
) -> Result<()> {
    let (max_new, eos, sampling) = settings;
    let multi = load_multi(be, model, named)?;
    let mut ids = Vec::new();
    let mut jobs = Vec::new();
    for (p, (prompt, name)) in prompts.iter().enumerate() {
        let which: Vec<i32> = match name {
            Some(_) => vec![index_of(&multi, name.as_deref())?],
            None => (-1..multi.names().len() as i32).collect(),
        };
        for i in which {
            ids.push(prompt.clone());
            jobs.push((p, i));
        }
    }
    let idx: Vec<i32> = jobs.iter().map(|&(_, i)| i).collect();
    let t0 = std::time::Instant::now();
    let outs = model.generate_multi(
        be,
        &ids,
        Mixed {
            adapters: &multi,
            adapter_of_seq: &idx,
        },
        max_new,
        eos,
        sampling,
    )?;
    let secs = t0.elapsed().as_secs_f64();
    for ((p, i), out) in jobs.iter().zip(&outs) {
        let label = if *i < 0 {
            "base model".to_string()
        } else {
            format!("adapter {}", multi.names()[*i as usize])
        };
        println!(
            "--- {label} (prompt {}) ---\n{}",
            p + 1,
            strip_eos(tok, out, eos)?
        );
    }
    let n: usize = outs.iter().map(Vec::len).sum();
    eprintln!(
        "mixed batch of {} sequences over {} adapters: {n} new tokens in {secs:.3} s \
         ({:.1} tokens/s, KV cache)",
        outs.len(),
        multi.names().len(),
        n as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// `logits --rows FILE`: one JSON object per line (`input_ids`, `text`, or `messages` rendered
/// with the chat template, and an optional `adapter` name), all rows in one mixed-batch prefill; writes
/// `input_ids` (i64 `[N, T]`, -1 after each row's end), `adapter_index` (i64 `[N]`, -1: base)
/// and `logits` (f32 `[N, vocab]`, each row's last token).
pub(crate) fn logits_rows<B: Backend>(
    be: &B,
    a: &LogitsArgs,
    rows_file: &Path,
    model: &mut Llama<B>,
    tok: &Tokenizer,
    model_path: &Path,
) -> Result<()> {
    let named = named_adapters(&a.adapter)?.unwrap_or_else(|| {
        a.adapter
            .iter()
            .map(|d| (d.clone(), PathBuf::from(d)))
            .collect()
    });
    let multi = if named.is_empty() {
        None
    } else {
        Some(load_multi(be, model, &named)?)
    };
    let text = std::fs::read_to_string(rows_file).map_err(|e| Error::io(rows_file, e))?;
    let mut ids: Vec<Vec<u32>> = Vec::new();
    let mut idx = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |m: String| Error::format(rows_file, format!("line {}: {m}", i + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Json {
            context: format!("{} line {}", rows_file.display(), i + 1),
            msg: e.to_string(),
        })?;
        let mut row = if let Some(list) = v.get("input_ids") {
            let ids: Vec<u32> = serde_json::from_value(list.clone())
                .map_err(|e| bad(format!("`input_ids` is not a list of token ids ({e})")))?;
            if let Some(t) = ids.iter().find(|&&t| t as usize >= model.cfg.vocab_size) {
                return Err(bad(format!(
                    "token id {t} is outside the vocabulary of {}",
                    model.cfg.vocab_size
                )));
            }
            ids
        } else {
            match v.get("text") {
                Some(t) => tok.encode(
                    t.as_str()
                        .ok_or_else(|| bad("`text` is not a string".into()))?,
                )?,
                None => {
                    let tmpl = prompt_template(model_path, tok, Some(&a.chat.chat_template))?;
                    Prompt::from_json(&v).map_err(bad)?.ids(
                        Some(&tmpl),
                        a.chat.system.as_deref(),
                        tok,
                    )?
                }
            }
        };
        if let Some(n) = a.max_tokens {
            row.truncate(n);
        }
        if row.is_empty() {
            return Err(bad("no token to run".into()));
        }
        let name = adapter_field(&v).map_err(bad)?;
        idx.push(match (&multi, name) {
            (Some(m), n) => index_of(m, n)?,
            (None, None) => -1,
            (None, Some(n)) => {
                return Err(bad(format!(
                    "names adapter `{n}`: give it with --adapter {n}=DIR"
                )));
            }
        });
        ids.push(row);
    }
    if ids.is_empty() {
        return Err(Error::format(rows_file, "no row"));
    }
    let n = ids.len();
    let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = lorafuse::model::generate::KvCache::new(be, model, n, longest)?;
    let new: Vec<&[u32]> = ids.iter().map(|r| &r[..]).collect();
    let logits = match &multi {
        Some(m) => model.forward_cached_multi(
            be,
            &mut cache,
            &new,
            Mixed {
                adapters: m,
                adapter_of_seq: &idx,
            },
        )?,
        None => model.forward_cached(be, &mut cache, &new)?,
    };
    let logits = be.download(&logits)?;
    let id_bytes: Vec<u8> = ids
        .iter()
        .flat_map(|r| (0..longest).map(move |j| r.get(j).map_or(-1i64, |&t| t as i64)))
        .flat_map(i64::to_le_bytes)
        .collect();
    let idx_bytes: Vec<u8> = idx.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
    let logit_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let vocab = logits.len() / n;
    write_safetensors(
        &a.out,
        vec![
            (
                "input_ids".into(),
                safetensors::Dtype::I64,
                vec![n, longest],
                id_bytes,
            ),
            (
                "adapter_index".into(),
                safetensors::Dtype::I64,
                vec![n],
                idx_bytes,
            ),
            (
                "logits".into(),
                safetensors::Dtype::F32,
                vec![n, vocab],
                logit_bytes,
            ),
        ],
    )?;
    println!(
        "{n} rows ({} tokens) in one mixed batch, written to {}",
        ids.iter().map(Vec::len).sum::<usize>(),
        a.out.display()
    );
    Ok(())
}

/// One adapter of `finetune --multi`'s config; what it leaves out comes from the flags.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MultiEntry {
    name: String,
    data: Option<PathBuf>,
    r: Option<usize>,
    lora_alpha: Option<f32>,
    use_rslora: Option<bool>,
    target_modules: Option<Vec<String>>,
    lr: Option<f32>,
    seed: Option<u64>,
    steps: Option<usize>,
    batch_size: Option<usize>,
    warmup_steps: Option<usize>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MultiConfig {
    adapters: Vec<MultiEntry>,
}

/// `finetune --multi CONFIG`: the jobs of the config's adapters (each the flags' job with the
/// entry's fields over it, writing to `--out/<name>`), trained in one pass.
pub(crate) fn finetune_multi<B: Backend>(be: B, a: &FinetuneArgs, config: &Path) -> Result<()> {
    let text = std::fs::read_to_string(config).map_err(|e| Error::io(config, e))?;
    let cfg: MultiConfig = serde_json::from_str(&text).map_err(|e| Error::Json {
        context: config.display().to_string(),
        msg: e.to_string(),
    })?;
    if cfg.adapters.is_empty() {
        return Err(Error::format(config, "`adapters` is empty"));
    }
    let base = finetune_job(a, "runs/smollm2-multi")?;
    if base.recipe.method != Method::Lora {
        return Err(Error::arg(
            "method",
            "--multi trains LoRA adapters (rsLoRA with use_rslora): leave --method at lora",
        ));
    }
    let mut jobs = Vec::with_capacity(cfg.adapters.len());
    for e in cfg.adapters {
        let bad = |m: &str| Error::format(config, format!("adapter `{}`: {m}", e.name));
        if e.name.is_empty() || e.name.contains(['/', '\\', '.']) {
            return Err(bad("a name must be non-empty, without `/`, `\\` or `.`"));
        }
        let mut job = base.clone();
        job.out = base.out.join(&e.name);
        if e.data.is_some() {
            job.data = e.data;
        }
        let (lora, train) = (&mut job.recipe.lora, &mut job.recipe.train);
        lora.r = e.r.unwrap_or(lora.r);
        lora.lora_alpha = e.lora_alpha.unwrap_or(lora.lora_alpha);
        lora.use_rslora = e.use_rslora.unwrap_or(lora.use_rslora);
        if let Some(t) = e.target_modules {
            lora.target_modules = t;
        }
        train.lr = e.lr.unwrap_or(train.lr);
        train.steps = e.steps.unwrap_or(train.steps);
        train.batch_size = e.batch_size.unwrap_or(train.batch_size);
        train.warmup_steps = e.warmup_steps.unwrap_or(train.warmup_steps);
        if let Some(seed) = e.seed {
            job.recipe.seed = seed;
            job.recipe.train.seed = seed;
        }
        jobs.push((e.name, job));
    }
    // One bar for the union steps: it follows the longest run.
    let (longest, steps) = jobs
        .iter()
        .map(|(n, j)| (n.clone(), j.recipe.train.steps))
        .max_by_key(|(_, s)| *s)
        .unwrap_or_default();
    let reports = with_progress(steps, |ev| {
        run_finetune_multi(&be, &jobs, &mut |name, e| match e {
            JobEvent::Step(_) if name != longest => {}
            e => ev(e),
        })
    })?;
    for ((name, job), r) in jobs.iter().zip(&reports) {
        let m = &r.metrics;
        match (m.eval_loss_before, m.eval_loss_after) {
            (Some(b), Some(f)) => println!(
                "{name}: eval loss {b:.4} -> {f:.4} ({:+.1}%)",
                100.0 * (f - b) / b
            ),
            _ => println!("{name}:"),
        }
        print_run(m, r.n_base_params, r.saved, &job.out);
    }
    Ok(())
}

/// `bench --mixed`: median milliseconds of a prefill and of one decode step of the same batch
/// on the base model, on one adapter (the model's own fused path) and spread over K adapters
/// (the mixed-batch path), each timed until `--min-time` (at least 5 runs), interleaved.
pub(crate) fn bench_mixed<B: Backend>(be: B, a: &BenchArgs) -> Result<()> {
    use lorafuse::model::generate::KvCache;
    use lorafuse::model::llama::ComputeDtype;
    use lorafuse::train::job::{load_model, save_trained};
    use lorafuse::train::recipe::{Method, Recipe};
    use rand::{RngExt, SeedableRng};
    if a.seqs == 0 || a.tokens == 0 || a.adapters == 0 || a.rank == 0 {
        return Err(Error::arg(
            "mixed",
            "--seqs, --tokens, --adapters and --rank must be at least 1",
        ));
    }
    let (_, _, mut model) = load_model(&be, a.model.as_deref(), None, &mut |l| eprintln!("{l}"))?;
    model.freeze_bases(&be, ComputeDtype::F32)?;
    let recipe = Recipe {
        method: Method::Lora,
        lora: LoraConfig {
            r: a.rank,
            lora_alpha: 2.0 * a.rank as f32,
            use_rslora: false,
            target_modules: PROJ_NAMES.iter().map(|s| s.to_string()).collect(),
        },
        vera: Default::default(),
        adalora: Default::default(),
        full: Default::default(),
        train: TrainConfig::default(),
        seed: 0,
        nf4: Nf4Spec::default(),
        additive: Default::default(),
        compute_dtype: ComputeDtype::F32,
    };
    // K adapters with lora_B drawn too (PEFT's zero init would make every term vanish).
    let mut sets = Vec::with_capacity(a.adapters);
    for k in 0..a.adapters {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1000 + k as u64);
        model.add_lora(&be, &recipe.lora, k as u64)?;
        let names: Vec<String> = model
            .trainable_params()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for (name, t) in names.iter().zip(model.trainable_params_mut()) {
            if name.contains("lora_B") {
                let v: Vec<f32> = (0..t.len())
                    .map(|_| rng.random_range(-0.02..0.02))
                    .collect();
                *t = be.upload(&v, t.shape())?;
            }
        }
        let dir = a.mixed_dir.join(format!("a{k}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let name = a.model.as_ref().map_or_else(
            || lorafuse::io::fetch::DEFAULT_MODEL_FILE.to_string(),
            |p| p.display().to_string(),
        );
        save_trained(&be, &model, &recipe, &Metrics::default(), &dir, name)?;
        sets.push((format!("a{k}"), model.take_adapters()));
    }
    let multi = MultiAdapters::new(&be, &model, &sets)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let vocab = model.cfg.vocab_size as u32;
    let ids: Vec<Vec<u32>> = (0..a.seqs)
        .map(|_| (0..a.tokens).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    let spread: Vec<i32> = (0..a.seqs).map(|s| (s % a.adapters) as i32).collect();
    write_json(
        &a.mixed_dir.join("batch.json"),
        &serde_json::json!({"input_ids": ids, "adapter_index": spread,
                            "adapters": (0..a.adapters).map(|k| format!("a{k}")).collect::<Vec<_>>()}),
    )?;
    let new: Vec<&[u32]> = ids.iter().map(|r| &r[..]).collect();
    let next: Vec<u32> = (0..a.seqs).map(|s| (s as u32 * 7) % vocab).collect();
    let step: Vec<&[u32]> = next.iter().map(std::slice::from_ref).collect();
    let cap = a.tokens + 1;
    // (name, prefill or decode, how): each run builds its own cache.
    #[derive(Clone, Copy)]
    enum How {
        Base,
        One,
        Mixed,
    }
    let run = |model: &Llama<B>, how: How, decode: bool| -> Result<f64> {
        let mut cache = KvCache::new(&be, model, a.seqs, cap)?;
        let fwd = |cache: &mut KvCache<B>, new: &[&[u32]]| match how {
            How::Mixed => model.forward_cached_multi(
                &be,
                cache,
                new,
                Mixed {
                    adapters: &multi,
                    adapter_of_seq: &spread,
                },
            ),
            How::Base | How::One => model.forward_cached(&be, cache, new),
        };
        if decode {
            be.download(&fwd(&mut cache, &new)?)?;
            let t = std::time::Instant::now();
            be.download(&fwd(&mut cache, &step)?)?;
            Ok(t.elapsed().as_secs_f64())
        } else {
            let t = std::time::Instant::now();
            be.download(&fwd(&mut cache, &new)?)?;
            Ok(t.elapsed().as_secs_f64())
        }
    };
    let mut one = model.clone();
    one.put_adapters(sets[0].1.clone())?;
    let cases: [(&str, How); 3] = [
        ("base model", How::Base),
        ("one adapter", How::One),
        ("mixed", How::Mixed),
    ];
    let mut rows = Vec::new();
    for decode in [false, true] {
        // Warm up, then interleave the three so that drift hits all alike.
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for (c, (_, how)) in cases.iter().enumerate() {
            let m = if matches!(how, How::One) {
                &one
            } else {
                &model
            };
            times[c].push(run(m, *how, decode)?);
            times[c].clear();
        }
        let t0 = std::time::Instant::now();
        while times[0].len() < 5 || t0.elapsed().as_secs_f64() < a.min_time * cases.len() as f64 {
            for (c, (_, how)) in cases.iter().enumerate() {
                let m = if matches!(how, How::One) {
                    &one
                } else {
                    &model
                };
                times[c].push(run(m, *how, decode)?);
            }
        }
        for (c, (name, _)) in cases.iter().enumerate() {
            rows.push(serde_json::json!({
                "phase": if decode { "decode step" } else { "prefill" },
                "case": name,
                "ms": 1e3 * lorafuse::train::trainer::median(&times[c]),
                "reps": times[c].len(),
            }));
        }
    }
    println!(
        "backend {}; {} sequences x {} tokens over {} adapters of rank {} (every projection)",
        be.name(),
        a.seqs,
        a.tokens,
        a.adapters,
        a.rank
    );
    println!(
        "{:<12} {:<12} {:>10} {:>5}",
        "phase", "case", "median ms", "reps"
    );
    for r in &rows {
        println!(
            "{:<12} {:<12} {:>10.2} {:>5}",
            r["phase"].as_str().unwrap_or(""),
            r["case"].as_str().unwrap_or(""),
            r["ms"].as_f64().unwrap_or(0.0),
            r["reps"]
        );
    }
    let report = serde_json::json!({
        "backend": be.name(), "seqs": a.seqs, "tokens": a.tokens, "adapters": a.adapters,
        "rank": a.rank, "threads": rayon::current_num_threads(), "rows": rows,
    });
    let out = a
        .json
        .clone()
        .unwrap_or_else(|| a.mixed_dir.join("ours.json"));
    write_json(&out, &report)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
