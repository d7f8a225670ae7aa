//! bf16 base weights (`--compute-dtype bf16`): upload rounds to the nearest bf16 (ties to
//! even) and widens back exactly; every product over a `Base::Bf16` equals the CPU's product
//! over the dense f32 weight of the rounded values (so on the CPU this checks the tiled bf16
//! path against the plain GEMMs): the base product with and without bias, the input gradient
//! (also into an accumulator), fused LoRA and DoRA terms with their backward, the row norms
//! DoRA takes, the forward that computes the weight norm itself, and the argument errors.

use super::harness::*;
use lorafuse::backend::{Base, GradWants, LowRank};
use lorafuse::{Backend, Cpu, Error};

/// `(t, in, out, r)`: T on both sides of the few-token kernels (<= 32) and of the many-token
/// tiles (64); `in = 1030` makes 48-row tiles, so `out = 100` spans three and `out = 300`
/// several waves; odd sizes everywhere.
const CASES: [(usize, usize, usize, usize); 9] = [
    // the CPU's few-row lane kernels read these straight from the bf16 bits (n, k >= 256)
    (16, 300, 520, 4),
    (1, 257, 300, 2),
    (5, 260, 2100, 3),
    (1, 1030, 100, 3),
    (3, 67, 70, 1),
    (17, 130, 9, 7),
    (70, 67, 300, 4),
    (130, 1030, 100, 8),
    (33, 64, 33, 16),
];

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

pub fn products<B: Backend>(be: &B, tol: &Tol) {
    let rel = tol.rel;
    for (i, (t, din, dout, r)) in CASES.into_iter().enumerate() {
        let s = 9000 + 100 * i as u64;
        let what = format!("bf16 {t}x{din}->{dout} r={r}");
        let w = vals(dout * din, s, 1.0);
        let rounded = round_bf16(&w);
        let wg = be.upload_bf16(&w, &[dout, din]).unwrap();
        ensure(wg.dims() == (dout, din), || format!("{what}: dims"));
        let len = dout * din;
        if be.name() == "cpu" {
            ensure(wg.bytes() == 2 * len, || format!("{what}: 2 bytes a value"));
        } else {
            ensure(wg.bytes() <= 4 * len, || format!("{what}: bytes"));
        }
        let widened = be.bf16_to_f32(&wg).unwrap();
        ensure(widened.shape() == [dout, din], || format!("{what}: shape"));
        let wc = Cpu.upload(&rounded, &[dout, din]).unwrap();
        if be.name() == "cpu" {
            bits(
                &format!("{what} widened"),
                &be.download(&widened).unwrap(),
                &rounded,
            );
        } else {
            tol.close(be, &format!("{what} widened"), &widened, &wc, rel);
        }
        let (bc, bg) = (Base::Dense(&wc), Base::Bf16(&wg));

        let x = rand(be, tol, &[t, din], s + 1, 1.0);
        let bias = rand(be, tol, &[dout], s + 2, 1.0);
        for bias in [Some(&bias), None] {
            let y = be
                .linear_lowrank(&x.g, bg, bias.map(|b| &b.g), None)
                .unwrap();
            let yc = Cpu
                .linear_lowrank(&x.c, bc, bias.map(|b| &b.c), None)
                .unwrap();
            let with = if bias.is_some() { "bias" } else { "no bias" };
            tol.close(be, &format!("{what} y ({with})"), &y.y, &yc.y, rel);
        }
        let dy = rand(be, tol, &[t, dout], s + 3, 1.0);
        let (dx, _) = be.backward_input(&dy.g, bg, None, None).unwrap();
        let (dxc, _) = Cpu.backward_input(&dy.c, bc, None, None).unwrap();
        tol.close(be, &format!("{what} dx"), &dx.unwrap(), &dxc.unwrap(), rel);
        let mut acc = rand(be, tol, &[t, din], s + 4, 1.0);
        let (none, _) = be
            .backward_input(&dy.g, bg, None, Some(&mut acc.g))
            .unwrap();
        ensure(none.is_none(), || format!("{what}: dx added into acc"));
        Cpu.backward_input(&dy.c, bc, None, Some(&mut acc.c))
            .unwrap();
        tol.close(be, &format!("{what} dx acc"), &acc.g, &acc.c, rel);

        let a = rand(be, tol, &[r, din], s + 5, 0.3);
        let b = rand(be, tol, &[dout, r], s + 6, 0.3);
        let sc = 2.0 / r as f32;
        fused(
            be,
            tol,
            &format!("{what} lora"),
            (bc, bg),
            &x,
            Some(&bias),
            &dy,
            (
                &LowRank::lora(&a.c, &b.c, sc),
                &LowRank::lora(&a.g, &b.g, sc),
            ),
            GradWants::LORA,
            s + 7,
        );

        let sqg = be.row_sq_norms(bg).unwrap();
        let sqc = Cpu.row_sq_norms(bc).unwrap();
        tol.close(be, &format!("{what} row_sq_norms"), &sqg, &sqc, tol.row_sq);
        let sq = from_cpu(be, tol, &sqc);
        let lora = (LowRank::lora(&a.c, &b.c, sc), LowRank::lora(&a.g, &b.g, sc));
        let ng = be.lowrank_row_norms(bg, &sq.g, &lora.1).unwrap();
        let nc = Cpu.lowrank_row_norms(bc, &sq.c, &lora.0).unwrap();
        tol.close(be, &format!("{what} weight_norm"), &ng, &nc, rel);
        let n = from_cpu(be, tol, &nc);
        let m = positive(be, tol, dout, s + 8);
        fused(
            be,
            tol,
            &format!("{what} dora"),
            (bc, bg),
            &x,
            Some(&bias),
            &dy,
            (
                &LowRank::dora(&a.c, &b.c, sc, &m.c, Some(&n.c)),
                &LowRank::dora(&a.g, &b.g, sc, &m.g, Some(&n.g)),
            ),
            GradWants::DORA,
            s + 9,
        );
        // DoRA's forward taking the norm itself (one pass over a dense W; tiles over bf16).
        let og = be
            .linear_lowrank_with_norm(
                &x.g,
                bg,
                &sq.g,
                Some(&bias.g),
                &LowRank::dora(&a.g, &b.g, sc, &m.g, None),
            )
            .unwrap();
        let oc = Cpu
            .linear_lowrank_with_norm(
                &x.c,
                bc,
                &sq.c,
                Some(&bias.c),
                &LowRank::dora(&a.c, &b.c, sc, &m.c, None),
            )
            .unwrap();
        tol.close(be, &format!("{what} dora with norm y"), &og.y, &oc.y, rel);
        tol.close(
            be,
            &format!("{what} dora with norm n"),
            og.weight_norm.as_ref().expect("norm"),
            oc.weight_norm.as_ref().expect("norm"),
            rel,
        );
    }
}

