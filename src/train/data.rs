//! Instruction-tuning data: the embedded default dataset, loading user datasets, the
//! train/eval split, the ChatML template, tokenization with label masking, and the
//! deterministic training order.
//!
//! The rules come from the SmolLM2 golden spec (`tests/golden/smollm2/SPEC.md`, "DATA" and
//! "TEMPLATE"), which the Python PEFT reference scripts follow too:
//!
//! * a [`Record`] is one (user turn, assistant answer) pair, both trimmed and non-empty (a
//!   `messages` record is a whole conversation instead, [`Sample::Chat`], rendered with the
//!   model's own chat template by `crate::train::chat_data`);
//! * pair `i` (0-based, dataset order) is EVAL when `i % 10 == 9`, else TRAIN
//!   ([`split_train_eval`]);
//! * the text is ChatML, `"<|im_start|>user\n" + q + "<|im_end|>\n<|im_start|>assistant\n" + a +
//!   "<|im_end|>"` ([`render_chatml`]); only the answer tokens and the final `<|im_end|>` are
//!   targets, everything else is labelled [`IGNORE_INDEX`] ([`tokenize_record`]);
//! * sequences are truncated to the first `max_len` tokens ([`SPEC_MAX_LEN`] = 128 in the spec).
//!
//! The training order of each epoch is [`shuffled_order`], a SplitMix64-driven Fisher–Yates
//! shuffle that `scripts/lorafuse_order.py` reproduces exactly for the PEFT reference run.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::chat::Message;

/// Label of a position that is not a training target (prompt tokens, padding): the PyTorch
/// `CrossEntropyLoss` `ignore_index` convention, as in the PEFT reference.
pub const IGNORE_INDEX: i32 = -100;

/// Truncation length of the spec ("Truncate to 128 tokens"), in tokens.
pub const SPEC_MAX_LEN: usize = 128;

/// One training example before tokenization: a user turn and the assistant's answer.
///
/// Both strings are trimmed (Python `str.strip()` semantics) and non-empty when they come from
/// [`default_records`] or [`load_records`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Record {
    /// The user turn (the ChatML `user` message).
    pub question: String,
    /// The assistant answer (the ChatML `assistant` message; the training target).
    pub answer: String,
}

/// One training sample of a user dataset: a (user turn, answer) pair in the fixed ChatML
/// template of the default recipe, or a whole conversation (`messages` records) rendered with the
/// model's chat template (`crate::train::chat_data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sample {
    Pair(Record),
    /// An optional system message first, then user and assistant messages alternating, starting
    /// with a user and ending with an assistant message; contents as given (not trimmed).
    Chat(Vec<Message>),
}

impl Sample {
    /// The pair, if this is one.
    pub fn as_pair(&self) -> Option<&Record> {
        match self {
            Sample::Pair(r) => Some(r),
            Sample::Chat(_) => None,
        }
    }
}

/// The default dataset, `data/chatterbot_en.jsonl` (made by `scripts/convert_chatterbot.py` from
/// chatterbot-corpus 1.3.3, BSD-3-Clause, see `data/LICENSE-chatterbot-corpus.txt`).
const DEFAULT_JSONL: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/chatterbot_en.jsonl"
));

/// The embedded default dataset: the 1015 English chatterbot-corpus pairs in index order.
///
/// The pairs follow the SPEC "DATA" rule (files sorted by name, pairs `(s_i, s_{i+1})` for even
/// `i`, `str()` + `strip()`, empty sides skipped, exact duplicates dropped keeping the first);
/// their sha256 (`utf8(q) 0x00 utf8(a) 0x00` for each pair) is the golden `pairs_sha256`.
/// Apply [`split_train_eval`] to get the 914 TRAIN / 101 EVAL pairs.
///
/// # Errors
/// [`Error::Json`] if a line of the embedded file is not a `{"question", "answer"}` object, and
/// [`Error::Data`] if a field is empty or untrimmed; neither happens for the shipped file (the
/// tests check it), so an error means the file was edited by hand.
pub fn default_records() -> Result<Vec<Record>> {
    const SOURCE: &str = "embedded data/chatterbot_en.jsonl";
    let mut records = Vec::with_capacity(1015);
    for (i, line) in DEFAULT_JSONL.lines().enumerate() {
        let rec: Record = serde_json::from_str(line).map_err(|e| Error::Json {
            context: format!("{SOURCE} line {}", i + 1),
            msg: e.to_string(),
        })?;
        for (name, value) in [("question", &rec.question), ("answer", &rec.answer)] {
            if value.is_empty() || py_strip(value) != value {
                return Err(Error::Data(format!(
                    "{SOURCE}: line {}: field `{name}` is empty or not trimmed",
                    i + 1
                )));
            }
        }
        records.push(rec);
    }
    Ok(records)
}

