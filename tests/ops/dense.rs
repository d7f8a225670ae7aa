//! The dense product without a term: `linear` (with and without bias), its input gradient
//! (also added into an existing dx) and the weight gradient.

use super::harness::*;
use lorafuse::{Backend, Cpu};

/// `(T, in, out, weight bound)`: odd widths, T = 1 to 130 (on CUDA: the decode path up to
/// T = 8, cuBLAS above), an output of 1, rows of 250 floats (under one 1 KiB binding, at
/// unaligned offsets).
pub const SHAPES: [(usize, usize, usize, f32); 11] = [
    (1, 5, 3, 1.0),
    (3, 67, 70, 1.0),
    (17, 130, 9, 1.0),
    (130, 33, 129, 1.0),
    (2, 300, 1, 1.0),
    (5, 250, 3, 1.0),
    (1, 37, 29, 0.3),
    (3, 61, 45, 0.3),
    (17, 37, 29, 0.3),
    (130, 83, 67, 0.3),
    (8, 136, 72, 0.3),
];

pub fn linear<B: Backend>(be: &B, tol: &Tol) {
    for (i, &(t, din, dout, wb)) in SHAPES.iter().enumerate() {
        let s = 100 * i as u64;
        let what = format!("linear {t}x{din}->{dout}");
        let x = rand(be, tol, &[t, din], s, 1.0);
        let w = rand(be, tol, &[dout, din], s + 1, wb);
        let b = rand(be, tol, &[dout], s + 2, 1.0);
        for bias in [Some(&b), None] {
            let y = be.linear(&x.g, &w.g, bias.map(|b| &b.g)).unwrap();
            let yc = Cpu.linear(&x.c, &w.c, bias.map(|b| &b.c)).unwrap();
            let with = if bias.is_some() { "bias" } else { "no bias" };
            tol.close(be, &format!("{what} y ({with})"), &y, &yc, tol.rel);
        }
        let dy = rand(be, tol, &[t, dout], s + 3, 1.0);
        let dx = be.linear_backward_input(&dy.g, &w.g, None).unwrap();
        let dxc = Cpu.linear_backward_input(&dy.c, &w.c, None).unwrap();
        tol.close(
            be,
            &format!("{what} dx"),
            &dx.unwrap(),
            &dxc.unwrap(),
            tol.rel,
        );
        let mut acc = rand(be, tol, &[t, din], s + 4, 1.0);
        let none = be
            .linear_backward_input(&dy.g, &w.g, Some(&mut acc.g))
            .unwrap();
        ensure(none.is_none(), || format!("{what}: dx added into acc"));
        Cpu.linear_backward_input(&dy.c, &w.c, Some(&mut acc.c))
            .unwrap();
        tol.close(be, &format!("{what} dx acc"), &acc.g, &acc.c, tol.rel);
        let mut dw = rand(be, tol, &[dout, din], s + 5, wb);
        be.linear_backward_weight(&dy.g, &x.g, &mut dw.g).unwrap();
        Cpu.linear_backward_weight(&dy.c, &x.c, &mut dw.c).unwrap();
        tol.close(be, &format!("{what} dw"), &dw.g, &dw.c, tol.rel);
    }
}
