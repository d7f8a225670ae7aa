// AdaLoRA's rank allocator and orthogonal regularizer (backend/wgpu/adalora.rs; PEFT's
// RankAllocator and AdaLoraModel.forward): the last step of the triplet scores, torch.kthvalue
// over every layer's scores, the keep-mask and its application to lora_E, and the norm and
// scaling of the regularizer's Gram matrices. The row and column sums of the scores and the
// Gram products run in adapters.wgsl and matmul.wgsl. Needs a reduction prelude (reduce.wgsl,
// or reduce_subgroup.wgsl with subgroups; prepended by the host). The buffers here are small
// (one value per rank, r x r matrices, one score per rank of every layer) and bound whole.

struct P {
    // Elements (ranks; scores; the Gram matrix's side r; norms).
    n: u32,
    // kthvalue's 1-based k.
    k: u32,
    // Offset into the scores / keep-mask / norms.
    off: u32,
    in_f: u32,
    out_f: u32,
    s: f32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read> d: array<f32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;
@group(0) @binding(6) var<storage, read_write> o2: array<f32>;

fn flat(wg: vec3<u32>, lid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid.x;
}

// NaN tested on the bits: WGSL lets a compiler assume floats are never NaN.
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// A quiet NaN made from a runtime value (a constant NaN is a shader-creation error).
fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u | (p.n & 0u));
}

// The order of f32::total_cmp (torch's sort order: -NaN < -inf < ... < -0 < +0 < ... < +inf <
// NaN) as an unsigned key.
fn order_key(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    if ((u & 0x80000000u) != 0u) {
        return ~u;
    }
    return u | 0x80000000u;
}

// o[off + i] = a[i] b[i] + (c[i] / in_f + d[i] / out_f) for i < n (= r): the triplet score
// s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki)) from E's EMAs (a, b) and the sums of A's rows (c)
// and B's columns (d) of ipt * unc. A mean over no entries is NaN.
@compute @workgroup_size(256)
fn triplet_combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(wg, lid, nwg);
    if (i < p.n) {
        var mean_a = nan();
        if (p.in_f > 0u) {
            mean_a = c[i] / f32(p.in_f);
        }
        var mean_b = nan();
        if (p.out_f > 0u) {
            mean_b = d[i] / f32(p.out_f);
        }
        o[p.off + i] = a[i] * b[i] + (mean_a + mean_b);
    }
}

var<workgroup> tile: array<u32, 256>;

// torch.kthvalue(a[0..n], k): o[0] = the k-th smallest (1-based) in total_cmp order. Each
// invocation counts, for its own element, the elements below it and at or below it, reading
// the scores in tiles of 256 through workgroup memory: element i is the k-th smallest when
// lt < k <= le. Of equal elements (same bits) only the first writes, so there is no race.
@compute @workgroup_size(256)
fn kthvalue(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(wg, lid, nwg);
    var key = 0u;
    if (i < p.n) {
        key = order_key(a[i]);
    }
    var lt = 0u;
    var le = 0u;
    var ties_before = 0u;
    for (var t0 = 0u; t0 < p.n; t0 += 256u) {
        let j = t0 + lid.x;
        if (j < p.n) {
            tile[lid.x] = order_key(a[j]);
        }
        workgroupBarrier();
        let m = min(256u, p.n - t0);
        for (var q = 0u; q < m; q++) {
            let kq = tile[q];
            lt += select(0u, 1u, kq < key);
            le += select(0u, 1u, kq <= key);
            ties_before += select(0u, 1u, kq == key && t0 + q < i);
        }
        workgroupBarrier();
    }
    if (i < p.n && lt < p.k && p.k <= le && ties_before == 0u) {
        o[0] = a[i];
    }
}

// o[i] = 0 where a[i] <= b[0] (PEFT masks those), else 1; NaN on either side keeps.
@compute @workgroup_size(256)
fn rank_mask(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(wg, lid, nwg);
    if (i < p.n) {
        let s = a[i];
        let t = b[0];
        var keep = 1.0;
        if (!is_nan(s) && !is_nan(t) && s <= t) {
            keep = 0.0;
        }
        o[i] = keep;
    }
}

// lora_E (o, n = r entries) = 0 where the keep-mask a[off + i] is 0.
@compute @workgroup_size(256)
fn apply_mask(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(wg, lid, nwg);
    if (i < p.n && a[p.off + i] == 0.0) {
        o[i] = 0.0;
    }
}

// One workgroup, on the Gram matrix o = V V^T (n x n): o -= I, o2[off] = ||o||_F, then
// o *= s / ||o||_F (0 when the norm is 0, as torch's gradient of the norm there), so that the
// regularizer's gradient is one product o V away.
@compute @workgroup_size(256)
fn orth_gram(@builtin(local_invocation_id) lid: vec3<u32>, ln: Lanes) {
    let nn = p.n * p.n;
    var acc = 0.0;
    for (var e = lid.x; e < nn; e += 256u) {
        var v = o[e];
        if (e % (p.n + 1u) == 0u) {
            v -= 1.0;
        }
        o[e] = v;
        acc += v * v;
    }
    let norm = sqrt(wg_sum(acc, ln));
    if (lid.x == 0u) {
        o2[p.off] = norm;
    }
    var f = 0.0;
    if (norm > 0.0) {
        f = p.s / norm;
    }
    for (var e = lid.x; e < nn; e += 256u) {
        o[e] = o[e] * f;
    }
}

// One workgroup: o[0] = s * sum(a[0..n]) (the regularizer's value from every layer's norms).
@compute @workgroup_size(256)
fn orth_total(@builtin(local_invocation_id) lid: vec3<u32>, ln: Lanes) {
    var acc = 0.0;
    for (var e = lid.x; e < p.n; e += 256u) {
        acc += a[e];
    }
    let total = wg_sum(acc, ln);
    if (lid.x == 0u) {
        o[0] = p.s * total;
    }
}
