//! Building a [`Llama`] from a GGUF file (llama.cpp's tensor names) with q/k rows put back in
//! transformers' order, so adapters exchange with PEFT as they are.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::gguf::{GgufFile, unpermute_qk};
use crate::model::llama::{Llama, proj_path};
use std::collections::HashMap;

/// GGUF name of projection `p` (order of `PROJ_NAMES`) in block `l`.
fn gguf_proj(l: usize, p: usize) -> String {
    let n = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ][p];
    format!("blk.{l}.{n}.weight")
}

/// Loads every weight of a llama-architecture GGUF (dequantized to f32) onto `be`.
///
/// llama.cpp stores `attn_q`/`attn_k` with the rows of each head interleaved for its RoPE; they
/// are un-permuted here (as transformers' GGUF loader does) and the model uses the
/// `rotate_half` RoPE. Errors: not a llama GGUF, a missing tensor, a shape that disagrees with
/// the metadata, an unsupported tensor type.
pub fn llama_from_gguf<B: Backend>(be: &B, g: &GgufFile) -> Result<Llama<B>> {
    let cfg = g.llama_config()?;
    let mut map: HashMap<String, (Vec<f32>, Vec<usize>)> = HashMap::new();
    map.insert(
        "model.embed_tokens.weight".into(),
        g.tensor_f32("token_embd.weight")?,
    );
    for l in 0..cfg.num_hidden_layers {
        for p in 0..7 {
            let (mut data, shape) = g.tensor_f32(&gguf_proj(l, p))?;
            let heads = match p {
                0 => Some(cfg.num_attention_heads),
                1 => Some(cfg.num_key_value_heads),
                _ => None,
            };
            if let Some(h) = heads {
                let [rows, cols] = shape[..] else {
                    return Err(Error::shape(gguf_proj(l, p), "2-D", &shape));
                };
                unpermute_qk(&mut data, rows, cols, h)?;
            }
            map.insert(format!("{}.weight", proj_path(l, p)), (data, shape));
        }
        map.insert(
            format!("model.layers.{l}.input_layernorm.weight"),
            g.tensor_f32(&format!("blk.{l}.attn_norm.weight"))?,
        );
        map.insert(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            g.tensor_f32(&format!("blk.{l}.ffn_norm.weight"))?,
        );
    }
    map.insert(
        "model.norm.weight".into(),
        g.tensor_f32("output_norm.weight")?,
    );
    if !cfg.tie_word_embeddings {
        map.insert("lm_head.weight".into(), g.tensor_f32("output.weight")?);
    }
    Llama::from_tensors(be, cfg, map)
}
