//! Soft prompts: trainable virtual tokens in front of the input, as PEFT's prompt learning
//! methods put them.
//!
//! - Prompt tuning (Lester et al. 2021, sec. 2): `embedding.weight [nvt, hidden]`, prepended to
//!   the input embeddings.
//! - P-tuning (Liu et al. 2021, sec. 3): the same embeddings passed through an MLP encoder
//!   (`mlp_head`), whose output is prepended.
//! - Prefix tuning (Li & Liang 2021, sec. 4; P-tuning v2): per-layer keys and values in front of
//!   every attention's own, `P [nvt, 2 L kv_dim]` read as `[nvt, 2L, kv_heads, head_dim]`
//!   (slot `2l` the keys of layer l, `2l + 1` its values), without RoPE; P is the embedding
//!   itself or its projection (`transform`: Linear, tanh, Linear).
//!
//! PEFT saves the prompt's output only (`prompt_embeddings`), never the encoder.

use super::mlp::{Mlp, MlpSaved};
use crate::backend::{Activation, Backend, Tensor};
use crate::error::{Error, Result};
use rand::SeedableRng;
use rand_distr_normal::standard_normal;

/// Which prompt-learning method (PEFT's `peft_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptMethod {
    /// `PROMPT_TUNING`.
    PromptTuning,
    /// `P_TUNING` (the MLP encoder).
    PTuning,
    /// `PREFIX_TUNING`.
    PrefixTuning,
}

impl PromptMethod {
    /// PEFT's `peft_type`.
    pub fn peft_type(self) -> &'static str {
        match self {
            PromptMethod::PromptTuning => "PROMPT_TUNING",
            PromptMethod::PTuning => "P_TUNING",
            PromptMethod::PrefixTuning => "PREFIX_TUNING",
        }
    }
    /// Whether the virtual tokens enter the residual stream (prompt tuning, P-tuning) rather
    /// than only the attention's keys and values (prefix tuning).
    pub fn prepends_tokens(self) -> bool {
        self != PromptMethod::PrefixTuning
    }
}

/// A trained soft prompt.
#[derive(Clone, Debug)]
pub struct SoftPrompt<B: Backend> {
    pub method: PromptMethod,
    /// `embedding.weight [nvt, token_dim]`.
    pub embedding: Tensor<B>,
    /// P-tuning's `mlp_head` or prefix tuning's `transform`, when present.
    pub encoder: Option<Mlp<B>>,
}

/// What [`SoftPrompt::output`] keeps for the backward.
pub struct PromptSaved<B: Backend>(Option<MlpSaved<B>>);

/// N(0, 1) values from a seeded generator (Box-Muller; torch's `nn.Embedding` init is N(0, 1)).
mod rand_distr_normal {
    use rand::RngExt;
    pub fn standard_normal(rng: &mut impl rand::Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                let u2: f64 = rng.random_range(0.0..1.0);
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }
}

