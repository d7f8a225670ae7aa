//! Adapters injected into the model's projections (PEFT's injection model: each targeted
//! projection keeps its frozen base and gains an adapter of one method), which tensors train
//! (adapters, or the base tensors in full fine-tuning), and merging the adapters back in.

use super::llama::{ComputeDtype, Llama, Nf4Spec, proj_path, target_indices};
use crate::adapter::{
    AdaLoraLayer, Adapter, AdapterFusion, AdapterSaved, BaseWeight, BeftLayer, Bottleneck,
    DoraLayer, Ia3Layer, Linear, LnTuning, LoraConfig, LoraLayer, MethodKind, PromptMethod,
    SoftPrompt, VeraLayer, VeraShared,
};
use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::quant::nf4::quantize_nf4;

/// A projection: a base linear layer and, optionally, an adapter on it.
#[derive(Clone, Debug)]
pub struct Proj<B: Backend> {
    pub base: Linear<B>,
    pub adapter: Option<Adapter<B>>,
}

/// What a projection's forward keeps for its backward.
pub(super) enum ProjSaved<B: Backend> {
    Base,
    Adapter(AdapterSaved<B>),
    /// Several LoRA adapters on their rows of the batch ([`super::multi::MultiLora`]): each
    /// one's `h`, `None` where it has no row.
    Multi(Vec<Option<Tensor<B>>>),
}

