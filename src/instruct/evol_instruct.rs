//! Evol-Instruct (Xu et al. 2023, "WizardLM: Empowering Large Language Models to Follow Complex
//! Instructions", section 3): rewrite instructions into harder ones (in-depth evolving: add
//! constraints, deepen, concretize, more reasoning steps) or into new ones of the same domain
//! (in-breadth evolving), with the paper's rewriting prompts, over several generations.
//!
//! Each generation evolves every instruction of the pool once (the evolution drawn uniformly
//! from the five), answers each evolved instruction, and eliminates, as the paper's section 3.3
//! does: (1) no information gain: the model, asked the paper's equality question, answers
//! "Equal", or the two are the same text after lowercasing and collapsing whitespace; (2) the
//! answer is a refusal: it contains "sorry" and has fewer than 80 words; (3) the answer is only
//! punctuation and stop words; (4) the evolved instruction copies words of the evolving prompt
//! ("given prompt", "rewritten prompt", "created prompt", "#The Given Prompt#", ...); empty
//! rewrites are counted too. A survivor replaces its parent in the next generation's pool; a
//! failed evolution puts its parent back.

use super::{AlpacaRecord, Complete, normalized, words};
use crate::error::{Error, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// The five evolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Evolution {
    /// In-depth: add one more constraint or requirement.
    Constraints,
    /// In-depth: increase the depth and breadth of the inquiry.
    Deepening,
    /// In-depth: replace general concepts with more specific ones.
    Concretizing,
    /// In-depth: ask for multiple-step reasoning.
    Reasoning,
    /// In-breadth: a new, rarer instruction of the same domain.
    Breadth,
}

impl Evolution {
    pub const ALL: [Evolution; 5] = [
        Evolution::Constraints,
        Evolution::Deepening,
        Evolution::Concretizing,
        Evolution::Reasoning,
        Evolution::Breadth,
    ];

    /// The in-depth method sentence of the paper's rewriting prompt (`None` for in-breadth).
    fn method(self) -> Option<&'static str> {
        Some(match self {
            Evolution::Constraints => {
                "Please add one more constraints/requirements into #The Given Prompt#'"
            }
            Evolution::Deepening => {
                "If #The Given Prompt# contains inquiries about certain issues, the depth and \
                 breadth of the inquiry can be increased."
            }
            Evolution::Concretizing => {
                "Please replace general concepts with more specific concepts."
            }
            Evolution::Reasoning => {
                "If #The Given Prompt# can be solved with just a few simple thinking processes, \
                 you can rewrite it to explicitly request multiple-step reasoning."
            }
            Evolution::Breadth => return None,
        })
    }

    /// The paper's rewriting prompt for `instruction`.
    pub fn prompt(self, instruction: &str) -> String {
        match self.method() {
            Some(method) => format!(
                "I want you act as a Prompt Rewriter.\n\
                 Your objective is to rewrite a given prompt into a more complex version to make \
                 those famous AI systems (e.g., chatgpt and GPT4) a bit harder to handle.\n\
                 But the rewritten prompt must be reasonable and must be understood and responded \
                 by humans.\n\
                 Your rewriting cannot omit the non-text parts such as the table and code in #The \
                 Given Prompt#:. Also, please do not omit the input in #The Given Prompt#.\n\
                 You SHOULD complicate the given prompt using the following method:\n\
                 {method}\n\
                 You should try your best not to make the #Rewritten Prompt# become verbose, \
                 #Rewritten Prompt# can only add 10 to 20 words into #The Given Prompt#.\n\
                 '#The Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten \
                 prompt' are not allowed to appear in #Rewritten Prompt#\n\
                 #The Given Prompt#:\n{instruction}\n#Rewritten Prompt#:\n"
            ),
            None => format!(
                "I want you act as a Prompt Creator.\n\
                 Your goal is to draw inspiration from the #Given Prompt# to create a brand new \
                 prompt.\n\
                 This new prompt should belong to the same domain as the #Given Prompt# but be \
                 even more rare.\n\
                 The LENGTH and complexity of the #Created Prompt# should be similar to that of \
                 the #Given Prompt#.\n\
                 The #Created Prompt# must be reasonable and must be understood and responded by \
                 humans.\n\
                 '#Given Prompt#', '#Created Prompt#', 'given prompt' and 'created prompt' are \
                 not allowed to appear in #Created Prompt#\n\
                 #Given Prompt#:\n{instruction}\n#Created Prompt#:\n"
            ),
        }
    }
}

