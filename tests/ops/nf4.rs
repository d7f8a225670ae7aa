//! NF4 base weights: upload and dequantization bit for bit (blocksizes 32 to 256, double quant
//! on and off, the golden bitsandbytes files), and the dequantizing products: linear with and
//! without bias, the input gradient (also into an accumulator), a fused LoRA term, and the
//! row norms DoRA takes over an NF4 base. (The low-rank terms over NF4 bases are in
//! `lowrank.rs`.)

use super::harness::*;
use lorafuse::backend::{Base, LowRank};
use lorafuse::quant::nf4::{Nf4Tensor, quantize_nf4};
use lorafuse::{Backend, Cpu};
use safetensors::{Dtype, SafeTensors};

/// `(out, in)` of the old wgpu grid: odd element counts (a padded last nibble), short last
/// blocks, and with blocksize 32 more than 256 blocks (two nested absmax blocks under double
/// quant).
const WEIGHTS: [(usize, usize); 4] = [(70, 67), (33, 67), (9, 130), (130, 67)];
/// `(out, in, blocksize, double quant)` of the old CUDA grid.
const CUDA_WEIGHTS: [(usize, usize, usize, bool); 4] = [
    (29, 37, 64, false),
    (67, 83, 64, true),
    (300, 128, 128, true),
    (45, 64, 32, false),
];

/// A quantized weight with a spread of magnitudes across blocks, so that absmax (and its
/// nested code) varies; values within `b` times that spread.
fn quantized(out: usize, in_: usize, bs: usize, dq: bool, seed: u64, b: f32) -> Nf4Tensor {
    let w: Vec<f32> = vals(out * in_, seed, b)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + (i / 97 % 7) as f32))
        .collect();
    quantize_nf4(&w, &[out, in_], bs, dq).unwrap()
}

/// Every weight of both grids: `(out, in, blocksize, double quant, seed, bound)`.
fn dequant_grid() -> Vec<(usize, usize, usize, bool, u64, f32)> {
    let mut v = Vec::new();
    for (i, &(out, in_)) in WEIGHTS.iter().enumerate() {
        for bs in [64usize, 128, 256, 32] {
            for dq in [false, true] {
                v.push((out, in_, bs, dq, 10 * i as u64 + bs as u64, 1.0));
            }
        }
    }
    for (k, &(out, in_, bs, dq)) in CUDA_WEIGHTS.iter().enumerate() {
        v.push((out, in_, bs, dq, 5000 + k as u64, 0.5));
    }
    v
}

/// Upload keeps the dims and the stored bytes; dequantization equals the CPU's bit for bit
/// (rounded to the storage precision, as the backend stores its output).
pub fn dequantize<B: Backend>(be: &B, tol: &Tol) {
    for (out, in_, bs, dq, seed, b) in dequant_grid() {
        let what = format!("dequantize [{out}, {in_}] bs={bs} double={dq}");
        let q = quantized(out, in_, bs, dq, seed, b);
        let w = be.upload_nf4(&q).unwrap();
        ensure(w.dims() == (out, in_), || format!("{what}: dims"));
        ensure(w.bytes() == q.bytes(), || format!("{what}: bytes"));
        let d = be.nf4_dequantize(&w).unwrap();
        ensure(d.shape() == [out, in_], || format!("{what}: shape"));
        let want = Cpu.nf4_dequantize(&Cpu.upload_nf4(&q).unwrap()).unwrap();
        bits(&format!("{what} (cpu)"), want.data(), &q.dequantize());
        bits(&what, &be.download(&d).unwrap(), &tol.round(want.data()));
    }
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The golden bitsandbytes files (`tests/golden/nf4_*.safetensors`): quantize_nf4 reproduces
/// their packed data (golden_nf4.rs), and the backend's dequantization their dequantized
/// weights bit for bit (rounded to the storage precision). A missing folder skips loudly
/// (`golden`).
pub fn golden_dequantize<B: Backend>(be: &B, tol: &Tol) {
    let dir = crate::common::golden_dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| {
                    let name = p.file_name().unwrap().to_string_lossy();
                    name.starts_with("nf4_") && name.ends_with(".safetensors")
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    if files.is_empty() {
        crate::common::skip_or_fail(
            "golden",
            &format!("no nf4_*.safetensors in {}", dir.display()),
        );
        return;
    }
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let bs: usize = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("blocksize"))
            .map_or(64, |b| b.parse().unwrap());
        let w = f32s(&st, "W");
        let shape = st.tensor("W").unwrap().shape().to_vec();
        let cols = *shape.last().unwrap();
        let shape2 = [w.len() / cols, cols];
        for (dq, key) in [(false, "single.dequant"), (true, "double.dequant")] {
            let q = quantize_nf4(&w, &shape2, bs, dq).unwrap();
            let d = be.nf4_dequantize(&be.upload_nf4(&q).unwrap()).unwrap();
            bits(
                &format!("{} {key}", path.display()),
                &be.download(&d).unwrap(),
                &tol.round(&f32s(&st, key)),
            );
        }
        println!("{}: dequantization bit-exact", path.display());
    }
}

