// Workgroup reductions over the 256 invocations of a row kernel, workgroup-memory version: a
// tree in workgroup memory, so the summation is pairwise and its order fixed (deterministic,
// no atomics). The host prepends this file, or reduce_subgroup.wgsl where the device has
// subgroup operations, to the row-reduction shaders (norm.wgsl, loss.wgsl, adapters.wgsl).
// Both define the same names: `WG`, `red` (256 f32 of workgroup memory, also used directly by
// column reductions), the entry-point parameter struct `Lanes` (the builtins the reductions
// need; every entry point that calls `wg_sum`/`wg_max` takes a `ln: Lanes` parameter) and
// `wg_sum` / `wg_max`. Every invocation of the workgroup must call these from uniform
// control flow.

const WG: u32 = 256u;

var<workgroup> red: array<f32, 256>;

struct Lanes {
    @builtin(local_invocation_index) lid: u32,
}

fn wg_sum(v: f32, ln: Lanes) -> f32 {
    let lid = ln.lid;
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

fn wg_max(v: f32, ln: Lanes) -> f32 {
    let lid = ln.lid;
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
