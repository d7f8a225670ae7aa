//! The matmul-with-epilogue of `shaders/matmul.wgsl`, and the splitting that keeps every
//! binding within the adapter's storage-binding limit.
//!
//! A problem whose operand spans more bytes than one binding may hold (a 49152 x 576 f32
//! embedding is 113 MiB; lavapipe binds at most 128 MiB, a 7B layer needs more) is cut into
//! sub-problems along M, N or K until each operand's span fits; each sub-problem binds only
//! the byte range it reads. Cuts along K accumulate (`beta = 1`) and carry the additive
//! epilogue terms (bias, low-rank, the caller's beta) in the first part only, so the result is
//! the same sum.
//!
//! A and B may be frozen f16 weights ([`DType::F16`]): the kernel is then the variant of the
//! same source in which that operand is `array<f16>` (one cached pipeline per variant), and
//! its span is measured and bound in f16 elements. C and the epilogue vectors are f32.

use super::ctx::{Bind, Ctx, DType, GpuBuf, f16_variant};
use crate::error::Result;

const SRC: &str = include_str!("../../../shaders/matmul.wgsl");

const F_BIAS: u32 = 1;
const F_COLSCALE: u32 = 2;
const F_LOWRANK: u32 = 4;
const F_JSCALE: u32 = 8;
const F_NSCALE: u32 = 16;

/// A strided operand: element `(i, k)` is `buf[off + i * rs + k * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub buf: &'a GpuBuf,
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Operand<'a> {
    /// Row-major `[rows, cols]` read as is.
    pub fn n(buf: &'a GpuBuf, cols: usize) -> Self {
        Operand {
            buf,
            off: 0,
            rs: cols,
            cs: 1,
        }
    }
    /// Row-major `[rows, cols]` read transposed (element `(i, k)` is `buf[k, i]`).
    pub fn t(buf: &'a GpuBuf, cols: usize) -> Self {
        Operand {
            buf,
            off: 0,
            rs: 1,
            cs: cols,
        }
    }
    /// Element range `[lo, hi]` touched by rows `i0..i1` and columns `k0..k1` (non-empty).
    fn span(&self, i: (usize, usize), k: (usize, usize)) -> (usize, usize) {
        let lo = self.off + i.0 * self.rs + k.0 * self.cs;
        let hi = self.off + (i.1 - 1) * self.rs + (k.1 - 1) * self.cs;
        (lo, hi)
    }
}

/// The low-rank epilogue term `lr_scale * ns[j] * sum_q js[q] H(i, q) G(j, q)`.
#[derive(Clone, Copy)]
pub(crate) struct LowRank<'a> {
    pub r: usize,
    pub h: Operand<'a>,
    pub g: Operand<'a>,
    pub scale: f32,
    /// Per-rank scale `js` (VeRA's lambda_d).
    pub jscale: Option<&'a GpuBuf>,
    /// Per-output-column scale `ns` of the low-rank term only (VeRA's lambda_b).
    pub nscale: Option<&'a GpuBuf>,
}

/// One matmul `C[M, N] (row-major, row stride c_rs) = epilogue(alpha * A B)`.
#[derive(Clone, Copy)]
pub(crate) struct Matmul<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand<'a>,
    pub b: Operand<'a>,
    pub c: &'a GpuBuf,
    pub c_off: usize,
    pub c_rs: usize,
    pub alpha: f32,
    pub beta: f32,
    pub bias: Option<&'a GpuBuf>,
    /// Scale of every output column, applied to the product and low-rank term (DoRA's m / n).
    pub colscale: Option<&'a GpuBuf>,
    pub lowrank: Option<LowRank<'a>>,
}

impl<'a> Matmul<'a> {
    /// `C = alpha * A B + beta * C` with no epilogue terms; C row-major `[m, n]`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        m: usize,
        n: usize,
        k: usize,
        a: Operand<'a>,
        b: Operand<'a>,
        c: &'a GpuBuf,
        alpha: f32,
        beta: f32,
    ) -> Self {
        Matmul {
            m,
            n,
            k,
            a,
            b,
            c,
            c_off: 0,
            c_rs: n,
            alpha,
            beta,
            bias: None,
            colscale: None,
            lowrank: None,
        }
    }
}

#[derive(Clone, Copy)]
struct Sub {
    m: (usize, usize),
    n: (usize, usize),
    k: (usize, usize),
    first_k: bool,
}

