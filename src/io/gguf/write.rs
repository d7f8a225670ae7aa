//! The GGUF v3 writer: `write_gguf` and its `WriteTensor`s.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC, GgmlType, GgufArray, GgufValue, MAX_DIMS};
use crate::error::{Error, Result};

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

    crate::io::atomic::write_atomic(path, &out)
}
