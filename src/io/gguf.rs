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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;

/// The four magic bytes that open every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent (GGUF spec).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor has (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays inside arrays that the reader accepts (real files use at most 1).
const MAX_ARRAY_DEPTH: usize = 8;
/// Blocks dequantized per rayon task.
const BLOCKS_PER_TASK: usize = 2048;

// ---------------------------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type, with its GGUF id as the discriminant (`enum ggml_type`, gguf-py
/// `GGMLQuantizationType`). Ids that ggml retired (4, 5, 31..33, 36..38) are not listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
}

impl GgmlType {
    /// Every known type, for lookups by id.
    const ALL: [GgmlType; 32] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
    ];

    /// The type with GGUF id `id`, or `None` for an unknown or retired id.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::ALL.iter().copied().find(|t| *t as u32 == id)
    }

    /// The GGUF id of this type.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// `(elements per block, bytes per block)`, as gguf-py's `GGML_QUANT_SIZES`.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        const QK_K: usize = 256;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 4 + 4 + 32),
            Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (QK_K, 2 + QK_K / 4),
            IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4_NL => (32, 2 + 16),
            IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            BF16 => (1, 2),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
            MXFP4 => (32, 1 + 16),
        }
    }

    /// Whether [`GgufFile::tensor_f32`] / [`dequantize`] can convert this type to f32.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q8_0)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?} (ggml type {})", self.id())
    }
}

// ---------------------------------------------------------------------------------------------
// metadata values
// ---------------------------------------------------------------------------------------------

/// One metadata value (GGUF `gguf_metadata_value_type` 0..=12).
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array. All elements of a GGUF array share one type, so each variant holds a plain
/// vector (memory stays proportional to the file size). Arrays may nest: each inner array has its
/// own element type.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

// GGUF value type ids.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

impl GgufValue {
    /// The GGUF spelling of this value's type (`uint32`, `string`, `array[int32]` ...).
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::Array(a) => format!("array[{}]", a.element_type_name()),
            other => type_id_name(other.type_id()).to_string(),
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => T_U8,
            GgufValue::I8(_) => T_I8,
            GgufValue::U16(_) => T_U16,
            GgufValue::I16(_) => T_I16,
            GgufValue::U32(_) => T_U32,
            GgufValue::I32(_) => T_I32,
            GgufValue::F32(_) => T_F32,
            GgufValue::Bool(_) => T_BOOL,
            GgufValue::String(_) => T_STRING,
            GgufValue::Array(_) => T_ARRAY,
            GgufValue::U64(_) => T_U64,
            GgufValue::I64(_) => T_I64,
            GgufValue::F64(_) => T_F64,
        }
    }

    /// The value as an integer, if it is one (any width, signed or not).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

impl GgufArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn element_type_id(&self) -> u32 {
        match self {
            GgufArray::U8(_) => T_U8,
            GgufArray::I8(_) => T_I8,
            GgufArray::U16(_) => T_U16,
            GgufArray::I16(_) => T_I16,
            GgufArray::U32(_) => T_U32,
            GgufArray::I32(_) => T_I32,
            GgufArray::F32(_) => T_F32,
            GgufArray::Bool(_) => T_BOOL,
            GgufArray::String(_) => T_STRING,
            GgufArray::Array(_) => T_ARRAY,
            GgufArray::U64(_) => T_U64,
            GgufArray::I64(_) => T_I64,
            GgufArray::F64(_) => T_F64,
        }
    }

    /// The GGUF spelling of the element type (`int32`, `string`, `array` ...).
    pub fn element_type_name(&self) -> &'static str {
        type_id_name(self.element_type_id())
    }

    /// The elements as `i64` if this is an integer array whose values all fit, else `None`.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        fn conv<T: Copy + TryInto<i64>>(v: &[T]) -> Option<Vec<i64>> {
            v.iter().map(|x| (*x).try_into().ok()).collect()
        }
        match self {
            GgufArray::U8(v) => conv(v),
            GgufArray::I8(v) => conv(v),
            GgufArray::U16(v) => conv(v),
            GgufArray::I16(v) => conv(v),
            GgufArray::U32(v) => conv(v),
            GgufArray::I32(v) => conv(v),
            GgufArray::U64(v) => conv(v),
            GgufArray::I64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

fn type_id_name(id: u32) -> &'static str {
    match id {
        T_U8 => "uint8",
        T_I8 => "int8",
        T_U16 => "uint16",
        T_I16 => "int16",
        T_U32 => "uint32",
        T_I32 => "int32",
        T_F32 => "float32",
        T_BOOL => "bool",
        T_STRING => "string",
        T_ARRAY => "array",
        T_U64 => "uint64",
        T_I64 => "int64",
        T_F64 => "float64",
        _ => "unknown",
    }
}

