//! Preference data: records of a prompt with a chosen and a rejected completion, as TRL's
//! DPOTrainer and RewardTrainer read them, tokenized into pairs of examples that share the
//! prompt tokens.

use crate::error::{Error, Result};
use crate::model::chat::LossOn;
use crate::model::tokenizer::Tokenizer;
use crate::train::chat_data::{ChatSettings, Skipped, tokenize_samples};
use crate::train::data::{
    BadRecordPolicy, Example, LoadReport, Record, Sample, conversation, kind, load_json_records,
    py_strip, required_str,
};
use serde_json::{Map, Value};
use std::path::Path;

/// One preference record: the same prompt completed twice, the `chosen` completion preferred.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceSample {
    /// Prompt + chosen completion: a pair in the default recipe's ChatML template, or a whole
    /// conversation whose last (assistant) turn is the completion.
    pub chosen: Sample,
    /// Prompt + rejected completion, in the same form as `chosen`.
    pub rejected: Sample,
    /// How much better `chosen` is (the record's optional `margin`, TRL RewardTrainer's).
    pub margin: Option<f64>,
}

/// A tokenized preference pair. `chosen` and `rejected` start with the same prompt tokens
/// (their labels are [`crate::train::data::IGNORE_INDEX`] there); the completion and its
/// end-of-turn token are the targets.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub chosen: Example,
    pub rejected: Example,
    /// The reference model's log-probabilities of the chosen and rejected completions, when
    /// computed once before training (`--precompute-ref`, TRL's `precompute_ref_log_probs`).
    pub reference: Option<(f64, f64)>,
    /// The record's `margin` (reward models subtract it inside the loss).
    pub margin: Option<f64>,
}

/// Reads preference records from a `.jsonl` or `.json` file (as [`crate::train::data::
/// load_records`] reads datasets: same locations, bad-record policy and errors). Accepted
/// shapes, TRL's preference formats:
///
/// * standard: `{"prompt": str, "chosen": str, "rejected": str}`, each pair rendered in the
///   default recipe's ChatML template (the prompt as the user turn, the completion as the
///   answer; strings trimmed);
/// * conversational: `{"prompt": [messages...], "chosen": [messages...] | str, "rejected": ...}`:
///   the prompt's messages (a system message may come first; it ends with a user message) and
///   each completion's (assistant messages; a string is one assistant message), rendered with
///   the model's chat template;
/// * implicit prompt: `{"chosen": [messages...], "rejected": [messages...]}`, two whole
///   conversations that differ only in their last (assistant) message.
///
/// An optional numeric `margin` (TRL RewardTrainer's) is kept with the pair.
///
/// Errors: those of `load_records`, with the problem of each malformed record named.
pub fn load_preferences(
    path: &Path,
    policy: BadRecordPolicy,
) -> Result<LoadReport<PreferenceSample>> {
    load_json_records(path, policy, &preference_from_value)
}

/// The preference sample of one JSON value, or what makes it malformed.
pub fn preference_from_value(v: &Value) -> std::result::Result<PreferenceSample, String> {
    let Value::Object(obj) = v else {
        return Err(format!("expected a JSON object, found {}", kind(v)));
    };
    for k in ["chosen", "rejected"] {
        if !obj.contains_key(k) {
            return Err(format!(
                "missing field `{k}` (a preference record has `prompt`, `chosen` and `rejected`)"
            ));
        }
    }
    let margin = match obj.get("margin") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64().filter(|m| m.is_finite()),
        Some(other) => {
            return Err(format!(
                "field `margin` must be a number, found {}",
                kind(other)
            ));
        }
    };
    let all_strings = ["prompt", "chosen", "rejected"]
        .iter()
        .all(|k| matches!(obj.get(*k), Some(Value::String(_))));
    if all_strings {
        let prompt = required_str(obj, "prompt", "`prompt`")?;
        let pair = |k: &str| -> std::result::Result<Sample, String> {
            Ok(Sample::Pair(Record {
                question: prompt.clone(),
                answer: required_str(obj, k, &format!("`{k}`"))?,
            }))
        };
        return Ok(PreferenceSample {
            chosen: pair("chosen")?,
            rejected: pair("rejected")?,
            margin,
        });
    }
    let (chosen, rejected) = match obj.get("prompt") {
        Some(Value::Array(prompt)) => (
            whole(prompt, completion(obj, "chosen")?, "chosen")?,
            whole(prompt, completion(obj, "rejected")?, "rejected")?,
        ),
        Some(Value::String(_)) => {
            let (key, v) = ["chosen", "rejected"]
                .iter()
                .find_map(|k| obj.get(*k).filter(|v| !v.is_string()).map(|v| (*k, v)))
                .unwrap_or(("chosen", &Value::Null));
            return Err(format!(
                "field `{key}` must be a string like `prompt`, found {} (for chat completions, \
                 give the prompt as a list of messages)",
                kind(v)
            ));
        }
        Some(other) => {
            return Err(format!(
                "field `prompt` must be a string or a list of messages, found {}",
                kind(other)
            ));
        }
        None => {
            let c = whole(&[], completion(obj, "chosen")?, "chosen")?;
            let r = whole(&[], completion(obj, "rejected")?, "rejected")?;
            if c[..c.len() - 1] != r[..r.len() - 1] {
                return Err(
                    "without a `prompt`, `chosen` and `rejected` must be the same conversation \
                     up to their last (assistant) message"
                        .into(),
                );
            }
            (c, r)
        }
    };
    Ok(PreferenceSample {
        chosen: Sample::Chat(chosen),
        rejected: Sample::Chat(rejected),
        margin,
    })
}

