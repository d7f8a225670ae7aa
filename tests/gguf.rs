//! The GGUF reader: written-file round trips, hostile and truncated files, the q/k permutation,
//! and (with `LORAFUSE_MODEL`) the real SmolLM2 file against `golden/smollm2/logits.safetensors`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use lorafuse::Error;
use lorafuse::io::gguf::{
    GgmlType, GgufArray, GgufFile, GgufValue, WriteTensor, permute_qk, unpermute_qk, write_gguf,
};
use lorafuse::model::LlamaConfig;
use proptest::prelude::*;
use safetensors::SafeTensors;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A fresh temporary folder for one test (removed at the start, left for inspection after).
fn tmp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lorafuse-gguf-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(v: &str) -> GgufValue {
    GgufValue::String(v.to_string())
}

/// Metadata of a tiny Llama (hidden 8, 2 heads, 1 KV head, 2 layers, vocab 5).
fn tiny_llama_metadata() -> BTreeMap<String, GgufValue> {
    let mut m = BTreeMap::new();
    m.insert("general.architecture".into(), s("llama"));
    m.insert("llama.embedding_length".into(), GgufValue::U32(8));
    m.insert("llama.feed_forward_length".into(), GgufValue::U32(12));
    m.insert("llama.block_count".into(), GgufValue::U32(2));
    m.insert("llama.attention.head_count".into(), GgufValue::U32(2));
    m.insert("llama.attention.head_count_kv".into(), GgufValue::U32(1));
    m.insert("llama.rope.freq_base".into(), GgufValue::F32(500.0));
    m.insert(
        "llama.attention.layer_norm_rms_epsilon".into(),
        GgufValue::F32(1e-6),
    );
    m.insert("llama.context_length".into(), GgufValue::U32(64));
    m.insert("tokenizer.ggml.model".into(), s("gpt2"));
    let tokens = ["<s>", "</s>", "a", "b", "ab"].map(String::from).to_vec();
    m.insert(
        "tokenizer.ggml.tokens".into(),
        GgufValue::Array(GgufArray::String(tokens)),
    );
    m.insert(
        "tokenizer.ggml.merges".into(),
        GgufValue::Array(GgufArray::String(vec!["a b".into()])),
    );
    m.insert(
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(GgufArray::I32(vec![3, 3, 1, 1, 1])),
    );
    m.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(0));
    m.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(1));
    m
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Writes a tiny Llama file (F32 tensors) and returns its path.
fn write_tiny_llama(dir: &Path, with_output: bool) -> PathBuf {
    let path = dir.join("tiny.gguf");
    let mut tensors = vec![
        WriteTensor::f32("token_embd.weight", &[5, 8], &values(40, 1)),
        WriteTensor::f32("blk.0.attn_q.weight", &[8, 8], &values(64, 2)),
        WriteTensor::f32("blk.0.attn_k.weight", &[4, 8], &values(32, 3)),
        WriteTensor::f32("blk.0.attn_norm.weight", &[8], &values(8, 4)),
    ];
    if with_output {
        tensors.push(WriteTensor::f32("output.weight", &[5, 8], &values(40, 5)));
    }
    write_gguf(&path, &tiny_llama_metadata(), &tensors).unwrap();
    path
}

/// Asserts `r` is an `Error::Format` for `path` whose message contains every one of `words`.
fn assert_format_err<T: std::fmt::Debug>(r: Result<T, Error>, path: &Path, words: &[&str]) {
    match r {
        Err(Error::Format { path: p, msg }) => {
            assert_eq!(p, path, "error names the file");
            for w in words {
                assert!(msg.contains(w), "message {msg:?} should mention {w:?}");
            }
        }
        other => panic!("expected Error::Format mentioning {words:?}, got {other:?}"),
    }
}

/// Little-endian builder for hand-made (hostile) GGUF files.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn header(n_tensors: u64, n_kv: u64) -> Bytes {
        let mut b = Bytes::default();
        b.raw(b"GGUF").u32(3).u64(n_tensors).u64(n_kv);
        b
    }
    fn raw(&mut self, x: &[u8]) -> &mut Self {
        self.0.extend_from_slice(x);
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.raw(&x.to_le_bytes())
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.raw(&x.to_le_bytes())
    }
    fn str(&mut self, x: &str) -> &mut Self {
        self.u64(x.len() as u64).raw(x.as_bytes())
    }
    fn pad(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.0).unwrap();
        path
    }
}

