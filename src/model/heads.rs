//! The heads an objective puts on the final normed hidden state, for
//! [`Llama::grads_from_head`]: the LM head (SFT's cross-entropy, DPO's log-probabilities) and
//! the head of transformers' `LlamaForSequenceClassification` with one label, a reward model's
//! `score` `[1, d]` (no bias) on each sequence's last token (a packed batch has no padding, so
//! the last row of each sequence is transformers' "last non-pad token").

use super::additive::need;
use super::llama::{Llama, PackedBatch};
use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};

/// What the head of an objective returns to [`Llama::grads_from_head`].
pub struct HeadGrad<B: Backend> {
    /// Gradient of the objective with respect to the final normed hidden rows `[rows, d]`.
    pub d_hidden: Tensor<B>,
    /// Gradient with respect to the LM head `[vocab, d]` (the tied embedding, or
    /// `lm_head.weight`), when the head is trained; `None` counts as zero.
    pub d_lm_head: Option<Tensor<B>>,
    /// Gradients of trainable tensors the head owns, by their [`Llama::trainable_params`]
    /// name (the reward model's `score.weight`).
    pub own: Vec<(String, Tensor<B>)>,
}

/// The trainable name of the head (PEFT keeps it as `modules_to_save`: in memory
/// `score.modules_to_save.default.weight`, in the file `base_model.model.score.weight`).
pub const SCORE_NAME: &str = "score.weight";

impl<B: Backend> Llama<B> {
    /// The LM head's backward for an objective over logits `hn W^T` (`hn [N, d]`, the final
    /// normed hidden rows; `dlogits [N, vocab]`): `d_hidden = dlogits W`, and with
    /// `head_trained` the head's gradient `dlogits^T hn` (the tied embedding's, or
    /// `lm_head.weight`'s). What a [`Llama::grads_from_head`] head returns for a
    /// language-modelling objective (SFT's cross-entropy, DPO's sequence log-probabilities).
    /// Errors: shapes that disagree with the head.
    pub fn lm_head_backward(
        &self,
        be: &B,
        hn: &Tensor<B>,
        dlogits: &Tensor<B>,
        head_trained: bool,
    ) -> Result<HeadGrad<B>> {
        let d_hidden = need(be.linear_backward_input(dlogits, self.head(), None)?)?;
        let d_lm_head = if head_trained {
            let mut dw = be.zeros(self.head().shape())?;
            be.linear_backward_weight(dlogits, hn, &mut dw)?;
            Some(dw)
        } else {
            None
        };
        Ok(HeadGrad {
            d_hidden,
            d_lm_head,
            own: Vec::new(),
        })
    }

    /// Attaches a fresh `score` head `[1, d]`, drawn from N(0, std²) (transformers initializes
    /// a Linear with `initializer_range`, 0.02 by default) by Box-Muller over a ChaCha8 stream
    /// of `seed`. Errors: a negative or non-finite std.
    pub fn attach_score_head(&mut self, be: &B, std: f32, seed: u64) -> Result<()> {
        use rand::{RngExt, SeedableRng};
        if !(std.is_finite() && std >= 0.0) {
            return Err(Error::arg(
                "std",
                format!("{std} is not a standard deviation"),
            ));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let d = self.cfg.hidden_size;
        let w: Vec<f32> = (0..d)
            .map(|_| {
                let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                std * z as f32
            })
            .collect();
        self.score = Some(be.upload(&w, &[1, d])?);
        Ok(())
    }

    /// Sets the `score` head from `[1, d]` data (a loaded reward model). Errors: another shape.
    pub fn set_score_head(&mut self, be: &B, data: &[f32], shape: &[usize]) -> Result<()> {
        let d = self.cfg.hidden_size;
        if shape != [1, d] || data.len() != d {
            return Err(Error::shape(SCORE_NAME, format!("[1, {d}]"), shape));
        }
        self.score = Some(be.upload(data, &[1, d])?);
        Ok(())
    }

    fn score_weight(&self) -> Result<&Tensor<B>> {
        self.score.as_ref().ok_or_else(|| {
            Error::arg(
                "score",
                "the model has no score head (a reward model: attach_score_head, or load a \
                 SEQ_CLS adapter)",
            )
        })
    }

    /// The rows of the last token of each sequence of `batch`, in order.
    pub fn last_rows(batch: &PackedBatch) -> Vec<u32> {
        batch
            .seqs
            .iter()
            .map(|s| (s.start + s.len.max(1) - 1) as u32)
            .collect()
    }

    /// Each sequence's reward, `[seqs]`: the score of its last token's final hidden state (eval
    /// mode, no gradient). Errors: no score head, an empty batch.
    pub fn rewards(&self, be: &B, batch: &PackedBatch) -> Result<Vec<f64>> {
        self.score_weight()?;
        if batch.seqs.is_empty() {
            return Err(Error::Data("batch has no sequence".into()));
        }
        let hn = self.final_hidden_at(be, batch, &Self::last_rows(batch))?;
        self.score_rows(be, &hn)
    }

    /// The rewards of the final normed hidden rows `hn [n, d]`, `[n]`, on the host.
    pub fn score_rows(&self, be: &B, hn: &Tensor<B>) -> Result<Vec<f64>> {
        let r = be.download(&be.linear(hn, self.score_weight()?, None)?)?;
        Ok(r.into_iter().map(f64::from).collect())
    }

    /// The head's backward for an objective of the rewards of `hn [n, d]` given
    /// `d_rewards [n]`: `d_hidden = d_rewards w` and the head's own gradient
    /// `d_rewards^T hn` under [`SCORE_NAME`]. What a [`Llama::grads_from_head`] head of a
    /// reward model returns. Errors: no score head, a length that is not n.
    pub fn score_head_backward(
        &self,
        be: &B,
        hn: &Tensor<B>,
        d_rewards: &[f32],
    ) -> Result<HeadGrad<B>> {
        let w = self.score_weight()?;
        let dr = be.upload(d_rewards, &[d_rewards.len(), 1])?;
        let d_hidden = be
            .linear_backward_input(&dr, w, None)?
            .ok_or_else(|| Error::arg("score", "no input gradient"))?;
        let mut dw = be.zeros(w.shape())?;
        be.linear_backward_weight(&dr, hn, &mut dw)?;
        Ok(HeadGrad {
            d_hidden,
            d_lm_head: None,
            own: vec![(SCORE_NAME.to_string(), dw)],
        })
    }
}
