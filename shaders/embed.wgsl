// Embedding lookup (gather) and its backward (scatter-add) over row lists built on the host.
// Tables larger than one storage binding are processed in row ranges: `dst_off` and `src_off`
// are the element offsets of the ranges' first rows inside their bindings, and the row numbers
// in `list` are relative to those first rows. One workgroup per list entry, 64 invocations
// striding over the row's `d` columns. No float atomics: every destination row is written by
// exactly one workgroup, which adds its sources in the order given (deterministic).

struct P {
    count: u32,
    d: u32,
    list_off: u32,
    dst_off: u32,
    src_off: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read> list: array<u32>;

// list: pairs (dst row, src row): dst[dst row] = src[src row].
@compute @workgroup_size(64)
fn gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = wg.y * nwg.x + wg.x;
    if (k >= p.count) {
        return;
    }
    let o = p.dst_off + list[p.list_off + 2u * k] * p.d;
    let s = p.src_off + list[p.list_off + 2u * k + 1u] * p.d;
    for (var c = lid.x; c < p.d; c += 64u) {
        dst[o + c] = src[s + c];
    }
}

// list: `count` headers (dst row, first, end) then source rows; `first..end` index the source
// rows of the header's destination row (relative to list_off): dst[row] += src[each], in order.
@compute @workgroup_size(64)
fn scatter_add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = wg.y * nwg.x + wg.x;
    if (k >= p.count) {
        return;
    }
    let h = p.list_off + 3u * k;
    let o = p.dst_off + list[h] * p.d;
    let first = list[h + 1u];
    let end = list[h + 2u];
    for (var c = lid.x; c < p.d; c += 64u) {
        var acc = dst[o + c];
        for (var i = first; i < end; i++) {
            acc = acc + src[p.src_off + list[p.list_off + i] * p.d + c];
        }
        dst[o + c] = acc;
    }
}
