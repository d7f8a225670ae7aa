// NF4 dequantization (bitsandbytes' layout, see quant/nf4.rs) of a range of elements of one
// weight, into an f32 buffer: the bounded tile that the NF4 matmuls multiply (backend/wgpu/
// nf4.rs), or the whole weight for merging and export.
//
// Element e (flat, row-major) is nibble e of `packed`: word e / 8, byte (e / 2) % 4 of that
// word (little-endian), the high nibble when e is even. Its value is code[q] * absmax(e / bs),
// one f32 product (bit for bit Nf4Tensor::dequantize). With double quantization the block's
// absmax is nested_code[absmax_q[b]] * nested_absmax[b / nbs] + offset, the product rounded to
// f32 before the sum (never contracted into an FMA, see `double_absmax`).
//
// Buffers are bound from an aligned word at or before the first one this dispatch reads; the
// `*_base` parameters are the global index of the first bound element.

struct P {
    // The 16 NF4 code values as f32 bits, 4 per vector (uniform arrays have a 16-byte stride).
    code: array<vec4<u32>, 4>,
    n: u32,        // elements in this dispatch
    e0: u32,       // global index of its first element
    out_off: u32,  // index in `out` of its first element
    pk_base: u32,  // global word index of packed[0]
    bs: u32,       // blocksize
    am_base: u32,  // global index of absmax[0] (a block), or of absmax_q[0] (a word of 4 blocks)
    nbs: u32,      // nested blocksize
    na_base: u32,  // global index of nested_absmax[0]
    zero: u32,     // always 0, unknown to the compiler (see double_absmax)
    offset: f32,   // double quant offset
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> packed: array<u32>;
@group(0) @binding(2) var<storage, read> absmax: array<f32>;
@group(0) @binding(3) var<storage, read> absmax_q: array<u32>;
@group(0) @binding(4) var<storage, read> nested_absmax: array<f32>;
@group(0) @binding(5) var<storage, read> nested_code: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

var<workgroup> code: array<f32, 16>;

fn load_code(lid: u32) {
    if (lid < 16u) {
        code[lid] = bitcast<f32>(p.code[lid / 4u][lid % 4u]);
    }
    workgroupBarrier();
}

fn element(wg: vec3<u32>, lid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid.x;
}

// The 4-bit index of global element e.
fn nibble(e: u32) -> u32 {
    let w = packed[(e >> 3u) - p.pk_base];
    let shift = ((e >> 1u) & 3u) * 8u + select(0u, 4u, (e & 1u) == 0u);
    return (w >> shift) & 15u;
}

// The f32 absmax of block b under double quantization. The XOR with `p.zero` (always 0, but a
// run-time value) makes the product an opaque f32 value, so the compiler cannot fuse it with
// the offset into one FMA: bitsandbytes rounds the product, then adds.
fn double_absmax(b: u32) -> f32 {
    let q = (absmax_q[(b >> 2u) - p.am_base] >> ((b & 3u) * 8u)) & 255u;
    let prod = nested_code[q] * nested_absmax[b / p.nbs - p.na_base];
    return bitcast<f32>(bitcast<u32>(prod) ^ p.zero) + p.offset;
}

@compute @workgroup_size(256)
fn dequant_f32(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    load_code(lid.x);
    let i = element(wg, lid, nwg);
    if (i < p.n) {
        let e = p.e0 + i;
        out[p.out_off + i] = code[nibble(e)] * absmax[e / p.bs - p.am_base];
    }
}

@compute @workgroup_size(256)
fn dequant_double(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    load_code(lid.x);
    let i = element(wg, lid, nwg);
    if (i < p.n) {
        let e = p.e0 + i;
        out[p.out_off + i] = code[nibble(e)] * double_absmax(e / p.bs);
    }
}
