//! The additive and selective methods inside the decoder: soft prompts (virtual tokens in the
//! residual stream, or prefix keys and values in every attention), bottleneck adapters and
//! AdapterFusion at a layer's two sites, and LN tuning's norm copies. [`super::llama`] calls
//! these at fixed points of its forward and backward; each is the identity when its method is
//! absent.

use super::llama::{Llama, PackedBatch};
use crate::adapter::bottleneck::{BnSaved, FuseSaved};
use crate::adapter::soft_prompt::PromptSaved;
use crate::adapter::{BottleneckKind, PromptMethod};
use crate::backend::{AttentionSaved, Backend, SeqSpan, Tensor};
use crate::error::{Error, Result};

/// The batch the decoder runs: the caller's, or for prompt and P-tuning the virtual tokens
/// once (rows 0..nvt) then the caller's rows, or for prefix tuning the caller's rows; positions
/// shifted past the virtual tokens in both; plus where the caller's rows went.
pub(crate) struct Prepared {
    pub batch: PackedBatch,
    /// Row of the prepared batch of each row of the caller's batch (`None`: the same row).
    pub real_rows: Option<Vec<u32>>,
    /// Prompt and P-tuning: the virtual-token rows and the virtual token each one holds.
    pub virt: Option<(Vec<u32>, Vec<u32>)>,
    /// Prefix tuning: the attention layout with the prefix in front of every sequence.
    pub prefix: Option<PrefixPlan>,
}

impl Prepared {
    /// The prepared batch's row of the caller's row `r`.
    pub fn row(&self, r: u32) -> u32 {
        self.real_rows.as_ref().map_or(r, |m| m[r as usize])
    }
    /// The prepared rows of the caller's `rows`.
    pub fn rows(&self, rows: &[u32]) -> Vec<u32> {
        rows.iter().map(|&r| self.row(r)).collect()
    }
}

/// Attention over a prefix: each sequence's keys and values are nvt prefix slots then its own
/// rows (the slots' queries are zero and their outputs dropped). Prefix tuning fills the slots
/// from the prompt's output; prompt and P-tuning from the virtual tokens' own rows.
pub(crate) struct PrefixPlan {
    pub seqs: Vec<SeqSpan>,
    /// Extended row of each row of the prepared batch.
    pub real: Vec<u32>,
    /// Extended rows of the prefix slots, sequence by sequence.
    pub slots: Vec<u32>,
    /// The virtual token of each prefix slot.
    pub src: Vec<u32>,
    pub n_rows: usize,
    pub source: PrefixSource,
}

/// Where a prefix slot's key and value come from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrefixSource {
    /// Prefix tuning: the prompt's output, the rows of layer l (no RoPE).
    Prompt,
    /// Prompt and P-tuning: rows `src` of the layer's own keys and values (the virtual
    /// tokens, run once in front of the batch, RoPE at positions 0..nvt).
    Rows,
}

impl PrefixPlan {
    /// Appends sequence `s` of the caller's batch (its rows `offset` further in the prepared
    /// batch) behind nvt prefix slots.
    fn push_seq(&mut self, s: &SeqSpan, nvt: usize, offset: usize) {
        let start = self.n_rows;
        self.seqs.push(SeqSpan {
            start,
            len: s.len + nvt,
        });
        for j in 0..nvt {
            self.slots.push((start + j) as u32);
            self.src.push(j as u32);
        }
        for t in 0..s.len {
            self.real[offset + s.start + t] = (start + nvt + t) as u32;
        }
        self.n_rows += s.len + nvt;
    }
}

/// What a forward keeps of the soft prompt: its output (`[nvt, hidden]`, or `[nvt * 2L,
/// kv_dim]` for prefix tuning) and the encoder's state.
pub(crate) struct PromptState<B: Backend> {
    pub out: Tensor<B>,
    pub saved: PromptSaved<B>,
}

/// Attention as the decoder ran it (plain, or over a prefix).
pub(crate) enum AttnSaved<B: Backend> {
    Plain(AttentionSaved<B>),
    Prefix {
        q: Tensor<B>,
        k: Tensor<B>,
        v: Tensor<B>,
        att: AttentionSaved<B>,
    },
}

