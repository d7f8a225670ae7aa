//! Many adapters in one batch (Punica's SGMV/BGMV, S-LoRA, vLLM's multi-LoRA): every row of a
//! batch adds the low-rank term of its own adapter, or none, to ONE base product.
//!
//! ```text
//! y[t] = x[t] W^T + bias + (x[t] A_i^T) B_i'^T      i = adapter_of_row[t], none when -1
//! B_i' = scale_i · diag(out_scale_i) · B_i · diag(rank_scale_i)
//! ```
//!
//! The K terms of one projection are packed once into a [`LowRankPool`], which folds each
//! term's scalar, per-output and per-rank scales into its `B` (exact algebra; only the float
//! rounding order changes), so LoRA, rsLoRA, VeRA and AdaLoRA adapters of different ranks mix
//! freely in one launch: the pool is ragged (no padding to a common rank, no list of supported
//! shapes). DoRA cannot mix: its column scale `m / ||W + ΔW||` rescales the base product
//! itself, per adapter, so rows of different DoRA adapters cannot share one `x W^T` (PEFT's
//! `adapter_names` refuses DoRA for the same reason); the pool refuses it.
//!
//! The rows of one adapter need not be contiguous: a prefill batch has one run of rows per
//! sequence (SGMV's segments) and a decode batch one row per sequence (BGMV's gathered form);
//! both are the same per-row index vector here ([`crate::backend::Backend::linear_multi`]).

use super::{Kernels, LowRank, Tensor};
use crate::error::{Error, Result};

/// The low-rank terms of K adapters on one projection `[out, in]`, packed for a mixed batch.
///
/// Layout (what the kernels read): `a [max(R, 1), in]` stacks every adapter's `A_i [r_i, in]`
/// (R = sum of the ranks; a layer of a VeRA projection keeps its leading `in` columns);
/// `b [max(Σ out·r_i, 1)]` holds block i, the folded `B_i' [out, r_i]` row-major, at
/// [`LowRankPool::b_offset`]. An adapter that does not adapt this projection has rank 0 (its
/// rows get the base product only).
pub struct LowRankPool<B: Kernels> {
    pub(crate) a: Tensor<B>,
    pub(crate) b: Tensor<B>,
    ranks: Vec<usize>,
    a_rows: Vec<usize>,
    b_offsets: Vec<usize>,
    dims: (usize, usize),
}

impl<B: Kernels> Clone for LowRankPool<B> {
    fn clone(&self) -> Self {
        LowRankPool {
            a: self.a.clone(),
            b: self.b.clone(),
            ranks: self.ranks.clone(),
            a_rows: self.a_rows.clone(),
            b_offsets: self.b_offsets.clone(),
            dims: self.dims,
        }
    }
}

impl<B: Kernels> std::fmt::Debug for LowRankPool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LowRankPool{:?} ranks {:?}", self.dims, self.ranks)
    }
}

impl<B: Kernels> LowRankPool<B> {
    /// Number of adapters K.
    pub fn len(&self) -> usize {
        self.ranks.len()
    }
    /// True for a pool of no adapter.
    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
    }
    /// `(out, in)` of the projection.
    pub fn dims(&self) -> (usize, usize) {
        self.dims
    }
    /// Rank of adapter i (0: it does not adapt this projection).
    pub fn rank(&self, i: usize) -> usize {
        self.ranks[i]
    }
    /// Every adapter's rank.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }
    /// First row of `A_i` in the stacked `a`.
    pub fn a_row(&self, i: usize) -> usize {
        self.a_rows[i]
    }
    /// Offset (in elements) of the folded `B_i' [out, r_i]` in `b`.
    pub fn b_offset(&self, i: usize) -> usize {
        self.b_offsets[i]
    }
    /// The stacked `A` `[max(R, 1), in]`.
    pub fn a(&self) -> &Tensor<B> {
        &self.a
    }
    /// The folded `B'` blocks, flat.
    pub fn b(&self) -> &Tensor<B> {
        &self.b
    }
}

/// The host side of a pool: the stacked A, the folded B blocks and their offsets, from the
/// terms' values (`downloaded(i)`: `lora_a [r, cols]`, `lora_b [rows, r]`, rank scale, out
/// scale). Errors: a term with a column scale (DoRA).
#[allow(clippy::type_complexity)]
pub(crate) fn fold_terms<B: Kernels>(
    din: usize,
    dout: usize,
    terms: &[Option<LowRank<'_, B>>],
    mut download: impl FnMut(&Tensor<B>) -> Result<Vec<f32>>,
) -> Result<(Vec<f32>, Vec<f32>, Vec<usize>, Vec<usize>, Vec<usize>)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut ranks, mut a_rows, mut b_offsets) = (Vec::new(), Vec::new(), Vec::new());
    for (i, term) in terms.iter().enumerate() {
        a_rows.push(a.len() / din.max(1));
        b_offsets.push(b.len());
        let Some(t) = term else {
            ranks.push(0);
            continue;
        };
        if t.col_scale.is_some() {
            return Err(Error::arg(
                format!("terms[{i}]"),
                "a DoRA term cannot join a mixed batch: its column scale m / ||W + dW|| \
                 rescales the base product per adapter, so its rows cannot share one x W^T \
                 (merge it, or serve it alone)",
            ));
        }
        let r = t.r();
        let cols = t.lora_a.dim(1);
        let av = download(t.lora_a)?;
        for row in av.chunks(cols.max(1)).take(r) {
            a.extend_from_slice(&row[..din]);
        }
        let bv = download(t.lora_b)?;
        let rs = t.rank_scale.map(&mut download).transpose()?;
        let os = t.out_scale.map(&mut download).transpose()?;
        for o in 0..dout {
            let ko = t.scale * os.as_ref().map_or(1.0, |v| v[o]);
            for j in 0..r {
                let kj = rs.as_ref().map_or(1.0, |v| v[j]);
                b.push(ko * bv[o * r + j] * kj);
            }
        }
        ranks.push(r);
    }
    Ok((a, b, ranks, a_rows, b_offsets))
}

/// Assembles a pool from its uploaded parts (see [`fold_terms`]).
pub(crate) fn pool_from_parts<B: Kernels>(
    a: Tensor<B>,
    b: Tensor<B>,
    ranks: Vec<usize>,
    a_rows: Vec<usize>,
    b_offsets: Vec<usize>,
    dims: (usize, usize),
) -> LowRankPool<B> {
    LowRankPool {
        a,
        b,
        ranks,
        a_rows,
        b_offsets,
        dims,
    }
}

/// Whether any row names an adapter with a term on this projection.
pub(crate) fn any_term<B: Kernels>(pool: &LowRankPool<B>, adapter_of_row: &[i32]) -> bool {
    adapter_of_row
        .iter()
        .any(|&i| i >= 0 && pool.rank(i as usize) > 0)
}
