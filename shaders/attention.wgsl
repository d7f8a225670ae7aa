// Causal grouped-query attention over packed sequences, FlashAttention style: online softmax
// over key tiles in workgroup memory, no T x T matrix anywhere. Query head h reads kv head
// h / group. `starts[t]` is the first row of the sequence holding row t (NONE for a row in no
// sequence: its output and lse stay zero, as on the CPU); row t attends keys starts[t]..=t.
//
// Forward and dq: one workgroup per (block of 16 query rows, query head). dk/dv: one workgroup
// per (block of 16 key rows, kv head), looping over the query heads of its group and the query
// rows that can attend the block (up to qend, computed on the host), so every gradient element
// is written by exactly one invocation (deterministic, no atomics). 64 invocations: 4 per row,
// each owning the dims d = lane + 4 i (head_dim <= 128).
//
// attn_cached is the forward of new query rows over a separate context (a KV cache): q has
// `t` rows, k and v `tk`, and `qrange[2 t], qrange[2 t + 1]` is the range lo..hi of kv rows
// that q row t attends (lo = NONE: a row in no sequence, left zero). No lse (no backward).

struct P {
    t: u32,
    hd: u32,
    qw: u32,
    kw: u32,
    group: u32,
    scale: f32,
    n_heads: u32,
    // Rows of k and v (= t except in attn_cached).
    tk: u32,
}

const B: u32 = 16u;
const NONE: u32 = 0xffffffffu;
const NEG: f32 = -1.0e30;

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> starts: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
@group(0) @binding(7) var<storage, read> dout: array<f32>;
@group(0) @binding(8) var<storage, read> o: array<f32>;
@group(0) @binding(9) var<storage, read> lse_in: array<f32>;
@group(0) @binding(10) var<storage, read_write> delta: array<f32>;
@group(0) @binding(11) var<storage, read> delta_in: array<f32>;
@group(0) @binding(12) var<storage, read_write> dq: array<f32>;
@group(0) @binding(13) var<storage, read_write> dk: array<f32>;
@group(0) @binding(14) var<storage, read_write> dv: array<f32>;
@group(0) @binding(15) var<storage, read> qend: array<u32>;
@group(0) @binding(16) var<storage, read> qrange: array<u32>;

// One tile of 16 rows x hd (keys, values, query rows or output gradients).
var<workgroup> tile: array<f32, 2048>;
// Scores or probabilities [16 rows][16 columns], and a second such matrix.
var<workgroup> sc: array<f32, 256>;
var<workgroup> sc2: array<f32, 256>;
// Online-softmax state per query row: running max, running sum, last rescale factor.
var<workgroup> wm: array<f32, 16>;
var<workgroup> wl: array<f32, 16>;
var<workgroup> wa: array<f32, 16>;
var<workgroup> lo_s: u32;
var<workgroup> hi_s: u32;

fn row_start(t: u32) -> u32 {
    if (t < p.t) {
        return starts[t];
    }
    return NONE;
}

// Rows row0..row0+16 of head `head` of a [T, width] buffer into `tile` (zeros past T).
fn load_q(row0: u32, head: u32, tid: u32) {
    for (var e = tid; e < B * p.hd; e += 64u) {
        let row = row0 + e / p.hd;
        var val = 0.0;
        if (row < p.t) {
            val = q[row * p.qw + head * p.hd + e % p.hd];
        }
        tile[e] = val;
    }
}

fn load_k(row0: u32, head: u32, tid: u32) {
    for (var e = tid; e < B * p.hd; e += 64u) {
        let row = row0 + e / p.hd;
        var val = 0.0;
        if (row < p.tk) {
            val = k[row * p.kw + head * p.hd + e % p.hd];
        }
        tile[e] = val;
    }
}

fn load_v(row0: u32, head: u32, tid: u32) {
    for (var e = tid; e < B * p.hd; e += 64u) {
        let row = row0 + e / p.hd;
        var val = 0.0;
        if (row < p.tk) {
            val = v[row * p.kw + head * p.hd + e % p.hd];
        }
        tile[e] = val;
    }
}

fn load_dout(row0: u32, head: u32, tid: u32) {
    for (var e = tid; e < B * p.hd; e += 64u) {
        let row = row0 + e / p.hd;
        var val = 0.0;
        if (row < p.t) {
            val = dout[row * p.qw + head * p.hd + e % p.hd];
        }
        tile[e] = val;
    }
}

