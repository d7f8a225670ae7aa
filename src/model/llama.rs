//! A Llama-architecture decoder (transformers' `LlamaForCausalLM`) with forward and backward
//! written against [`Backend`], and LoRA adapters injected into its projections.
//!
//! Batches are packed without padding ([`SeqSpan`]s over one token axis): attention is causal
//! within a sequence, so every real position gets the logits a right-padded batch would give,
//! and no compute is spent on padding. The LM head runs only on the rows whose next token is a
//! target, which is all the loss needs.

use crate::adapter::{
    AdaLoraLayer, Adapter, AdapterSaved, BaseWeight, DoraLayer, Linear, LoraConfig, LoraLayer,
    MethodKind, VeraLayer, VeraShared,
};
use crate::backend::{AttentionSaved, Backend, SeqSpan, Tensor};
use crate::error::{Error, Result};
use crate::model::LlamaConfig;
use crate::quant::nf4::quantize_nf4;
use std::collections::HashMap;

/// The seven projections of a Llama block, named as transformers names the modules.
pub const PROJ_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Index of each projection in [`Block::proj`].
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The module path of projection `p` in layer `l` (`model.layers.{l}.self_attn.q_proj`).
pub fn proj_path(layer: usize, p: usize) -> String {
    let group = if p <= O { "self_attn" } else { "mlp" };
    format!("model.layers.{layer}.{group}.{}", PROJ_NAMES[p])
}

/// A projection: a base linear layer and, optionally, an adapter on it.
#[derive(Clone, Debug)]
pub struct Proj<B: Backend> {
    pub base: Linear<B>,
    pub adapter: Option<Adapter<B>>,
}

/// What a projection's forward keeps for its backward.
enum ProjSaved<B: Backend> {
    Base,
    Adapter(AdapterSaved<B>),
}

impl<B: Backend> Proj<B> {
    fn forward(
        &self,
        be: &B,
        shared: Option<&VeraShared<B>>,
        x: &Tensor<B>,
    ) -> Result<(Tensor<B>, ProjSaved<B>)> {
        match &self.adapter {
            Some(a) => {
                let (y, s) = a.forward(be, &self.base, shared, x)?;
                Ok((y, ProjSaved::Adapter(s)))
            }
            None => Ok((self.base.forward(be, x)?, ProjSaved::Base)),
        }
    }

    /// Returns dx; pushes the adapter's gradients (named `{path}.{suffix}`) and, when the
    /// base weight is trained, `{path}.weight`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        be: &B,
        shared: Option<&VeraShared<B>>,
        path: &str,
        train_base: bool,
        x: &Tensor<B>,
        saved: &ProjSaved<B>,
        dy: &Tensor<B>,
        grads: &mut Vec<(String, Tensor<B>)>,
    ) -> Result<Tensor<B>> {
        if train_base {
            let BaseWeight::Dense(w) = &self.base.weight else {
                return Err(Error::arg(
                    path,
                    "only a dense base weight can be trained (full fine-tuning)",
                ));
            };
            let mut dw = be.zeros(w.shape())?;
            be.linear_backward_weight(dy, x, &mut dw)?;
            grads.push((format!("{path}.weight"), dw));
        }
        match (&self.adapter, saved) {
            (Some(a), ProjSaved::Adapter(s)) => {
                let (dx, g) = a.backward(be, &self.base, shared, x, s, dy)?;
                for ((suffix, _), t) in a.params().into_iter().zip(g) {
                    grads.push((format!("{path}.{suffix}"), t));
                }
                Ok(dx)
            }
            _ => self.base.backward_input(be, dy),
        }
    }
}

/// Yields one f32 tensor `(data, shape)` by its transformers name.
pub type TensorSource<'a> = dyn FnMut(&str) -> Result<(Vec<f32>, Vec<usize>)> + 'a;

/// How projection weights are quantized for QLoRA: bitsandbytes NF4 with `blocksize`
/// (64 in QLoRA) and double quantization of the absmax.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nf4Spec {
    pub blocksize: usize,
    pub double_quant: bool,
}

impl Default for Nf4Spec {
    /// QLoRA's setting: blocksize 64 with double quantization.
    fn default() -> Self {
        Nf4Spec {
            blocksize: 64,
            double_quant: true,
        }
    }
}

/// Full fine-tuning: which base tensors are trained (Howard & Ruder 2018's gradual
/// unfreezing is `trainable_from` moving down over training).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FullFinetune {
    /// Keep `embed_tokens` (and the tied LM head) frozen.
    pub freeze_embeddings: bool,
    /// Layers `trainable_from..` (and the final norm) are trained; layers below are frozen.
    /// 0 trains every layer (and the embeddings unless frozen).
    pub trainable_from: usize,
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Block<B: Backend> {
    pub input_layernorm: Tensor<B>,
    pub post_attention_layernorm: Tensor<B>,
    /// q, k, v, o, gate, up, down (order of [`PROJ_NAMES`]).
    pub proj: [Proj<B>; 7],
}

