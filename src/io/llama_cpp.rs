//! What llama.cpp and Ollama run: an adapter as llama.cpp's LoRA adapter GGUF (`llama-cli
//! --lora FILE`, Ollama's `ADAPTER`), and a merged model as a GGUF model file.
//!
//! llama.cpp applies a LoRA adapter per projection as `W0 x + scale * B (A x)` with
//! `scale = adapter_scale * alpha / rank` when the file's `adapter.lora.alpha` is non-zero and
//! `scale = adapter_scale` when it is zero (`llama_adapter_lora_weight::get_scale`, `rank` read
//! from the tensor, `adapter_scale` the user's `--lora-scaled` value, 1 by default). Every
//! method whose update is a plain low-rank term over the base ([`LowRank`] without a column
//! scale) is written as such factors, exactly:
//!
//! | method  | `lora_a [r, in]`              | `lora_b [out, r]`           | scale             |
//! |---------|-------------------------------|-----------------------------|-------------------|
//! | LoRA    | `lora_A`                      | `lora_B`                    | `alpha / r`       |
//! | rsLoRA  | `lora_A`                      | `lora_B`                    | `alpha / sqrt(r)` |
//! | VeRA    | `diag(lambda_d) vera_A[:, :in]` | `diag(lambda_b) vera_B[:out]` | 1             |
//! | AdaLoRA | `diag(E) A`, ranks with `E = 0` dropped | `B`, the same ranks dropped | `alpha / (ranknum + 1e-5)` |
//!
//! When every written projection has the same `scale * r`, that is the file's alpha and the
//! factors are written as they are (a LoRA or rsLoRA adapter of one rank: what llama.cpp's
//! `convert_lora_to_gguf.py` writes for plain LoRA, and right for rsLoRA where that script is
//! not). Otherwise (rank or alpha patterns, AdaLoRA's pruned ranks) each scale is folded into
//! its `lora_b` and alpha is 0. DoRA (its magnitude rescales each output of `W0 + s B A`), IA3
//! (a scale of the output), bias tuning, LN tuning, soft prompts, bottleneck adapters and
//! AdapterFusion have no LoRA-adapter form: they are refused, naming `merge` as the way out
//! (or none, for the ones that add layers).
//!
//! q/k rows: lorafuse (and PEFT) hold `q_proj`/`k_proj` rows in transformers' order; llama.cpp
//! holds them permuted per head for its RoPE ([`permute_qk`]), so `lora_b` of those two
//! projections (and the merged weights) are permuted the same way, as llama.cpp's converters
//! do.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use crate::adapter::{Adapter, BaseWeight};
use crate::backend::{Backend, LowRank};
use crate::error::{Error, Result};
use crate::io::export::{ModelWeight, model_weights};
use crate::io::gguf::{
    GgmlType, GgufFile, GgufValue, WriteTensor, encode, gguf_tensor_name, permute_qk, write_gguf,
};
use crate::model::llama::{Llama, proj_path};

/// The storage type of the tensors a GGUF export writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    /// IEEE half, rounded to nearest even.
    F16,
    /// bfloat16, rounded to nearest even.
    Bf16,
    /// ggml's 8-bit blocks of 32 (f16 scale + 32 i8), `quantize_row_q8_0_ref`; merged models only.
    Q8_0,
}

impl GgufDtype {
    /// The ggml type.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            GgufDtype::F32 => GgmlType::F32,
            GgufDtype::F16 => GgmlType::F16,
            GgufDtype::Bf16 => GgmlType::BF16,
            GgufDtype::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// `general.file_type` of a model written in this type (llama.cpp's `llama_ftype`:
    /// `ALL_F32` 0, `MOSTLY_F16` 1, `MOSTLY_Q8_0` 7, `MOSTLY_BF16` 32).
    pub fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
            GgufDtype::Bf16 => 32,
        }
    }
}

/// One projection's update `scale * lora_b @ lora_a` as plain factors.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraFactors {
    /// Row-major `[r, din]`.
    pub lora_a: Vec<f32>,
    /// Row-major `[dout, r]`.
    pub lora_b: Vec<f32>,
    pub r: usize,
    pub din: usize,
    pub dout: usize,
    pub scale: f32,
}

impl LoraFactors {
    /// `delta W = scale * lora_b @ lora_a`, row-major `[dout, din]`, accumulated in f64 (for
    /// checks).
    pub fn delta(&self) -> Vec<f64> {
        let mut d = vec![0f64; self.dout * self.din];
        for (o, row) in d.chunks_exact_mut(self.din).enumerate() {
            for k in 0..self.r {
                let b = self.lora_b[o * self.r + k] as f64 * self.scale as f64;
                let a = &self.lora_a[k * self.din..(k + 1) * self.din];
                row.iter_mut().zip(a).for_each(|(v, &x)| *v += b * x as f64);
            }
        }
        d
    }
}

