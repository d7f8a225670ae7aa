//! The wgpu backend's NF4 kernels against the CPU reference: dequantization bit for bit (with
//! and without double quantization, blocksizes 32 to 256, the golden bitsandbytes files when
//! present), the dequantizing matmuls and norms, VeRA's and AdaLoRA's fused terms over an NF4
//! base (QVeRA, QAdaLoRA: forward and backward), weights whose packed data exceed one storage
//! binding, and bad inputs giving the CPU's errors. Skips loudly without a Vulkan/Metal/DX12
//! adapter; `LORAFUSE_REQUIRE=wgpu` fails.
#![cfg(feature = "wgpu")]

mod common;
#[path = "common/gpu.rs"]
mod gpu;
#[path = "common/per_method.rs"]
mod per_method;

use gpu::*;
use lorafuse::backend::{Base, GradWants, LowRank, check};
use lorafuse::quant::nf4::{Nf4Tensor, quantize_nf4};
use lorafuse::{Backend, Cpu, Wgpu};
use per_method::PerMethod;
use safetensors::{Dtype, SafeTensors};

/// `(out, in)`: odd element counts (a padded last nibble), short last blocks, and with
/// blocksize 32 more than 256 blocks (two nested absmax blocks under double quant).
const WEIGHTS: [(usize, usize); 4] = [(70, 67), (33, 67), (9, 130), (130, 67)];

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} differs: got {:e} ({:#010x}), want {:e} ({:#010x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

fn quantized(out: usize, in_: usize, bs: usize, dq: bool, seed: u64) -> Nf4Tensor {
    // a spread of magnitudes across blocks, so that absmax (and its nested code) varies
    let w: Vec<f32> = rand_vec(out * in_, seed)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + (i / 97 % 7) as f32))
        .collect();
    quantize_nf4(&w, &[out, in_], bs, dq).unwrap()
}

fn dequantize_cases(be: &Wgpu, label: &str) {
    for (i, &(out, in_)) in WEIGHTS.iter().enumerate() {
        for bs in [64usize, 128, 256, 32] {
            for dq in [false, true] {
                let q = quantized(out, in_, bs, dq, 10 * i as u64 + bs as u64);
                let w = be.upload_nf4(&q).unwrap();
                assert_eq!(w.dims(), (out, in_));
                assert_eq!(w.bytes(), q.bytes());
                let d = be.nf4_dequantize(&w).unwrap();
                assert_eq!(d.shape(), &[out, in_]);
                assert_bits(
                    &format!("{label} dequantize [{out}, {in_}] bs={bs} double={dq}"),
                    &be.download(&d).unwrap(),
                    &q.dequantize(),
                );
            }
        }
    }
}

#[test]
fn dequantize_is_bit_exact() {
    let Some(be) = wgpu("dequantize_is_bit_exact") else {
        return;
    };
    dequantize_cases(&be, "full binding");
}

fn matmul_cases(be: &Wgpu, label: &str) {
    for (i, &(out, in_)) in WEIGHTS.iter().enumerate() {
        for (bs, dq) in [(64usize, true), (32, false), (256, true)] {
            let q = quantized(out, in_, bs, dq, 100 + i as u64);
            let wg = be.upload_nf4(&q).unwrap();
            let wc = Cpu.upload_nf4(&q).unwrap();
            for t in [1usize, 3, 17] {
                let what = format!("{label} nf4 [{out}, {in_}] bs={bs} double={dq} T={t}");
                let s = 1000 * i as u64 + t as u64;
                let (xc, xg) = rand_pair(be, &[t, in_], s);
                let (bc, bg) = rand_pair(be, &[out], s + 1);
                let y = be.nf4_linear(&xg, &wg, Some(&bg)).unwrap();
                let yc = Cpu.nf4_linear(&xc, &wc, Some(&bc)).unwrap();
                assert_tensor(be, &format!("{what} y"), &y, &yc, 1e-5);
                let y0 = be.nf4_linear(&xg, &wg, None).unwrap();
                let y0c = Cpu.nf4_linear(&xc, &wc, None).unwrap();
                assert_tensor(be, &format!("{what} y no bias"), &y0, &y0c, 1e-5);
                let (dyc, dyg) = rand_pair(be, &[t, out], s + 2);
                let dx = be
                    .nf4_linear_backward_input(&dyg, &wg, None)
                    .unwrap()
                    .unwrap();
                let dxc = Cpu
                    .nf4_linear_backward_input(&dyc, &wc, None)
                    .unwrap()
                    .unwrap();
                assert_tensor(be, &format!("{what} dx"), &dx, &dxc, 1e-5);
                let (mut accc, mut accg) = rand_pair(be, &[t, in_], s + 3);
                assert!(
                    be.nf4_linear_backward_input(&dyg, &wg, Some(&mut accg))
                        .unwrap()
                        .is_none()
                );
                Cpu.nf4_linear_backward_input(&dyc, &wc, Some(&mut accc))
                    .unwrap();
                assert_tensor(be, &format!("{what} dx acc"), &accg, &accc, 1e-5);
            }
            // the norms DoRA needs over an NF4 base
            let what = format!("{label} nf4 [{out}, {in_}] bs={bs} double={dq}");
            let sq = be.nf4_row_sq_norms(&wg).unwrap();
            let sqc = Cpu.nf4_row_sq_norms(&wc).unwrap();
            assert_tensor(be, &format!("{what} row_sq_norms"), &sq, &sqc, 1e-6);
            for r in [1usize, 16] {
                let (ac, ag) = rand_pair(be, &[r, in_], 7 + r as u64);
                let (lbc, lbg) = rand_pair(be, &[out, r], 8 + r as u64);
                let n = be.nf4_dora_weight_norm(&wg, &sq, &ag, &lbg, 0.5).unwrap();
                let nc = Cpu.nf4_dora_weight_norm(&wc, &sqc, &ac, &lbc, 0.5).unwrap();
                assert_tensor(be, &format!("{what} r={r} dora norm"), &n, &nc, 1e-5);
            }
        }
    }
}