/// What a bottleneck site keeps.
pub(crate) enum SiteSaved<B: Backend> {
    /// Houlsby at either site: `h + f(h)` (f's state).
    Houlsby(BnSaved<B>),
    /// Pfeiffer after the MLP: `y + f(y)`, `y = x + h`.
    Pfeiffer(BnSaved<B>),
    /// AdapterFusion after the MLP.
    Fusion(FuseSaved<B>),
}

fn no_dx() -> Error {
    Error::arg("dx", "a backward without accumulator returned no dx")
}

impl<B: Backend> Llama<B> {
    /// The soft prompt's number of virtual tokens (0 without one).
    pub fn num_virtual_tokens(&self) -> usize {
        self.soft_prompt
            .as_ref()
            .map_or(0, |p| p.num_virtual_tokens())
    }

    /// Lays out `batch` for the soft prompt (see [`Prepared`]). Errors: a sequence that the
    /// virtual tokens push past `max_position_embeddings`.
    pub(crate) fn prepare(&self, batch: &PackedBatch) -> Result<Prepared> {
        let Some(sp) = &self.soft_prompt else {
            return Ok(Prepared {
                batch: batch.clone(),
                real_rows: None,
                virt: None,
                prefix: None,
            });
        };
        let nvt = sp.num_virtual_tokens();
        let longest = batch.seqs.iter().map(|s| s.len).max().unwrap_or(0);
        if longest + nvt > self.cfg.max_position_embeddings {
            return Err(Error::arg(
                "num_virtual_tokens",
                format!(
                    "{nvt} virtual tokens + a sequence of {longest} exceed the model's {} \
                     positions; shorten the sequences (max length) or use fewer virtual tokens",
                    self.cfg.max_position_embeddings
                ),
            ));
        }
        if sp.method.prepends_tokens() {
            // PEFT puts the nvt virtual tokens in front of every sequence (positions from 0,
            // labels -100 there). Under causal attention their states do not depend on what
            // follows, so they run once, as a sequence of their own in rows 0..nvt, and every
            // real sequence attends to their keys and values as a prefix.
            let mut b = PackedBatch {
                ids: vec![0; nvt],
                positions: (0..nvt as u32).collect(),
                ..PackedBatch::default()
            };
            b.ids.extend_from_slice(&batch.ids);
            b.positions
                .extend(batch.positions.iter().map(|p| p + nvt as u32));
            b.seqs.push(SeqSpan { start: 0, len: nvt });
            b.seqs.extend(batch.seqs.iter().map(|s| SeqSpan {
                start: s.start + nvt,
                len: s.len,
            }));
            b.target_rows = batch.target_rows.iter().map(|r| r + nvt as u32).collect();
            b.target_labels = batch.target_labels.clone();
            let mut plan = PrefixPlan {
                seqs: vec![SeqSpan { start: 0, len: nvt }],
                real: (0..nvt as u32).collect(),
                slots: Vec::new(),
                src: Vec::new(),
                n_rows: nvt,
                source: PrefixSource::Rows,
            };
            plan.real.resize(nvt + batch.n_tokens(), 0);
            for s in &batch.seqs {
                plan.push_seq(s, nvt, nvt);
            }
            let virt: Vec<u32> = (0..nvt as u32).collect();
            Ok(Prepared {
                batch: b,
                real_rows: Some(
                    (0..batch.n_tokens() as u32)
                        .map(|r| r + nvt as u32)
                        .collect(),
                ),
                virt: Some((virt.clone(), virt)),
                prefix: Some(plan),
            })
        } else {
            let mut b = batch.clone();
            b.positions.iter_mut().for_each(|p| *p += nvt as u32);
            let mut plan = PrefixPlan {
                seqs: Vec::with_capacity(batch.seqs.len()),
                real: vec![0; batch.n_tokens()],
                slots: Vec::new(),
                src: Vec::new(),
                n_rows: 0,
                source: PrefixSource::Prompt,
            };
            for s in &batch.seqs {
                plan.push_seq(s, nvt, 0);
            }
            Ok(Prepared {
                batch: b,
                real_rows: None,
                virt: None,
                prefix: Some(plan),
            })
        }
    }