/// The plain factors of a low-rank term over a `[dout, din]` base (the module docs' table):
/// `rank_scale` folded into the rows of A, `out_scale` into the rows of B, a shared term cut to
/// its leading `din` columns / `dout` rows, ranks whose `rank_scale` is exactly 0 dropped.
/// `None` when no rank is left. Errors: a term with a column scale (DoRA), shapes that disagree
/// with `din`/`dout`.
pub fn plain_factors<B: Backend>(
    be: &B,
    term: &LowRank<'_, B>,
    din: usize,
    dout: usize,
) -> Result<Option<LoraFactors>> {
    if term.col_scale.is_some() {
        return Err(Error::arg(
            "adapter",
            "a term with a column scale (DoRA) is not a plain low-rank update",
        ));
    }
    let r = term.r();
    let (a_cols, b_rows) = (term.lora_a.dim(1), term.lora_b.dim(0));
    if a_cols < din || b_rows < dout || (!term.shared && (a_cols != din || b_rows != dout)) {
        return Err(Error::shape(
            "lora_a/lora_b",
            format!("[{r}, {din}] and [{dout}, {r}]"),
            &[r, a_cols, b_rows, term.lora_b.dim(1)],
        ));
    }
    let a = be.download(term.lora_a)?;
    let b = be.download(term.lora_b)?;
    let rank_scale = term.rank_scale.map(|t| be.download(t)).transpose()?;
    let out_scale = term.out_scale.map(|t| be.download(t)).transpose()?;
    let kept: Vec<usize> = (0..r)
        .filter(|&k| rank_scale.as_ref().is_none_or(|s| s[k] != 0.0))
        .collect();
    if kept.is_empty() {
        return Ok(None);
    }
    let lora_a = kept
        .iter()
        .flat_map(|&k| {
            let s = rank_scale.as_ref().map_or(1.0, |s| s[k]);
            a[k * a_cols..k * a_cols + din].iter().map(move |&x| s * x)
        })
        .collect();
    let lora_b = (0..dout)
        .flat_map(|o| {
            let s = out_scale.as_ref().map_or(1.0, |s| s[o]);
            let row = &b[o * r..(o + 1) * r];
            kept.iter().map(move |&k| s * row[k])
        })
        .collect();
    Ok(Some(LoraFactors {
        lora_a,
        lora_b,
        r: kept.len(),
        din,
        dout,
        scale: term.scale,
    }))
}

/// A model's adapters as llama.cpp's LoRA adapter: `adapter.lora.alpha` and, per adapted
/// projection, its GGUF base name (`blk.{l}.attn_q.weight`) and factors, `lora_b` rows in
/// llama.cpp's q/k order, the scale folded into `lora_b` when `alpha` is 0 (module docs).
#[derive(Clone, Debug)]
pub struct GgufLora {
    pub alpha: f32,
    pub tensors: Vec<(String, LoraFactors)>,
}

fn refuse(what: &str, why: &str, instead: &str) -> Error {
    Error::arg(
        "adapter",
        format!("{what} cannot be written as a llama.cpp LoRA adapter ({why}); {instead}"),
    )
}

const MERGE_INSTEAD: &str = "merge it into the model instead: `lorafuse merge --to gguf`";

