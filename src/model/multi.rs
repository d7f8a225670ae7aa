//! Several adapters served in one batch: PEFT's mixed-batch inference
//! (`model(..., adapter_names=[...])`), Punica / S-LoRA / vLLM's multi-LoRA serving. Every
//! sequence names its adapter (or none: the base model), and each projection runs ONE base
//! product for the whole batch plus every row's own low-rank term
//! ([`crate::backend::Backend::linear_multi`] over the projection's [`LowRankPool`]).
//!
//! LoRA, rsLoRA, VeRA and AdaLoRA adapters mix, whatever their ranks and target modules. What
//! changes more than a projection's low-rank term cannot share the batch and is refused when
//! the pools are built, naming the adapter: DoRA (its column scale rescales the base product),
//! IA3 and BEFT (no low-rank term), LN tuning (other norm weights), soft prompts (other
//! sequences), bottleneck adapters and AdapterFusion (other layers); PEFT's `adapter_names`
//! refuses DoRA too.

use super::inject::{AdapterSet, ProjSaved};
use super::llama::{Llama, proj_path};
use crate::adapter::{Adapter, Linear, LoraLayer};
use crate::backend::{Backend, LowRankPool, SeqSpan, Tensor, check};
use crate::error::{Error, Result};

/// A mixed batch's assignment: the packed adapters and the adapter of every sequence
/// (`adapter_of_seq[s]` in `-1..K`, -1: the base model).
#[derive(Debug)]
pub struct Mixed<'a, B: Backend> {
    pub adapters: &'a MultiAdapters<B>,
    pub adapter_of_seq: &'a [i32],
}

impl<B: Backend> Clone for Mixed<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Mixed<'_, B> {}

/// K adapters packed per projection for mixed batches, with their names.
#[derive(Clone, Debug)]
pub struct MultiAdapters<B: Backend> {
    names: Vec<String>,
    /// `[layer][projection]` (order of [`super::llama::PROJ_NAMES`]): the pool of the K terms,
    /// `None` where no adapter adapts the projection.
    pools: Vec<[Option<LowRankPool<B>>; 7]>,
}

