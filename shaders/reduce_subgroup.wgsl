// Workgroup reductions over the 256 invocations of a row kernel, subgroup version (prepended
// instead of reduce.wgsl where the device has SUBGROUP; same names, same contract). Each
// subgroup reduces its values with subgroupAdd / subgroupMax, its first lane stores the
// subgroup's result in workgroup memory at the subgroup's index, and invocation 0 combines
// those partials serially in subgroup order. That works for any subgroup size (1 to 128: one
// to 256 subgroups per workgroup) and for a last subgroup that is not full. The result is
// deterministic for a fixed subgroup size (the same device, driver and pipeline): the order
// inside subgroupAdd is the hardware's, fixed for a given size, and the partials are added in
// a fixed order; it is not bit-identical to the workgroup-memory tree. Max is exact either way.
// No `enable subgroups;`: wgpu enables the feature on the device.

const WG: u32 = 256u;

// Partials, one per subgroup (at most 256); also the scratch of column reductions.
var<workgroup> red: array<f32, 256>;
// The combined result, read by every invocation.
var<workgroup> red_total: f32;

struct Lanes {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
}

// No barrier after reading `red_total`: the next call writes `red` before its first barrier
// (no one reads `red` then) and `red_total` only after it (when every invocation has read it).
fn wg_sum(v: f32, ln: Lanes) -> f32 {
    let s = subgroupAdd(v);
    if (ln.lane == 0u) {
        red[ln.sg] = s;
    }
    workgroupBarrier();
    if (ln.lid == 0u) {
        var t = red[0];
        for (var i = 1u; i < ln.n_sg; i++) {
            t += red[i];
        }
        red_total = t;
    }
    workgroupBarrier();
    return red_total;
}

fn wg_max(v: f32, ln: Lanes) -> f32 {
    let m = subgroupMax(v);
    if (ln.lane == 0u) {
        red[ln.sg] = m;
    }
    workgroupBarrier();
    if (ln.lid == 0u) {
        var t = red[0];
        for (var i = 1u; i < ln.n_sg; i++) {
            t = max(t, red[i]);
        }
        red_total = t;
    }
    workgroupBarrier();
    return red_total;
}
