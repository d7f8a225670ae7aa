//! The GGUF tokenizer against transformers' ids (`golden/smollm2/tokens.json`).
//!
//! Needs the real model (`LORAFUSE_MODEL`); without it each test prints `SKIP:` and returns,
//! unless `LORAFUSE_REQUIRE` contains `model`.

mod common;

use lorafuse::io::gguf::GgufFile;
use lorafuse::model::tokenizer::Tokenizer;
use serde_json::Value;

/// The golden `tokens.json` and the tokenizer of the real model, or `None` (skipped).
fn setup(test: &str) -> Option<(Value, Tokenizer)> {
    let golden = common::golden_file("smollm2/tokens.json");
    let json: Value = serde_json::from_slice(&std::fs::read(&golden).unwrap()).unwrap();
    let model = common::model_or_skip(test)?;
    let gguf = GgufFile::open(&model).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    Some((json, tok))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn prompts_match_transformers_ids_and_round_trip() {
    let Some((json, tok)) = setup("prompts_match_transformers_ids_and_round_trip") else {
        return;
    };
    let prompts = json["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 5);
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let text = p["text"].as_str().unwrap();
        let expected = ids(&p["ids"]);
        let got = tok.encode(text).unwrap();
        assert_eq!(got, expected, "ids of prompt `{name}`: {text:?}");
        let spelled: Vec<String> = got.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        let want: Vec<&str> = p["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(spelled, want, "tokens of prompt `{name}`");
        assert!(p["decode_roundtrip_ok"].as_bool().unwrap());
        assert_eq!(
            tok.decode(&got).unwrap(),
            text,
            "decode round trip of `{name}`"
        );
        if let Some(prompt_text) = p.get("prompt_text").and_then(Value::as_str) {
            let prompt_ids = tok.encode(prompt_text).unwrap();
            assert_eq!(prompt_ids, ids(&p["prompt_ids"]), "prompt ids of `{name}`");
            assert_eq!(prompt_ids.len() as u64, p["prompt_len"].as_u64().unwrap());
            assert!(p["prefix_consistent"].as_bool().unwrap());
            assert_eq!(
                &got[..prompt_ids.len()],
                &prompt_ids[..],
                "prefix of `{name}`"
            );
        }
        println!("prompt `{name}`: {} ids match", got.len());
    }
}

#[test]
fn special_tokens_and_roles() {
    let Some((json, tok)) = setup("special_tokens_and_roles") else {
        return;
    };
    for (name, id) in json["special_token_ids"].as_object().unwrap() {
        let id = id.as_u64().unwrap() as u32;
        assert_eq!(tok.token_to_id(name), Some(id), "{name}");
        assert_eq!(
            tok.encode(name).unwrap(),
            vec![id],
            "{name} is matched whole"
        );
    }
    let added = json["all_special_added_tokens"].as_array().unwrap();
    let added_ids: Vec<u32> = added
        .iter()
        .map(|e| e[0].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tok.special_ids(), &added_ids[..]);
    for e in added {
        let (id, name) = (e[0].as_u64().unwrap() as u32, e[1].as_str().unwrap());
        assert_eq!(tok.encode(name).unwrap(), vec![id], "{name}");
        assert_eq!(tok.decode(&[id]).unwrap(), name);
    }
    let roles = &json["tokenizer_roles"];
    let role = |r: &str| tok.token_to_id(roles[r].as_str().unwrap()).unwrap();
    assert_eq!(tok.bos_id(), role("bos_token"));
    assert_eq!(tok.eos_id(), role("eos_token"));
    assert_eq!(tok.pad_id(), role("pad_token"));
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (1, 2, 2));
    // README: a "\n" between two special tokens is a pre-token of its own.
    assert_eq!(
        tok.encode("<|im_end|>\n<|im_start|>").unwrap(),
        vec![2, 198, 1]
    );
    // Nothing is added automatically.
    assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
}

#[test]
fn digit_examples_match_transformers_not_digit_split() {
    let Some((json, tok)) = setup("digit_examples_match_transformers_not_digit_split") else {
        return;
    };
    let examples = json["digit_check"]["divergence_examples"]
        .as_array()
        .unwrap();
    assert!(!examples.is_empty());
    for e in examples {
        let text = e["text"].as_str().unwrap();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, ids(&e["transformers_ids"]), "digit example {text:?}");
        assert_eq!(tok.decode(&got).unwrap(), text);
    }
}

#[test]
fn vocab_size_matches() {
    let Some((json, tok)) = setup("vocab_size_matches") else {
        return;
    };
    let n = json["vocab_size"].as_u64().unwrap() as usize;
    assert_eq!(tok.vocab_size(), n);
    assert_eq!(json["config_vocab_size"].as_u64().unwrap() as usize, n);
    assert_eq!(tok.vocab().len(), n);
    assert!(
        tok.decode(&[n as u32]).is_err(),
        "id past the vocabulary is an error"
    );
}
