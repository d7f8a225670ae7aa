//! Building a [`Llama`] from a GGUF file (llama.cpp's tensor names) with q/k rows put back in
//! transformers' order, so adapters exchange with PEFT as they are, or from a transformers
//! model folder ([`crate::io::hf`]), whose rows are in that order already.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::gguf::{GgufFile, gguf_tensor_name, unpermute_qk};
use crate::io::hf::HfFolder;
use crate::model::llama::{Llama, Nf4Spec};

/// Loads every weight of a llama-architecture GGUF (dequantized to f32) onto `be`.
///
/// llama.cpp stores `attn_q`/`attn_k` with the rows of each head interleaved for its RoPE; they
/// are un-permuted here (as transformers' GGUF loader does) and the model uses the
/// `rotate_half` RoPE. Errors: not a llama GGUF, a missing tensor, a shape that disagrees with
/// the metadata, an unsupported tensor type.
pub fn llama_from_gguf<B: Backend>(be: &B, g: &GgufFile) -> Result<Llama<B>> {
    llama_from_gguf_with(be, g, None)
}

/// [`llama_from_gguf`], with the projection weights quantized to NF4 one at a time as they are
/// read when `nf4` is given (QLoRA), so no f32 copy of the whole model is ever held.
pub fn llama_from_gguf_with<B: Backend>(
    be: &B,
    g: &GgufFile,
    nf4: Option<Nf4Spec>,
) -> Result<Llama<B>> {
    let cfg = g.llama_config()?;
    let c2 = cfg.clone();
    Llama::from_source(
        be,
        cfg,
        &mut |name| {
            let (gname, heads) = gguf_tensor_name(name, &c2)
                .ok_or_else(|| Error::arg("tensor", format!("no GGUF name for `{name}`")))?;
            let (mut data, shape) = g.tensor_f32(&gname)?;
            if let Some(h) = heads {
                let [rows, cols] = shape[..] else {
                    return Err(Error::shape(gname, "2-D", &shape));
                };
                unpermute_qk(&mut data, rows, cols, h)?;
            }
            Ok((data, shape))
        },
        nf4,
    )
}

/// Loads every weight of a transformers Llama folder onto `be` (f32/f16/bf16 converted to f32),
/// quantizing the projections to NF4 one at a time as they are read when `nf4` is given. A
/// tied model (`tie_word_embeddings`) needs no `lm_head.weight`. Errors: a missing tensor
/// (naming the file and key), a shape that disagrees with `config.json`, an unsupported dtype.
pub fn llama_from_hf<B: Backend>(
    be: &B,
    folder: &mut HfFolder,
    nf4: Option<Nf4Spec>,
) -> Result<Llama<B>> {
    let cfg = folder.llama_config().clone();
    Llama::from_source(be, cfg, &mut |name| folder.tensor_f32(name), nf4)
}