    /// The soft prompt's output for this forward (prefix tuning: reshaped to
    /// `[nvt * 2L, kv_dim]`, row `t * 2L + s` the slot s of virtual token t).
    pub(crate) fn prompt_state(&self, be: &B) -> Result<Option<PromptState<B>>> {
        let Some(sp) = &self.soft_prompt else {
            return Ok(None);
        };
        let (out, saved) = sp.output(be)?;
        let out = if sp.method == PromptMethod::PrefixTuning {
            let kv = self.cfg.num_key_value_heads * self.cfg.head_dim;
            let n = out.len() / kv;
            out.into_shape(&[n, kv])?
        } else {
            out
        };
        Ok(Some(PromptState { out, saved }))
    }

    /// The decoder's input `[T, d]`: token embeddings, with the virtual tokens' rows from the
    /// prompt (prompt and P-tuning).
    pub(crate) fn embed_input(
        &self,
        be: &B,
        prep: &Prepared,
        prompt: Option<&PromptState<B>>,
    ) -> Result<Tensor<B>> {
        match (&prep.virt, prompt) {
            (Some((vrows, vsrc)), Some(p)) => {
                let real = prep
                    .real_rows
                    .as_ref()
                    .ok_or_else(|| Error::arg("batch", "virtual rows without real rows"))?;
                let real_ids: Vec<u32> = real.iter().map(|&r| prep.batch.ids[r as usize]).collect();
                let mut x = be.zeros(&[prep.batch.n_tokens(), self.cfg.hidden_size])?;
                be.scatter_add_rows(
                    &mut x,
                    real,
                    &be.gather_rows(&self.embed_tokens, &real_ids)?,
                )?;
                be.scatter_add_rows(&mut x, vrows, &be.gather_rows(&p.out, vsrc)?)?;
                Ok(x)
            }
            _ => be.gather_rows(&self.embed_tokens, &prep.batch.ids),
        }
    }

    /// The rows of layer l's prefix keys (`which = 0`) or values (1) in the prefix output.
    fn prefix_rows(&self, plan: &PrefixPlan, l: usize, which: usize) -> Vec<u32> {
        let slots = 2 * self.cfg.num_hidden_layers;
        plan.src
            .iter()
            .map(|&t| (t as usize * slots + 2 * l + which) as u32)
            .collect()
    }

