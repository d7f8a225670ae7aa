//! Whole conversations as training examples (`lorafuse::train::chat_data`) on the tiny GGUF's
//! byte-level tokenizer with SmolLM2's chat template (`golden/chat/chat_template.json`): targets
//! are every assistant turn and its `<|im_end|>`, the three truncation policies, conversations
//! that lose every target, and `finetune` on `messages` data end to end.

use std::sync::OnceLock;

use lorafuse::io::gguf::GgufFile;
use lorafuse::model::chat::{CHATML, ChatTemplate, LossOn, Message, Prompt};
use lorafuse::model::tokenizer::Tokenizer;
use lorafuse::train::chat_data::{
    ChatSettings, Truncation, tokenize_conversation, tokenize_samples,
};
use lorafuse::train::data::{IGNORE_INDEX, Record, Sample, render_chatml};
use lorafuse::{Error, Result};

mod common;
#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;
use tiny_gguf::*;

fn template_source() -> String {
    let path = common::golden_file("chat/chat_template.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["chat_template"].as_str().unwrap().to_string()
}

static SETUP: OnceLock<TinySetup> = OnceLock::new();

/// The tiny setup (written once for all tests of this file), its tokenizer and the template.
fn setup() -> (&'static TinySetup, Tokenizer, ChatTemplate) {
    let s = SETUP.get_or_init(|| tiny_setup("lorafuse-chat-data"));
    let tok = Tokenizer::from_gguf(&GgufFile::open(&s.gguf).unwrap()).unwrap();
    let tmpl = ChatTemplate::for_tokenizer(&template_source(), &tok).unwrap();
    (s, tok, tmpl)
}

fn chat(turns: &[(&str, &str)]) -> Vec<Message> {
    turns.iter().map(|(r, c)| Message::new(r, c)).collect()
}

/// The decoded target tokens of an example.
fn targets(tok: &Tokenizer, ex: &lorafuse::train::data::Example) -> String {
    let ids: Vec<u32> = ex
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    tok.decode(&ids).unwrap()
}

fn text(tok: &Tokenizer, ex: &lorafuse::train::data::Example) -> String {
    tok.decode(&ex.input_ids).unwrap()
}

fn conv() -> Vec<Message> {
    chat(&[
        ("system", "be brief"),
        ("user", "one"),
        ("assistant", "first answer"),
        ("user", "two"),
        ("assistant", "second answer"),
        ("user", "three"),
        ("assistant", "third answer"),
    ])
}

#[test]
fn every_assistant_turn_and_its_end_of_turn_token_are_the_targets() {
    let (_s, tok, tmpl) = setup();
    let eot = tok.token_to_id("<|im_end|>").unwrap();
    for (loss_on, want) in [
        (
            LossOn::Assistant,
            "first answer<|im_end|>second answer<|im_end|>third answer<|im_end|>",
        ),
        (LossOn::Last, "third answer<|im_end|>"),
    ] {
        let c = ChatSettings {
            template: &tmpl,
            loss_on,
            truncation: Truncation::Turns,
            end_of_turn: eot,
        };
        let ex = tokenize_conversation(&tok, &c, &conv(), 10_000).unwrap();
        assert_eq!(targets(&tok, &ex), want, "{loss_on:?}");
        assert_eq!(text(&tok, &ex), tmpl.render(&conv(), false).unwrap());
        // The labels are the ids themselves where they are targets (not shifted).
        for (id, l) in ex.input_ids.iter().zip(&ex.labels) {
            assert!(*l == IGNORE_INDEX || *l == *id as i32);
        }
    }
    let c = ChatSettings {
        template: &tmpl,
        loss_on: LossOn::All,
        truncation: Truncation::Turns,
        end_of_turn: eot,
    };
    let ex = tokenize_conversation(&tok, &c, &conv(), 10_000).unwrap();
    assert_eq!(ex.n_targets(), ex.input_ids.len());
}

#[test]
fn long_conversations_lose_their_oldest_exchanges_and_keep_the_system_turn() {
    let (_s, tok, tmpl) = setup();
    let eot = tok.token_to_id("<|im_end|>").unwrap();
    let settings = |truncation| ChatSettings {
        template: &tmpl,
        loss_on: LossOn::Assistant,
        truncation,
        end_of_turn: eot,
    };
    let full = tokenize_conversation(&tok, &settings(Truncation::Turns), &conv(), 10_000).unwrap();
    let last_two = chat(&[
        ("system", "be brief"),
        ("user", "two"),
        ("assistant", "second answer"),
        ("user", "three"),
        ("assistant", "third answer"),
    ]);
    let two = tokenize_conversation(&tok, &settings(Truncation::Turns), &last_two, 10_000).unwrap();
    assert!(two.input_ids.len() < full.input_ids.len());
    // Room for the system turn and the last two exchanges only.
    let max = two.input_ids.len();
    let ex = tokenize_conversation(&tok, &settings(Truncation::Turns), &conv(), max).unwrap();
    assert_eq!(
        ex, two,
        "turns: the first exchange dropped, the system turn kept"
    );
    assert!(text(&tok, &ex).contains("be brief"));
    assert!(!text(&tok, &ex).contains("first answer"));
    // right: the first `max` tokens; left: the last `max`.
    let right = tokenize_conversation(&tok, &settings(Truncation::Right), &conv(), max).unwrap();
    assert_eq!(right.input_ids, full.input_ids[..max]);
    assert_eq!(right.labels, full.labels[..max]);
    let left = tokenize_conversation(&tok, &settings(Truncation::Left), &conv(), max).unwrap();
    let n = full.input_ids.len();
    assert_eq!(left.input_ids, full.input_ids[n - max..]);
    assert_eq!(left.labels, full.labels[n - max..]);
    // One exchange that does not fit is cut at the end; with no target left it is an error.
    let one = chat(&[("user", "a question"), ("assistant", "an answer")]);
    let e = tokenize_conversation(&tok, &settings(Truncation::Turns), &one, 8).unwrap_err();
    assert!(matches!(e, Error::Data(_)), "{e}");
    assert!(e.to_string().contains("no target token left"), "{e}");
}

#[test]
fn samples_without_targets_are_skipped_or_rejected_and_conversations_need_a_template() {
    let (_s, tok, tmpl) = setup();
    let eot = tok.token_to_id("<|im_end|>").unwrap();
    let c = ChatSettings {
        template: &tmpl,
        loss_on: LossOn::Assistant,
        truncation: Truncation::Turns,
        end_of_turn: eot,
    };
    let samples = vec![
        Sample::Pair(Record {
            question: "q".into(),
            answer: "a".into(),
        }),
        Sample::Chat(vec![
            Message::new("user", &"a long question ".repeat(20)),
            Message::new("assistant", "x"),
        ]),
        Sample::Chat(chat(&[("user", "q"), ("assistant", "a")])),
    ];
    // 150 tokens: room for the pair and the short conversation (with the template's default
    // system turn), not for the long question's answer.
    let (ex, skipped) = tokenize_samples(&tok, Some(&c), &samples, 150, true).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].0, 1);
    let e: Result<_> = tokenize_samples(&tok, Some(&c), &samples, 150, false);
    let e = e.unwrap_err().to_string();
    assert!(e.contains("record #1") && e.contains("no target"), "{e}");
    let e = tokenize_samples(&tok, None, &samples, 128, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--chat-template"), "{e}");
}