/// A completion's messages: a list as given, or a string as one assistant message.
fn completion(obj: &Map<String, Value>, key: &str) -> std::result::Result<Vec<Value>, String> {
    match obj.get(key) {
        Some(Value::Array(m)) => Ok(m.clone()),
        Some(Value::String(s)) if py_strip(s).is_empty() => Err(format!("field `{key}` is empty")),
        Some(Value::String(s)) => Ok(vec![serde_json::json!({"role": "assistant", "content": s})]),
        Some(other) => Err(format!(
            "field `{key}` must be a string or a list of messages, found {}",
            kind(other)
        )),
        None => Err(format!("missing field `{key}`")),
    }
}

/// `prompt` followed by `completion` as one conversation, checked as a `messages` record is
/// (it must end with an assistant message); `what` names the completion in messages.
fn whole(
    prompt: &[Value],
    completion: Vec<Value>,
    what: &str,
) -> std::result::Result<Vec<crate::model::chat::Message>, String> {
    let mut messages = prompt.to_vec();
    messages.extend(completion);
    let mut obj = Map::new();
    obj.insert("messages".into(), Value::Array(messages));
    let conv = conversation(&obj).map_err(|e| format!("prompt + {what}: {e}"))?;
    match conv.last() {
        Some(m) if m.role == "assistant" => Ok(conv),
        _ => Err(format!(
            "prompt + {what} must end with an assistant message"
        )),
    }
}

/// Tokenizes preference samples into pairs: each side as `finetune` tokenizes a sample, with
/// only the last assistant turn as the target ([`LossOn::Last`]: the completion). A pair whose
/// chosen or rejected side has no target left after `max_len` is skipped and reported when
/// `skip`, an error otherwise. `chat` is needed when a sample is a conversation. Returns the
/// pairs and the skipped (index, why).
pub fn tokenize_preferences(
    tok: &Tokenizer,
    chat: Option<&ChatSettings<'_>>,
    samples: &[PreferenceSample],
    max_len: usize,
    skip: bool,
) -> Result<(Vec<PreferencePair>, Skipped)> {
    let last = chat.map(|c| ChatSettings {
        template: c.template,
        loss_on: LossOn::Last,
        truncation: c.truncation,
        end_of_turn: c.end_of_turn,
    });
    let mut pairs = Vec::with_capacity(samples.len());
    let mut skipped = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let both = [s.chosen.clone(), s.rejected.clone()];
        let (ex, bad) = tokenize_samples(tok, last.as_ref(), &both, max_len, true)?;
        if let Some((side, why)) = bad.into_iter().next() {
            let side = ["chosen", "rejected"][side];
            let msg = format!("{side}: {why}");
            if skip {
                skipped.push((i, msg));
                continue;
            }
            return Err(Error::Data(format!("preference record #{i}: {msg}")));
        }
        let mut ex = ex.into_iter();
        let (Some(chosen), Some(rejected)) = (ex.next(), ex.next()) else {
            unreachable!("two samples tokenized, none skipped")
        };
        pairs.push(PreferencePair {
            chosen,
            rejected,
            reference: None,
            margin: s.margin,
        });
    }
    Ok((pairs, skipped))
}
