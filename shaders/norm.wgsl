// Row reductions: sum of squares (partials finished in f64 on the host), RMSNorm and its
// backward. Needs a reduction prelude (reduce.wgsl, or reduce_subgroup.wgsl with subgroups;
// prepended by the host). Rows are processed in ranges that fit one storage binding; the
// `*_off` parameters are the element offsets of the range's first row inside each binding.
// One workgroup of 256 invocations per row, except the column reduction of dweight (16
// columns x 16 row lanes per workgroup, a fixed tree in `red`).

struct P {
    rows: u32,
    d: u32,
    x_off: u32,
    y_off: u32,
    r_off: u32,
    g_off: u32,
    eps: f32,
    n: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read> rs_in: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read_write> rs_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> dw: array<f32>;

// Elements summed per workgroup of sum_squares (16 per invocation).
const SQ_BLOCK: u32 = 4096u;

// y[y_off + g] = sum of x^2 over elements g*SQ_BLOCK.. of this range (n elements); `rows`
// partials.
@compute @workgroup_size(256)
fn sum_squares(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>, ln: Lanes) {
    let g = wg.y * nwg.x + wg.x;
    if (g >= p.rows) {
        return;
    }
    var acc = 0.0;
    for (var i = 0u; i < SQ_BLOCK / WG; i++) {
        let e = g * SQ_BLOCK + i * WG + lid.x;
        if (e < p.n) {
            let v = x[p.x_off + e];
            acc = fma(v, v, acc);
        }
    }
    let s = wg_sum(acc, ln);
    if (lid.x == 0u) {
        y[p.y_off + g] = s;
    }
}

// y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps), rs_out = r.
@compute @workgroup_size(256)
fn rmsnorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>, ln: Lanes) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= p.rows) {
        return;
    }
    let xo = p.x_off + row * p.d;
    var acc = 0.0;
    for (var c = lid.x; c < p.d; c += WG) {
        let v = x[xo + c];
        acc = fma(v, v, acc);
    }
    let ms = wg_sum(acc, ln) / f32(p.d);
    let r = 1.0 / sqrt(ms + p.eps);
    let yo = p.y_off + row * p.d;
    for (var c = lid.x; c < p.d; c += WG) {
        y[yo + c] = w[c] * (x[xo + c] * r);
    }
    if (lid.x == 0u) {
        rs_out[p.r_off + row] = r;
    }
}

// dx (into y) = r (dy w) - x r^3 mean(dy w x).
@compute @workgroup_size(256)
fn rmsnorm_dx(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>, ln: Lanes) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= p.rows) {
        return;
    }
    let xo = p.x_off + row * p.d;
    let go = p.g_off + row * p.d;
    let r = rs_in[p.r_off + row];
    var acc = 0.0;
    for (var c = lid.x; c < p.d; c += WG) {
        acc = fma(dy[go + c] * w[c], x[xo + c], acc);
    }
    let dot = wg_sum(acc, ln);
    let k = r * r * r * dot / f32(p.d);
    let yo = p.y_off + row * p.d;
    for (var c = lid.x; c < p.d; c += WG) {
        y[yo + c] = r * dy[go + c] * w[c] - k * x[xo + c];
    }
}

// dw[col] += sum over the range's rows of dy * x * r: 16 columns per workgroup, 16 row lanes
// each summing every 16th row, then a fixed tree over the lanes.
@compute @workgroup_size(16, 16)
fn rmsnorm_dw(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let col = wg.x * 16u + lid.x;
    var acc = 0.0;
    if (col < p.d) {
        for (var t = lid.y; t < p.rows; t += 16u) {
            acc += dy[p.g_off + t * p.d + col] * x[p.x_off + t * p.d + col] * rs_in[p.r_off + t];
        }
    }
    let slot = lid.y * 16u + lid.x;
    red[slot] = acc;
    workgroupBarrier();
    for (var s = 8u; s > 0u; s = s >> 1u) {
        if (lid.y < s) {
            red[slot] = red[slot] + red[slot + s * 16u];
        }
        workgroupBarrier();
    }
    if (lid.y == 0u && col < p.d) {
        dw[col] = dw[col] + red[lid.x];
    }
}