/// Smallest encoded size in bytes of one value of GGUF type `id` (an empty string is its 8-byte
/// length, an empty array its 4-byte type and 8-byte length). Caps array lengths by the bytes left.
fn min_encoded_size(id: u32) -> u64 {
    match id {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 | T_STRING => 8,
        _ => 12, // array
    }
}

// ---------------------------------------------------------------------------------------------
// tensor infos and the file
// ---------------------------------------------------------------------------------------------

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

/// Bounds-checked little-endian reader over the mapped bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl fmt::Display) -> Error {
        Error::format(self.path, msg.to_string())
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    /// The next `n` bytes; `what` names the field for the truncation error.
    fn take(&mut self, n: u64, what: &dyn fmt::Display) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated file: {what} needs {n} bytes at offset {} but only {} remain \
                 (file size {})",
                self.pos,
                self.remaining(),
                self.buf.len()
            )));
        }
        let n = n as usize; // n <= remaining <= usize::MAX
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn fmt::Display) -> Result<String> {
        let len = self.u64(&format_args!("length of {what}"))?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.err(format!("{what} at offset {start} is not valid UTF-8: {e}")))
    }

    fn value(&mut self, ty: u32, what: &dyn fmt::Display, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            T_U8 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            T_I8 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            T_U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            T_I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            T_U32 => GgufValue::U32(self.u32(what)?),
            T_I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            T_F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            T_BOOL => GgufValue::Bool(self.bool(what)?),
            T_STRING => GgufValue::String(self.string(what)?),
            T_ARRAY => GgufValue::Array(self.array_value(what, depth)?),
            T_U64 => GgufValue::U64(self.u64(what)?),
            T_I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            T_F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(self.err(format!(
                    "{what} has unknown value type {other} (at offset {})",
                    self.pos
                )));
            }
        })
    }

    fn bool(&mut self, what: &dyn fmt::Display) -> Result<bool> {
        let [b] = self.array::<1>(what)?;
        match b {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.err(format!(
                "{what} is a bool with byte value {b} (must be 0 or 1)"
            ))),
        }
    }

    /// An array body (element type, length, elements). The length is checked against the bytes
    /// left before anything is allocated.
    fn array_value(&mut self, what: &dyn fmt::Display, depth: usize) -> Result<GgufArray> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err(format!(
                "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
            )));
        }
        let ety = self.u32(&format_args!("element type of {what}"))?;
        if ety > T_F64 {
            return Err(self.err(format!("{what} is an array of unknown value type {ety}")));
        }
        let n = self.u64(&format_args!("length of {what}"))?;
        let min = min_encoded_size(ety);
        if n > self.remaining() / min {
            return Err(self.err(format!(
                "truncated or corrupt file: {what} claims {n} elements of type {} but only {} \
                 bytes remain (at offset {})",
                type_id_name(ety),
                self.remaining(),
                self.pos
            )));
        }
        let n = n as usize;
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let bytes = self.take((n * size_of::<$t>()) as u64, what)?;
                GgufArray::$variant(
                    bytes
                        .chunks_exact(size_of::<$t>())
                        .map(|c| {
                            let mut a = [0u8; size_of::<$t>()];
                            a.copy_from_slice(c);
                            <$t>::from_le_bytes(a)
                        })
                        .collect(),
                )
            }};
        }
        Ok(match ety {
            T_U8 => fixed!(U8, u8),
            T_I8 => fixed!(I8, i8),
            T_U16 => fixed!(U16, u16),
            T_I16 => fixed!(I16, i16),
            T_U32 => fixed!(U32, u32),
            T_I32 => fixed!(I32, i32),
            T_F32 => fixed!(F32, f32),
            T_U64 => fixed!(U64, u64),
            T_I64 => fixed!(I64, i64),
            T_F64 => fixed!(F64, f64),
            T_BOOL => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.bool(&format_args!("{what}[{i}]"))?);
                }
                GgufArray::Bool(v)
            }
            T_STRING => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&format_args!("{what}[{i}]"))?);
                }
                GgufArray::String(v)
            }
            _ => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array_value(&format_args!("{what}[{i}]"), depth + 1)?);
                }
                GgufArray::Array(v)
            }
        })
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

// ---------------------------------------------------------------------------------------------
// dequantization (gguf-py `gguf/quants.py`)
// ---------------------------------------------------------------------------------------------

