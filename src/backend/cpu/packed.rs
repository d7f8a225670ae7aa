//! Packed GEMM (the BLIS loop nest) for products with many rows: `c = beta c + alpha op(a) op(b)`,
//! with `b` in f32 or as bf16 bits (widened to f32 as it is packed, so a bf16 weight is never
//! copied whole to f32).
//!
//! The five loops of Goto and van de Geijn ("Anatomy of high-performance matrix multiplication",
//! 2008, section 6) and of BLIS: for each `NC`-wide column block of `b` and each `KC`-deep
//! slice of k, `b` is packed once into `NR`-column micro-panels (held in L3/L2); each
//! `MC`-tall row block of `a` is packed into `MR`-row micro-panels (held in L2) by the task that
//! uses it; a register-tiled micro-kernel then forms each `MR x NR` tile of c from one a
//! micro-panel and one b micro-panel (held in L1 or L2), `KC` rank-1 updates long. Packing reads
//! either operand through its row and column strides, so one micro-kernel serves Op::N and
//! Op::T for both. Edges are zero-padded in the packs and masked on the store.
//!
//! Work split: the row blocks of `a`, as many as there are threads (and more when m is
//! large), one rayon task each; when m has fewer row blocks than threads the columns of the
//! block are split too. Every task writes its own tiles of c, so no two tasks touch the same
//! element.
//!
//! One body, generic over the vector ISA ([`Simd`]); [`Packed`] gives each ISA its tile and
//! block sizes (AVX2: 6 x 16 tile, 12 of 16 registers accumulating; AVX-512: 14 x 32, 28 of 32).

// The register tile is indexed in lockstep over arrays; index loops read plainest.
#![allow(clippy::needless_range_loop)]

use super::gemm::Op;
use super::simd::{Avx2, Avx512, Simd};
use super::small_m::Widen;
use rayon::prelude::*;
use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
use std::cell::Cell;

