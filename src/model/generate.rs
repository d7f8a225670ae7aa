//! Generation with a per-layer KV cache: one prefill of every prompt, then one decode step per
//! new token that runs the model on the new tokens only, their attention reading the cached
//! keys and values ([`Backend::attention_cached`]). Several prompts decode together in one
//! batch; each stops at its end-of-sequence token or its budget.
//!
//! Sampling follows transformers' `generate`: greedy when `temperature == 0`, else softmax of
//! `logits / temperature` restricted to the smallest set of most likely tokens whose mass
//! reaches `top_p` (nucleus sampling), drawn from a seeded generator (ChaCha8; lorafuse's own
//! stream, not torch's).

use super::llama::{Llama, PackedBatch, argmax};
use super::multi::Mixed;
use crate::backend::{Backend, SeqSpan, Tensor};
use crate::error::{Error, Result};
use rand::{RngExt, SeedableRng};

/// The keys and values of every layer for a batch of sequences: sequence s owns rows
/// `s * capacity .. s * capacity + lens[s]` of each layer's `[n_seqs * capacity, kv_width]`
/// tensors (keys after RoPE).
pub struct KvCache<B: Backend> {
    k: Vec<Tensor<B>>,
    v: Vec<Tensor<B>>,
    capacity: usize,
    lens: Vec<usize>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `n_seqs` sequences of up to `capacity` tokens each. Errors: device
    /// memory.
    pub fn new(be: &B, model: &Llama<B>, n_seqs: usize, capacity: usize) -> Result<Self> {
        let c = &model.cfg;
        let kw = c.num_key_value_heads * c.head_dim;
        let rows = n_seqs * capacity;
        let mut k = Vec::with_capacity(c.num_hidden_layers);
        let mut v = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            k.push(be.zeros(&[rows, kw])?);
            v.push(be.zeros(&[rows, kw])?);
        }
        Ok(KvCache {
            k,
            v,
            capacity,
            lens: vec![0; n_seqs],
        })
    }

    /// Tokens cached for each sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
}

/// How the next token is chosen (transformers' `do_sample`, `temperature`, `top_p`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0: greedy (argmax); otherwise the softmax temperature (> 0).
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]` (1: the whole distribution).
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };

    /// Errors: a negative or non-finite temperature, a top_p outside `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::arg(
                "temperature",
                format!(
                    "must be >= 0 and finite (0 = greedy), got {}",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::arg(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        Ok(())
    }
}

/// The sampler's state: the rule and its generator.
struct Sampler {
    rule: Sampling,
    rng: rand_chacha::ChaCha8Rng,
}

impl Sampler {
    fn new(rule: Sampling) -> Self {
        Sampler {
            rule,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(rule.seed),
        }
    }

    /// The next token from one row of logits.
    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.rule.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        // Softmax of logits / T in f64, most likely first (ties by id), then the nucleus.
        let t = self.rule.temperature as f64;
        let m = logits
            .iter()
            .fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let mut p: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((l as f64 - m) / t).exp()))
            .collect();
        let z: f64 = p.iter().map(|x| x.1).sum();
        p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let top_p = self.rule.top_p as f64;
        let mut mass = 0.0;
        let mut keep = 0;
        for (_, w) in &p {
            mass += w / z;
            keep += 1;
            if mass >= top_p {
                break;
            }
        }
        let kept = &p[..keep];
        let total: f64 = kept.iter().map(|x| x.1).sum();
        let mut u = self.rng.random::<f64>() * total;
        for &(i, w) in kept {
            if u < w {
                return i as u32;
            }
            u -= w;
        }
        kept[keep - 1].0 as u32
    }
}

impl<B: Backend> Llama<B> {
    /// Runs the decoder on `new[s]`, the new tokens of sequence s (possibly none), appending
    /// their keys and values to the cache, and returns the logits `[n, vocab]` at the last new
    /// token of each sequence that has new tokens, in order. Errors: a sequence that would
    /// outgrow the cache, device errors.
    pub fn forward_cached(
        &self,
        be: &B,
        cache: &mut KvCache<B>,
        new: &[&[u32]],
    ) -> Result<Tensor<B>> {
        self.forward_cached_inner(be, cache, new, None, None)
    }

