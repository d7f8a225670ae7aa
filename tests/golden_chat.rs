//! SmolLM2's chat template against transformers' `apply_chat_template`
//! (`golden/chat/chat_template.json`): the template read from the GGUF, the rendered text, the
//! token ids and the target mask of every conversation, and the generation prompts, exactly.
//!
//! The template checks that need no tokenizer always run; the token checks need the real model
//! (`LORAFUSE_MODEL`) and skip loudly without it (`LORAFUSE_REQUIRE=model` makes that fail).

mod common;

use lorafuse::io::gguf::GgufFile;
use lorafuse::model::chat::{ChatTemplate, LossOn, Message, Prompt, render_conversation};
use lorafuse::model::tokenizer::Tokenizer;
use serde_json::Value;

fn golden() -> Value {
    let path = common::golden_file("chat/chat_template.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn messages(case: &Value) -> Vec<Message> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn the_template_renders_every_conversation_as_transformers_does() {
    let g = golden();
    let tmpl = ChatTemplate::new(g["chat_template"].as_str().unwrap(), "", "").unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for (i, c) in cases.iter().enumerate() {
        let msgs = messages(c);
        assert_eq!(
            tmpl.render(&msgs, false).unwrap(),
            c["text"].as_str().unwrap(),
            "case {i}: rendered text"
        );
        // The generation prompt: the conversation minus its last (assistant) message.
        assert_eq!(msgs.last().unwrap().role, "assistant");
        assert_eq!(
            tmpl.render(&msgs[..msgs.len() - 1], true).unwrap(),
            c["generation_prompt_text"].as_str().unwrap(),
            "case {i}: generation prompt"
        );
    }
}

#[test]
fn bad_templates_and_raised_exceptions_are_errors_naming_the_template() {
    let e = ChatTemplate::new("{% for m in messages %}{{ m.content }", "", "").unwrap_err();
    assert!(e.to_string().contains("chat_template"), "{e}");
    let t = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with \
         a user turn') }}{% endif %}{{ messages[0].content | upper }}{{ '  x '.strip() }}",
        "<s>",
        "</s>",
    )
    .unwrap();
    let e = t
        .render(&[Message::new("assistant", "hi")], false)
        .unwrap_err();
    assert!(e.to_string().contains("must start with a user turn"), "{e}");
    // Python's string methods work as in transformers' sandbox.
    assert_eq!(
        t.render(&[Message::new("user", "hi")], false).unwrap(),
        "HIx"
    );
}

#[test]
fn gguf_template_tokens_and_targets_match_transformers() {
    let Some(model) = common::model_or_skip("gguf_template_tokens_and_targets_match_transformers")
    else {
        return;
    };
    let g = golden();
    let gguf = GgufFile::open(&model).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let tmpl = ChatTemplate::from_gguf(&gguf, &tok)
        .unwrap()
        .expect("the SmolLM2 GGUF has a chat template");
    assert_eq!(tmpl.source(), g["chat_template"].as_str().unwrap());
    let eot = tok.token_to_id("<|im_end|>").unwrap();
    for (i, c) in g["cases"].as_array().unwrap().iter().enumerate() {
        let msgs = messages(c);
        let r = render_conversation(&tmpl, &tok, &msgs, LossOn::Assistant, eot).unwrap();
        assert_eq!(r.text, c["text"].as_str().unwrap(), "case {i}: text");
        assert_eq!(r.ids, ids(&c["input_ids"]), "case {i}: input_ids");
        let mask: Vec<bool> = ids(&c["target_mask"]).iter().map(|&m| m == 1).collect();
        assert_eq!(r.target, mask, "case {i}: target_mask");
        // The targets decode to each assistant content followed by <|im_end|>.
        let want: String = msgs
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| format!("{}<|im_end|>", m.content))
            .collect();
        let got: Vec<u32> = r
            .ids
            .iter()
            .zip(&r.target)
            .filter(|(_, t)| **t)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(tok.decode(&got).unwrap(), want, "case {i}: decoded targets");
        let prompt = tmpl.render(&msgs[..msgs.len() - 1], true).unwrap();
        assert_eq!(
            tok.encode(&prompt).unwrap(),
            ids(&c["generation_prompt_ids"]),
            "case {i}: generation prompt ids"
        );
        // `generate` and `logits --messages` run the same ids for the conversation so far; a
        // lone user turn given as text (`--prompt`) renders as that conversation.
        let so_far = Prompt::Chat(msgs[..msgs.len() - 1].to_vec());
        assert_eq!(
            so_far.ids(Some(&tmpl), None, &tok).unwrap(),
            ids(&c["generation_prompt_ids"]),
            "case {i}: the prompt generate runs"
        );
        if msgs.len() == 2 && msgs[0].role == "user" {
            let text = Prompt::Text(msgs[0].content.clone());
            assert_eq!(
                text.ids(Some(&tmpl), None, &tok).unwrap(),
                ids(&c["generation_prompt_ids"]),
                "case {i}: --prompt TEXT"
            );
        }
        // --loss-on last: the final turn's targets only; all: every token.
        let last = render_conversation(&tmpl, &tok, &msgs, LossOn::Last, eot).unwrap();
        let (s, e) = *r.turns.last().unwrap();
        let want_last: Vec<bool> = (0..r.ids.len()).map(|k| k >= s && k < e).collect();
        assert_eq!(last.target, want_last, "case {i}: loss on the last turn");
        let all = render_conversation(&tmpl, &tok, &msgs, LossOn::All, eot).unwrap();
        assert!(all.target.iter().all(|&t| t), "case {i}: loss on all");
    }
    // A conversation without an assistant turn has nothing to train on.
    let e = render_conversation(
        &tmpl,
        &tok,
        &[Message::new("user", "hi")],
        LossOn::Assistant,
        eot,
    )
    .unwrap_err();
    assert!(e.to_string().contains("no assistant message"), "{e}");
}
