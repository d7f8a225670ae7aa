//! AdaLoRA's rank pattern (which ranks of each layer are kept) as PEFT 0.21.2 writes it in
//! `adapter_config.json`, and the factors of a pruned layer: PEFT's `save_pretrained` drops the
//! masked ranks (`lora_A [kept, in]`, `lora_B [out, kept]`, `lora_E [kept, 1]`) and loading
//! expands them back to init_r with zeros. The one serializer of the pattern: the allocator,
//! the trainer's metrics and `io::peft` all go through it.

use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;

/// Which ranks of each layer are kept: layer (module) name, e.g. `fc1` or
/// `model.layers.0.self_attn.q_proj`, → one `bool` per rank (`true` = kept).
///
/// PEFT keys it by the `lora_E` parameter name (`fc1.lora_E.default` while training,
/// `fc1.lora_E` in the saved `adapter_config.json`); see [`rank_pattern_to_json`] and
/// [`rank_pattern_from_json`] for the conversion.
pub type RankPattern = BTreeMap<String, Vec<bool>>;

/// The `rank_pattern` object PEFT writes in `adapter_config.json`: `"{layer}.lora_E"` → list of
/// bools (PEFT's `_get_adapter_state_dict` strips the `.{adapter_name}` suffix before saving).
pub fn rank_pattern_to_json(pattern: &RankPattern) -> Value {
    let map = pattern
        .iter()
        .map(|(k, v)| {
            (
                format!("{k}.lora_E"),
                Value::Array(v.iter().map(|&b| Value::Bool(b)).collect()),
            )
        })
        .collect();
    Value::Object(map)
}

/// Parses a `rank_pattern` object. Keys may be the saved form `"{layer}.lora_E"` or the
/// in-training form `"{layer}.lora_E.{adapter_name}"` (PEFT's `mask_using_rank_pattern` accepts
/// both); values are lists of bools (`0`/`1` integers, which PEFT's `bool()` also accepts, are
/// read as bools).
///
/// Errors ([`Error::Json`]): not an object, a key without `.lora_E`, a value that is not a list
/// of bools, two keys naming the same layer.
pub fn rank_pattern_from_json(value: &Value, adapter_name: &str) -> Result<RankPattern> {
    let bad = |msg: String| Error::Json {
        context: "rank_pattern".into(),
        msg,
    };
    let obj = value
        .as_object()
        .ok_or_else(|| bad("rank_pattern is not an object".into()))?;
    let training_suffix = format!(".lora_E.{adapter_name}");
    let mut out = RankPattern::new();
    for (key, v) in obj {
        let layer = key
            .strip_suffix(".lora_E")
            .or_else(|| key.strip_suffix(training_suffix.as_str()))
            .ok_or_else(|| bad(format!("key `{key}` does not end in `.lora_E`")))?;
        let list = v
            .as_array()
            .ok_or_else(|| bad(format!("`{key}` is not a list")))?;
        let bits = list
            .iter()
            .map(|x| match x {
                Value::Bool(b) => Ok(*b),
                Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
                Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
                _ => Err(bad(format!("`{key}` holds {x}, not a bool"))),
            })
            .collect::<Result<Vec<bool>>>()?;
        if out.insert(layer.to_string(), bits).is_some() {
            return Err(bad(format!("layer `{layer}` appears twice")));
        }
    }
    Ok(out)
}

/// The `rank_pattern` of an `adapter_config.json` text: `None` if the field is absent or `null`
/// (an AdaLoRA adapter saved before any mask). Errors: invalid JSON or pattern.
pub fn rank_pattern_from_adapter_config(
    json: &str,
    adapter_name: &str,
) -> Result<Option<RankPattern>> {
    let v: Value = serde_json::from_str(json).map_err(|e| Error::Json {
        context: "adapter_config.json".into(),
        msg: e.to_string(),
    })?;
    match v.get("rank_pattern") {
        None | Some(Value::Null) => Ok(None),
        Some(p) => rank_pattern_from_json(p, adapter_name).map(Some),
    }
}

