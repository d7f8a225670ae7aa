//! A Llama-architecture decoder (transformers' `LlamaForCausalLM`) with forward and backward
//! written against [`Backend`]; the adapters injected into its projections are in
//! [`super::inject`], packed batches in [`super::batch`].
//!
//! Batches are packed without padding ([`SeqSpan`](crate::backend::SeqSpan)s over one token axis): attention is causal
//! within a sequence, so every real position gets the logits a right-padded batch would give,
//! and no compute is spent on padding. The LM head runs only on the rows whose next token is a
//! target, which is all the loss needs.

pub use super::heads::HeadGrad;
use crate::adapter::{AdapterFusion, Bottleneck, Linear, LnTuning, SoftPrompt, VeraShared};
use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::model::LlamaConfig;
use crate::model::additive::{AttnSaved, PrefixSource, Prepared, PromptState, SiteSaved};
pub use crate::model::batch::PackedBatch;
pub use crate::model::inject::Proj;
use crate::model::inject::ProjSaved;
use crate::model::multi::MultiLora;
use crate::quant::nf4::quantize_nf4;
use std::collections::HashMap;

/// A head of [`Llama::grads_from_head`] once its value is taken out.
type DynHead<'a, B> = dyn FnMut(&Tensor<B>, bool) -> Result<HeadGrad<B>> + 'a;

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

/// How the frozen dense projection weights are stored under adapters (`--compute-dtype`):
/// f32 as loaded, or bf16 (half the bytes; [`crate::backend::Bf16Weight`]). In both the
/// products accumulate in f32, and the adapter weights, their gradients and AdamW's moments
/// stay f32, as under PEFT with `torch.autocast("cpu", torch.bfloat16)` over bf16 bases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for ComputeDtype {
    type Err = Error;
    /// `f32` (also `float32`) or `bf16` (also `bfloat16`), as torch names them.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(ComputeDtype::F32),
            "bf16" | "bfloat16" => Ok(ComputeDtype::Bf16),
            _ => Err(Error::arg(
                "compute_dtype",
                format!("unknown compute dtype {s:?}: expected f32 or bf16"),
            )),
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
    /// LN tuning: trained copies of norm weights.
    pub ln_tuning: Option<LnTuning<B>>,
    /// Prompt tuning, P-tuning or prefix tuning.
    pub soft_prompt: Option<SoftPrompt<B>>,
    /// Houlsby or Pfeiffer bottleneck adapters (trained).
    pub bottleneck: Option<Bottleneck<B>>,
    /// AdapterFusion over frozen Pfeiffer adapters (trained fusion layers).
    pub fusion: Option<AdapterFusion<B>>,
    /// `LlamaForSequenceClassification`'s `score` head `[num_labels, d]` (no bias), trained in
    /// full: a reward model's (`super::heads`).
    pub score: Option<Tensor<B>>,
    /// Several LoRA adapters trained in one pass, each on the sequences of a batch tagged
    /// with it ([`PackedBatch::adapter_of_seq`]); set with [`Llama::set_multi_lora`].
    pub multi_lora: Option<MultiLora<B>>,
}

