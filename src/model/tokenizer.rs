//! The byte-level BPE tokenizer of a GGUF model, built with the `tokenizers` crate exactly as
//! transformers builds it from the GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`,
//! `GGUFGPTConverter`):
//!
//! * model: BPE over `tokenizer.ggml.tokens` (id = position) and `tokenizer.ggml.merges`
//!   (`"left right"`, ranked by order), no unk token, no dropout, no byte fallback. A token whose
//!   characters are not all in GPT-2's byte-to-unicode alphabet is respelled through that table
//!   from its UTF-8 bytes (how transformers keys such vocabularies).
//! * no normalizer.
//! * pre-tokenizer: GPT-2's `ByteLevel` (its regex
//!   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`), with
//!   `add_prefix_space` from `tokenizer.ggml.add_space_prefix` (default false). When
//!   `tokenizer.ggml.pre` names one of the splits transformers knows (`llama-bpe`, `qwen2`,
//!   `gpt-4o` ...), that regex splits first and `ByteLevel` runs without its own regex. Other
//!   names (SmolLM2's `smollm` included) get the plain GPT-2 one, as in transformers.
//! * decoder: `ByteLevel`.
//! * tokens of type CONTROL (3 in `tokenizer.ggml.token_type`) are special added tokens: matched
//!   whole in the input before any splitting, never produced by merges, never added
//!   automatically (`encode` adds no BOS/EOS).
//!
//! Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is supported.