/// The adapters on `model` as a [`GgufLora`].
///
/// # Errors
/// [`Error::InvalidArgument`] naming the method and the alternative for everything that is not
/// a plain low-rank update (module docs): DoRA, IA3, BEFT on a projection; LN tuning, a soft
/// prompt, bottleneck adapters, AdapterFusion, a reward model's score head, several LoRA
/// adapters trained at once; and for a model with no adapted projection.
pub fn gguf_lora<B: Backend>(be: &B, model: &Llama<B>) -> Result<GgufLora> {
    if model.ln_tuning.is_some() {
        return Err(refuse(
            "LN tuning",
            "it replaces norm weights, not a low-rank term",
            MERGE_INSTEAD,
        ));
    }
    if model.soft_prompt.is_some() {
        return Err(refuse(
            "a soft prompt (prompt, P- or prefix tuning)",
            "it adds virtual tokens, not a weight change",
            "llama.cpp cannot load it; keep the PEFT adapter and serve it with lorafuse",
        ));
    }
    if model.bottleneck.is_some() || model.fusion.is_some() {
        return Err(refuse(
            "bottleneck adapters and AdapterFusion",
            "they add layers with non-linearities",
            "llama.cpp cannot load them; keep the adapter and serve it with lorafuse",
        ));
    }
    if model.score.is_some() {
        return Err(refuse(
            "a reward model",
            "its score head has no place in a llama LoRA adapter",
            "score with `lorafuse score`",
        ));
    }
    if model.multi_lora.is_some() {
        return Err(Error::arg(
            "adapter",
            "several LoRA adapters are attached at once: export each adapter folder on its own",
        ));
    }
    let cfg = &model.cfg;
    let shared = model.vera_shared.as_ref();
    let mut tensors = Vec::new();
    for (l, block) in model.layers.iter().enumerate() {
        for (p, proj) in block.proj.iter().enumerate() {
            let Some(adapter) = &proj.adapter else {
                continue;
            };
            let path = proj_path(l, p);
            let term = match adapter {
                Adapter::Dora(_) => {
                    return Err(refuse(
                        &format!("DoRA ({path})"),
                        "its magnitude rescales every output of W0 + s B A, which `W0 x + s B A \
                         x` cannot express",
                        MERGE_INSTEAD,
                    ));
                }
                Adapter::Ia3(_) => {
                    return Err(refuse(
                        &format!("IA3 ({path})"),
                        "it scales the projection's activations, not a low-rank term",
                        MERGE_INSTEAD,
                    ));
                }
                Adapter::Beft(_) => {
                    return Err(refuse(
                        &format!("bias tuning ({path})"),
                        "it adds a bias, not a low-rank term",
                        "llama.cpp cannot load it; keep the PEFT adapter",
                    ));
                }
                a => a.lowrank_term(shared)?,
            };
            let (dout, din) = proj.base.weight.dims();
            let Some(mut f) = plain_factors(be, &term, din, dout)? else {
                continue; // every rank pruned (AdaLoRA): no update
            };
            let (gname, heads) = gguf_tensor_name(&format!("{path}.weight"), cfg)
                .ok_or_else(|| Error::arg(path.clone(), "has no llama.cpp tensor name"))?;
            if let Some(heads) = heads {
                permute_qk(&mut f.lora_b, dout, f.r, heads)?;
            }
            tensors.push((gname, f));
        }
    }
    if tensors.is_empty() {
        return Err(Error::arg(
            "adapter",
            "no projection carries a low-rank update: nothing to export",
        ));
    }
    let alpha = tensors[0].1.scale * tensors[0].1.r as f32;
    let uniform = alpha.is_normal() && tensors.iter().all(|(_, f)| f.scale * f.r as f32 == alpha);
    if uniform {
        return Ok(GgufLora { alpha, tensors });
    }
    for (_, f) in &mut tensors {
        let s = f.scale;
        f.lora_b.iter_mut().for_each(|v| *v *= s);
        f.scale = 1.0;
    }
    Ok(GgufLora {
        alpha: 0.0,
        tensors,
    })
}

/// Writes `lora` as llama.cpp's LoRA adapter GGUF, atomically: `general.architecture`
/// `arch` (the base model's), `general.type = "adapter"`, `adapter.type = "lora"`,
/// `adapter.lora.alpha` (f32), `general.name`; per projection `{base}.lora_a` (GGUF `ne =
/// [in, r]`) and `{base}.lora_b` (`ne = [r, out]`) in `dtype`.
///
/// # Errors
/// [`Error::InvalidArgument`] for `dtype` Q8_0 (the rows of `lora_b` are r long, not blocks of
/// 32: use f32, f16 or bf16); I/O errors.
pub fn write_gguf_lora(
    path: &Path,
    arch: &str,
    name: &str,
    lora: &GgufLora,
    dtype: GgufDtype,
) -> Result<()> {
    if dtype == GgufDtype::Q8_0 {
        return Err(Error::arg(
            "dtype",
            "a LoRA adapter GGUF is written in f32, f16 or bf16 (lora_b's rows are r long, \
             not blocks of 32)",
        ));
    }
    let ty = dtype.ggml_type();
    let mut meta = BTreeMap::new();
    let s = |v: &str| GgufValue::String(v.to_string());
    meta.insert("general.architecture".to_string(), s(arch));
    meta.insert("general.type".to_string(), s("adapter"));
    meta.insert("general.name".to_string(), s(name));
    meta.insert("adapter.type".to_string(), s("lora"));
    meta.insert("adapter.lora.alpha".to_string(), GgufValue::F32(lora.alpha));
    let mut tensors = Vec::with_capacity(2 * lora.tensors.len());
    for (base, f) in &lora.tensors {
        tensors.push(WriteTensor {
            name: format!("{base}.lora_a"),
            shape: vec![f.r, f.din],
            ggml_type: ty,
            bytes: Cow::Owned(encode(ty, &f.lora_a, f.din)?),
        });
        tensors.push(WriteTensor {
            name: format!("{base}.lora_b"),
            shape: vec![f.dout, f.r],
            ggml_type: ty,
            bytes: Cow::Owned(encode(ty, &f.lora_b, f.r)?),
        });
    }
    write_gguf(path, &meta, &tensors)
}

