//! The mixed-batch term on CUDA ([`crate::backend::multi`], `kernels/multi_lora.cu`): Punica's
//! SGMV shrink/expand and BGMV in one ragged form. The CPU reference is `backend/cpu/multi.rs`.
//!
//! The host buckets the rows that have a term by adapter (in row order, wherever they are in
//! the batch: a prefill's runs and a decode step's interleaved rows alike) and cuts each
//! adapter's rows into groups of at most [`ROWS`]; one int32 upload carries the group table and
//! the rows. Then two launches, whatever the mix of ranks:
//!
//! * `multi_shrink`, grid (groups, rank chunks of 4), block 128: one warp per rank row j of the
//!   group's adapter, lanes striding over `in`, A's row read once for the group's rows;
//!   `h = x A_i^T` into an f32 scratch, ragged (`sum of n_g r_g` values).
//! * `multi_expand`, grid (groups, output tiles of 128), block 128: one thread per output, the
//!   group's h staged in shared memory in chunks of 64 ranks; `y += h B_i'^T`, summed in f32
//!   and rounded into y once.
//!
//! Each row is in exactly one group, so no two blocks write one element of y.

use super::{Arg, Cuda, DType, berr, blocks};
use crate::backend::{LowRankPool, Tensor};
use crate::error::Result;

/// Rows per group (`MULTI_ROWS` in the kernels).
const ROWS: usize = 8;
/// Ints per group in the table (`MULTI_GROUP_INTS`): first, n, a_row, r, b_off, h_off.
const GROUP_INTS: usize = 6;
/// Rank rows per shrink block (`MULTI_WARPS`, one warp each).
const WARPS: usize = 4;
/// Outputs per expand block (`MULTI_COLS`, one thread each).
const COLS: usize = 128;
/// Largest grid y dimension.
const GRID_Y: u32 = 65_535;

/// The launch plan: `groups [G, GROUP_INTS]`, `rows [E]` (the batch row of every entry), the
/// length of the f32 h scratch and the largest rank of a group.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    groups: Vec<i32>,
    rows: Vec<i32>,
    h_len: usize,
    max_r: usize,
}

impl Plan {
    fn n_groups(&self) -> usize {
        self.groups.len() / GROUP_INTS
    }
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        berr(format!(
            "mixed batch: {what} {v} exceeds the 2^31 - 1 limit of the CUDA kernels"
        ))
    })
}

/// Buckets the rows with a term (`adapter_of_row[t] = i >= 0`, `ranks[i] > 0`) by adapter, in
/// row order, and cuts each adapter's rows into groups of at most [`ROWS`]. Indices are
/// checked by the caller (`-1..K`).
fn plan(
    ranks: &[usize],
    a_rows: &[usize],
    b_offsets: &[usize],
    adapter_of_row: &[i32],
) -> Result<Plan> {
    let mut by: Vec<Vec<i32>> = vec![Vec::new(); ranks.len()];
    for (t, &i) in adapter_of_row.iter().enumerate() {
        if i >= 0 && ranks[i as usize] > 0 {
            by[i as usize].push(to_i32("row", t)?);
        }
    }
    let mut p = Plan::default();
    for (i, rows) in by.iter().enumerate() {
        let r = ranks[i];
        for chunk in rows.chunks(ROWS) {
            p.groups.extend_from_slice(&[
                to_i32("row count", p.rows.len())?,
                chunk.len() as i32,
                to_i32("A row", a_rows[i])?,
                to_i32("rank", r)?,
                to_i32("B offset", b_offsets[i])?,
                to_i32("h offset", p.h_len)?,
            ]);
            p.rows.extend_from_slice(chunk);
            p.h_len += chunk.len() * r;
            p.max_r = p.max_r.max(r);
        }
    }
    to_i32("h size", p.h_len)?;
    Ok(p)
}

