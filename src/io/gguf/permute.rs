//! The q/k row permutation between llama.cpp's (GGUF) order and transformers' order.

use crate::error::{Error, Result};

fn check_qk(rows: &[f32], n_rows: usize, n_cols: usize, n_head: usize) -> Result<usize> {
    if n_rows.checked_mul(n_cols) != Some(rows.len()) {
        return Err(Error::shape(
            "rows",
            format!(
                "[{n_rows}, {n_cols}] = {} elements",
                n_rows.saturating_mul(n_cols)
            ),
            &[rows.len()],
        ));
    }
    if n_head == 0 || !n_rows.is_multiple_of(n_head) || !(n_rows / n_head).is_multiple_of(2) {
        return Err(Error::arg(
            "n_head",
            format!("{n_rows} rows do not split into {n_head} heads of an even size"),
        ));
    }
    Ok(n_rows / n_head)
}

/// Moves rows within each head: output row `h*hd + dst(r)` takes input row `h*hd + r`.
fn permute_rows(rows: &mut [f32], n_cols: usize, head_dim: usize, src_of: impl Fn(usize) -> usize) {
    if n_cols == 0 {
        return;
    }
    let mut tmp = vec![0f32; head_dim * n_cols];
    for head in rows.chunks_exact_mut(head_dim * n_cols) {
        tmp.copy_from_slice(head);
        for (r, dst) in head.chunks_exact_mut(n_cols).enumerate() {
            let s = src_of(r);
            dst.copy_from_slice(&tmp[s * n_cols..(s + 1) * n_cols]);
        }
    }
}

/// Converts `attn_q` / `attn_k` rows from llama.cpp's (GGUF) order to transformers' order, in
/// place, as transformers does when loading a GGUF (`_reverse_permute_weights`):
///
/// `hf row h*hd + half*(hd/2) + j  ==  gguf row h*hd + 2*j + half`  (`j < hd/2`, `half` 0 or 1),
///
/// i.e. `hf = gguf.reshape(n_head, hd/2, 2, n_cols).transpose(1, 2).reshape(n_rows, n_cols)`.
/// `rows` is row-major `[n_rows, n_cols]` f32 (`n_rows = n_head * hd`); use the query head
/// count for q and the KV head count for k. Works on any row-wise data (a bias, lora_B).
///
/// # Errors
/// [`Error::Shape`] if `rows.len() != n_rows * n_cols`; [`Error::InvalidArgument`] if `n_rows`
/// is not `n_head` times an even head size.
pub fn unpermute_qk(rows: &mut [f32], n_rows: usize, n_cols: usize, n_head: usize) -> Result<()> {
    let hd = check_qk(rows, n_rows, n_cols, n_head)?;
    let half = hd / 2;
    // HF row r = which*half + j comes from GGUF row 2*j + which.
    permute_rows(rows, n_cols, hd, |r| 2 * (r % half) + r / half);
    Ok(())
}

/// The inverse of [`unpermute_qk`]: transformers' order to llama.cpp's (GGUF) order, in place
/// (llama.cpp's converter `permute`: `w.reshape(n_head, 2, hd/2, n_cols).swapaxes(1, 2)`).
///
/// # Errors
/// As [`unpermute_qk`].
pub fn permute_qk(rows: &mut [f32], n_rows: usize, n_cols: usize, n_head: usize) -> Result<()> {
    let hd = check_qk(rows, n_rows, n_cols, n_head)?;
    let half = hd / 2;
    // GGUF row r = 2*j + which comes from HF row which*half + j.
    permute_rows(rows, n_cols, hd, |r| (r % 2) * half + r / 2);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_permutation_matches_formula() {
        // 2 heads of hd = 4, 3 columns; row r holds value r in every column.
        let (n_head, hd, n_cols) = (2, 4, 3);
        let gguf: Vec<f32> = (0..n_head * hd)
            .flat_map(|r| std::iter::repeat_n(r as f32, n_cols))
            .collect();
        let mut hf = gguf.clone();
        unpermute_qk(&mut hf, n_head * hd, n_cols, n_head).unwrap();
        for h in 0..n_head {
            for half in 0..2 {
                for j in 0..hd / 2 {
                    let hf_row = h * hd + half * hd / 2 + j;
                    let gguf_row = h * hd + 2 * j + half;
                    assert_eq!(hf[hf_row * n_cols], gguf_row as f32);
                }
            }
        }
        permute_qk(&mut hf, n_head * hd, n_cols, n_head).unwrap();
        assert_eq!(hf, gguf);
        assert!(unpermute_qk(&mut hf, 8, 2, 2).is_err());
        assert!(unpermute_qk(&mut hf, 8, 3, 3).is_err());
        assert!(unpermute_qk(&mut hf, 8, 3, 0).is_err());
    }
}
