//! The vector operations the CPU kernels are written against, for AVX-512F (16 lanes) and
//! AVX2 + FMA (8 lanes), so that one kernel body serves both instruction sets.
//!
//! The operations are `#[inline(always)]`; a kernel is generic over [`Simd`], itself
//! `#[inline(always)]`, and reached through a per-ISA entry point compiled with that ISA's
//! `#[target_feature]`, into which the whole chain inlines (the pattern of the `pulp` crate).
//!
//! # Safety
//! Every method is `unsafe`: it may only run on a CPU where [`Simd::detected`] is true (the
//! entry point's caller checks), and the pointer ones read or write `LANES` floats (or the
//! lanes a mask selects) at the pointer.

use std::arch::x86_64::*;

/// One instruction set's f32 vector and lane mask.
pub(super) trait Simd: Copy {
    /// A register of [`Simd::LANES`] f32.
    type V: Copy;
    /// Which lanes a masked load or store touches.
    type Mask: Copy;
    /// f32 lanes per register.
    const LANES: usize;
    /// Whether this CPU has the instruction set (run-time detection).
    fn detected() -> bool;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c`, one rounding.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// The sum of the lanes.
    unsafe fn reduce_add(v: Self::V) -> f32;
    /// The first `min(n, LANES)` lanes.
    unsafe fn first(n: usize) -> Self::Mask;
    /// The masked lanes at `p`, 0 in the others (which are not read: they may lie outside
    /// the allocation).
    unsafe fn load_masked(m: Self::Mask, p: *const f32) -> Self::V;
    /// Writes the masked lanes of `v` at `p` only.
    unsafe fn store_masked(p: *mut f32, m: Self::Mask, v: Self::V);
}

/// AVX-512F: 16 lanes, 32 registers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Avx512;

/// AVX2 with FMA: 8 lanes, 16 registers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Avx2;

impl Simd for Avx512 {
    type V = __m512;
    type Mask = __mmask16;
    const LANES: usize = 16;
    fn detected() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn reduce_add(v: __m512) -> f32 {
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    unsafe fn first(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }
    #[inline(always)]
    unsafe fn load_masked(m: __mmask16, p: *const f32) -> __m512 {
        unsafe { _mm512_maskz_loadu_ps(m, p) }
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, m: __mmask16, v: __m512) {
        unsafe { _mm512_mask_storeu_ps(p, m, v) }
    }
}

impl Simd for Avx2 {
    type V = __m256;
    type Mask = __m256i;
    const LANES: usize = 8;
    fn detected() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn reduce_add(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
    }
    #[inline(always)]
    unsafe fn first(n: usize) -> __m256i {
        // Lane i is selected (sign bit set) when i < n.
        unsafe {
            let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), iota)
        }
    }
    #[inline(always)]
    unsafe fn load_masked(m: __m256i, p: *const f32) -> __m256 {
        unsafe { _mm256_maskload_ps(p, m) }
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, m: __m256i, v: __m256) {
        unsafe { _mm256_maskstore_ps(p, m, v) }
    }
}
