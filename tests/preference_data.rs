//! Preference records (`lorafuse::train::preference`) in TRL's three forms (standard strings,
//! conversational prompt + completions, implicit prompt), what makes one malformed, and their
//! tokenization into pairs that share the prompt tokens and score only the completion, on the
//! tiny GGUF's byte-level tokenizer with SmolLM2's chat template.

use std::sync::OnceLock;

use lorafuse::io::gguf::GgufFile;
use lorafuse::model::chat::{ChatTemplate, LossOn, Message};
use lorafuse::model::tokenizer::Tokenizer;
use lorafuse::train::chat_data::{ChatSettings, Truncation};
use lorafuse::train::data::{BadRecordPolicy, IGNORE_INDEX, Sample};
use lorafuse::train::preference::{
    PreferencePair, load_preferences, preference_from_value, tokenize_preferences,
};
use serde_json::json;

mod common;
#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;
use tiny_gguf::*;

static SETUP: OnceLock<TinySetup> = OnceLock::new();

fn setup() -> (&'static TinySetup, Tokenizer, ChatTemplate) {
    let s = SETUP.get_or_init(|| tiny_setup("lorafuse-preference-data"));
    let path = common::golden_file("chat/chat_template.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let tok = Tokenizer::from_gguf(&GgufFile::open(&s.gguf).unwrap()).unwrap();
    let tmpl = ChatTemplate::for_tokenizer(v["chat_template"].as_str().unwrap(), &tok).unwrap();
    (s, tok, tmpl)
}

fn msgs(turns: &[(&str, &str)]) -> Vec<Message> {
    turns.iter().map(|(r, c)| Message::new(r, c)).collect()
}

#[test]
fn the_three_trl_forms_parse_to_the_same_kind_of_pair() {
    let std = preference_from_value(&json!({
        "prompt": "  two plus two? ", "chosen": "four", "rejected": "five", "margin": 0.5
    }))
    .unwrap();
    match (&std.chosen, &std.rejected) {
        (Sample::Pair(c), Sample::Pair(r)) => {
            assert_eq!(
                (c.question.as_str(), c.answer.as_str()),
                ("two plus two?", "four")
            );
            assert_eq!(
                (r.question.as_str(), r.answer.as_str()),
                ("two plus two?", "five")
            );
        }
        other => panic!("standard form gave {other:?}"),
    }
    assert_eq!(std.margin, Some(0.5));
    let conv = preference_from_value(&json!({
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": "go away",
    }))
    .unwrap();
    assert_eq!(
        conv.chosen,
        Sample::Chat(msgs(&[
            ("system", "be brief"),
            ("user", "hi"),
            ("assistant", "hello")
        ]))
    );
    assert_eq!(
        conv.rejected,
        Sample::Chat(msgs(&[
            ("system", "be brief"),
            ("user", "hi"),
            ("assistant", "go away")
        ]))
    );
    let implicit = preference_from_value(&json!({
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}],
    }))
    .unwrap();
    assert_eq!(
        implicit.rejected,
        Sample::Chat(msgs(&[("user", "hi"), ("assistant", "no")]))
    );
}

#[test]
fn malformed_records_say_what_is_wrong() {
    let cases = [
        (json!({"prompt": "q", "chosen": "a"}), "`rejected`"),
        (
            json!({"prompt": "q", "chosen": " ", "rejected": "b"}),
            "`chosen` is empty",
        ),
        (
            json!({"prompt": "q", "chosen": 3, "rejected": "b"}),
            "must be a string",
        ),
        (
            json!({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}),
            "list of messages",
        ),
        (
            json!({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}),
            "two user messages",
        ),
        (
            json!({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}),
            "same conversation",
        ),
        (
            json!({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}),
            "`margin`",
        ),
        (json!(["q", "a", "b"]), "JSON object"),
    ];
    for (v, want) in cases {
        let err = preference_from_value(&v).unwrap_err();
        assert!(err.contains(want), "{v}: `{want}` not in {err:?}");
    }
}

#[test]
fn pairs_share_the_prompt_tokens_and_score_only_the_completion() {
    let (s, tok, tmpl) = setup();
    let chat = ChatSettings {
        template: &tmpl,
        loss_on: LossOn::Assistant,
        truncation: Truncation::Turns,
        end_of_turn: tok.eos_id(),
    };
    let file = s.dir.join("prefs.jsonl");
    let lines = [
        json!({"prompt": "two plus two?", "chosen": "four", "rejected": "five, surely"}),
        json!({
            "prompt": [
                {"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"},
                {"role": "user", "content": "two"}
            ],
            "chosen": "dos", "rejected": "tres"
        }),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, text).unwrap();
    let rep = load_preferences(&file, BadRecordPolicy::Reject).unwrap();
    let (pairs, skipped) =
        tokenize_preferences(&tok, Some(&chat), &rep.records, 128, false).unwrap();
    assert!(skipped.is_empty());
    let target_text = |ex: &lorafuse::train::data::Example| {
        let ids: Vec<u32> = ex
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        tok.decode(&ids).unwrap()
    };
    let prompt_len = |ex: &lorafuse::train::data::Example| {
        ex.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap()
    };
    for (
        i,
        PreferencePair {
            chosen, rejected, ..
        },
    ) in pairs.iter().enumerate()
    {
        let (pc, pr) = (prompt_len(chosen), prompt_len(rejected));
        assert_eq!(pc, pr, "pair {i}: prompt lengths");
        assert_eq!(
            chosen.input_ids[..pc],
            rejected.input_ids[..pr],
            "pair {i}: prompt tokens"
        );
    }
    // The ChatML pair scores the answer and <|im_end|>; the conversation only its last
    // assistant turn (the earlier "uno" is context), with the template's closing token.
    assert_eq!(target_text(&pairs[0].chosen), "four<|im_end|>");
    assert_eq!(target_text(&pairs[0].rejected), "five, surely<|im_end|>");
    assert_eq!(target_text(&pairs[1].chosen), "dos<|im_end|>");
    assert_eq!(target_text(&pairs[1].rejected), "tres<|im_end|>");
    // A completion cut off entirely is a bad pair: skipped with its index, or an error.
    let short = tokenize_preferences(&tok, Some(&chat), &rep.records, 3, true).unwrap();
    assert!(short.0.is_empty() && short.1.len() == 2, "{:?}", short.1);
    let err = tokenize_preferences(&tok, Some(&chat), &rep.records, 3, false).unwrap_err();
    assert!(err.to_string().contains("preference record #0"), "{err}");
    // Conversations without a chat template are refused with a hint.
    let err = tokenize_preferences(&tok, None, &rep.records[1..], 128, false).unwrap_err();
    assert!(err.to_string().contains("--chat-template"), "{err}");
}