/// The dequantizing products against the CPU on the same NF4 bytes, for T = 1, 3, 17, 130.
pub fn linear<B: Backend>(be: &B, tol: &Tol) {
    let mut weights: Vec<(usize, usize, usize, bool, u64, f32)> = Vec::new();
    for (i, &(out, in_)) in WEIGHTS.iter().enumerate() {
        for (bs, dq) in [(64usize, true), (32, false), (256, true)] {
            weights.push((out, in_, bs, dq, 100 + i as u64, 1.0));
        }
    }
    for (k, &(out, in_, bs, dq)) in CUDA_WEIGHTS.iter().enumerate() {
        weights.push((out, in_, bs, dq, 5000 + k as u64, 0.5));
    }
    for (i, (out, in_, bs, dq, seed, b)) in weights.into_iter().enumerate() {
        let q = quantized(out, in_, bs, dq, seed, b);
        let wg = be.upload_nf4(&q).unwrap();
        let wc = Cpu.upload_nf4(&q).unwrap();
        let what = format!("nf4 [{out}, {in_}] bs={bs} double={dq}");
        for t in [1usize, 3, 17, 130] {
            let what = format!("{what} T={t}");
            let s = 1000 * i as u64 + t as u64;
            let x = rand(be, tol, &[t, in_], s, 1.0);
            let bias = rand(be, tol, &[out], s + 1, 1.0);
            for bias in [Some(&bias), None] {
                let y = be
                    .linear_lowrank(&x.g, Base::Nf4(&wg), bias.map(|b| &b.g), None)
                    .unwrap();
                let yc = Cpu
                    .linear_lowrank(&x.c, Base::Nf4(&wc), bias.map(|b| &b.c), None)
                    .unwrap();
                let with = if bias.is_some() { "bias" } else { "no bias" };
                tol.close(be, &format!("{what} y ({with})"), &y.y, &yc.y, tol.rel);
            }
            let dy = rand(be, tol, &[t, out], s + 2, 1.0);
            let (dx, _) = be
                .backward_input(&dy.g, Base::Nf4(&wg), None, None)
                .unwrap();
            let (dxc, _) = Cpu
                .backward_input(&dy.c, Base::Nf4(&wc), None, None)
                .unwrap();
            tol.close(
                be,
                &format!("{what} dx"),
                &dx.unwrap(),
                &dxc.unwrap(),
                tol.rel,
            );
            let mut acc = rand(be, tol, &[t, in_], s + 3, 1.0);
            let (none, _) = be
                .backward_input(&dy.g, Base::Nf4(&wg), None, Some(&mut acc.g))
                .unwrap();
            ensure(none.is_none(), || format!("{what}: dx added into acc"));
            Cpu.backward_input(&dy.c, Base::Nf4(&wc), None, Some(&mut acc.c))
                .unwrap();
            tol.close(be, &format!("{what} dx acc"), &acc.g, &acc.c, tol.rel);
            // the fused QLoRA forward (CUDA: one nf4_gemv with the term for T <= 8)
            let r = 1 + t % 9;
            let a = rand(be, tol, &[r, in_], 5400, 0.3);
            let lb = rand(be, tol, &[out, r], 5401, 0.3);
            let bias = rand(be, tol, &[out], s + 4, 1.0);
            let og = be
                .linear_lowrank(
                    &x.g,
                    Base::Nf4(&wg),
                    Some(&bias.g),
                    Some(&LowRank::lora(&a.g, &lb.g, 0.5)),
                )
                .unwrap();
            let oc = Cpu
                .linear_lowrank(
                    &x.c,
                    Base::Nf4(&wc),
                    Some(&bias.c),
                    Some(&LowRank::lora(&a.c, &lb.c, 0.5)),
                )
                .unwrap();
            tol.close(be, &format!("{what} fused lora y"), &og.y, &oc.y, tol.rel);
            let (h, hc) = (og.h.unwrap(), oc.h.unwrap());
            tol.close(be, &format!("{what} fused lora h"), &h, &hc, tol.rel);
        }
        // the norms DoRA needs over an NF4 base
        let sqg = be.row_sq_norms(Base::Nf4(&wg)).unwrap();
        let sqc = Cpu.row_sq_norms(Base::Nf4(&wc)).unwrap();
        tol.close(be, &format!("{what} row_sq_norms"), &sqg, &sqc, tol.row_sq);
        let sq = from_cpu(be, tol, &sqc);
        for (r, sc) in [(1usize, 0.5f32), (16, 0.5), (4, 0.7)] {
            let a = rand(be, tol, &[r, in_], 7 + r as u64, 1.0);
            let lb = rand(be, tol, &[out, r], 8 + r as u64, 1.0);
            let n = be
                .lowrank_row_norms(Base::Nf4(&wg), &sq.g, &LowRank::lora(&a.g, &lb.g, sc))
                .unwrap();
            let nc = Cpu
                .lowrank_row_norms(Base::Nf4(&wc), &sq.c, &LowRank::lora(&a.c, &lb.c, sc))
                .unwrap();
            tol.close(be, &format!("{what} r={r} dora norm"), &n, &nc, tol.rel);
        }
    }
}
