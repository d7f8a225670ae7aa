// The mixed-batch low-rank term (Punica's SGMV / BGMV, S-LoRA; backend/wgpu/multi.rs): every
// row t of a batch that has a term adds the one of its own adapter i, whatever its rank r
// (ragged: no padding to a common rank, no list of supported shapes):
//
//   h[t, j]  = sum_k x[t, k] A[a_row + j, k]                 j < r       (shrink)
//   y[t, o] += sum_j h[t, j] B[b_off + o r + j]              o < out     (expand)
//
// Shapes: x [T, in] and y [T, out] f32 (y holds x W^T + bias); a [R, in], the pool's stacked
// A rows, and b, the pool's folded B_i' [out, r] blocks (flat, row-major), each bound whole and
// read through ld_a / ld_b (f32, or f16 in the host's variant); h the ragged f32 scratch, r
// values per listed row; tab the host's list of the rows that have a term, ENT = 5 words each:
// (row, a_row, b_off, r, h_off), rows in order, base-only rows (adapter -1 or rank 0) not
// listed. `row` and `h_off` are relative to this dispatch's bound ranges of x, y and h, whose
// first elements are at x_off, y_off and h_off in their bindings (large batches are processed
// in ranges of rows, one dispatch pair each).
//
// shrink: one workgroup of 64 invocations per listed row (n workgroups as a 2-D grid,
//   gx <= 65535). Ranks in blocks of jn <= 64, `in` walked in steps of 32: the x chunk and the
//   A tile [jn ranks][32 columns] staged in workgroup memory (coalesced loads), the tile's
//   products shared by (rank, lane) pairs, 64 / jn lanes per rank, whose partials are summed in
//   lane order at the end of the block (no rank leaves invocations idle: r = 1 uses 32 lanes).
// expand: one workgroup of 64 invocations per (listed row, block of 64 outputs) (n ceil(out /
//   64) workgroups as a 2-D grid, gx <= 65535), invocation = output; r walked in steps of 32: the
//   h chunk and the B tile [64 outputs][32 ranks] staged (coalesced loads), then y[t, o] += the
//   sum over j in order, one read-modify-write per output (no atomics: deterministic).
// Workgroup memory: tile 64 x 33 f32 (8448 B, rows padded against bank conflicts), vec_s 32 f32,
//   part 64 f32, ent_s 5 u32: 8852 B.

struct P {
    n: u32,        // listed rows in this dispatch
    din: u32,
    dout: u32,
    oblocks: u32,  // ceil(dout / 64)
    x_off: u32,
    y_off: u32,
    h_off: u32,
    tab_off: u32,
}

struct Ent {
    row: u32,
    a_row: u32,
    b_off: u32,
    r: u32,
    h_off: u32,
}

const ENT: u32 = 5u;
// Ranks per block (shrink), outputs per block (expand): the workgroup size.
const JB: u32 = 64u;
// Columns of x per step (shrink), ranks per step (expand).
const KB: u32 = 32u;
// Row stride of the staged tile.
const TS: u32 = 33u;

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> tab: array<u32>;
@group(0) @binding(5) var<storage, read_write> h: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

// The pool is read only through these, so that the host can make the variant in which either
// is stored as f16 (`array<f16>`, converted on load).
fn ld_a(i: u32) -> f32 { return a[i]; }
fn ld_b(i: u32) -> f32 { return b[i]; }

var<workgroup> tile: array<f32, 2112>; // [64][TS]
var<workgroup> vec_s: array<f32, 32>;
var<workgroup> part: array<f32, 64>;
var<workgroup> ent_s: Ent;

// Listed row e, read by one invocation and made uniform (its rank bounds the loops that hold
// the barriers).
fn entry(e: u32, tid: u32) -> Ent {
    if (tid == 0u) {
        let w = p.tab_off + e * ENT;
        ent_s = Ent(tab[w], tab[w + 1u], tab[w + 2u], tab[w + 3u], tab[w + 4u]);
    }
    return workgroupUniformLoad(&ent_s);
}

@compute @workgroup_size(64)
fn shrink(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) tid: u32) {
    let e = wg.y * nwg.x + wg.x;
    if (e >= p.n) {
        return;
    }
    let en = entry(e, tid);
    let xrow = p.x_off + en.row * p.din;
    for (var j0 = 0u; j0 < en.r; j0 += JB) {
        let jn = min(JB, en.r - j0);
        let lanes = JB / jn;
        let jj = tid % jn;
        let lane = tid / jn;
        let arow = (en.a_row + j0) * p.din;
        var acc = 0.0;
        for (var k0 = 0u; k0 < p.din; k0 += KB) {
            let kn = min(KB, p.din - k0);
            if (tid < kn) {
                vec_s[tid] = x[xrow + k0 + tid];
            }
            for (var q = tid; q < jn * kn; q += JB) {
                let rr = q / kn;
                let c = q % kn;
                tile[rr * TS + c] = ld_a(arow + rr * p.din + k0 + c);
            }
            workgroupBarrier();
            if (lane < lanes) {
                for (var c = lane; c < kn; c += lanes) {
                    acc = fma(vec_s[c], tile[jj * TS + c], acc);
                }
            }
            workgroupBarrier();
        }
        part[tid] = acc;
        workgroupBarrier();
        if (tid < jn) {
            var s = 0.0;
            for (var l = 0u; l < lanes; l++) {
                s += part[l * jn + tid];
            }
            h[p.h_off + en.h_off + j0 + tid] = s;
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(64)
fn expand(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) tid: u32) {
    let id = wg.y * nwg.x + wg.x;
    if (id >= p.n * p.oblocks) {
        return;
    }
    let e = id / p.oblocks;
    let o0 = (id % p.oblocks) * JB;
    let on = min(JB, p.dout - o0);
    let en = entry(e, tid);
    let hrow = p.h_off + en.h_off;
    let brow = en.b_off + o0 * en.r;
    var acc = 0.0;
    for (var j0 = 0u; j0 < en.r; j0 += KB) {
        let jn = min(KB, en.r - j0);
        if (tid < jn) {
            vec_s[tid] = h[hrow + j0 + tid];
        }
        // Block rows o0.. of B_i' [out, r], columns j0..j0 + jn: contiguous when r <= 32.
        for (var q = tid; q < on * jn; q += JB) {
            let o = q / jn;
            let c = q % jn;
            tile[o * TS + c] = ld_b(brow + o * en.r + j0 + c);
        }
        workgroupBarrier();
        if (tid < on) {
            for (var c = 0u; c < jn; c++) {
                acc = fma(vec_s[c], tile[tid * TS + c], acc);
            }
        }
        workgroupBarrier();
    }
    if (tid < on) {
        let yi = p.y_off + en.row * p.dout + o0 + tid;
        y[yi] = y[yi] + acc;
    }
}
