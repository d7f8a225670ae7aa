//! bitsandbytes 4-bit checkpoint tensors: what transformers writes next to an NF4 `weight`.
//!
//! For a quantized parameter stored under `weight_key` (e.g.
//! `model.layers.0.self_attn.q_proj.weight`), transformers saves `QuantState.as_dict(packed=True)`
//! of bitsandbytes 0.50 beside it:
//!
//! | key | dtype / shape | content |
//! |---|---|---|
//! | `{weight_key}` | u8 `[(n + 1) / 2, 1]` | packed NF4 indices, high nibble first |
//! | `{weight_key}.absmax` | u8 `[nblocks]` with double quant, else f32 `[nblocks]` | block scales |
//! | `{weight_key}.quant_map` | f32 `[16]` | the NF4 table |
//! | `{weight_key}.nested_absmax` | f32 `[ceil(nblocks / 256)]` | double quant only |
//! | `{weight_key}.nested_quant_map` | f32 `[256]` | double quant only: the 8-bit dynamic map |
//! | `{weight_key}.quant_state.bitsandbytes__nf4` | u8 `[len]` | UTF-8 JSON, see below |
//!
//! The JSON is Python's `json.dumps` of `{"quant_type": "nf4", "blocksize": 64, "dtype":
//! "float32", "shape": [out, in]}`, plus `"nested_blocksize": 256, "nested_dtype": "float32",
//! "nested_offset": <f32 offset as a double>` with double quant.

use crate::error::{Error, Result};
use crate::quant::nf4::{Absmax, NF4_CODE, Nf4Tensor};
use safetensors::Dtype;
use serde_json::Value;

/// Suffix of the packed quant-state entry for NF4.
pub const QUANT_STATE_NF4: &str = "quant_state.bitsandbytes__nf4";
/// Suffix of the packed quant-state entry for FP4 (recognized only to reject it clearly).
pub const QUANT_STATE_FP4: &str = "quant_state.bitsandbytes__fp4";

/// One tensor to store: `(key, dtype, shape, little-endian bytes)`.
pub type BnbTensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The quant-state JSON exactly as bitsandbytes writes it (Python `json.dumps` with its default
/// `", "` / `": "` separators; floats as the shortest repr of the double, like Python's).
pub fn quant_state_json(t: &Nf4Tensor) -> String {
    let shape = t
        .shape()
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"float32\", \"shape\": [{shape}]",
        t.blocksize()
    );
    if let Absmax::Double {
        offset,
        nested_blocksize,
        ..
    } = t.absmax()
    {
        // serde_json prints an f64 as its shortest round-trip form, as Python's repr does.
        let off = serde_json::to_string(&(*offset as f64)).expect("finite offset");
        s.push_str(&format!(
            ", \"nested_blocksize\": {nested_blocksize}, \"nested_dtype\": \"float32\", \"nested_offset\": {off}"
        ));
    }
    s.push('}');
    s
}

/// The tensors bitsandbytes/transformers store for `t` under `weight_key` (see the
/// [module docs](self) for keys, dtypes and shapes), in the order `as_dict` lists them, packed
/// weight first. The `dtype` recorded in the JSON is `float32` (lorafuse quantizes f32).
pub fn nf4_to_bnb_tensors(weight_key: &str, t: &Nf4Tensor) -> Vec<BnbTensor> {
    let k = |s: &str| format!("{weight_key}.{s}");
    let mut out: Vec<BnbTensor> = vec![(
        weight_key.to_string(),
        Dtype::U8,
        vec![t.packed().len(), 1],
        t.packed().to_vec(),
    )];
    match t.absmax() {
        Absmax::F32(a) => {
            out.push((k("absmax"), Dtype::F32, vec![a.len()], f32_bytes(a)));
            out.push((k("quant_map"), Dtype::F32, vec![16], f32_bytes(&NF4_CODE)));
        }
        Absmax::Double {
            absmax_q,
            nested_absmax,
            nested_code,
            ..
        } => {
            out.push((
                k("absmax"),
                Dtype::U8,
                vec![absmax_q.len()],
                absmax_q.clone(),
            ));
            out.push((k("quant_map"), Dtype::F32, vec![16], f32_bytes(&NF4_CODE)));
            out.push((
                k("nested_absmax"),
                Dtype::F32,
                vec![nested_absmax.len()],
                f32_bytes(nested_absmax),
            ));
            out.push((
                k("nested_quant_map"),
                Dtype::F32,
                vec![nested_code.len()],
                f32_bytes(nested_code),
            ));
        }
    }
    let json = quant_state_json(t).into_bytes();
    out.push((k(QUANT_STATE_NF4), Dtype::U8, vec![json.len()], json));
    out
}

