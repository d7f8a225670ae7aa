//! Single-precision GEMM for the CPU reference.
//!
//! Choice of GEMM: the `gemm` crate (pure Rust, run-time dispatched AVX2/AVX-512/NEON
//! micro-kernels, rayon-parallel) with its `x86-v4` feature, so AVX-512 machines get the
//! AVX-512 kernels. Measured on the 2-core AVX-512 CI machine, on the shapes of a SmolLM2-135M
//! training step (m = 272 tokens; n, k in 192..1536) and against OpenBLAS 0.3 (Debian's
//! pthreads build, cblas_sgemm) in the same run: gemm 83-95 GFLOP/s, OpenBLAS 30-36 GFLOP/s;
//! for the 49152-wide LM head 77 vs 32. It also needs no system library, so the crate builds
//! anywhere with `cargo build` alone. Without `x86-v4` the same step was 1.4x slower.
//!
//! Products with few rows (m <= 32 tokens against a dense weight) take our lane kernels
//! (`small_m.rs`), and products over a bf16 weight take ours at every m (the lane kernels, or
//! the packed GEMM of `packed.rs`, which widens the weight as it packs it). Our packed GEMM can
//! also take the many-row f32 products ([`ManyRows::Packed`]); it is not the default because
//! `gemm` was measured level or faster there (`examples/sgemm_packed.rs`).

#[cfg(target_arch = "x86_64")]
use super::packed::{self, Strided};
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, Simd};
#[cfg(target_arch = "x86_64")]
use super::small_m::{self, FewRow};
use gemm::Parallelism;

/// Below this many multiply-adds a GEMM runs on one thread (thread hand-off costs more).
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// How an operand is read: as stored (row-major), or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// `c = beta * c + alpha * op(a) op(b)` with row-major `c [m, n]`.
///
/// `op(a)` is `[m, k]`: `a` is stored `[m, k]` (Op::N) or `[k, m]` (Op::T); likewise `op(b)` is
/// `[k, n]` from `b` stored `[k, n]` or `[n, k]`. `beta` is 0 or 1 (overwrite or accumulate).
/// The caller guarantees the slice lengths (checked with debug assertions).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    ta: Op,
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    sgemm_on(ta, tb, m, n, k, alpha, a, b, beta, c, true);
}

