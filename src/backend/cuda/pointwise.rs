//! The per-axis scales and sums, activations and row softmaxes on CUDA
//! (`kernels/pointwise.cu`). Arguments arrive checked.

use super::dense::grid;
use super::{Arg, Cuda};
use crate::backend::{Activation, Axis, Tensor};
use crate::error::Result;

fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Relu => 0,
        Activation::Silu => 1,
        Activation::Tanh => 2,
    }
}

pub(super) fn mul_vector(
    be: &Cuda,
    x: &Tensor<Cuda>,
    v: &Tensor<Cuda>,
    axis: Axis,
) -> Result<Tensor<Cuda>> {
    let (n, d) = (x.dim(0), x.dim(1));
    let y = be.alloc(x.shape())?;
    if n * d == 0 {
        return Ok(y);
    }
    be.launch(
        "pointwise",
        "mul_vector",
        (grid(n * d), 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("x", x)?,
            be.rd("v", v)?,
            be.rd("y", &y)?,
            Arg::I(n as i32),
            Arg::I(d as i32),
            Arg::I(i32::from(axis == Axis::Rows)),
        ],
    )?;
    Ok(y)
}

pub(super) fn sum_product(
    be: &Cuda,
    a: &Tensor<Cuda>,
    b: Option<&Tensor<Cuda>>,
    axis: Axis,
) -> Result<Tensor<Cuda>> {
    let (n, d) = (a.dim(0), a.dim(1));
    let args = |out: &Tensor<Cuda>| -> Result<Vec<Arg>> {
        Ok(vec![
            be.rd("a", a)?,
            be.opt("b", b)?,
            be.rd("out", out)?,
            Arg::I(n as i32),
            Arg::I(d as i32),
        ])
    };
    match axis {
        Axis::Cols => {
            let out = be.alloc(&[d])?;
            if d > 0 {
                let g = d.div_ceil(32) as u32;
                be.launch(
                    "pointwise",
                    "sum_cols",
                    (g, 1, 1),
                    (32, 8, 1),
                    0,
                    &args(&out)?,
                )?;
            }
            Ok(out)
        }
        Axis::Rows => {
            let out = be.alloc(&[n])?;
            if n > 0 {
                be.launch(
                    "pointwise",
                    "sum_rows",
                    (n as u32, 1, 1),
                    (256, 1, 1),
                    0,
                    &args(&out)?,
                )?;
            }
            Ok(out)
        }
    }
}

fn act_launch(
    be: &Cuda,
    x: &Tensor<Cuda>,
    dy: Option<&Tensor<Cuda>>,
    act: Activation,
) -> Result<Tensor<Cuda>> {
    let y = be.alloc(x.shape())?;
    let n = x.len();
    if n == 0 {
        return Ok(y);
    }
    be.launch(
        "pointwise",
        "activation",
        (grid(n), 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("x", x)?,
            be.opt("dy", dy)?,
            be.rd("y", &y)?,
            Arg::L(n as i64),
            Arg::I(act_code(act)),
        ],
    )?;
    Ok(y)
}

pub(super) fn activation(be: &Cuda, x: &Tensor<Cuda>, act: Activation) -> Result<Tensor<Cuda>> {
    act_launch(be, x, None, act)
}

pub(super) fn activation_backward(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    x: &Tensor<Cuda>,
    act: Activation,
) -> Result<Tensor<Cuda>> {
    act_launch(be, x, Some(dy), act)
}

fn softmax_launch(be: &Cuda, x: &Tensor<Cuda>, dy: Option<&Tensor<Cuda>>) -> Result<Tensor<Cuda>> {
    let (n, k) = (x.dim(0), x.dim(1));
    let out = be.alloc(x.shape())?;
    if n == 0 {
        return Ok(out);
    }
    be.launch(
        "pointwise",
        "softmax_rows",
        (n.div_ceil(256) as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            be.rd("x", x)?,
            be.opt("dy", dy)?,
            be.rd("out", &out)?,
            Arg::I(n as i32),
            Arg::I(k as i32),
        ],
    )?;
    Ok(out)
}

pub(super) fn softmax_rows(be: &Cuda, x: &Tensor<Cuda>) -> Result<Tensor<Cuda>> {
    softmax_launch(be, x, None)
}

pub(super) fn softmax_rows_backward(
    be: &Cuda,
    dy: &Tensor<Cuda>,
    p: &Tensor<Cuda>,
) -> Result<Tensor<Cuda>> {
    softmax_launch(be, p, Some(dy))
}