#[test]
fn finetune_trains_on_conversations_with_the_given_template() {
    let (s, _tok, _tmpl) = setup();
    let data = s.dir.join("chats.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "answer with numbers"},
                {"role": "user", "content": format!("what is {i} plus one?")},
                {"role": "assistant", "content": format!("{}", i + 1)},
                {"role": "user", "content": "and plus two?"},
                {"role": "assistant", "content": format!("{}", i + 2)},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let tmpl = s.dir.join("template.jinja");
    std::fs::write(&tmpl, template_source()).unwrap();
    let run = |extra: &[&str], out: &str| {
        let out = s.dir.join(out);
        let mut args = vec![
            "finetune",
            "--model",
            p(&s.gguf),
            "--data",
            p(&data),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--out",
            p(&out),
        ];
        args.extend_from_slice(extra);
        (run_lorafuse(&s.cache, &args), out)
    };
    let (o, out) = run(&["--chat-template", p(&tmpl)], "chat-run");
    assert_ok(&o, "finetune on conversations");
    assert!(out.join("adapter_config.json").is_file());
    // The tiny GGUF has no chat template of its own.
    let (o, out) = run(&[], "no-template");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--chat-template"));
    assert!(!out.join("metrics.json").exists());
}

#[test]
fn prompts_render_with_the_template_the_system_turn_and_the_fixed_chatml() {
    let (_s, tok, tmpl) = setup();
    let chatml = ChatTemplate::for_tokenizer(CHATML, &tok).unwrap();
    // The fixed ChatML renders a user prompt exactly as the default recipe's pairs start.
    for q in ["hi", "two\nlines", "ünïcode ✓"] {
        assert_eq!(
            chatml.render(&[Message::new("user", q)], true).unwrap(),
            render_chatml(q, "").0
        );
    }
    let ids = |p: &Prompt, t: Option<&ChatTemplate>, sys: Option<&str>| {
        tok.decode(&p.ids(t, sys, &tok).unwrap()).unwrap()
    };
    let hi = Prompt::Text("hi".into());
    assert_eq!(ids(&hi, None, None), "hi", "--raw runs the text as it is");
    assert_eq!(ids(&hi, Some(&chatml), None), render_chatml("hi", "").0);
    // SmolLM2's template adds its default system turn; --system replaces it.
    let own = ids(&hi, Some(&tmpl), None);
    assert!(
        own.starts_with("<|im_start|>system\nYou are a helpful AI assistant"),
        "{own}"
    );
    let sys = ids(&hi, Some(&tmpl), Some("be brief"));
    assert_eq!(
        sys,
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    // A conversation keeps its own system turn and ends with the assistant's turn opened.
    let conv = Prompt::Chat(conv()[..6].to_vec());
    let text = ids(&conv, Some(&tmpl), Some("ignored"));
    assert!(
        text.starts_with("<|im_start|>system\nbe brief<|im_end|>"),
        "{text}"
    );
    assert!(!text.contains("ignored"));
    assert!(text.ends_with("<|im_start|>user\nthree<|im_end|>\n<|im_start|>assistant\n"));
    let e = conv.ids(None, None, &tok).unwrap_err();
    assert!(e.to_string().contains("--raw"), "{e}");
    // JSON prompt lines.
    let j = |s: &str| Prompt::from_json(&serde_json::from_str(s).unwrap());
    assert_eq!(j(r#"{"prompt": "hi"}"#).unwrap(), hi);
    assert_eq!(
        j(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap(),
        Prompt::Chat(vec![Message::new("user", "hi")])
    );
    assert_eq!(
        j(r#"[{"role": "user", "content": "hi"}]"#).unwrap(),
        Prompt::Chat(vec![Message::new("user", "hi")])
    );
    for (bad, why) in [
        (r#"{"prompt": 3}"#, "not a string"),
        (r#"{"messages": []}"#, "empty conversation"),
        (
            r#"{"messages": [{"role": "bot", "content": "x"}]}"#,
            "\"bot\"",
        ),
        (r#"{"text": "hi"}"#, "neither a `prompt`"),
    ] {
        let e = j(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn generate_and_logits_render_conversations_with_the_chosen_template() {
    let (s, tok, tmpl) = setup();
    let file = s.dir.join("template.jinja");
    std::fs::write(&file, template_source()).unwrap();
    let conv = serde_json::json!({"messages": [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "two"},
    ]});
    let msgs = s.dir.join("conv.json");
    std::fs::write(&msgs, conv.to_string()).unwrap();
    let logits_ids = |extra: &[&str], name: &str| -> Vec<u32> {
        let out = s.dir.join(format!("{name}.safetensors"));
        let mut args = vec!["logits", "--model", p(&s.gguf), "--out", p(&out)];
        args.extend_from_slice(extra);
        let o = run_lorafuse(&s.cache, &args);
        assert_ok(&o, name);
        let st = read_st(&out);
        let (_, _, bytes) = &st["input_ids"];
        bytes
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    };
    // --messages with the template file: the ids the library renders for the conversation.
    let want = Prompt::from_json(&conv)
        .unwrap()
        .ids(Some(&tmpl), Some("sys"), &tok)
        .unwrap();
    let got = logits_ids(
        &[
            "--messages",
            p(&msgs),
            "--chat-template",
            p(&file),
            "--system",
            "sys",
        ],
        "with-file",
    );
    assert_eq!(got, want);
    // The tiny model has no template of its own: `model` falls back to the fixed ChatML.
    let text = tok
        .decode(&logits_ids(&["--messages", p(&msgs)], "fallback"))
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\none<|im_end|>\n<|im_start|>assistant\nfirst answer<|im_end|>\n\
         <|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n"
    );
    // generate takes conversations from the prompt file, next to plain and `prompt` lines.
    let prompts = s.dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        format!("plain line\n{{\"prompt\": \"json line\"}}\n{conv}\n"),
    )
    .unwrap();
    let gen_args = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            p(&s.gguf),
            "--prompt-file",
            p(&prompts),
            "--max-new-tokens",
            "2",
        ];
        a.extend_from_slice(extra);
        run_lorafuse(&s.cache, &a)
    };
    let o = gen_args(&["--chat-template", p(&file), "--system", "sys"]);
    assert_ok(&o, "generate with conversations");
    let out = String::from_utf8_lossy(&o.stdout);
    for i in 1..=3 {
        assert!(out.contains(&format!("(prompt {i})")), "{out}");
    }
    // --raw cannot run a conversation, and refuses a template or system turn.
    let o = gen_args(&["--raw"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--raw"));
    let o = gen_args(&["--raw", "--system", "x"]);
    assert!(!o.status.success());
    let bad = s.dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let o = run_lorafuse(
        &s.cache,
        &["generate", "--model", p(&s.gguf), "--prompt-file", p(&bad)],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.jsonl") && err.contains("line 1"), "{err}");
}