// ---------------------------------------------------------------------------------------------
// written files
// ---------------------------------------------------------------------------------------------

#[test]
fn writer_reader_round_trip_all_value_types() {
    let dir = tmp_dir("round_trip");
    let mut m = BTreeMap::new();
    m.insert("u8".to_string(), GgufValue::U8(200));
    m.insert("i8".to_string(), GgufValue::I8(-100));
    m.insert("u16".to_string(), GgufValue::U16(60000));
    m.insert("i16".to_string(), GgufValue::I16(-30000));
    m.insert("u32".to_string(), GgufValue::U32(4_000_000_000));
    m.insert("i32".to_string(), GgufValue::I32(-2_000_000_000));
    m.insert("f32".to_string(), GgufValue::F32(1.5e-3));
    m.insert("bool".to_string(), GgufValue::Bool(true));
    m.insert("string".to_string(), s("naïve 🤖"));
    m.insert("u64".to_string(), GgufValue::U64(u64::MAX));
    m.insert("i64".to_string(), GgufValue::I64(i64::MIN));
    m.insert("f64".to_string(), GgufValue::F64(-2.5e300));
    m.insert("empty".to_string(), GgufValue::Array(GgufArray::U8(vec![])));
    m.insert(
        "arr.i32".to_string(),
        GgufValue::Array(GgufArray::I32(vec![1, -2, 3])),
    );
    m.insert(
        "arr.bool".to_string(),
        GgufValue::Array(GgufArray::Bool(vec![true, false])),
    );
    m.insert(
        "arr.f64".to_string(),
        GgufValue::Array(GgufArray::F64(vec![0.25, -1e-300])),
    );
    m.insert(
        "arr.str".to_string(),
        GgufValue::Array(GgufArray::String(vec!["".into(), "Ġa b".into()])),
    );
    m.insert(
        "arr.nested".to_string(),
        GgufValue::Array(GgufArray::Array(vec![
            GgufArray::U16(vec![1, 2]),
            GgufArray::String(vec!["x".into()]),
            GgufArray::Array(vec![GgufArray::I64(vec![-7])]),
        ])),
    );
    m.insert("general.alignment".to_string(), GgufValue::U32(64));

    let a = values(3 * 5 * 7, 11);
    let b = values(3, 12);
    let f16s: Vec<u8> = a
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect();
    let tensors = vec![
        WriteTensor::f32("a", &[3, 5, 7], &a),
        WriteTensor::f32("b", &[3], &b),
        WriteTensor::raw("c.f16", &[15, 7], GgmlType::F16, &f16s),
    ];
    let path = dir.join("all.gguf");
    write_gguf(&path, &m, &tensors).unwrap();

    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.metadata(), &m);
    assert_eq!(g.tensor_names().collect::<Vec<_>>(), ["a", "b", "c.f16"]);
    for t in g.tensors() {
        assert_eq!(t.data_offset % 64, 0, "{} aligned", t.name);
    }
    assert_eq!(g.tensor_f32("a").unwrap(), (a.clone(), vec![3, 5, 7]));
    assert_eq!(g.tensor_f32("b").unwrap(), (b, vec![3]));
    let (c, shape) = g.tensor_f32("c.f16").unwrap();
    assert_eq!(shape, [15, 7]);
    let expect: Vec<f32> = a.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_eq!(c, expect);

    // Typed getters, and their errors.
    assert_eq!(g.get_u32("u32").unwrap(), 4_000_000_000);
    assert_eq!(g.get_u32("u8").unwrap(), 200);
    assert_eq!(g.get_u64("u64").unwrap(), u64::MAX);
    assert_eq!(g.get_i64("i64").unwrap(), i64::MIN);
    assert_eq!(g.get_f32("f32").unwrap(), 1.5e-3);
    assert!(g.get_bool("bool").unwrap());
    assert_eq!(g.get_str("string").unwrap(), "naïve 🤖");
    assert_eq!(g.get_str_array("arr.str").unwrap(), ["", "Ġa b"]);
    assert_eq!(g.get_int_array("arr.i32").unwrap(), [1, -2, 3]);
    assert_eq!(g.get_array("arr.nested").unwrap().len(), 3);
    assert_format_err(g.get_u32("i32"), &path, &["i32", "uint32"]);
    assert_format_err(g.get_u32("string"), &path, &["string", "integer"]);
    assert_format_err(
        g.get_str_array("arr.i32"),
        &path,
        &["arr.i32", "array[int32]"],
    );
    match g.get_u32("no.such.key") {
        Err(Error::Missing { path: p, name }) => {
            assert_eq!(p, path);
            assert!(name.contains("no.such.key"), "{name}");
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    match g.tensor_f32("nope") {
        Err(Error::Missing { name, .. }) => assert!(name.contains("nope")),
        other => panic!("expected Missing, got {other:?}"),
    }
}

#[test]
fn writer_rejects_wrong_byte_counts_and_is_atomic() {
    let dir = tmp_dir("writer_errors");
    let path = dir.join("bad.gguf");
    let bad = [WriteTensor::f32("x", &[2, 3], &[0.0; 5])];
    assert!(matches!(
        write_gguf(&path, &BTreeMap::new(), &bad),
        Err(Error::Shape { .. })
    ));
    assert!(!path.exists(), "no file left behind");
    let q = [WriteTensor::raw("q", &[2, 16], GgmlType::Q8_0, &[0u8; 34])];
    assert!(
        write_gguf(&path, &BTreeMap::new(), &q).is_err(),
        "row of 16 < block of 32"
    );
    let dup = [
        WriteTensor::f32("x", &[1], &[0.0]),
        WriteTensor::f32("x", &[1], &[0.0]),
    ];
    assert!(write_gguf(&path, &BTreeMap::new(), &dup).is_err());
    // Overwriting an existing file replaces it whole and leaves no temporary file.
    write_gguf(
        &path,
        &BTreeMap::new(),
        &[WriteTensor::f32("x", &[1], &[1.0])],
    )
    .unwrap();
    write_gguf(
        &path,
        &BTreeMap::new(),
        &[WriteTensor::f32("y", &[2], &[1.0, 2.0])],
    )
    .unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.tensor_f32("y").unwrap().0, [1.0, 2.0]);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

/// Reference dequantizers written from the block layouts in the GGUF spec / gguf-py, one
/// element at a time, to check the fast parallel path on more than one block.
#[test]
fn quantized_types_dequantize_like_the_reference() {
    let dir = tmp_dir("quant_types");
    let n_blocks = 3000; // more than one rayon task
    let raw: Vec<u8> = values(n_blocks * 64, 99)
        .iter()
        .map(|x| ((x + 1.0) * 127.9) as u8)
        .collect();
    let half_bytes = |blk: &[u8], at: usize| f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32();
    // Keep the f16 scales finite: clear the exponent's top bit of every d / m.
    let fix = |bytes: &mut Vec<u8>, block: usize, halves: usize| {
        for blk in bytes.chunks_exact_mut(block) {
            for h in 0..halves {
                blk[2 * h + 1] &= 0x3F;
            }
        }
    };
    let mut q4_0 = raw[..n_blocks * 18].to_vec();
    fix(&mut q4_0, 18, 1);
    let mut q4_1 = raw[..n_blocks * 20].to_vec();
    fix(&mut q4_1, 20, 2);
    let mut q8_0 = raw[..n_blocks * 34].to_vec();
    fix(&mut q8_0, 34, 1);
    let mut f16s = raw[..n_blocks * 64].to_vec();
    fix(&mut f16s, 2, 1);
    let bf16s = raw[..n_blocks * 64].to_vec();
    let n = n_blocks * 32;
    let shape = [n_blocks, 32];
    let tensors = vec![
        WriteTensor::raw("q4_0", &shape, GgmlType::Q4_0, &q4_0),
        WriteTensor::raw("q4_1", &shape, GgmlType::Q4_1, &q4_1),
        WriteTensor::raw("q8_0", &shape, GgmlType::Q8_0, &q8_0),
        WriteTensor::raw("f16", &shape, GgmlType::F16, &f16s),
        WriteTensor::raw("bf16", &shape, GgmlType::BF16, &bf16s),
    ];
    let path = dir.join("q.gguf");
    write_gguf(&path, &BTreeMap::new(), &tensors).unwrap();
    let g = GgufFile::open(&path).unwrap();

    let mut want = vec![0f32; n];
    for (i, w) in want.iter_mut().enumerate() {
        let (b, j) = (i / 32, i % 32);
        let blk = &q4_0[b * 18..];
        let q = if j < 16 {
            blk[2 + j] & 15
        } else {
            blk[2 + j - 16] >> 4
        };
        *w = half_bytes(blk, 0) * (q as f32 - 8.0);
    }
    assert_eq!(g.tensor_f32("q4_0").unwrap().0, want, "Q4_0");
    for (i, w) in want.iter_mut().enumerate() {
        let (b, j) = (i / 32, i % 32);
        let blk = &q4_1[b * 20..];
        let q = if j < 16 {
            blk[4 + j] & 15
        } else {
            blk[4 + j - 16] >> 4
        };
        *w = half_bytes(blk, 0) * q as f32 + half_bytes(blk, 2);
    }
    assert_eq!(g.tensor_f32("q4_1").unwrap().0, want, "Q4_1");
    for (i, w) in want.iter_mut().enumerate() {
        let (b, j) = (i / 32, i % 32);
        let blk = &q8_0[b * 34..];
        *w = half_bytes(blk, 0) * (blk[2 + j] as i8) as f32;
    }
    assert_eq!(g.tensor_f32("q8_0").unwrap().0, want, "Q8_0");
    for (i, w) in want.iter_mut().enumerate() {
        *w = half_bytes(&f16s, 2 * i);
    }
    assert_eq!(g.tensor_f32("f16").unwrap().0, want, "F16");
    let got = g.tensor_f32("bf16").unwrap().0;
    for (i, x) in got.iter().enumerate() {
        let want = bf16::from_le_bytes([bf16s[2 * i], bf16s[2 * i + 1]]).to_f32();
        assert!(
            x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan()),
            "BF16 {i}"
        );
    }
    // Raw bytes are served as stored.
    assert_eq!(g.tensor_bytes("q4_1").unwrap(), &q4_1[..]);
    assert_eq!(g.tensor_info("q8_0").unwrap().shape, shape);
}

