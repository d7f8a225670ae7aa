//! A Llama-architecture causal LM in candle whose seven projections per layer are
//! [`AdaptedLinear`]s, so lorafuse's layers can be injected where candle-transformers' Llama
//! holds plain `Linear`s (its fields are private). The math is transformers'
//! `LlamaForCausalLM` (and candle-transformers' `llama::Llama`): RMSNorm, `rotate_half` RoPE,
//! grouped-query attention, SwiGLU MLP, tied or separate LM head; weights under transformers'
//! names. Unlike candle-transformers' forward (last position only, for generation) it returns
//! the logits of every position and takes an attention mask, as training needs.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::adapted::AdaptedLinear;
use super::frozen::FrozenLinear;
use super::op::{lf, to_candle};
use crate::Cpu;
use crate::model::config::LlamaConfig;
use crate::model::llama::{PROJ_NAMES, proj_path};

/// One decoder layer: the two RMSNorm weights `[hidden]` and the projections in
/// [`PROJ_NAMES`] order (q, k, v, o, gate, up, down).
#[derive(Clone, Debug)]
struct Layer {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    proj: Vec<AdaptedLinear>,
}

/// The model (frozen except for the adapters injected with [`Llama::adapt`]).
#[derive(Clone, Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    /// `[vocab, hidden]`.
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    /// `[hidden]`.
    norm: Tensor,
    /// `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// transformers' `rotate_half` RoPE on `x [b, heads, t, d]` with `cos`, `sin` `[t, d]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, d / 2)?,
        x.narrow(D::Minus1, d / 2, d / 2)?,
    );
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

impl Llama {
    /// Loads the weights through `vb` under transformers' names (`model.embed_tokens.weight`,
    /// `model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight` unless tied), e.g.
    /// `VarBuilder::from_mmaped_safetensors` over a transformers folder; each projection is
    /// copied once into a [`FrozenLinear`]. Errors: a missing tensor or one of another shape.
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig) -> candle_core::Result<Self> {
        let (h, kv) = (cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim);
        let q = cfg.num_attention_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        let shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)];
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let lv = vb.pp(format!("model.layers.{l}"));
            let mut proj = Vec::with_capacity(7);
            for (p, &(o, n)) in shapes.iter().enumerate() {
                let group = if p <= 3 { "self_attn" } else { "mlp" };
                let w = lv.pp(group).pp(PROJ_NAMES[p]).get((o, n), "weight")?;
                let lin = candle_nn::Linear::new(w, None);
                proj.push(AdaptedLinear::Frozen(FrozenLinear::from_linear(&lin)?));
            }
            layers.push(Layer {
                input_layernorm: lv.pp("input_layernorm").get(h, "weight")?,
                post_attention_layernorm: lv.pp("post_attention_layernorm").get(h, "weight")?,
                proj,
            });
        }
        let embed_tokens = vb
            .pp("model.embed_tokens")
            .get((cfg.vocab_size, h), "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(vb.pp("lm_head").get((cfg.vocab_size, h), "weight")?)
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: vb.pp("model.norm").get(h, "weight")?,
            lm_head,
        })
    }

    /// Takes over a model loaded by lorafuse ([`crate::train::job::load_model`]: a GGUF such
    /// as the fetched SmolLM2, or a transformers folder; its projections dense or NF4), moving
    /// its weights without a copy. Errors: a model that carries an adapter or another add-on
    /// (load the base, then inject here).
    pub fn from_lorafuse(model: crate::model::llama::Llama<Cpu>) -> candle_core::Result<Self> {
        let adapted = model
            .layers
            .iter()
            .any(|b| b.proj.iter().any(|p| p.adapter.is_some()));
        if adapted || model.soft_prompt.is_some() || model.multi_lora.is_some() {
            candle_core::bail!("lorafuse candle Llama: the model already carries an adapter");
        }
        let layers = model
            .layers
            .into_iter()
            .map(|b| {
                Ok(Layer {
                    input_layernorm: to_candle(b.input_layernorm)?,
                    post_attention_layernorm: to_candle(b.post_attention_layernorm)?,
                    proj: b
                        .proj
                        .into_iter()
                        .map(|p| AdaptedLinear::Frozen(FrozenLinear::from_lorafuse(p.base)))
                        .collect(),
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Llama {
            cfg: model.cfg,
            embed_tokens: to_candle(model.embed_tokens)?,
            layers,
            norm: to_candle(model.norm)?,
            lm_head: model.lm_head.map(to_candle).transpose()?,
        })
    }

    /// The shape hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Replaces each projection whose name is in `targets` (`q_proj`, ..., `down_proj`) by
    /// `f(module path, frozen base)`, e.g. a [`super::LoraLinear::new`] over the base with
    /// `vb.pp(path)` (PEFT's names then hold in the VarMap). Errors: a target that is no Llama
    /// projection; a projection already adapted; `f`'s errors.
    pub fn adapt(
        &mut self,
        targets: &[&str],
        mut f: impl FnMut(&str, FrozenLinear) -> candle_core::Result<AdaptedLinear>,
    ) -> candle_core::Result<()> {
        if let Some(t) = targets.iter().find(|t| !PROJ_NAMES.contains(t)) {
            candle_core::bail!("lorafuse candle Llama: `{t}` is not one of {PROJ_NAMES:?}");
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (p, proj) in layer.proj.iter_mut().enumerate() {
                if !targets.contains(&PROJ_NAMES[p]) {
                    continue;
                }
                let path = proj_path(l, p);
                let AdaptedLinear::Frozen(base) = proj else {
                    candle_core::bail!("lorafuse candle Llama: `{path}` is already adapted");
                };
                *proj = f(&path, base.clone())?;
            }
        }
        Ok(())
    }

    /// Every projection with its module path (`model.layers.0.self_attn.q_proj`), for
    /// [`super::save_peft`] and [`super::load_peft`].
    pub fn projections(&self) -> Vec<(String, &AdaptedLinear)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(l, layer)| {
                layer
                    .proj
                    .iter()
                    .enumerate()
                    .map(move |(p, a)| (proj_path(l, p), a))
            })
            .collect()
    }

    /// Logits `[b, t, vocab]` (f32) of every position for `input_ids [b, t]` (u32), with
    /// positions `0..t` and causal attention; `attention_mask [b, t]` (1 = token, 0 = padding,
    /// any dtype) hides padded keys as transformers does. Errors: shapes; ids out of the vocab.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let (b, t) = input_ids.dims2()?;
        let dev = Device::Cpu;
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, c.hidden_size))?;
        let (cos, sin) = self.rope_tables(t)?;
        // Additive mask [b, 1, t, t]: -inf above the diagonal and on padded keys.
        let causal: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mut mask = Tensor::from_vec(causal, (1, 1, t, t), &dev)?;
        if let Some(m) = attention_mask {
            let keys = m.to_dtype(DType::F32)?.reshape((b, 1, 1, t))?;
            let pad = keys.affine(-1.0, 1.0)?.affine(-1e30, 0.0)?;
            mask = mask.broadcast_add(&pad)?;
        }
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let eps = c.rms_norm_eps as f64;
        for layer in &self.layers {
            let p = &layer.proj;
            let hs = rms_norm(&x, &layer.input_layernorm, eps)?;
            let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
            let q = rope(&heads(p[0].forward(&hs)?, nh)?, &cos, &sin)?;
            let k = rope(&heads(p[1].forward(&hs)?, nkv)?, &cos, &sin)?;
            let v = heads(p[2].forward(&hs)?, nkv)?;
            let rep = nh / nkv;
            let expand = |y: Tensor| -> candle_core::Result<Tensor> {
                if rep == 1 {
                    return Ok(y);
                }
                y.unsqueeze(2)?
                    .broadcast_as((b, nkv, rep, t, hd))?
                    .reshape((b, nh, t, hd))
            };
            let (k, v) = (expand(k)?, expand(v)?);
            let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?;
            let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
            let attn = probs.matmul(&v.contiguous()?)?;
            let attn = attn.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            x = (x + p[3].forward(&attn)?)?;
            let hs = rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            let gate = candle_nn::ops::silu(&p[4].forward(&hs)?)?;
            x = (&x + p[6].forward(&(gate * p[5].forward(&hs)?)?)?)?;
        }
        let x = rms_norm(&x, &self.norm, eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        x.reshape((b * t, c.hidden_size))?
            .matmul(&head.t()?)?
            .reshape((b, t, c.vocab_size))
    }

    /// `cos`, `sin` `[t, head_dim]` of the default RoPE (`inv_freq = theta^(-2i/d)`, the
    /// halves repeated as transformers' `cat((freqs, freqs))`).
    fn rope_tables(&self, t: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim;
        let theta = self.cfg.rope_theta as f64;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / d as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(t * d);
        let mut sin = Vec::with_capacity(t * d);
        for pos in 0..t {
            for _ in 0..2 {
                for &f in &inv {
                    let a = pos as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, d), &Device::Cpu)?,
            Tensor::from_vec(sin, (t, d), &Device::Cpu)?,
        ))
    }
}