/// [`sgemm`], on rayon's pool when `parallel` and the product is large enough, else serially.
#[allow(clippy::too_many_arguments)]
fn sgemm_on(
    ta: Op,
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
    parallel: bool,
) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if beta == 0.0 {
            c[..m * n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if parallel && ta == Op::N {
        // SAFETY (both): `few_row_isa` returns only an ISA the CPU has.
        match few_row_isa(tb, m, n, k) {
            Some(FewIsa::Avx512) => {
                unsafe { small_m::sgemm::<Avx512>(tb, m, n, k, alpha, a, b, beta, c) };
                return;
            }
            Some(FewIsa::Avx2) => {
                unsafe { small_m::sgemm::<Avx2>(tb, m, n, k, alpha, a, b, beta, c) };
                return;
            }
            None => {}
        }
    }
    // Row-major strides: (row stride, col stride) of op(x).
    let (a_rs, a_cs) = match ta {
        Op::N => (k as isize, 1isize),
        Op::T => (1isize, m as isize),
    };
    let (b_rs, b_cs) = match tb {
        Op::N => (n as isize, 1isize),
        Op::T => (1isize, k as isize),
    };
    let parallel = parallel && m * n * k >= PARALLEL_MIN_MACS;
    #[cfg(target_arch = "x86_64")]
    if m >= PACKED_MIN_SIDE && n >= PACKED_MIN_SIDE && many_rows() == ManyRows::Packed {
        let a = Strided {
            ptr: a.as_ptr(),
            rs: a_rs,
            cs: a_cs,
        };
        let b = Strided {
            ptr: b.as_ptr(),
            rs: b_rs,
            cs: b_cs,
        };
        // SAFETY: the strided views address exactly the extents checked above.
        if unsafe { packed::sgemm_detected(m, n, k, alpha, a, b, beta, c, parallel) } {
            return;
        }
    }
    let par = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // gemm computes dst = alpha_g * dst + beta_g * lhs * rhs (its names are swapped from BLAS).
    // SAFETY: all pointers come from slices that hold at least the strided extents checked
    // above; dst does not alias lhs or rhs (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Smallest m and n that take the packed kernels: each packed element of b is reused m times
/// and each of a n times, and below this the packing costs more than `gemm`'s unpacked
/// kernels (measured on AVX2: the LoRA weight gradients 16 x 576 x 512 ran at 0.55x `gemm`).
#[cfg(target_arch = "x86_64")]
const PACKED_MIN_SIDE: usize = 64;

/// Which kernels take the many-row f32 products (the few-row ones, and every product over a
/// bf16 weight, are ours either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManyRows {
    /// The `gemm` crate's: the default, measured about 4% faster than ours on the T512 LoRA
    /// layer cases of a Zen 3 (AVX2) machine (BENCHMARKS.md, "Our packed GEMM").
    GemmCrate,
    /// Ours: the packed GEMM of `packed.rs` (AVX2 or AVX-512; `gemm` on other CPUs).
    Packed,
}

/// 0: not chosen yet (the environment decides), else 1 + the `ManyRows` index.
static MANY_ROWS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Chooses the many-row f32 kernels for the whole process, so that benchmarks can time both
/// in one run. Without a call the choice is [`ManyRows::GemmCrate`], unless the environment
/// has `LORAFUSE_SGEMM=packed` (read at the first product).
pub fn set_many_rows(k: ManyRows) {
    MANY_ROWS.store(1 + k as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The current [`ManyRows`] choice (see [`set_many_rows`]).
pub fn many_rows() -> ManyRows {
    use std::sync::atomic::Ordering::Relaxed;
    match MANY_ROWS.load(Relaxed) {
        1 => ManyRows::GemmCrate,
        2 => ManyRows::Packed,
        _ => {
            let k = match std::env::var("LORAFUSE_SGEMM") {
                Ok(v) if v == "packed" => ManyRows::Packed,
                _ => ManyRows::GemmCrate,
            };
            MANY_ROWS.store(1 + k as u8, Relaxed);
            k
        }
    }
}

/// The ISA whose few-row kernels take an `m x n x k` product with `a` as stored and `b` read
/// as `tb`: `m <= 32`, `n, k >= 256`, on an ISA whose kernels are faster there than `gemm`
/// (its `FewRow::takes`), AVX-512 before AVX2; `None` where `gemm` is the faster.
#[cfg(target_arch = "x86_64")]
fn few_row_isa(tb: Op, m: usize, n: usize, k: usize) -> Option<FewIsa> {
    if !(1..=small_m::MAX_M).contains(&m) || n < small_m::MIN_NK_SIDE || k < small_m::MIN_NK_SIDE {
        return None;
    }
    if Avx512::detected() && Avx512::takes(tb, m, n) {
        Some(FewIsa::Avx512)
    } else if Avx2::detected() && Avx2::takes(tb, m, n) {
        Some(FewIsa::Avx2)
    } else {
        None
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum FewIsa {
    Avx512,
    Avx2,
}

/// Whether [`sgemm_bf16`] takes this product: the few-row lane kernels where they take it
/// (see `few_row_isa`), else our packed kernels where the CPU has AVX2 or AVX-512.
pub fn bf16_takes(tb: Op, m: usize, n: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return few_row_isa(tb, m, n, k).is_some() || packed_takes_bf16(m, n, k);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (tb, m, n, k);
        false
    }
}

#[cfg(target_arch = "x86_64")]
fn packed_takes_bf16(m: usize, n: usize, k: usize) -> bool {
    m > 0 && n > 0 && k > 0 && (Avx512::detected() || Avx2::detected())
}

/// [`sgemm`] with `a` as stored and `b` a bf16 weight (its bits, `[k, n]` for Op::N, `[n, k]`
/// for Op::T), never widened whole: few rows take the lane kernels, which widen each element
/// as they broadcast it; more take the packed kernels, which widen it as they pack it. Returns
/// true where it ran ([`bf16_takes`]); false, leaving `c` alone, where the caller must widen
/// `b` itself (the tiled products of `tiled.rs`).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_bf16(
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[u16],
    beta: f32,
    c: &mut [f32],
) -> bool {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (all): `few_row_isa` returns only an ISA the CPU has; `sgemm_detected` checks
        // its own; the views cover the slices' extents above.
        match few_row_isa(tb, m, n, k) {
            Some(FewIsa::Avx512) => {
                unsafe { small_m::sgemm_bf16::<Avx512>(tb, m, n, k, alpha, a, b, beta, c) };
                return true;
            }
            Some(FewIsa::Avx2) => {
                unsafe { small_m::sgemm_bf16::<Avx2>(tb, m, n, k, alpha, a, b, beta, c) };
                return true;
            }
            None => {}
        }
        if packed_takes_bf16(m, n, k) {
            let sa = Strided::op(a, Op::N, m, k);
            let sb = Strided::op(b, tb, k, n);
            let parallel = m * n * k >= PARALLEL_MIN_MACS;
            return unsafe { packed::sgemm_detected(m, n, k, alpha, sa, sb, beta, c, parallel) };
        }
    }
    let _ = (tb, alpha, beta);
    false
}

/// [`sgemm`] on the calling thread only: for callers that already split the work across
/// rayon tasks (a nested parallel GEMM would only add hand-offs).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_serial(
    ta: Op,
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    sgemm_on(ta, tb, m, n, k, alpha, a, b, beta, c, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(ta: Op, tb: Op, m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta == Op::N {
                        a[i * k + p]
                    } else {
                        a[p * m + i]
                    };
                    let bv = if tb == Op::N {
                        b[p * n + j]
                    } else {
                        b[j * k + p]
                    };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn all_transposes_match_naive() {
        let (m, n, k) = (37, 29, 71);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
            .collect();
        for ta in [Op::N, Op::T] {
            for tb in [Op::N, Op::T] {
                let want = naive(ta, tb, m, n, k, &a, &b);
                let mut c = vec![1.0f32; m * n];
                sgemm(ta, tb, m, n, k, 2.0, &a, &b, 1.0, &mut c);
                for (x, w) in c.iter().zip(&want) {
                    assert!(
                        (x - (1.0 + 2.0 * w)).abs() < 1e-4,
                        "{ta:?}{tb:?}: {x} vs {w}"
                    );
                }
                sgemm(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c);
                for (x, w) in c.iter().zip(&want) {
                    assert!((x - w).abs() < 1e-4);
                }
            }
        }
    }

    /// The packed kernels of each ISA this CPU has against the naive product: ragged m, n, k
    /// around the tile (MR, 2 LANES) and block (MC, KC, NC) edges, every transpose, beta 0
    /// (c filled with NaN, which must not be read) and 1, on one thread and on the pool
    /// (including m too small to give every thread a row block, so columns are split); `b` in
    /// f32 and as bf16 bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn packed_kernels_match_naive_on_every_isa() {
        fn check<S: packed::Packed>(what: &str) {
            if !S::detected() {
                eprintln!("SKIP packed {what}: this CPU lacks it");
                return;
            }
            let shapes = [
                (1, 1, 1),
                (5, 17, 3),
                (7, 33, 257),
                (13, 15, 513),
                (3, 200, 50),
                (150, 47, 300),
                (290, 70, 40),
                (20, 4100, 9),
            ];
            for (m, n, k) in shapes {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                    .collect();
                // Multiples of 1/64 below 1: exact in bf16, so the bf16 b is checked on the
                // same values.
                let b: Vec<f32> = (0..k * n)
                    .map(|i| ((i * 104729) % 89) as f32 / 64.0 - 0.5)
                    .collect();
                let bits: Vec<u16> = b
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                for ta in [Op::N, Op::T] {
                    for tb in [Op::N, Op::T] {
                        let want = naive(ta, tb, m, n, k, &a, &b);
                        let sa = Strided::op(&a, ta, m, k);
                        let sb = Strided::op(&b, tb, k, n);
                        let sbits = Strided::op(&bits, tb, k, n);
                        let tol = 1e-6 * (k as f32).max(16.0);
                        for parallel in [false, true] {
                            let mut c = vec![f32::NAN; m * n];
                            // SAFETY: detected above; the views cover the shapes.
                            unsafe {
                                packed::sgemm::<S, u16>(
                                    m, n, k, 2.0, sa, sbits, 0.0, &mut c, parallel,
                                )
                            };
                            for (x, w) in c.iter().zip(&want) {
                                assert!(
                                    (x - 2.0 * w).abs() < tol,
                                    "{what} bf16 {m}x{n}x{k} {ta:?}{tb:?} par {parallel}: {x} vs {w}"
                                );
                            }
                            let mut c = vec![1.0f32; m * n];
                            // SAFETY: detected above; the views cover the shapes.
                            unsafe {
                                packed::sgemm::<S, f32>(
                                    m, n, k, -1.5, sa, sb, 1.0, &mut c, parallel,
                                )
                            };
                            for (x, w) in c.iter().zip(&want) {
                                assert!(
                                    (x - (1.0 - 1.5 * w)).abs() < tol,
                                    "{what} {m}x{n}x{k} {ta:?}{tb:?} par {parallel}: {x} vs {w}"
                                );
                            }
                            c.fill(f32::NAN);
                            unsafe {
                                packed::sgemm::<S, f32>(m, n, k, 0.5, sa, sb, 0.0, &mut c, parallel)
                            };
                            for (x, w) in c.iter().zip(&want) {
                                assert!(
                                    (x - 0.5 * w).abs() < tol,
                                    "{what} {m}x{n}x{k} {ta:?}{tb:?} par {parallel}: {x} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
        check::<Avx512>("avx512");
        check::<Avx2>("avx2");
    }

    /// `f` (an `sgemm`) against the naive product on ragged few-row shapes: m in `ms`, large
    /// n and k (>= small_m::MIN_NK_SIDE), both layouts of b, accumulating and overwriting.
    #[allow(clippy::type_complexity)]
    fn check_few_rows(
        ms: std::ops::RangeInclusive<usize>,
        f: &dyn Fn(Op, usize, usize, usize, f32, &[f32], &[f32], f32, &mut [f32]),
        what: &str,
    ) {
        for (n, k) in [(257, 1811), (1031, 263), (531, 1029)] {
            // Multiples of 1/64 below 1: exact in bf16 too, so the bf16 kernels are checked
            // on the same values.
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104729) % 89) as f32 / 64.0 - 0.5)
                .collect();
            for m in ms.clone() {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                    .collect();
                for tb in [Op::N, Op::T] {
                    let want = naive(Op::N, tb, m, n, k, &a, &b);
                    let tol = 1e-5 * k as f32;
                    let mut c = vec![1.0f32; m * n];
                    f(tb, m, n, k, -1.5, &a, &b, 1.0, &mut c);
                    for (x, w) in c.iter().zip(&want) {
                        assert!(
                            (x - (1.0 - 1.5 * w)).abs() < tol,
                            "{what} {m}x{n}x{k} {tb:?}: {x} vs {w}"
                        );
                    }
                    c.fill(f32::NAN);
                    f(tb, m, n, k, 0.5, &a, &b, 0.0, &mut c);
                    for (x, w) in c.iter().zip(&want) {
                        assert!(
                            (x - 0.5 * w).abs() < tol,
                            "{what} {m}x{n}x{k} {tb:?}: {x} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// The dispatcher around the few-row path (m <= 32 takes it on AVX2 and AVX-512 machines,
    /// m = 33 goes to `gemm`).
    #[test]
    fn small_m_dispatch_matches_naive() {
        let f = |tb, m, n, k, alpha, a: &[f32], b: &[f32], beta, c: &mut [f32]| {
            sgemm(Op::N, tb, m, n, k, alpha, a, b, beta, c)
        };
        check_few_rows(1..=33, &f, "sgemm");
    }

    /// Each ISA's few-row kernels, called directly, so an AVX-512 machine also checks the AVX2
    /// ones (every tile size and tail of each).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn small_m_kernels_match_naive_on_every_isa() {
        use super::super::simd::{Avx2, Avx512};
        fn check<S: FewRow>(what: &str) {
            if !S::detected() {
                eprintln!("SKIP {what} few-row kernels: this CPU does not have them");
                return;
            }
            let f = |tb, m, n, k, alpha, a: &[f32], b: &[f32], beta, c: &mut [f32]| {
                // SAFETY: the CPU has the ISA (checked above).
                unsafe { small_m::sgemm::<S>(tb, m, n, k, alpha, a, b, beta, c) }
            };
            check_few_rows(1..=small_m::MAX_M, &f, what);
        }
        check::<Avx2>("avx2");
        check::<Avx512>("avx512");
    }

    /// The bf16 lane kernels (reading the weight's bits) of each ISA, on the same products
    /// and values (exact in bf16), and their dispatcher.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_lane_kernels_match_naive_on_every_isa() {
        use super::super::simd::{Avx2, Avx512};
        fn bits(b: &[f32]) -> Vec<u16> {
            let bits: Vec<u16> = b
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            for (&v, &u) in b.iter().zip(&bits) {
                assert_eq!(
                    f32::from_bits((u as u32) << 16),
                    v,
                    "test values are exact in bf16"
                );
            }
            bits
        }
        fn check<S: FewRow>(what: &str) {
            if !S::detected() {
                eprintln!("SKIP {what} bf16 lane kernels: this CPU does not have them");
                return;
            }
            let f = |tb, m, n, k, alpha, a: &[f32], b: &[f32], beta, c: &mut [f32]| {
                // SAFETY: the CPU has the ISA (checked above).
                unsafe { small_m::sgemm_bf16::<S>(tb, m, n, k, alpha, a, &bits(b), beta, c) }
            };
            check_few_rows(1..=small_m::MAX_M, &f, what);
        }
        check::<Avx2>("avx2");
        check::<Avx512>("avx512");
        // The dispatcher: where it takes a product it must be right; m = 33 it declines.
        let f = |tb, m, n, k, alpha, a: &[f32], b: &[f32], beta, c: &mut [f32]| {
            if !sgemm_bf16(tb, m, n, k, alpha, a, &bits(b), beta, c) {
                sgemm(Op::N, tb, m, n, k, alpha, a, b, beta, c)
            }
        };
        check_few_rows(1..=33, &f, "sgemm_bf16");
        // k = 0: neither the lane nor the packed kernels take it.
        let mut c = vec![7.0f32; 33 * 300];
        assert!(!sgemm_bf16(Op::T, 33, 300, 0, 1.0, &[], &[], 0.0, &mut c));
        assert!(
            c.iter().all(|&v| v == 7.0),
            "a declined product leaves c alone"
        );
    }

    /// Each ISA's Op::N block kernel on its own (where it has one), against the
    /// naive product: ragged m, a block that starts inside b and ends before its last column.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn nn_block_kernels_match_naive_on_every_isa() {
        use super::super::simd::{Avx2, Avx512};
        fn check<S: FewRow>(what: &str) {
            let Some(nn) = S::NN_BLOCK.filter(|_| S::detected()) else {
                eprintln!("SKIP {what} nn_block: this CPU lacks the ISA, or the ISA has none");
                return;
            };
            let (n, k, j0, nb) = (301, 130, 37, 203);
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
                .collect();
            for m in 1..=9 {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                    .collect();
                let want = naive(Op::N, Op::N, m, n, k, &a, &b);
                let mut out = vec![0.0f32; m * nb];
                // SAFETY: the caller checked the ISA; the slices hold what the kernel asserts.
                unsafe { nn(m, n, k, &a, &b, j0, nb, &mut out) };
                for i in 0..m {
                    for jj in 0..nb {
                        let (g, w) = (out[i * nb + jj], want[i * n + j0 + jj]);
                        assert!((g - w).abs() < 1e-4, "{what} m {m} col {jj}: {g} vs {w}");
                    }
                }
            }
        }
        check::<Avx2>("avx2");
        check::<Avx512>("avx512");
    }
}
