//! The per-axis scales and sums, activations and row softmaxes of the additive methods (IA3,
//! bias tuning, bottleneck adapters, AdapterFusion): column and row scales and the sums are
//! the reductions of `shaders/adapters.wgsl` (compensated, deterministic), activations and
//! softmaxes entries of `shaders/elementwise.wgsl`.

use super::Wgpu;
use super::dense::{F_ONE_Y, colscale, colsum_flags, row_scale, rowdot_flags};
use super::memory::Rows;
use crate::backend::{Activation, Axis, Tensor};
use crate::error::Result;

fn act_code(act: Activation) -> u32 {
    match act {
        Activation::Relu => 0,
        Activation::Silu => 1,
        Activation::Tanh => 2,
    }
}

pub(super) fn mul_vector(
    be: &Wgpu,
    x: &Tensor<Wgpu>,
    v: &Tensor<Wgpu>,
    axis: Axis,
) -> Result<Tensor<Wgpu>> {
    let (n, d) = (x.dim(0), x.dim(1));
    let out = be.alloc(x.shape());
    match axis {
        Axis::Cols => {
            Wgpu::mutable("mul_vector (a column scale reads f32)", x)?;
            colscale(be, &out.buf, &x.buf, n * d, d, &v.buf, None)?;
        }
        Axis::Rows => row_scale(
            be,
            n,
            d,
            Some(Rows::new(&x.buf, d)),
            Rows::vec(&v.buf, 0),
            Rows::new(&out.buf, d),
            false,
        )?,
    }
    Ok(out)
}

pub(super) fn sum_product(
    be: &Wgpu,
    a: &Tensor<Wgpu>,
    b: Option<&Tensor<Wgpu>>,
    axis: Axis,
) -> Result<Tensor<Wgpu>> {
    let (n, d) = (a.dim(0), a.dim(1));
    let x = Rows::new(&a.buf, d);
    let (y, extra) = match b {
        Some(b) => (Rows::new(&b.buf, d), 0),
        None => (x, F_ONE_Y),
    };
    match axis {
        Axis::Cols => {
            // colsum leaves `o` untouched when there are no rows: start from zeros.
            let out = super::memory::zeros(be, &[d])?;
            colsum_flags(be, n, d, x, y, None, &out.buf, extra)?;
            Ok(out)
        }
        Axis::Rows => {
            let out = super::memory::zeros(be, &[n])?;
            rowdot_flags(be, n, d, x, y, None, Rows::vec(&out.buf, 0), extra)?;
            Ok(out)
        }
    }
}

pub(super) fn activation(be: &Wgpu, x: &Tensor<Wgpu>, act: Activation) -> Result<Tensor<Wgpu>> {
    Wgpu::mutable("activation (reads f32)", x)?;
    let out = be.alloc(x.shape());
    be.elementwise(
        "activation",
        x.len(),
        &[(1, &out.buf), (2, &x.buf)],
        &[],
        0,
        act_code(act),
        &[],
    )?;
    Ok(out)
}

pub(super) fn activation_backward(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    x: &Tensor<Wgpu>,
    act: Activation,
) -> Result<Tensor<Wgpu>> {
    Wgpu::mutable("activation_backward (reads f32)", x)?;
    let out = be.alloc(x.shape());
    be.elementwise(
        "activation_backward",
        x.len(),
        &[(1, &out.buf), (2, &x.buf), (3, &dy.buf)],
        &[],
        0,
        act_code(act),
        &[],
    )?;
    Ok(out)
}

pub(super) fn softmax_rows(be: &Wgpu, x: &Tensor<Wgpu>) -> Result<Tensor<Wgpu>> {
    Wgpu::mutable("softmax_rows (reads f32)", x)?;
    let (n, k) = (x.dim(0), x.dim(1));
    let out = be.alloc(x.shape());
    be.elementwise(
        "softmax_rows",
        n,
        &[],
        &[(1, &out.buf), (2, &x.buf)],
        k,
        0,
        &[],
    )?;
    Ok(out)
}

pub(super) fn softmax_rows_backward(
    be: &Wgpu,
    dy: &Tensor<Wgpu>,
    p: &Tensor<Wgpu>,
) -> Result<Tensor<Wgpu>> {
    Wgpu::mutable("softmax_rows_backward (reads f32)", p)?;
    let (n, k) = (p.dim(0), p.dim(1));
    let out = be.alloc(p.shape());
    be.elementwise(
        "softmax_rows_backward",
        n,
        &[],
        &[(1, &out.buf), (2, &p.buf), (3, &dy.buf)],
        k,
        0,
        &[],
    )?;
    Ok(out)
}
