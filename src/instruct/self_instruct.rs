//! Self-Instruct (Wang et al. 2023, "Self-Instruct: Aligning Language Models with
//! Self-Generated Instructions", section 2): grow a pool of instructions from a few seed tasks
//! with the model's own completions.
//!
//! Each round: (1) prompt the model with `num_prompt_instructions` tasks from the pool (6 human
//! seeds and 2 machine-written ones once there are, shuffled; the paper's "Come up with a series
//! of tasks" template) and read the new tasks it lists; (2) filter them: 3 to 150 words, none of
//! the paper's keywords of tasks a language model cannot do (image, graph, picture, file, map,
//! draw, plot, go to; "Write a program"), starting with an ASCII letter or digit, and ROUGE-L
//! against every instruction in the pool at most 0.7; (3) ask whether each kept task is a
//! classification task (few-shot from the seeds' labels); (4) generate its instances,
//! input-first for other tasks and output-first (class label, then an input for it) for
//! classification tasks; (5) drop instances with an empty output, an input equal to the
//! output, or a duplicate, and tasks left with none. Every removal is counted.

use super::rouge;
use super::{AlpacaRecord, Complete, normalized, words};
use crate::error::{Error, Result};
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One input/output example of a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    #[serde(default)]
    pub input: String,
    pub output: String,
}

/// A task: its instruction, examples, and whether its outputs are a finite set of labels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedTask {
    pub instruction: String,
    pub instances: Vec<Instance>,
    #[serde(default)]
    pub is_classification: bool,
}

#[derive(Deserialize)]
struct AlpacaSeed {
    instruction: String,
    #[serde(default)]
    input: String,
    output: String,
    #[serde(default)]
    is_classification: bool,
}

/// Reads seed tasks (JSONL, or a JSON array): the Self-Instruct release's
/// `seed_tasks.jsonl` form (`instruction`, `instances: [{input, output}]`, `is_classification`;
/// other fields ignored) or an Alpaca record (`instruction`, `input`, `output`, optional
/// `is_classification`). Errors: an unreadable file, a record that is neither (named by its
/// line or index), a task without instances, no task at all.
pub fn read_seed_tasks(path: &Path) -> Result<Vec<SeedTask>> {
    let mut out = Vec::new();
    for (at, v) in super::json_records(path)? {
        let bad = |m: String| Error::format(path, format!("{at}: {m}"));
        let task = if v.get("instances").is_some() {
            serde_json::from_value::<SeedTask>(v).map_err(|e| bad(e.to_string()))?
        } else {
            let a: AlpacaSeed = serde_json::from_value(v).map_err(|e| {
                bad(format!(
                    "neither a seed task (instruction, instances) nor an Alpaca record ({e})"
                ))
            })?;
            SeedTask {
                instruction: a.instruction,
                instances: vec![Instance {
                    input: a.input,
                    output: a.output,
                }],
                is_classification: a.is_classification,
            }
        };
        if task.instruction.trim().is_empty() || task.instances.is_empty() {
            return Err(bad(
                "a task needs an instruction and at least one instance".into()
            ));
        }
        out.push(task);
    }
    if out.is_empty() {
        return Err(Error::format(path, "no seed task"));
    }
    Ok(out)
}

/// Settings of a run (the paper's values as defaults).
#[derive(Clone, Debug)]
pub struct SelfInstructConfig {
    /// New instructions to collect.
    pub num_instructions: usize,
    /// Tasks shown in each generation prompt (paper: 8).
    pub num_prompt_instructions: usize,
    /// Of those, machine-written ones once the pool has them (paper: 2).
    pub num_machine_instructions: usize,
    /// A new instruction whose ROUGE-L with any pool instruction exceeds this is dropped
    /// (paper: 0.7).
    pub rouge_threshold: f64,
    /// Generation prompts per round (one batch).
    pub prompts_per_round: usize,
    /// Rounds after which the run stops even with fewer instructions.
    pub max_rounds: usize,
    /// Token limit of each completion.
    pub max_new_tokens: usize,
    /// Seed of the prompt sampling.
    pub seed: u64,
}

