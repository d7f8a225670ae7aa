//! Tests of `lorafuse::train::data`: the embedded default dataset against the golden
//! `data_stats.json` / `tokens.json`, user dataset parsing (every accepted shape and every
//! malformed case, under both policies), the split, the ChatML template, label masking and
//! truncation (with fake encoders; the real tokenizer has its own tests), and the training order.

use std::path::{Path, PathBuf};

use lorafuse::Error;
use lorafuse::model::chat::Message;
use lorafuse::train::data::{
    BadRecordPolicy, DataFormat, Example, IGNORE_INDEX, Record, SPEC_MAX_LEN, Sample, SplitMix64,
    default_records, load_records, render_chatml, shuffled_order, split_train_eval,
    tokenize_record, tokenize_records,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;

// ---------------------------------------------------------------------------------------------
// helpers

/// Reads a golden JSON file of the SmolLM2 set, printing which file is checked.
fn golden_json(name: &str) -> Value {
    let path = common::golden_file(&format!("smollm2/{name}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read golden file {} ({e}); set LORAFUSE_GOLDEN_DIR to the golden directory",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("golden file is JSON")
}

fn pair(q: &str, a: &str) -> Sample {
    Sample::Pair(rec(q, a))
}

fn rec(q: &str, a: &str) -> Record {
    Record {
        question: q.to_owned(),
        answer: a.to_owned(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh scratch directory for this test process and test name, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

fn scratch(name: &str) -> Scratch {
    let dir =
        std::env::temp_dir().join(format!("lorafuse-data-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// Writes `content` to `dir/file` and returns the path.
fn write(dir: &Path, file: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, content).unwrap();
    path
}

/// The fake tokenizer: one token per UTF-8 byte (always prefix-consistent).
fn bytes_encode(s: &str) -> lorafuse::Result<Vec<u32>> {
    Ok(s.bytes().map(u32::from).collect())
}

fn data_err_msg(e: Error) -> String {
    match e {
        Error::Data(msg) => msg,
        other => panic!("expected Error::Data, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// the default dataset

#[test]
fn default_records_counts_split_and_hash_match_spec_constants() {
    let records = default_records().unwrap();
    assert_eq!(records.len(), 1015);
    let mut h = Sha256::new();
    for r in &records {
        h.update(r.question.as_bytes());
        h.update([0u8]);
        h.update(r.answer.as_bytes());
        h.update([0u8]);
    }
    assert_eq!(
        hex(&h.finalize()),
        "7cccd2520574bc998fd1b1b68decb147264a61140bec41caaf6336470a913e17"
    );
    // Trimmed, non-empty, no exact duplicates (the SPEC DATA rule).
    let mut seen = std::collections::HashSet::new();
    for r in &records {
        assert!(!r.question.is_empty() && !r.answer.is_empty());
        assert_eq!(r.question.trim(), r.question);
        assert_eq!(r.answer.trim(), r.answer);
        assert!(seen.insert(r.clone()), "duplicate pair {r:?}");
    }
    let (train, eval) = split_train_eval(records);
    assert_eq!((train.len(), eval.len()), (914, 101));
}

#[test]
fn default_records_match_golden_data_stats() {
    let stats = golden_json("data_stats.json");
    let records = default_records().unwrap();
    assert_eq!(records.len() as u64, stats["N"].as_u64().unwrap());

    let mut h = Sha256::new();
    for r in &records {
        h.update(r.question.as_bytes());
        h.update([0u8]);
        h.update(r.answer.as_bytes());
        h.update([0u8]);
    }
    assert_eq!(hex(&h.finalize()), stats["pairs_sha256"].as_str().unwrap());

    // The eval indices are those of the golden eval_examples rows.
    let golden_eval_idx: Vec<u64> = stats["eval_examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[0].as_u64().unwrap())
        .collect();
    let eval_idx: Vec<u64> = (0..records.len() as u64).filter(|i| i % 10 == 9).collect();
    assert_eq!(eval_idx, golden_eval_idx);

    let (train, eval) = split_train_eval(records.clone());
    assert_eq!(train.len() as u64, stats["train_count"].as_u64().unwrap());
    assert_eq!(eval.len() as u64, stats["eval_count"].as_u64().unwrap());
    for (key, split) in [
        ("first_3_train_pairs", &train),
        ("first_3_eval_pairs", &eval),
    ] {
        let rows = stats[key].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        for (k, row) in rows.iter().enumerate() {
            let expected = rec(
                row["question"].as_str().unwrap(),
                row["answer"].as_str().unwrap(),
            );
            assert_eq!(split[k], expected, "{key}[{k}]");
            assert_eq!(records[row["index"].as_u64().unwrap() as usize], expected);
        }
    }
}

/// render_chatml + tokenize_record against the golden `tokens.json` eval pairs, with an encoder
/// that looks the golden texts up (so no tokenizer is needed): exact prompt / full strings,
/// prompt lengths, labels and target counts.
#[test]
fn template_and_labels_match_golden_tokens_json() {
    let tokens = golden_json("tokens.json");
    let records = default_records().unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut checked = 0;
    for p in tokens["prompts"].as_array().unwrap() {
        let Some(index) = p.get("pair_index").and_then(Value::as_u64) else {
            continue;
        };
        let r = &records[index as usize];
        assert_eq!(r.question, p["question"].as_str().unwrap());
        assert_eq!(r.answer, p["answer"].as_str().unwrap());
        let (prompt, full) = render_chatml(&r.question, &r.answer);
        assert_eq!(prompt, p["prompt_text"].as_str().unwrap());
        assert_eq!(full, p["text"].as_str().unwrap());

        let table = [
            (prompt.clone(), ids(&p["prompt_ids"])),
            (full.clone(), ids(&p["ids"])),
        ];
        let lookup = |s: &str| -> lorafuse::Result<Vec<u32>> {
            Ok(table
                .iter()
                .find(|(t, _)| t == s)
                .expect("encode called on an unexpected text")
                .1
                .clone())
        };
        let ex = tokenize_record(lookup, r, SPEC_MAX_LEN).unwrap();
        assert_eq!(ex.input_ids, ids(&p["ids"]));
        let golden_labels: Vec<i32> = p["labels_truncated_128"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect();
        assert_eq!(ex.labels, golden_labels);
        assert_eq!(
            ex.n_targets() as u64,
            p["n_target_tokens"].as_u64().unwrap()
        );
        let prompt_len = p["prompt_len"].as_u64().unwrap() as usize;
        assert!(ex.labels[..prompt_len].iter().all(|&l| l == IGNORE_INDEX));
        checked += 1;
    }
    assert_eq!(checked, 3);
}

// ---------------------------------------------------------------------------------------------
// split and template

#[test]
fn split_rule_is_index_mod_10_eq_9() {
    let records: Vec<Record> = (0..25).map(|i| rec(&format!("q{i}"), "a")).collect();
    let (train, eval) = split_train_eval(records);
    let names = |v: &[Record]| v.iter().map(|r| r.question.clone()).collect::<Vec<_>>();
    assert_eq!(names(&eval), ["q9", "q19"]);
    assert_eq!(train.len(), 23);
    assert_eq!(train[8].question, "q8");
    assert_eq!(train[9].question, "q10");
    let (train, eval) = split_train_eval((0..9).map(|_| rec("q", "a")).collect());
    assert_eq!((train.len(), eval.len()), (9, 0));
    let (train, eval) = split_train_eval(Vec::<Record>::new());
    assert!(train.is_empty() && eval.is_empty());
}

#[test]
fn render_chatml_exact_strings() {
    let (prompt, full) = render_chatml("What is AI?", "A field.\nOf science.");
    assert_eq!(
        prompt,
        "<|im_start|>user\nWhat is AI?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        full,
        "<|im_start|>user\nWhat is AI?<|im_end|>\n<|im_start|>assistant\nA field.\nOf science.<|im_end|>"
    );
    assert!(full.starts_with(&prompt));
}

// ---------------------------------------------------------------------------------------------
// tokenize_record

#[test]
fn tokenize_masks_prompt_and_keeps_answer_plus_im_end() {
    let r = rec("hi", "yo");
    let (prompt, full) = render_chatml("hi", "yo");
    let ex = tokenize_record(bytes_encode, &r, 1000).unwrap();
    assert_eq!(ex.input_ids, bytes_encode(&full).unwrap());
    assert_eq!(ex.labels.len(), ex.input_ids.len());
    let p = prompt.len();
    assert!(ex.labels[..p].iter().all(|&l| l == IGNORE_INDEX));
    let targets: Vec<u8> = ex.labels[p..].iter().map(|&l| l as u8).collect();
    assert_eq!(targets, b"yo<|im_end|>");
    assert_eq!(ex.n_targets(), "yo<|im_end|>".len());
}

#[test]
fn tokenize_truncates_ids_and_labels_to_max_len() {
    let r = rec("q", "a long answer that will be cut");
    let (prompt, full) = render_chatml(&r.question, &r.answer);
    let p = prompt.len();
    let max_len = p + 5;
    let ex = tokenize_record(bytes_encode, &r, max_len).unwrap();
    assert_eq!(ex.input_ids.len(), max_len);
    assert_eq!(ex.labels.len(), max_len);
    assert_eq!(ex.input_ids, bytes_encode(&full).unwrap()[..max_len]);
    let targets: Vec<u8> = ex.labels[p..].iter().map(|&l| l as u8).collect();
    assert_eq!(targets, b"a lon"); // the final <|im_end|> target is lost
    // One target token left is still fine.
    let ex = tokenize_record(bytes_encode, &r, p + 1).unwrap();
    assert_eq!(ex.n_targets(), 1);
    // max_len larger than the text: nothing cut.
    let ex = tokenize_record(bytes_encode, &r, 10_000).unwrap();
    assert_eq!(ex.input_ids.len(), full.len());
}

#[test]
fn tokenize_errors_when_no_target_is_left() {
    let r = rec("question", "answer");
    let p = render_chatml("question", "answer").0.len();
    for max_len in [1, p - 1, p] {
        let msg = data_err_msg(tokenize_record(bytes_encode, &r, max_len).unwrap_err());
        assert!(msg.contains("no target token left"), "{msg}");
        assert!(msg.contains("\"question\""), "{msg}");
    }
    assert!(matches!(
        tokenize_record(bytes_encode, &r, 0),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn tokenize_rejects_prompt_prefix_inconsistency() {
    // A tokenizer that merges "\nA" into one token 1000: the prompt ends with "\n" (token 10),
    // but in the full text that "\n" merges with the answer's first letter.
    let merging = |s: &str| -> lorafuse::Result<Vec<u32>> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\n' && b.get(i + 1) == Some(&b'A') {
                out.push(1000);
                i += 2;
            } else {
                out.push(u32::from(b[i]));
                i += 1;
            }
        }
        Ok(out)
    };
    let ok = tokenize_record(merging, &rec("q", "fine"), 128).unwrap();
    assert_eq!(ok.n_targets(), "fine<|im_end|>".len());
    let err = tokenize_record(merging, &rec("Who?", "Alice"), 128).unwrap_err();
    let msg = data_err_msg(err);
    assert!(msg.contains("not a prefix"), "{msg}");
    assert!(msg.contains("\"Who?\""), "{msg}");
    let p = render_chatml("Who?", "Alice").0.len();
    assert!(
        msg.contains(&format!("first difference at token {}", p - 1)),
        "{msg}"
    );
}

#[test]
fn tokenize_passes_encoder_errors_through_and_names_index_in_lists() {
    let failing = |_: &str| -> lorafuse::Result<Vec<u32>> { Err(Error::Tokenizer("boom".into())) };
    assert!(matches!(
        tokenize_record(failing, &rec("q", "a"), 128),
        Err(Error::Tokenizer(m)) if m == "boom"
    ));
    let records = vec![rec("q0", "a0"), rec("q1", "a1")];
    let examples: Vec<Example> = tokenize_records(bytes_encode, &records, 128).unwrap();
    assert_eq!(examples.len(), 2);
    assert_eq!(
        examples[1],
        tokenize_record(bytes_encode, &records[1], 128).unwrap()
    );
    let p = render_chatml("q1", "a1").0.len();
    let msg = data_err_msg(tokenize_records(bytes_encode, &records, p).unwrap_err());
    assert!(msg.starts_with("record #0: "), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// load_records: accepted shapes

#[test]
fn loads_every_shape_from_jsonl() {
    let dir = scratch("shapes");
    let content = concat!(
        r#"{"instruction": "Translate to French", "input": "cat", "output": "chat"}"#,
        "\n",
        r#"{"instruction": "  Say hi ", "input": "", "output": " hi\n"}"#,
        "\n",
        r#"{"instruction": "No input key", "output": "ok", "id": 7}"#,
        "\n",
        r#"{"instruction": "Blank input", "input": "  \n ", "output": "ok"}"#,
        "\n",
        "\n",
        "   \n",
        r#"{"question": "Q?", "answer": "A."}"#,
        "\n",
        r#"{"prompt": "P", "response": "R"}"#,
        "\n",
        r#"{"messages": [{"role": "system", "content": "be nice"},"#,
        r#" {"role": "user", "content": "u1 "}, {"role": "assistant", "content": "a1"},"#,
        r#" {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a\n2"}]}"#,
        "\n",
    );
    let path = write(&dir, "data.jsonl", content);
    for policy in [BadRecordPolicy::Reject, BadRecordPolicy::Skip] {
        let report = load_records(&path, policy).unwrap();
        assert_eq!(report.format, DataFormat::Jsonl);
        assert!(report.skipped.is_empty());
        assert_eq!(report.source_records, 7);
        assert_eq!(
            report.records,
            vec![
                pair("Translate to French\n\ncat", "chat"),
                pair("Say hi", "hi"),
                pair("No input key", "ok"),
                pair("Blank input", "ok"),
                pair("Q?", "A."),
                pair("P", "R"),
                // A whole conversation, contents as given.
                Sample::Chat(vec![
                    Message::new("system", "be nice"),
                    Message::new("user", "u1 "),
                    Message::new("assistant", "a1"),
                    Message::new("user", "u2"),
                    Message::new("assistant", "a\n2"),
                ]),
            ]
        );
    }
}

#[test]
fn loads_json_array_with_crlf_bom_and_uppercase_extension() {
    let dir = scratch("array");
    let content = "\u{feff}[\r\n {\"question\": \"a\", \"answer\": \"b\"},\r\n \
                   {\"instruction\": \"i\", \"output\": \"o\"}\r\n]\r\n";
    let path = write(&dir, "data.JSON", content);
    let report = load_records(&path, BadRecordPolicy::Reject).unwrap();
    assert_eq!(report.format, DataFormat::JsonArray);
    assert_eq!(report.records, vec![pair("a", "b"), pair("i", "o")]);

    let path = write(
        &dir,
        "crlf.jsonl",
        "\u{feff}{\"question\": \"a\", \"answer\": \"b\"}\r\n\r\n{\"prompt\": \"c\", \"response\": \"d\"}\r\n",
    );
    let report = load_records(&path, BadRecordPolicy::Reject).unwrap();
    assert_eq!(report.records, vec![pair("a", "b"), pair("c", "d")]);
}

#[test]
fn trims_like_python_strip_and_keeps_inner_whitespace() {
    // Python's str.isspace set, including U+001C..U+001F which Rust's trim() keeps.
    let py_space = "\t\n\u{b}\u{c}\r\u{1c}\u{1d}\u{1e}\u{1f} \u{85}\u{a0}\u{1680}\u{2000}\u{200a}\
                    \u{2028}\u{2029}\u{202f}\u{205f}\u{3000}";
    let dir = scratch("trim");
    let q = format!("{py_space}line one\n\n  line  two{py_space}");
    let a = "Ethiopia\u{a0}";
    let line = serde_json::json!({"question": q, "answer": a}).to_string();
    let path = write(&dir, "t.jsonl", line + "\n");
    let report = load_records(&path, BadRecordPolicy::Reject).unwrap();
    assert_eq!(
        report.records,
        vec![pair("line one\n\n  line  two", "Ethiopia")]
    );
    // A zero-width space is not whitespace for Python either: kept.
    let line = serde_json::json!({"question": "\u{200b}q", "answer": "a"}).to_string();
    let path = write(&dir, "z.jsonl", line);
    let report = load_records(&path, BadRecordPolicy::Reject).unwrap();
    assert_eq!(report.records[0].as_pair().unwrap().question, "\u{200b}q");
}

// ---------------------------------------------------------------------------------------------
// load_records: malformed records

/// Each malformed record (one per line, after a good first line) with a piece of its expected
/// problem message.
const MALFORMED: &[(&str, &str)] = &[
    (r#"{"question": "q", "answer": "a""#, "invalid JSON"),
    ("not json", "invalid JSON"),
    (r#"["q", "a"]"#, "expected a JSON object, found an array"),
    (
        r#""just a string""#,
        "expected a JSON object, found a string",
    ),
    (r#"{"question": "q"}"#, "missing field `answer`"),
    (r#"{"answer": "a"}"#, "missing field `question`"),
    (
        r#"{"question": "  ", "answer": "a"}"#,
        "field `question` is empty",
    ),
    (
        r#"{"question": "q", "answer": 42}"#,
        "field `answer` must be a string, found a number",
    ),
    (
        r#"{"question": null, "answer": "a"}"#,
        "field `question` must be a string, found null",
    ),
    (r#"{"prompt": "p"}"#, "missing field `response`"),
    (
        r#"{"prompt": "p", "response": ""}"#,
        "field `response` is empty",
    ),
    (
        r#"{"instruction": "i", "input": "x"}"#,
        "missing field `output`",
    ),
    (r#"{"output": "o"}"#, "missing field `instruction`"),
    (
        r#"{"instruction": "", "output": "o"}"#,
        "field `instruction` is empty",
    ),
    (
        r#"{"instruction": "i", "input": 5, "output": "o"}"#,
        "field `input` must be a string",
    ),
    (
        r#"{"instruction": "i", "output": ["o"]}"#,
        "field `output` must be a string, found an array",
    ),
    (r#"{"text": "hello"}"#, "unknown record shape"),
    (r#"{}"#, "unknown record shape"),
    (
        r#"{"question": "q", "answer": "a", "output": "o"}"#,
        "ambiguous record",
    ),
    (
        r#"{"messages": "hi"}"#,
        "field `messages` must be an array, found a string",
    ),
    (r#"{"messages": []}"#, "no (user, assistant) message pair"),
    (
        r#"{"messages": [{"role": "system", "content": "s"}]}"#,
        "no (user, assistant) message pair",
    ),
    (
        r#"{"messages": ["hi"]}"#,
        "messages[0] must be an object, found a string",
    ),
    (
        r#"{"messages": [{"content": "x"}]}"#,
        "messages[0]: missing field `role`",
    ),
    (
        r#"{"messages": [{"role": 1, "content": "x"}]}"#,
        "messages[0]: field `role` must be a string",
    ),
    (
        r#"{"messages": [{"role": "tool", "content": "x"}]}"#,
        "messages[0]: unknown role \"tool\"",
    ),
    (
        r#"{"messages": [{"role": "assistant", "content": "x"}]}"#,
        "messages[0]: assistant message without a preceding user message",
    ),
    (
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}"#,
        "messages[1]: two user messages in a row (messages[0]",
    ),
    (
        r#"{"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}"#,
        "messages[1]: a system message must be the first message",
    ),
    (
        r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]}"#,
        "messages[2]: last user message has no assistant answer",
    ),
    (
        r#"{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}"#,
        "missing field messages[0].content",
    ),
    (
        r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " "}]}"#,
        "field messages[1].content is empty",
    ),
    (
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "u"}]}, {"role": "assistant", "content": "a"}]}"#,
        "field messages[0].content must be a string, found an array",
    ),
];

const GOOD: &str = r#"{"question": "good q", "answer": "good a"}"#;

#[test]
fn skip_policy_reports_every_malformed_jsonl_line() {
    let dir = scratch("skip-jsonl");
    // Line 1 good, then each malformed record on its own line (lines 2..), a blank line in the
    // middle (not a record), invalid UTF-8, and a good last line.
    let mut content = Vec::new();
    content.extend_from_slice(GOOD.as_bytes());
    content.push(b'\n');
    for (line, _) in MALFORMED {
        content.extend_from_slice(line.as_bytes());
        content.push(b'\n');
    }
    content.extend_from_slice(b"\n");
    content.extend_from_slice(b"{\"question\": \"\xff\", \"answer\": \"a\"}\n");
    content.extend_from_slice(r#"{"prompt": "last", "response": "one"}"#.as_bytes());
    let path = write(&dir, "bad.jsonl", content);

    let report = load_records(&path, BadRecordPolicy::Skip).unwrap();
    assert_eq!(
        report.records,
        vec![pair("good q", "good a"), pair("last", "one")]
    );
    assert_eq!(report.skipped.len(), MALFORMED.len() + 1);
    assert_eq!(report.source_records, MALFORMED.len() + 3);
    for (k, (line, want)) in MALFORMED.iter().enumerate() {
        let (loc, msg) = &report.skipped[k];
        assert_eq!(*loc, k + 2, "line number of {line}");
        assert!(
            msg.contains(want),
            "line {loc}: {msg:?} should contain {want:?}"
        );
    }
    let utf8_line = MALFORMED.len() + 3; // after the blank line
    let (loc, msg) = report.skipped.last().unwrap();
    assert_eq!(*loc, utf8_line);
    assert!(msg.contains("not valid UTF-8"), "{msg}");
}

#[test]
fn reject_policy_names_file_line_and_problem() {
    let dir = scratch("reject-jsonl");
    for (k, (line, want)) in MALFORMED.iter().enumerate() {
        let file = format!("bad{k}.jsonl");
        let path = write(&dir, &file, format!("{GOOD}\n\n{line}\n{GOOD}\n"));
        let msg = data_err_msg(load_records(&path, BadRecordPolicy::Reject).unwrap_err());
        assert!(msg.contains(&file), "{msg}");
        assert!(msg.contains(": line 3: "), "{msg}");
        assert!(msg.contains(want), "{msg:?} should contain {want:?}");
    }
    let path = write(&dir, "utf8.jsonl", b"\xc3\x28\n");
    let msg = data_err_msg(load_records(&path, BadRecordPolicy::Reject).unwrap_err());
    assert!(msg.contains("line 1: not valid UTF-8"), "{msg}");
}

#[test]
fn json_array_reports_malformed_elements_by_index() {
    let dir = scratch("array-bad");
    // Valid JSON elements only (a syntax error makes the whole .json file unreadable).
    let valid: Vec<&(&str, &str)> = MALFORMED
        .iter()
        .filter(|(line, _)| serde_json::from_str::<Value>(line).is_ok())
        .collect();
    assert_eq!(valid.len(), MALFORMED.len() - 2);
    let elements: Vec<&str> = std::iter::once(GOOD)
        .chain(valid.iter().map(|(line, _)| *line))
        .collect();
    let path = write(&dir, "bad.json", format!("[{}]", elements.join(",\n")));

    let report = load_records(&path, BadRecordPolicy::Skip).unwrap();
    assert_eq!(report.format, DataFormat::JsonArray);
    assert_eq!(report.format.location_name(), "index");
    assert_eq!(report.records, vec![pair("good q", "good a")]);
    assert_eq!(report.source_records, elements.len());
    let locs: Vec<usize> = report.skipped.iter().map(|(i, _)| *i).collect();
    assert_eq!(locs, (1..elements.len()).collect::<Vec<_>>());
    for ((_, msg), (_, want)) in report.skipped.iter().zip(&valid) {
        assert!(msg.contains(want), "{msg:?} should contain {want:?}");
    }

    let msg = data_err_msg(load_records(&path, BadRecordPolicy::Reject).unwrap_err());
    assert!(msg.contains("bad.json: index 1: "), "{msg}");
    assert!(msg.contains(valid[0].1), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// load_records: file-level errors

#[test]
fn empty_datasets_are_errors() {
    let dir = scratch("empty");
    let cases: &[(&str, &str)] = &[
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n\r\n"),
        ("empty.json", "[]"),
        (
            "allbad.jsonl",
            "{\"question\": \"\", \"answer\": \"a\"}\nnope\n",
        ),
        ("allbad.json", "[{\"x\": 1}, 3]"),
    ];
    for (file, content) in cases {
        let path = write(&dir, file, content);
        for policy in [BadRecordPolicy::Skip, BadRecordPolicy::Reject] {
            let err = load_records(&path, policy).unwrap_err();
            let msg = data_err_msg(err);
            if policy == BadRecordPolicy::Skip || !file.starts_with("allbad") {
                assert!(msg.contains("no usable records"), "{file}: {msg}");
                assert!(msg.contains(file), "{msg}");
            }
        }
    }
    let msg =
        data_err_msg(load_records(&dir.join("allbad.jsonl"), BadRecordPolicy::Skip).unwrap_err());
    assert!(msg.contains("(2 read, 2 skipped as malformed)"), "{msg}");
}

#[test]
fn file_level_errors() {
    let dir = scratch("file-errors");
    let missing = dir.join("missing.jsonl");
    match load_records(&missing, BadRecordPolicy::Skip) {
        Err(Error::Io { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
    let csv = write(&dir, "data.csv", "question,answer\n");
    assert!(matches!(
        load_records(&csv, BadRecordPolicy::Skip),
        Err(Error::Format { path, .. }) if path == csv
    ));
    let obj = write(&dir, "obj.json", GOOD);
    match load_records(&obj, BadRecordPolicy::Skip) {
        Err(Error::Format { path, msg }) => {
            assert_eq!(path, obj);
            assert!(
                msg.contains("must be an array of records, found an object"),
                "{msg}"
            );
        }
        other => panic!("expected Error::Format, got {other:?}"),
    }
    let broken = write(
        &dir,
        "broken.json",
        "[{\"question\": \"q\", \"answer\": \"a\"},",
    );
    match load_records(&broken, BadRecordPolicy::Skip) {
        Err(Error::Json { context, msg }) => {
            assert!(context.contains("broken.json"), "{context}");
            assert!(msg.contains("line 1"), "{msg}");
        }
        other => panic!("expected Error::Json, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// training order

/// Asserts the values `scripts/lorafuse_order.py` asserts in its `self_check()`.
#[test]
fn shuffled_order_matches_python_reference() {
    let mut rng = SplitMix64::new(0);
    // The first outputs of Vigna's splitmix64.c seeded with 0.
    assert_eq!(
        [rng.next_u64(), rng.next_u64(), rng.next_u64()],
        [
            0xE220_A839_7B1D_CDAF,
            0x6E78_9E6A_A1B9_65F4,
            0x06C4_5D18_8009_454F
        ]
    );
    assert_eq!(shuffled_order(10, 42, 0), [0, 9, 5, 8, 6, 4, 7, 2, 1, 3]);
    assert_eq!(shuffled_order(10, 42, 1), [2, 3, 9, 7, 5, 8, 6, 4, 0, 1]);
    for (n, seed, epoch, head, checksum) in [
        (
            914,
            1234,
            2,
            [481, 668, 46, 587, 428, 901, 283, 318],
            187_553_019u64,
        ),
        (
            1015,
            u64::MAX,
            7,
            [836, 485, 672, 127, 217, 124, 911, 745],
            256_119_015,
        ),
    ] {
        let order = shuffled_order(n, seed, epoch);
        assert_eq!(order[..8], head);
        let sum: u64 = order
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u64 + 1) * v as u64)
            .sum();
        assert_eq!(sum, checksum);
    }
    assert!(shuffled_order(0, 1, 2).is_empty());
    assert_eq!(shuffled_order(1, 1, 2), [0]);
}

#[test]
fn shuffled_order_is_a_deterministic_permutation() {
    for n in [2usize, 3, 10, 914] {
        for seed in [0u64, 42, u64::MAX] {
            for epoch in 0..3u64 {
                let order = shuffled_order(n, seed, epoch);
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>());
                assert_eq!(order, shuffled_order(n, seed, epoch));
            }
        }
    }
    // Epochs and seeds change the order.
    assert_ne!(shuffled_order(914, 0, 0), shuffled_order(914, 0, 1));
    assert_ne!(shuffled_order(914, 0, 0), shuffled_order(914, 1, 0));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn shuffled_order_is_always_a_permutation(n in 0usize..300, seed: u64, epoch: u64) {
            let mut order = shuffled_order(n, seed, epoch);
            order.sort_unstable();
            prop_assert_eq!(order, (0..n).collect::<Vec<_>>());
        }

        #[test]
        fn labels_mask_exactly_the_prompt(q in "[a-z ]{1,20}", a in "[a-z]{1,40}", max_len in 1usize..120) {
            let r = rec(&q, &a);
            let p = render_chatml(&q, &a).0.len();
            match tokenize_record(bytes_encode, &r, max_len) {
                Ok(ex) => {
                    prop_assert!(max_len > p);
                    prop_assert_eq!(ex.input_ids.len(), ex.labels.len());
                    prop_assert!(ex.input_ids.len() <= max_len);
                    for (t, (&id, &l)) in ex.input_ids.iter().zip(&ex.labels).enumerate() {
                        if t < p {
                            prop_assert_eq!(l, IGNORE_INDEX);
                        } else {
                            prop_assert_eq!(l, id as i32);
                        }
                    }
                }
                Err(e) => {
                    prop_assert!(max_len <= p);
                    prop_assert!(matches!(e, Error::Data(_)));
                }
            }
        }
    }
}
