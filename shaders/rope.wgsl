// Rotary embedding in place, transformers' rotate_half: within each head of `hd`, the pair
// (i, i + hd/2) is rotated by pos * inv_freq[i] (inv_freq computed on the host exactly as the
// CPU reference; `sign` = -1 rotates back). One invocation per pair; rows in ranges that fit
// one binding (`x_off`, `pos_off` locate the range's first row).

struct P {
    n: u32,
    width: u32,
    hd: u32,
    x_off: u32,
    pos_off: u32,
    sign: f32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(3) var<storage, read> pos: array<u32>;

// (cos a, sin a) after a Cody-Waite reduction of a to [-pi, pi] (2 pi split in three parts, the
// first exact in 8 bits), so large positions keep the accuracy of the CPU's libm.
fn cos_sin(a: f32) -> vec2<f32> {
    let k = round(a * 0.15915494309189535);
    var r = fma(-k, 6.28125, a);
    r = fma(-k, 0.0019353071693331003, r);
    r = fma(-k, 1.0253131677018246e-11, r);
    return vec2<f32>(cos(r), sin(r));
}

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = (wg.y * nwg.x + wg.x) * 256u + lid.x;
    if (e >= p.n) {
        return;
    }
    let half = p.hd / 2u;
    let per_row = p.width / 2u;
    let row = e / per_row;
    let rem = e % per_row;
    let i = rem % half;
    let base = p.x_off + row * p.width + (rem / half) * p.hd + i;
    let cs = cos_sin(f32(pos[p.pos_off + row]) * inv_freq[i]);
    let c = cs.x;
    let s = p.sign * cs.y;
    let a = x[base];
    let b = x[base + half];
    x[base] = a * c - b * s;
    x[base + half] = b * c + a * s;
}