/// Runs the matmul, split as needed to respect the binding limit.
pub(crate) fn run(ctx: &Ctx, mm: &Matmul<'_>) -> Result<()> {
    if mm.m == 0 || mm.n == 0 {
        return Ok(());
    }
    if mm.colscale.is_some() && mm.lowrank.is_some_and(|l| l.nscale.is_some()) {
        return Err(crate::Error::Backend {
            backend: "wgpu".into(),
            msg: "matmul: column scale and low-rank column scale share one binding".into(),
        });
    }
    if mm.c.dtype != DType::F32 {
        return Err(super::ctx::frozen_err("matmul output"));
    }
    let (a16, b16) = (mm.a.buf.dtype == DType::F16, mm.b.buf.dtype == DType::F16);
    let kernel = match (a16, b16) {
        (false, false) => ctx.kernel("matmul", SRC, "main")?,
        (true, false) => {
            ctx.kernel_f16("matmul.a16", || f16_variant(SRC, &["a"]), "main", 1 << 1)?
        }
        (false, true) => {
            ctx.kernel_f16("matmul.b16", || f16_variant(SRC, &["b"]), "main", 1 << 2)?
        }
        (true, true) => ctx.kernel_f16(
            "matmul.a16b16",
            || f16_variant(SRC, &["a", "b"]),
            "main",
            (1 << 1) | (1 << 2),
        )?,
    };
    let mut stack = vec![Sub {
        m: (0, mm.m),
        n: (0, mm.n),
        k: (0, mm.k),
        first_k: true,
    }];
    // Whether elements lo..=hi of a buffer fit one binding as `Bind::elems` binds them: from
    // the aligned-down start, rounded up to whole words.
    let fits = |b: &GpuBuf, lo: usize, hi: usize| {
        let esz = b.dtype.size();
        let align = (ctx.offset_align as usize / esz).max(1);
        let start = lo / align * align;
        (esz * (hi + 1 - start)).div_ceil(4) * 4 <= ctx.max_binding as usize
    };
    while let Some(s) = stack.pop() {
        let kr = if s.k.1 > s.k.0 { s.k } else { (0, 1) };
        let (alo, ahi) = mm.a.span(s.m, kr);
        let (blo, bhi) = mm.b.span(kr, s.n);
        let (clo, chi) = (
            mm.c_off + s.m.0 * mm.c_rs + s.n.0,
            mm.c_off + (s.m.1 - 1) * mm.c_rs + s.n.1 - 1,
        );
        // Which dimension to cut, if an operand is too wide for one binding: the one that
        // carries the operand's larger stride.
        let cut = if !fits(mm.a.buf, alo, ahi) && s.k.1 > s.k.0 {
            Some(pick(mm.a.rs, mm.a.cs, Dim::M, Dim::K, &s))
        } else if !fits(mm.b.buf, blo, bhi) && s.k.1 > s.k.0 {
            Some(pick(mm.b.rs, mm.b.cs, Dim::K, Dim::N, &s))
        } else if !fits(mm.c, clo, chi) {
            Some(pick(mm.c_rs, 1, Dim::M, Dim::N, &s))
        } else {
            None
        };
        match cut {
            Some(Dim::M) if s.m.1 - s.m.0 > 1 => {
                let mid = (s.m.0 + s.m.1) / 2;
                stack.push(Sub {
                    m: (s.m.0, mid),
                    ..s
                });
                stack.push(Sub {
                    m: (mid, s.m.1),
                    ..s
                });
            }
            Some(Dim::N) if s.n.1 - s.n.0 > 1 => {
                let mid = (s.n.0 + s.n.1) / 2;
                stack.push(Sub {
                    n: (s.n.0, mid),
                    ..s
                });
                stack.push(Sub {
                    n: (mid, s.n.1),
                    ..s
                });
            }
            Some(Dim::K) if s.k.1 - s.k.0 > 1 => {
                let mid = (s.k.0 + s.k.1) / 2;
                // Order matters only for the pairing of `first_k`; both run before any reader.
                stack.push(Sub {
                    k: (mid, s.k.1),
                    first_k: false,
                    ..s
                });
                stack.push(Sub {
                    k: (s.k.0, mid),
                    ..s
                });
            }
            Some(_) => {
                return Err(crate::Error::Backend {
                    backend: "wgpu".into(),
                    msg: format!(
                        "matmul operand row wider than the {} MiB storage binding limit",
                        ctx.max_binding >> 20
                    ),
                });
            }
            None => dispatch(ctx, &kernel, mm, &s, [(alo, ahi), (blo, bhi), (clo, chi)])?,
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dim {
    M,
    N,
    K,
}

fn extent(d: Dim, s: &Sub) -> usize {
    match d {
        Dim::M => s.m.1 - s.m.0,
        Dim::N => s.n.1 - s.n.0,
        Dim::K => s.k.1 - s.k.0,
    }
}

/// The dimension of an operand `(row dim, col dim)` to cut: the one with the larger stride,
/// unless it is already a single index.
fn pick(rs: usize, cs: usize, rd: Dim, cd: Dim, s: &Sub) -> Dim {
    let (major, minor) = if rs >= cs { (rd, cd) } else { (cd, rd) };
    if extent(major, s) > 1 { major } else { minor }
}

/// A binding of elements `lo..=hi` of `buf`, starting at an aligned offset; returns the bind
/// and the element index of its first element.
fn bind_span<'b>(ctx: &Ctx, buf: &'b GpuBuf, lo: usize, hi: usize) -> (Bind<'b>, usize) {
    Bind::elems(ctx, buf, lo, hi)
}

fn dispatch(
    ctx: &Ctx,
    kernel: &super::ctx::Kernel,
    mm: &Matmul<'_>,
    s: &Sub,
    spans: [(usize, usize); 3],
) -> Result<()> {
    let (m, n, k) = (extent(Dim::M, s), extent(Dim::N, s), extent(Dim::K, s));
    // With K = 0 only the epilogue runs and A, B are never read.
    let ((ba, a0), (bb, b0)) = if k == 0 {
        ((ctx.dummy(), mm.a.off), (ctx.dummy(), mm.b.off))
    } else {
        (
            bind_span(ctx, mm.a.buf, spans[0].0, spans[0].1),
            bind_span(ctx, mm.b.buf, spans[1].0, spans[1].1),
        )
    };
    let (bc, c0) = bind_span(ctx, mm.c, spans[2].0, spans[2].1);
    let a_off = mm.a.off + s.m.0 * mm.a.rs + s.k.0 * mm.a.cs - a0;
    let b_off = mm.b.off + s.k.0 * mm.b.rs + s.n.0 * mm.b.cs - b0;
    let c_off = mm.c_off + s.m.0 * mm.c_rs + s.n.0 - c0;
    let mut flags = 0;
    let lowrank = if s.first_k { mm.lowrank } else { None };
    let bias = if s.first_k { mm.bias } else { None };
    let beta = if s.first_k { mm.beta } else { 1.0 };
    if bias.is_some() {
        flags |= F_BIAS;
    }
    if mm.colscale.is_some() {
        flags |= F_COLSCALE;
    }
    let colv = mm.colscale.or(lowrank.and_then(|l| l.nscale));
    let mut lr = [0u32; 9];
    if let Some(l) = lowrank {
        flags |= F_LOWRANK;
        if l.jscale.is_some() {
            flags |= F_JSCALE;
        }
        if l.nscale.is_some() {
            flags |= F_NSCALE;
        }
        lr = [
            l.r as u32,
            (l.h.off + s.m.0 * l.h.rs) as u32,
            l.h.rs as u32,
            l.h.cs as u32,
            (l.g.off + s.n.0 * l.g.rs) as u32,
            l.g.rs as u32,
            l.g.cs as u32,
            l.scale.to_bits(),
            0,
        ];
    }
    let params = [
        m as u32,
        n as u32,
        k as u32,
        flags,
        a_off as u32,
        mm.a.rs as u32,
        mm.a.cs as u32,
        b_off as u32,
        mm.b.rs as u32,
        mm.b.cs as u32,
        c_off as u32,
        mm.c_rs as u32,
        mm.alpha.to_bits(),
        beta.to_bits(),
        s.n.0 as u32, // bias_off
        s.n.0 as u32, // cv_off
        lr[0],
        lr[1],
        lr[2],
        lr[3],
        lr[4],
        lr[5],
        lr[6],
        lr[7],
        0, // jv_off
    ];
    fn opt<'b>(ctx: &'b Ctx, b: Option<&'b GpuBuf>) -> Bind<'b> {
        b.map(Bind::all).unwrap_or_else(|| ctx.dummy())
    }
    let binds = [
        (1, ba),
        (2, bb),
        (3, bc),
        (4, opt(ctx, bias)),
        (5, opt(ctx, colv)),
        (6, opt(ctx, lowrank.map(|l| l.h.buf))),
        (7, opt(ctx, lowrank.map(|l| l.g.buf))),
        (8, opt(ctx, lowrank.and_then(|l| l.jscale))),
    ];
    let groups = (n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1);
    ctx.dispatch(kernel, &params, &binds, groups)
}
