//! CPU reference of the per-axis scales and sums, activations and row softmaxes (IA3, bias
//! tuning, bottleneck adapters, AdapterFusion). Arguments arrive checked. Sums are in f64.

use super::ops::silu;
use super::{Cpu, new};
use crate::backend::{Activation, Axis, Tensor};
use rayon::prelude::*;

pub(super) fn mul_vector(x: &Tensor<Cpu>, v: &Tensor<Cpu>, axis: Axis) -> Tensor<Cpu> {
    let d = x.dim(1).max(1);
    let mut y = x.buf.clone();
    y.par_chunks_mut(d)
        .enumerate()
        .for_each(|(i, row)| match axis {
            Axis::Cols => row.iter_mut().zip(&v.buf).for_each(|(a, &s)| *a *= s),
            Axis::Rows => row.iter_mut().for_each(|a| *a *= v.buf[i]),
        });
    new(y, x.shape())
}

pub(super) fn sum_product(a: &Tensor<Cpu>, b: Option<&Tensor<Cpu>>, axis: Axis) -> Tensor<Cpu> {
    let (n, d) = (a.dim(0), a.dim(1));
    let prod = |i: usize| -> f64 {
        let x = a.buf[i] as f64;
        b.map_or(x, |b| x * b.buf[i] as f64)
    };
    match axis {
        Axis::Cols => {
            let out: Vec<f32> = (0..d)
                .into_par_iter()
                .map(|j| (0..n).map(|i| prod(i * d + j)).sum::<f64>() as f32)
                .collect();
            new(out, &[d])
        }
        Axis::Rows => {
            let out: Vec<f32> = (0..n)
                .into_par_iter()
                .map(|i| (0..d).map(|j| prod(i * d + j)).sum::<f64>() as f32)
                .collect();
            new(out, &[n])
        }
    }
}

/// `act(x)` of one value.
pub(super) fn act_f(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Relu => x.max(0.0),
        Activation::Silu => silu(x),
        Activation::Tanh => x.tanh(),
    }
}

/// `act'(x)` of one value (ReLU's derivative at 0 is 0, as torch's).
pub(super) fn act_grad(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        }
        Activation::Tanh => {
            let t = x.tanh();
            1.0 - t * t
        }
    }
}

pub(super) fn activation(x: &Tensor<Cpu>, act: Activation) -> Tensor<Cpu> {
    new(
        x.buf.par_iter().map(|&v| act_f(v, act)).collect(),
        x.shape(),
    )
}

pub(super) fn activation_backward(
    dy: &Tensor<Cpu>,
    x: &Tensor<Cpu>,
    act: Activation,
) -> Tensor<Cpu> {
    let dx = dy
        .buf
        .par_iter()
        .zip(&x.buf)
        .map(|(&g, &v)| g * act_grad(v, act))
        .collect();
    new(dx, x.shape())
}

pub(super) fn softmax_rows(x: &Tensor<Cpu>) -> Tensor<Cpu> {
    let k = x.dim(1).max(1);
    let mut p = x.buf.clone();
    p.par_chunks_mut(k).for_each(|row| {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0.0f64;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v as f64;
        }
        let inv = (1.0 / s) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    });
    new(p, x.shape())
}

pub(super) fn softmax_rows_backward(dy: &Tensor<Cpu>, p: &Tensor<Cpu>) -> Tensor<Cpu> {
    let k = p.dim(1).max(1);
    let mut dx = vec![0.0f32; p.len()];
    dx.par_chunks_mut(k)
        .zip(p.buf.par_chunks(k))
        .zip(dy.buf.par_chunks(k))
        .for_each(|((o, pr), gr)| {
            let dot: f64 = pr.iter().zip(gr).map(|(&a, &b)| a as f64 * b as f64).sum();
            for ((o, &a), &b) in o.iter_mut().zip(pr).zip(gr) {
                *o = a * (b - dot as f32);
            }
        });
    new(dx, p.shape())
}