/// The paper's equality question (elimination rule 1).
pub fn equality_prompt(first: &str, second: &str) -> String {
    format!(
        "Here are two Instructions to ChatGPT AI, do you think they are equal to each other, \
         which meet the following requirements:\n\
         1. They have same constraints and requirments.\n\
         2. They have same depth and breadth of the inquiry.\n\
         The First Prompt: {first}\n\
         The Second Prompt: {second}\n\
         Your Judgement (Just answer: Equal or Not Equal. No need to explain the reason.):"
    )
}

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct EvolConfig {
    /// Generations (the paper ran 4).
    pub generations: usize,
    /// Token limit of a rewritten instruction.
    pub max_instruction_tokens: usize,
    /// Token limit of an answer.
    pub max_response_tokens: usize,
    /// Prompts per model call (one batch).
    pub batch_size: usize,
    /// Seed of the evolution draws.
    pub seed: u64,
}

impl Default for EvolConfig {
    fn default() -> Self {
        EvolConfig {
            generations: 4,
            max_instruction_tokens: 128,
            max_response_tokens: 256,
            batch_size: 8,
            seed: 42,
        }
    }
}

/// What each rule eliminated, over all generations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EvolReport {
    pub generations: usize,
    /// Evolutions attempted, by kind (in [`Evolution::ALL`]'s order).
    pub attempted: [usize; 5],
    /// Empty rewrites.
    pub empty: usize,
    /// Rule 4: the rewrite copies words of the evolving prompt.
    pub copied_prompt: usize,
    /// Rule 1: judged equal to its parent.
    pub no_information_gain: usize,
    /// Rule 2: the answer is a short refusal.
    pub refusal: usize,
    /// Rule 3: the answer is only punctuation and stop words.
    pub empty_answer: usize,
    /// Evolutions kept, by kind.
    pub kept: [usize; 5],
}

impl EvolReport {
    /// A table of the counts.
    pub fn table(&self) -> String {
        let names = [
            "constraints",
            "deepening",
            "concretizing",
            "reasoning",
            "breadth",
        ];
        let mut s = format!("{:<40} {:>6}\n", "generations", self.generations);
        for (i, n) in names.iter().enumerate() {
            s.push_str(&format!(
                "{:<40} {:>6}\n",
                format!("{n}: attempted / kept"),
                format!("{}/{}", self.attempted[i], self.kept[i])
            ));
        }
        for (k, v) in [
            ("eliminated: empty rewrite", self.empty),
            ("eliminated: copies the evolving prompt", self.copied_prompt),
            ("eliminated: no information gain", self.no_information_gain),
            ("eliminated: refusal (sorry, < 80 words)", self.refusal),
            ("eliminated: only punctuation/stop words", self.empty_answer),
            ("evolved instructions written", self.kept.iter().sum()),
        ] {
            s.push_str(&format!("{k:<40} {v:>6}\n"));
        }
        s
    }
}

const COPIED: [&str; 6] = [
    "given prompt",
    "rewritten prompt",
    "created prompt",
    "#the given prompt#",
    "#rewritten prompt#",
    "#created prompt#",
];

/// English stop words (rule 3 keeps an answer with any other word).
const STOP_WORDS: [&str; 120] = [
    "a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are",
    "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but",
    "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for",
    "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "herself",
    "him", "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just",
    "me", "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on", "once",
    "only", "or", "other", "our", "ours", "out", "over", "own", "same", "she", "should", "so",
    "some", "such", "than", "that", "the", "their", "them", "then", "there", "these", "they",
    "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were",
    "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with", "you", "your",
    "yours",
];

/// Rule 3: nothing but punctuation and stop words.
pub fn only_stop_words(answer: &str) -> bool {
    super::rouge::tokens(answer)
        .iter()
        .all(|t| STOP_WORDS.contains(&t.as_str()))
}

/// Rule 2: a refusal ("sorry" and fewer than 80 words).
pub fn is_refusal(answer: &str) -> bool {
    answer.to_lowercase().contains("sorry") && words(answer) < 80
}

/// Rule 4: the rewrite copies words of the evolving prompt.
pub fn copies_prompt(rewrite: &str) -> bool {
    let l = rewrite.to_lowercase();
    COPIED.iter().any(|c| l.contains(c))
}