/// Bad uploads and mismatched products are errors naming what was wrong, the same on every
/// backend as on the CPU.
pub fn errors<B: Backend>(be: &B, tol: &Tol) {
    let e = be.upload_bf16(&[0.0; 8], &[2, 2, 2]).unwrap_err();
    ensure(matches!(e, Error::Shape { .. }), || {
        format!("3-D upload: {e}")
    });
    let e = be.upload_bf16(&[0.0; 5], &[2, 3]).unwrap_err();
    ensure(matches!(e, Error::InvalidArgument { .. }), || {
        format!("short upload: {e}")
    });
    same_error(
        "bf16 3-D",
        Cpu.upload_bf16(&[0.0; 8], &[2, 2, 2]),
        be.upload_bf16(&[0.0; 8], &[2, 2, 2]),
    );
    let w = be.upload_bf16(&vals(12, 1, 1.0), &[3, 4]).unwrap();
    let x = rand(be, tol, &[2, 5], 2, 1.0);
    let Err(e) = be.linear_lowrank(&x.g, Base::Bf16(&w), None, None) else {
        panic!("in mismatch accepted");
    };
    ensure(e.to_string().contains("bf16 weight"), || {
        format!("in mismatch names the bf16 weight: {e}")
    });
    let dy = rand(be, tol, &[2, 5], 3, 1.0);
    let Err(e) = be.backward_input(&dy.g, Base::Bf16(&w), None, None) else {
        panic!("out mismatch accepted");
    };
    ensure(e.to_string().contains("bf16 weight"), || {
        format!("out mismatch names the bf16 weight: {e}")
    });
}
