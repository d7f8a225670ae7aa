// Tiled f32 matmul (A and B may be stored as f16) with a fused epilogue: the base GEMM of every linear layer, and the place
// where the low-rank adapter terms are added in the same pass over the output.
//
//   C(i, j) = cs[j] * (alpha * sum_k A(i, k) B(k, j)
//                      + lr_scale * ns[j] * sum_q js[q] H(i, q) G(j, q))
//             + bias[j] + beta * C(i, j)
//
// with every operand addressed by (offset, row stride, column stride), so one kernel covers
// x W^T, dy W, dy^T x, B A and their sub-blocks. `cs` (column scale, DoRA's m / n) and `ns`
// (VeRA's lambda_b) share the `colv` binding; `js` (VeRA's lambda_d) is `jv`. Each flag turns
// one term on. 64 x 64 output tile per workgroup, 16 x 16 invocations, 4 x 4 outputs each,
// K walked in steps of 16 through workgroup memory.

struct P {
    m: u32, n: u32, k: u32, flags: u32,
    a_off: u32, a_rs: u32, a_cs: u32,
    b_off: u32, b_rs: u32, b_cs: u32,
    c_off: u32, c_rs: u32,
    alpha: f32, beta: f32,
    bias_off: u32, cv_off: u32,
    r: u32, h_off: u32, h_rs: u32, h_cs: u32,
    g_off: u32, g_rs: u32, g_cs: u32,
    lr_scale: f32, jv_off: u32,
}

const F_BIAS: u32 = 1u;
const F_COLSCALE: u32 = 2u;
const F_LOWRANK: u32 = 4u;
const F_JSCALE: u32 = 8u;
const F_NSCALE: u32 = 16u;

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> colv: array<f32>;
@group(0) @binding(6) var<storage, read> h: array<f32>;
@group(0) @binding(7) var<storage, read> g: array<f32>;
@group(0) @binding(8) var<storage, read> jv: array<f32>;

// A and B are read only through these, so that the host can make the variant in which either
// is a frozen f16 weight (`array<f16>`, converted to f32 on load; backend/wgpu/matmul.rs).
fn ld_a(i: u32) -> f32 { return a[i]; }
fn ld_b(i: u32) -> f32 { return b[i]; }

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 1024>; // [TK][TM]
var<workgroup> Bs: array<f32, 1024>; // [TK][TN]

// Epilogue for output (i, j) from the accumulated product `prod`.
fn store(i: u32, j: u32, prod: f32) {
    if (i >= p.m || j >= p.n) {
        return;
    }
    var v = p.alpha * prod;
    if ((p.flags & F_LOWRANK) != 0u) {
        var s = 0.0;
        for (var q = 0u; q < p.r; q++) {
            var hv = h[p.h_off + i * p.h_rs + q * p.h_cs];
            if ((p.flags & F_JSCALE) != 0u) {
                hv *= jv[p.jv_off + q];
            }
            s = fma(hv, g[p.g_off + j * p.g_rs + q * p.g_cs], s);
        }
        if ((p.flags & F_NSCALE) != 0u) {
            s *= colv[p.cv_off + j];
        }
        v += p.lr_scale * s;
    }
    if ((p.flags & F_COLSCALE) != 0u) {
        v *= colv[p.cv_off + j];
    }
    if ((p.flags & F_BIAS) != 0u) {
        v += bias[p.bias_off + j];
    }
    let ci = p.c_off + i * p.c_rs + j;
    if (p.beta != 0.0) {
        v += p.beta * c[ci];
    }
    c[ci] = v;
}

fn store_row(i: u32, j0: u32, acc: vec4<f32>) {
    store(i, j0, acc.x);
    store(i, j0 + 16u, acc.y);
    store(i, j0 + 32u, acc.z);
    store(i, j0 + 48u, acc.w);
}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;
    let tid = lid.y * 16u + lid.x;
    // Invocation (lx, ly) owns rows ly + 16 ii and columns lx + 16 jj, ii, jj < 4: the four
    // accumulator rows are vec4s so nothing is indexed dynamically (registers, not memory).
    var acc0 = vec4<f32>();
    var acc1 = vec4<f32>();
    var acc2 = vec4<f32>();
    var acc3 = vec4<f32>();
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = tid + e * 256u;
            // Walk memory along the operand's unit stride so neighbouring invocations read
            // neighbouring words.
            var i = idx % TM;
            var kk = idx / TM;
            if (p.a_cs == 1u) {
                i = idx / TK;
                kk = idx % TK;
            }
            var v = 0.0;
            if (row0 + i < p.m && k0 + kk < p.k) {
                v = ld_a(p.a_off + (row0 + i) * p.a_rs + (k0 + kk) * p.a_cs);
            }
            As[kk * TM + i] = v;
            var j = idx % TN;
            var kb = idx / TN;
            if (p.b_cs != 1u) {
                j = idx / TK;
                kb = idx % TK;
            }
            var w = 0.0;
            if (col0 + j < p.n && k0 + kb < p.k) {
                w = ld_b(p.b_off + (k0 + kb) * p.b_rs + (col0 + j) * p.b_cs);
            }
            Bs[kb * TN + j] = w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let ao = kk * TM + lid.y;
            let bo = kk * TN + lid.x;
            let av = vec4<f32>(As[ao], As[ao + 16u], As[ao + 32u], As[ao + 48u]);
            let bv = vec4<f32>(Bs[bo], Bs[bo + 16u], Bs[bo + 32u], Bs[bo + 48u]);
            acc0 = fma(vec4<f32>(av.x), bv, acc0);
            acc1 = fma(vec4<f32>(av.y), bv, acc1);
            acc2 = fma(vec4<f32>(av.z), bv, acc2);
            acc3 = fma(vec4<f32>(av.w), bv, acc3);
        }
        workgroupBarrier();
    }
    let i0 = row0 + lid.y;
    let j0 = col0 + lid.x;
    store_row(i0, j0, acc0);
    store_row(i0 + 16u, j0, acc1);
    store_row(i0 + 32u, j0, acc2);
    store_row(i0 + 48u, j0, acc3);
}
