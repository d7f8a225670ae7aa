//! `lorafuse self-instruct` and `lorafuse evol-instruct`: the pipelines of `lorafuse::instruct`
//! on a loaded model, with a progress bar and the filter counts.

use crate::cli::{EvolInstructArgs, SelfInstructArgs, SynthArgs};
use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::backend::Backend;
use lorafuse::instruct::evol_instruct::{EvolConfig, evol_instruct, read_instructions};
use lorafuse::instruct::self_instruct::{SelfInstructConfig, read_seed_tasks, self_instruct};
use lorafuse::instruct::{AlpacaRecord, ModelCompleter, write_jsonl};
use lorafuse::model::generate::Sampling;
use lorafuse::train::job::{load_model, prompt_template};
use lorafuse::train::report::write_json;
use lorafuse::{Error, Result};

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})")
    {
        pb.set_style(style);
    }
    pb.set_message(what.to_string());
    pb
}

fn sampling(a: &SynthArgs) -> Sampling {
    Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    }
}

/// Loads the model and runs `body` with a completer over it.
fn with_completer<B: Backend, T>(
    be: B,
    a: &SynthArgs,
    body: impl FnOnce(&mut ModelCompleter<'_, B>) -> Result<T>,
) -> Result<T> {
    sampling(a).validate()?;
    let (path, tok, model) = load_model(&be, a.model.model.as_deref(), None, &mut |l| {
        eprintln!("{l}")
    })?;
    let template = if a.raw {
        None
    } else {
        Some(prompt_template(&path, &tok, Some(&a.chat.chat_template))?)
    };
    let mut c = ModelCompleter::new(
        &be,
        &model,
        &tok,
        template,
        a.chat.system.clone(),
        sampling(a),
    )?;
    body(&mut c)
}

/// Checks the outputs before any generation: `--out` is not a folder, and the folders of
/// `--out` and `--report` exist (created when missing), so a long run cannot fail at its end.
fn check_out(a: &SynthArgs) -> Result<()> {
    if a.out.is_dir() {
        return Err(Error::arg(
            "out",
            format!(
                "{} is a folder; give the JSONL file to write",
                a.out.display()
            ),
        ));
    }
    for p in std::iter::once(&a.out).chain(a.report.as_ref()) {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    Ok(())
}

/// Writes the records and the report (`--report`), and prints the filter table and a summary.
fn write_outputs(
    a: &SynthArgs,
    records: &[AlpacaRecord],
    report: &impl serde::Serialize,
    table: &str,
    what: &str,
) -> Result<()> {
    write_jsonl(&a.out, records)?;
    if let Some(p) = &a.report {
        write_json(p, report)?;
    }
    print!("{table}");
    println!("{} {what} written to {}", records.len(), a.out.display());
    Ok(())
}

pub(crate) fn self_instruct_on<B: Backend>(be: B, a: &SelfInstructArgs) -> Result<()> {
    check_out(&a.common)?;
    let seeds = read_seed_tasks(&a.seed_tasks)?;
    let cfg = SelfInstructConfig {
        num_instructions: a.num_instructions,
        num_prompt_instructions: a.num_prompt_instructions,
        prompts_per_round: a.prompts_per_round,
        max_rounds: a.max_rounds,
        rouge_threshold: a.rouge_threshold,
        max_new_tokens: a.max_new_tokens,
        seed: a.common.seed,
        ..SelfInstructConfig::default()
    };
    cfg.validate()?;
    let (records, report) = with_completer(be, &a.common, |c| {
        let pb = bar(cfg.num_instructions as u64, "self-instruct");
        let r = self_instruct(c, &seeds, &cfg, &mut |n| pb.set_position(n as u64));
        pb.finish_and_clear();
        r
    })?;
    let table = report.table();
    let what = format!("records from {} seed tasks", seeds.len());
    write_outputs(&a.common, &records, &report, &table, &what)
}

pub(crate) fn evol_instruct_on<B: Backend>(be: B, a: &EvolInstructArgs) -> Result<()> {
    check_out(&a.common)?;
    let instructions = read_instructions(&a.instructions)?;
    let cfg = EvolConfig {
        generations: a.generations,
        max_instruction_tokens: a.max_instruction_tokens,
        max_response_tokens: a.max_response_tokens,
        batch_size: a.batch_size,
        seed: a.common.seed,
    };
    let total = (instructions.len() * cfg.generations) as u64;
    let (records, report) = with_completer(be, &a.common, |c| {
        let pb = bar(total, "evol-instruct");
        let r = evol_instruct(c, &instructions, &cfg, &mut |n| pb.set_position(n as u64));
        pb.finish_and_clear();
        r
    })?;
    let table = report.table();
    let what = format!("evolved records from {} instructions", instructions.len());
    write_outputs(&a.common, &records, &report, &table, &what)
}