#[test]
fn linear_backward_and_norms_match_cpu() {
    let Some(be) = wgpu("linear_backward_and_norms_match_cpu") else {
        return;
    };
    matmul_cases(&be, "full binding");
}

#[test]
fn weights_wider_than_one_binding_are_split() {
    // 1 KiB bindings: packed data (up to 4355 bytes here), absmax and every tile are bound in
    // ranges of rows.
    let Ok(be) = Wgpu::with_max_binding(1024) else {
        let _ = wgpu("weights_wider_than_one_binding_are_split");
        return;
    };
    assert!(be.max_binding() <= 1024);
    dequantize_cases(&be, "1 KiB bindings");
    matmul_cases(&be, "1 KiB bindings");
    lowrank_term_cases(&be, "1 KiB bindings");
}

/// VeRA's and AdaLoRA's terms over an NF4 base (QVeRA, QAdaLoRA), which the fused op makes one
/// description: forward (y, h), the input gradient (also added into an existing dx) and every
/// gradient the method trains, against the CPU on the same NF4 weight.
fn lowrank_term_cases(be: &Wgpu, label: &str) {
    for (i, &(out, in_)) in WEIGHTS.iter().enumerate() {
        let q = quantized(out, in_, 64, true, 300 + i as u64);
        let (wg, wc) = (be.upload_nf4(&q).unwrap(), Cpu.upload_nf4(&q).unwrap());
        for (t, r) in [(1usize, 1usize), (17, 7), (3, 16)] {
            let s = 5000 + 1000 * i as u64 + 10 * t as u64 + r as u64;
            let what = format!("{label} nf4 [{out}, {in_}] T={t} r={r}");
            let (xc, xg) = rand_pair(be, &[t, in_], s);
            let (bc, bg) = rand_pair(be, &[out], s + 1);
            let (dyc, dyg) = rand_pair(be, &[t, out], s + 2);
            // QVeRA: shared projections wider than the layer.
            let (vac, vag) = rand_pair(be, &[r, in_ + 3], s + 3);
            let (vbc, vbg) = rand_pair(be, &[out + 5, r], s + 4);
            let (ldc, ldg) = rand_pair(be, &[r], s + 5);
            let (lbc, lbg) = rand_pair(be, &[out], s + 6);
            let vera = (
                LowRank::vera(&vag, &vbg, &ldg, &lbg),
                LowRank::vera(&vac, &vbc, &ldc, &lbc),
                GradWants::VERA,
            );
            // QAdaLoRA: the last rank masked (E = 0), whose dE stays non-zero.
            let (ac, ag) = rand_pair(be, &[r, in_], s + 7);
            let (lbbc, lbbg) = rand_pair(be, &[out, r], s + 8);
            let mut e = rand_vec(r, s + 9);
            e[r - 1] = 0.0;
            let (ec, eg) = pair(be, &e, &[r, 1]);
            let c = check::adalora_factor(16.0, r as f32).unwrap();
            let adalora = (
                LowRank::adalora(&ag, &lbbg, &eg, c),
                LowRank::adalora(&ac, &lbbc, &ec, c),
                GradWants::ADALORA,
            );
            for (method, (tg, tc, wants)) in [("vera", vera), ("adalora", adalora)] {
                let what = format!("{what} {method}");
                let og = be
                    .linear_lowrank(&xg, Base::Nf4(&wg), Some(&bg), Some(&tg))
                    .unwrap();
                let oc = Cpu
                    .linear_lowrank(&xc, Base::Nf4(&wc), Some(&bc), Some(&tc))
                    .unwrap();
                assert_tensor(be, &format!("{what} y"), &og.y, &oc.y, 1e-5);
                let (h, hc) = (og.h.unwrap(), oc.h.unwrap());
                assert_tensor(be, &format!("{what} h"), &h, &hc, 1e-5);
                let g = be
                    .linear_lowrank_backward(&dyg, &xg, &h, None, Base::Nf4(&wg), &tg, wants)
                    .unwrap();
                let gc = Cpu
                    .linear_lowrank_backward(&dyc, &xc, &hc, None, Base::Nf4(&wc), &tc, wants)
                    .unwrap();
                assert_tensor(be, &format!("{what} dx"), &g.dx, &gc.dx, 1e-5);
                if method == "adalora" {
                    let de = be.download(g.d_rank_scale.as_ref().unwrap()).unwrap();
                    assert_ne!(de[r - 1], 0.0, "{what}: dE of a masked rank");
                }
                let grads = [
                    ("dA", g.d_lora_a, gc.d_lora_a),
                    ("dB", g.d_lora_b, gc.d_lora_b),
                    ("d rank_scale", g.d_rank_scale, gc.d_rank_scale),
                    ("d out_scale", g.d_out_scale, gc.d_out_scale),
                ];
                for (name, got, want) in grads {
                    assert_eq!(got.is_some(), want.is_some(), "{what} {name}");
                    if let (Some(got), Some(want)) = (got, want) {
                        assert_tensor(be, &format!("{what} {name}"), &got, &want, 1e-5);
                    }
                }
                let (mut accc, mut accg) = rand_pair(be, &[t, in_], s + 10);
                be.backward_input(&dyg, Base::Nf4(&wg), Some(&tg), Some(&mut accg))
                    .unwrap();
                Cpu.backward_input(&dyc, Base::Nf4(&wc), Some(&tc), Some(&mut accc))
                    .unwrap();
                assert_tensor(be, &format!("{what} dx acc"), &accg, &accc, 1e-5);
            }
        }
    }
}