impl Default for SelfInstructConfig {
    fn default() -> Self {
        SelfInstructConfig {
            num_instructions: 100,
            num_prompt_instructions: 8,
            num_machine_instructions: 2,
            rouge_threshold: 0.7,
            prompts_per_round: 8,
            max_rounds: 50,
            max_new_tokens: 256,
            seed: 42,
        }
    }
}

impl SelfInstructConfig {
    /// Errors: zero instructions, prompt tasks, prompts per round or tokens; a threshold outside
    /// `[0, 1]`; more machine than prompt tasks.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("num_instructions", self.num_instructions),
            ("num_prompt_instructions", self.num_prompt_instructions),
            ("prompts_per_round", self.prompts_per_round),
            ("max_rounds", self.max_rounds),
            ("max_new_tokens", self.max_new_tokens),
        ] {
            if v == 0 {
                return Err(Error::arg(name, "must be at least 1"));
            }
        }
        if self.num_machine_instructions > self.num_prompt_instructions {
            return Err(Error::arg(
                "num_machine_instructions",
                "cannot exceed num_prompt_instructions",
            ));
        }
        if !(0.0..=1.0).contains(&self.rouge_threshold) {
            return Err(Error::arg("rouge_threshold", "must lie in [0, 1]"));
        }
        Ok(())
    }
}

/// What each filter removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SelfInstructReport {
    pub rounds: usize,
    /// Instructions read from the completions.
    pub candidates: usize,
    /// Fewer than 3 words.
    pub too_short: usize,
    /// More than 150 words.
    pub too_long: usize,
    /// A keyword of tasks a language model cannot do.
    pub keyword: usize,
    /// Not starting with an ASCII letter or digit (punctuation, another script).
    pub bad_start: usize,
    /// ROUGE-L above the threshold with an instruction in the pool (duplicates included).
    pub too_similar: usize,
    /// Read from a completion the token limit cut (the last item may be unfinished).
    pub cut_off: usize,
    /// Kept instructions judged classification tasks.
    pub classification: usize,
    /// Instructions dropped because no valid instance was generated.
    pub no_instances: usize,
    /// Instances dropped: empty output.
    pub empty_output: usize,
    /// Instances dropped: input equal to the output.
    pub input_is_output: usize,
    /// Instances dropped: the same input and output twice.
    pub duplicate_instances: usize,
    /// Instructions kept (with at least one instance).
    pub instructions: usize,
    /// Instances written.
    pub instances: usize,
}

impl SelfInstructReport {
    /// A table of the counts, one filter per line.
    pub fn table(&self) -> String {
        let rows: [(&str, usize); 14] = [
            ("rounds", self.rounds),
            ("instructions generated", self.candidates),
            ("  cut off by the token limit", self.cut_off),
            ("  fewer than 3 words", self.too_short),
            ("  more than 150 words", self.too_long),
            ("  unsupported-task keyword", self.keyword),
            ("  bad first character", self.bad_start),
            ("  ROUGE-L > threshold with the pool", self.too_similar),
            ("  no valid instance", self.no_instances),
            ("instructions kept", self.instructions),
            ("  of them classification", self.classification),
            ("instances dropped: empty output", self.empty_output),
            ("instances dropped: input = output", self.input_is_output),
            ("instances dropped: duplicate", self.duplicate_instances),
        ];
        let mut s = String::new();
        for (k, v) in rows {
            s.push_str(&format!("{k:<40} {v:>6}\n"));
        }
        s.push_str(&format!(
            "{:<40} {:>6}\n",
            "instances written", self.instances
        ));
        s
    }
}

/// Keywords of tasks a language model cannot do (the paper's filter), matched as whole words.
const KEYWORDS: [&str; 13] = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to",
];

