//! The tiny random Llama GGUF (a byte-level BPE vocab, random f32 weights under llama.cpp's
//! names with q/k permuted) and chat data that the CLI tests run the binary on. Included by
//! the CLI test files with `#[path]`; each uses part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lorafuse::io::gguf::{GgufArray, GgufValue, WriteTensor, permute_qk, write_gguf};
use lorafuse::model::LlamaConfig;
use lorafuse::model::llama::random_tensors;
use safetensors::{Dtype, SafeTensors};

pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const MERGES: [&str; 3] = ["Ġ t", "h e", "Ġt he"];

// ---------------------------------------------------------------------------------------------
// the tiny model and data
// ---------------------------------------------------------------------------------------------

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the others to U+0100...
pub fn byte_spelling() -> Vec<char> {
    let mut n = 0u32;
    (0..=255u8)
        .map(|b| {
            if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                char::from(b)
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

/// The tokens: the three ChatML specials (CONTROL), the 256 bytes, then the merge results.
pub fn vocab() -> (Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_spelling().into_iter().map(String::from));
    tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    let mut types = vec![1i32; tokens.len()];
    types[..SPECIALS.len()].fill(3);
    (tokens, types)
}

pub fn tiny_cfg(vocab_size: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 256,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 2,
    }
}

/// GGUF name of a transformers tensor name, and the head count to permute q/k rows with.
pub fn gguf_name(hf: &str, cfg: &LlamaConfig) -> (String, Option<usize>) {
    match hf {
        "model.embed_tokens.weight" => return ("token_embd.weight".into(), None),
        "model.norm.weight" => return ("output_norm.weight".into(), None),
        "lm_head.weight" => return ("output.weight".into(), None),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect(hf);
    let (layer, rest) = rest.split_once('.').expect(hf);
    let module = rest.strip_suffix(".weight").expect(hf);
    let (name, heads) = match module {
        "self_attn.q_proj" => ("attn_q", Some(cfg.num_attention_heads)),
        "self_attn.k_proj" => ("attn_k", Some(cfg.num_key_value_heads)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        other => panic!("unexpected tensor {other}"),
    };
    (format!("blk.{layer}.{name}.weight"), heads)
}

/// Writes the tiny Llama GGUF: llama.* and tokenizer.ggml.* metadata, F32 weights from
/// `random_tensors` under llama.cpp's names, q/k rows permuted as llama.cpp stores them.
pub fn write_tiny_gguf(
    path: &Path,
    hf: &HashMap<String, (Vec<f32>, Vec<usize>)>,
    cfg: &LlamaConfig,
) {
    let (tokens, types) = vocab();
    assert_eq!(tokens.len(), cfg.vocab_size);
    let u32v = |x: usize| GgufValue::U32(x as u32);
    let mut m = BTreeMap::new();
    m.insert(
        "general.architecture".into(),
        GgufValue::String("llama".into()),
    );
    m.insert("general.name".into(), GgufValue::String("tiny".into()));
    m.insert("llama.embedding_length".into(), u32v(cfg.hidden_size));
    m.insert(
        "llama.feed_forward_length".into(),
        u32v(cfg.intermediate_size),
    );
    m.insert("llama.block_count".into(), u32v(cfg.num_hidden_layers));
    m.insert(
        "llama.attention.head_count".into(),
        u32v(cfg.num_attention_heads),
    );
    m.insert(
        "llama.attention.head_count_kv".into(),
        u32v(cfg.num_key_value_heads),
    );
    m.insert(
        "llama.rope.freq_base".into(),
        GgufValue::F32(cfg.rope_theta),
    );
    m.insert(
        "llama.attention.layer_norm_rms_epsilon".into(),
        GgufValue::F32(cfg.rms_norm_eps),
    );
    m.insert(
        "llama.context_length".into(),
        u32v(cfg.max_position_embeddings),
    );
    m.insert(
        "tokenizer.ggml.model".into(),
        GgufValue::String("gpt2".into()),
    );
    m.insert(
        "tokenizer.ggml.tokens".into(),
        GgufValue::Array(GgufArray::String(tokens)),
    );
    m.insert(
        "tokenizer.ggml.merges".into(),
        GgufValue::Array(GgufArray::String(MERGES.map(String::from).to_vec())),
    );
    m.insert(
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(GgufArray::I32(types)),
    );
    m.insert("tokenizer.ggml.bos_token_id".into(), u32v(1));
    m.insert("tokenizer.ggml.eos_token_id".into(), u32v(2));
    m.insert("tokenizer.ggml.padding_token_id".into(), u32v(2));

    let mut names: Vec<&String> = hf.keys().collect();
    names.sort();
    let tensors: Vec<WriteTensor<'static>> = names
        .into_iter()
        .map(|name| {
            let (data, shape) = &hf[name];
            let (gname, heads) = gguf_name(name, cfg);
            let mut data = data.clone();
            if let Some(h) = heads {
                permute_qk(&mut data, shape[0], shape[1], h).unwrap();
            }
            WriteTensor::f32(gname, shape, &data)
        })
        .collect();
    write_gguf(path, &m, &tensors).unwrap();
}

/// `n` chat records `{"question", "answer"}` as JSONL lines.
pub fn chat_lines(n: usize) -> Vec<String> {
    let words = [
        "zero", "one", "two", "three", "four", "five", "six", "seven",
    ];
    (0..n)
        .map(|i| {
            let q = format!("what comes after {}?", words[i % 8]);
            let a = format!("the answer is {} then {}.", words[(i + 1) % 8], i);
            serde_json::json!({ "question": q, "answer": a }).to_string()
        })
        .collect()
}

/// A safetensors file's tensors by name: dtype, shape, raw little-endian bytes.
pub type St = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// The folder, empty cache, tiny GGUF and chat data a CLI test file runs on.
pub struct TinySetup {
    pub dir: PathBuf,
    pub cache: PathBuf,
    pub gguf: PathBuf,
    pub data: PathBuf,
    pub cfg: LlamaConfig,
    /// The base weights under transformers' names (q/k in transformers' order).
    pub base: HashMap<String, (Vec<f32>, Vec<usize>)>,
}

/// Writes a fresh [`TinySetup`] under the cargo test temp dir, in a folder named
/// `{name}-{pid}` (so separate-process test runners do not collide).
pub fn tiny_setup(name: &str) -> TinySetup {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = dir.join("empty-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let cfg = tiny_cfg(vocab().0.len());
    let base = random_tensors(&cfg, 7);
    let gguf = dir.join("tiny.gguf");
    write_tiny_gguf(&gguf, &base, &cfg);
    let data = dir.join("tiny.jsonl");
    std::fs::write(&data, chat_lines(40).join("\n") + "\n").unwrap();
    TinySetup {
        dir,
        cache,
        gguf,
        data,
        cfg,
        base,
    }
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// Every tensor of a safetensors file as `(dtype, shape, bytes)`.
pub fn read_st(path: &Path) -> St {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

pub fn f32_of(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs the `lorafuse` binary with `args` and `LORAFUSE_CACHE` at `cache` (so nothing is
/// fetched into the user's cache), printing the command and its output.
pub fn run_lorafuse(cache: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_lorafuse"))
        .args(args)
        .env("LORAFUSE_CACHE", cache)
        .output()
        .expect("run the lorafuse binary");
    println!(
        "$ lorafuse {}\n-> {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