/// What [`load_records`] does with a malformed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRecordPolicy {
    /// Fail on the first malformed record with an error naming file, line (or index) and problem.
    #[default]
    Reject,
    /// Leave malformed records out and list each in [`LoadReport::skipped`] so the caller can
    /// print them; the load still fails if no usable record is left.
    Skip,
}

/// The container format of a dataset file, chosen by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// `.jsonl`: one JSON record per line; records are located by 1-based line number.
    Jsonl,
    /// `.json`: one JSON array of records; records are located by 0-based array index.
    JsonArray,
}

impl DataFormat {
    /// How a record's location is named in messages: `"line"` (1-based) or `"index"` (0-based).
    pub fn location_name(self) -> &'static str {
        match self {
            DataFormat::Jsonl => "line",
            DataFormat::JsonArray => "index",
        }
    }
}

/// The result of [`load_records`] (and of [`load_json_records`] for other record types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport<T = Sample> {
    /// The usable records in file order.
    pub records: Vec<T>,
    /// Malformed records left out under [`BadRecordPolicy::Skip`]: (location, problem), where the
    /// location is the 1-based line number (`.jsonl`) or the 0-based array index (`.json`), see
    /// [`LoadReport::format`]. Always empty under [`BadRecordPolicy::Reject`].
    pub skipped: Vec<(usize, String)>,
    /// Number of records read from the file (non-blank lines or array elements), usable or not.
    pub source_records: usize,
    /// The container format, which says what the locations in `skipped` count.
    pub format: DataFormat,
}

/// Reads a user dataset from a `.jsonl` (one record per line) or `.json` (one array of records)
/// file; the extension (case-insensitive) picks the format.
///
/// Accepted record shapes (JSON objects; other keys such as `"id"` are ignored):
///
/// * Alpaca: `{"instruction": str, "input": str (optional, may be empty), "output": str}`. The
///   user turn is `instruction`, followed by `"\n\n" + input` when `input` is non-empty (the
///   common convention for turning Alpaca data into chat turns); the answer is `output`.
/// * Chat pair: `{"question": str, "answer": str}` (the default dataset's shape) or
///   `{"prompt": str, "response": str}`.
/// * Chat messages: `{"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]}`
///   give one [`Sample::Chat`]: the whole conversation, trained as TRL's SFTTrainer trains it
///   (rendered with the model's chat template, loss on the assistant turns; see
///   `crate::train::chat_data`). A system message may come first only; then the messages must
///   alternate user, assistant, user, assistant, ... starting with a user and ending with an
///   assistant message; anything else (two users in a row, an assistant without a preceding
///   user, a trailing unanswered user, a later system message, another role) makes the record
///   malformed. Message contents are kept as given (not trimmed) but must not be blank.
///
/// Every other string is trimmed like Python's `str.strip()` (the spec's rule for the default
/// data); inner whitespace is kept. In `.jsonl` files blank (whitespace-only) lines are not
/// records and are ignored; `\r\n` line endings and a leading UTF-8 byte-order mark are
/// accepted. Records are not deduplicated (the spec's dedup applies to the chatterbot
/// conversion only).
///
/// A record is malformed when it is invalid JSON or invalid UTF-8 (`.jsonl`), not an object,
/// has no known shape or keys of more than one shape, or a required field is missing, empty
/// after trimming, or not a string (an optional `input`, when present, must be a string too).
/// Each malformed record is either rejected or skipped and reported, per `policy`; none is
/// dropped silently.
///
/// # Errors
/// * [`Error::Io`] with the path if the file cannot be read (e.g. it does not exist);
/// * [`Error::Format`] for an extension other than `.jsonl` / `.json`, or a `.json` file whose
///   top level is not an array;
/// * [`Error::Json`] for a `.json` file that is not valid JSON at all;
/// * [`Error::Data`] naming the file, the line (`.jsonl`, 1-based) or array index (`.json`,
///   0-based) and the problem, for the first malformed record under
///   [`BadRecordPolicy::Reject`];
/// * [`Error::Data`] if no usable record is left (an empty file, or every record skipped).
pub fn load_records(path: &Path, policy: BadRecordPolicy) -> Result<LoadReport> {
    load_json_records(path, policy, &records_from_value)
}

