//! The pieces of the additive and selective methods that are not a low-rank term: per-axis
//! scales (`mul_vector`: IA3), sums of products down an axis (`sum_product`: IA3's and a bias's
//! gradients, AdapterFusion's scores), activations and their backward (bottleneck adapters,
//! P-tuning's and prefix tuning's MLPs) and the small row softmax of AdapterFusion.

use super::harness::*;
use lorafuse::backend::{Activation, Axis};
use lorafuse::{Backend, Cpu};

/// `(n, d)`: a single element, odd widths, a column, T = 130 rows, rows of 250 floats (under one
/// 1 KiB binding's 256: wgpu splits these operands by whole rows and refuses a wider row), a
/// tall thin matrix whose row-axis vector spans several bindings.
pub const SHAPES: [(usize, usize); 7] = [
    (1, 1),
    (3, 67),
    (17, 1),
    (130, 33),
    (2, 199),
    (5, 250),
    (513, 7),
];

const ACTS: [Activation; 3] = [Activation::Relu, Activation::Silu, Activation::Tanh];

pub fn mul_vector<B: Backend>(be: &B, tol: &Tol) {
    for (i, &(n, d)) in SHAPES.iter().enumerate() {
        let s = 700 + 10 * i as u64;
        let x = rand(be, tol, &[n, d], s, 1.0);
        for (axis, len) in [(Axis::Cols, d), (Axis::Rows, n)] {
            let v = rand(be, tol, &[len], s + 1, 2.0);
            let y = be.mul_vector(&x.g, &v.g, axis).unwrap();
            let yc = Cpu.mul_vector(&x.c, &v.c, axis).unwrap();
            tol.close(
                be,
                &format!("mul_vector {n}x{d} {axis:?}"),
                &y,
                &yc,
                tol.rel,
            );
        }
    }
}

pub fn sum_product<B: Backend>(be: &B, tol: &Tol) {
    for (i, &(n, d)) in SHAPES.iter().enumerate() {
        let s = 800 + 10 * i as u64;
        let a = rand(be, tol, &[n, d], s, 1.0);
        let b = rand(be, tol, &[n, d], s + 1, 1.0);
        for axis in [Axis::Cols, Axis::Rows] {
            for with_b in [true, false] {
                let got = be.sum_product(&a.g, with_b.then_some(&b.g), axis).unwrap();
                let want = Cpu.sum_product(&a.c, with_b.then_some(&b.c), axis).unwrap();
                let what = format!(
                    "sum_product {n}x{d} {axis:?} {}",
                    if with_b { "a*b" } else { "a" }
                );
                tol.close(be, &what, &got, &want, tol.rel);
            }
        }
    }
}

pub fn activation<B: Backend>(be: &B, tol: &Tol) {
    for (i, &(n, d)) in SHAPES.iter().enumerate() {
        let s = 900 + 10 * i as u64;
        // Inputs up to +-6 reach tanh's and SiLU's saturated tails; exact zeros check ReLU's
        // derivative at 0 (taken as 0, as torch does).
        let mut xv = vals(n * d, s, 6.0);
        for v in xv.iter_mut().step_by(5) {
            *v = 0.0;
        }
        let x = pair(be, tol, &xv, &[n, d]);
        let dy = rand(be, tol, &[n, d], s + 1, 1.0);
        for act in ACTS {
            let what = format!("{act:?} {n}x{d}");
            let y = be.activation(&x.g, act).unwrap();
            let yc = Cpu.activation(&x.c, act).unwrap();
            tol.close(be, &format!("{what} y"), &y, &yc, tol.rel);
            let dx = be.activation_backward(&dy.g, &x.g, act).unwrap();
            let dxc = Cpu.activation_backward(&dy.c, &x.c, act).unwrap();
            tol.close(be, &format!("{what} dx"), &dx, &dxc, tol.rel);
        }
    }
}

pub fn softmax<B: Backend>(be: &B, tol: &Tol) {
    // AdapterFusion's k is the number of fused adapters (2 to a few); wider rows too.
    for (i, &(n, k, scale)) in [
        (1usize, 1usize, 1.0f32),
        (7, 2, 1.0),
        (130, 3, 4.0),
        (33, 8, 30.0),
        (5, 300, 1.0),
    ]
    .iter()
    .enumerate()
    {
        let s = 1000 + 10 * i as u64;
        let x = rand(be, tol, &[n, k], s, scale);
        let p = be.softmax_rows(&x.g).unwrap();
        let pc = Cpu.softmax_rows(&x.c).unwrap();
        tol.close(be, &format!("softmax {n}x{k} p"), &p, &pc, tol.rel);
        let rows = be.sum_product(&p, None, Axis::Rows).unwrap();
        tol.close_to(
            be,
            &format!("softmax {n}x{k} row sums"),
            &rows,
            &vec![1.0; n],
            tol.rel,
        );
        let dy = rand(be, tol, &[n, k], s + 1, 1.0);
        // The same p on both sides, so that the backward alone is compared.
        let pb = back(be, tol, &p);
        let dx = be.softmax_rows_backward(&dy.g, &pb.g).unwrap();
        let dxc = Cpu.softmax_rows_backward(&dy.c, &pb.c).unwrap();
        tol.close(be, &format!("softmax {n}x{k} dx"), &dx, &dxc, tol.rel);
    }
}