    /// [`Llama::forward_cached`] of a mixed batch: sequence s runs with adapter
    /// `mixed.adapter_of_seq[s]` (-1: the base model), every projection one base product for
    /// the whole batch ([`Backend::linear_multi`]). Row s of the result equals
    /// [`Llama::forward_cached`] of sequence s alone on the model with that adapter loaded.
    /// Errors: as [`Llama::forward_cached`]; the model has adapters of its own; indices.
    pub fn forward_cached_multi(
        &self,
        be: &B,
        cache: &mut KvCache<B>,
        new: &[&[u32]],
        mixed: Mixed<'_, B>,
    ) -> Result<Tensor<B>> {
        mixed.adapters.check_model(self)?;
        mixed
            .adapters
            .check_indices(mixed.adapter_of_seq, cache.lens.len())?;
        self.forward_cached_inner(be, cache, new, None, Some(mixed))
    }

    /// [`Llama::forward_cached`] where `virt`, when given, supplies the input rows itself:
    /// `(embeddings [n, d], per-sequence counts)` instead of token ids (prompt tuning's
    /// virtual tokens at the start of every sequence); `multi`, when given, the adapter of
    /// every sequence in a mixed batch (checked by the caller).
    fn forward_cached_inner(
        &self,
        be: &B,
        cache: &mut KvCache<B>,
        new: &[&[u32]],
        virt: Option<(&Tensor<B>, &[usize])>,
        multi: Option<Mixed<'_, B>>,
    ) -> Result<Tensor<B>> {
        let c = &self.cfg;
        if self.multi_lora.is_some() {
            return Err(Error::arg(
                "model",
                "the model holds several adapters in training (MultiLora): take them off \
                 (into_sets) and serve them as a mixed batch (MultiAdapters)",
            ));
        }
        if new.len() != cache.lens.len() {
            return Err(Error::arg(
                "new",
                format!(
                    "{} token lists for a cache of {} sequences",
                    new.len(),
                    cache.lens.len()
                ),
            ));
        }
        let count = |s: usize| virt.map_or(new[s].len(), |(_, n)| n[s]);
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut q_seqs = Vec::new();
        let mut kv_seqs = Vec::new();
        let mut last_rows = Vec::new();
        let mut adapter_of_row = Vec::new();
        let mut rows = 0usize;
        for (s, seq) in new.iter().enumerate() {
            let n = count(s);
            if n == 0 {
                continue;
            }
            let past = cache.lens[s];
            if past + n > cache.capacity {
                return Err(Error::arg(
                    "new",
                    format!(
                        "sequence {s}: {past} cached + {n} new tokens exceed the cache's {}",
                        cache.capacity
                    ),
                ));
            }
            q_seqs.push(SeqSpan {
                start: rows,
                len: n,
            });
            kv_seqs.push(SeqSpan {
                start: s * cache.capacity,
                len: past + n,
            });
            if virt.is_none() {
                ids.extend_from_slice(&seq[..n]);
            }
            for i in 0..n {
                positions.push((past + i) as u32);
                slots.push((s * cache.capacity + past + i) as u32);
            }
            if let Some(m) = multi {
                adapter_of_row.extend(std::iter::repeat_n(m.adapter_of_seq[s], n));
            }
            rows += n;
            last_rows.push((rows - 1) as u32);
        }
        if rows == 0 {
            return Err(Error::arg("new", "no new token in any sequence"));
        }
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let sh = self.vera_shared.as_ref();
        let mut x = match virt {
            Some((e, _)) => e.clone(),
            None => be.gather_rows(&self.embed_tokens, &ids)?,
        };
        for (l, b) in self.layers.iter().enumerate() {
            // A projection: its own adapter, or in a mixed batch every row's from the pool.
            let proj = |p: usize, x: &Tensor<B>| -> Result<Tensor<B>> {
                match multi.and_then(|m| m.adapters.pool(l, p)) {
                    Some(pool) => {
                        let base = &b.proj[p].base;
                        be.linear_multi(
                            x,
                            base.weight.as_base(),
                            base.bias.as_ref(),
                            pool,
                            &adapter_of_row,
                        )
                    }
                    None => Ok(b.proj[p].forward(be, sh, x)?.0),
                }
            };
            let (xn1, _) = be.rmsnorm(&x, self.layer_norm_weight(l, 0), c.rms_norm_eps)?;
            let mut q = proj(0, &xn1)?;
            let mut k = proj(1, &xn1)?;
            let v = proj(2, &xn1)?;
            be.rope(&mut q, &positions, c.head_dim, c.rope_theta, false)?;
            be.rope(&mut k, &positions, c.head_dim, c.rope_theta, false)?;
            // Each cache row is written once (zeros before), so adding writes it.
            be.scatter_add_rows(&mut cache.k[l], &slots, &k)?;
            be.scatter_add_rows(&mut cache.v[l], &slots, &v)?;
            let att = be.attention_cached(
                &q,
                &cache.k[l],
                &cache.v[l],
                &q_seqs,
                &kv_seqs,
                c.num_attention_heads,
                c.num_key_value_heads,
                scale,
            )?;
            let o = proj(3, &att)?;
            let (o, _) = self.attention_site(be, l, o, false)?;
            let mut x2 = o;
            be.axpy(&mut x2, 1.0, &x)?;
            let (xn2, _) = be.rmsnorm(&x2, self.layer_norm_weight(l, 1), c.rms_norm_eps)?;
            let gate = proj(4, &xn2)?;
            let up = proj(5, &xn2)?;
            let act = be.swiglu(&gate, &up)?;
            let down = proj(6, &act)?;
            let (x3, _) = self.output_site(be, l, &x2, down, false)?;
            x = x3;
        }
        for s in 0..new.len() {
            cache.lens[s] += count(s);
        }
        let sel = be.gather_rows(&x, &last_rows)?;
        let (hn, _) = be.rmsnorm(&sel, self.final_norm_weight(), c.rms_norm_eps)?;
        be.linear(&hn, self.head(), None)
    }