/// [`load_records`]'s reading of `.jsonl`/`.json` files (extension, byte-order mark, blank
/// lines, locations, the bad-record policy, the errors) for any record type: `parse` turns one
/// JSON value into a record or says what makes it malformed. Preference pairs
/// (`crate::train::preference`) load through it.
pub fn load_json_records<T>(
    path: &Path,
    policy: BadRecordPolicy,
    parse: &dyn Fn(&Value) -> std::result::Result<T, String>,
) -> Result<LoadReport<T>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let format = match ext.as_deref() {
        Some("jsonl") => DataFormat::Jsonl,
        Some("json") => DataFormat::JsonArray,
        _ => {
            return Err(Error::format(
                path,
                "unsupported dataset extension: expected .jsonl (one JSON record per line) or \
                 .json (a JSON array of records)",
            ));
        }
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut report = LoadReport {
        records: Vec::new(),
        skipped: Vec::new(),
        source_records: 0,
        format,
    };
    let source = path.display().to_string();
    match format {
        DataFormat::Jsonl => {
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let parsed = match std::str::from_utf8(line) {
                    Err(e) => Some(Err(format!("not valid UTF-8: {e}"))),
                    Ok(text) if text.trim().is_empty() => None,
                    Ok(text) => Some(
                        serde_json::from_str::<Value>(text)
                            .map_err(|e| format!("invalid JSON: {e}"))
                            .and_then(|v| parse(&v)),
                    ),
                };
                if let Some(result) = parsed {
                    report.accept(result, i + 1, policy, &source)?;
                }
            }
        }
        DataFormat::JsonArray => {
            let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::Json {
                context: source.clone(),
                msg: e.to_string(),
            })?;
            let Value::Array(items) = value else {
                return Err(Error::format(
                    path,
                    format!(
                        "a .json dataset must be an array of records, found {}",
                        kind(&value)
                    ),
                ));
            };
            for (i, item) in items.iter().enumerate() {
                report.accept(parse(item), i, policy, &source)?;
            }
        }
    }
    if report.records.is_empty() {
        return Err(Error::Data(format!(
            "{source}: no usable records ({} read, {} skipped as malformed)",
            report.source_records,
            report.skipped.len()
        )));
    }
    Ok(report)
}

impl<T> LoadReport<T> {
    /// Files the outcome of parsing the record at `location`.
    fn accept(
        &mut self,
        result: std::result::Result<T, String>,
        location: usize,
        policy: BadRecordPolicy,
        source: &str,
    ) -> Result<()> {
        self.source_records += 1;
        match result {
            Ok(sample) => self.records.push(sample),
            Err(problem) => match policy {
                BadRecordPolicy::Reject => {
                    return Err(Error::Data(format!(
                        "{source}: {} {location}: {problem}",
                        self.format.location_name()
                    )));
                }
                BadRecordPolicy::Skip => self.skipped.push((location, problem)),
            },
        }
        Ok(())
    }
}

