//! Whole conversations as training examples (TRL SFTTrainer's conversational datasets): each
//! `messages` record is rendered with the model's chat template, its assistant turns are the
//! targets ([`LossOn`]), and a conversation longer than `max_len` is cut by [`Truncation`].

use crate::error::{Error, Result};
use crate::model::chat::{ChatTemplate, LossOn, Message, render_conversation};
use crate::model::tokenizer::Tokenizer;
use crate::train::data::{Example, IGNORE_INDEX, Record, Sample, tokenize_record};
use serde::{Deserialize, Serialize};

/// How a conversation longer than `max_len` tokens is shortened (`--truncation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Drop the oldest user/assistant exchanges (after the system turn, which stays) until it
    /// fits; a single exchange still too long is cut at the end (`right`).
    #[default]
    Turns,
    /// Keep the first `max_len` tokens (TRL's `truncation_mode="keep_start"`).
    Right,
    /// Keep the last `max_len` tokens (TRL's `keep_end`).
    Left,
}

/// How conversations become examples.
#[derive(Debug)]
pub struct ChatSettings<'a> {
    pub template: &'a ChatTemplate,
    pub loss_on: LossOn,
    pub truncation: Truncation,
    /// The token that closes a turn (the tokenizer's EOS for ChatML, Llama 3, Mistral).
    pub end_of_turn: u32,
}

fn example_of(ids: &[u32], target: &[bool]) -> Result<Example> {
    let labels = ids
        .iter()
        .zip(target)
        .map(|(&id, &t)| {
            if t {
                i32::try_from(id)
                    .map_err(|_| Error::Data(format!("token id {id} does not fit an i32 label")))
            } else {
                Ok(IGNORE_INDEX)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Example {
        input_ids: ids.to_vec(),
        labels,
    })
}

/// The index after the system message (0 without one) and the number of user/assistant
/// exchanges after it.
fn exchanges(messages: &[Message]) -> (usize, usize) {
    let start = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    let n = messages[start..]
        .iter()
        .filter(|m| m.role == "assistant")
        .count();
    (start, n)
}

/// One conversation as an example of at most `max_len` tokens (see [`Truncation`]). Errors: a
/// template or tokenizer error; [`Error::Data`] when no target token is left after truncation.
pub fn tokenize_conversation(
    tok: &Tokenizer,
    chat: &ChatSettings<'_>,
    messages: &[Message],
    max_len: usize,
) -> Result<Example> {
    let mut msgs = messages.to_vec();
    let mut r = render_conversation(chat.template, tok, &msgs, chat.loss_on, chat.end_of_turn)?;
    if chat.truncation == Truncation::Turns {
        // Drop the oldest exchange (its user message and every message up to and including the
        // assistant answer) while more than one is left.
        while r.ids.len() > max_len {
            let (start, n) = exchanges(&msgs);
            if n <= 1 {
                break;
            }
            let end = start
                + msgs[start..]
                    .iter()
                    .position(|m| m.role == "assistant")
                    .map_or(0, |k| k + 1);
            msgs.drain(start..end);
            r = render_conversation(chat.template, tok, &msgs, chat.loss_on, chat.end_of_turn)?;
        }
    }
    let n = r.ids.len();
    let (ids, target) = if n <= max_len {
        (&r.ids[..], &r.target[..])
    } else if chat.truncation == Truncation::Left {
        (&r.ids[n - max_len..], &r.target[n - max_len..])
    } else {
        (&r.ids[..max_len], &r.target[..max_len])
    };
    let ex = example_of(ids, target)?;
    if ex.n_targets() == 0 {
        return Err(Error::Data(format!(
            "conversation of {} messages: no target token left after truncation to {max_len} \
             tokens ({n} tokens rendered)",
            messages.len()
        )));
    }
    Ok(ex)
}

/// Samples left out: `(index, problem)`.
pub type Skipped = Vec<(usize, String)>;

/// Tokenizes samples: pairs in the default recipe's fixed ChatML ([`tokenize_record`]),
/// conversations with `chat` ([`tokenize_conversation`]). A sample that leaves no target is
/// returned in the second list as `(index in samples, problem)` when `skip` is set, and is the
/// error otherwise (its index named). Errors: a conversation without `chat` settings (no chat
/// template), template and tokenizer errors.
pub fn tokenize_samples(
    tok: &Tokenizer,
    chat: Option<&ChatSettings<'_>>,
    samples: &[Sample],
    max_len: usize,
    skip: bool,
) -> Result<(Vec<Example>, Skipped)> {
    let encode = |s: &str| tok.encode(s);
    let mut out = Vec::with_capacity(samples.len());
    let mut skipped = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let r = match s {
            Sample::Pair(rec) => tokenize_record(encode, rec, max_len),
            Sample::Chat(msgs) => {
                let chat = chat.ok_or_else(|| {
                    Error::arg(
                        "chat_template",
                        "the data has conversations (`messages` records) but the model has no \
                         chat template: give one with --chat-template FILE",
                    )
                })?;
                tokenize_conversation(tok, chat, msgs, max_len)
            }
        };
        match r {
            Ok(ex) => out.push(ex),
            Err(Error::Data(msg)) if skip => skipped.push((i, msg)),
            Err(Error::Data(msg)) => return Err(Error::Data(format!("record #{i}: {msg}"))),
            Err(e) => return Err(e),
        }
    }
    Ok((out, skipped))
}

/// Whether any sample is a conversation.
pub fn has_conversations(samples: &[Sample]) -> bool {
    samples.iter().any(|s| matches!(s, Sample::Chat(_)))
}

/// The pairs of `records` as samples (the default dataset).
pub fn pairs(records: Vec<Record>) -> Vec<Sample> {
    records.into_iter().map(Sample::Pair).collect()
}
