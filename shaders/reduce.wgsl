// Workgroup reductions over the 256 invocations of a row kernel: a tree in workgroup memory,
// so the summation is pairwise and its order fixed (deterministic, no atomics). Prepended to
// the row-reduction shaders (norm.wgsl, loss.wgsl) by the host; every invocation of the
// workgroup must call these from uniform control flow.

const WG: u32 = 256u;

var<workgroup> red: array<f32, 256>;

fn wg_sum(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn wg_max(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}
