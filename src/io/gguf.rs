//! GGUF model files (versions 2 and 3): a reader written for lorafuse, plus a small writer.
//!
//! The format is the one of the GGUF spec (`ggml/docs/gguf.md`) as written by llama.cpp's
//! converters and read by gguf-py's `GGUFReader`:
//!
//! ```text
//! header:       magic "GGUF" | version u32 | tensor_count u64 | metadata_kv_count u64
//! metadata kv:  key string | value_type u32 | value            (repeated metadata_kv_count times)
//! tensor info:  name string | n_dims u32 | ne u64[n_dims] | ggml_type u32 | offset u64
//! padding:      zero bytes up to a multiple of `general.alignment` (u32, default 32)
//! tensor data:  each tensor at data_start + offset (offset a multiple of the alignment)
//! ```
//!
//! Strings are a u64 byte length followed by UTF-8 bytes (no terminator). Every integer is
//! little-endian; big-endian GGUF files and GGUF v1 (32-bit counts) are rejected with a clear
//! error. `ne` lists the dimensions fastest-varying first (ggml order); [`TensorInfo::shape`]
//! gives them reversed, i.e. in torch/row-major order, so the GGUF `ne = [576, 49152]` of
//! `token_embd.weight` is the shape `[49152, 576]` (`[vocab, hidden]`).
//!
//! Hostile or truncated files: every length, count, offset and size read from the file is checked
//! (u64 overflow included) against the bytes actually present before anything is allocated or
//! sliced, so a bad file yields [`Error::Format`] naming the file and the problem, never a panic
//! or an absurd allocation. The file is memory-mapped ([`memmap2`]); tensor data is only touched
//! when a tensor is requested.
//!
//! Dequantization ([`GgufFile::tensor_f32`]) supports F32, F16, BF16, Q4_0, Q4_1 and Q8_0, bit for
//! bit as gguf-py's `gguf.quants.dequantize` (which transformers uses to load a GGUF): each value
//! is computed in f32 with the same operations in the same order (`d * q + m` for Q4_1).
//!
//! llama.cpp stores the rows of `attn_q` / `attn_k` permuted within each head (for its interleaved
//! RoPE); [`unpermute_qk`] converts them to transformers' order (for `rotate_half` RoPE), and
//! [`permute_qk`] converts back.

mod encode;
mod names;
mod permute;
mod quant;
mod tokenizer;
mod value;
mod write;

pub use encode::encode;
pub use names::{GGUF_PROJ_NAMES, gguf_tensor_name};
pub use permute::{permute_qk, unpermute_qk};
pub use quant::{GgmlType, dequantize};
pub use value::{GgufArray, GgufValue};
pub use write::{WriteTensor, write_gguf};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use value::Cursor;

/// The four magic bytes that open every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent (GGUF spec).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor has (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// Where and what one tensor is in a GGUF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name as stored (`blk.0.attn_q.weight`).
    pub name: String,
    /// Storage type of the data.
    pub ggml_type: GgmlType,
    /// Shape in torch / row-major order: the GGUF `ne` reversed (`[out, in]` for a linear weight).
    /// Empty for a 0-dimensional tensor (one element).
    pub shape: Vec<usize>,
    /// Number of elements (product of `shape`).
    pub n_elements: usize,
    /// Absolute byte offset of the data in the file (data section start + the stored offset).
    pub data_offset: usize,
    /// Byte length of the data (`n_elements / block elements * block bytes`).
    pub n_bytes: usize,
}

