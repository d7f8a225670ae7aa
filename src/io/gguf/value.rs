//! Metadata values (`GgufValue`, `GgufArray`) and the bounds-checked little-endian `Cursor`
//! that parses them and the rest of a GGUF file's structure.

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};

/// Deepest nesting of arrays inside arrays that the reader accepts (real files use at most 1).
const MAX_ARRAY_DEPTH: usize = 8;

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

    pub(super) fn type_id(&self) -> u32 {
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

    pub(super) fn element_type_id(&self) -> u32 {
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

/// Bounds-checked little-endian reader over the mapped bytes.
pub(super) struct Cursor<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
    pub(super) path: &'a Path,
}

impl<'a> Cursor<'a> {
    pub(super) fn err(&self, msg: impl fmt::Display) -> Error {
        Error::format(self.path, msg.to_string())
    }

    pub(super) fn remaining(&self) -> u64 {
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

    pub(super) fn array<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(super) fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(super) fn string(&mut self, what: &dyn fmt::Display) -> Result<String> {
        let len = self.u64(&format_args!("length of {what}"))?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.err(format!("{what} at offset {start} is not valid UTF-8: {e}")))
    }

    pub(super) fn value(
        &mut self,
        ty: u32,
        what: &dyn fmt::Display,
        depth: usize,
    ) -> Result<GgufValue> {
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
