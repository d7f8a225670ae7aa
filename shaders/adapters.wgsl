// Reductions and row scalings of the fused low-rank product and the AdaLoRA allocator
// (backend/wgpu/dense.rs, lowrank.rs); every product goes through the matmul of matmul.wgsl.
// Operands are 2-D views: row i, column c of `x` is x[x_off + i * x_rs + c] (likewise y, z,
// o). `rows` and the offsets are local to this dispatch (large tensors are processed in bound
// ranges of rows). Needs a reduction prelude (reduce.wgsl, or reduce_subgroup.wgsl with
// subgroups; prepended by the host).

struct P {
    rows: u32, cols: u32, flags: u32, s: f32,
    x_off: u32, x_rs: u32,
    y_off: u32, y_rs: u32,
    z_off: u32, z_rs: u32,
    o_off: u32, o_rs: u32,
    v_off: u32,
}

// rowdot: multiply by v[c]; colsum: divide by v[c] at the end.
const F_V: u32 = 1u;
// colsum: add into o (a later range of rows).
const F_ACC: u32 = 2u;
// row_scale: divide by v[r] instead of multiplying.
const F_DIV: u32 = 4u;
// rowdot, colsum: y is all ones (not read): plain row or column sums of x.
const F_ONE_Y: u32 = 8u;

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read> z: array<f32>;

// x and y are read only through these, so that the host can make the variant in which either
// is a frozen f16 weight (`array<f16>`, converted on load): DoRA's ||W0||_row^2 is rowdot(W0, W0).
fn ld_x(i: u32) -> f32 { return x[i]; }
fn ld_y(i: u32) -> f32 { return y[i]; }
fn ld_y_or_one(i: u32) -> f32 {
    if ((p.flags & F_ONE_Y) != 0u) {
        return 1.0;
    }
    return ld_y(i);
}

var<workgroup> part: array<f32, 256>;

fn group_index(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

// Neumaier's compensated step: (sum, compensation) after adding t.
fn comp_add(acc: vec2<f32>, t: f32) -> vec2<f32> {
    let s = acc.x + t;
    var c = acc.y;
    if (abs(acc.x) >= abs(t)) {
        c += (acc.x - s) + t;
    } else {
        c += (t - s) + acc.x;
    }
    return vec2<f32>(s, c);
}

// o[o_off + i] = sum_c x[i, c] y[i, c] (* v[v_off + c] with F_V; y = 1 with F_ONE_Y): one workgroup per row, 256
// compensated strided partial sums combined by the prelude's `wg_sum` (a fixed tree, or
// subgroup sums; deterministic either way).
@compute @workgroup_size(256)
fn rowdot(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>, ln: Lanes) {
    let i = group_index(wg, nwg);
    var acc = vec2<f32>(0.0, 0.0);
    if (i < p.rows) {
        for (var c = lid.x; c < p.cols; c += 256u) {
            var t = ld_x(p.x_off + i * p.x_rs + c) * ld_y_or_one(p.y_off + i * p.y_rs + c);
            if ((p.flags & F_V) != 0u) {
                t *= v[p.v_off + c];
            }
            acc = comp_add(acc, t);
        }
    }
    let total = wg_sum(acc.x + acc.y, ln);
    if (lid.x == 0u && i < p.rows) {
        o[p.o_off + i * p.o_rs] = total;
    }
}

// o[o_off + c] = (o[o_off + c] with F_ACC) + sum_i x[i, c] y[i, c] (y = 1 with F_ONE_Y), then
// / v[v_off + c] with F_V:
// 64 columns per workgroup, 4 compensated lanes of rows each, combined in a fixed order.
@compute @workgroup_size(64, 4)
fn colsum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = group_index(wg, nwg) * 64u + lid.x;
    var acc = vec2<f32>(0.0, 0.0);
    if (c < p.cols) {
        for (var i = lid.y; i < p.rows; i += 4u) {
            acc = comp_add(acc, ld_x(p.x_off + i * p.x_rs + c) * ld_y_or_one(p.y_off + i * p.y_rs + c));
        }
    }
    part[lid.y * 64u + lid.x] = acc.x + acc.y;
    workgroupBarrier();
    if (lid.y == 0u && c < p.cols) {
        var s = (part[lid.x] + part[64u + lid.x]) + (part[128u + lid.x] + part[192u + lid.x]);
        if ((p.flags & F_ACC) != 0u) {
            s += o[p.o_off + c];
        }
        if ((p.flags & F_V) != 0u) {
            s /= v[p.v_off + c];
        }
        o[p.o_off + c] = s;
    }
}

// o[i, c] = x[i, c] * v[v_off + i] (or / with F_DIV): one invocation per element.
@compute @workgroup_size(256)
fn row_scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = group_index(wg, nwg) * 256u + lid.x;
    if (e < p.rows * p.cols) {
        let i = e / p.cols;
        let c = e % p.cols;
        let a = ld_x(p.x_off + i * p.x_rs + c);
        let k = v[p.v_off + i];
        var r = a * k;
        if ((p.flags & F_DIV) != 0u) {
            r = a / k;
        }
        o[p.o_off + i * p.o_rs + c] = r;
    }
}

// o[i, c] *= v[v_off + i] (or /= with F_DIV), in place.
@compute @workgroup_size(256)
fn row_scale_inplace(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = group_index(wg, nwg) * 256u + lid.x;
    if (e < p.rows * p.cols) {
        let i = e / p.cols;
        let c = e % p.cols;
        let oi = p.o_off + i * p.o_rs + c;
        let k = v[p.v_off + i];
        if ((p.flags & F_DIV) != 0u) {
            o[oi] = o[oi] / k;
        } else {
            o[oi] = o[oi] * k;
        }
    }
}

// DoRA's weight norm from its low-rank terms, one invocation per output row i:
// o[i] = sqrt(max(v[i] + 2 s (x[i, :] . z[i, :]) + s^2 (y[i, :] . z[i, :]), 0)) with x = W0 A^T,
// y = B' (A A^T), z = B' (all [out, r], cols = r; B' = diag(o) B diag(rho), the term's factor
// with its scales folded in) and v = ||W0||_row^2.
@compute @workgroup_size(256)
fn dora_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = group_index(wg, nwg) * 256u + lid.x;
    if (i < p.rows) {
        var cross = vec2<f32>(0.0, 0.0);
        var quad = vec2<f32>(0.0, 0.0);
        for (var c = 0u; c < p.cols; c++) {
            let b = z[p.z_off + i * p.z_rs + c];
            cross = comp_add(cross, ld_x(p.x_off + i * p.x_rs + c) * b);
            quad = comp_add(quad, ld_y(p.y_off + i * p.y_rs + c) * b);
        }
        let s = p.s;
        let lin = (2.0 * s) * (cross.x + cross.y);
        let sq = (s * s) * (quad.x + quad.y);
        let w = v[p.v_off + i];
        // The largest terms first, as they usually are: ||W0||^2 then the cross term.
        let sum = comp_add(comp_add(vec2<f32>(w, 0.0), lin), sq);
        o[p.o_off + i * p.o_rs] = sqrt(max(sum.x + sum.y, 0.0));
    }
}