/// The model: embedding, blocks, final norm, LM head (tied to the embedding when `None`).
#[derive(Clone, Debug)]
pub struct Llama<B: Backend> {
    pub cfg: LlamaConfig,
    pub embed_tokens: Tensor<B>,
    pub layers: Vec<Block<B>>,
    pub norm: Tensor<B>,
    pub lm_head: Option<Tensor<B>>,
    /// VeRA's frozen projections shared by every layer (`vera_A [r, max_in]`,
    /// `vera_B [max_out, r]`), when VeRA adapters are attached.
    pub vera_shared: Option<VeraShared<B>>,
    /// Set for full fine-tuning: base tensors that are trained.
    pub full_finetune: Option<FullFinetune>,
}

/// A packed batch: token ids of all sequences back to back, their spans, and the loss targets.
#[derive(Clone, Debug, Default)]
pub struct PackedBatch {
    /// Token ids `[T]`.
    pub ids: Vec<u32>,
    /// Position of each token within its sequence `[T]`.
    pub positions: Vec<u32>,
    /// The sequences.
    pub seqs: Vec<SeqSpan>,
    /// Rows whose logits are scored (row t scores the token at t+1 of the same sequence).
    pub target_rows: Vec<u32>,
    /// The label of each target row.
    pub target_labels: Vec<i32>,
}

impl PackedBatch {
    /// Packs sequences `(input_ids, labels)` with labels `-100` on ignored tokens (the
    /// transformers convention, shifted here: logits at t score label t+1).
    /// Errors: ids and labels of different lengths, or an empty sequence.
    pub fn from_examples<'a>(
        examples: impl IntoIterator<Item = (&'a [u32], &'a [i32])>,
    ) -> Result<Self> {
        let mut b = PackedBatch::default();
        for (i, (ids, labels)) in examples.into_iter().enumerate() {
            if ids.len() != labels.len() || ids.is_empty() {
                return Err(Error::arg(
                    "examples",
                    format!(
                        "example {i}: {} ids and {} labels (need equal and non-zero)",
                        ids.len(),
                        labels.len()
                    ),
                ));
            }
            let start = b.ids.len();
            b.seqs.push(SeqSpan {
                start,
                len: ids.len(),
            });
            b.ids.extend_from_slice(ids);
            b.positions.extend(0..ids.len() as u32);
            for t in 0..ids.len() - 1 {
                if labels[t + 1] >= 0 {
                    b.target_rows.push((start + t) as u32);
                    b.target_labels.push(labels[t + 1]);
                }
            }
        }
        Ok(b)
    }

    /// Number of tokens (all sequences).
    pub fn n_tokens(&self) -> usize {
        self.ids.len()
    }
    /// Number of scored targets.
    pub fn n_targets(&self) -> usize {
        self.target_rows.len()
    }
}

/// Activations of one layer kept for the backward pass.
struct LayerCache<B: Backend> {
    x: Tensor<B>,
    xn1: Tensor<B>,
    rstd1: Tensor<B>,
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    att: AttentionSaved<B>,
    x2: Tensor<B>,
    xn2: Tensor<B>,
    rstd2: Tensor<B>,
    gate: Tensor<B>,
    up: Tensor<B>,
    act: Tensor<B>,
    /// What each projection's forward kept.
    saved: [ProjSaved<B>; 7],
}

/// Output of a training forward + backward with the loss still on the device
/// ([`Llama::loss_and_grads_deferred`]).
pub struct DeferredLossAndGrads<B: Backend> {
    /// Per-target cross-entropy statistics `[n_targets, 3]` (see
    /// [`Backend::cross_entropy_stats`]); [`crate::backend::cross_entropy_loss`] of their
    /// download is the sum of cross-entropy over the batch's targets.
    pub loss_stats: Tensor<B>,
    /// Number of targets.
    pub n_targets: usize,
    /// Gradients of the mean loss, in the order of [`Llama::trainable_params`].
    pub grads: Vec<Tensor<B>>,
}

/// Output of a training forward + backward.
pub struct LossAndGrads<B: Backend> {
    /// Sum of cross-entropy over the batch's targets.
    pub loss_sum: f64,
    /// Number of targets.
    pub n_targets: usize,
    /// Gradients of the mean loss, in the order of [`Llama::trainable_params`].
    pub grads: Vec<Tensor<B>>,
    /// Orthogonality regularizer value added to the loss (AdaLoRA), 0 otherwise.
    pub reg: f64,
}

