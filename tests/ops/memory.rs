//! Memory and elementwise ops: upload / download / zeros / download_many / copy_into, clones as
//! values, gather and scatter-add of rows, axpy, scale, sum of squares.

use super::harness::*;
use lorafuse::{Backend, Cpu};

/// Uploads round-trip exactly (values representable in the storage precision), zeros are
/// zeros, several tensors read back at once equal each read back alone, a device copy equals
/// its source.
pub fn round_trip<B: Backend>(be: &B, tol: &Tol) {
    for (n, seed) in [(131usize, 1u64), (1, 2), (4097, 3)] {
        let v = tol.round(&vals(n, seed, 3.0));
        let x = be.upload(&v, &[n]).unwrap();
        bits(
            &format!("upload/download [{n}]"),
            &be.download(&x).unwrap(),
            &v,
        );
    }
    let z = be.zeros(&[3, 5]).unwrap();
    ensure(z.shape() == [3, 5], || "zeros shape".into());
    bits("zeros", &be.download(&z).unwrap(), &[0.0; 15]);

    let a = be
        .upload(&tol.round(&vals(1000, 1, 1.0)), &[10, 100])
        .unwrap();
    let b = be.upload(&[3.5], &[1]).unwrap();
    let empty = be.zeros(&[0, 3]).unwrap();
    let c = be.upload(&tol.round(&vals(7, 2, 1.0)), &[7]).unwrap();
    let ts = [&a, &b, &empty, &c];
    let one_by_one: Vec<Vec<f32>> = ts.iter().map(|t| be.download(t).unwrap()).collect();
    let all = be.download_many(&ts).unwrap();
    ensure(all.len() == ts.len(), || {
        "download_many: one list per tensor".into()
    });
    for (i, (m, o)) in all.iter().zip(&one_by_one).enumerate() {
        bits(&format!("download_many [{i}]"), m, o);
    }
    bits(
        "download_many of an empty tensor",
        &be.download_many(&[&empty]).unwrap().concat(),
        &[],
    );

    for (shape, seed) in [(vec![1usize], 4u64), (vec![13, 11], 5), (vec![5000], 6)] {
        let src = rand(be, tol, &shape, seed, 1.0);
        let mut dst = be.zeros(&shape).unwrap();
        be.copy_into(&src.g, &mut dst).unwrap();
        bits_t(be, &format!("copy_into {shape:?}"), &dst, &src.c);
    }
}

/// A clone is a value: in-place changes to one (scale, scatter-add) leave the other as it was.
pub fn clones_are_values<B: Backend>(be: &B, tol: &Tol) {
    let data = tol.round(&vals(40, 9, 1.0));
    let mut a = be.upload(&data, &[4, 10]).unwrap();
    let b = a.clone();
    be.scale(&mut a, 2.0).unwrap();
    bits(
        "a clone must not see in-place changes",
        &be.download(&b).unwrap(),
        &data,
    );
    let doubled: Vec<f32> = data.iter().map(|v| v * 2.0).collect();
    bits("scale by 2", &be.download(&a).unwrap(), &doubled);

    let table = rand(be, tol, &[11, 13], 2, 1.0);
    let src = rand(be, tol, &[5, 13], 3, 1.0);
    let mut dg = table.g.clone();
    be.scatter_add_rows(&mut dg, &[3, 0, 10, 3, 7], &src.g)
        .unwrap();
    bits_t(be, "clone after scatter", &table.g, &table.c);
}

fn rand_idx(n: usize, count: usize, seed: u64) -> Vec<u32> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..count).map(|_| rng.random_range(0..n as u32)).collect()
}

/// `(rows n, width d, indices m)`: odd widths, repeated indices, the last row and row 0; tables
/// and index lists wider than a 1 KiB binding (300 x 37 floats is 43 KiB: about 6 rows per
/// binding), more sources than rows.
const TABLES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (7, 5, 3),
    (50, 33, 17),
    (13, 130, 65),
    (3, 67, 40),
    (300, 37, 200),
    (40, 190, 9),
    (9, 3, 700),
];