/// Activations of one layer kept for the backward pass.
struct LayerCache<B: Backend> {
    x: Tensor<B>,
    xn1: Tensor<B>,
    rstd1: Tensor<B>,
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    att: AttnSaved<B>,
    /// The attention output (the input of o_proj).
    att_out: Tensor<B>,
    att_site: Option<SiteSaved<B>>,
    out_site: Option<SiteSaved<B>>,
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
            ln_tuning: None,
            soft_prompt: None,
            bottleneck: None,
            fusion: None,
            score: None,
            multi_lora: None,
        })
    }

    /// The output projection `[vocab, d]`: `lm_head.weight`, or the embedding when tied.
    pub fn head(&self) -> &Tensor<B> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Runs the decoder over a prepared batch ([`Llama::prepare`]), returning the final
    /// residual stream `[T, d]` and, when `keep` is set, every layer's saved activations.
    fn decoder(
        &self,
        be: &B,
        prep: &Prepared,
        prompt: Option<&PromptState<B>>,
        keep: bool,
    ) -> Result<(Tensor<B>, Vec<LayerCache<B>>)> {
        let c = &self.cfg;
        let batch = &prep.batch;
        let mut x = self.embed_input(be, prep, prompt)?;
        let mut caches = Vec::with_capacity(if keep { self.layers.len() } else { 0 });
        let rows = self.multi_rows(batch)?;
        for l in 0..self.layers.len() {
            let fwd = |p: usize, x: &Tensor<B>| self.proj_forward(be, (l, p), x, rows.as_deref());
            let (xn1, rstd1) = be.rmsnorm(&x, self.layer_norm_weight(l, 0), c.rms_norm_eps)?;
            let (mut q, hq) = fwd(Q, &xn1)?;
            let (mut k, hk) = fwd(K, &xn1)?;
            let (v, hv) = fwd(V, &xn1)?;
            be.rope(&mut q, &batch.positions, c.head_dim, c.rope_theta, false)?;
            be.rope(&mut k, &batch.positions, c.head_dim, c.rope_theta, false)?;
            let (att_out, att) = self.attend(be, l, prep, prompt, &q, &k, &v)?;
            let (o, ho) = fwd(O, &att_out)?;
            let (o, att_site) = self.attention_site(be, l, o, keep)?;
            let mut x2 = o;
            be.axpy(&mut x2, 1.0, &x)?;
            let (xn2, rstd2) = be.rmsnorm(&x2, self.layer_norm_weight(l, 1), c.rms_norm_eps)?;
            let (gate, hg) = fwd(GATE, &xn2)?;
            let (up, hu) = fwd(UP, &xn2)?;
            let act = be.swiglu(&gate, &up)?;
            let (down, hd) = fwd(DOWN, &act)?;
            let (x3, out_site) = self.output_site(be, l, &x2, down, keep)?;
            if keep {
                caches.push(LayerCache {
                    x,
                    xn1,
                    rstd1,
                    q,
                    k,
                    v,
                    att,
                    att_out,
                    att_site,
                    out_site,
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

    /// Logits `[rows.len(), vocab]` at the given rows of a packed batch (eval mode). With a
    /// soft prompt, the rows are the caller's (the virtual tokens are added here).
    pub fn logits_at(&self, be: &B, batch: &PackedBatch, rows: &[u32]) -> Result<Tensor<B>> {
        let prep = self.prepare(batch)?;
        let prompt = self.prompt_state(be)?;
        let (x, _) = self.decoder(be, &prep, prompt.as_ref(), false)?;
        let sel = be.gather_rows(&x, &prep.rows(rows))?;
        let (hn, _) = be.rmsnorm(&sel, self.final_norm_weight(), self.cfg.rms_norm_eps)?;
        be.linear(&hn, self.head(), None)
    }

    /// Logits at every row the model runs, `[T', vocab]`: the batch's rows in order, with a
    /// prompt or P-tuning soft prompt each sequence's virtual tokens first (PEFT's logits of
    /// `[B, nvt + T, V]`, without the padding). Returns them with the sequences' spans.
    pub fn logits_all(
        &self,
        be: &B,
        batch: &PackedBatch,
    ) -> Result<(Tensor<B>, Vec<crate::backend::SeqSpan>)> {
        let prep = self.prepare(batch)?;
        let prompt = self.prompt_state(be)?;
        let (x, _) = self.decoder(be, &prep, prompt.as_ref(), false)?;
        let (x, seqs) = match &prep.virt {
            // The virtual rows ran once; PEFT's layout has them in front of every sequence.
            Some((vrows, _)) => {
                let (mut rows, mut seqs) = (Vec::new(), Vec::with_capacity(batch.seqs.len()));
                for s in &batch.seqs {
                    seqs.push(crate::backend::SeqSpan {
                        start: rows.len(),
                        len: vrows.len() + s.len,
                    });
                    rows.extend_from_slice(vrows);
                    rows.extend((s.start..s.start + s.len).map(|r| prep.row(r as u32)));
                }
                (be.gather_rows(&x, &rows)?, seqs)
            }
            None => (x, prep.batch.seqs.clone()),
        };
        let (hn, _) = be.rmsnorm(&x, self.final_norm_weight(), self.cfg.rms_norm_eps)?;
        Ok((be.linear(&hn, self.head(), None)?, seqs))
    }

    /// Final hidden state (after the final RMSNorm) `[rows.len(), d]` at the given rows.
    pub fn final_hidden_at(&self, be: &B, batch: &PackedBatch, rows: &[u32]) -> Result<Tensor<B>> {
        let prep = self.prepare(batch)?;
        let prompt = self.prompt_state(be)?;
        let (x, _) = self.decoder(be, &prep, prompt.as_ref(), false)?;
        let sel = be.gather_rows(&x, &prep.rows(rows))?;
        Ok(be
            .rmsnorm(&sel, self.final_norm_weight(), self.cfg.rms_norm_eps)?
            .0)
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
        let (grads, loss_stats) =
            self.grads_from_head(be, batch, &batch.target_rows, |hn, head_trained| {
                let logits = be.linear(hn, self.head(), None)?;
                let (stats, dlogits) =
                    be.cross_entropy_stats(&logits, &batch.target_labels, 1.0 / n as f32)?;
                drop(logits);
                Ok((
                    self.lm_head_backward(be, hn, &dlogits, head_trained)?,
                    stats,
                ))
            })?;
        Ok(DeferredLossAndGrads {
            loss_stats,
            n_targets: n,
            grads,
        })
    }

    /// Forward with saved activations, then the backward of any objective of the final normed
    /// hidden state at `rows` of the caller's batch: `head(hn [rows.len(), d], head_trained)`
    /// is called once with those rows (after the final RMSNorm) and returns the objective's
    /// gradient with respect to them (and to the LM head when `head_trained`: full
    /// fine-tuning with the head or the tied embedding trained). Returns the gradients in the
    /// order of [`Llama::trainable_params`]. SFT's cross-entropy, DPO's log-probability sums
    /// and a reward model's score head are such heads. The head also returns whatever the
    /// objective computed on the way (its loss statistics, its log-probabilities), handed back
    /// with the gradients. Errors: the head's, a trained base weight that is not dense, a row
    /// outside the batch.
    pub fn grads_from_head<R>(
        &self,
        be: &B,
        batch: &PackedBatch,
        rows: &[u32],
        head: impl FnOnce(&Tensor<B>, bool) -> Result<(HeadGrad<B>, R)>,
    ) -> Result<(Vec<Tensor<B>>, R)> {
        let (mut head, mut value) = (Some(head), None);
        let grads = self.backward_from_head(be, batch, rows, &mut |hn, trained| {
            let head = head
                .take()
                .ok_or_else(|| Error::arg("head", "called twice"))?;
            let (g, v) = head(hn, trained)?;
            value = Some(v);
            Ok(g)
        })?;
        let value = value.ok_or_else(|| Error::arg("head", "never called"))?;
        Ok((grads, value))
    }

    /// [`Llama::grads_from_head`] without the head's value, not generic (one copy of the
    /// decoder's backward whatever the objective).
    fn backward_from_head(
        &self,
        be: &B,
        batch: &PackedBatch,
        rows: &[u32],
        head: &mut DynHead<'_, B>,
    ) -> Result<Vec<Tensor<B>>> {
        let c = &self.cfg;
        let sh = self.vera_shared.as_ref();
        let prep = self.prepare(batch)?;
        let prompt = self.prompt_state(be)?;
        let pb = &prep.batch;
        let rows = prep.rows(rows);
        let (x, caches) = self.decoder(be, &prep, prompt.as_ref(), true)?;
        let multi_rows = self.multi_rows(pb)?;
        let mut grads: Vec<(String, Tensor<B>)> = Vec::new();
        // The final norm and the head only on the wanted rows. The norm is row-wise, so
        // normalizing just those rows equals slicing after a full norm.
        let sel = be.gather_rows(&x, &rows)?;
        let norm_w = self.final_norm_weight();
        let (hn, rstd_f) = be.rmsnorm(&sel, norm_w, c.rms_norm_eps)?;
        let head_trained = match &self.lm_head {
            Some(_) => self.full_finetune.is_some(),
            None => self.embeddings_trained(),
        };
        let HeadGrad {
            d_hidden: dhn,
            d_lm_head,
            own,
        } = head(&hn, head_trained)?;
        grads.extend(own);
        dhn.expect_shape("d_hidden", hn.shape())?;
        // With a tied head, dE collects the head's gradient and the embedding's.
        let mut d_embed = match (head_trained, d_lm_head) {
            (true, Some(g)) => {
                g.expect_shape("d_lm_head", self.head().shape())?;
                Some(g)
            }
            (true, None) => Some(be.zeros(self.head().shape())?),
            (false, _) => None,
        };
        let final_tuned = self.ln_tuning.as_ref().is_some_and(|t| t.norm.is_some());
        let mut d_norm = if self.full_finetune.is_some() || final_tuned {
            Some(be.zeros(self.norm.shape())?)
        } else {
            None
        };
        let dsel = be.rmsnorm_backward(&dhn, &sel, norm_w, &rstd_f, d_norm.as_mut())?;
        if let Some(g) = d_norm {
            let name = if final_tuned {
                "model.norm.ln_tuning_layers.weight"
            } else {
                "model.norm.weight"
            };
            grads.push((name.into(), g));
        }
        let mut dx = be.zeros(&[pb.n_tokens(), c.hidden_size])?;
        be.scatter_add_rows(&mut dx, &rows, &dsel)?;

        // Below the lowest layer with anything trainable, no gradient is needed.
        let lowest = if self.embeddings_trained() {
            0
        } else {
            let proj = (0..self.layers.len()).find(|&l| {
                self.layer_trained(l)
                    || self.layers[l].proj.iter().any(|p| p.adapter.is_some())
                    || self
                        .multi_lora
                        .as_ref()
                        .is_some_and(|m| (0..7).any(|p| m.adapts(l, p)))
            });
            [proj, self.lowest_additive()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(self.layers.len())
        };
        let mut d_prompt = match &prompt {
            Some(p)
                if prep
                    .prefix
                    .as_ref()
                    .is_some_and(|pl| pl.source == PrefixSource::Prompt) =>
            {
                Some(be.zeros(p.out.shape())?)
            }
            _ => None,
        };
        for (l, (b, lc)) in self.layers.iter().zip(caches).enumerate().rev() {
            if l < lowest {
                break;
            }
            let full = self.layer_trained(l);
            let path = |p: usize| proj_path(l, p);
            let norm_grad = |which: usize| -> Result<Option<Tensor<B>>> {
                Ok(if full || self.norm_tuned(l, which) {
                    Some(be.zeros(&[c.hidden_size])?)
                } else {
                    None
                })
            };
            let bw =
                |p: usize, x: &Tensor<B>, s: &ProjSaved<B>, dy: &Tensor<B>, g: &mut Vec<_>| match (
                    s,
                    &self.multi_lora,
                    &multi_rows,
                ) {
                    (ProjSaved::Multi(hs), Some(m), Some(rows)) => {
                        m.backward(be, &b.proj[p].base, (l, p), x, hs, dy, rows, g)
                    }
                    _ => b.proj[p].backward(be, sh, &path(p), full, x, s, dy, g),
                };
            // MLP and output site: x3 = site(x2, down(swiglu(gate(xn2), up(xn2)))).
            let (d2, d_down) =
                self.output_site_backward(be, l, lc.out_site.as_ref(), dx, &mut grads)?;
            dx = d2; // dx is d(x2) through the residual
            let dact = bw(
                DOWN,
                &lc.act,
                &lc.saved[DOWN],
                d_down.as_ref().unwrap_or(&dx),
                &mut grads,
            )?;
            let (dgate, dup) = be.swiglu_backward(&dact, &lc.gate, &lc.up)?;
            let mut dxn2 = bw(UP, &lc.xn2, &lc.saved[UP], &dup, &mut grads)?;
            let t = bw(GATE, &lc.xn2, &lc.saved[GATE], &dgate, &mut grads)?;
            be.axpy(&mut dxn2, 1.0, &t)?;
            let mut dpost = norm_grad(1)?;
            let d = be.rmsnorm_backward(
                &dxn2,
                &lc.x2,
                self.layer_norm_weight(l, 1),
                &lc.rstd2,
                dpost.as_mut(),
            )?;
            be.axpy(&mut dx, 1.0, &d)?; // dx is now d(x2)
            // Attention: x2 = x + site(o_proj(attn(rope(q(xn1)), rope(k(xn1)), v(xn1)))).
            let dh = self.attention_site_backward(be, l, lc.att_site.as_ref(), &dx, &mut grads)?;
            let datt = bw(
                O,
                &lc.att_out,
                &lc.saved[O],
                dh.as_ref().unwrap_or(&dx),
                &mut grads,
            )?;
            let (mut dq, mut dk, dv) = self.attend_backward(
                be,
                l,
                &prep,
                &lc.att,
                &lc.q,
                &lc.k,
                &lc.v,
                &datt,
                d_prompt.as_mut(),
            )?;
            be.rope(&mut dq, &pb.positions, c.head_dim, c.rope_theta, true)?;
            be.rope(&mut dk, &pb.positions, c.head_dim, c.rope_theta, true)?;
            let mut dxn1 = bw(V, &lc.xn1, &lc.saved[V], &dv, &mut grads)?;
            let t = bw(K, &lc.xn1, &lc.saved[K], &dk, &mut grads)?;
            be.axpy(&mut dxn1, 1.0, &t)?;
            let t = bw(Q, &lc.xn1, &lc.saved[Q], &dq, &mut grads)?;
            be.axpy(&mut dxn1, 1.0, &t)?;
            let mut dinput = norm_grad(0)?;
            let d = be.rmsnorm_backward(
                &dxn1,
                &lc.x,
                self.layer_norm_weight(l, 0),
                &lc.rstd1,
                dinput.as_mut(),
            )?;
            be.axpy(&mut dx, 1.0, &d)?; // dx is now d(x) of this layer's input
            let norm_names = |n: &str| {
                if full {
                    format!("model.layers.{l}.{n}.weight")
                } else {
                    format!("model.layers.{l}.{n}.ln_tuning_layers.weight")
                }
            };
            if let Some(gi) = dinput {
                grads.push((norm_names("input_layernorm"), gi));
            }
            if let Some(gp) = dpost {
                grads.push((norm_names("post_attention_layernorm"), gp));
            }
        }
        if let Some(p) = &prompt {
            let dp = match d_prompt {
                Some(dp) => Some(dp),
                None => self.prompt_input_grad(be, &prep, &dx, p)?,
            };
            if let Some(dp) = dp {
                self.prompt_backward(be, p, dp, &mut grads)?;
            }
        }
        if self.embeddings_trained() {
            let de = d_embed.get_or_insert(be.zeros(self.embed_tokens.shape())?);
            be.scatter_add_rows(de, &pb.ids, &dx)?;
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
        Ok(ordered)
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