/// Mean next-token cross-entropy of `logits [b, t, vocab]` against `labels [b, t]` (i64 or
/// u32; `-100` or a masked position ignored, as transformers' `LlamaForCausalLM` with
/// `labels`): position i predicts label i + 1. Errors: shapes; no target left.
pub fn causal_lm_loss(logits: &Tensor, labels: &[Vec<i64>]) -> candle_core::Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if labels.len() != b || labels.iter().any(|r| r.len() != t) {
        candle_core::bail!("lorafuse causal_lm_loss: labels are not [{b}, {t}]");
    }
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, row) in labels.iter().enumerate() {
        for j in 0..t.saturating_sub(1) {
            let y = row[j + 1];
            if y >= 0 {
                if y as usize >= v {
                    candle_core::bail!("lorafuse causal_lm_loss: label {y} is not below vocab {v}");
                }
                rows.push((i * t + j) as u32);
                targets.push(y as u32);
            }
        }
    }
    if rows.is_empty() {
        candle_core::bail!("lorafuse causal_lm_loss: no target token");
    }
    let n = rows.len();
    let dev = logits.device();
    let picked = logits
        .reshape((b * t, v))?
        .index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
    let logp = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let tgt = Tensor::from_vec(targets, (n, 1), dev)?;
    logp.gather(&tgt, 1)?.mean_all()?.neg()
}

/// Loads a model the way lorafuse's CLI does (a GGUF or a transformers folder; `None` = the
/// fetched SmolLM2), optionally quantizing the projections to NF4 (QLoRA), into a candle
/// [`Llama`], with its tokenizer; `log` gets the loader's progress lines. Errors: those of
/// [`crate::train::job::load_model`].
pub fn load_llama(
    path: Option<&std::path::Path>,
    nf4: Option<crate::model::llama::Nf4Spec>,
    log: &mut dyn FnMut(String),
) -> candle_core::Result<(crate::model::tokenizer::Tokenizer, Llama)> {
    let (_, tok, model) = crate::train::job::load_model(&Cpu, path, nf4, log).map_err(lf)?;
    Ok((tok, Llama::from_lorafuse(model)?))
}