/// Why an instruction is dropped, or `None`.
fn instruction_filter(inst: &str) -> Option<fn(&mut SelfInstructReport) -> &mut usize> {
    let n = words(inst);
    if n < 3 {
        return Some(|r| &mut r.too_short);
    }
    if n > 150 {
        return Some(|r| &mut r.too_long);
    }
    let lower = format!(" {} ", rouge::tokens(inst).join(" "));
    if KEYWORDS.iter().any(|k| lower.contains(&format!(" {k} ")))
        || inst.starts_with("Write a program")
    {
        return Some(|r| &mut r.keyword);
    }
    if !inst
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return Some(|r| &mut r.bad_start);
    }
    None
}

/// The paper's instruction-generation prompt: the tasks numbered, then `Task {n+1}:`.
pub fn instruction_prompt(tasks: &[&str]) -> String {
    let mut p = String::from("Come up with a series of tasks:\n\n");
    for (i, t) in tasks.iter().enumerate() {
        p.push_str(&format!("Task {}: {}\n", i + 1, t.trim()));
    }
    p.push_str(&format!("Task {}:", tasks.len() + 1));
    p
}

/// Whether `line` starts a new item `Task N:`; returns the rest of the line.
fn task_marker(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("Task")?.trim_start();
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    rest[digits..].trim_start().strip_prefix(':')
}

/// The instructions a completion of [`instruction_prompt`] lists: the text up to the first
/// `Task N:` line is the first one, each `Task N:` starts the next. Empty items are skipped.
pub fn parse_instructions(completion: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    for line in completion.lines() {
        match task_marker(line) {
            Some(rest) => items.push(rest.trim().to_string()),
            None => {
                let cur = items.last_mut().expect("one item");
                if !cur.is_empty() {
                    cur.push('\n');
                }
                cur.push_str(line.trim());
            }
        }
    }
    items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The paper's classification-identification prompt, few-shot from `examples`
/// (instruction, is classification).
pub fn classification_prompt(examples: &[(&str, bool)], task: &str) -> String {
    let mut p = String::from(
        "Can the following task be regarded as a classification task with finite output labels?\n\n",
    );
    for (inst, yes) in examples {
        p.push_str(&format!(
            "Task: {}\nIs it classification? {}\n\n",
            inst.trim(),
            if *yes { "Yes" } else { "No" }
        ));
    }
    p.push_str(&format!("Task: {}\nIs it classification?", task.trim()));
    p
}

/// The paper's input-first instance prompt, few-shot from `examples`.
pub fn input_first_prompt(examples: &[&SeedTask], task: &str) -> String {
    let mut p = String::from(
        "Come up with examples for the following tasks. Try to generate multiple examples when \
         possible. If the task doesn't require additional input, you can generate the output \
         directly.\n\n",
    );
    for t in examples {
        p.push_str(&format!("Task: {}\n", t.instruction.trim()));
        for (i, inst) in t.instances.iter().enumerate() {
            p.push_str(&format!("Example {}\n", i + 1));
            if !inst.input.trim().is_empty() {
                p.push_str(&format!("Input: {}\n", inst.input.trim()));
            }
            p.push_str(&format!("Output: {}\n", inst.output.trim()));
        }
        p.push('\n');
    }
    p.push_str(&format!("Task: {}\n", task.trim()));
    p
}

/// The paper's output-first instance prompt (classification), few-shot from `examples`.
pub fn output_first_prompt(examples: &[&SeedTask], task: &str) -> String {
    let mut p = String::from(
        "Given the classification task definition and the class labels, generate an input that \
         corresponds to each of the class labels. If the task doesn't require input, just \
         generate the correct class label.\n\n",
    );
    for t in examples {
        p.push_str(&format!("Task: {}\n", t.instruction.trim()));
        for inst in &t.instances {
            p.push_str(&format!("Class label: {}\n", inst.output.trim()));
            if !inst.input.trim().is_empty() {
                p.push_str(&format!("Input: {}\n", inst.input.trim()));
            }
        }
        p.push('\n');
    }
    p.push_str(&format!("Task: {}\n", task.trim()));
    p
}

/// The completion up to the next `Task:` line (the model going on to another task).
fn this_task(completion: &str) -> Vec<&str> {
    completion
        .lines()
        .take_while(|l| !l.trim_start().starts_with("Task:"))
        .collect()
}

/// Splits `lines` into fields that start with one of `keys` (`"Input:"`), in order.
fn fields(lines: &[&str], keys: &[&str]) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for line in lines {
        let t = line.trim();
        if let Some((k, rest)) = keys
            .iter()
            .enumerate()
            .find_map(|(k, key)| t.strip_prefix(key).map(|r| (k, r)))
        {
            out.push((k, rest.trim().to_string()));
        } else if let Some((_, cur)) = out.last_mut() {
            if !cur.is_empty() {
                cur.push('\n');
            }
            cur.push_str(t);
        }
    }
    for (_, v) in &mut out {
        *v = v.trim().to_string();
    }
    out
}

