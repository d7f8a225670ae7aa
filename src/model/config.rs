//! Hyperparameters of a Llama-architecture model.

use serde::{Deserialize, Serialize};

/// Shape hyperparameters of a Llama-architecture decoder (as transformers' `LlamaConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head dimension: `hidden_size / num_attention_heads` for every model lorafuse loads.
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    /// The LM head shares `embed_tokens` (SmolLM2: true).
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}