/// One layer's factors with only some ranks: `lora_a [kept, in]`, `lora_b [out, kept]`,
/// `lora_e [kept]` (PEFT saves E as `[kept, 1]`).
#[derive(Clone, Debug, PartialEq)]
pub struct KeptFactors {
    pub kept: usize,
    pub lora_a: Vec<f32>,
    pub lora_b: Vec<f32>,
    pub lora_e: Vec<f32>,
}

fn check_factors(a: &[f32], b: &[f32], e: &[f32], r: usize, inp: usize, out: usize) -> Result<()> {
    if a.len() != r * inp {
        return Err(Error::shape("lora_A", format!("[{r}, {inp}]"), &[a.len()]));
    }
    if b.len() != out * r {
        return Err(Error::shape("lora_B", format!("[{out}, {r}]"), &[b.len()]));
    }
    if e.len() != r {
        return Err(Error::shape("lora_E", format!("[{r}, 1]"), &[e.len()]));
    }
    Ok(())
}

/// Drops the ranks where `keep` is false, as PEFT's `resize_state_dict_by_rank_pattern` does
/// when saving (rows of A and E, columns of B). With every rank kept the tensors are unchanged.
/// A layer with nothing kept gives rank 0 (PEFT allows `r == 0` for AdaLoRA).
///
/// Errors: `lora_a [r, in]`, `lora_b [out, r]`, `lora_e [r]` with `r = keep.len()` mismatched.
pub fn drop_masked_ranks(
    lora_a: &[f32],
    lora_b: &[f32],
    lora_e: &[f32],
    in_features: usize,
    out_features: usize,
    keep: &[bool],
) -> Result<KeptFactors> {
    let r = keep.len();
    check_factors(lora_a, lora_b, lora_e, r, in_features, out_features)?;
    let idx: Vec<usize> = (0..r).filter(|&i| keep[i]).collect();
    let kept = idx.len();
    let mut a = Vec::with_capacity(kept * in_features);
    for &i in &idx {
        a.extend_from_slice(&lora_a[i * in_features..(i + 1) * in_features]);
    }
    let mut b = Vec::with_capacity(out_features * kept);
    for k in 0..out_features {
        b.extend(idx.iter().map(|&i| lora_b[k * r + i]));
    }
    let e = idx.iter().map(|&i| lora_e[i]).collect();
    Ok(KeptFactors {
        kept,
        lora_a: a,
        lora_b: b,
        lora_e: e,
    })
}

/// The inverse of [`drop_masked_ranks`]: back to rank `keep.len()` with zeros in A, B and E at
/// the masked ranks, so the layer's output is unchanged. PEFT instead loads such an adapter at
/// the kept rank (`resize_modules_by_rank_pattern`, `ranknum` still `init_r`); expanding lets a
/// fixed-rank layer (and a resumed allocator) use it. Returns `(lora_a, lora_b, lora_e)`.
///
/// Errors: the kept factors do not have `count(keep)` ranks.
pub fn expand_masked_ranks(
    kept: &KeptFactors,
    in_features: usize,
    out_features: usize,
    keep: &[bool],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let r = keep.len();
    let n = keep.iter().filter(|&&k| k).count();
    if kept.kept != n {
        return Err(Error::arg(
            "rank_pattern",
            format!(
                "{n} kept ranks in the pattern, {} in the factors",
                kept.kept
            ),
        ));
    }
    check_factors(
        &kept.lora_a,
        &kept.lora_b,
        &kept.lora_e,
        n,
        in_features,
        out_features,
    )?;
    let mut a = vec![0.0f32; r * in_features];
    let mut b = vec![0.0f32; out_features * r];
    let mut e = vec![0.0f32; r];
    for (j, i) in (0..r).filter(|&i| keep[i]).enumerate() {
        a[i * in_features..(i + 1) * in_features]
            .copy_from_slice(&kept.lora_a[j * in_features..(j + 1) * in_features]);
        for k in 0..out_features {
            b[k * r + i] = kept.lora_b[k * n + j];
        }
        e[i] = kept.lora_e[j];
    }
    Ok((a, b, e))
}