/// The instances of an input-first completion: `Example N` blocks of an optional `Input:` and an
/// `Output:` (a completion without `Example` lines is one block).
pub fn parse_input_first(completion: &str) -> Vec<Instance> {
    let lines = this_task(completion);
    let mut out = Vec::new();
    let (mut input, mut output): (Option<String>, Option<String>) = (None, None);
    let mut flush = |input: &mut Option<String>, output: &mut Option<String>| {
        if let Some(o) = output.take() {
            out.push(Instance {
                input: input.take().unwrap_or_default(),
                output: o,
            });
        }
        *input = None;
    };
    for (k, v) in fields(&lines, &["Example", "Input:", "Output:"]) {
        match k {
            0 => flush(&mut input, &mut output),
            1 => {
                if output.is_some() {
                    flush(&mut input, &mut output);
                }
                input = Some(v);
            }
            _ => {
                if output.is_some() {
                    flush(&mut input, &mut output);
                }
                output = Some(v);
            }
        }
    }
    flush(&mut input, &mut output);
    out
}

/// The instances of an output-first completion: each `Class label:` with the `Input:` after it
/// (none when the task needs no input).
pub fn parse_output_first(completion: &str) -> Vec<Instance> {
    let lines = this_task(completion);
    let mut out: Vec<Instance> = Vec::new();
    for (k, v) in fields(&lines, &["Class label:", "Input:"]) {
        match k {
            0 => out.push(Instance {
                input: String::new(),
                output: v,
            }),
            _ => {
                if let Some(last) = out.last_mut()
                    && last.input.is_empty()
                {
                    last.input = v;
                }
            }
        }
    }
    out
}