    /// Puts the soft prompt into a fresh cache for every sequence: prefix tuning writes each
    /// layer's prefix keys and values (no RoPE) as the first nvt cached rows; prompt tuning and
    /// P-tuning run the virtual tokens through the model as the first nvt tokens. A no-op
    /// without a soft prompt. Errors: a cache too small, device errors.
    pub fn prefill_soft_prompt(&self, be: &B, cache: &mut KvCache<B>) -> Result<()> {
        let Some(state) = self.prompt_state(be)? else {
            return Ok(());
        };
        let nvt = self.num_virtual_tokens();
        let n = cache.lens.len();
        if cache.lens.iter().any(|&l| l != 0) || nvt > cache.capacity {
            return Err(Error::arg(
                "cache",
                format!(
                    "the soft prompt needs an empty cache with room for its {nvt} virtual tokens"
                ),
            ));
        }
        let sp = self
            .soft_prompt
            .as_ref()
            .ok_or_else(|| Error::arg("prompt", "no soft prompt"))?;
        if sp.method.prepends_tokens() {
            let src: Vec<u32> = (0..n).flat_map(|_| 0..nvt as u32).collect();
            let e = be.gather_rows(&state.out, &src)?;
            let counts = vec![nvt; n];
            let empty: Vec<&[u32]> = vec![&[]; n];
            self.forward_cached_inner(be, cache, &empty, Some((&e, &counts)), None)?;
        } else {
            let slots2 = 2 * self.cfg.num_hidden_layers;
            let cap = cache.capacity;
            let dst: Vec<u32> = (0..n)
                .flat_map(|s| (0..nvt).map(move |t| (s * cap + t) as u32))
                .collect();
            for l in 0..self.cfg.num_hidden_layers {
                for (which, target) in [(0, &mut cache.k[l]), (1, &mut cache.v[l])] {
                    let src: Vec<u32> = (0..n)
                        .flat_map(|_| (0..nvt).map(|t| (t * slots2 + 2 * l + which) as u32))
                        .collect();
                    be.scatter_add_rows(target, &dst, &be.gather_rows(&state.out, &src)?)?;
                }
            }
            cache.lens.iter_mut().for_each(|x| *x = nvt);
        }
        Ok(())
    }

