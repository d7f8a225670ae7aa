//! The tokenizer and chat template a GGUF file carries (`tokenizer.ggml.*`,
//! `tokenizer.chat_template`), read as llama.cpp and transformers (`gguf_file=`) read them.

use super::GgufFile;
use crate::error::{Error, Result};
use crate::model::chat::ChatTemplate;
use crate::model::tokenizer::{Spec, Tokenizer};

impl Tokenizer {
    /// Builds the tokenizer of a GGUF file from `tokenizer.ggml.tokens`, `.merges`,
    /// `.token_type` (optional), `.pre` (optional), `.add_space_prefix` (optional) and the
    /// special ids `.bos_token_id`, `.eos_token_id` (required, as for [`GgufFile::llama_config`])
    /// and `.padding_token_id` (optional; defaults to the EOS id).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if `tokenizer.ggml.model` is not `gpt2`, a merge is not two
    /// space-separated tokens of the vocabulary, or a special id is outside the vocabulary;
    /// [`Error::Missing`] naming an absent key (`tokenizer.ggml.model`, `.tokens`, `.merges`,
    /// `.bos_token_id`, `.eos_token_id`); [`Error::Format`] for a mistyped one.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "{}: tokenizer.ggml.model is `{model}`; only `gpt2` (byte-level BPE) is supported",
                g.path().display()
            )));
        }
        let has = |k: &str| g.metadata().contains_key(k);
        let eos = g.get_u32("tokenizer.ggml.eos_token_id")?;
        let token_types = if has("tokenizer.ggml.token_type") {
            g.get_int_array("tokenizer.ggml.token_type")?
        } else {
            Vec::new()
        };
        let pre = if has("tokenizer.ggml.pre") {
            Some(g.get_str("tokenizer.ggml.pre")?)
        } else {
            None
        };
        let add_prefix_space = if has("tokenizer.ggml.add_space_prefix") {
            g.get_bool("tokenizer.ggml.add_space_prefix")?
        } else {
            false
        };
        Tokenizer::build(Spec {
            tokens: g.get_str_array("tokenizer.ggml.tokens")?,
            merges: g.get_str_array("tokenizer.ggml.merges")?,
            token_types: &token_types,
            pre,
            add_prefix_space,
            bos: g.get_u32("tokenizer.ggml.bos_token_id")?,
            eos,
            pad: if has("tokenizer.ggml.padding_token_id") {
                g.get_u32("tokenizer.ggml.padding_token_id")?
            } else {
                eos
            },
        })
    }
}

impl ChatTemplate {
    /// The template a GGUF stores (`tokenizer.chat_template`), with the tokenizer's BOS and EOS
    /// tokens; `None` when the file has none. Errors: a template that does not parse.
    pub fn from_gguf(g: &GgufFile, tok: &Tokenizer) -> Result<Option<Self>> {
        match g.get_str("tokenizer.chat_template") {
            Ok(src) => Self::for_tokenizer(src, tok).map(Some),
            Err(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::{GgufArray, GgufValue, write_gguf};
    use crate::model::tokenizer::tests::tiny_vocab;
    use std::collections::BTreeMap;

    #[test]
    fn from_gguf_reads_keys_and_rejects_other_models() {
        let dir = std::env::temp_dir().join(format!("lorafuse-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (tokens, merges, types) = tiny_vocab();
        let mut m = BTreeMap::new();
        m.insert(
            "tokenizer.ggml.model".to_string(),
            GgufValue::String("gpt2".into()),
        );
        m.insert(
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(GgufArray::String(tokens)),
        );
        m.insert(
            "tokenizer.ggml.merges".to_string(),
            GgufValue::Array(GgufArray::String(merges)),
        );
        m.insert(
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array(GgufArray::I32(types)),
        );
        m.insert("tokenizer.ggml.bos_token_id".to_string(), GgufValue::U32(1));
        m.insert("tokenizer.ggml.eos_token_id".to_string(), GgufValue::U32(2));
        let path = dir.join("tok.gguf");
        write_gguf(&path, &m, &[]).unwrap();
        let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (1, 2, 2));
        assert_eq!(tok.encode("hello<|endoftext|>").unwrap()[1], 0);
        let id = |t: &str| tok.token_to_id(t).unwrap();
        // GPT-2's regex keeps a digit run whole, so BPE merges across it.
        assert_eq!(tok.encode("12345").unwrap(), [id("1234"), id("5")]);

        // `add_space_prefix` is honoured as transformers does (GPT-2 `add_prefix_space`).
        m.insert(
            "tokenizer.ggml.add_space_prefix".to_string(),
            GgufValue::Bool(true),
        );
        write_gguf(&path, &m, &[]).unwrap();
        let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        assert_eq!(
            tok.encode("world").unwrap(),
            [tok.token_to_id("Ġworld").unwrap()]
        );

        // A known pre-tokenizer name switches to its split regex (llama-3: digits in threes).
        m.remove("tokenizer.ggml.add_space_prefix");
        m.insert(
            "tokenizer.ggml.pre".to_string(),
            GgufValue::String("llama-bpe".into()),
        );
        write_gguf(&path, &m, &[]).unwrap();
        let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        assert_eq!(tok.encode("12345").unwrap(), [id("123"), id("4"), id("5")]);
        assert_eq!(
            tok.decode(&tok.encode("12345 hello").unwrap()).unwrap(),
            "12345 hello"
        );

        m.insert(
            "tokenizer.ggml.model".to_string(),
            GgufValue::String("llama".into()),
        );
        write_gguf(&path, &m, &[]).unwrap();
        let e = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap());
        assert!(
            matches!(e, Err(Error::Tokenizer(m)) if m.contains("`llama`") && m.contains("gpt2"))
        );

        m.remove("tokenizer.ggml.model");
        write_gguf(&path, &m, &[]).unwrap();
        let e = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap());
        assert!(
            matches!(e, Err(Error::Missing { name, .. }) if name.contains("tokenizer.ggml.model"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