/// Python `str.strip()`: Rust's `char::is_whitespace` (Unicode White_Space) plus the
/// information separators U+001C..U+001F, which Python also counts as whitespace.
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// A JSON value's type, for messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The trimmed, non-empty string field `key` of `obj` (`what` names it in messages).
pub(crate) fn required_str(
    obj: &Map<String, Value>,
    key: &str,
    what: &str,
) -> std::result::Result<String, String> {
    match obj.get(key) {
        None => Err(format!("missing field {what}")),
        Some(Value::String(s)) => {
            let s = py_strip(s);
            if s.is_empty() {
                Err(format!("field {what} is empty"))
            } else {
                Ok(s.to_owned())
            }
        }
        Some(other) => Err(format!(
            "field {what} must be a string, found {}",
            kind(other)
        )),
    }
}

/// The record shapes, each with the keys that identify it.
const SHAPES: [(&str, &[&str]); 4] = [
    ("messages", &["messages"]),
    ("alpaca", &["instruction", "output"]),
    ("question/answer", &["question", "answer"]),
    ("prompt/response", &["prompt", "response"]),
];

/// The sample of one JSON value, or the problem that makes it malformed.
fn records_from_value(v: &Value) -> std::result::Result<Sample, String> {
    let Value::Object(obj) = v else {
        return Err(format!("expected a JSON object, found {}", kind(v)));
    };
    let shapes: Vec<&str> = SHAPES
        .iter()
        .filter(|(_, keys)| keys.iter().any(|k| obj.contains_key(*k)))
        .map(|(name, _)| *name)
        .collect();
    match shapes.as_slice() {
        ["messages"] => conversation(obj).map(Sample::Chat),
        ["alpaca"] => {
            let instruction = required_str(obj, "instruction", "`instruction`")?;
            let output = required_str(obj, "output", "`output`")?;
            let input = match obj.get("input") {
                None => "",
                Some(Value::String(s)) => py_strip(s),
                Some(other) => {
                    return Err(format!(
                        "field `input` must be a string, found {}",
                        kind(other)
                    ));
                }
            };
            let question = if input.is_empty() {
                instruction
            } else {
                format!("{instruction}\n\n{input}")
            };
            Ok(Sample::Pair(Record {
                question,
                answer: output,
            }))
        }
        ["question/answer"] => Ok(Sample::Pair(Record {
            question: required_str(obj, "question", "`question`")?,
            answer: required_str(obj, "answer", "`answer`")?,
        })),
        ["prompt/response"] => Ok(Sample::Pair(Record {
            question: required_str(obj, "prompt", "`prompt`")?,
            answer: required_str(obj, "response", "`response`")?,
        })),
        [] => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            Err(format!(
                "unknown record shape (keys {keys:?}); expected {{instruction, input?, output}}, \
                 {{question, answer}}, {{prompt, response}} or {{messages: [...]}}"
            ))
        }
        several => Err(format!(
            "ambiguous record: has keys of several shapes ({})",
            several.join(", ")
        )),
    }
}

/// The conversation of a `{"messages": [...]}` object: an optional system message first, then
/// user and assistant messages alternating, from a user message to an assistant one. Contents
/// are kept as given (templates render them verbatim) but must not be blank.
pub(crate) fn conversation(obj: &Map<String, Value>) -> std::result::Result<Vec<Message>, String> {
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) => m,
        Some(other) => {
            return Err(format!(
                "field `messages` must be an array, found {}",
                kind(other)
            ));
        }
        None => unreachable!("shape detection saw `messages`"),
    };
    let mut out = Vec::with_capacity(messages.len());
    // The unanswered user turn's index.
    let mut pending: Option<usize> = None;
    for (k, m) in messages.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(format!(
                "messages[{k}] must be an object, found {}",
                kind(m)
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            None => return Err(format!("messages[{k}]: missing field `role`")),
            Some(other) => {
                return Err(format!(
                    "messages[{k}]: field `role` must be a string, found {}",
                    kind(other)
                ));
            }
        };
        let what = format!("messages[{k}].content");
        let content = match m.get("content") {
            None => return Err(format!("missing field {what}")),
            Some(Value::String(c)) if py_strip(c).is_empty() => {
                return Err(format!("field {what} is empty"));
            }
            Some(Value::String(c)) => c.clone(),
            Some(other) => {
                return Err(format!(
                    "field {what} must be a string, found {}",
                    kind(other)
                ));
            }
        };
        match role {
            "system" if k == 0 => {}
            "system" => {
                return Err(format!(
                    "messages[{k}]: a system message must be the first message"
                ));
            }
            "user" => {
                if let Some(j) = pending {
                    return Err(format!(
                        "messages[{k}]: two user messages in a row (messages[{j}] has no \
                         assistant answer)"
                    ));
                }
                pending = Some(k);
            }
            "assistant" => {
                if pending.take().is_none() {
                    return Err(format!(
                        "messages[{k}]: assistant message without a preceding user message"
                    ));
                }
            }
            other => {
                return Err(format!(
                    "messages[{k}]: unknown role {other:?} (expected \"user\", \"assistant\" or \
                     \"system\")"
                ));
            }
        }
        out.push(Message::new(role, &content));
    }
    if let Some(j) = pending {
        return Err(format!(
            "messages[{j}]: last user message has no assistant answer"
        ));
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("no (user, assistant) message pair in `messages`".to_owned());
    }
    Ok(out)
}

