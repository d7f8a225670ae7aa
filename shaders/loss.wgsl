// Cross-entropy: one workgroup per counted row (the host lists (row, label) for labels >= 0;
// ignored rows stay zero). Needs a reduction prelude (reduce.wgsl, or reduce_subgroup.wgsl
// with subgroups; prepended by the host). Writes dlogits = scale * (softmax - onehot) once,
// and (max, sum of exp, logit of the label) per entry, from which the host forms the loss in
// f64. Rows in ranges that fit one binding: `x_off`, `d_off` locate the range's first row,
// list rows are relative to it.

struct P {
    count: u32,
    v: u32,
    x_off: u32,
    d_off: u32,
    list_off: u32,
    st_off: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> dl: array<f32>;
@group(0) @binding(3) var<storage, read> list: array<u32>;
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;

@compute @workgroup_size(256)
fn cross_entropy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>, ln: Lanes) {
    let k = wg.y * nwg.x + wg.x;
    if (k >= p.count) {
        return;
    }
    let row = list[p.list_off + 2u * k];
    let label = list[p.list_off + 2u * k + 1u];
    let xo = p.x_off + row * p.v;
    var m = -3.4028235e38;
    for (var c = lid.x; c < p.v; c += WG) {
        m = max(m, x[xo + c]);
    }
    m = wg_max(m, ln);
    var s = 0.0;
    for (var c = lid.x; c < p.v; c += WG) {
        s += exp(x[xo + c] - m);
    }
    s = wg_sum(s, ln);
    let inv = p.scale / s;
    let o = p.d_off + row * p.v;
    for (var c = lid.x; c < p.v; c += WG) {
        var g = exp(x[xo + c] - m) * inv;
        if (c == label) {
            g -= p.scale;
        }
        dl[o + c] = g;
    }
    if (lid.x == 0u) {
        stats[p.st_off + 3u * k] = m;
        stats[p.st_off + 3u * k + 1u] = s;
        stats[p.st_off + 3u * k + 2u] = x[xo + label];
    }
}