    /// Generates up to `max_new` tokens after each prompt, all prompts in one batch with the KV
    /// cache: each sequence stops after `eos` (included in its output) or at `max_new`.
    /// Returns the new tokens of each prompt. Errors: an empty prompt, an invalid sampling
    /// rule, device errors.
    pub fn generate(
        &self,
        be: &B,
        prompts: &[Vec<u32>],
        max_new: usize,
        eos: u32,
        sampling: Sampling,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_inner(be, prompts, max_new, eos, sampling, None)
    }

    /// [`Llama::generate`] of a mixed batch: prompt s decodes with adapter
    /// `mixed.adapter_of_seq[s]` (-1: the base model), all prompts in one batch with the KV
    /// cache, every projection one base product per step ([`Llama::forward_cached_multi`]).
    /// Errors: as [`Llama::generate`]; the model has adapters of its own; indices.
    pub fn generate_multi(
        &self,
        be: &B,
        prompts: &[Vec<u32>],
        mixed: Mixed<'_, B>,
        max_new: usize,
        eos: u32,
        sampling: Sampling,
    ) -> Result<Vec<Vec<u32>>> {
        mixed.adapters.check_model(self)?;
        mixed
            .adapters
            .check_indices(mixed.adapter_of_seq, prompts.len())?;
        self.generate_inner(be, prompts, max_new, eos, sampling, Some(mixed))
    }

    fn generate_inner(
        &self,
        be: &B,
        prompts: &[Vec<u32>],
        max_new: usize,
        eos: u32,
        sampling: Sampling,
        multi: Option<Mixed<'_, B>>,
    ) -> Result<Vec<Vec<u32>>> {
        sampling.validate()?;
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::arg("prompt", format!("prompt {i} is empty")));
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let nvt = self.num_virtual_tokens();
        let mut cache = KvCache::new(be, self, prompts.len(), nvt + longest + max_new)?;
        self.prefill_soft_prompt(be, &mut cache)?;
        let mut sampler = Sampler::new(sampling);
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let mut done = vec![max_new == 0; prompts.len()];
        let mut step: Vec<Vec<u32>> = prompts.to_vec();
        while done.iter().any(|d| !d) {
            let new: Vec<&[u32]> = step
                .iter()
                .zip(&done)
                .map(|(t, &d)| if d { &[][..] } else { &t[..] })
                .collect();
            let logits =
                be.download(&self.forward_cached_inner(be, &mut cache, &new, None, multi)?)?;
            let vocab = logits.len() / done.iter().filter(|d| !**d).count();
            let mut rows = logits.chunks(vocab);
            for s in 0..prompts.len() {
                if done[s] {
                    step[s].clear();
                    continue;
                }
                let row = rows
                    .next()
                    .ok_or_else(|| Error::arg("logits", "a row is missing"))?;
                let next = sampler.pick(row);
                out[s].push(next);
                done[s] = next == eos || out[s].len() >= max_new;
                step[s] = vec![next];
            }
        }
        Ok(out)
    }

    /// Greedy decoding of one prompt with the KV cache ([`Llama::generate`]).
    pub fn generate_greedy(
        &self,
        be: &B,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
    ) -> Result<Vec<u32>> {
        Ok(self
            .generate(be, &[prompt.to_vec()], max_new, eos, Sampling::GREEDY)?
            .pop()
            .unwrap_or_default())
    }

    /// Greedy decoding that recomputes the whole prefix for every new token (no cache): the
    /// reference the cached path is checked and timed against.
    pub fn generate_greedy_uncached(
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