/// Metadata keys of a source GGUF that describe its tensors' encoding, not the model: dropped
/// from a merged model's metadata (`general.file_type` is set anew).
fn is_encoding_key(k: &str) -> bool {
    k == "general.file_type" || k.starts_with("quantize.")
}

/// Writes `model` (adapters merged already, [`crate::io::export::merge_into_base`]) as a GGUF
/// model file that llama.cpp loads, atomically: `source`'s metadata (architecture,
/// hyperparameters, tokenizer, chat template) with `general.file_type` for `dtype`, and its
/// tensors in `source`'s order, each of the model's weights under llama.cpp's name with q/k
/// rows permuted back: 1-D tensors (norms) in F32 as llama.cpp keeps them, 2-D in `dtype`
/// (Q8_0 rows that are not blocks of 32 in F16); a tensor of `source` the model does not hold
/// (e.g. `rope_freqs.weight`) is copied as it is. NF4 projections are written dequantized.
/// Returns the number of tensors written.
///
/// # Errors
/// [`Error::InvalidArgument`] if `source` is not a llama GGUF of the model's shape, the model
/// still carries adapters or a score head, or a weight has no llama.cpp name; I/O errors.
pub fn write_gguf_model<B: Backend>(
    be: &B,
    model: &Llama<B>,
    source: &GgufFile,
    path: &Path,
    dtype: GgufDtype,
) -> Result<usize> {
    let cfg = source.llama_config()?;
    if cfg != model.cfg {
        return Err(Error::arg(
            "source",
            format!(
                "{} is not the model's source (its hyperparameters differ)",
                source.path().display()
            ),
        ));
    }
    if model.score.is_some() {
        return Err(Error::arg(
            "model",
            "a reward model's score head has no place in a llama GGUF",
        ));
    }
    if model
        .layers
        .iter()
        .any(|b| b.proj.iter().any(|p| p.adapter.is_some()))
    {
        return Err(Error::arg(
            "model",
            "the model still carries adapters: merge them first",
        ));
    }
    let mut ours: BTreeMap<String, WriteTensor<'static>> = BTreeMap::new();
    for (name, w) in model_weights(model) {
        let (gname, heads) = gguf_tensor_name(&name, &model.cfg)
            .ok_or_else(|| Error::arg(name.clone(), "has no llama.cpp tensor name"))?;
        let (mut data, shape) = match w {
            ModelWeight::Dense(t) | ModelWeight::Projection(BaseWeight::Dense(t)) => {
                (be.download(t)?, t.shape().to_vec())
            }
            ModelWeight::Projection(BaseWeight::Nf4(q)) => {
                let t = be.nf4_dequantize(q)?;
                (be.download(&t)?, t.shape().to_vec())
            }
            ModelWeight::Projection(BaseWeight::Bf16(w)) => {
                let t = be.bf16_to_f32(w)?;
                (be.download(&t)?, t.shape().to_vec())
            }
        };
        if let Some(h) = heads {
            permute_qk(&mut data, shape[0], shape[1], h)?;
        }
        let row = *shape.last().unwrap_or(&1);
        let ty = match (shape.len(), dtype) {
            (1, _) => GgmlType::F32,
            (_, GgufDtype::Q8_0) if !row.is_multiple_of(32) => GgmlType::F16,
            (_, d) => d.ggml_type(),
        };
        let bytes = Cow::Owned(encode(ty, &data, row)?);
        let t = WriteTensor {
            name: gname.clone(),
            shape,
            ggml_type: ty,
            bytes,
        };
        ours.insert(gname, t);
    }
    let mut meta: BTreeMap<String, GgufValue> = source
        .metadata()
        .iter()
        .filter(|(k, _)| !is_encoding_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert(
        "general.file_type".into(),
        GgufValue::U32(dtype.file_type()),
    );
    let mut tensors = Vec::new();
    for info in source.tensors() {
        tensors.push(match ours.remove(&info.name) {
            Some(t) => t,
            None => WriteTensor::raw(
                info.name.clone(),
                &info.shape,
                info.ggml_type,
                source.tensor_bytes(&info.name)?,
            ),
        });
    }
    tensors.extend(ours.into_values());
    let n = tensors.len();
    write_gguf(path, &meta, &tensors)?;
    Ok(n)
}