impl<B: Backend> SoftPrompt<B> {
    /// A new prompt with PEFT's initial values drawn from our own seeded generator: the
    /// embedding N(0, 1) (PEFT's RANDOM init, `nn.Embedding`'s), or `init_embedding` (TEXT
    /// init: the embeddings of the init text's tokens, already repeated or cut to nvt rows);
    /// P-tuning's encoder `token_dim -> h -> h -> token_dim` with ReLU, prefix tuning's
    /// projection `token_dim -> h -> out_dim` with tanh when `encoder_hidden` is given
    /// (`prefix_projection`). `token_dim` is the hidden size for prompt and P-tuning and
    /// `kv_heads * head_dim` for prefix tuning; `out_dim` is `2 L kv_dim` (prefix) or
    /// `token_dim`. Prefix tuning without projection trains `P [nvt, out_dim]` itself. Errors: zero sizes, an init embedding of the wrong shape, P-tuning without
    /// an encoder width.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        be: &B,
        method: PromptMethod,
        num_virtual_tokens: usize,
        token_dim: usize,
        out_dim: usize,
        encoder_hidden: Option<usize>,
        init_embedding: Option<Vec<f32>>,
        seed: u64,
    ) -> Result<Self> {
        if num_virtual_tokens == 0 || token_dim == 0 {
            return Err(Error::arg(
                "num_virtual_tokens",
                "a soft prompt needs at least one virtual token of non-zero width",
            ));
        }
        // Prefix tuning without projection trains P itself: the embedding is P's width.
        let width = if method == PromptMethod::PrefixTuning && encoder_hidden.is_none() {
            out_dim
        } else {
            token_dim
        };
        let n = num_virtual_tokens * width;
        let data = match init_embedding {
            Some(d) if d.len() == n => d,
            Some(d) => {
                return Err(Error::arg(
                    "prompt_tuning_init_text",
                    format!("{} values for [{num_virtual_tokens}, {width}]", d.len()),
                ));
            }
            None => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                standard_normal(&mut rng, n)
            }
        };
        let embedding = be.upload(&data, &[num_virtual_tokens, width])?;
        let encoder = match (method, encoder_hidden) {
            (PromptMethod::PromptTuning, _) => None,
            (PromptMethod::PTuning, Some(h)) => Some(Mlp::init(
                be,
                &[token_dim, h, h, token_dim],
                Activation::Relu,
                seed ^ 0x5050,
            )?),
            (PromptMethod::PTuning, None) => {
                return Err(Error::arg(
                    "encoder_hidden_size",
                    "P-tuning needs its MLP width",
                ));
            }
            (PromptMethod::PrefixTuning, Some(h)) => Some(Mlp::init(
                be,
                &[token_dim, h, out_dim],
                Activation::Tanh,
                seed ^ 0x5050,
            )?),
            (PromptMethod::PrefixTuning, None) => None,
        };
        let p = SoftPrompt {
            method,
            embedding,
            encoder,
        };
        p.validate(out_dim)?;
        Ok(p)
    }

    /// Number of virtual tokens.
    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.dim(0)
    }

    /// Width of the embedding (`token_dim`).
    pub fn token_dim(&self) -> usize {
        self.embedding.dim(1)
    }

    /// Checks the shapes against the width the model needs from [`SoftPrompt::output`]
    /// (`hidden` for prompt and P-tuning, `2 L kv_dim` for prefix tuning). Errors naming the
    /// mismatch.
    pub fn validate(&self, out_dim: usize) -> Result<()> {
        self.embedding.dims2("prompt_encoder.embedding.weight")?;
        let got = match &self.encoder {
            Some(m) => {
                m.validate()?;
                let (i, o) = m.dims();
                if i != self.token_dim() {
                    return Err(Error::arg(
                        "prompt_encoder",
                        format!(
                            "encoder input {i} is not the embedding width {}",
                            self.token_dim()
                        ),
                    ));
                }
                o
            }
            None => self.token_dim(),
        };
        if got != out_dim {
            return Err(Error::arg(
                "prompt_embeddings",
                format!(
                    "the prompt is {got} wide; this model needs {out_dim} ({})",
                    if self.method == PromptMethod::PrefixTuning {
                        "2 x layers x key/value width"
                    } else {
                        "its hidden size"
                    }
                ),
            ));
        }
        Ok(())
    }

    /// The prompt the model uses, `[nvt, out_dim]`: the embedding, or the encoder's output.
    pub fn output(&self, be: &B) -> Result<(Tensor<B>, PromptSaved<B>)> {
        match &self.encoder {
            None => Ok((self.embedding.clone(), PromptSaved(None))),
            Some(m) => {
                let (y, s) = m.forward(be, &self.embedding)?;
                Ok((y, PromptSaved(Some(s))))
            }
        }
    }

    /// Gradients of [`SoftPrompt::params`] from `d_output [nvt, out_dim]`.
    pub fn backward(
        &self,
        be: &B,
        saved: &PromptSaved<B>,
        d_output: &Tensor<B>,
    ) -> Result<Vec<Tensor<B>>> {
        match (&self.encoder, &saved.0) {
            (None, _) => Ok(vec![d_output.clone()]),
            (Some(m), Some(s)) => {
                let (de, mut g) = m.backward(be, s, d_output)?;
                g.insert(0, de);
                Ok(g)
            }
            (Some(_), None) => Err(Error::arg(
                "saved",
                "the prompt encoder's forward state is missing",
            )),
        }
    }

    /// The trainable tensors with PEFT's names (after `prompt_encoder.<adapter>.`):
    /// `embedding.weight`, then `mlp_head.{0,2,4}.{weight,bias}` (P-tuning) or
    /// `transform.{0,2}.{weight,bias}` (prefix projection).
    pub fn params(&self) -> Vec<(String, &Tensor<B>)> {
        let mut out = vec![("embedding.weight".to_string(), &self.embedding)];
        if let Some(m) = &self.encoder {
            let head = if self.method == PromptMethod::PTuning {
                "mlp_head"
            } else {
                "transform"
            };
            for (i, (w, b)) in m.layers.iter().enumerate() {
                out.push((format!("{head}.{}.weight", 2 * i), w));
                out.push((format!("{head}.{}.bias", 2 * i), b));
            }
        }
        out
    }

    /// Mutable trainable tensors, in the order of [`SoftPrompt::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Tensor<B>> {
        let mut out = vec![&mut self.embedding];
        if let Some(m) = &mut self.encoder {
            for (w, b) in &mut m.layers {
                out.push(w);
                out.push(b);
            }
        }
        out
    }
}