/// Gather equals the CPU bit for bit (a copy); scatter-add too where the backend adds the
/// same sources in the same order ([`Tol::exact_scatter`]), else within `tol.rel`.
pub fn gather_scatter<B: Backend>(be: &B, tol: &Tol) {
    let scatter = |what: &str, dg: &lorafuse::Tensor<B>, dc: &lorafuse::Tensor<Cpu>| {
        if tol.exact_scatter {
            bits_t(be, what, dg, dc);
        } else {
            tol.close(be, what, dg, dc, tol.rel);
        }
    };
    let mut cases: Vec<(usize, usize, Vec<u32>)> = TABLES
        .iter()
        .enumerate()
        .map(|(i, &(n, d, m))| {
            let mut idx = rand_idx(n, m, 10 * i as u64 + 1);
            idx[0] = (n - 1) as u32;
            if m > 2 {
                idx[m - 1] = 0;
                idx[m / 2] = idx[1];
            }
            (n, d, idx)
        })
        .collect();
    cases.push((11, 13, vec![3, 0, 10, 3, 7]));
    // One destination row with more sources than a list segment holds.
    let mut long = vec![5u32; 600];
    long[17] = 19;
    cases.push((20, 11, long));
    for (i, (n, d, idx)) in cases.into_iter().enumerate() {
        let s = 10 * i as u64;
        let m = idx.len();
        let what = format!("table {n}x{d}, {m} rows");
        let t = rand(be, tol, &[n, d], s, 1.0);
        let g = be.gather_rows(&t.g, &idx).unwrap();
        let gc = Cpu.gather_rows(&t.c, &idx).unwrap();
        bits_t(be, &format!("{what} gather"), &g, &gc);
        let src = rand(be, tol, &[m, d], s + 2, 1.0);
        let mut dst = rand(be, tol, &[n, d], s + 3, 1.0);
        be.scatter_add_rows(&mut dst.g, &idx, &src.g).unwrap();
        Cpu.scatter_add_rows(&mut dst.c, &idx, &src.c).unwrap();
        scatter(&format!("{what} scatter_add"), &dst.g, &dst.c);
    }
    // an empty index list
    let t = rand(be, tol, &[4, 3], 1, 1.0);
    let g = be.gather_rows(&t.g, &[]).unwrap();
    ensure(g.shape() == [0, 3], || {
        format!("empty gather: {:?}", g.shape())
    });
}

/// axpy and scale against the CPU, over tensors wider than a 1 KiB binding too.
pub fn elementwise<B: Backend>(be: &B, tol: &Tol) {
    for (shape, alpha, s) in [
        (vec![7usize, 9], -0.7f32, 4u64),
        (vec![5000], 0.5, 1),
        (vec![1], 2.5, 7),
    ] {
        let mut a = rand(be, tol, &shape, s, 1.0);
        let b = rand(be, tol, &shape, s + 1, 1.0);
        be.axpy(&mut a.g, alpha, &b.g).unwrap();
        Cpu.axpy(&mut a.c, alpha, &b.c).unwrap();
        tol.close(be, &format!("axpy {shape:?}"), &a.g, &a.c, tol.elementwise);
        be.scale(&mut a.g, 1.5).unwrap();
        Cpu.scale(&mut a.c, 1.5).unwrap();
        tol.close(
            be,
            &format!("scale after axpy {shape:?}"),
            &a.g,
            &a.c,
            tol.scale,
        );
    }
    for (n, s) in [(1usize, 1u64), (255, 2), (1000, 3)] {
        let mut a = rand(be, tol, &[n], s + 3, 1.0);
        be.scale(&mut a.g, -1.5).unwrap();
        Cpu.scale(&mut a.c, -1.5).unwrap();
        tol.close(be, &format!("scale [{n}]"), &a.g, &a.c, tol.scale);
    }
}

/// Sum of squares (f64) against the CPU, relative.
pub fn sum_squares<B: Backend>(be: &B, tol: &Tol) {
    let mut cases: Vec<(Vec<usize>, u64)> = [1usize, 3, 17, 4095, 4097, 100_003]
        .into_iter()
        .enumerate()
        .map(|(i, n)| (vec![n], 50 + i as u64))
        .collect();
    cases.push((vec![1000, 37], 6));
    for (shape, seed) in cases {
        let a = rand(be, tol, &shape, seed, 1.0);
        let want = Cpu.sum_squares(&a.c).unwrap();
        let got = be.sum_squares(&a.g).unwrap();
        ensure((got - want).abs() <= tol.sum_squares * want, || {
            format!("sum_squares {shape:?}: got {got}, want {want}")
        });
    }
    let got = be.sum_squares(&be.zeros(&[0]).unwrap()).unwrap();
    ensure(got == 0.0, || format!("sum_squares of nothing: {got}"));
}