#[test]
fn vera_and_adalora_over_nf4_match_cpu() {
    for (mode, be) in wgpu_modes("vera_and_adalora_over_nf4_match_cpu") {
        lowrank_term_cases(&be, mode);
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

#[test]
fn golden_files_dequantize_bit_exact() {
    let Some(be) = wgpu("golden_files_dequantize_bit_exact") else {
        return;
    };
    let dir = common::golden_dir();
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
        common::skip_or_fail(
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
            // quantize_nf4 reproduces the golden packed data and statistics (golden_nf4.rs)
            let q = quantize_nf4(&w, &shape2, bs, dq).unwrap();
            let d = be.nf4_dequantize(&be.upload_nf4(&q).unwrap()).unwrap();
            assert_bits(
                &format!("{} {key}", path.display()),
                &be.download(&d).unwrap(),
                &f32s(&st, key),
            );
        }
        println!("{}: wgpu dequantization bit-exact", path.display());
    }
}

#[test]
fn bad_inputs_give_the_cpu_errors() {
    let Some(be) = wgpu("bad_inputs_give_the_cpu_errors") else {
        return;
    };
    let q = quantized(6, 10, 64, true, 1);
    let (wg, wc) = (be.upload_nf4(&q).unwrap(), Cpu.upload_nf4(&q).unwrap());
    let (xc, xg) = rand_pair(&be, &[3, 9], 2);
    let same = |what: &str, g: String, c: String| assert_eq!(g, c, "{what}");
    same(
        "linear, bad x",
        be.nf4_linear(&xg, &wg, None).unwrap_err().to_string(),
        Cpu.nf4_linear(&xc, &wc, None).unwrap_err().to_string(),
    );
    let (x2c, x2g) = rand_pair(&be, &[3, 10], 3);
    same(
        "linear, bad bias",
        be.nf4_linear(&x2g, &wg, Some(&x2g))
            .unwrap_err()
            .to_string(),
        Cpu.nf4_linear(&x2c, &wc, Some(&x2c))
            .unwrap_err()
            .to_string(),
    );
    same(
        "backward, bad dy",
        be.nf4_linear_backward_input(&x2g, &wg, None)
            .unwrap_err()
            .to_string(),
        Cpu.nf4_linear_backward_input(&x2c, &wc, None)
            .unwrap_err()
            .to_string(),
    );
    let (dyc, dyg) = rand_pair(&be, &[3, 6], 4);
    let (mut accc, mut accg) = rand_pair(&be, &[2, 10], 5);
    same(
        "backward, bad acc",
        be.nf4_linear_backward_input(&dyg, &wg, Some(&mut accg))
            .unwrap_err()
            .to_string(),
        Cpu.nf4_linear_backward_input(&dyc, &wc, Some(&mut accc))
            .unwrap_err()
            .to_string(),
    );
    let (ac, ag) = rand_pair(&be, &[2, 10], 6);
    let (bc, bg) = rand_pair(&be, &[5, 2], 7);
    let (sc, sg) = rand_pair(&be, &[6], 8);
    same(
        "dora norm, bad lora_B",
        be.nf4_dora_weight_norm(&wg, &sg, &ag, &bg, 1.0)
            .unwrap_err()
            .to_string(),
        Cpu.nf4_dora_weight_norm(&wc, &sc, &ac, &bc, 1.0)
            .unwrap_err()
            .to_string(),
    );
    let flat = quantize_nf4(&rand_vec(60, 9), &[60], 64, false).unwrap();
    same(
        "upload, 1-D",
        be.upload_nf4(&flat).unwrap_err().to_string(),
        Cpu.upload_nf4(&flat).unwrap_err().to_string(),
    );
}
