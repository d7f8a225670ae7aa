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

use super::inject::AdapterSet;
use super::llama::Llama;
use crate::backend::{Backend, LowRankPool};
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
        if adapter_of_seq.len() != n_seqs {
            return Err(Error::arg(
                "adapter_of_seq",
                format!(
                    "{} adapter indices for {n_seqs} sequences",
                    adapter_of_seq.len()
                ),
            ));
        }
        let k = self.names.len() as i64;
        if let Some((s, i)) = adapter_of_seq
            .iter()
            .enumerate()
            .find(|(_, i)| !(-1..k).contains(&i64::from(**i)))
        {
            return Err(Error::arg(
                "adapter_of_seq",
                format!("sequence {s}: adapter {i} is outside -1..{k} (-1: the base model)"),
            ));
        }
        Ok(())
    }
}