/// Runs Self-Instruct from `seeds` (see the module docs) and returns the Alpaca records (one
/// per instance) and the report. `progress` is called with the number of instructions kept
/// after each round. Errors: invalid settings, no seed task, the model's errors.
pub fn self_instruct(
    model: &mut dyn Complete,
    seeds: &[SeedTask],
    cfg: &SelfInstructConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<(Vec<AlpacaRecord>, SelfInstructReport)> {
    cfg.validate()?;
    if seeds.is_empty() {
        return Err(Error::arg("seed_tasks", "no seed task"));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut report = SelfInstructReport::default();
    let mut pool_tokens: Vec<Vec<String>> = seeds
        .iter()
        .map(|s| rouge::tokens(&s.instruction))
        .collect();
    let mut machine: Vec<String> = Vec::new();
    // Few-shot examples for the classification question: up to 12 classification and 19 other
    // seed tasks (the paper's counts), in a seeded order.
    let mut order: Vec<usize> = (0..seeds.len()).collect();
    order.shuffle(&mut rng);
    let cls_examples: Vec<(&str, bool)> = {
        let yes = order
            .iter()
            .filter(|&&i| seeds[i].is_classification)
            .take(12);
        let no = order
            .iter()
            .filter(|&&i| !seeds[i].is_classification)
            .take(19);
        let mut v: Vec<usize> = yes.chain(no).copied().collect();
        v.shuffle(&mut rng);
        v.iter()
            .map(|&i| (seeds[i].instruction.as_str(), seeds[i].is_classification))
            .collect()
    };
    let examples_of = |cls: bool, rng: &mut ChaCha8Rng| -> Vec<&SeedTask> {
        let mut v: Vec<&SeedTask> = seeds
            .iter()
            .filter(|s| s.is_classification == cls)
            .collect();
        if v.is_empty() {
            v = seeds.iter().collect();
        }
        v.shuffle(rng);
        v.truncate(3);
        v
    };
    let mut records = Vec::new();
    while report.instructions < cfg.num_instructions && report.rounds < cfg.max_rounds {
        report.rounds += 1;
        // (1) New instructions.
        let prompts: Vec<String> = (0..cfg.prompts_per_round)
            .map(|_| {
                let n_machine = cfg.num_machine_instructions.min(machine.len());
                let mut shown: Vec<&str> = machine
                    .sample(&mut rng, n_machine)
                    .map(String::as_str)
                    .collect();
                let n_human = (cfg.num_prompt_instructions - n_machine).min(seeds.len());
                shown.extend(
                    seeds
                        .sample(&mut rng, n_human)
                        .map(|s| s.instruction.as_str()),
                );
                shown.shuffle(&mut rng);
                instruction_prompt(&shown)
            })
            .collect();
        let outs = model.complete(&prompts, cfg.max_new_tokens)?;
        // (2) Filters.
        let mut fresh: Vec<String> = Vec::new();
        for c in &outs {
            let mut items = parse_instructions(&c.text);
            report.candidates += items.len();
            if !c.finished && !items.is_empty() {
                items.pop();
                report.cut_off += 1;
            }
            for inst in items {
                if let Some(counter) = instruction_filter(&inst) {
                    *counter(&mut report) += 1;
                    continue;
                }
                let t = rouge::tokens(&inst);
                if pool_tokens
                    .iter()
                    .any(|p| rouge::rouge_l_tokens(p, &t) > cfg.rouge_threshold)
                {
                    report.too_similar += 1;
                    continue;
                }
                pool_tokens.push(t);
                fresh.push(inst);
            }
        }
        if fresh.is_empty() {
            progress(report.instructions);
            continue;
        }
        // (3) Classification or not.
        let q: Vec<String> = fresh
            .iter()
            .map(|t| classification_prompt(&cls_examples, t))
            .collect();
        let answers = model.complete(&q, 3)?;
        let is_cls: Vec<bool> = answers
            .iter()
            .map(|a| a.text.trim_start().to_lowercase().starts_with("yes"))
            .collect();
        // (4) Instances.
        let q: Vec<String> = fresh
            .iter()
            .zip(&is_cls)
            .map(|(t, &cls)| {
                let ex = examples_of(cls, &mut rng);
                if cls {
                    output_first_prompt(&ex, t)
                } else {
                    input_first_prompt(&ex, t)
                }
            })
            .collect();
        let inst_outs = model.complete(&q, cfg.max_new_tokens)?;
        // (5) Instance filters.
        for ((inst, &cls), c) in fresh.iter().zip(&is_cls).zip(&inst_outs) {
            if report.instructions >= cfg.num_instructions {
                break;
            }
            let parsed = if cls {
                parse_output_first(&c.text)
            } else {
                parse_input_first(&c.text)
            };
            let mut kept: Vec<Instance> = Vec::new();
            for x in parsed {
                if x.output.trim().is_empty() {
                    report.empty_output += 1;
                } else if normalized(&x.input) == normalized(&x.output) {
                    report.input_is_output += 1;
                } else if kept.contains(&x) {
                    report.duplicate_instances += 1;
                } else {
                    kept.push(x);
                }
            }
            if kept.is_empty() {
                report.no_instances += 1;
                continue;
            }
            report.instructions += 1;
            report.classification += usize::from(cls);
            report.instances += kept.len();
            machine.push(inst.clone());
            records.extend(kept.into_iter().map(|x| AlpacaRecord {
                instruction: inst.clone(),
                input: x.input,
                output: x.output,
            }));
        }
        progress(report.instructions);
    }
    Ok((records, report))
}