    /// Attention of layer l, over the prefix when prefix tuning runs (q, k after RoPE).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &self,
        be: &B,
        l: usize,
        prep: &Prepared,
        prompt: Option<&PromptState<B>>,
        q: &Tensor<B>,
        k: &Tensor<B>,
        v: &Tensor<B>,
    ) -> Result<(Tensor<B>, AttnSaved<B>)> {
        let c = &self.cfg;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let (hq, hk) = (c.num_attention_heads, c.num_key_value_heads);
        let Some(plan) = &prep.prefix else {
            let att = be.attention(q, k, v, &prep.batch.seqs, hq, hk, scale)?;
            return Ok((att.out.clone(), AttnSaved::Plain(att)));
        };
        let ext = |t: &Tensor<B>, pre: Option<&Tensor<B>>| -> Result<Tensor<B>> {
            let mut e = be.zeros(&[plan.n_rows, t.dim(1)])?;
            be.scatter_add_rows(&mut e, &plan.real, t)?;
            if let Some(pre) = pre {
                be.scatter_add_rows(&mut e, &plan.slots, pre)?;
            }
            Ok(e)
        };
        let (kl, vl) = match (plan.source, prompt) {
            (PrefixSource::Rows, _) => {
                (be.gather_rows(k, &plan.src)?, be.gather_rows(v, &plan.src)?)
            }
            (PrefixSource::Prompt, Some(p)) => (
                be.gather_rows(&p.out, &self.prefix_rows(plan, l, 0))?,
                be.gather_rows(&p.out, &self.prefix_rows(plan, l, 1))?,
            ),
            (PrefixSource::Prompt, None) => {
                return Err(Error::arg(
                    "prefix",
                    "prefix attention without the prompt's output",
                ));
            }
        };
        let qe = ext(q, None)?;
        let ke = ext(k, Some(&kl))?;
        let ve = ext(v, Some(&vl))?;
        let att = be.attention(&qe, &ke, &ve, &plan.seqs, hq, hk, scale)?;
        let out = be.gather_rows(&att.out, &plan.real)?;
        Ok((
            out,
            AttnSaved::Prefix {
                q: qe,
                k: ke,
                v: ve,
                att,
            },
        ))
    }

    /// Backward of [`Llama::attend`]: `(dq, dk, dv)` of the real rows, adding the prefix's
    /// gradient into `d_prompt` (`[nvt * 2L, kv_dim]`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend_backward(
        &self,
        be: &B,
        l: usize,
        prep: &Prepared,
        saved: &AttnSaved<B>,
        q: &Tensor<B>,
        k: &Tensor<B>,
        v: &Tensor<B>,
        d_out: &Tensor<B>,
        d_prompt: Option<&mut Tensor<B>>,
    ) -> Result<(Tensor<B>, Tensor<B>, Tensor<B>)> {
        let c = &self.cfg;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let (hq, hk) = (c.num_attention_heads, c.num_key_value_heads);
        match saved {
            AttnSaved::Plain(att) => {
                be.attention_backward(d_out, q, k, v, att, &prep.batch.seqs, hq, hk, scale)
            }
            AttnSaved::Prefix { q, k, v, att } => {
                let plan = prep
                    .prefix
                    .as_ref()
                    .ok_or_else(|| Error::arg("prefix", "prefix attention without its plan"))?;
                let mut de = be.zeros(&[plan.n_rows, d_out.dim(1)])?;
                be.scatter_add_rows(&mut de, &plan.real, d_out)?;
                let (dq, dk, dv) =
                    be.attention_backward(&de, q, k, v, att, &plan.seqs, hq, hk, scale)?;
                let dkl = be.gather_rows(&dk, &plan.slots)?;
                let dvl = be.gather_rows(&dv, &plan.slots)?;
                let mut dk_rows = be.gather_rows(&dk, &plan.real)?;
                let mut dv_rows = be.gather_rows(&dv, &plan.real)?;
                match (plan.source, d_prompt) {
                    (PrefixSource::Rows, _) => {
                        // Every sequence's slots read the virtual rows: their gradients add up.
                        be.scatter_add_rows(&mut dk_rows, &plan.src, &dkl)?;
                        be.scatter_add_rows(&mut dv_rows, &plan.src, &dvl)?;
                    }
                    (PrefixSource::Prompt, Some(dp)) => {
                        be.scatter_add_rows(dp, &self.prefix_rows(plan, l, 0), &dkl)?;
                        be.scatter_add_rows(dp, &self.prefix_rows(plan, l, 1), &dvl)?;
                    }
                    (PrefixSource::Prompt, None) => {}
                }
                Ok((be.gather_rows(&dq, &plan.real)?, dk_rows, dv_rows))
            }
        }
    }

    /// The attention output after layer l's attention adapter (Houlsby: `h + f(h)`).
    pub(crate) fn attention_site(
        &self,
        be: &B,
        l: usize,
        h: Tensor<B>,
        keep: bool,
    ) -> Result<(Tensor<B>, Option<SiteSaved<B>>)> {
        let Some(bn) = &self.bottleneck else {
            return Ok((h, None));
        };
        let Some(a) = &bn.layers[l].attention else {
            return Ok((h, None));
        };
        let (mut f, s) = a.forward(be, &h, bn.config.non_linearity)?;
        be.axpy(&mut f, 1.0, &h)?;
        Ok((f, keep.then_some(SiteSaved::Houlsby(s))))
    }

    /// Backward of [`Llama::attention_site`]: `dh` from `d` (the gradient of its output),
    /// pushing the adapter's gradients.
    pub(crate) fn attention_site_backward(
        &self,
        be: &B,
        l: usize,
        saved: Option<&SiteSaved<B>>,
        d: &Tensor<B>,
        grads: &mut Vec<(String, Tensor<B>)>,
    ) -> Result<Option<Tensor<B>>> {
        let (Some(bn), Some(SiteSaved::Houlsby(s))) = (&self.bottleneck, saved) else {
            return Ok(None);
        };
        let a = bn.layers[l]
            .attention
            .as_ref()
            .ok_or_else(|| Error::arg("attention_adapters", "saved state without adapter"))?;
        let (mut dh, g) = a.backward(be, s, d, bn.config.non_linearity, true)?;
        be.axpy(&mut dh, 1.0, d)?;
        push_bn(grads, &self.bn_path(l, "attention_adapters"), g);
        Ok(Some(dh))
    }

    /// `x3` after layer l's MLP from `x2` (the residual entering the MLP) and the MLP output
    /// `down`: `x2 + down` plus the output adapter or fusion.
    pub(crate) fn output_site(
        &self,
        be: &B,
        l: usize,
        x2: &Tensor<B>,
        down: Tensor<B>,
        keep: bool,
    ) -> Result<(Tensor<B>, Option<SiteSaved<B>>)> {
        let mut y = down;
        if let Some(fu) = &self.fusion {
            be.axpy(&mut y, 1.0, x2)?;
            let (add, s) = fu.layers[l].forward(be, &y, &fu.activations())?;
            be.axpy(&mut y, 1.0, &add)?;
            return Ok((y, keep.then_some(SiteSaved::Fusion(s))));
        }
        let adapter = self
            .bottleneck
            .as_ref()
            .and_then(|bn| bn.layers[l].output.as_ref().map(|a| (bn, a)));
        let Some((bn, a)) = adapter else {
            be.axpy(&mut y, 1.0, x2)?;
            return Ok((y, None));
        };
        let act = bn.config.non_linearity;
        match bn.config.kind {
            BottleneckKind::Houlsby => {
                let (f, s) = a.forward(be, &y, act)?;
                be.axpy(&mut y, 1.0, &f)?;
                be.axpy(&mut y, 1.0, x2)?;
                Ok((y, keep.then_some(SiteSaved::Houlsby(s))))
            }
            BottleneckKind::Pfeiffer => {
                be.axpy(&mut y, 1.0, x2)?;
                let (f, s) = a.forward(be, &y, act)?;
                be.axpy(&mut y, 1.0, &f)?;
                Ok((y, keep.then_some(SiteSaved::Pfeiffer(s))))
            }
        }
    }

    /// Backward of [`Llama::output_site`] from `d3 = dL/dx3`: `(d x2 direct, d down)` where
    /// `None` for d down means "the same as d x2"; pushes the adapter's or fusion's gradients.
    pub(crate) fn output_site_backward(
        &self,
        be: &B,
        l: usize,
        saved: Option<&SiteSaved<B>>,
        d3: Tensor<B>,
        grads: &mut Vec<(String, Tensor<B>)>,
    ) -> Result<(Tensor<B>, Option<Tensor<B>>)> {
        match saved {
            None => Ok((d3, None)),
            Some(SiteSaved::Fusion(s)) => {
                let fu = self
                    .fusion
                    .as_ref()
                    .ok_or_else(|| Error::arg("fusion", "saved state without fusion"))?;
                let (mut dy, g) = fu.layers[l].backward(be, s, &d3, &fu.activations())?;
                be.axpy(&mut dy, 1.0, &d3)?;
                let base = format!(
                    "model.layers.{l}.output_adapters.adapter_fusion_layer.{}",
                    fu.name()
                );
                for (sfx, t) in crate::adapter::bottleneck::FUSION_SUFFIXES.iter().zip(g) {
                    grads.push((format!("{base}.{sfx}"), t));
                }
                Ok((dy, None))
            }
            Some(SiteSaved::Houlsby(s)) | Some(SiteSaved::Pfeiffer(s)) => {
                let bn = self
                    .bottleneck
                    .as_ref()
                    .ok_or_else(|| Error::arg("output_adapters", "saved state without adapter"))?;
                let a = bn.layers[l]
                    .output
                    .as_ref()
                    .ok_or_else(|| Error::arg("output_adapters", "saved state without adapter"))?;
                let (df, g) = a.backward(be, s, &d3, bn.config.non_linearity, true)?;
                push_bn(grads, &self.bn_path(l, "output_adapters"), g);
                if matches!(saved, Some(SiteSaved::Pfeiffer(_))) {
                    let mut dy = df;
                    be.axpy(&mut dy, 1.0, &d3)?;
                    Ok((dy, None))
                } else {
                    let mut dd = df;
                    be.axpy(&mut dd, 1.0, &d3)?;
                    Ok((d3, Some(dd)))
                }
            }
        }
    }

    /// `model.layers.{l}.{site}.adapters.{name}` of the trained bottleneck adapter.
    pub(crate) fn bn_path(&self, l: usize, site: &str) -> String {
        let name = self
            .bottleneck
            .as_ref()
            .map_or("adapter", |b| b.config.name.as_str());
        format!("model.layers.{l}.{site}.adapters.{name}")
    }

    /// The weight layer l's norm `which` (0 input, 1 post-attention) uses: LN tuning's copy
    /// when there is one.
    pub(crate) fn layer_norm_weight(&self, l: usize, which: usize) -> &Tensor<B> {
        if let Some(ln) = &self.ln_tuning
            && let Some(t) = &ln.layers[l][which]
        {
            return t;
        }
        let b = &self.layers[l];
        if which == 0 {
            &b.input_layernorm
        } else {
            &b.post_attention_layernorm
        }
    }

    /// The final norm's weight (LN tuning's copy when there is one).
    pub(crate) fn final_norm_weight(&self) -> &Tensor<B> {
        self.ln_tuning
            .as_ref()
            .and_then(|ln| ln.norm.as_ref())
            .unwrap_or(&self.norm)
    }

    /// Whether layer l's norm `which` is tuned by LN tuning.
    pub(crate) fn norm_tuned(&self, l: usize, which: usize) -> bool {
        self.ln_tuning
            .as_ref()
            .is_some_and(|ln| ln.layers[l][which].is_some())
    }

    /// The lowest layer with anything the additive and selective methods train (soft prompts:
    /// 0), or `None`.
    pub(crate) fn lowest_additive(&self) -> Option<usize> {
        if self.soft_prompt.is_some() {
            return Some(0);
        }
        let n = self.layers.len();
        let ln = self
            .ln_tuning
            .as_ref()
            .and_then(|ln| (0..n).find(|&l| ln.layers[l].iter().any(Option::is_some)));
        let ln = match (&self.ln_tuning, ln) {
            (Some(t), None) if t.norm.is_some() => Some(n.saturating_sub(1)),
            (_, x) => x,
        };
        let bn = self.bottleneck.as_ref().and_then(|b| {
            (0..n).find(|&l| b.layers[l].attention.is_some() || b.layers[l].output.is_some())
        });
        let fu = self.fusion.as_ref().map(|_| 0);
        [ln, bn, fu].into_iter().flatten().min()
    }

    /// The gradient of the soft prompt's parameters from the gradient of its output.
    pub(crate) fn prompt_backward(
        &self,
        be: &B,
        state: &PromptState<B>,
        d_out: Tensor<B>,
        grads: &mut Vec<(String, Tensor<B>)>,
    ) -> Result<()> {
        let sp = self
            .soft_prompt
            .as_ref()
            .ok_or_else(|| Error::arg("prompt", "prompt state without soft prompt"))?;
        let d = if sp.method == PromptMethod::PrefixTuning {
            let n = d_out.len();
            d_out.into_shape(&[sp.num_virtual_tokens(), n / sp.num_virtual_tokens()])?
        } else {
            d_out
        };
        let g = sp.backward(be, &state.saved, &d)?;
        for ((name, _), t) in sp.params().into_iter().zip(g) {
            grads.push((format!("prompt_encoder.{name}"), t));
        }
        Ok(())
    }

    /// The virtual tokens' share of the input gradient (prompt and P-tuning).
    pub(crate) fn prompt_input_grad(
        &self,
        be: &B,
        prep: &Prepared,
        dx: &Tensor<B>,
        state: &PromptState<B>,
    ) -> Result<Option<Tensor<B>>> {
        let Some((vrows, vsrc)) = &prep.virt else {
            return Ok(None);
        };
        let mut dp = be.zeros(state.out.shape())?;
        be.scatter_add_rows(&mut dp, vsrc, &be.gather_rows(dx, vrows)?)?;
        Ok(Some(dp))
    }
}

fn push_bn<B: Backend>(
    grads: &mut Vec<(String, Tensor<B>)>,
    path: &str,
    g: Option<[Tensor<B>; 4]>,
) {
    if let Some(g) = g {
        for (sfx, t) in crate::adapter::bottleneck::BN_SUFFIXES.iter().zip(g) {
            grads.push((format!("{path}.{sfx}"), t));
        }
    }
}

/// A dx that must exist.
pub(crate) fn need<B: Backend>(t: Option<Tensor<B>>) -> Result<Tensor<B>> {
    t.ok_or_else(no_dx)
}
