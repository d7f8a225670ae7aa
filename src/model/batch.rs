//! A packed batch: every sequence's tokens back to back on one token axis, without padding
//! (FlashAttention's "varlen" layout), and the loss targets.

use crate::backend::SeqSpan;
use crate::error::{Error, Result};

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
    /// When several adapters train in one pass ([`crate::model::multi::MultiLora`]): the
    /// adapter of each sequence (index into its names); empty otherwise.
    pub adapter_of_seq: Vec<i32>,
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