/// An operand read through strides: element `(i, j)` of the logical matrix is at
/// `ptr + i * rs + j * cs`, stored as `E` (f32, or bf16 bits widened as they are packed).
#[derive(Clone, Copy)]
pub(super) struct Strided<E = f32> {
    pub ptr: *const E,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a `Strided` is a read-only view of a slice the caller keeps borrowed for the call.
unsafe impl<E: Sync> Send for Strided<E> {}
unsafe impl<E: Sync> Sync for Strided<E> {}

impl<E> Strided<E> {
    /// The logical `[rows, cols]` operand of a row-major `x` stored `[rows, cols]` (Op::N) or
    /// `[cols, rows]` (Op::T).
    pub fn op(x: &[E], op: Op, rows: usize, cols: usize) -> Self {
        let (rs, cs) = match op {
            Op::N => (cols as isize, 1),
            Op::T => (1, rows as isize),
        };
        Strided {
            ptr: x.as_ptr(),
            rs,
            cs,
        }
    }
}

impl<E: Widen> Strided<E> {
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> f32 {
        unsafe { (*self.ptr.offset(i as isize * self.rs + j as isize * self.cs)).widen() }
    }
}

/// The row-major output, shared by the tasks (each writes disjoint tiles).
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint tiles of c (see the module docs).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// One ISA's tile and block sizes, and its `#[target_feature]` entry point.
pub(super) trait Packed: Simd {
    /// Rows of the register tile (the tile is `MR x NV LANES`).
    const MR: usize;
    /// Vectors per row of the register tile.
    const NV: usize;
    /// Depth of a k slice (one b micro-panel is `KC x NR` floats, read from L1/L2 by every
    /// tile of a row block). AVX2's 512 was measured level with 256 and 384 on Zen 3
    /// (BENCHMARKS.md); AVX-512's is not measured yet.
    const KC: usize;
    /// Most rows of a packed a block (`MC x KC` floats, in L2); a multiple of `MR`.
    const MC: usize;
    /// Most columns of a packed b block (`KC x NC` floats); a multiple of `NV LANES`.
    const NC: usize;
    /// [`block`] compiled with this ISA's target features (rayon's closures do not inherit
    /// them, so each task enters the ISA here).
    unsafe fn block_entry(job: &Block<'_>);
}

impl Packed for Avx2 {
    const MR: usize = 6;
    const NV: usize = 2;
    const KC: usize = 512;
    const MC: usize = 264;
    const NC: usize = 4080;
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_entry(job: &Block<'_>) {
        unsafe { block::<Self, { <Avx2 as Packed>::MR }, { <Avx2 as Packed>::NV }>(job) }
    }
}

impl Packed for Avx512 {
    const MR: usize = 14;
    const NV: usize = 2;
    const KC: usize = 256;
    const MC: usize = 140;
    const NC: usize = 4096;
    #[target_feature(enable = "avx512f")]
    unsafe fn block_entry(job: &Block<'_>) {
        unsafe { block::<Self, { <Avx512 as Packed>::MR }, { <Avx512 as Packed>::NV }>(job) }
    }
}

thread_local! {
    /// Per-thread pack buffers, taken out while in use (so a nested call on the same thread,
    /// e.g. from a task this one steals while it waits, allocates its own instead).
    static A_PACK: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static B_PACK: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// A scratch buffer of at least `len` floats from `slot` (plus room to align), to be handed
/// back with [`give`].
fn take(slot: &'static std::thread::LocalKey<Cell<Vec<f32>>>, len: usize) -> Vec<f32> {
    let mut v = slot.with(|s| s.take());
    if v.len() < len + ALIGN {
        v = vec![0.0; len + ALIGN];
    }
    v
}

fn give(slot: &'static std::thread::LocalKey<Cell<Vec<f32>>>, v: Vec<f32>) {
    slot.with(|s| s.set(v));
}

/// Widest b micro-panel of any ISA (AVX-512: 2 x 16).
const MAX_NR: usize = 32;

/// Floats of slack in a pack buffer, so that its packs can start on a cache line (a vector
/// load across two lines costs a second access).
const ALIGN: usize = 16;

/// `v`'s floats from the first 64-byte boundary on.
fn aligned(v: &mut [f32]) -> &mut [f32] {
    let off = v.as_ptr().align_offset(64).min(ALIGN);
    &mut v[off..]
}

/// One task's share of a k slice: row block `[i0, i0 + rows)` of `a` against the packed b
/// micro-panels `p0..p1` of the column block at `jc`.
pub(super) struct Block<'a> {
    a: Strided,
    i0: usize,
    rows: usize,
    pc: usize,
    kc: usize,
    bpack: &'a [f32],
    p0: usize,
    p1: usize,
    jc: usize,
    n: usize,
    c: Out,
    alpha: f32,
    beta: f32,
}

/// `c [m, n] = beta c + alpha a b` with `a` logically `[m, k]`, `b` logically `[k, n]` (both
/// read through their strides), `c` row-major with row stride n; `beta` 0 (c is not read) or 1.
/// On rayon's pool when `parallel`, else on the calling thread.
///
/// # Safety
/// The CPU has `S`'s features; `a` and `b` address every element of their logical shapes;
/// `c.len() >= m n`; m, n, k > 0.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm<S: Packed, E: Widen>(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided<E>,
    beta: f32,
    c: &mut [f32],
    parallel: bool,
) {
    assert!(c.len() >= m * n && m > 0 && n > 0 && k > 0);
    let (mr, nr) = (S::MR, S::NV * S::LANES);
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    // Row blocks: a multiple of the thread count where m allows, each at most MC rows and
    // MR-aligned.
    let mut row_blocks = m.div_ceil(S::MC);
    if threads > 1 && m >= threads * mr {
        row_blocks = row_blocks.div_ceil(threads) * threads;
    }
    let mc = m.div_ceil(row_blocks).next_multiple_of(mr).min(S::MC);
    let row_blocks = m.div_ceil(mc);
    let out = Out(c.as_mut_ptr());
    let mut bp = take(&B_PACK, S::KC.min(k) * S::NC.min(n.next_multiple_of(nr)));
    for jc in (0..n).step_by(S::NC) {
        let nc = S::NC.min(n - jc);
        let panels = nc.div_ceil(nr);
        // Column chunks per row block, so that there are at least as many tasks as threads.
        let per_chunk = panels.div_ceil(threads.div_ceil(row_blocks).min(panels));
        let col_chunks = panels.div_ceil(per_chunk);
        // k slices of equal depth (at most KC), so no slice is a short tail.
        let kc_even = k.div_ceil(k.div_ceil(S::KC));
        for pc in (0..k).step_by(kc_even) {
            let kc = kc_even.min(k - pc);
            let bpack = &mut aligned(&mut bp)[..kc * panels * nr];
            let pack = |(jp, dst): (usize, &mut [f32])| {
                // SAFETY: `b` covers [pc, pc + kc) x [jc, jc + nc).
                unsafe { pack_b(b, pc, kc, jc + jp * nr, (nc - jp * nr).min(nr), nr, dst) }
            };
            if threads > 1 && panels > 1 {
                bpack.par_chunks_mut(kc * nr).enumerate().for_each(pack);
            } else {
                bpack.chunks_mut(kc * nr).enumerate().for_each(pack);
            }
            let bpack = &*bpack;
            let task = |t: usize| {
                let (ib, cb) = (t / col_chunks, t % col_chunks);
                let p0 = cb * per_chunk;
                let job = Block {
                    a,
                    i0: ib * mc,
                    rows: mc.min(m - ib * mc),
                    pc,
                    kc,
                    bpack,
                    p0,
                    p1: (p0 + per_chunk).min(panels),
                    jc,
                    n,
                    c: out,
                    alpha,
                    beta: if pc == 0 { beta } else { 1.0 },
                };
                // SAFETY: the caller's contract; this task's tiles (row block ib, panels
                // p0..p1) are its own.
                unsafe { S::block_entry(&job) };
            };
            let tasks = row_blocks * col_chunks;
            if threads > 1 && tasks > 1 {
                (0..tasks).into_par_iter().for_each(task);
            } else {
                (0..tasks).for_each(task);
            }
        }
    }
    give(&B_PACK, bp);
}

/// Packs the task's row block of `a` and runs the micro-kernel over its tiles. `MR` and `NV`
/// are `S::MR` and `S::NV` (const parameters, so the register tile is a fixed-size array).
///
/// # Safety
/// As [`sgemm`].
#[inline(always)]
unsafe fn block<S: Packed, const MR: usize, const NV: usize>(job: &Block<'_>) {
    let (rows, kc) = (job.rows, job.kc);
    let mut ap = take(&A_PACK, kc * rows.next_multiple_of(MR));
    unsafe {
        let ap = aligned(&mut ap);
        pack_a::<MR>(job.a, job.i0, rows, job.pc, kc, ap);
        tiles::<S, MR, NV>(job, ap.as_ptr());
    }
    give(&A_PACK, ap);
}

/// The micro-kernel over the block's tiles, `a` packed (micro-panel q at `a + q MR kc`).
#[inline(always)]
unsafe fn tiles<S: Packed, const MR: usize, const NV: usize>(job: &Block<'_>, a: *const f32) {
    let nr = NV * S::LANES;
    let (rows, kc) = (job.rows, job.kc);
    unsafe {
        for jp in job.p0..job.p1 {
            let j = job.jc + jp * nr;
            let cols = (job.n - j).min(nr);
            let bpanel = job.bpack.as_ptr().add(jp * kc * nr);
            for ir in (0..rows).step_by(MR) {
                kernel::<S, MR, NV>(
                    kc,
                    a.add(ir * kc),
                    bpanel,
                    job.c.0.add((job.i0 + ir) * job.n + j),
                    job.n,
                    (rows - ir).min(MR),
                    cols,
                    job.alpha,
                    job.beta,
                );
            }
        }
    }
}

/// Packs rows `[i0, i0 + rows)`, k `[p0, p0 + kc)` of `a` into `MR`-row micro-panels:
/// panel q holds `dst[q MR kc + p MR + i] = a(i0 + q MR + i, p0 + p)`, rows past the end 0.
#[inline(always)]
unsafe fn pack_a<const MR: usize>(
    a: Strided,
    i0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    dst: &mut [f32],
) {
    for (q, panel) in dst[..rows.next_multiple_of(MR) * kc]
        .chunks_exact_mut(MR * kc)
        .enumerate()
    {
        let r0 = q * MR;
        let live = (rows - r0).min(MR);
        let d = panel.as_mut_ptr();
        // SAFETY (both): the caller's `a` covers the block; `d` holds kc MR floats.
        if a.cs == 1 {
            // Rows contiguous in k: read each row along k.
            for i in 0..live {
                let src = unsafe { a.ptr.offset((i0 + r0 + i) as isize * a.rs).add(p0) };
                for p in 0..kc {
                    unsafe { *d.add(p * MR + i) = *src.add(p) };
                }
            }
        } else {
            for p in 0..kc {
                for i in 0..live {
                    unsafe { *d.add(p * MR + i) = a.at(i0 + r0 + i, p0 + p) };
                }
            }
        }
        if live < MR {
            for row in panel.chunks_exact_mut(MR) {
                row[live..].fill(0.0);
            }
        }
    }
}

/// Packs k `[p0, p0 + kc)`, columns `[j0, j0 + cols)` of `b` into one `nr`-column micro-panel:
/// `dst[p nr + j] = b(p0 + p, j0 + j)`, columns past `cols` 0.
#[inline(always)]
unsafe fn pack_b<E: Widen>(
    b: Strided<E>,
    p0: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    nr: usize,
    dst: &mut [f32],
) {
    let dst = &mut dst[..kc * nr];
    let d = dst.as_mut_ptr();
    // SAFETY (all three): the caller's `b` covers the panel; `d` holds kc nr floats.
    if b.cs == 1 {
        // Rows contiguous along the columns: one copy per k.
        for p in 0..kc {
            unsafe {
                let src = b.ptr.offset((p0 + p) as isize * b.rs).add(j0);
                for j in 0..cols {
                    *d.add(p * nr + j) = (*src.add(j)).widen();
                }
            }
        }
    } else if b.rs == 1 {
        // Columns contiguous along k (b read transposed): the panel's columns are streamed
        // side by side, so each k's row of the panel is written whole.
        let mut col = [b.ptr; MAX_NR];
        for j in 0..cols {
            col[j] = unsafe { b.ptr.add(p0).offset((j0 + j) as isize * b.cs) };
        }
        // A cache line of each column at a time: columns k apart may share an L1 set, so
        // each line is used whole once loaded.
        const LINE: usize = 16;
        for q in (0..kc).step_by(LINE) {
            for j in 0..cols {
                for p in q..(q + LINE).min(kc) {
                    unsafe { *d.add(p * nr + j) = (*col[j].add(p)).widen() };
                }
            }
        }
    } else {
        for p in 0..kc {
            for j in 0..cols {
                unsafe { *d.add(p * nr + j) = b.at(p0 + p, j0 + j) };
            }
        }
    }
    if cols < nr {
        for row in dst.chunks_exact_mut(nr) {
            row[cols..].fill(0.0);
        }
    }
}

/// One `MR x NV LANES` tile: `c = beta c + alpha ap bp` over `kc` rank-1 updates, of which
/// the first `rows x cols` are stored (row stride `ldc`); `beta` 0 (c is not read) or 1.
///
/// # Safety
/// `ap` holds the tile's packed a (`kc MR` floats), `bp`
/// `kc NV LANES` floats; c addresses `rows x cols` at stride ldc.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<S: Simd, const MR: usize, const NV: usize>(
    kc: usize,
    ap: *const f32,
    bp: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    beta: f32,
) {
    let l = S::LANES;
    let nr = NV * l;
    unsafe {
        // The tile of c is read or written only after the loop: fetch it meanwhile.
        for i in 0..rows.min(MR) {
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + nr - 1) as *const i8);
        }
        let mut acc = [[S::zero(); NV]; MR];
        for p in 0..kc {
            let mut b = [S::zero(); NV];
            for v in 0..NV {
                b[v] = S::load(bp.add(p * nr + v * l));
            }
            for i in 0..MR {
                let av = S::splat(*ap.add(p * MR + i));
                for v in 0..NV {
                    acc[i][v] = S::fmadd(av, b[v], acc[i][v]);
                }
            }
        }
        let alpha = S::splat(alpha);
        if rows == MR && cols == nr {
            for i in 0..MR {
                let row = c.add(i * ldc);
                for v in 0..NV {
                    let old = if beta == 0.0 {
                        S::zero()
                    } else {
                        S::load(row.add(v * l))
                    };
                    S::store(row.add(v * l), S::fmadd(alpha, acc[i][v], old));
                }
            }
        } else {
            for v in 0..NV {
                if cols <= v * l {
                    break;
                }
                let mask = S::first(cols - v * l);
                for i in 0..rows.min(MR) {
                    let at = c.add(i * ldc + v * l);
                    let old = if beta == 0.0 {
                        S::zero()
                    } else {
                        S::load_masked(mask, at)
                    };
                    S::store_masked(at, mask, S::fmadd(alpha, acc[i][v], old));
                }
            }
        }
    }
}

/// [`sgemm`] on the best ISA this CPU has, or false (c untouched) where it has neither.
///
/// # Safety
/// As [`sgemm`], less the ISA requirement.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm_detected<E: Widen>(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided<E>,
    beta: f32,
    c: &mut [f32],
    parallel: bool,
) -> bool {
    unsafe {
        if Avx512::detected() {
            sgemm::<Avx512, E>(m, n, k, alpha, a, b, beta, c, parallel);
        } else if Avx2::detected() {
            sgemm::<Avx2, E>(m, n, k, alpha, a, b, beta, c, parallel);
        } else {
            return false;
        }
    }
    true
}