/// Runs Evol-Instruct over `instructions` (see the module docs) and returns every surviving
/// evolved instruction with its answer, generation by generation, and the report. `progress`
/// is called with the number of evolutions done. Errors: zero generations or batch size, no
/// instruction, the model's errors.
pub fn evol_instruct(
    model: &mut dyn Complete,
    instructions: &[String],
    cfg: &EvolConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<(Vec<AlpacaRecord>, EvolReport)> {
    if cfg.generations == 0 || cfg.batch_size == 0 {
        return Err(Error::arg(
            "generations",
            "generations and batch size must be at least 1",
        ));
    }
    if instructions.is_empty() {
        return Err(Error::arg("instructions", "no instruction to evolve"));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut pool: Vec<String> = instructions.to_vec();
    let mut report = EvolReport::default();
    let mut records = Vec::new();
    let mut done = 0usize;
    for _ in 0..cfg.generations {
        report.generations += 1;
        let mut next = pool.clone();
        for chunk_start in (0..pool.len()).step_by(cfg.batch_size) {
            let idx: Vec<usize> =
                (chunk_start..(chunk_start + cfg.batch_size).min(pool.len())).collect();
            let kinds: Vec<usize> = idx
                .iter()
                .map(|_| rng.random_range(0..Evolution::ALL.len()))
                .collect();
            let prompts: Vec<String> = idx
                .iter()
                .zip(&kinds)
                .map(|(&i, &k)| Evolution::ALL[k].prompt(&pool[i]))
                .collect();
            let rewrites = model.complete(&prompts, cfg.max_instruction_tokens)?;
            // Rules 4 and the empty rewrite, then 1 (the equality question) on the rest.
            let mut alive: Vec<(usize, usize, String)> = Vec::new();
            for ((&i, &k), r) in idx.iter().zip(&kinds).zip(&rewrites) {
                report.attempted[k] += 1;
                let text = r.text.trim().to_string();
                if text.is_empty() {
                    report.empty += 1;
                } else if copies_prompt(&text) {
                    report.copied_prompt += 1;
                } else if normalized(&text) == normalized(&pool[i]) {
                    report.no_information_gain += 1;
                } else {
                    alive.push((i, k, text));
                }
            }
            let q: Vec<String> = alive
                .iter()
                .map(|(i, _, t)| equality_prompt(&pool[*i], t))
                .collect();
            let judged = model.complete(&q, 4)?;
            let mut alive2 = Vec::new();
            for (a, j) in alive.into_iter().zip(&judged) {
                if j.text.trim_start().to_lowercase().starts_with("equal") {
                    report.no_information_gain += 1;
                } else {
                    alive2.push(a);
                }
            }
            // Rules 2 and 3 on the answers.
            let q: Vec<String> = alive2.iter().map(|(_, _, t)| t.clone()).collect();
            let answers = model.complete(&q, cfg.max_response_tokens)?;
            for ((i, k, t), a) in alive2.into_iter().zip(&answers) {
                let ans = a.text.trim().to_string();
                if is_refusal(&ans) {
                    report.refusal += 1;
                } else if only_stop_words(&ans) {
                    report.empty_answer += 1;
                } else {
                    report.kept[k] += 1;
                    next[i] = t.clone();
                    records.push(AlpacaRecord {
                        instruction: t,
                        input: String::new(),
                        output: ans,
                    });
                }
            }
            done += idx.len();
            progress(done);
        }
        pool = next;
    }
    Ok((records, report))
}

/// The instructions of an instruction file: JSONL or a JSON array of objects with an
/// `instruction` (Alpaca; a non-empty `input` is appended after a blank line, as `finetune`
/// builds the user turn), `prompt` or `question` string. Errors: an unreadable file, a record
/// without one (named by its line or index), no instruction.
pub fn read_instructions(path: &std::path::Path) -> Result<Vec<String>> {
    let values = super::json_records(path)?;
    let mut out = Vec::new();
    for (at, v) in values {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::trim);
        let inst = s("instruction").or(s("prompt")).or(s("question"));
        let Some(inst) = inst.filter(|x| !x.is_empty()) else {
            return Err(Error::format(
                path,
                format!("{at}: no `instruction`, `prompt` or `question` string"),
            ));
        };
        out.push(match s("input").filter(|x| !x.is_empty()) {
            Some(input) => format!("{inst}\n\n{input}"),
            None => inst.to_string(),
        });
    }
    if out.is_empty() {
        return Err(Error::format(path, "no instruction"));
    }
    Ok(out)
}
