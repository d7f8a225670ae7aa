// Elementwise kernels over flat f32 arrays: one invocation per element, 256 per workgroup,
// workgroups laid out in 2-D when one dimension would exceed the dispatch limit.
// `base` is the index of this dispatch's first element in the whole tensor (large tensors are
// processed in bound ranges); `n` is the element count of this dispatch.

struct P {
    n: u32,
    base: u32,
    cols: u32,
    flags: u32,
    f0: f32,
    f1: f32,
    f2: f32,
    f3: f32,
    f4: f32,
    f5: f32,
    f6: f32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> o0: array<f32>;
@group(0) @binding(2) var<storage, read> i1: array<f32>;
@group(0) @binding(3) var<storage, read> i2: array<f32>;
@group(0) @binding(4) var<storage, read> i3: array<f32>;
@group(0) @binding(5) var<storage, read_write> o4: array<f32>;
@group(0) @binding(6) var<storage, read_write> o5: array<f32>;

fn index(wg: vec3<u32>, lid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid.x;
}

// o0 += f0 * i1
@compute @workgroup_size(256)
fn axpy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        o0[e] = fma(p.f0, i1[e], o0[e]);
    }
}

// o0 *= f0
@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        o0[e] = o0[e] * p.f0;
    }
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

// o0 = silu(i1) * i2
@compute @workgroup_size(256)
fn swiglu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        let g = i1[e];
        o0[e] = g / (1.0 + exp(-g)) * i2[e];
    }
}

// d = i3, gate = i1, up = i2: o0 = dgate, o4 = dup
@compute @workgroup_size(256)
fn swiglu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        let g = i1[e];
        let u = i2[e];
        let d = i3[e];
        let sig = sigmoid(g);
        o0[e] = d * u * sig * (1.0 + g * (1.0 - sig));
        o4[e] = d * (g * sig);
    }
}

// torch.optim.AdamW on o0 (param) with grad i1, exp_avg o4, exp_avg_sq o5.
// f0 lr, f1 beta1, f2 beta2, f3 eps, f4 decay factor (1 - lr wd), f5 step size lr / bc1,
// f6 sqrt(bc2).
@compute @workgroup_size(256)
fn adamw(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        let g = i1[e];
        let w = o0[e] * p.f4;
        let m = p.f1 * o4[e] + (1.0 - p.f1) * g;
        let v = p.f2 * o5[e] + (1.0 - p.f2) * g * g;
        o4[e] = m;
        o5[e] = v;
        let denom = sqrt(v) / p.f6 + p.f3;
        o0[e] = w - p.f5 * m / denom;
    }
}

// o0[e] = i2[col] * i1[e] (+ i3[col] when flags & 1), col = (base + e) % cols:
// DoRA's y = (m / n) z + bias, with the column scale already divided (see lowrank.rs); also
// dy ⊙ (m / n) and B diag(ρ).
@compute @workgroup_size(256)
fn colscale_bias(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        let col = (p.base + e) % p.cols;
        var v = i2[col] * i1[e];
        if ((p.flags & 1u) != 0u) {
            v += i3[col];
        }
        o0[e] = v;
    }
}

// AdaLoRA's importance EMAs (PEFT RankAllocator.update_ipt): i1 = param, i2 = grad,
// o4 = exp_avg_ipt, o5 = exp_avg_unc; f0 = beta1, f1 = 1 - beta1, f2 = beta2, f3 = 1 - beta2
// (computed in f64 on the host and rounded, as torch's Python scalars).
@compute @workgroup_size(256)
fn adalora_update_ipt(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        let ipt = abs(i1[e] * i2[e]);
        let avg = p.f0 * o4[e] + p.f1 * ipt;
        o4[e] = avg;
        o5[e] = p.f2 * o5[e] + p.f3 * abs(ipt - avg);
    }
}

// The activations of the additive methods, selected by flags: 0 ReLU, 1 SiLU, 2 tanh
// (backend/wgpu/pointwise.rs; Activation in backend/tensor.rs).
fn act_f(x: f32, kind: u32) -> f32 {
    if (kind == 0u) {
        return max(x, 0.0);
    } else if (kind == 1u) {
        return x * sigmoid(x);
    }
    return tanh(x);
}

// act'(x); ReLU's derivative at 0 is 0, as torch's.
fn act_grad(x: f32, kind: u32) -> f32 {
    if (kind == 0u) {
        return select(0.0, 1.0, x > 0.0);
    } else if (kind == 1u) {
        let s = sigmoid(x);
        return s * (1.0 + x * (1.0 - s));
    }
    let t = tanh(x);
    return 1.0 - t * t;
}

// o0 = act(i1)
@compute @workgroup_size(256)
fn activation(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        o0[e] = act_f(i1[e], p.flags);
    }
}

// o0 = i2 * act'(i1): dy = i2, x = i1.
@compute @workgroup_size(256)
fn activation_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        o0[e] = i2[e] * act_grad(i1[e], p.flags);
    }
}

// Row softmax of i1 [rows, cols] into o0, one invocation per ROW: here n counts rows, base is the
// dispatch's first row and i1, o0 are bound whole (the rows are AdapterFusion's tokens and cols
// its few adapters).
@compute @workgroup_size(256)
fn softmax_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        let o = (p.base + e) * p.cols;
        var m = i1[o];
        for (var c = 1u; c < p.cols; c++) {
            m = max(m, i1[o + c]);
        }
        var s = 0.0;
        for (var c = 0u; c < p.cols; c++) {
            let v = exp(i1[o + c] - m);
            o0[o + c] = v;
            s += v;
        }
        let inv = 1.0 / s;
        for (var c = 0u; c < p.cols; c++) {
            o0[o + c] = o0[o + c] * inv;
        }
    }
}

// o0 = p ⊙ (dy - rowdot(dy, p)) with p = i1, dy = i2, one invocation per row (as softmax_rows).
@compute @workgroup_size(256)
fn softmax_rows_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = index(wg, lid, nwg);
    if (e < p.n) {
        let o = (p.base + e) * p.cols;
        var dot = 0.0;
        for (var c = 0u; c < p.cols; c++) {
            dot = fma(i1[o + c], i2[o + c], dot);
        }
        for (var c = 0u; c < p.cols; c++) {
            o0[o + c] = i1[o + c] * (i2[o + c] - dot);
        }
    }
}