/// Reads an NF4 tensor stored the bitsandbytes way under `weight_key`. `lookup(key)` returns a
/// stored tensor's `(dtype, shape, little-endian bytes)`, or `None` if the key is absent.
///
/// Accepts both plain (f32 `absmax`) and double-quantized (u8 `absmax` + `nested_*`) states.
/// The packed weight may use any `quant_storage` dtype as long as it holds `(n + 1) / 2` bytes.
/// The recorded `dtype` (float32/float16/bfloat16) only says what the original weight was;
/// dequantization is f32 either way. `quant_map` must equal [`NF4_CODE`] (bnb dequantizes with
/// its built-in table regardless).
///
/// Errors (`Error::Missing`, `Error::Format`, `Error::Shape`): a missing key, a quant state
/// that is not valid JSON or lacks a field, `quant_type` other than `nf4` (FP4 is not
/// supported), wrong dtypes, and sizes that do not match the shape and block sizes.
pub fn nf4_from_bnb_tensors<'a>(
    weight_key: &str,
    lookup: impl Fn(&str) -> Option<(Dtype, Vec<usize>, &'a [u8])>,
) -> Result<Nf4Tensor> {
    let k = |s: &str| format!("{weight_key}.{s}");
    let fmt = |msg: String| Error::format(weight_key, msg);
    let get = |key: String| {
        lookup(&key).ok_or_else(|| Error::Missing {
            path: weight_key.into(),
            name: key,
        })
    };

    let qs_key = k(QUANT_STATE_NF4);
    let (qs_dtype, _, qs_bytes) = match lookup(&qs_key) {
        Some(v) => v,
        None if lookup(&k(QUANT_STATE_FP4)).is_some() => {
            return Err(fmt("quant_type `fp4` is not supported (only nf4)".into()));
        }
        None => {
            return Err(Error::Missing {
                path: weight_key.into(),
                name: qs_key,
            });
        }
    };
    if qs_dtype != Dtype::U8 {
        return Err(fmt(format!(
            "`{qs_key}` must be U8 bytes, got {qs_dtype:?}"
        )));
    }
    let qs: Value = serde_json::from_slice(qs_bytes).map_err(|e| Error::Json {
        context: qs_key.clone(),
        msg: e.to_string(),
    })?;
    let field = |name: &str| {
        qs.get(name)
            .ok_or_else(|| fmt(format!("quant state `{qs_key}` lacks `{name}`")))
    };
    let as_usize = |name: &str, v: &Value| {
        v.as_u64().map(|x| x as usize).ok_or_else(|| {
            fmt(format!(
                "quant state `{name}` must be a non-negative integer, got {v}"
            ))
        })
    };
    let quant_type = field("quant_type")?;
    if quant_type.as_str() != Some("nf4") {
        return Err(fmt(format!("quant_type must be \"nf4\", got {quant_type}")));
    }
    let blocksize = as_usize("blocksize", field("blocksize")?)?;
    let dtype = field("dtype")?;
    if !matches!(dtype.as_str(), Some("float32" | "float16" | "bfloat16")) {
        return Err(fmt(format!(
            "dtype must be float32, float16 or bfloat16, got {dtype}"
        )));
    }
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .ok_or_else(|| fmt("quant state `shape` must be a list".into()))?
        .iter()
        .map(|d| as_usize("shape", d))
        .collect::<Result<_>>()?;

    let (_, _, packed) = get(weight_key.to_string())?;
    let f32s = |name: &str, want_len: Option<usize>| -> Result<Vec<f32>> {
        let key = k(name);
        let (dt, sh, bytes) = get(key.clone())?;
        if dt != Dtype::F32 {
            return Err(fmt(format!("`{key}` must be F32, got {dt:?}")));
        }
        let numel: usize = sh.iter().product();
        if bytes.len() != 4 * numel {
            return Err(fmt(format!(
                "`{key}` holds {} bytes, shape {sh:?} needs {}",
                bytes.len(),
                4 * numel
            )));
        }
        if let Some(want) = want_len
            && numel != want
        {
            return Err(Error::shape(key, format!("[{want}]"), &sh));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };

    let quant_map = f32s("quant_map", Some(16))?;
    if quant_map
        .iter()
        .zip(NF4_CODE)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(fmt(format!(
            "`{}` is not bitsandbytes' NF4 table: {quant_map:?}",
            k("quant_map")
        )));
    }

    let absmax = if qs.get("nested_offset").is_some() || lookup(&k("nested_absmax")).is_some() {
        let nested_blocksize = as_usize("nested_blocksize", field("nested_blocksize")?)?;
        let offset = field("nested_offset")?
            .as_f64()
            .ok_or_else(|| fmt("quant state `nested_offset` must be a number".into()))?
            as f32;
        let akey = k("absmax");
        let (dt, sh, bytes) = get(akey.clone())?;
        if dt != Dtype::U8 {
            return Err(fmt(format!(
                "`{akey}` must be U8 with double quantization, got {dt:?}"
            )));
        }
        if sh.iter().product::<usize>() != bytes.len() {
            return Err(fmt(format!(
                "`{akey}` shape {sh:?} does not match its {} bytes",
                bytes.len()
            )));
        }
        Absmax::Double {
            absmax_q: bytes.to_vec(),
            nested_absmax: f32s("nested_absmax", None)?,
            nested_code: f32s("nested_quant_map", Some(256))?,
            offset,
            nested_blocksize,
        }
    } else {
        Absmax::F32(f32s("absmax", None)?)
    };
    // from_parts checks blocksize, packed length and the absmax counts against the shape.
    Nf4Tensor::from_parts(packed.to_vec(), absmax, shape, blocksize)
}