/// Converts `bytes` of ggml type `ty` to f32 into `out` (row-major, storage order).
///
/// Formats (all little-endian; a block of 32 for the quantized ones):
/// * F32, F16 (IEEE half), BF16 (`bits << 16`).
/// * Q4_0: f16 `d`, 16 bytes `qs`; element `j < 16` is the low nibble of `qs[j]`, element
///   `j + 16` its high nibble; value `d * (q - 8)`.
/// * Q4_1: f16 `d`, f16 `m`, 16 bytes `qs` (nibbles as Q4_0); value `d * q + m`.
/// * Q8_0: f16 `d`, 32 i8 `qs`; value `d * q`.
///
/// # Errors
/// [`Error::InvalidArgument`] if `ty` cannot be dequantized or `bytes.len()` does not match
/// `out.len()` elements of `ty`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let (block, block_bytes) = ty.block_layout();
    let kernel: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => deq_f32,
        GgmlType::F16 => deq_f16,
        GgmlType::BF16 => deq_bf16,
        GgmlType::Q4_0 => deq_q4_0,
        GgmlType::Q4_1 => deq_q4_1,
        GgmlType::Q8_0 => deq_q8_0,
        other => {
            return Err(Error::arg(
                "ggml_type",
                format!("cannot dequantize {other} (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)"),
            ));
        }
    };
    if !out.len().is_multiple_of(block) || bytes.len() != out.len() / block * block_bytes {
        return Err(Error::arg(
            "bytes",
            format!(
                "{} bytes of {ty} do not hold {} elements (blocks of {block} elements in \
                 {block_bytes} bytes)",
                bytes.len(),
                out.len()
            ),
        ));
    }
    out.par_chunks_mut(block * BLOCKS_PER_TASK)
        .zip(bytes.par_chunks(block_bytes * BLOCKS_PER_TASK))
        .for_each(|(o, b)| kernel(b, o));
    Ok(())
}

fn le_f16(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

fn deq_f32(b: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

fn deq_f16(b: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = le_f16(c);
    }
}

fn deq_bf16(b: &[u8], out: &mut [f32]) {
    // gguf-py: `(blocks.view(np.int16).astype(np.int32) << 16).view(np.float32)`.
    for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
    }
}

fn deq_q4_0(b: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(32).zip(b.chunks_exact(18)) {
        let d = le_f16(blk);
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let q = blk[2 + j];
            lo[j] = d * ((q & 0x0F) as i8 - 8) as f32;
            hi[j] = d * ((q >> 4) as i8 - 8) as f32;
        }
    }
}

fn deq_q4_1(b: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(32).zip(b.chunks_exact(20)) {
        let d = le_f16(blk);
        let m = le_f16(&blk[2..]);
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let q = blk[4 + j];
            lo[j] = d * f32::from(q & 0x0F) + m;
            hi[j] = d * f32::from(q >> 4) + m;
        }
    }
}

