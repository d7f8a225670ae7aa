//! AdamW (decoupled weight decay, bias-corrected moments) over several steps, each with a
//! fresh gradient: parameter and both moments against the CPU.

use super::harness::*;
use lorafuse::backend::AdamWParams;
use lorafuse::{Backend, Cpu};

pub fn adamw<B: Backend>(be: &B, tol: &Tol) {
    // (shape, steps, weight decay, bound of the parameter)
    let cases: [(&[usize], u64, f32, f32); 6] = [
        (&[1], 5, 0.1, 1.0),
        (&[255], 5, 0.1, 1.0),
        (&[1000], 5, 0.1, 1.0),
        (&[1, 37], 2, 0.01, 2.0),
        (&[17, 64], 2, 0.01, 2.0),
        (&[130, 83], 2, 0.01, 2.0),
    ];
    for (i, (shape, steps, wd, pb)) in cases.into_iter().enumerate() {
        let s = 10 * i as u64 + 4;
        let what = format!("adamw {shape:?} {steps} steps");
        let mut p = rand(be, tol, shape, s, pb);
        let (mut mg, mut mc) = (be.zeros(shape).unwrap(), Cpu.zeros(shape).unwrap());
        let (mut vg, mut vc) = (be.zeros(shape).unwrap(), Cpu.zeros(shape).unwrap());
        for step in 1..=steps {
            let g = rand(be, tol, shape, 50 + 7 * i as u64 + step, 1.0);
            let hp = AdamWParams {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: wd,
                step,
            };
            be.adamw_step(&mut p.g, &g.g, &mut mg, &mut vg, &hp)
                .unwrap();
            Cpu.adamw_step(&mut p.c, &g.c, &mut mc, &mut vc, &hp)
                .unwrap();
        }
        tol.close(be, &format!("{what} param"), &p.g, &p.c, tol.rel);
        tol.close(be, &format!("{what} exp_avg"), &mg, &mc, tol.rel);
        tol.close(be, &format!("{what} exp_avg_sq"), &vg, &vc, tol.rel);
    }
}