/// Splits records by the spec rule: index `i % 10 == 9` goes to EVAL, every other index to TRAIN;
/// both keep the input order. Returns `(train, eval)`.
///
/// Applied to the default data it gives 914 / 101 pairs. For fewer than 10 records the EVAL
/// split is empty; callers must handle that (e.g. skip the eval loss).
pub fn split_train_eval<T>(records: Vec<T>) -> (Vec<T>, Vec<T>) {
    let n_eval = records.len() / 10;
    let mut train = Vec::with_capacity(records.len() - n_eval);
    let mut eval = Vec::with_capacity(n_eval);
    for (i, rec) in records.into_iter().enumerate() {
        if i % 10 == 9 {
            eval.push(rec);
        } else {
            train.push(rec);
        }
    }
    (train, eval)
}

/// Renders one pair with the spec's ChatML TEMPLATE; returns `(prompt, full_text)`:
///
/// * prompt = `"<|im_start|>user\n" + q + "<|im_end|>\n<|im_start|>assistant\n"`
/// * full   = prompt + `a + "<|im_end|>"`
///
/// No system turn, BOS or EOS is added. `q` and `a` are inserted as they are; a literal special
/// token spelling inside them (e.g. `"<|im_end|>"`) is matched as that special token by the
/// tokenizer, as in the reference.
pub fn render_chatml(q: &str, a: &str) -> (String, String) {
    let prompt = format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    let full = format!("{prompt}{a}<|im_end|>");
    (prompt, full)
}

/// One tokenized training example. `input_ids` and `labels` have the same length (at most the
/// `max_len` given to [`tokenize_record`]); `labels[t]` is the target id of position `t`, or
/// [`IGNORE_INDEX`] for the prompt. Labels are not shifted: the loss compares the logits at `t`
/// with `labels[t + 1]` (SPEC "LOSS").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids of the rendered full text, truncated.
    pub input_ids: Vec<u32>,
    /// [`IGNORE_INDEX`] over the prompt tokens, then the answer and final `<|im_end|>` ids.
    pub labels: Vec<i32>,
}

