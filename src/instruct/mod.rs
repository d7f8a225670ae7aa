//! Building instruction data with a language model: Self-Instruct (Wang et al. 2023, ACL) and
//! Evol-Instruct (Xu et al. 2023, WizardLM). Both ask a model for text through [`Complete`]
//! (any model lorafuse loads, sampled, with the KV cache: [`ModelCompleter`]), filter what comes
//! back with the papers' rules, count what each rule removed, and write Alpaca JSONL
//! (`instruction`, `input`, `output`) that `finetune --data` reads.

pub mod evol_instruct;
pub mod rouge;
pub mod self_instruct;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::chat::{ChatTemplate, Prompt};
use crate::model::generate::Sampling;
use crate::model::llama::Llama;
use crate::model::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One continuation: its text, and whether the model ended it (end-of-turn token) rather than
/// the token limit (a continuation cut by the limit may end mid-item).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub text: String,
    pub finished: bool,
}

/// A language model that continues prompts.
pub trait Complete {
    /// One continuation of at most `max_new` tokens per prompt, in order. Errors: the model's.
    fn complete(&mut self, prompts: &[String], max_new: usize) -> Result<Vec<Completion>>;
}

/// [`Complete`] with a lorafuse model: every prompt is a user turn rendered with `template`
/// (the text as it is without one), all prompts of a call decode in one batch with the KV cache,
/// sampled with `sampling`, whose seed advances by one per call so that calls differ and a run
/// is reproducible.
pub struct ModelCompleter<'a, B: Backend> {
    pub be: &'a B,
    pub model: &'a Llama<B>,
    pub tok: &'a Tokenizer,
    pub template: Option<ChatTemplate>,
    pub system: Option<String>,
    pub sampling: Sampling,
    calls: u64,
}

impl<'a, B: Backend> ModelCompleter<'a, B> {
    /// A completer over `model`. Errors: an invalid sampling rule.
    pub fn new(
        be: &'a B,
        model: &'a Llama<B>,
        tok: &'a Tokenizer,
        template: Option<ChatTemplate>,
        system: Option<String>,
        sampling: Sampling,
    ) -> Result<Self> {
        sampling.validate()?;
        Ok(ModelCompleter {
            be,
            model,
            tok,
            template,
            system,
            sampling,
            calls: 0,
        })
    }
}

impl<B: Backend> Complete for ModelCompleter<'_, B> {
    fn complete(&mut self, prompts: &[String], max_new: usize) -> Result<Vec<Completion>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let ids = prompts
            .iter()
            .map(|p| {
                Prompt::Text(p.clone()).ids(
                    self.template.as_ref(),
                    self.system.as_deref(),
                    self.tok,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let sampling = Sampling {
            seed: self.sampling.seed.wrapping_add(self.calls),
            ..self.sampling
        };
        self.calls += 1;
        let eos = self.tok.eos_id();
        let outs = self.model.generate(self.be, &ids, max_new, eos, sampling)?;
        outs.into_iter()
            .map(|mut o| {
                let finished = o.last() == Some(&eos);
                if finished {
                    o.pop();
                }
                Ok(Completion {
                    text: self.tok.decode(&o)?,
                    finished,
                })
            })
            .collect()
    }
}

/// One Alpaca record, as the pipelines write them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlpacaRecord {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

/// Writes `records` as JSONL (one object per line, UTF-8), atomically. Errors: I/O.
pub fn write_jsonl(path: &Path, records: &[AlpacaRecord]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        let line = serde_json::to_string(r).map_err(|e| Error::Json {
            context: path.display().to_string(),
            msg: e.to_string(),
        })?;
        text.push_str(&line);
        text.push('\n');
    }
    crate::io::atomic::write_atomic(path, text.as_bytes())
}

/// The JSON records of `path` with where each stands (`line N` of JSONL, `record N` of a JSON
/// array, which the file is when it starts with `[`); blank lines are skipped. Errors: an
/// unreadable file, invalid JSON (named by its line).
pub(crate) fn json_records(path: &Path) -> Result<Vec<(String, serde_json::Value)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json_err = |context: String, e: serde_json::Error| Error::Json {
        context,
        msg: e.to_string(),
    };
    if text.trim_start().starts_with('[') {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| json_err(path.display().to_string(), e))?;
        return Ok(v
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("record {i}"), v))
            .collect());
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(line)
            .map_err(|e| json_err(format!("{} line {}", path.display(), i + 1), e))?;
        out.push((format!("line {}", i + 1), v));
    }
    Ok(out)
}

/// The number of whitespace-separated words.
pub(crate) fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

/// Lowercased, whitespace collapsed: the form two texts are compared in.
pub(crate) fn normalized(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}
