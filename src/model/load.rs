//! Building a [`Llama`] from a GGUF file (llama.cpp's tensor names) with q/k rows put back in
//! transformers' order, so adapters exchange with PEFT as they are, or from a transformers
//! model folder ([`crate::io::hf`]), whose rows are in that order already.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::gguf::{GgufFile, unpermute_qk};
use crate::io::hf::HfFolder;
use crate::model::llama::{Llama, Nf4Spec, PROJ_NAMES};

/// The GGUF name of a transformers tensor name, and the number of heads whose rows llama.cpp
/// permuted (q and k projections).
fn gguf_name(name: &str, cfg: &crate::model::LlamaConfig) -> Option<(String, Option<usize>)> {
    match name {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let rest = rest.strip_suffix(".weight")?;
    let (g, heads) = match rest {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        _ => {
            let proj = rest.rsplit('.').next()?;
            let p = PROJ_NAMES.iter().position(|n| *n == proj)?;
            let g = [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ][p];
            let heads = match p {
                0 => Some(cfg.num_attention_heads),
                1 => Some(cfg.num_key_value_heads),
                _ => None,
            };
            (g, heads)
        }
    };
    Some((format!("blk.{l}.{g}.weight"), heads))
}

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
            let (gname, heads) = gguf_name(name, &c2)
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