// Key range of a block of query rows: min start .. max row + 1 over its rows in a sequence,
// made uniform through workgroup memory.
fn query_block_range(t0: u32, tid: u32) -> vec2<u32> {
    if (tid == 0u) {
        var lo = NONE;
        var hi = 0u;
        for (var i = 0u; i < B; i++) {
            let s = row_start(t0 + i);
            if (s != NONE) {
                lo = min(lo, s);
                hi = max(hi, t0 + i + 1u);
            }
        }
        if (hi == 0u) {
            lo = 0u;
        }
        lo_s = lo;
        hi_s = hi;
    }
    return vec2<u32>(workgroupUniformLoad(&lo_s), workgroupUniformLoad(&hi_s));
}

@compute @workgroup_size(64)
fn attn_fwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let h = wg.y;
    let kvh = h / p.group;
    let t0 = wg.x * B;
    let r = tid / 4u;
    let lane = tid % 4u;
    let t = t0 + r;
    let start = row_start(t);
    let valid = start != NONE;
    let nd = (p.hd + 3u - lane) / 4u;
    let qo = t * p.qw + h * p.hd;
    if (tid < B) {
        wm[tid] = NEG;
        wl[tid] = 0.0;
        wa[tid] = 1.0;
    }
    let range = query_block_range(t0, tid);
    var acc: array<f32, 32>;
    for (var k0 = range.x; k0 < range.y; k0 += B) {
        load_k(k0, kvh, tid);
        workgroupBarrier();
        if (valid) {
            var s: array<f32, 4>;
            for (var d = 0u; d < p.hd; d++) {
                let qv = q[qo + d];
                for (var jj = 0u; jj < 4u; jj++) {
                    s[jj] = fma(qv, tile[(lane + 4u * jj) * p.hd + d], s[jj]);
                }
            }
            for (var jj = 0u; jj < 4u; jj++) {
                sc[r * B + lane + 4u * jj] = s[jj] * p.scale;
            }
        }
        workgroupBarrier();
        // Softmax state, one invocation per row (the row of invocation tid, not tid / 4).
        if (tid < B) {
            let tr = t0 + tid;
            let rs = row_start(tr);
            if (rs != NONE) {
                let m_old = wm[tid];
                var mx = m_old;
                for (var j = 0u; j < B; j++) {
                    let key = k0 + j;
                    if (key >= rs && key <= tr) {
                        mx = max(mx, sc[tid * B + j]);
                    }
                }
                let alpha = exp(m_old - mx);
                var l = wl[tid] * alpha;
                for (var j = 0u; j < B; j++) {
                    let key = k0 + j;
                    var pj = 0.0;
                    if (key >= rs && key <= tr) {
                        pj = exp(sc[tid * B + j] - mx);
                    }
                    sc[tid * B + j] = pj;
                    l += pj;
                }
                wm[tid] = mx;
                wl[tid] = l;
                wa[tid] = alpha;
            }
        }
        // The key tile is no longer read: load the value tile in its place.
        load_v(k0, kvh, tid);
        workgroupBarrier();
        if (valid) {
            let alpha = wa[r];
            for (var i = 0u; i < nd; i++) {
                acc[i] *= alpha;
            }
            for (var j = 0u; j < B; j++) {
                let pj = sc[r * B + j];
                for (var i = 0u; i < nd; i++) {
                    acc[i] = fma(pj, tile[j * p.hd + lane + 4u * i], acc[i]);
                }
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        let l = wl[r];
        for (var i = 0u; i < nd; i++) {
            out[qo + lane + 4u * i] = acc[i] / l;
        }
        if (lane == 0u) {
            lse[h * p.t + t] = wm[r] + log(l);
        }
    }
}

// delta[h, t] = rowsum(dO * O) over head h of row t.
@compute @workgroup_size(256)
fn attn_delta(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = (wg.y * nwg.x + wg.x) * 256u + lid.x;
    if (e >= p.t * p.n_heads) {
        return;
    }
    let h = e / p.t;
    let t = e % p.t;
    let base = t * p.qw + h * p.hd;
    var acc = 0.0;
    for (var d = 0u; d < p.hd; d++) {
        acc += dout[base + d] * o[base + d];
    }
    delta[e] = acc;
}

// dq = dS K with dS = P (dP - delta) scale, P = exp(scale q.k - lse), dP = dO.v.
@compute @workgroup_size(64)
fn attn_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let h = wg.y;
    let kvh = h / p.group;
    let t0 = wg.x * B;
    let r = tid / 4u;
    let lane = tid % 4u;
    let t = t0 + r;
    let start = row_start(t);
    let valid = start != NONE;
    let nd = (p.hd + 3u - lane) / 4u;
    let qo = t * p.qw + h * p.hd;
    var lse_r = 0.0;
    var delta_r = 0.0;
    if (valid) {
        lse_r = lse_in[h * p.t + t];
        delta_r = delta_in[h * p.t + t];
    }
    let range = query_block_range(t0, tid);
    var acc: array<f32, 32>;
    for (var k0 = range.x; k0 < range.y; k0 += B) {
        load_v(k0, kvh, tid);
        workgroupBarrier();
        var dp: array<f32, 4>;
        if (valid) {
            for (var d = 0u; d < p.hd; d++) {
                let g = dout[qo + d];
                for (var jj = 0u; jj < 4u; jj++) {
                    dp[jj] = fma(g, tile[(lane + 4u * jj) * p.hd + d], dp[jj]);
                }
            }
        }
        workgroupBarrier();
        load_k(k0, kvh, tid);
        workgroupBarrier();
        if (valid) {
            var s: array<f32, 4>;
            for (var d = 0u; d < p.hd; d++) {
                let qv = q[qo + d];
                for (var jj = 0u; jj < 4u; jj++) {
                    s[jj] = fma(qv, tile[(lane + 4u * jj) * p.hd + d], s[jj]);
                }
            }
            for (var jj = 0u; jj < 4u; jj++) {
                let key = k0 + lane + 4u * jj;
                var ds = 0.0;
                if (key >= start && key <= t) {
                    let pr = exp(s[jj] * p.scale - lse_r);
                    ds = pr * (dp[jj] - delta_r) * p.scale;
                }
                sc[r * B + lane + 4u * jj] = ds;
            }
        }
        workgroupBarrier();
        if (valid) {
            for (var j = 0u; j < B; j++) {
                let ds = sc[r * B + j];
                for (var i = 0u; i < nd; i++) {
                    acc[i] = fma(ds, tile[j * p.hd + lane + 4u * i], acc[i]);
                }
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        for (var i = 0u; i < nd; i++) {
            dq[qo + lane + 4u * i] = acc[i];
        }
    }
}

// dv = sum over the group's heads of P^T dO; dk = sum of dS^T Q.
@compute @workgroup_size(64)
fn attn_dkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let g = wg.y;
    let j0 = wg.x * B;
    let c = tid / 4u;
    let lane = tid % 4u;
    let j = j0 + c;
    let key_ok = j < p.t;
    let nd = (p.hd + 3u - lane) / 4u;
    let ko = j * p.kw + g * p.hd;
    if (tid == 0u) {
        var hi = 0u;
        for (var i = 0u; i < B; i++) {
            if (j0 + i < p.t) {
                hi = max(hi, qend[j0 + i]);
            }
        }
        hi_s = hi;
    }
    let hi = workgroupUniformLoad(&hi_s);
    var acc_k: array<f32, 32>;
    var acc_v: array<f32, 32>;
    for (var hh = 0u; hh < p.group; hh++) {
        let h = g * p.group + hh;
        for (var t0 = j0; t0 < hi; t0 += B) {
            load_dout(t0, h, tid);
            workgroupBarrier();
            var s: array<f32, 4>;
            var dp: array<f32, 4>;
            if (key_ok) {
                for (var d = 0u; d < p.hd; d++) {
                    let kd = k[ko + d];
                    let vd = v[ko + d];
                    for (var jj = 0u; jj < 4u; jj++) {
                        let tq = min(t0 + lane + 4u * jj, p.t - 1u);
                        s[jj] = fma(q[tq * p.qw + h * p.hd + d], kd, s[jj]);
                        dp[jj] = fma(tile[(lane + 4u * jj) * p.hd + d], vd, dp[jj]);
                    }
                }
            }
            for (var jj = 0u; jj < 4u; jj++) {
                let tq = t0 + lane + 4u * jj;
                var pr = 0.0;
                var ds = 0.0;
                if (key_ok) {
                    let st = row_start(tq);
                    if (st != NONE && st <= j && j <= tq) {
                        pr = exp(s[jj] * p.scale - lse_in[h * p.t + tq]);
                        ds = pr * (dp[jj] - delta_in[h * p.t + tq]) * p.scale;
                    }
                }
                sc[c * B + lane + 4u * jj] = pr;
                sc2[c * B + lane + 4u * jj] = ds;
            }
            workgroupBarrier();
            if (key_ok) {
                for (var i2 = 0u; i2 < B; i2++) {
                    let pr = sc[c * B + i2];
                    for (var i = 0u; i < nd; i++) {
                        acc_v[i] = fma(pr, tile[i2 * p.hd + lane + 4u * i], acc_v[i]);
                    }
                }
            }
            workgroupBarrier();
            load_q(t0, h, tid);
            workgroupBarrier();
            if (key_ok) {
                for (var i2 = 0u; i2 < B; i2++) {
                    let ds = sc2[c * B + i2];
                    for (var i = 0u; i < nd; i++) {
                        acc_k[i] = fma(ds, tile[i2 * p.hd + lane + 4u * i], acc_k[i]);
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if (key_ok) {
        for (var i = 0u; i < nd; i++) {
            dk[ko + lane + 4u * i] = acc_k[i];
            dv[ko + lane + 4u * i] = acc_v[i];
        }
    }
}

// The kv range lo..hi of q row t (lo = NONE past the rows or outside every sequence).
fn cached_range(t: u32) -> vec2<u32> {
    if (t < p.t) {
        return vec2<u32>(qrange[2u * t], qrange[2u * t + 1u]);
    }
    return vec2<u32>(NONE, 0u);
}

// Key range of a block of query rows of attn_cached: min lo .. max hi over its rows in a
// sequence, made uniform through workgroup memory.
fn cached_block_range(t0: u32, tid: u32) -> vec2<u32> {
    if (tid == 0u) {
        var lo = NONE;
        var hi = 0u;
        for (var i = 0u; i < B; i++) {
            let rr = cached_range(t0 + i);
            if (rr.x != NONE) {
                lo = min(lo, rr.x);
                hi = max(hi, rr.y);
            }
        }
        if (hi == 0u) {
            lo = 0u;
        }
        lo_s = lo;
        hi_s = hi;
    }
    return vec2<u32>(workgroupUniformLoad(&lo_s), workgroupUniformLoad(&hi_s));
}

// attn_fwd over a separate context: q row t attends kv rows cached_range(t).
@compute @workgroup_size(64)
fn attn_cached(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let h = wg.y;
    let kvh = h / p.group;
    let t0 = wg.x * B;
    let r = tid / 4u;
    let lane = tid % 4u;
    let t = t0 + r;
    let valid = cached_range(t).x != NONE;
    let nd = (p.hd + 3u - lane) / 4u;
    let qo = t * p.qw + h * p.hd;
    if (tid < B) {
        wm[tid] = NEG;
        wl[tid] = 0.0;
        wa[tid] = 1.0;
    }
    let range = cached_block_range(t0, tid);
    var acc: array<f32, 32>;
    for (var k0 = range.x; k0 < range.y; k0 += B) {
        load_k(k0, kvh, tid);
        workgroupBarrier();
        if (valid) {
            var s: array<f32, 4>;
            for (var d = 0u; d < p.hd; d++) {
                let qv = q[qo + d];
                for (var jj = 0u; jj < 4u; jj++) {
                    s[jj] = fma(qv, tile[(lane + 4u * jj) * p.hd + d], s[jj]);
                }
            }
            for (var jj = 0u; jj < 4u; jj++) {
                sc[r * B + lane + 4u * jj] = s[jj] * p.scale;
            }
        }
        workgroupBarrier();
        if (tid < B) {
            let kr = cached_range(t0 + tid);
            if (kr.x != NONE) {
                let m_old = wm[tid];
                var mx = m_old;
                for (var j = 0u; j < B; j++) {
                    let key = k0 + j;
                    if (key >= kr.x && key < kr.y) {
                        mx = max(mx, sc[tid * B + j]);
                    }
                }
                let alpha = exp(m_old - mx);
                var l = wl[tid] * alpha;
                for (var j = 0u; j < B; j++) {
                    let key = k0 + j;
                    var pj = 0.0;
                    if (key >= kr.x && key < kr.y) {
                        pj = exp(sc[tid * B + j] - mx);
                    }
                    sc[tid * B + j] = pj;
                    l += pj;
                }
                wm[tid] = mx;
                wl[tid] = l;
                wa[tid] = alpha;
            }
        }
        load_v(k0, kvh, tid);
        workgroupBarrier();
        if (valid) {
            let alpha = wa[r];
            for (var i = 0u; i < nd; i++) {
                acc[i] *= alpha;
            }
            for (var j = 0u; j < B; j++) {
                let pj = sc[r * B + j];
                for (var i = 0u; i < nd; i++) {
                    acc[i] = fma(pj, tile[j * p.hd + lane + 4u * i], acc[i]);
                }
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        let l = wl[r];
        for (var i = 0u; i < nd; i++) {
            out[qo + lane + 4u * i] = acc[i] / l;
        }
    }
}