impl<B: Backend> MultiAdapters<B> {
    /// Packs `sets` (named adapter sets of this model, as [`Llama::take_adapters`] gives them
    /// after loading each adapter) for mixed batches. Errors: no set, a repeated name, a set of
    /// another model, a part that cannot share a batch (see the module docs), term shapes.
    pub fn new(be: &B, model: &Llama<B>, sets: &[(String, AdapterSet<B>)]) -> Result<Self> {
        if sets.is_empty() {
            return Err(Error::arg("adapters", "no adapter to serve"));
        }
        let n_layers = model.layers.len();
        for (k, (name, set)) in sets.iter().enumerate() {
            if sets[..k].iter().any(|(n, _)| n == name) {
                return Err(Error::arg(
                    "adapters",
                    format!("adapter name `{name}` given twice"),
                ));
            }
            if set.proj.len() != n_layers {
                return Err(Error::arg(
                    "adapters",
                    format!(
                        "adapter `{name}` has {} layers, the model {n_layers}",
                        set.proj.len()
                    ),
                ));
            }
            let other = [
                (set.ln_tuning.is_some(), "LN tuning"),
                (set.soft_prompt.is_some(), "a soft prompt"),
                (set.bottleneck.is_some(), "bottleneck adapters"),
                (set.fusion.is_some(), "AdapterFusion"),
            ];
            if let Some((_, what)) = other.iter().find(|(has, _)| *has) {
                return Err(Error::arg(
                    "adapters",
                    format!(
                        "adapter `{name}` holds {what}, which changes more than a projection's \
                         low-rank term: it cannot share a mixed batch (serve it alone)"
                    ),
                ));
            }
        }
        let mut pools = Vec::with_capacity(n_layers);
        for (l, block) in model.layers.iter().enumerate() {
            let mut row: [Option<LowRankPool<B>>; 7] = std::array::from_fn(|_| None);
            for (p, slot) in row.iter_mut().enumerate() {
                if sets.iter().all(|(_, s)| s.proj[l][p].is_none()) {
                    continue;
                }
                let terms = sets
                    .iter()
                    .map(|(name, s)| {
                        s.proj[l][p]
                            .as_ref()
                            .map(|a| a.lowrank_term(s.vera_shared.as_ref()))
                            .transpose()
                            .map_err(|e| Error::arg(format!("adapter `{name}`"), e.to_string()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let base = &block.proj[p].base;
                *slot = Some(be.lowrank_pool(base.in_features(), base.out_features(), &terms)?);
            }
            pools.push(row);
        }
        Ok(MultiAdapters {
            names: sets.iter().map(|(n, _)| n.clone()).collect(),
            pools,
        })
    }

    /// The adapters' names, in pool order (index i of `adapter_of_row`).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The index of the adapter called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The pool of projection p of layer l (`None`: no adapter adapts it).
    pub fn pool(&self, l: usize, p: usize) -> Option<&LowRankPool<B>> {
        self.pools.get(l)?.get(p)?.as_ref()
    }

    /// Checks that `model` can run these adapters: the same layer count, and no adapter of its
    /// own on any projection (a mixed batch replaces them).
    pub(super) fn check_model(&self, model: &Llama<B>) -> Result<()> {
        if self.pools.len() != model.layers.len() {
            return Err(Error::arg(
                "adapters",
                format!(
                    "built for {} layers, the model has {}",
                    self.pools.len(),
                    model.layers.len()
                ),
            ));
        }
        let own = model
            .layers
            .iter()
            .any(|b| b.proj.iter().any(|p| p.adapter.is_some()))
            || model.soft_prompt.is_some()
            || model.ln_tuning.is_some()
            || model.bottleneck.is_some()
            || model.fusion.is_some();
        if own {
            return Err(Error::arg(
                "adapters",
                "the model has adapters of its own: take them off (Llama::take_adapters) \
                 before serving a mixed batch",
            ));
        }
        Ok(())
    }

    /// Checks one adapter index per sequence, each in `-1..K`.
    pub(super) fn check_indices(&self, adapter_of_seq: &[i32], n_seqs: usize) -> Result<()> {
        check::adapter_indices(
            "adapter_of_seq",
            "sequence",
            adapter_of_seq,
            n_seqs,
            self.names.len(),
        )
    }
}

// ---- training several LoRA adapters in one pass ---------------------------------------------

/// Each adapter's `h = x[rows_k] A_k^T` of a projection's forward (`None`: no row there).
pub(super) type PerAdapterH<B> = Vec<Option<Tensor<B>>>;

/// K LoRA adapters trained together (mLoRA / ASPEN's BatchLoRA): each step's batch is the
/// union of the adapters' batches, every sequence tagged with its adapter
/// ([`crate::model::llama::PackedBatch::adapter_of_seq`]); each projection's frozen base
/// product runs once over the union, and each adapter adds its term on its own rows only, so
/// its loss, gradients and updates are the ones it gets when trained alone.
///
/// On the model ([`Llama::multi_lora`]) its parameters follow the model's own trainable
/// tensors, named as PEFT names the adapters of a model that holds several
/// (`model.layers.0.self_attn.q_proj.lora_A.<name>.weight`).
#[derive(Clone, Debug)]
pub struct MultiLora<B: Backend> {
    names: Vec<String>,
    /// `[k][layer][projection]`: adapter k's LoRA layer on the projection, if it adapts it.
    layers: Vec<Vec<[Option<LoraLayer<B>>; 7]>>,
}

impl<B: Backend> MultiLora<B> {
    /// From named adapter sets of LoRA/rsLoRA adapters (as [`Llama::add_lora`] then
    /// [`Llama::take_adapters`] give them). Errors: no set, a repeated name, a set with anything
    /// but LoRA layers on its projections.
    pub fn new(sets: Vec<(String, AdapterSet<B>)>) -> Result<Self> {
        if sets.is_empty() {
            return Err(Error::arg("adapters", "no adapter to train"));
        }
        let mut names = Vec::new();
        let mut layers = Vec::new();
        for (name, set) in sets {
            if names.contains(&name) {
                return Err(Error::arg(
                    "adapters",
                    format!("adapter name `{name}` given twice"),
                ));
            }
            let only_lora = set.vera_shared.is_none()
                && set.ln_tuning.is_none()
                && set.soft_prompt.is_none()
                && set.bottleneck.is_none()
                && set.fusion.is_none()
                && set
                    .proj
                    .iter()
                    .flatten()
                    .flatten()
                    .all(|a| matches!(a, Adapter::Lora(_)));
            if !only_lora {
                return Err(Error::arg(
                    "adapters",
                    format!(
                        "adapter `{name}`: training several adapters in one pass takes LoRA \
                         (and rsLoRA) adapters only"
                    ),
                ));
            }
            let per_layer = set
                .proj
                .into_iter()
                .map(|row| {
                    row.map(|a| match a {
                        Some(Adapter::Lora(l)) => Some(l),
                        _ => None,
                    })
                })
                .collect();
            names.push(name);
            layers.push(per_layer);
        }
        Ok(MultiLora { names, layers })
    }

    /// The adapters back as named sets (to save each in its own folder).
    pub fn into_sets(self) -> Vec<(String, AdapterSet<B>)> {
        self.names
            .into_iter()
            .zip(self.layers)
            .map(|(name, per_layer)| {
                let mut set = AdapterSet::none(per_layer.len());
                for (dst, row) in set.proj.iter_mut().zip(per_layer) {
                    *dst = row.map(|l| l.map(Adapter::Lora));
                }
                (name, set)
            })
            .collect()
    }

    /// The adapters' names (index k of a batch's `adapter_of_seq`).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Number of layers the adapters were made for.
    pub(super) fn n_layers(&self) -> usize {
        self.layers.first().map_or(0, Vec::len)
    }

    /// Whether any adapter adapts projection p of layer l.
    pub(super) fn adapts(&self, l: usize, p: usize) -> bool {
        self.layers.iter().any(|k| k[l][p].is_some())
    }

    /// The trainable tensors, `(name, tensor)`, adapter by adapter, each adapter's layer by
    /// layer in projection order, `lora_A` then `lora_B`.
    pub fn params(&self) -> Vec<(String, &Tensor<B>)> {
        let mut out = Vec::new();
        for (name, per_layer) in self.names.iter().zip(&self.layers) {
            for (l, row) in per_layer.iter().enumerate() {
                for (p, lora) in row.iter().enumerate() {
                    if let Some(lo) = lora {
                        let path = proj_path(l, p);
                        out.push((format!("{path}.lora_A.{name}.weight"), &lo.lora_a));
                        out.push((format!("{path}.lora_B.{name}.weight"), &lo.lora_b));
                    }
                }
            }
        }
        out
    }

    /// Mutable tensors in the order of [`MultiLora::params`].
    pub fn params_mut(&mut self) -> Vec<&mut Tensor<B>> {
        let mut out = Vec::new();
        for lo in self.layers.iter_mut().flatten().flatten().flatten() {
            out.push(&mut lo.lora_a);
            out.push(&mut lo.lora_b);
        }
        out
    }

    /// How many of [`MultiLora::params`] belong to each adapter, in order.
    pub fn param_counts(&self) -> Vec<usize> {
        self.layers
            .iter()
            .map(|k| 2 * k.iter().flatten().flatten().count())
            .collect()
    }

    /// The rows of each adapter in a batch of `seqs` tagged `adapter_of_seq`. Errors: a tag
    /// count that is not one per sequence, a tag outside `0..K`.
    pub(super) fn rows_of(
        &self,
        seqs: &[SeqSpan],
        adapter_of_seq: &[i32],
    ) -> Result<Vec<Vec<u32>>> {
        if adapter_of_seq.len() != seqs.len() {
            return Err(Error::arg(
                "adapter_of_seq",
                format!(
                    "{} adapter tags for {} sequences (training several adapters tags every \
                     sequence)",
                    adapter_of_seq.len(),
                    seqs.len()
                ),
            ));
        }
        let mut rows = vec![Vec::new(); self.names.len()];
        for (s, &k) in seqs.iter().zip(adapter_of_seq) {
            let dst = rows.get_mut(k as usize).filter(|_| k >= 0).ok_or_else(|| {
                Error::arg(
                    "adapter_of_seq",
                    format!("adapter {k} is outside 0..{}", self.names.len()),
                )
            })?;
            dst.extend(s.start as u32..(s.start + s.len) as u32);
        }
        Ok(rows)
    }

    /// Forward of projection p of layer l over the union batch: `y = x W^T + bias` once, then
    /// `y[rows_k] += s_k (x[rows_k] A_k^T) B_k^T` for every adapter k there. Returns y and,
    /// per adapter, its `h_k = x[rows_k] A_k^T` (for the backward).
    pub(super) fn forward(
        &self,
        be: &B,
        base: &Linear<B>,
        (l, p): (usize, usize),
        x: &Tensor<B>,
        rows: &[Vec<u32>],
    ) -> Result<(Tensor<B>, PerAdapterH<B>)> {
        let mut y = base.forward(be, x)?;
        let mut hs = Vec::with_capacity(self.layers.len());
        for (k, per_layer) in self.layers.iter().enumerate() {
            let h = match &per_layer[l][p] {
                Some(lo) if !rows[k].is_empty() => {
                    let xk = be.gather_rows(x, &rows[k])?;
                    let h = be.linear(&xk, &lo.lora_a, None)?;
                    let mut u = be.linear(&h, &lo.lora_b, None)?;
                    be.scale(&mut u, lo.scaling)?;
                    be.scatter_add_rows(&mut y, &rows[k], &u)?;
                    Some(h)
                }
                _ => None,
            };
            hs.push(h);
        }
        Ok((y, hs))
    }

    /// Backward of [`MultiLora::forward`]: `dx = dy W` once, plus each adapter's term on its
    /// rows; pushes `dA_k = s (dy_k B_k)^T x_k` and `dB_k = s dy_k^T h_k` under the names of
    /// [`MultiLora::params`] (zeros for an adapter with no row in the batch).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        be: &B,
        base: &Linear<B>,
        (l, p): (usize, usize),
        x: &Tensor<B>,
        hs: &PerAdapterH<B>,
        dy: &Tensor<B>,
        rows: &[Vec<u32>],
        grads: &mut Vec<(String, Tensor<B>)>,
    ) -> Result<Tensor<B>> {
        let mut dx = base.backward_input(be, dy)?;
        let path = proj_path(l, p);
        for (k, per_layer) in self.layers.iter().enumerate() {
            let Some(lo) = &per_layer[l][p] else {
                continue;
            };
            let mut da = be.zeros(lo.lora_a.shape())?;
            let mut db = be.zeros(lo.lora_b.shape())?;
            if let Some(h) = &hs[k] {
                let dyk = be.gather_rows(dy, &rows[k])?;
                let xk = be.gather_rows(x, &rows[k])?;
                be.linear_backward_weight(&dyk, h, &mut db)?;
                be.scale(&mut db, lo.scaling)?;
                let mut g = be
                    .linear_backward_input(&dyk, &lo.lora_b, None)?
                    .ok_or_else(|| Error::arg("g", "no input gradient"))?;
                be.scale(&mut g, lo.scaling)?;
                be.linear_backward_weight(&g, &xk, &mut da)?;
                let dxk = be
                    .linear_backward_input(&g, &lo.lora_a, None)?
                    .ok_or_else(|| Error::arg("dx", "no input gradient"))?;
                be.scatter_add_rows(&mut dx, &rows[k], &dxk)?;
            }
            let name = &self.names[k];
            grads.push((format!("{path}.lora_A.{name}.weight"), da));
            grads.push((format!("{path}.lora_B.{name}.weight"), db));
        }
        Ok(dx)
    }
}

impl<B: Backend> Llama<B> {
    /// Puts several LoRA adapters on the model to train in one pass ([`MultiLora`]); every
    /// batch must then tag each sequence with its adapter. Errors: adapters made for another
    /// layer count, a model with adapters of its own or already holding a [`MultiLora`].
    pub fn set_multi_lora(&mut self, multi: MultiLora<B>) -> Result<()> {
        if multi.n_layers() != self.layers.len() {
            return Err(Error::arg(
                "adapters",
                format!(
                    "made for {} layers, the model has {}",
                    multi.n_layers(),
                    self.layers.len()
                ),
            ));
        }
        let own = self.take_adapters();
        let busy = !own.is_empty() || self.multi_lora.is_some() || self.full_finetune.is_some();
        self.put_adapters(own)?;
        if busy {
            return Err(Error::arg(
                "adapters",
                "training several adapters in one pass needs a model with no adapter and no \
                 full fine-tuning of its own",
            ));
        }
        self.multi_lora = Some(multi);
        Ok(())
    }

    /// Takes the [`MultiLora`] off the model.
    pub fn take_multi_lora(&mut self) -> Option<MultiLora<B>> {
        self.multi_lora.take()
    }

    /// Each adapter's rows of `batch` when the model trains several adapters, else `None`.
    pub(super) fn multi_rows(
        &self,
        batch: &super::batch::PackedBatch,
    ) -> Result<Option<Vec<Vec<u32>>>> {
        self.multi_lora
            .as_ref()
            .map(|m| m.rows_of(&batch.seqs, &batch.adapter_of_seq))
            .transpose()
    }

    /// Projection p of layer l: its own adapter, or with several adapters each one's term on
    /// its rows.
    pub(super) fn proj_forward(
        &self,
        be: &B,
        (l, p): (usize, usize),
        x: &Tensor<B>,
        rows: Option<&[Vec<u32>]>,
    ) -> Result<(Tensor<B>, ProjSaved<B>)> {
        let proj = &self.layers[l].proj[p];
        match (&self.multi_lora, rows) {
            (Some(m), Some(rows)) if m.adapts(l, p) => {
                let (y, hs) = m.forward(be, &proj.base, (l, p), x, rows)?;
                Ok((y, ProjSaved::Multi(hs)))
            }
            _ => proj.forward(be, self.vera_shared.as_ref(), x),
        }
    }
}
