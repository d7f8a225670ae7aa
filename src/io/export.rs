//! Writing a model's weights as safetensors with transformers' names (full fine-tuning's
//! output, `lorafuse merge`): one walk over the model's weights ([`model_weights`]) and its
//! encoders (f32/bf16, or bitsandbytes NF4 for the projections).

use crate::Cpu;
use crate::adapter::BaseWeight;
use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::bnb::nf4_to_bnb_tensors;
use crate::model::llama::{Llama, Nf4Spec, proj_path};
use crate::quant::nf4::quantize_nf4;
use std::path::Path;

/// One tensor ready to serialize: name, dtype, shape, little-endian bytes.
pub type RawTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// The floating-point type weights are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    /// IEEE half, rounded to nearest even (torch's `.to(torch.float16)`).
    F16,
    /// bfloat16, rounded to nearest even (torch's `.to(torch.bfloat16)`).
    Bf16,
}

impl WeightDtype {
    /// The safetensors dtype and the bytes of `values` in it.
    pub fn encode(self, values: &[f32]) -> (safetensors::Dtype, Vec<u8>) {
        match self {
            WeightDtype::F32 => (
                safetensors::Dtype::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            WeightDtype::F16 => (
                safetensors::Dtype::F16,
                values
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
            WeightDtype::Bf16 => (
                safetensors::Dtype::BF16,
                values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
        }
    }
}

/// One weight of the model as the exporters walk it.
pub enum ModelWeight<'a, B: Backend> {
    /// Embeddings, norms, the LM head.
    Dense(&'a Tensor<B>),
    /// A projection's base weight (dense or NF4).
    Projection(&'a BaseWeight<B>),
}

/// Every base weight of the model in transformers' order and with its names (q/k rows in
/// transformers' order): embeddings, per layer the two norms and the seven projections, the
/// final norm, the LM head when untied. Adapters are not included (merge them first).
pub fn model_weights<B: Backend>(model: &Llama<B>) -> Vec<(String, ModelWeight<'_, B>)> {
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        ModelWeight::Dense(&model.embed_tokens),
    )];
    for (l, b) in model.layers.iter().enumerate() {
        out.push((
            format!("model.layers.{l}.input_layernorm.weight"),
            ModelWeight::Dense(&b.input_layernorm),
        ));
        out.push((
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            ModelWeight::Dense(&b.post_attention_layernorm),
        ));
        for (p, proj) in b.proj.iter().enumerate() {
            out.push((
                format!("{}.weight", proj_path(l, p)),
                ModelWeight::Projection(&proj.base.weight),
            ));
        }
    }
    out.push(("model.norm.weight".into(), ModelWeight::Dense(&model.norm)));
    if let Some(h) = &model.lm_head {
        out.push(("lm_head.weight".into(), ModelWeight::Dense(h)));
    }
    // A reward model: LlamaForSequenceClassification's head.
    if let Some(s) = &model.score {
        out.push(("score.weight".into(), ModelWeight::Dense(s)));
    }
    out
}

/// Every base weight of the model ([`model_weights`]) encoded in `dtype`; NF4 bases are
/// written dequantized.
pub fn model_tensors<B: Backend>(
    be: &B,
    model: &Llama<B>,
    dtype: WeightDtype,
) -> Result<Vec<RawTensor>> {
    let encode = |name: String, t: &Tensor<B>| -> Result<RawTensor> {
        let (st, bytes) = dtype.encode(&be.download(t)?);
        Ok((name, st, t.shape().to_vec(), bytes))
    };
    model_weights(model)
        .into_iter()
        .map(|(name, w)| match w {
            ModelWeight::Dense(t) | ModelWeight::Projection(BaseWeight::Dense(t)) => {
                encode(name, t)
            }
            ModelWeight::Projection(BaseWeight::Nf4(q)) => encode(name, &be.nf4_dequantize(q)?),
            ModelWeight::Projection(BaseWeight::Bf16(w)) => encode(name, &be.bf16_to_f32(w)?),
        })
        .collect()
}

/// The tensors of a merged model with its projections stored as bitsandbytes stores an NF4
/// parameter ([`nf4_to_bnb_tensors`]: an NF4 base as it is, a dense (merged) weight quantized
/// with `spec`), every other tensor as [`model_tensors`] encodes it. Errors: a weight the
/// quantizer rejects, named.
pub fn nf4_model_tensors(
    model: &Llama<Cpu>,
    dtype: WeightDtype,
    spec: Nf4Spec,
) -> Result<Vec<RawTensor>> {
    let mut tensors = Vec::new();
    for (name, w) in model_weights(model) {
        match w {
            ModelWeight::Dense(t) => {
                let (st, bytes) = dtype.encode(t.data());
                tensors.push((name, st, t.shape().to_vec(), bytes));
            }
            ModelWeight::Projection(BaseWeight::Nf4(q)) => {
                tensors.extend(nf4_to_bnb_tensors(&name, q.buf()))
            }
            ModelWeight::Projection(BaseWeight::Dense(w)) => {
                let q = quantize_nf4(w.data(), w.shape(), spec.blocksize, spec.double_quant)
                    .map_err(|e| Error::arg(name.clone(), e.to_string()))?;
                tensors.extend(nf4_to_bnb_tensors(&name, &q));
            }
            ModelWeight::Projection(BaseWeight::Bf16(w)) => {
                let w = Cpu.bf16_to_f32(w)?;
                let q = quantize_nf4(w.data(), w.shape(), spec.blocksize, spec.double_quant)
                    .map_err(|e| Error::arg(name.clone(), e.to_string()))?;
                tensors.extend(nf4_to_bnb_tensors(&name, &q));
            }
        }
    }
    Ok(tensors)
}

/// Merges every adapter of `model` into its base (PEFT's `merge_and_unload`); an adapted NF4
/// projection is dequantized first (bitsandbytes' values), a bf16 one widened, and merged in
/// f32. Returns how many projections were merged.
pub fn merge_into_base<B: Backend>(be: &B, model: &mut Llama<B>) -> Result<usize> {
    let mut merged = 0;
    for block in &mut model.layers {
        for p in block.proj.iter_mut().filter(|p| p.adapter.is_some()) {
            if !matches!(p.base.weight, BaseWeight::Dense(_)) {
                p.base = p.base.dequantized(be)?;
            }
            merged += 1;
        }
    }
    model.merge_and_unload(be)?;
    Ok(merged)
}

/// Serializes raw little-endian tensors to a safetensors file, atomically (a temporary file
/// renamed into place). Errors: a tensor whose bytes disagree with its shape and dtype, I/O.
pub fn write_safetensors(path: &Path, tensors: Vec<RawTensor>) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::format(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(views, None).map_err(|e| Error::format(path, e.to_string()))?;
    write_atomic(path, &bytes)
}