/// `y[t] += (x[t] A_i^T) B_i'^T` for the rows of every adapter i with a term.
pub(super) fn add(
    be: &Cuda,
    x: &Tensor<Cuda>,
    pool: &LowRankPool<Cuda>,
    adapter_of_row: &[i32],
    y: &mut Tensor<Cuda>,
) -> Result<()> {
    let (din, dout) = (x.dim(1), y.dim(1));
    let a_rows: Vec<usize> = (0..pool.len()).map(|i| pool.a_row(i)).collect();
    let b_offsets: Vec<usize> = (0..pool.len()).map(|i| pool.b_offset(i)).collect();
    let p = plan(pool.ranks(), &a_rows, &b_offsets, adapter_of_row)?;
    let g = p.n_groups();
    if g == 0 || dout == 0 {
        return Ok(());
    }
    let mut table = p.groups.clone();
    table.extend_from_slice(&p.rows);
    let dt = be.upload_i32(&table)?;
    let gp = be.slice_ptr(&dt);
    let rp = gp + (p.groups.len() * std::mem::size_of::<i32>()) as u64;
    let h = be.alloc_typed(&[p.h_len], DType::F32)?;
    let hp = be.ptr_f32("h", &h)?;
    be.launch(
        "multi_lora",
        "multi_shrink",
        (g as u32, blocks(p.max_r, WARPS).min(GRID_Y), 1),
        ((WARPS * 32) as u32, 1, 1),
        0,
        &[
            be.rd("x", x)?,
            be.rd("pool.a", pool.a())?,
            Arg::P(gp),
            Arg::P(rp),
            Arg::P(hp),
            Arg::I(din as i32),
        ],
    )?;
    let bp = be.rd("pool.b", pool.b())?;
    let yp = be.wr("y", y)?;
    be.launch(
        "multi_lora",
        "multi_expand",
        (g as u32, blocks(dout, COLS).min(GRID_Y), 1),
        (COLS as u32, 1, 1),
        0,
        &[
            yp,
            Arg::P(hp),
            bp,
            Arg::P(gp),
            Arg::P(rp),
            Arg::I(dout as i32),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the two kernels' loops on the host over a plan (the indexing of
    /// kernels/multi_lora.cu, without the parallelism).
    fn emulate(p: &Plan, x: &[f32], a: &[f32], b: &[f32], y: &mut [f32], din: usize, dout: usize) {
        let mut h = vec![f32::NAN; p.h_len];
        for gp in p.groups.chunks(GROUP_INTS) {
            let [first, n, a_row, r, b_off, h_off] = gp.try_into().unwrap();
            let (first, n, a_row, r, b_off, h_off) = (
                first as usize,
                n as usize,
                a_row as usize,
                r as usize,
                b_off as usize,
                h_off as usize,
            );
            assert!((1..=ROWS).contains(&n) && r >= 1);
            for q in 0..n {
                let t = p.rows[first + q] as usize;
                for j in 0..r {
                    h[h_off + q * r + j] = (0..din)
                        .map(|k| a[(a_row + j) * din + k] * x[t * din + k])
                        .sum();
                }
            }
            for q in 0..n {
                let t = p.rows[first + q] as usize;
                for o in 0..dout {
                    let s: f32 = (0..r)
                        .map(|j| h[h_off + q * r + j] * b[b_off + o * r + j])
                        .sum();
                    y[t * dout + o] += s;
                }
            }
        }
        assert!(h.iter().all(|v| !v.is_nan()), "every h value is written");
    }

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn plan_matches_the_per_row_formula() {
        let ranks = [1usize, 7, 0, 64, 5];
        let (din, dout) = (37, 29);
        let mut a_rows = Vec::new();
        let mut b_offsets = Vec::new();
        let (mut ra, mut rb) = (0, 0);
        for &r in &ranks {
            a_rows.push(ra);
            b_offsets.push(rb);
            ra += r;
            rb += r * dout;
        }
        let a = vals(ra * din, 1);
        let b = vals(rb, 2);
        let layouts: Vec<Vec<i32>> = vec![
            vec![0; 9]
                .into_iter()
                .chain([1, 1, 1, -1, -1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 2, 2, 0, 0])
                .collect(),
            vec![3, 0, -1, 4, 1, 2, 0, 3, 4, -1, 1],
            vec![3],
            vec![-1, 2, -1],
            vec![],
        ];
        for rows in layouts {
            let t = rows.len();
            let x = vals(t * din, 3);
            let y0 = vals(t * dout, 4);
            let p = plan(&ranks, &a_rows, &b_offsets, &rows).unwrap();
            let mut y = y0.clone();
            emulate(&p, &x, &a, &b, &mut y, din, dout);
            for (tt, &i) in rows.iter().enumerate() {
                for o in 0..dout {
                    let mut want = y0[tt * dout + o];
                    if i >= 0 {
                        let i = i as usize;
                        let r = ranks[i];
                        for j in 0..r {
                            let hj: f32 = (0..din)
                                .map(|k| x[tt * din + k] * a[(a_rows[i] + j) * din + k])
                                .sum();
                            want += hj * b[b_offsets[i] + o * r + j];
                        }
                    }
                    let got = y[tt * dout + o];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{rows:?} row {tt} out {o}: {got} vs {want}"
                    );
                }
            }
            let live = rows
                .iter()
                .filter(|&&i| i >= 0 && ranks[i as usize] > 0)
                .count();
            assert_eq!(p.rows.len(), live);
            let max_r = rows
                .iter()
                .filter(|&&i| i >= 0)
                .map(|&i| ranks[i as usize])
                .max()
                .unwrap_or(0);
            assert_eq!(p.max_r, max_r);
        }
    }

    #[test]
    fn groups_hold_at_most_rows_of_one_adapter() {
        let rows: Vec<i32> = (0..20).map(|t| if t % 3 == 0 { 1 } else { 0 }).collect();
        let p = plan(&[2, 3], &[0, 2], &[0, 10], &rows).unwrap();
        // Adapter 0: 13 rows (8 + 5), adapter 1: 7 rows.
        assert_eq!(p.n_groups(), 3);
        assert_eq!(&p.groups[..6], &[0, 8, 0, 2, 0, 0]);
        assert_eq!(&p.groups[6..12], &[8, 5, 0, 2, 0, 16]);
        assert_eq!(&p.groups[12..], &[13, 7, 2, 3, 10, 26]);
        assert_eq!(p.h_len, 13 * 2 + 7 * 3);
        assert_eq!(p.max_r, 3);
        assert_eq!(&p.rows[13..], &[0, 3, 6, 9, 12, 15, 18]);
    }
}