use std::collections::HashMap;
use std::fmt;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` value of control tokens (`LLAMA_TOKEN_TYPE_CONTROL`).
pub const TOKEN_TYPE_CONTROL: i64 = 3;

// Split regexes of the `tokenizer.ggml.pre` values that transformers maps (its
// `GGUF_PRE_TOKENIZER_SPLITS`): the pre-tokenizer regexes of the original tokenizer.json files.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex for a `tokenizer.ggml.pre` value, or `None` for GPT-2's own (the default).
fn pre_split(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// GPT-2's byte-to-unicode table (`bytes_to_unicode` in GPT-2's `encoder.py`): printable bytes
/// map to themselves, the other 68 to U+0100.. in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0') // 256..=323, always valid
        };
    }
    table
}

/// How a vocabulary is turned into a tokenizer (the GGUF keys beyond tokens and merges).
pub(crate) struct Spec<'a> {
    pub(crate) tokens: &'a [String],
    pub(crate) merges: &'a [String],
    pub(crate) token_types: &'a [i64],
    pub(crate) pre: Option<&'a str>,
    pub(crate) add_prefix_space: bool,
    pub(crate) bos: u32,
    pub(crate) eos: u32,
    pub(crate) pad: u32,
}

/// A token's byte range `(start, end)` in the encoded text.
pub type ByteSpan = (usize, usize);

/// A byte-level BPE tokenizer (GPT-2 style) with the special ids of its GGUF.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    bos: u32,
    eos: u32,
    pad: u32,
    special: Vec<u32>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("n_special", &self.special.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

fn tok_err(e: impl fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Reads a `tokenizers` JSON file (`tokenizer.json` of a transformers folder) as it is, with
    /// the special ids given (from the folder's `config.json`). Special tokens are its added
    /// tokens marked `special`.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the file cannot be read or parsed, or a special id is outside the
    /// vocabulary.
    pub fn from_hf_file(path: &std::path::Path, bos: u32, eos: u32, pad: u32) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let n = inner.get_vocab_size(true);
        for (what, id) in [("bos", bos), ("eos", eos), ("pad", pad)] {
            if id as usize >= n {
                return Err(Error::Tokenizer(format!(
                    "{}: {what} token id {id} is outside the vocabulary of {n} tokens",
                    path.display()
                )));
            }
        }
        let mut special: Vec<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&i, _)| i)
            .collect();
        special.sort_unstable();
        Ok(Tokenizer {
            inner,
            vocab_size: n,
            bos,
            eos,
            pad,
            special,
        })
    }

    /// Builds a tokenizer from a vocabulary in GGUF form, for tiny test models: `tokens[i]` is the
    /// byte-level spelling of id `i` (`Ġ` = space), `merges` are `"left right"` strings in rank
    /// order, `token_types` the GGUF token types (3 = CONTROL = special; may be shorter than
    /// `tokens` or empty). GPT-2 pre-tokenizer, no prefix space.
    ///
    /// # Errors
    /// As [`Tokenizer::from_gguf`].
    pub fn from_vocab_merges(
        tokens: &[String],
        merges: &[String],
        token_types: &[i32],
        bos: u32,
        eos: u32,
        pad: u32,
    ) -> Result<Tokenizer> {
        let token_types: Vec<i64> = token_types.iter().map(|&t| i64::from(t)).collect();
        Self::build(Spec {
            tokens,
            merges,
            token_types: &token_types,
            pre: None,
            add_prefix_space: false,
            bos,
            eos,
            pad,
        })
    }

    pub(crate) fn build(spec: Spec<'_>) -> Result<Tokenizer> {
        let n = spec.tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(Error::Tokenizer(format!("vocabulary of {n} tokens")));
        }
        let spelling = bytes_to_unicode();
        let in_alphabet = |t: &str| t.chars().all(|c| spelling.contains(&c));
        // transformers `_byte_level_vocab`: later duplicates win, as in a Python dict.
        let vocab: Vocab = spec
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let key = if in_alphabet(t) {
                    t.clone()
                } else {
                    t.bytes().map(|b| spelling[b as usize]).collect()
                };
                (key, i as u32)
            })
            .collect();
        let mut merges = Vec::with_capacity(spec.merges.len());
        for (i, m) in spec.merges.iter().enumerate() {
            let mut parts = m.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if vocab.contains_key(a) && vocab.contains_key(b) => {
                    merges.push((a.to_string(), b.to_string()))
                }
                _ => {
                    return Err(Error::Tokenizer(format!(
                        "merge {i} `{m}` is not two space-separated tokens of the vocabulary"
                    )));
                }
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            .fuse_unk(false)
            .build()
            .map_err(tok_err)?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        match spec.pre.and_then(pre_split) {
            Some(regex) => {
                let split = Split::new(
                    SplitPattern::Regex(regex.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(tok_err)?;
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
                ])));
            }
            None => {
                inner.with_pre_tokenizer(Some(ByteLevel::new(spec.add_prefix_space, true, true)));
            }
        }
        inner.with_decoder(Some(ByteLevel::default()));

        // CONTROL tokens become special added tokens (not normalized, no strip, not single-word);
        // a token needing respelling is not one (transformers skips those too).
        let special: Vec<u32> = spec
            .tokens
            .iter()
            .zip(spec.token_types)
            .enumerate()
            .filter(|(_, (t, ty))| **ty == TOKEN_TYPE_CONTROL && in_alphabet(t))
            .map(|(i, _)| i as u32)
            .collect();
        let added: Vec<AddedToken> = special
            .iter()
            .map(|&i| AddedToken::from(spec.tokens[i as usize].clone(), true).normalized(false))
            .collect();
        inner.add_special_tokens(added).map_err(tok_err)?;

        for (what, id) in [("bos", spec.bos), ("eos", spec.eos), ("pad", spec.pad)] {
            if id as usize >= n {
                return Err(Error::Tokenizer(format!(
                    "{what} token id {id} is outside the vocabulary of {n} tokens"
                )));
            }
        }
        Ok(Tokenizer {
            inner,
            vocab_size: n,
            bos: spec.bos,
            eos: spec.eos,
            pad: spec.pad,
            special,
        })
    }

    /// Token ids of `text`, with no BOS/EOS added (`add_special_tokens = False`). Special
    /// (CONTROL) tokens written in the text, such as `<|im_start|>`, are matched whole.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the `tokenizers` pipeline fails (it does not for valid UTF-8).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Tokenizer::encode`] with each token's byte range `(start, end)` in `text` (the chat
    /// renderer finds turns by them).
    ///
    /// # Errors
    /// As [`Tokenizer::encode`].
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// The text of `ids`, special tokens included (nothing skipped); the inverse of
    /// [`Tokenizer::encode`]. Byte sequences that are not valid UTF-8 (a cut multi-byte
    /// character) come out as U+FFFD.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] naming the id if one is outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// The id of a token given in its vocabulary spelling (`"Ġworld"`, `"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary spelling of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens in the GGUF vocabulary (the model's embedding rows).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `tokenizer.ggml.bos_token_id` (never added by [`Tokenizer::encode`]).
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// `tokenizer.ggml.eos_token_id` (SmolLM2: `<|im_end|>`, 2).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// `tokenizer.ggml.padding_token_id`, else the EOS id.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Ids of the special (CONTROL) tokens, ascending.
    pub fn special_ids(&self) -> &[u32] {
        &self.special
    }

    /// The full vocabulary (added tokens included), token spelling to id.
    pub fn vocab(&self) -> HashMap<String, u32> {
        self.inner.get_vocab(true)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0], 'Ā');
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
    }

    const MERGES: [&str; 12] = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2", "12 3",
        "123 4",
    ];

    /// Specials 0..3, then the 256 byte tokens, then one token per merge.
    pub(crate) fn tiny_vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
        let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            .map(String::from)
            .to_vec();
        tokens.extend(bytes_to_unicode().iter().map(|c| c.to_string()));
        tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
        let mut types = vec![3, 3, 3];
        types.resize(tokens.len(), 1);
        (tokens, MERGES.map(String::from).to_vec(), types)
    }

    fn tiny() -> Tokenizer {
        let (tokens, merges, types) = tiny_vocab();
        Tokenizer::from_vocab_merges(&tokens, &merges, &types, 1, 2, 2).unwrap()
    }

    #[test]
    fn tiny_vocab_encodes_merges_and_specials() {
        let tok = tiny();
        let id = |t: &str| tok.token_to_id(t).unwrap();
        assert_eq!(tok.vocab_size(), 3 + 256 + MERGES.len());
        let text = "<|im_start|>hello world<|im_end|>\n";
        let ids = tok.encode(text).unwrap();
        assert_eq!(
            ids,
            [1, id("hello"), id("Ġworld"), 2, id("Ċ")],
            "specials matched whole, merges applied"
        );
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // A special token spelled inside a word is still matched whole; no BOS/EOS added.
        let ids = tok.encode("he<|im_end|>ll").unwrap();
        assert_eq!(ids, [id("he"), 2, id("ll")]);
        // Bytes with no merge come out one per byte and round-trip, emoji included.
        let text = "  x\t🤖\u{0}";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.special_ids(), [0, 1, 2]);
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (1, 2, 2));
        assert!(tok.decode(&[10_000]).is_err());
    }

    #[test]
    fn non_byte_level_tokens_are_respelled() {
        // A token written raw (here with a real space and a non-alphabet char) is keyed by its
        // byte-level spelling, as transformers' `_byte_level_vocab` does; it is never special.
        let (mut tokens, merges, mut types) = tiny_vocab();
        tokens.push("x y\u{fffd}".into());
        types.push(3);
        let n = tokens.len() as u32;
        let tok = Tokenizer::from_vocab_merges(&tokens, &merges, &types, 0, 0, 0).unwrap();
        assert_eq!(tok.token_to_id("xĠyï¿½"), Some(n - 1));
        assert_eq!(tok.decode(&[n - 1]).unwrap(), "x y\u{fffd}");
        assert_eq!(tok.special_ids(), [0, 1, 2]);
    }

    #[test]
    fn bad_merges_and_ids_are_errors() {
        let (tokens, mut merges, types) = tiny_vocab();
        merges.push("q zz".into());
        let e = Tokenizer::from_vocab_merges(&tokens, &merges, &types, 0, 0, 0);
        assert!(matches!(e, Err(Error::Tokenizer(m)) if m.contains("q zz")));
        let (tokens, merges, types) = tiny_vocab();
        let e = Tokenizer::from_vocab_merges(&tokens, &merges, &types, 100_000, 0, 0);
        assert!(matches!(e, Err(Error::Tokenizer(m)) if m.contains("bos")));
        assert!(Tokenizer::from_vocab_merges(&[], &[], &[], 0, 0, 0).is_err());
    }
}