impl<B: Backend> Proj<B> {
    pub(super) fn forward(
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
    pub(super) fn backward(
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

impl<B: Backend> Llama<B> {
    /// Per-projection seed derived from the run seed.
    fn proj_seed(seed: u64, l: usize, p: usize) -> u64 {
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((l * 7 + p) as u64)
    }

    /// Injects LoRA adapters (PEFT's default init, seeded) into every projection named in
    /// `cfg.target_modules`. Errors: invalid config, or a target name that is not one of
    /// [`PROJ_NAMES`](super::llama::PROJ_NAMES).
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
                    MethodKind::Ia3 | MethodKind::Beft => {
                        return Err(Error::arg(
                            "method",
                            "IA3 and BEFT adapters are added with Llama::add_ia3 / add_beft",
                        ));
                    }
                });
            }
        }
        Ok(())
    }

    /// Injects IA3 vectors (PEFT's init: ones) into every projection of `target_modules`; those
    /// also in `feedforward_modules` scale their input, the others their output (PEFT's
    /// `IA3Config`). Errors: an unknown module name, a feed-forward module that is not a
    /// target (PEFT refuses it too), no target.
    pub fn add_ia3(
        &mut self,
        be: &B,
        target_modules: &[String],
        feedforward_modules: &[String],
    ) -> Result<()> {
        let targets = target_indices(target_modules)?;
        let ff = target_indices(feedforward_modules)?;
        if targets.is_empty() {
            return Err(Error::arg("target_modules", "no module to adapt"));
        }
        if let Some(&p) = ff.iter().find(|p| !targets.contains(p)) {
            return Err(Error::arg(
                "feedforward_modules",
                format!(
                    "`{}` is not in target_modules (PEFT requires feedforward_modules to be a \
                     subset of them)",
                    super::llama::PROJ_NAMES[p]
                ),
            ));
        }
        for block in &mut self.layers {
            for &p in &targets {
                let proj = &mut block.proj[p];
                proj.adapter = Some(Adapter::Ia3(Ia3Layer::init(
                    be,
                    &proj.base,
                    ff.contains(&p),
                )?));
            }
        }
        Ok(())
    }

    /// Injects BEFT biases (PEFT's init: zeros) into every projection of `target_modules`.
    /// Errors: an unknown module name, no target.
    pub fn add_beft(&mut self, be: &B, target_modules: &[String]) -> Result<()> {
        let targets = target_indices(target_modules)?;
        if targets.is_empty() {
            return Err(Error::arg("target_modules", "no module to adapt"));
        }
        for block in &mut self.layers {
            for &p in &targets {
                let proj = &mut block.proj[p];
                proj.adapter = Some(Adapter::Beft(BeftLayer::init(be, &proj.base)?));
            }
        }
        Ok(())
    }

    /// LN tuning (PEFT `LNTuningConfig`): trainable copies of the norms named in `targets`
    /// (`input_layernorm`, `post_attention_layernorm`, `norm` for the final one). Errors: an
    /// unknown name, no target.
    pub fn add_ln_tuning(&mut self, be: &B, targets: &[String]) -> Result<()> {
        let mut want = [false; 3];
        for t in targets {
            let i = crate::adapter::ln_tuning::LN_TARGETS
                .iter()
                .position(|n| *n == t.trim())
                .ok_or_else(|| {
                    Error::arg(
                        "target_modules",
                        format!(
                            "unknown norm `{t}`; expected one of {:?}",
                            crate::adapter::ln_tuning::LN_TARGETS
                        ),
                    )
                })?;
            want[i] = true;
        }
        if !want.iter().any(|&w| w) {
            return Err(Error::arg("target_modules", "no norm to tune"));
        }
        let copy = |t: &Tensor<B>| -> Result<Tensor<B>> {
            let mut c = be.zeros(t.shape())?;
            be.copy_into(t, &mut c)?;
            Ok(c)
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for b in &self.layers {
            layers.push([
                if want[0] {
                    Some(copy(&b.input_layernorm)?)
                } else {
                    None
                },
                if want[1] {
                    Some(copy(&b.post_attention_layernorm)?)
                } else {
                    None
                },
            ]);
        }
        self.ln_tuning = Some(LnTuning {
            layers,
            norm: if want[2] {
                Some(copy(&self.norm)?)
            } else {
                None
            },
        });
        Ok(())
    }

    /// A new soft prompt of `num_virtual_tokens` for this model (see [`SoftPrompt::init`]): the
    /// token width is the hidden size (prompt and P-tuning) or `kv_heads * head_dim` (prefix
    /// tuning, whose output is `2 x layers x` that); `encoder_hidden` is P-tuning's MLP width
    /// or prefix tuning's projection width (`None`: prefix tuning trains the prefix itself).
    /// With `init_ids` (prompt tuning's TEXT init) the embedding starts as those tokens'
    /// embeddings, the ids repeated or cut to `num_virtual_tokens` (PEFT's
    /// `PromptEmbedding`). Errors: zero virtual tokens, TEXT init for another method, an
    /// empty or out-of-vocabulary id list, P-tuning without a width.
    pub fn add_soft_prompt(
        &mut self,
        be: &B,
        method: PromptMethod,
        num_virtual_tokens: usize,
        encoder_hidden: Option<usize>,
        init_ids: Option<&[u32]>,
        seed: u64,
    ) -> Result<()> {
        let c = &self.cfg;
        let kv = c.num_key_value_heads * c.head_dim;
        let (token_dim, out_dim) = match method {
            PromptMethod::PrefixTuning => (kv, 2 * c.num_hidden_layers * kv),
            _ => (c.hidden_size, c.hidden_size),
        };
        let init = match init_ids {
            None => None,
            Some(_) if method != PromptMethod::PromptTuning => {
                return Err(Error::arg(
                    "prompt_tuning_init_text",
                    "TEXT init applies to prompt tuning only",
                ));
            }
            Some([]) => {
                return Err(Error::arg(
                    "prompt_tuning_init_text",
                    "the init text has no tokens",
                ));
            }
            Some(ids) => {
                let rows: Vec<u32> = ids
                    .iter()
                    .copied()
                    .cycle()
                    .take(num_virtual_tokens)
                    .collect();
                let e = be.gather_rows(&self.embed_tokens, &rows)?;
                Some(be.download(&e)?)
            }
        };
        let sp = SoftPrompt::init(
            be,
            method,
            num_virtual_tokens,
            token_dim,
            out_dim,
            encoder_hidden,
            init,
            seed,
        )?;
        self.soft_prompt = Some(sp);
        Ok(())
    }

    /// Removes every adapter (projection adapters, LN tuning, soft prompt, bottleneck adapters
    /// and fusion).
    pub fn remove_adapters(&mut self) {
        drop(self.take_adapters());
    }

    /// Takes every adapter off the model (it is then the bare base) and returns them, to be
    /// put back with [`Llama::put_adapters`]: PEFT's `disable_adapter()`, which DPO's
    /// reference forward uses. Moves tensors, copies nothing.
    pub fn take_adapters(&mut self) -> AdapterSet<B> {
        AdapterSet {
            proj: self
                .layers
                .iter_mut()
                .map(|b| b.proj.each_mut().map(|p| p.adapter.take()))
                .collect(),
            vera_shared: self.vera_shared.take(),
            ln_tuning: self.ln_tuning.take(),
            soft_prompt: self.soft_prompt.take(),
            bottleneck: self.bottleneck.take(),
            fusion: self.fusion.take(),
        }
    }

    /// Puts `set` on the model in place of what it has, and returns what it had. Errors, leaving
    /// the model untouched: a set taken from a model with another number of layers.
    pub fn put_adapters(&mut self, set: AdapterSet<B>) -> Result<AdapterSet<B>> {
        self.check_adapter_set(&set)?;
        let old = self.take_adapters();
        for (b, adapters) in self.layers.iter_mut().zip(set.proj) {
            for (p, a) in b.proj.iter_mut().zip(adapters) {
                p.adapter = a;
            }
        }
        self.vera_shared = set.vera_shared;
        self.ln_tuning = set.ln_tuning;
        self.soft_prompt = set.soft_prompt;
        self.bottleneck = set.bottleneck;
        self.fusion = set.fusion;
        Ok(old)
    }

    fn check_adapter_set(&self, set: &AdapterSet<B>) -> Result<()> {
        if set.proj.len() != self.layers.len() {
            return Err(Error::arg(
                "adapters",
                format!(
                    "the adapter set has {} layers, the model {}",
                    set.proj.len(),
                    self.layers.len()
                ),
            ));
        }
        Ok(())
    }

    /// Runs `f` on the model with `set` in place of its adapters (an empty
    /// [`AdapterSet::none`] for the bare base) and puts them back, whether `f` succeeds or not.
    pub fn with_adapters<R>(
        &mut self,
        set: &mut AdapterSet<B>,
        f: impl FnOnce(&Self) -> Result<R>,
    ) -> Result<R> {
        self.check_adapter_set(set)?;
        let mine = self.put_adapters(std::mem::replace(set, AdapterSet::none(0)))?;
        let out = f(self);
        let theirs = self.put_adapters(mine)?;
        *set = theirs;
        out
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

    /// Marks every dense projection weight frozen, stored as `dtype` says: f32 through
    /// [`Backend::freeze`] (on a backend that stores frozen weights narrower, wgpu with
    /// `SHADER_F16`, they become f16, halving their memory; elsewhere nothing changes), or bf16
    /// ([`Backend::upload_bf16`], half the memory on every backend that holds bf16). For
    /// adapter training only: a frozen weight cannot be trained (full fine-tuning) or merged
    /// into in place.
    pub fn freeze_bases(&mut self, be: &B, dtype: ComputeDtype) -> Result<()> {
        for b in &mut self.layers {
            for proj in &mut b.proj {
                if let BaseWeight::Dense(w) = &mut proj.base.weight {
                    let t = std::mem::replace(w, be.zeros(&[0])?);
                    proj.base.weight = match dtype {
                        ComputeDtype::F32 => BaseWeight::Dense(be.freeze(t)?),
                        ComputeDtype::Bf16 => {
                            BaseWeight::Bf16(be.upload_bf16(&be.download(&t)?, t.shape())?)
                        }
                    };
                }
            }
        }
        Ok(())
    }

    /// Bytes held by the projection base weights (NF4, f32, f16 or bf16).
    pub fn base_weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|b| b.proj.iter())
            .map(|p| p.base.bytes())
            .sum()
    }

    /// Whether base layer `l`'s tensors are trained.
    pub(super) fn layer_trained(&self, l: usize) -> bool {
        self.full_finetune.is_some_and(|f| l >= f.trainable_from)
    }

    /// Whether the embedding (and a tied LM head) is trained.
    pub(super) fn embeddings_trained(&self) -> bool {
        self.full_finetune
            .is_some_and(|f| !f.freeze_embeddings && f.trainable_from == 0)
    }

    /// The trainable tensors, named as transformers/PEFT/`adapters` name them (`model.layers.0.
    /// self_attn.q_proj.lora_A.weight`, `model.embed_tokens.weight`, `prompt_encoder.
    /// embedding.weight`, `model.layers.0.output_adapters.adapters.<name>.adapter_up.weight`,
    /// ...), in a fixed order: the soft prompt, embeddings, then per layer its norms (full
    /// fine-tuning or LN tuning), base weights (full fine-tuning), its projection adapters
    /// (PEFT's suffix order) and its bottleneck adapters or fusion layer, then the final norm,
    /// then a reward model's `score.weight`.
    /// Gradients come back in this order.
    pub fn trainable_params(&self) -> Vec<(String, &Tensor<B>)> {
        let mut out = Vec::new();
        if let Some(sp) = &self.soft_prompt {
            for (name, t) in sp.params() {
                out.push((format!("prompt_encoder.{name}"), t));
            }
        }
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
            } else if let Some(ln) = &self.ln_tuning {
                for (which, n) in ["input_layernorm", "post_attention_layernorm"]
                    .iter()
                    .enumerate()
                {
                    if let Some(t) = &ln.layers[l][which] {
                        out.push((format!("model.layers.{l}.{n}.ln_tuning_layers.weight"), t));
                    }
                }
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
            if let Some(bn) = &self.bottleneck {
                let sites = [
                    ("attention_adapters", &bn.layers[l].attention),
                    ("output_adapters", &bn.layers[l].output),
                ];
                for (site, a) in sites {
                    if let Some(a) = a {
                        let path = self.bn_path(l, site);
                        for (sfx, t) in a.params() {
                            out.push((format!("{path}.{sfx}"), t));
                        }
                    }
                }
            }
            if let Some(fu) = &self.fusion {
                let base = format!(
                    "model.layers.{l}.output_adapters.adapter_fusion_layer.{}",
                    fu.name()
                );
                for (sfx, t) in fu.layers[l].params() {
                    out.push((format!("{base}.{sfx}"), t));
                }
            }
        }
        if self.full_finetune.is_some() {
            out.push(("model.norm.weight".to_string(), &self.norm));
        } else if let Some(t) = self.ln_tuning.as_ref().and_then(|ln| ln.norm.as_ref()) {
            out.push(("model.norm.ln_tuning_layers.weight".to_string(), t));
        }
        if let Some(t) = &self.score {
            out.push(("score.weight".to_string(), t));
        }
        if let Some(m) = &self.multi_lora {
            out.extend(m.params());
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
        if let Some(sp) = &mut self.soft_prompt {
            out.extend(sp.params_mut());
        }
        if emb {
            out.push(&mut self.embed_tokens);
        }
        let (mut ln_layers, ln_norm) = match self.ln_tuning.as_mut() {
            Some(LnTuning { layers, norm }) => (Some(layers.iter_mut()), norm.as_mut()),
            None => (None, None),
        };
        let mut bn_layers = self.bottleneck.as_mut().map(|bn| bn.layers.iter_mut());
        let mut fu_layers = self.fusion.as_mut().map(|fu| fu.layers.iter_mut());
        for (l, b) in self.layers.iter_mut().enumerate() {
            let ln = ln_layers.as_mut().and_then(|it| it.next());
            if full[l] {
                out.push(&mut b.input_layernorm);
                out.push(&mut b.post_attention_layernorm);
            } else if let Some(ln) = ln {
                out.extend(ln.iter_mut().flatten());
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
            if let Some(bl) = bn_layers.as_mut().and_then(|it| it.next()) {
                if let Some(a) = &mut bl.attention {
                    out.extend(a.params_mut());
                }
                if let Some(a) = &mut bl.output {
                    out.extend(a.params_mut());
                }
            }
            if let Some(fl) = fu_layers.as_mut().and_then(|it| it.next()) {
                out.extend(fl.params_mut());
            }
        }
        if norm {
            out.push(&mut self.norm);
        } else if let Some(t) = ln_norm {
            out.push(t);
        }
        if let Some(t) = &mut self.score {
            out.push(t);
        }
        if let Some(m) = &mut self.multi_lora {
            out.extend(m.params_mut());
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

    /// Merges every adapter into its base weight and drops the adapters (PEFT
    /// `merge_and_unload`).
    pub fn merge_and_unload(&mut self, be: &B) -> Result<()> {
        if self.soft_prompt.is_some() {
            return Err(Error::arg(
                "merge",
                "a soft prompt (prompt, P- or prefix tuning) is not a weight change and cannot \
                 be merged: keep the adapter and load it with the model",
            ));
        }
        if self.bottleneck.is_some() || self.fusion.is_some() {
            return Err(Error::arg(
                "merge",
                "bottleneck adapters and AdapterFusion add layers with non-linearities and \
                 cannot be merged into the base weights: keep the adapter",
            ));
        }
        // BEFT on a layer without a bias cannot merge (PEFT refuses it): check all first.
        for (l, b) in self.layers.iter().enumerate() {
            for (p, proj) in b.proj.iter().enumerate() {
                if matches!(proj.adapter, Some(Adapter::Beft(_))) && proj.base.bias.is_none() {
                    return Err(Error::arg(
                        proj_path(l, p),
                        "bias tuning (BEFT) cannot be merged into a layer without a bias (Llama's \
                         projections have none; PEFT refuses it too): keep the adapter",
                    ));
                }
            }
        }
        if let Some(ln) = self.ln_tuning.take() {
            for (b, [i, p]) in self.layers.iter_mut().zip(ln.layers) {
                if let Some(i) = i {
                    b.input_layernorm = i;
                }
                if let Some(p) = p {
                    b.post_attention_layernorm = p;
                }
            }
            if let Some(n) = ln.norm {
                self.norm = n;
            }
        }
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
}

/// Everything [`Llama::take_adapters`] takes off a model: each projection's adapter (layer by
/// layer, in [`super::llama::PROJ_NAMES`] order), VeRA's shared projections, LN tuning, the soft
/// prompt, bottleneck adapters and fusion.
#[derive(Clone, Debug)]
pub struct AdapterSet<B: Backend> {
    pub proj: Vec<[Option<Adapter<B>>; 7]>,
    pub vera_shared: Option<VeraShared<B>>,
    pub ln_tuning: Option<LnTuning<B>>,
    pub soft_prompt: Option<SoftPrompt<B>>,
    pub bottleneck: Option<Bottleneck<B>>,
    pub fusion: Option<AdapterFusion<B>>,
}

impl<B: Backend> AdapterSet<B> {
    /// No adapter anywhere, for a model of `n_layers` layers: the bare base.
    pub fn none(n_layers: usize) -> Self {
        AdapterSet {
            proj: (0..n_layers)
                .map(|_| std::array::from_fn(|_| None))
                .collect(),
            vera_shared: None,
            ln_tuning: None,
            soft_prompt: None,
            bottleneck: None,
            fusion: None,
        }
    }

    /// Whether the set holds no adapter at all.
    pub fn is_empty(&self) -> bool {
        self.proj.iter().flatten().all(Option::is_none)
            && self.vera_shared.is_none()
            && self.ln_tuning.is_none()
            && self.soft_prompt.is_none()
            && self.bottleneck.is_none()
            && self.fusion.is_none()
    }
}