#[test]
fn unsupported_tensor_type_is_a_clear_error() {
    let dir = tmp_dir("unsupported");
    let q4k = vec![0u8; 2 * 144];
    let path = dir.join("k.gguf");
    let tensors = [WriteTensor::raw(
        "blk.0.ffn_down.weight",
        &[2, 256],
        GgmlType::Q4_K,
        &q4k,
    )];
    write_gguf(&path, &BTreeMap::new(), &tensors).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let info = g.tensor_info("blk.0.ffn_down.weight").unwrap();
    assert_eq!((info.ggml_type, info.n_bytes), (GgmlType::Q4_K, 288));
    assert_format_err(
        g.tensor_f32("blk.0.ffn_down.weight"),
        &path,
        &["blk.0.ffn_down.weight", "Q4_K", "cannot dequantize"],
    );

    // An id no ggml version defines is rejected when the file is opened.
    let mut b = Bytes::header(1, 0);
    b.str("t").u32(1).u64(32).u32(200).u64(0).pad(64);
    let path = b.write(&dir, "unknown.gguf");
    assert_format_err(
        GgufFile::open(&path),
        &path,
        &["`t`", "unknown ggml type id 200"],
    );
}

#[test]
fn tiny_llama_config_and_tokenizer_metadata() {
    let dir = tmp_dir("tiny_config");
    let path = write_tiny_llama(&dir, false);
    let g = GgufFile::open(&path).unwrap();
    let cfg = g.llama_config().unwrap();
    assert_eq!(
        cfg,
        LlamaConfig {
            vocab_size: 5,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rope_theta: 500.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            max_position_embeddings: 64,
            bos_token_id: 0,
            eos_token_id: 1,
            pad_token_id: 1, // no padding id: falls back to eos
        }
    );
    let path = write_tiny_llama(&dir, true);
    assert!(
        !GgufFile::open(&path)
            .unwrap()
            .llama_config()
            .unwrap()
            .tie_word_embeddings
    );

    // Wrong architecture, missing key, inconsistent heads.
    let cases: [(&str, Option<GgufValue>, &[&str]); 3] = [
        (
            "general.architecture",
            Some(s("gpt2")),
            &["`gpt2`", "llama"],
        ),
        (
            "llama.attention.head_count",
            Some(GgufValue::U32(3)),
            &["head_count"],
        ),
        (
            "llama.attention.head_count_kv",
            Some(GgufValue::U32(3)),
            &["head_count_kv"],
        ),
    ];
    for (key, value, words) in cases {
        let mut m = tiny_llama_metadata();
        m.insert(key.into(), value.unwrap());
        let path = dir.join("bad_config.gguf");
        write_gguf(&path, &m, &[]).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_format_err(g.llama_config(), &path, words);
    }
    let mut m = tiny_llama_metadata();
    m.remove("llama.block_count");
    let path = dir.join("missing.gguf");
    write_gguf(&path, &m, &[]).unwrap();
    match GgufFile::open(&path).unwrap().llama_config() {
        Err(Error::Missing { name, .. }) => assert!(name.contains("llama.block_count"), "{name}"),
        other => panic!("expected Missing, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// hostile and truncated files
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_written_file_errors_at_every_cut() {
    let dir = tmp_dir("truncated");
    let path = write_tiny_llama(&dir, true);
    let bytes = std::fs::read(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let data_end = g
        .tensors()
        .iter()
        .map(|t| t.data_offset + t.n_bytes)
        .max()
        .unwrap();
    drop(g);
    let cut = dir.join("cut.gguf");
    for len in 0..bytes.len() {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let r = GgufFile::open(&cut);
        if len < data_end {
            assert_format_err(r, &cut, &["truncated"]);
        } else {
            // Only the zero padding after the last tensor is missing: still a complete file.
            assert!(r.is_ok(), "cut at {len} of {}", bytes.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Random corruption (bytes overwritten, little-endian u64s planted, a cut) of a valid file:
    /// opening, reading every tensor and building the config return `Ok` or `Err`, never panic.
    #[test]
    fn corrupted_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u64>(), 0u8..3), 1..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let dir = tmp_dir("fuzz");
        let mut bytes = std::fs::read(write_tiny_llama(&dir, true)).unwrap();
        for (at, value, kind) in edits {
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = value as u8,
                1 => {
                    let end = (i + 8).min(bytes.len());
                    bytes[i..end].copy_from_slice(&value.to_le_bytes()[..end - i]);
                }
                _ => {
                    // A small count / length, the kind that most often slips past checks.
                    let end = (i + 8).min(bytes.len());
                    bytes[i..end].copy_from_slice(&(value % 300).to_le_bytes()[..end - i]);
                }
            }
        }
        if do_cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        let path = dir.join("fuzz.gguf");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(g) = GgufFile::open(&path) {
            let _ = g.llama_config();
            for t in g.tensors() {
                if let Ok((v, shape)) = g.tensor_f32(&t.name) {
                    prop_assert_eq!(v.len(), shape.iter().product::<usize>());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn wrong_magic_and_versions() {
    let dir = tmp_dir("magic");
    let mut b = Bytes::default();
    b.raw(b"GGML").u32(3).u64(0).u64(0);
    let path = b.write(&dir, "magic.gguf");
    assert_format_err(GgufFile::open(&path), &path, &["not a GGUF file", "magic"]);

    let path = Bytes(b"PK\x03\x04 this is a zip, not a model".to_vec()).write(&dir, "zip.gguf");
    assert_format_err(GgufFile::open(&path), &path, &["magic"]);

    let mut b = Bytes::default();
    b.raw(b"GGUF").u32(1).u64(0).u64(0);
    let path = b.write(&dir, "v1.gguf");
    assert_format_err(GgufFile::open(&path), &path, &["version 1"]);

    let mut b = Bytes::default();
    b.raw(b"GGUF").raw(&3u32.to_be_bytes()).u64(0).u64(0);
    let path = b.write(&dir, "be.gguf");
    assert_format_err(GgufFile::open(&path), &path, &["big-endian"]);

    let mut b = Bytes::default();
    b.raw(b"GGUF").u32(7).u64(0).u64(0);
    let path = b.write(&dir, "v7.gguf");
    assert_format_err(GgufFile::open(&path), &path, &["version 7"]);

    let path = Bytes(b"GGUF".to_vec()).write(&dir, "short.gguf");
    assert_format_err(GgufFile::open(&path), &path, &["truncated"]);

    match GgufFile::open(&dir.join("absent.gguf")) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("absent.gguf")),
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn hostile_lengths_counts_and_offsets() {
    let dir = tmp_dir("hostile");
    let mut cases: Vec<(&str, Bytes, &[&str])> = Vec::new();

    let mut b = Bytes::header(0, 1);
    b.str("x").u32(9).u32(0).u64(u64::MAX - 3).pad(16);
    cases.push((
        "huge_array",
        b,
        &["metadata `x`", "claims 18446744073709551612"],
    ));

    let mut b = Bytes::header(0, 1);
    b.str("x").u32(9).u32(8).u64(1 << 40).pad(64);
    cases.push((
        "huge_string_array",
        b,
        &["metadata `x`", "claims 1099511627776"],
    ));

    let mut b = Bytes::header(0, 1);
    b.str("x").u32(8).u64(u64::MAX).pad(16);
    cases.push(("huge_string", b, &["truncated", "metadata `x`"]));

    let mut b = Bytes::header(0, 1);
    b.u64(u64::MAX).pad(16);
    cases.push(("huge_key", b, &["truncated", "key of metadata entry 0"]));

    cases.push((
        "huge_kv_count",
        Bytes::header(0, u64::MAX),
        &["metadata entries"],
    ));
    cases.push((
        "huge_tensor_count",
        Bytes::header(u64::MAX, 0),
        &["tensors"],
    ));

    let mut b = Bytes::header(0, 1);
    b.str("x").u32(13).pad(16);
    cases.push(("unknown_value_type", b, &["unknown value type 13"]));

    let mut b = Bytes::header(0, 1);
    b.str("x").u32(9).u32(99).u64(1).pad(16);
    cases.push((
        "unknown_element_type",
        b,
        &["array of unknown value type 99"],
    ));

    let mut b = Bytes::header(0, 1);
    b.str("flag").u32(7).raw(&[2]).pad(16);
    cases.push(("bad_bool", b, &["flag", "bool"]));

    let mut b = Bytes::header(0, 1);
    b.str("x").u32(8).u64(2).raw(&[0xC3, 0x28]).pad(16);
    cases.push(("bad_utf8", b, &["metadata `x`", "UTF-8"]));

    let mut b = Bytes::header(0, 1);
    b.str("deep").u32(9);
    for _ in 0..20 {
        b.u32(9).u64(1);
    }
    b.u32(0).u64(0).pad(16);
    cases.push(("deep_nesting", b, &["nested deeper"]));

    let mut b = Bytes::header(0, 2);
    b.str("k").u32(4).u32(1).str("k").u32(4).u32(2).pad(16);
    cases.push(("duplicate_key", b, &["duplicate metadata key `k`"]));

    let mut b = Bytes::header(0, 1);
    b.str("general.alignment").u32(4).u32(24).pad(16);
    cases.push(("bad_alignment", b, &["general.alignment"]));

    let mut b = Bytes::header(1, 0);
    b.str("t").u32(5).pad(64);
    cases.push(("too_many_dims", b, &["`t`", "5 dimensions"]));

    let mut b = Bytes::header(1, 0);
    b.str("t")
        .u32(2)
        .u64(1 << 32)
        .u64(1 << 32)
        .u32(0)
        .u64(0)
        .pad(64);
    cases.push(("dims_overflow", b, &["`t`", "overflows"]));

    let mut b = Bytes::header(1, 0);
    b.str("t").u32(1).u64(8).u32(0).u64(u64::MAX - 31).pad(64);
    cases.push(("offset_overflow", b, &["`t`", "past the end"]));

    let mut b = Bytes::header(1, 0);
    b.str("t").u32(1).u64(1 << 40).u32(0).u64(0).pad(64);
    cases.push(("tensor_past_end", b, &["truncated", "`t`", "past the end"]));

    let mut b = Bytes::header(1, 0);
    b.str("t").u32(1).u64(8).u32(0).u64(4).pad(64);
    cases.push(("misaligned_offset", b, &["`t`", "alignment"]));

    let mut b = Bytes::header(1, 0);
    b.str("t").u32(1).u64(33).u32(8).u64(0).pad(128);
    cases.push(("partial_block", b, &["`t`", "block size 32"]));

    let mut b = Bytes::header(2, 0);
    b.str("t").u32(1).u64(1).u32(0).u64(0);
    b.str("t").u32(1).u64(1).u32(0).u64(32).pad(96);
    cases.push(("duplicate_tensor", b, &["duplicate tensor name `t`"]));

    for (name, bytes, words) in cases {
        let path = bytes.write(&dir, &format!("{name}.gguf"));
        println!("hostile case {name}");
        assert_format_err(GgufFile::open(&path), &path, words);
    }
}

// ---------------------------------------------------------------------------------------------
// q/k permutation
// ---------------------------------------------------------------------------------------------

proptest! {
    // Integration tests have no src/lib.rs beside them for proptest's regression files.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn permute_and_unpermute_are_inverse(
        n_head in 1usize..7,
        half in 1usize..9,
        n_cols in 1usize..6,
        seed in any::<u64>(),
    ) {
        let hd = 2 * half;
        let n_rows = n_head * hd;
        let gguf = values(n_rows * n_cols, seed);
        let mut hf = gguf.clone();
        unpermute_qk(&mut hf, n_rows, n_cols, n_head).unwrap();
        for h in 0..n_head {
            for which in 0..2 {
                for j in 0..half {
                    let hf_row = h * hd + which * half + j;
                    let gguf_row = h * hd + 2 * j + which;
                    prop_assert_eq!(
                        &hf[hf_row * n_cols..(hf_row + 1) * n_cols],
                        &gguf[gguf_row * n_cols..(gguf_row + 1) * n_cols]
                    );
                }
            }
        }
        let mut back = hf.clone();
        permute_qk(&mut back, n_rows, n_cols, n_head).unwrap();
        prop_assert_eq!(&back, &gguf);
        let mut other = gguf.clone();
        permute_qk(&mut other, n_rows, n_cols, n_head).unwrap();
        unpermute_qk(&mut other, n_rows, n_cols, n_head).unwrap();
        prop_assert_eq!(&other, &gguf);
    }
}

#[test]
fn permutation_rejects_bad_shapes() {
    let mut rows = vec![0f32; 24];
    assert!(matches!(
        unpermute_qk(&mut rows, 4, 5, 2),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        unpermute_qk(&mut rows, 6, 4, 2),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        permute_qk(&mut rows, 6, 4, 0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(permute_qk(&mut rows, 6, 4, 3).is_ok());
}

// ---------------------------------------------------------------------------------------------
// the real model
// ---------------------------------------------------------------------------------------------

fn golden_f32(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (v, t.shape().to_vec())
}

/// Asserts bitwise equality of `got` rows with a golden tensor.
fn assert_rows_exact(got: &[f32], golden: &(Vec<f32>, Vec<usize>), what: &str) {
    assert_eq!(got.len(), golden.0.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(&golden.0).enumerate() {
        assert!(
            a.to_bits() == b.to_bits(),
            "{what}: element {i} (row {}, col {}) is {a}, golden {b}",
            i / golden.1[1],
            i % golden.1[1]
        );
    }
    println!("{what}: {} values bit-exact", got.len());
}

#[test]
fn smollm2_layer0_weights_match_transformers() {
    let golden = common::golden_file("smollm2/logits.safetensors");
    let Some(model) = common::model_or_skip("smollm2_layer0_weights_match_transformers") else {
        return;
    };
    let bytes = std::fs::read(&golden).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let g = GgufFile::open(&model).unwrap();
    let cfg = g.llama_config().unwrap();
    let cols = cfg.hidden_size;

    for (gguf_name, hf_name, n_head, n_rows) in [
        (
            "blk.0.attn_q.weight",
            "q_proj",
            cfg.num_attention_heads,
            576,
        ),
        (
            "blk.0.attn_k.weight",
            "k_proj",
            cfg.num_key_value_heads,
            192,
        ),
    ] {
        let info = g.tensor_info(gguf_name).unwrap();
        assert_eq!(info.ggml_type, GgmlType::Q4_1);
        let (w, shape) = g.tensor_f32(gguf_name).unwrap();
        assert_eq!(shape, [n_rows, cols], "{gguf_name} is [out, in]");
        let gguf_rows = golden_f32(&st, &format!("layer0.{hf_name}.gguf_rows0_4"));
        assert_rows_exact(
            &w[..4 * cols],
            &gguf_rows,
            &format!("{gguf_name} gguf rows 0..4"),
        );

        let mut hf = w.clone();
        unpermute_qk(&mut hf, n_rows, cols, n_head).unwrap();
        let hf_rows = golden_f32(&st, &format!("layer0.{hf_name}.hf_rows0_4"));
        assert_rows_exact(
            &hf[..4 * cols],
            &hf_rows,
            &format!("{hf_name} hf rows 0..4"),
        );
        if hf_name == "q_proj" {
            let head0 = golden_f32(&st, "layer0.q_proj.hf_head0");
            assert_eq!(head0.1, [64, cols]);
            assert_rows_exact(&hf[..64 * cols], &head0, "q_proj hf head 0");
        }
        permute_qk(&mut hf, n_rows, cols, n_head).unwrap();
        assert!(hf == w, "{gguf_name}: permute_qk(unpermute_qk(w)) == w");
    }

    let (emb, shape) = g.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(shape, [cfg.vocab_size, cols]);
    assert_eq!(
        g.tensor_info("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    let rows = golden_f32(&st, "embed_tokens.rows_0_1_2");
    assert_rows_exact(&emb[..3 * cols], &rows, "token_embd rows 0, 1, 2");
}

#[test]
fn smollm2_config_matches_transformers() {
    let golden = common::golden_file("smollm2/logits.safetensors");
    let Some(model) = common::model_or_skip("smollm2_config_matches_transformers") else {
        return;
    };
    let bytes = std::fs::read(&golden).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().as_ref().unwrap();
    let want: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    let cfg = GgufFile::open(&model).unwrap().llama_config().unwrap();
    let num = |k: &str| want[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
    assert_eq!(cfg.vocab_size, num("vocab_size"));
    assert_eq!(cfg.hidden_size, num("hidden_size"));
    assert_eq!(cfg.intermediate_size, num("intermediate_size"));
    assert_eq!(cfg.num_hidden_layers, num("num_hidden_layers"));
    assert_eq!(cfg.num_attention_heads, num("num_attention_heads"));
    assert_eq!(cfg.num_key_value_heads, num("num_key_value_heads"));
    assert_eq!(cfg.head_dim, num("head_dim"));
    assert_eq!(cfg.max_position_embeddings, num("max_position_embeddings"));
    assert_eq!(cfg.bos_token_id as usize, num("bos_token_id"));
    assert_eq!(cfg.eos_token_id as usize, num("eos_token_id"));
    assert_eq!(cfg.pad_token_id as usize, num("pad_token_id"));
    assert_eq!(cfg.rope_theta, want["rope_theta"].as_f64().unwrap() as f32);
    assert_eq!(
        cfg.rms_norm_eps,
        want["rms_norm_eps"].as_f64().unwrap() as f32
    );
    assert_eq!(
        cfg.tie_word_embeddings,
        want["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(want["rope_type"], "default");
    println!("config matches: {cfg:?}");
}

#[test]
fn smollm2_every_tensor_loads() {
    let Some(model) = common::model_or_skip("smollm2_every_tensor_loads") else {
        return;
    };
    let g = GgufFile::open(&model).unwrap();
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    let mut params = 0;
    for t in g.tensors() {
        *by_type.entry(format!("{:?}", t.ggml_type)).or_default() += 1;
        let (v, shape) = g.tensor_f32(&t.name).unwrap();
        assert_eq!(v.len(), shape.iter().product::<usize>(), "{}", t.name);
        assert!(v.iter().all(|x| x.is_finite()), "{} is finite", t.name);
        params += v.len();
    }
    let counts: Vec<(&str, usize)> = by_type.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(counts, [("F32", 61), ("Q4_1", 210), ("Q8_0", 1)]);
    assert!(!g.has_tensor("output.weight"), "tied LM head");
    println!("{} tensors, {params} parameters", g.tensors().len());
}

#[test]
fn smollm2_truncated_copies_are_errors() {
    let Some(model) = common::model_or_skip("smollm2_truncated_copies_are_errors") else {
        return;
    };
    let g = GgufFile::open(&model).unwrap();
    let last = g
        .tensors()
        .iter()
        .map(|t| t.data_offset + t.n_bytes)
        .max()
        .unwrap();
    let first_data = g.tensors().iter().map(|t| t.data_offset).min().unwrap();
    drop(g);
    // Header, first key, the token array, the merges, the tensor directory, the data.
    let cuts = [
        0,
        3,
        8,
        23,
        24,
        60,
        700,
        100_000,
        1_000_000,
        first_data - 100,
        first_data,
        first_data + 1,
        last - 1,
    ];
    let dir = tmp_dir("smollm2_cut");
    let cut_path = dir.join("cut.gguf");
    let bytes = std::fs::read(&model).unwrap();
    for len in cuts {
        std::fs::write(&cut_path, &bytes[..len]).unwrap();
        println!("cut at {len}");
        assert_format_err(GgufFile::open(&cut_path), &cut_path, &["truncated"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
