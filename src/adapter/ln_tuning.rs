//! LN tuning (Zhao et al. 2024, "Tuning LayerNorm in Attention", sec. 3), as PEFT's `LNTuning`
//! does it: each targeted norm gets a trainable copy of its weight (`ln_tuning_layers`), used in
//! place of the frozen one while the adapter is active. On Llama the norms are RMSNorms with a
//! weight and no bias.

use crate::backend::{Backend, Tensor};

/// The norm names PEFT targets on a Llama (`input_layernorm`, `post_attention_layernorm` in
/// every layer, `norm` the final one).
pub const LN_TARGETS: [&str; 3] = ["input_layernorm", "post_attention_layernorm", "norm"];

/// Trainable copies of a model's norm weights, `[hidden]` each; `None` where not targeted.
#[derive(Clone, Debug)]
pub struct LnTuning<B: Backend> {
    /// Per layer: `[input_layernorm, post_attention_layernorm]`.
    pub layers: Vec<[Option<Tensor<B>>; 2]>,
    /// The final norm's copy.
    pub norm: Option<Tensor<B>>,
}

impl<B: Backend> LnTuning<B> {
    /// Whether any norm is tuned.
    pub fn is_empty(&self) -> bool {
        self.norm.is_none() && self.layers.iter().all(|l| l.iter().all(Option::is_none))
    }
}
