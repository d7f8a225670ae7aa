//! Adapters injected into the model's projections (PEFT's injection model: each targeted
//! projection keeps its frozen base and gains an adapter of one method), which tensors train
//! (adapters, or the base tensors in full fine-tuning), and merging the adapters back in.

use super::llama::{Llama, Nf4Spec, proj_path, target_indices};
use crate::adapter::{
    AdaLoraLayer, Adapter, AdapterSaved, BaseWeight, DoraLayer, Linear, LoraConfig, LoraLayer,
    MethodKind, VeraLayer, VeraShared,
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
    pub(super) fn layer_trained(&self, l: usize) -> bool {
        self.full_finetune.is_some_and(|f| l >= f.trainable_from)
    }

    /// Whether the embedding (and a tied LM head) is trained.
    pub(super) fn embeddings_trained(&self) -> bool {
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
}
