//! llama.cpp's tensor names for a Llama model, from transformers' names.

use crate::model::LlamaConfig;
use crate::model::llama::PROJ_NAMES;

/// llama.cpp's name of each projection of a layer, in the order of [`PROJ_NAMES`].
pub const GGUF_PROJ_NAMES: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// The GGUF name (llama.cpp's `LLM_TENSOR_NAMES` for `LLM_ARCH_LLAMA`) of the transformers
/// tensor `name`, with the number of heads whose rows llama.cpp permutes for its RoPE
/// (`Some(num_attention_heads)` for `q_proj`, `Some(num_key_value_heads)` for `k_proj`, see
/// [`super::permute_qk`]); `None` for a name that has no GGUF counterpart.
///
/// `model.embed_tokens.weight` is `token_embd.weight`, `model.norm.weight` `output_norm.weight`,
/// `lm_head.weight` `output.weight`, and `model.layers.{l}.` becomes `blk.{l}.` with
/// `input_layernorm` → `attn_norm`, `post_attention_layernorm` → `ffn_norm` and the projections
/// as [`GGUF_PROJ_NAMES`]. A `.bias` suffix maps like `.weight`.
pub fn gguf_tensor_name(name: &str, cfg: &LlamaConfig) -> Option<(String, Option<usize>)> {
    match name {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let (rest, suffix) = rest
        .strip_suffix(".weight")
        .map(|r| (r, "weight"))
        .or_else(|| rest.strip_suffix(".bias").map(|r| (r, "bias")))?;
    let (g, heads) = match rest {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        _ => {
            let (group, proj) = rest.split_once('.')?;
            let p = PROJ_NAMES.iter().position(|n| *n == proj)?;
            if group != if p <= 3 { "self_attn" } else { "mlp" } {
                return None;
            }
            let heads = match p {
                0 => Some(cfg.num_attention_heads),
                1 => Some(cfg.num_key_value_heads),
                _ => None,
            };
            (GGUF_PROJ_NAMES[p], heads)
        }
    };
    Some((format!("blk.{l}.{g}.{suffix}"), heads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::proj_path;

    #[test]
    fn names_follow_llama_cpp() {
        let cfg = LlamaConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            max_position_embeddings: 64,
            bos_token_id: 1,
            eos_token_id: 2,
            pad_token_id: 2,
        };
        let n = |s: &str| gguf_tensor_name(s, &cfg);
        assert_eq!(
            n("model.embed_tokens.weight").unwrap().0,
            "token_embd.weight"
        );
        assert_eq!(
            n("model.layers.3.post_attention_layernorm.weight")
                .unwrap()
                .0,
            "blk.3.ffn_norm.weight"
        );
        for (p, g) in GGUF_PROJ_NAMES.iter().enumerate() {
            let (name, heads) = n(&format!("{}.weight", proj_path(2, p))).unwrap();
            assert_eq!(name, format!("blk.2.{g}.weight"));
            assert_eq!(heads.is_some(), p < 2);
        }
        assert_eq!(
            n("model.layers.0.self_attn.k_proj.weight").unwrap().1,
            Some(cfg.num_key_value_heads)
        );
        assert!(n("model.layers.0.mlp.q_proj.weight").is_none());
        assert!(n("model.layers.x.mlp.up_proj.weight").is_none());
        assert!(n("score.weight").is_none());
    }
}