fn deq_q8_0(b: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(32).zip(b.chunks_exact(34)) {
        let d = le_f16(blk);
        for (x, &q) in o.iter_mut().zip(&blk[2..]) {
            *x = d * f32::from(q as i8);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// q/k row permutation
// ---------------------------------------------------------------------------------------------

fn check_qk(rows: &[f32], n_rows: usize, n_cols: usize, n_head: usize) -> Result<usize> {
    if n_rows.checked_mul(n_cols) != Some(rows.len()) {
        return Err(Error::shape(
            "rows",
            format!(
                "[{n_rows}, {n_cols}] = {} elements",
                n_rows.saturating_mul(n_cols)
            ),
            &[rows.len()],
        ));
    }
    if n_head == 0 || !n_rows.is_multiple_of(n_head) || !(n_rows / n_head).is_multiple_of(2) {
        return Err(Error::arg(
            "n_head",
            format!("{n_rows} rows do not split into {n_head} heads of an even size"),
        ));
    }
    Ok(n_rows / n_head)
}

/// Moves rows within each head: output row `h*hd + dst(r)` takes input row `h*hd + r`.
fn permute_rows(rows: &mut [f32], n_cols: usize, head_dim: usize, src_of: impl Fn(usize) -> usize) {
    if n_cols == 0 {
        return;
    }
    let mut tmp = vec![0f32; head_dim * n_cols];
    for head in rows.chunks_exact_mut(head_dim * n_cols) {
        tmp.copy_from_slice(head);
        for (r, dst) in head.chunks_exact_mut(n_cols).enumerate() {
            let s = src_of(r);
            dst.copy_from_slice(&tmp[s * n_cols..(s + 1) * n_cols]);
        }
    }
}

/// Converts `attn_q` / `attn_k` rows from llama.cpp's (GGUF) order to transformers' order, in
/// place, as transformers does when loading a GGUF (`_reverse_permute_weights`):
///
/// `hf row h*hd + half*(hd/2) + j  ==  gguf row h*hd + 2*j + half`  (`j < hd/2`, `half` 0 or 1),
///
/// i.e. `hf = gguf.reshape(n_head, hd/2, 2, n_cols).transpose(1, 2).reshape(n_rows, n_cols)`.
/// `rows` is row-major `[n_rows, n_cols]` f32 (`n_rows = n_head * hd`); use the query head
/// count for q and the KV head count for k. Works on any row-wise data (a bias, lora_B).
///
/// # Errors
/// [`Error::Shape`] if `rows.len() != n_rows * n_cols`; [`Error::InvalidArgument`] if `n_rows`
/// is not `n_head` times an even head size.
pub fn unpermute_qk(rows: &mut [f32], n_rows: usize, n_cols: usize, n_head: usize) -> Result<()> {
    let hd = check_qk(rows, n_rows, n_cols, n_head)?;
    let half = hd / 2;
    // HF row r = which*half + j comes from GGUF row 2*j + which.
    permute_rows(rows, n_cols, hd, |r| 2 * (r % half) + r / half);
    Ok(())
}

/// The inverse of [`unpermute_qk`]: transformers' order to llama.cpp's (GGUF) order, in place
/// (llama.cpp's converter `permute`: `w.reshape(n_head, 2, hd/2, n_cols).swapaxes(1, 2)`).
///
/// # Errors
/// As [`unpermute_qk`].
pub fn permute_qk(rows: &mut [f32], n_rows: usize, n_cols: usize, n_head: usize) -> Result<()> {
    let hd = check_qk(rows, n_rows, n_cols, n_head)?;
    let half = hd / 2;
    // GGUF row r = 2*j + which comes from HF row which*half + j.
    permute_rows(rows, n_cols, hd, |r| (r % 2) * half + r / 2);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// writer
// ---------------------------------------------------------------------------------------------

/// One tensor to write with [`write_gguf`]: the stored bytes in its ggml format.
#[derive(Clone, Debug)]
pub struct WriteTensor<'a> {
    /// Tensor name.
    pub name: String,
    /// Torch-order shape (written as the GGUF `ne`, reversed).
    pub shape: Vec<usize>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// The stored bytes (`n_elements / block * block_bytes` long).
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> WriteTensor<'a> {
    /// An F32 tensor from row-major `data` of torch-order `shape`.
    pub fn f32(name: impl Into<String>, shape: &[usize], data: &[f32]) -> WriteTensor<'static> {
        WriteTensor {
            name: name.into(),
            shape: shape.to_vec(),
            ggml_type: GgmlType::F32,
            bytes: Cow::Owned(data.iter().flat_map(|x| x.to_le_bytes()).collect()),
        }
    }

    /// A tensor of any ggml type from its already-encoded bytes.
    pub fn raw(
        name: impl Into<String>,
        shape: &[usize],
        ggml_type: GgmlType,
        bytes: &'a [u8],
    ) -> WriteTensor<'a> {
        WriteTensor {
            name: name.into(),
            shape: shape.to_vec(),
            ggml_type,
            bytes: Cow::Borrowed(bytes),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(a) => put_array(out, a),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&a.element_type_id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => each!(v),
        GgufArray::U16(v) => each!(v),
        GgufArray::I16(v) => each!(v),
        GgufArray::U32(v) => each!(v),
        GgufArray::I32(v) => each!(v),
        GgufArray::F32(v) => each!(v),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        GgufArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
        GgufArray::Array(v) => v.iter().for_each(|a| put_array(out, a)),
        GgufArray::U64(v) => each!(v),
        GgufArray::I64(v) => each!(v),
        GgufArray::F64(v) => each!(v),
    }
}

/// Writes a GGUF v3 file with `metadata` (in key order) and `tensors` (in the given order),
/// atomically: into a temporary file beside `path`, then renamed over it.
///
/// The data alignment is `general.alignment` when `metadata` holds it (a uint32 power of two),
/// else 32. Meant for tests (tiny random models) and small exports; everything is assembled in
/// memory.
///
/// # Errors
/// [`Error::InvalidArgument`] for a bad alignment, a tensor with more than 4 dimensions, a
/// duplicate tensor name, or bytes that do not match the tensor's shape and type;
/// [`Error::Io`] if writing or renaming fails.
pub fn write_gguf(
    path: &Path,
    metadata: &BTreeMap<String, GgufValue>,
    tensors: &[WriteTensor<'_>],
) -> Result<()> {
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT as usize,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as usize,
        Some(other) => {
            return Err(Error::arg(
                "general.alignment",
                format!("must be a uint32 power of two, got {other:?}"),
            ));
        }
    };
    let mut out = Vec::new();
    out.extend_from_slice(&GGUF_MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0usize;
    let mut names = std::collections::HashSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(Error::arg(
                "tensors",
                format!("duplicate tensor name `{}`", t.name),
            ));
        }
        if t.shape.len() > MAX_DIMS {
            return Err(Error::shape(&t.name, "at most 4 dimensions", &t.shape));
        }
        let (block, block_bytes) = t.ggml_type.block_layout();
        let n: Option<usize> = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let expected = n
            .filter(|n| n % block == 0 && t.shape.last().is_none_or(|&d| d % block == 0))
            .map(|n| n / block * block_bytes);
        if expected != Some(t.bytes.len()) {
            return Err(Error::shape(
                &t.name,
                format!("{} bytes of {}", expected.unwrap_or(0), t.ggml_type),
                &[t.bytes.len()],
            ));
        }
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + t.bytes.len()).next_multiple_of(alignment);
    }
    out.resize(out.len().next_multiple_of(alignment), 0);
    for t in tensors {
        out.extend_from_slice(&t.bytes);
        out.resize(out.len().next_multiple_of(alignment), 0);
    }

    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        file_name.unwrap_or_else(|| "gguf".into()),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q4_1_nibble_order_and_formula() {
        let mut blk = Vec::new();
        blk.extend_from_slice(&f16_bytes(0.5));
        blk.extend_from_slice(&f16_bytes(-1.0));
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_1, &blk, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn q4_0_and_q8_0() {
        let mut blk = Vec::new();
        blk.extend_from_slice(&f16_bytes(2.0));
        blk.extend((0..16u8).map(|j| j | (j << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_0, &blk, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], out[j]);
        }
        let mut blk = Vec::new();
        blk.extend_from_slice(&f16_bytes(0.25));
        blk.extend((0..32i32).map(|j| ((j - 16) * 7) as i8 as u8));
        dequantize(GgmlType::Q8_0, &blk, &mut out).unwrap();
        for (j, x) in out.iter().enumerate() {
            assert_eq!(*x, 0.25 * ((j as i32 - 16) * 7) as f32);
        }
    }

    #[test]
    fn f16_bf16() {
        let xs = [1.5f32, -0.0, 65504.0, 1e-7];
        let b: Vec<u8> = xs.iter().flat_map(|&x| f16_bytes(x)).collect();
        let mut out = [0f32; 4];
        dequantize(GgmlType::F16, &b, &mut out).unwrap();
        for (o, x) in out.iter().zip(xs) {
            assert_eq!(*o, f16::from_f32(x).to_f32());
        }
        let b: Vec<u8> = xs
            .iter()
            .flat_map(|&x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        dequantize(GgmlType::BF16, &b, &mut out).unwrap();
        for (o, x) in out.iter().zip(xs) {
            assert_eq!(o.to_bits(), x.to_bits() & 0xFFFF_0000);
        }
    }

    #[test]
    fn dequantize_rejects_bad_lengths_and_types() {
        let mut out = [0f32; 32];
        assert!(dequantize(GgmlType::Q4_1, &[0u8; 19], &mut out).is_err());
        assert!(dequantize(GgmlType::Q4_K, &[0u8; 144], &mut [0f32; 256]).is_err());
    }

    #[test]
    fn qk_permutation_matches_formula() {
        // 2 heads of hd = 4, 3 columns; row r holds value r in every column.
        let (n_head, hd, n_cols) = (2, 4, 3);
        let gguf: Vec<f32> = (0..n_head * hd)
            .flat_map(|r| std::iter::repeat_n(r as f32, n_cols))
            .collect();
        let mut hf = gguf.clone();
        unpermute_qk(&mut hf, n_head * hd, n_cols, n_head).unwrap();
        for h in 0..n_head {
            for half in 0..2 {
                for j in 0..hd / 2 {
                    let hf_row = h * hd + half * hd / 2 + j;
                    let gguf_row = h * hd + 2 * j + half;
                    assert_eq!(hf[hf_row * n_cols], gguf_row as f32);
                }
            }
        }
        permute_qk(&mut hf, n_head * hd, n_cols, n_head).unwrap();
        assert_eq!(hf, gguf);
        assert!(unpermute_qk(&mut hf, 8, 2, 2).is_err());
        assert!(unpermute_qk(&mut hf, 8, 3, 3).is_err());
        assert!(unpermute_qk(&mut hf, 8, 3, 0).is_err());
    }
}