/// An open, memory-mapped GGUF file with its metadata and tensor directory parsed.
///
/// Opening validates the whole structure (header, metadata, tensor infos, every tensor's byte
/// range); tensor data is read lazily by [`GgufFile::tensor_f32`] / [`GgufFile::tensor_bytes`].
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_start", &self.data_start)
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates a GGUF v2/v3 file (memory-mapped).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be opened or mapped; [`Error::Format`] naming the file and
    /// the problem for a wrong magic, an unsupported version (v1, big-endian), a truncated or
    /// inconsistent header / metadata / tensor directory, an unknown value or tensor type,
    /// duplicate keys or tensor names, a bad `general.alignment`, or a tensor whose data lies
    /// (partly) outside the file.
    ///
    /// The mapping assumes the file is not modified while open (as every mmap-based reader does).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 24 {
            return Err(Error::format(
                path,
                format!("truncated file: {len} bytes, shorter than the 24-byte GGUF header"),
            ));
        }
        // SAFETY: the map is read-only; like every mmap reader we rely on the file not being
        // truncated or rewritten by another process while this `GgufFile` lives.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<GgufFile> {
        let buf: &[u8] = &mmap;
        let mut c = Cursor { buf, pos: 0, path };
        let magic: [u8; 4] = c.array(&"magic")?;
        if magic != GGUF_MAGIC {
            return Err(c.err(format!(
                "not a GGUF file: magic is {:?} ({:02x?}), expected \"GGUF\"",
                String::from_utf8_lossy(&magic),
                magic
            )));
        }
        let version = c.u32(&"version")?;
        match version {
            2 | 3 => {}
            1 => return Err(c.err("GGUF version 1 is not supported (only versions 2 and 3)")),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(c.err("big-endian GGUF is not supported (only little-endian)"));
            }
            v => return Err(c.err(format!("unsupported GGUF version {v} (only 2 and 3)"))),
        }
        let n_tensors = c.u64(&"tensor count")?;
        let n_kv = c.u64(&"metadata count")?;
        // A key/value pair takes at least 13 bytes, a tensor info at least 24.
        if n_kv > c.remaining() / 13 {
            return Err(c.err(format!(
                "truncated or corrupt file: header claims {n_kv} metadata entries but only {} \
                 bytes follow",
                c.remaining()
            )));
        }

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format_args!("key of metadata entry {i}"))?;
            let ty = c.u32(&format_args!("value type of metadata `{key}`"))?;
            let value = c.value(ty, &format_args!("metadata `{key}`"), 0)?;
            if metadata.contains_key(&key) {
                return Err(c.err(format!("duplicate metadata key `{key}`")));
            }
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(other) => {
                return Err(c.err(format!(
                    "general.alignment must be a uint32 power of two, got {other:?}"
                )));
            }
        };

        if n_tensors > c.remaining() / 24 {
            return Err(c.err(format!(
                "truncated or corrupt file: header claims {n_tensors} tensors but only {} bytes \
                 follow the metadata",
                c.remaining()
            )));
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        let mut by_name = HashMap::new();
        for i in 0..n_tensors {
            let name = c.string(&format_args!("name of tensor {i}"))?;
            let n_dims = c.u32(&format_args!("n_dims of tensor `{name}`"))?;
            if n_dims as usize > MAX_DIMS {
                return Err(c.err(format!(
                    "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                ne.push(c.u64(&format_args!("dimension {d} of tensor `{name}`"))?);
            }
            let ty = c.u32(&format_args!("type of tensor `{name}`"))?;
            let ggml_type = GgmlType::from_id(ty)
                .ok_or_else(|| c.err(format!("tensor `{name}` has unknown ggml type id {ty}")))?;
            let offset = c.u64(&format_args!("data offset of tensor `{name}`"))?;
            if by_name.insert(name.clone(), raw.len()).is_some() {
                return Err(c.err(format!("duplicate tensor name `{name}`")));
            }
            raw.push((name, ne, ggml_type, offset));
        }

        let data_start = (c.pos as u64)
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| c.err("data section offset overflows"))?;
        let file_len = buf.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, ne, ggml_type, offset) in raw {
            let info = check_tensor(
                name, &ne, ggml_type, offset, alignment, data_start, file_len,
            )
            .map_err(|msg| c.err(msg))?;
            tensors.push(info);
        }
        let data_start = data_start.min(file_len) as usize;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            alignment,
            data_start,
            metadata,
            tensors,
            by_name,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the tensor data in bytes (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The value of `key`.
    ///
    /// # Errors
    /// [`Error::Missing`] naming the key when it is absent.
    pub fn get(&self, key: &str) -> Result<&GgufValue> {
        self.metadata.get(key).ok_or_else(|| Error::Missing {
            path: self.path.clone(),
            name: format!("metadata key {key}"),
        })
    }

    fn wrong_type(&self, key: &str, v: &GgufValue, expected: &str) -> Error {
        Error::format(
            &self.path,
            format!(
                "metadata `{key}` is {} ({v:?}), expected {expected}",
                v.type_name()
            ),
        )
    }

    fn get_int(&self, key: &str, expected: &str) -> Result<i128> {
        let v = self.get(key)?;
        v.as_i128().ok_or_else(|| self.wrong_type(key, v, expected))
    }

    /// `key` as a u32. Any integer type holding a value in range is accepted (files differ in
    /// the width they write).
    ///
    /// # Errors
    /// [`Error::Missing`] if absent, [`Error::Format`] if not an integer or out of range.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let i = self.get_int(key, "an integer")?;
        u32::try_from(i).map_err(|_| {
            Error::format(
                &self.path,
                format!("metadata `{key}` = {i} is out of range for uint32"),
            )
        })
    }

    /// `key` as a u64 (any integer type holding a value in range).
    ///
    /// # Errors
    /// As [`GgufFile::get_u32`].
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let i = self.get_int(key, "an integer")?;
        u64::try_from(i).map_err(|_| {
            Error::format(
                &self.path,
                format!("metadata `{key}` = {i} is out of range for uint64"),
            )
        })
    }

    /// `key` as an i64 (any integer type holding a value in range).
    ///
    /// # Errors
    /// As [`GgufFile::get_u32`].
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        let i = self.get_int(key, "an integer")?;
        i64::try_from(i).map_err(|_| {
            Error::format(
                &self.path,
                format!("metadata `{key}` = {i} is out of range for int64"),
            )
        })
    }

    /// `key` as a usize (any integer type holding a value in range).
    ///
    /// # Errors
    /// As [`GgufFile::get_u32`].
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let i = self.get_int(key, "an integer")?;
        usize::try_from(i).map_err(|_| {
            Error::format(
                &self.path,
                format!("metadata `{key}` = {i} is out of range for usize"),
            )
        })
    }

    /// `key` as an f32 (a float32, or a float64 rounded to f32).
    ///
    /// # Errors
    /// [`Error::Missing`] if absent, [`Error::Format`] if not a float.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.get(key)? {
            GgufValue::F32(v) => Ok(*v),
            GgufValue::F64(v) => Ok(*v as f32),
            v => Err(self.wrong_type(key, v, "a float32")),
        }
    }

    /// `key` as a bool.
    ///
    /// # Errors
    /// [`Error::Missing`] if absent, [`Error::Format`] if not a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.get(key)? {
            GgufValue::Bool(v) => Ok(*v),
            v => Err(self.wrong_type(key, v, "a bool")),
        }
    }

    /// `key` as a string.
    ///
    /// # Errors
    /// [`Error::Missing`] if absent, [`Error::Format`] if not a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            GgufValue::String(s) => Ok(s),
            v => Err(self.wrong_type(key, v, "a string")),
        }
    }

    /// `key` as an array (any element type).
    ///
    /// # Errors
    /// [`Error::Missing`] if absent, [`Error::Format`] if not an array.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray> {
        match self.get(key)? {
            GgufValue::Array(a) => Ok(a),
            v => Err(self.wrong_type(key, v, "an array")),
        }
    }

    /// `key` as an array of strings (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    ///
    /// # Errors
    /// [`Error::Missing`] if absent, [`Error::Format`] if not an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.get(key)? {
            GgufValue::Array(GgufArray::String(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "array[string]")),
        }
    }

    /// `key` as an array of f32 (`tokenizer.ggml.scores`).
    ///
    /// # Errors
    /// [`Error::Missing`] if absent, [`Error::Format`] if not an array of float32.
    pub fn get_f32_array(&self, key: &str) -> Result<&[f32]> {
        match self.get(key)? {
            GgufValue::Array(GgufArray::F32(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "array[float32]")),
        }
    }

    /// `key` as integers (`tokenizer.ggml.token_type`, stored as int32): any integer element
    /// type whose values fit in i64.
    ///
    /// # Errors
    /// [`Error::Missing`] if absent, [`Error::Format`] if not an integer array.
    pub fn get_int_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.get(key)?;
        match v {
            GgufValue::Array(a) => a.to_i64_vec(),
            _ => None,
        }
        .ok_or_else(|| self.wrong_type(key, v, "an integer array"))
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Whether a tensor called `name` exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Name, type, torch-order shape and data location of tensor `name`.
    ///
    /// # Errors
    /// [`Error::Missing`] naming the tensor.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::Missing {
                path: self.path.clone(),
                name: format!("tensor {name}"),
            })
    }

    /// The raw stored bytes of tensor `name` (`TensorInfo::n_bytes` long, in its ggml format),
    /// borrowed from the memory map.
    ///
    /// # Errors
    /// [`Error::Missing`] naming the tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_info(name)?;
        // In bounds: checked against the file length when the file was opened.
        Ok(&self.mmap[t.data_offset..t.data_offset + t.n_bytes])
    }

    /// Tensor `name` converted to f32, with its torch-order shape: returns `(data, shape)`,
    /// `data.len() == shape.iter().product()`, row-major.
    ///
    /// Supports F32, F16, BF16, Q4_0, Q4_1 and Q8_0, bit-exact with gguf-py's
    /// `gguf.quants.dequantize`. Rows come out in storage order: for `attn_q` / `attn_k` that is
    /// llama.cpp's permuted order (see [`unpermute_qk`]). Runs in parallel (rayon) over blocks.
    ///
    /// # Errors
    /// [`Error::Missing`] naming the tensor; [`Error::Format`] naming the tensor and its type when
    /// the type cannot be dequantized (Q4_K, Q6_K, IQ*, integer types ...).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.tensor_info(name)?;
        if !t.ggml_type.can_dequantize() {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor `{name}` has type {}, which lorafuse cannot dequantize \
                     (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)",
                    t.ggml_type
                ),
            ));
        }
        let mut out = vec![0f32; t.n_elements];
        dequantize(t.ggml_type, self.tensor_bytes(name)?, &mut out)
            .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))?;
        Ok((out, t.shape.clone()))
    }

    /// The [`LlamaConfig`] of a `general.architecture = "llama"` file, from the `llama.*` keys
    /// (as transformers' GGUF loader and llama.cpp read them):
    ///
    /// | field | key | default |
    /// |---|---|---|
    /// | hidden_size | `llama.embedding_length` | |
    /// | intermediate_size | `llama.feed_forward_length` | |
    /// | num_hidden_layers | `llama.block_count` | |
    /// | num_attention_heads | `llama.attention.head_count` | |
    /// | num_key_value_heads | `llama.attention.head_count_kv` | head_count |
    /// | rope_theta | `llama.rope.freq_base` | 10000 |
    /// | rms_norm_eps | `llama.attention.layer_norm_rms_epsilon` | |
    /// | max_position_embeddings | `llama.context_length` | |
    /// | vocab_size | length of `tokenizer.ggml.tokens` | `llama.vocab_size` |
    /// | bos/eos_token_id | `tokenizer.ggml.bos_token_id` / `eos_token_id` | |
    /// | pad_token_id | `tokenizer.ggml.padding_token_id` | eos id |
    /// | tie_word_embeddings | no `output.weight` tensor | |
    ///
    /// `head_dim = hidden_size / num_attention_heads`.
    ///
    /// # Errors
    /// [`Error::Format`] if the architecture is not `llama`, the shape is inconsistent (hidden not
    /// divisible by heads, heads not a multiple of KV heads, odd head_dim, a `key_length` or
    /// `rope.dimension_count` other than head_dim, RoPE scaling), or a token id is out of the
    /// vocabulary; [`Error::Missing`] naming a required key.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(Error::format(
                &self.path,
                format!("general.architecture is `{arch}`; only `llama` models are supported"),
            ));
        }
        let bad = |msg: String| Error::format(&self.path, msg);
        let hidden = self.get_usize("llama.embedding_length")?;
        let heads = self.get_usize("llama.attention.head_count")?;
        let kv_heads = match self.metadata.get("llama.attention.head_count_kv") {
            Some(_) => self.get_usize("llama.attention.head_count_kv")?,
            None => heads,
        };
        if heads == 0 || hidden == 0 || hidden % heads != 0 {
            return Err(bad(format!(
                "llama.embedding_length {hidden} is not a positive multiple of \
                 llama.attention.head_count {heads}"
            )));
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "llama.attention.head_count {heads} is not a multiple of \
                 llama.attention.head_count_kv {kv_heads}"
            )));
        }
        let head_dim = hidden / heads;
        if head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {head_dim} is odd; RoPE needs it even"
            )));
        }
        for key in [
            "llama.attention.key_length",
            "llama.attention.value_length",
            "llama.rope.dimension_count",
        ] {
            if self.metadata.contains_key(key) {
                let v = self.get_usize(key)?;
                if v != head_dim {
                    return Err(bad(format!(
                        "{key} = {v} differs from embedding_length / head_count = {head_dim} \
                         (not supported)"
                    )));
                }
            }
        }
        if let Some(GgufValue::String(s)) = self.metadata.get("llama.rope.scaling.type")
            && s != "none"
        {
            return Err(bad(format!("RoPE scaling `{s}` is not supported")));
        }
        let rope_theta = match self.metadata.get("llama.rope.freq_base") {
            Some(_) => self.get_f32("llama.rope.freq_base")?,
            None => 10000.0,
        };
        let vocab_size = match self.metadata.get("tokenizer.ggml.tokens") {
            Some(_) => self.get_array("tokenizer.ggml.tokens")?.len(),
            None if self.metadata.contains_key("llama.vocab_size") => {
                self.get_usize("llama.vocab_size")?
            }
            None => self.get_array("tokenizer.ggml.tokens")?.len(), // the Missing error
        };
        let token_id = |key: &str| -> Result<u32> {
            let id = self.get_u32(key)?;
            if id as usize >= vocab_size {
                return Err(bad(format!(
                    "{key} = {id} is outside the vocabulary ({vocab_size})"
                )));
            }
            Ok(id)
        };
        let bos_token_id = token_id("tokenizer.ggml.bos_token_id")?;
        let eos_token_id = token_id("tokenizer.ggml.eos_token_id")?;
        let pad_token_id = match self.metadata.get("tokenizer.ggml.padding_token_id") {
            Some(_) => token_id("tokenizer.ggml.padding_token_id")?,
            None => eos_token_id,
        };
        Ok(LlamaConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: self.get_usize("llama.feed_forward_length")?,
            num_hidden_layers: self.get_usize("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rope_theta,
            rms_norm_eps: self.get_f32("llama.attention.layer_norm_rms_epsilon")?,
            tie_word_embeddings: !self.has_tensor("output.weight"),
            max_position_embeddings: self.get_usize("llama.context_length")?,
            bos_token_id,
            eos_token_id,
            pad_token_id,
        })
    }
}

