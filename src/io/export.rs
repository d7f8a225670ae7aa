//! Writing a model's weights as safetensors with transformers' names (full fine-tuning's
//! output, `lorafuse merge`).

use crate::adapter::BaseWeight;
use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::model::llama::{Llama, proj_path};
use crate::train::report::write_atomic;
use std::path::Path;

/// One tensor ready to serialize: name, dtype, shape, little-endian bytes.
pub type RawTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// The floating-point type weights are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
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

/// Every base weight of the model with transformers' names (q/k rows in transformers' order),
/// encoded in `dtype`; NF4 bases are written dequantized. Adapters are not included (merge
/// them first).
pub fn model_tensors<B: Backend>(
    be: &B,
    model: &Llama<B>,
    dtype: WeightDtype,
) -> Result<Vec<RawTensor>> {
    let mut tensors = Vec::new();
    let mut push = |name: String, t: &Tensor<B>| -> Result<()> {
        let (st, bytes) = dtype.encode(&be.download(t)?);
        tensors.push((name, st, t.shape().to_vec(), bytes));
        Ok(())
    };
    push("model.embed_tokens.weight".into(), &model.embed_tokens)?;
    for (l, b) in model.layers.iter().enumerate() {
        push(
            format!("model.layers.{l}.input_layernorm.weight"),
            &b.input_layernorm,
        )?;
        push(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            &b.post_attention_layernorm,
        )?;
        for (p, proj) in b.proj.iter().enumerate() {
            let name = format!("{}.weight", proj_path(l, p));
            match &proj.base.weight {
                BaseWeight::Dense(w) => push(name, w)?,
                BaseWeight::Nf4(q) => push(name, &be.nf4_dequantize(q)?)?,
            }
        }
    }
    push("model.norm.weight".into(), &model.norm)?;
    if let Some(h) = &model.lm_head {
        push("lm_head.weight".into(), h)?;
    }
    Ok(tensors)
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