impl Example {
    /// Number of target tokens (labels other than [`IGNORE_INDEX`]).
    pub fn n_targets(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Tokenizes one record as the spec says: `input_ids` = `encode(full)`, labels =
/// `[IGNORE_INDEX] * len(encode(prompt))` followed by the rest of `encode(full)`, both truncated
/// to the first `max_len` tokens ([`SPEC_MAX_LEN`] in the spec). A truncated example loses its
/// final `<|im_end|>` target.
///
/// `encode` turns text into token ids with no added BOS/EOS (e.g.
/// `|s| tokenizer.encode(s)`); it is called on the prompt and on the full text (the whole
/// string, not concatenated pieces).
///
/// # Errors
/// * [`Error::InvalidArgument`] if `max_len` is 0;
/// * whatever `encode` returns;
/// * [`Error::Data`] naming the record (its question) if the prompt tokens are not a prefix of the
///   full-text tokens (the spec's prefix check; never the case for the default data), if a token
///   id does not fit an `i32` label, or if no target token is left after truncation (the prompt
///   alone fills `max_len`; impossible for the default data at 128, whose longest prompt has 44
///   tokens). Such a record is an error rather than a silently empty example; the caller decides
///   whether to stop or to skip and report it.
pub fn tokenize_record<F>(encode: F, rec: &Record, max_len: usize) -> Result<Example>
where
    F: Fn(&str) -> Result<Vec<u32>>,
{
    if max_len == 0 {
        return Err(Error::arg("max_len", "must be at least 1"));
    }
    let (prompt, full) = render_chatml(&rec.question, &rec.answer);
    let prompt_ids = encode(&prompt)?;
    let mut input_ids = encode(&full)?;
    let p = prompt_ids.len();
    if !input_ids.starts_with(&prompt_ids) {
        let at = prompt_ids
            .iter()
            .zip(&input_ids)
            .position(|(a, b)| a != b)
            .unwrap_or(p.min(input_ids.len()));
        return Err(Error::Data(format!(
            "record {}: the {p} prompt tokens are not a prefix of the {} full-text tokens \
             (first difference at token {at}), so the prompt cannot be masked (SPEC prefix check)",
            describe(rec),
            input_ids.len()
        )));
    }
    let mut labels = vec![IGNORE_INDEX; p];
    labels.reserve(input_ids.len() - p);
    for &id in &input_ids[p..] {
        let label = i32::try_from(id).map_err(|_| {
            Error::Data(format!(
                "record {}: token id {id} does not fit an i32 label",
                describe(rec)
            ))
        })?;
        labels.push(label);
    }
    input_ids.truncate(max_len);
    labels.truncate(max_len);
    let example = Example { input_ids, labels };
    if example.n_targets() == 0 {
        return Err(Error::Data(format!(
            "record {}: no target token left: the prompt has {p} tokens and max_len is {max_len}",
            describe(rec)
        )));
    }
    Ok(example)
}

/// [`tokenize_record`] over a list; a [`Error::Data`] error is prefixed with the record's
/// 0-based index in `records`.
///
/// # Errors
/// The first error of [`tokenize_record`].
pub fn tokenize_records<F>(encode: F, records: &[Record], max_len: usize) -> Result<Vec<Example>>
where
    F: Fn(&str) -> Result<Vec<u32>>,
{
    records
        .iter()
        .enumerate()
        .map(|(i, rec)| {
            tokenize_record(&encode, rec, max_len).map_err(|e| match e {
                Error::Data(msg) => Error::Data(format!("record #{i}: {msg}")),
                other => other,
            })
        })
        .collect()
}

/// Names a record in messages by its question (at most 60 characters).
fn describe(rec: &Record) -> String {
    const MAX: usize = 60;
    match rec.question.char_indices().nth(MAX) {
        None => format!("with question {:?}", rec.question),
        Some((cut, _)) => format!("with question {:?}...", &rec.question[..cut]),
    }
}

/// The SplitMix64 generator (Steele, Lea & Flood 2014; Vigna's `splitmix64.c`), written out so
/// that `scripts/lorafuse_order.py` reproduces it bit for bit. All arithmetic wraps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// The increment, 2^64 / golden ratio.
    pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// A generator whose first output is the mix of `seed + GAMMA`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next output: `state += GAMMA; z = state; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
    /// z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z ^ (z >> 31)`.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The training order of epoch `epoch`: a permutation of `0..n`, identical to
/// `lorafuse_order.shuffled_order` in `scripts/lorafuse_order.py` (used by the PEFT reference).
///
/// A [`SplitMix64`] seeded with `seed ^ epoch.wrapping_mul(SplitMix64::GAMMA)` drives a
/// Fisher–Yates shuffle of `[0, 1, ..., n-1]`: for `i` from `n-1` down to 1, `j = next() % (i+1)`,
/// swap positions `i` and `j`. (The modulo has a bias below `n / 2^64`, negligible and kept for
/// bit-exact agreement with the Python script.)
pub fn shuffled_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(SplitMix64::GAMMA));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        // i + 1 <= n <= usize::MAX fits u64, and the remainder is <= i, so both casts are exact.
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}