/// Validates one tensor directory entry against the file; the error is the message.
fn check_tensor(
    name: String,
    ne: &[u64],
    ggml_type: GgmlType,
    offset: u64,
    alignment: u64,
    data_start: u64,
    file_len: u64,
) -> std::result::Result<TensorInfo, String> {
    let (block, block_bytes) = ggml_type.block_layout();
    let mut n: u64 = 1;
    for &d in ne {
        n = n
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                format!("tensor `{name}` has dimensions {ne:?} whose product overflows")
            })?;
    }
    if let Some(&ne0) = ne.first()
        && ne0 % block as u64 != 0
    {
        return Err(format!(
            "tensor `{name}` of type {ggml_type} has row length {ne0}, not a multiple of its \
             block size {block}"
        ));
    }
    if !n.is_multiple_of(block as u64) {
        return Err(format!(
            "tensor `{name}` of type {ggml_type} has {n} elements, not a multiple of its block \
             size {block}"
        ));
    }
    let n_bytes = (n / block as u64)
        .checked_mul(block_bytes as u64)
        .ok_or_else(|| format!("tensor `{name}` byte size overflows"))?;
    if !offset.is_multiple_of(alignment) {
        return Err(format!(
            "tensor `{name}` data offset {offset} is not a multiple of the alignment {alignment}"
        ));
    }
    let start = data_start.checked_add(offset);
    let end = start.and_then(|s| s.checked_add(n_bytes));
    match (start, end) {
        (Some(s), Some(e)) if e <= file_len => Ok(TensorInfo {
            name,
            ggml_type,
            shape: ne.iter().rev().map(|&d| d as usize).collect(),
            n_elements: n as usize,
            data_offset: s as usize,
            n_bytes: n_bytes as usize,
        }),
        _ => Err(format!(
            "truncated file: tensor `{name}` ({ggml_type}, {n_bytes} bytes at data offset \
             {offset}, data section at {data_start}) extends past the end of the file \
             ({file_len} bytes)"
        )),
    }
}