impl<B: Backend> Llama<B> {
    /// Builds the model from tensors named as transformers names them (`model.embed_tokens.weight`,
    /// `model.layers.N.self_attn.q_proj.weight`, ..., `model.norm.weight`, optionally
    /// `lm_head.weight`), each `(data, shape)` in f32 row-major; q/k rows in transformers' order.
    /// Errors: a missing tensor or a shape that disagrees with `cfg`.
    pub fn from_tensors(
        be: &B,
        cfg: LlamaConfig,
        mut tensors: HashMap<String, (Vec<f32>, Vec<usize>)>,
    ) -> Result<Self> {
        Self::from_source(
            be,
            cfg,
            &mut |name| {
                tensors.remove(name).ok_or_else(|| Error::Missing {
                    path: "model tensors".into(),
                    name: name.to_string(),
                })
            },
            None,
        )
    }

    /// Builds the model from a source that yields each tensor by its transformers name, one at
    /// a time. With `nf4`, every projection weight is quantized to NF4 as soon as it is read
    /// (QLoRA's frozen base), so the f32 copy of only one projection exists at any moment.
    /// Errors: a missing tensor, a shape that disagrees with `cfg`, NaN/Inf in a quantized
    /// weight.
    pub fn from_source(
        be: &B,
        cfg: LlamaConfig,
        source: &mut TensorSource<'_>,
        nf4: Option<Nf4Spec>,
    ) -> Result<Self> {
        validate_config(&cfg)?;
        let d = cfg.hidden_size;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let qd = cfg.num_attention_heads * cfg.head_dim;
        let inter = cfg.intermediate_size;
        let mut fetch = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let (data, s) = source(name)?;
            if s != shape {
                return Err(Error::shape(name, format!("{shape:?}"), &s));
            }
            Ok(data)
        };
        macro_rules! take {
            ($name:expr, $shape:expr $(,)?) => {{
                let shape: &[usize] = $shape;
                be.upload(&fetch($name, shape)?, shape)
            }};
        }
        let embed_tokens = take!("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let shapes: [[usize; 2]; 7] = [
                [qd, d],
                [kv, d],
                [kv, d],
                [d, qd],
                [inter, d],
                [inter, d],
                [d, inter],
            ];
            let mut projs = Vec::with_capacity(7);
            for (p, shape) in shapes.iter().enumerate() {
                let name = format!("{}.weight", proj_path(l, p));
                let base = match nf4 {
                    None => Linear::dense(take!(&name, shape)?)?,
                    Some(q) => {
                        let w = fetch(&name, shape)?;
                        let t = quantize_nf4(&w, shape, q.blocksize, q.double_quant)
                            .map_err(|e| Error::arg(name.as_str(), e.to_string()))?;
                        Linear::nf4(be, &t)?
                    }
                };
                projs.push(Proj {
                    base,
                    adapter: None,
                });
            }
            let Ok(proj) = <[Proj<B>; 7]>::try_from(projs) else {
                unreachable!("seven projections pushed above")
            };
            layers.push(Block {
                input_layernorm: take!(&format!("model.layers.{l}.input_layernorm.weight"), &[d])?,
                post_attention_layernorm: take!(
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &[d],
                )?,
                proj,
            });
        }
        let norm = take!("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(take!("lm_head.weight", &[cfg.vocab_size, d])?)
        };
        Ok(Llama {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            vera_shared: None,
            full_finetune: None,
        })
    }

    /// Per-projection seed derived from the run seed.
    fn proj_seed(seed: u64, l: usize, p: usize) -> u64 {
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((l * 7 + p) as u64)
    }

    /// Injects LoRA adapters (PEFT's default init, seeded) into every projection named in
    /// `cfg.target_modules`. Errors: invalid config, or a target name that is not one of
    /// [`PROJ_NAMES`].
    pub fn add_lora(&mut self, be: &B, cfg: &LoraConfig, seed: u64) -> Result<()> {
        self.add_adapters(be, MethodKind::Lora, cfg, seed)
    }

    /// Injects adapters of `method` into every projection named in `cfg.target_modules`, with
    /// each method's PEFT init (seeded; not torch's stream):
    /// - LoRA: `lora_A` kaiming-uniform, `lora_B = 0`;
    /// - DoRA: LoRA's init and `m = ||W0||_row`;
    /// - VeRA: shared `vera_A [r, max_in]`, `vera_B [max_out, r]` over the targeted layers,
    ///   `vera_lambda_b = 0`, `vera_lambda_d = d_initial` (`cfg.lora_alpha` is unused);
    /// - AdaLoRA: `init_r = cfg.r`, `lora_E = 0`, A and B N(0, 0.02), scaling `lora_alpha`.
    ///
    /// Errors: invalid config, an unknown target name.
    pub fn add_adapters(
        &mut self,
        be: &B,
        method: MethodKind,
        cfg: &LoraConfig,
        seed: u64,
    ) -> Result<()> {
        self.add_adapters_with(be, method, cfg, seed, 0.1)
    }

    /// [`Llama::add_adapters`] with VeRA's `d_initial` given.
    pub fn add_adapters_with(
        &mut self,
        be: &B,
        method: MethodKind,
        cfg: &LoraConfig,
        seed: u64,
        vera_d_initial: f32,
    ) -> Result<()> {
        cfg.validate()?;
        let targets = target_indices(&cfg.target_modules)?;
        if method == MethodKind::Vera {
            let max_in = targets
                .iter()
                .map(|&p| self.layers[0].proj[p].base.in_features())
                .max()
                .unwrap_or(0);
            let max_out = targets
                .iter()
                .map(|&p| self.layers[0].proj[p].base.out_features())
                .max()
                .unwrap_or(0);
            self.vera_shared = Some(VeraShared::init(be, cfg.r, max_in, max_out, seed)?);
        }
        for (l, block) in self.layers.iter_mut().enumerate() {
            for &p in &targets {
                let proj = &mut block.proj[p];
                let s = Self::proj_seed(seed, l, p);
                let (inp, out) = (proj.base.in_features(), proj.base.out_features());
                proj.adapter = Some(match method {
                    MethodKind::Lora => Adapter::Lora(LoraLayer::init(be, inp, out, cfg, s)?),
                    MethodKind::Dora => Adapter::Dora(DoraLayer::init(be, &proj.base, cfg, s)?),
                    MethodKind::Vera => {
                        let shared = self.vera_shared.as_ref().ok_or_else(|| {
                            Error::arg("vera_A", "VeRA projections were not created")
                        })?;
                        Adapter::Vera(VeraLayer::init(be, shared, &proj.base, vera_d_initial)?)
                    }
                    MethodKind::AdaLora => Adapter::AdaLora(AdaLoraLayer::init(
                        be,
                        &proj.base,
                        cfg.r,
                        cfg.lora_alpha,
                        s,
                    )?),
                });
            }
        }
        Ok(())
    }

    /// Removes every adapter.
    pub fn remove_adapters(&mut self) {
        for b in &mut self.layers {
            for p in &mut b.proj {
                p.adapter = None;
            }
        }
        self.vera_shared = None;
    }

    /// Quantizes every dense projection weight to NF4 in place (QLoRA's frozen base).
    /// Adapters already attached keep working (they run over either base).
    pub fn quantize_bases(&mut self, be: &B, spec: Nf4Spec) -> Result<()> {
        for (l, b) in self.layers.iter_mut().enumerate() {
            for (p, proj) in b.proj.iter_mut().enumerate() {
                if let BaseWeight::Dense(w) = &proj.base.weight {
                    let data = be.download(w)?;
                    let t = quantize_nf4(&data, w.shape(), spec.blocksize, spec.double_quant)
                        .map_err(|e| Error::arg(proj_path(l, p), e.to_string()))?;
                    proj.base = Linear {
                        bias: proj.base.bias.take(),
                        ..Linear::nf4(be, &t)?
                    };
                }
            }
        }
        Ok(())
    }

    /// Marks every dense projection weight frozen ([`Backend::freeze`]): on a backend that
    /// stores frozen weights narrower (wgpu with `SHADER_F16`: f16) they are converted, halving
    /// their memory; elsewhere nothing changes. For adapter training only: a frozen weight
    /// cannot be trained (full fine-tuning) or merged into in place on such a backend.
    pub fn freeze_bases(&mut self, be: &B) -> Result<()> {
        for b in &mut self.layers {
            for proj in &mut b.proj {
                if let BaseWeight::Dense(w) = &mut proj.base.weight {
                    let t = std::mem::replace(w, be.zeros(&[0])?);
                    *w = be.freeze(t)?;
                }
            }
        }
        Ok(())
    }

    /// Bytes held by the projection base weights (NF4, f32 or f16).
    pub fn base_weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|b| b.proj.iter())
            .map(|p| p.base.bytes())
            .sum()
    }

    /// Whether base layer `l`'s tensors are trained.
    fn layer_trained(&self, l: usize) -> bool {
        self.full_finetune.is_some_and(|f| l >= f.trainable_from)
    }

    /// Whether the embedding (and a tied LM head) is trained.
    fn embeddings_trained(&self) -> bool {
        self.full_finetune
            .is_some_and(|f| !f.freeze_embeddings && f.trainable_from == 0)
    }

    /// The trainable tensors, named as transformers/PEFT name them (`model.layers.0.self_attn.
    /// q_proj.lora_A.weight`, `model.embed_tokens.weight`, ...), in a fixed order: embeddings,
    /// then per layer its norms and base weights (full fine-tuning) and its adapters (PEFT's
    /// suffix order), then the final norm. Gradients come back in this order.
    pub fn trainable_params(&self) -> Vec<(String, &Tensor<B>)> {
        let mut out = Vec::new();
        if self.embeddings_trained() {
            out.push(("model.embed_tokens.weight".to_string(), &self.embed_tokens));
        }
        for (l, b) in self.layers.iter().enumerate() {
            let full = self.layer_trained(l);
            if full {
                out.push((
                    format!("model.layers.{l}.input_layernorm.weight"),
                    &b.input_layernorm,
                ));
                out.push((
                    format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &b.post_attention_layernorm,
                ));
            }
            for (p, proj) in b.proj.iter().enumerate() {
                if full && let BaseWeight::Dense(w) = &proj.base.weight {
                    out.push((format!("{}.weight", proj_path(l, p)), w));
                }
                if let Some(a) = &proj.adapter {
                    for (suffix, t) in a.params() {
                        out.push((format!("{}.{suffix}", proj_path(l, p)), t));
                    }
                }
            }
        }
        if self.full_finetune.is_some() {
            out.push(("model.norm.weight".to_string(), &self.norm));
        }
        out
    }

    /// Mutable access to the trainable tensors, same order as [`Llama::trainable_params`].
    pub fn trainable_params_mut(&mut self) -> Vec<&mut Tensor<B>> {
        let emb = self.embeddings_trained();
        let full: Vec<bool> = (0..self.layers.len())
            .map(|l| self.layer_trained(l))
            .collect();
        let norm = self.full_finetune.is_some();
        let mut out = Vec::new();
        if emb {
            out.push(&mut self.embed_tokens);
        }
        for (l, b) in self.layers.iter_mut().enumerate() {
            if full[l] {
                out.push(&mut b.input_layernorm);
                out.push(&mut b.post_attention_layernorm);
            }
            for proj in &mut b.proj {
                if full[l]
                    && let BaseWeight::Dense(w) = &mut proj.base.weight
                {
                    out.push(w);
                }
                if let Some(a) = &mut proj.adapter {
                    out.extend(a.params_mut());
                }
            }
        }
        if norm {
            out.push(&mut self.norm);
        }
        out
    }

    /// Number of trainable parameters.
    pub fn n_trainable(&self) -> usize {
        self.trainable_params().iter().map(|(_, t)| t.len()).sum()
    }

    /// Number of parameters of the base model (tied head counted once).
    pub fn n_base_params(&self) -> usize {
        let mut n = self.embed_tokens.len() + self.norm.len();
        n += self.lm_head.as_ref().map_or(0, |t| t.len());
        for b in &self.layers {
            n += b.input_layernorm.len() + b.post_attention_layernorm.len();
            for p in &b.proj {
                let (o, i) = p.base.weight.dims();
                n += o * i;
            }
        }
        n
    }

    fn head(&self) -> &Tensor<B> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Runs the decoder over a packed batch, returning the final residual stream `[T, d]` and,
    /// when `keep` is set, every layer's saved activations.
    fn decoder(
        &self,
        be: &B,
        batch: &PackedBatch,
        keep: bool,
    ) -> Result<(Tensor<B>, Vec<LayerCache<B>>)> {
        let c = &self.cfg;
        let mut x = be.gather_rows(&self.embed_tokens, &batch.ids)?;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let mut caches = Vec::with_capacity(if keep { self.layers.len() } else { 0 });
        let sh = self.vera_shared.as_ref();
        for b in &self.layers {
            let (xn1, rstd1) = be.rmsnorm(&x, &b.input_layernorm, c.rms_norm_eps)?;
            let (mut q, hq) = b.proj[Q].forward(be, sh, &xn1)?;
            let (mut k, hk) = b.proj[K].forward(be, sh, &xn1)?;
            let (v, hv) = b.proj[V].forward(be, sh, &xn1)?;
            be.rope(&mut q, &batch.positions, c.head_dim, c.rope_theta, false)?;
            be.rope(&mut k, &batch.positions, c.head_dim, c.rope_theta, false)?;
            let att = be.attention(
                &q,
                &k,
                &v,
                &batch.seqs,
                c.num_attention_heads,
                c.num_key_value_heads,
                scale,
            )?;
            let (o, ho) = b.proj[O].forward(be, sh, &att.out)?;
            let mut x2 = o;
            be.axpy(&mut x2, 1.0, &x)?;
            let (xn2, rstd2) = be.rmsnorm(&x2, &b.post_attention_layernorm, c.rms_norm_eps)?;
            let (gate, hg) = b.proj[GATE].forward(be, sh, &xn2)?;
            let (up, hu) = b.proj[UP].forward(be, sh, &xn2)?;
            let act = be.swiglu(&gate, &up)?;
            let (down, hd) = b.proj[DOWN].forward(be, sh, &act)?;
            let mut x3 = down;
            be.axpy(&mut x3, 1.0, &x2)?;
            if keep {
                caches.push(LayerCache {
                    x,
                    xn1,
                    rstd1,
                    q,
                    k,
                    v,
                    att,
                    x2,
                    xn2,
                    rstd2,
                    gate,
                    up,
                    act,
                    saved: [hq, hk, hv, ho, hg, hu, hd],
                });
            }
            x = x3;
        }
        Ok((x, caches))
    }

    /// Logits `[rows.len(), vocab]` at the given rows of a packed batch (eval mode).
    pub fn logits_at(&self, be: &B, batch: &PackedBatch, rows: &[u32]) -> Result<Tensor<B>> {
        let (x, _) = self.decoder(be, batch, false)?;
        let sel = be.gather_rows(&x, rows)?;
        let (hn, _) = be.rmsnorm(&sel, &self.norm, self.cfg.rms_norm_eps)?;
        be.linear(&hn, self.head(), None)
    }

    /// Final hidden state (after the final RMSNorm) `[rows.len(), d]` at the given rows.
    pub fn final_hidden_at(&self, be: &B, batch: &PackedBatch, rows: &[u32]) -> Result<Tensor<B>> {
        let (x, _) = self.decoder(be, batch, false)?;
        let sel = be.gather_rows(&x, rows)?;
        Ok(be.rmsnorm(&sel, &self.norm, self.cfg.rms_norm_eps)?.0)
    }

    /// Sum of cross-entropy over the batch's targets and their count (eval mode, no grads).
    pub fn loss(&self, be: &B, batch: &PackedBatch) -> Result<(f64, usize)> {
        if batch.n_targets() == 0 {
            return Ok((0.0, 0));
        }
        let logits = self.logits_at(be, batch, &batch.target_rows)?;
        let (sum, _) = be.cross_entropy(&logits, &batch.target_labels, 0.0)?;
        Ok((sum, batch.n_targets()))
    }

    /// Forward and backward of the token-weighted mean cross-entropy over the batch's targets.
    /// Gradients flow to the trainable tensors only ([`Llama::trainable_params`]): the
    /// adapters, and with full fine-tuning the base tensors too. Errors: no target in the
    /// batch, a trained base weight that is not dense.
    pub fn loss_and_grads(&self, be: &B, batch: &PackedBatch) -> Result<LossAndGrads<B>> {
        let out = self.loss_and_grads_deferred(be, batch)?;
        let stats = be.download(&out.loss_stats)?;
        Ok(LossAndGrads {
            loss_sum: crate::backend::cross_entropy_loss(&stats),
            n_targets: out.n_targets,
            grads: out.grads,
            reg: 0.0,
        })
    }

    /// [`Llama::loss_and_grads`] with the loss left on the device, so that the caller reads it
    /// back once with whatever else the step computed (the trainer: with AdaLoRA's
    /// regularizer). Nothing is read back. Errors: as [`Llama::loss_and_grads`].
    pub fn loss_and_grads_deferred(
        &self,
        be: &B,
        batch: &PackedBatch,
    ) -> Result<DeferredLossAndGrads<B>> {
        let n = batch.n_targets();
        if n == 0 {
            return Err(Error::Data("batch has no target token".into()));
        }
        let c = &self.cfg;
        let sh = self.vera_shared.as_ref();
        let (x, caches) = self.decoder(be, batch, true)?;
        let mut grads: Vec<(String, Tensor<B>)> = Vec::new();
        // Final norm + LM head + CE only on the target rows. The norm is row-wise, so
        // normalizing just those rows equals slicing after a full norm.
        let sel = be.gather_rows(&x, &batch.target_rows)?;
        let (hn, rstd_f) = be.rmsnorm(&sel, &self.norm, c.rms_norm_eps)?;
        let logits = be.linear(&hn, self.head(), None)?;
        let (loss_stats, dlogits) =
            be.cross_entropy_stats(&logits, &batch.target_labels, 1.0 / n as f32)?;
        drop(logits);
        let dhn = be
            .linear_backward_input(&dlogits, self.head(), None)?
            .expect("dx returned without acc");
        let head_trained = match &self.lm_head {
            Some(_) => self.full_finetune.is_some(),
            None => self.embeddings_trained(),
        };
        // With a tied head, dE collects the head's gradient and the embedding's.
        let mut d_embed = if head_trained {
            let mut dw = be.zeros(self.head().shape())?;
            be.linear_backward_weight(&dlogits, &hn, &mut dw)?;
            Some(dw)
        } else {
            None
        };
        drop(dlogits);
        let mut d_norm = match self.full_finetune {
            Some(_) => Some(be.zeros(self.norm.shape())?),
            None => None,
        };
        let dsel = be.rmsnorm_backward(&dhn, &sel, &self.norm, &rstd_f, d_norm.as_mut())?;
        if let Some(g) = d_norm {
            grads.push(("model.norm.weight".into(), g));
        }
        let mut dx = be.zeros(&[batch.n_tokens(), c.hidden_size])?;
        be.scatter_add_rows(&mut dx, &batch.target_rows, &dsel)?;

        // Below the lowest layer with anything trainable, no gradient is needed.
        let lowest = if self.embeddings_trained() {
            0
        } else {
            (0..self.layers.len())
                .find(|&l| {
                    self.layer_trained(l) || self.layers[l].proj.iter().any(|p| p.adapter.is_some())
                })
                .unwrap_or(self.layers.len())
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        for (l, (b, lc)) in self.layers.iter().zip(caches).enumerate().rev() {
            if l < lowest {
                break;
            }
            let full = self.layer_trained(l);
            let path = |p: usize| proj_path(l, p);
            let norm_grad = || -> Result<Option<Tensor<B>>> {
                Ok(if full {
                    Some(be.zeros(&[c.hidden_size])?)
                } else {
                    None
                })
            };
            // MLP: x3 = x2 + down(swiglu(gate(xn2), up(xn2)))
            let bw = |p: usize, x: &Tensor<B>, s: &ProjSaved<B>, dy: &Tensor<B>, g: &mut Vec<_>| {
                b.proj[p].backward(be, sh, &path(p), full, x, s, dy, g)
            };
            let dact = bw(DOWN, &lc.act, &lc.saved[DOWN], &dx, &mut grads)?;
            let (dgate, dup) = be.swiglu_backward(&dact, &lc.gate, &lc.up)?;
            let mut dxn2 = bw(UP, &lc.xn2, &lc.saved[UP], &dup, &mut grads)?;
            let t = bw(GATE, &lc.xn2, &lc.saved[GATE], &dgate, &mut grads)?;
            be.axpy(&mut dxn2, 1.0, &t)?;
            let mut dpost = norm_grad()?;
            let d = be.rmsnorm_backward(
                &dxn2,
                &lc.x2,
                &b.post_attention_layernorm,
                &lc.rstd2,
                dpost.as_mut(),
            )?;
            be.axpy(&mut dx, 1.0, &d)?; // dx is now d(x2)
            // Attention: x2 = x + o_proj(attn(rope(q(xn1)), rope(k(xn1)), v(xn1)))
            let datt = bw(O, &lc.att.out, &lc.saved[O], &dx, &mut grads)?;
            let (mut dq, mut dk, dv) = be.attention_backward(
                &datt,
                &lc.q,
                &lc.k,
                &lc.v,
                &lc.att,
                &batch.seqs,
                c.num_attention_heads,
                c.num_key_value_heads,
                scale,
            )?;
            be.rope(&mut dq, &batch.positions, c.head_dim, c.rope_theta, true)?;
            be.rope(&mut dk, &batch.positions, c.head_dim, c.rope_theta, true)?;
            let mut dxn1 = bw(V, &lc.xn1, &lc.saved[V], &dv, &mut grads)?;
            let t = bw(K, &lc.xn1, &lc.saved[K], &dk, &mut grads)?;
            be.axpy(&mut dxn1, 1.0, &t)?;
            let t = bw(Q, &lc.xn1, &lc.saved[Q], &dq, &mut grads)?;
            be.axpy(&mut dxn1, 1.0, &t)?;
            let mut dinput = norm_grad()?;
            let d =
                be.rmsnorm_backward(&dxn1, &lc.x, &b.input_layernorm, &lc.rstd1, dinput.as_mut())?;
            be.axpy(&mut dx, 1.0, &d)?; // dx is now d(x) of this layer's input
            if let (Some(gi), Some(gp)) = (dinput, dpost) {
                grads.push((format!("model.layers.{l}.input_layernorm.weight"), gi));
                grads.push((
                    format!("model.layers.{l}.post_attention_layernorm.weight"),
                    gp,
                ));
            }
        }
        if self.embeddings_trained() {
            let de = d_embed.get_or_insert(be.zeros(self.embed_tokens.shape())?);
            be.scatter_add_rows(de, &batch.ids, &dx)?;
        }
        match (d_embed, &self.lm_head) {
            (Some(g), None) => grads.push(("model.embed_tokens.weight".into(), g)),
            (Some(g), Some(_)) => grads.push(("lm_head.weight".into(), g)),
            (None, _) => {}
        }
        // Put the gradients in the order of trainable_params().
        let mut by_name: HashMap<String, Tensor<B>> = grads.into_iter().collect();
        let ordered = self
            .trainable_params()
            .into_iter()
            .map(|(name, _)| {
                by_name.remove(&name).ok_or_else(|| {
                    Error::arg("grads", format!("no gradient was computed for `{name}`"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeferredLossAndGrads {
            loss_stats,
            n_targets: n,
            grads: ordered,
        })
    }

    /// Merges every adapter into its base weight and drops the adapters (PEFT
    /// `merge_and_unload`).
    pub fn merge_and_unload(&mut self, be: &B) -> Result<()> {
        let shared = self.vera_shared.take();
        for b in &mut self.layers {
            for p in &mut b.proj {
                if let Some(mut a) = p.adapter.take() {
                    a.merge(be, &mut p.base, shared.as_ref())?;
                }
            }
        }
        Ok(())
    }

    /// Greedy decoding: appends up to `max_new` tokens to `prompt`, stopping after `eos`.
    /// Recomputes the whole prefix for each token (no KV cache): plain, and fast enough for
    /// the short answers of a 135M model on the CPU.
    pub fn generate_greedy(
        &self,
        be: &B,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::arg("prompt", "empty prompt"));
        }
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let labels = vec![-100i32; ids.len()];
            let batch = PackedBatch::from_examples([(&ids[..], &labels[..])])?;
            let logits = be.download(&self.logits_at(be, &batch, &[(ids.len() - 1) as u32])?)?;
            let next = argmax(&logits) as u32;
            out.push(next);
            if next == eos {
                break;
            }
            ids.push(next);
        }
        Ok(out)
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Maps target module names to projection indices. Accepts the PEFT names (`q_proj`) and the
/// short forms (`q`, `k`, `v`, `o`, `gate`, `up`, `down`). Errors: an unknown name.
pub fn target_indices(names: &[String]) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for n in names {
        let n = n.trim();
        let idx = PROJ_NAMES
            .iter()
            .position(|p| *p == n || p.strip_suffix("_proj") == Some(n))
            .ok_or_else(|| {
                Error::arg(
                    "target_modules",
                    format!("unknown target module `{n}`; expected one of {PROJ_NAMES:?}"),
                )
            })?;
        if !out.contains(&idx) {
            out.push(idx);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn validate_config(c: &LlamaConfig) -> Result<()> {
    let bad = |m: String| Err(Error::arg("config", m));
    if c.num_attention_heads == 0
        || c.num_key_value_heads == 0
        || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
    {
        return bad(format!(
            "{} attention heads is not a multiple of {} kv heads",
            c.num_attention_heads, c.num_key_value_heads
        ));
    }
    if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
        return bad(format!("head_dim {} must be even and non-zero", c.head_dim));
    }
    if c.vocab_size == 0 || c.hidden_size == 0 || c.intermediate_size == 0 {
        return bad("zero-sized dimension".into());
    }
    Ok(())
}

/// A small random Llama for tests and examples (no download): weights N(0, 0.02)-like uniform,
/// norms 1, tied head. Deterministic for `seed`.
pub fn random_tensors(cfg: &LlamaConfig, seed: u64) -> HashMap<String, (Vec<f32>, Vec<usize>)> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut m = HashMap::new();
    let mut rand_t = |shape: Vec<usize>, std: f32| -> (Vec<f32>, Vec<usize>) {
        let n: usize = shape.iter().product();
        let b = std * 3f32.sqrt();
        ((0..n).map(|_| rng.random_range(-b..b)).collect(), shape)
    };
    let d = cfg.hidden_size;
    let qd = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let i = cfg.intermediate_size;
    m.insert(
        "model.embed_tokens.weight".to_string(),
        rand_t(vec![cfg.vocab_size, d], 0.5),
    );
    for l in 0..cfg.num_hidden_layers {
        let shapes = [[qd, d], [kv, d], [kv, d], [d, qd], [i, d], [i, d], [d, i]];
        for (p, s) in shapes.iter().enumerate() {
            let std = 1.0 / (s[1] as f32).sqrt();
            m.insert(
                format!("{}.weight", proj_path(l, p)),
                rand_t(s.to_vec(), std),
            );
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            let (mut w, s) = rand_t(vec![d], 0.1);
            w.iter_mut().for_each(|x| *x += 1.0);
            m.insert(format!("model.layers.{l}.{n}.weight"), (w, s));
        }
    }
    m.insert("model.norm.weight".to_string(), (vec![1.0; d], vec![d]));
    if !cfg.tie_word_embeddings {
        m.insert(
            "lm_head.weight".to_string(),
            rand_t(vec![cfg.vocab_size, d], 0.1),
        );
    }
    m
}
