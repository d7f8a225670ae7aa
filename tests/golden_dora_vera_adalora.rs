//! Golden tests of DoRA, VeRA and AdaLoRA layers against vectors made by PEFT 0.21.2 (see
//! `tests/golden/README.md`, sections 2, 3 and 4).
//!
//! Files are found by name pattern (`dora_*`, `vera_*`, `adalora_*` `.safetensors` in the golden
//! folder, `$LORAFUSE_GOLDEN_DIR` or `tests/golden`), and each file checked is printed
//! (`cargo test --release --test golden_dora_vera_adalora -- --nocapture`). Tolerances are the
//! README's: atol 1e-5 + rtol 1e-5 on outputs and merged weights, atol 5e-5 on gradients.

mod common;

use lorafuse::adapter::{AdaLoraLayer, BaseWeight, DoraLayer, Linear, VeraLayer, VeraShared};
use lorafuse::{Cpu, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-5;
const GRAD_ATOL: f32 = 5e-5;

/// The golden files whose names start with `prefix` and end in `.safetensors`, sorted; at least
/// one must exist (golden files ship with the repository).
fn golden_files(prefix: &str) -> Vec<PathBuf> {
    let dir = common::golden_dir();
    let mut out: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "golden folder {}: {e} (set LORAFUSE_GOLDEN_DIR)",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with(prefix) && n.ends_with(".safetensors")
        })
        .collect();
    out.sort();
    assert!(
        !out.is_empty(),
        "no {prefix}*.safetensors in {}",
        dir.display()
    );
    out
}

/// A safetensors file read with the safetensors crate directly (independent of the code under
/// test): f32 tensors, u8 tensors, and the metadata.
struct Golden {
    path: PathBuf,
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    u8s: HashMap<String, Vec<u8>>,
    meta: HashMap<String, String>,
}

impl Golden {
    fn read(path: &Path) -> Golden {
        let rel = path.strip_prefix(common::golden_dir()).unwrap_or(path);
        let path = common::golden_file(rel.to_str().unwrap());
        let bytes = fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
        let (mut f32s, mut u8s) = (HashMap::new(), HashMap::new());
        for (name, v) in st.tensors() {
            match v.dtype() {
                Dtype::F32 => {
                    let data = v
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    f32s.insert(name, (v.shape().to_vec(), data));
                }
                Dtype::U8 => {
                    u8s.insert(name, v.data().to_vec());
                }
                d => panic!("{}: unexpected dtype {d:?} for {name}", path.display()),
            }
        }
        Golden {
            path,
            f32s,
            u8s,
            meta: md.metadata().clone().unwrap_or_default(),
        }
    }
    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.f32s
            .get(name)
            .unwrap_or_else(|| panic!("{}: no f32 tensor `{name}`", self.path.display()))
    }
    fn data(&self, name: &str) -> &[f32] {
        &self.get(name).1
    }
    fn tensor(&self, name: &str) -> Tensor<Cpu> {
        let (shape, data) = self.get(name);
        Cpu.from_vec(data.clone(), shape).unwrap()
    }
    fn meta_json(&self, key: &str) -> Value {
        let s = self
            .meta
            .get(key)
            .unwrap_or_else(|| panic!("{}: no metadata `{key}`", self.path.display()));
        serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
    }
    fn meta_usize(&self, key: &str) -> usize {
        self.meta_json(key).as_u64().unwrap() as usize
    }
    /// The base layer `W0`, `bias` and its dims `(in, out, T)` checked against the metadata.
    fn base(&self) -> (Linear<Cpu>, usize, usize, usize) {
        let (inp, out, t) = (
            self.meta_usize("in_features"),
            self.meta_usize("out_features"),
            self.meta_usize("tokens"),
        );
        let w0 = self.tensor("W0");
        w0.expect_shape("W0", &[out, inp]).unwrap();
        self.tensor("x").expect_shape("x", &[t, inp]).unwrap();
        self.tensor("g").expect_shape("g", &[t, out]).unwrap();
        let base = Linear {
            weight: BaseWeight::Dense(w0),
            bias: Some(self.tensor("bias")),
        };
        (base, inp, out, t)
    }
    /// `y_base` through the plain base layer, and `merged.bias == bias`.
    fn check_base(&self, base: &Linear<Cpu>) {
        let y_base = base.forward(&Cpu, &self.tensor("x")).unwrap();
        assert_close("y_base", y_base.data(), self.data("y_base"), ATOL, RTOL);
        assert_eq!(
            self.data("bias"),
            self.data("merged.bias"),
            "merged.bias must equal bias (lora_bias=False)"
        );
    }
}

/// Asserts `|got - want| <= atol + rtol |want|` everywhere and prints the worst difference.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} values, want {}",
        got.len(),
        want.len()
    );
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        let tol = atol + rtol * w.abs();
        assert!(
            d <= tol,
            "{what}[{i}]: got {g}, want {w}, |diff| {d:e} > {tol:e}"
        );
        worst = worst.max(d);
    }
    println!("    {what}: max |diff| {worst:.2e} (tol {atol:e} + {rtol:e}|want|)");
}

fn dense(base: &Linear<Cpu>) -> &Tensor<Cpu> {
    base.weight.dense_or_err("test").unwrap()
}

#[test]
fn golden_dora_files() {
    let be = Cpu;
    for f in golden_files("dora_") {
        let g = Golden::read(&f);
        assert_eq!(g.meta_json("kind"), Value::from("dora"));
        let (mut base, _inp, out, _t) = g.base();
        g.check_base(&base);
        let r = g.meta_usize("r");
        let s = g.data("scaling")[0];
        let alpha = g.meta_json("lora_alpha").as_f64().unwrap() as f32;
        assert_eq!(s, alpha / r as f32, "scaling = lora_alpha / r");
        assert!(s != 1.0, "scaling 1 would not test the scaling");
        let (x, dy) = (g.tensor("x"), g.tensor("g"));
        let (a, b) = (g.tensor("lora_A.weight"), g.tensor("lora_B.weight"));
        let m = g.tensor("lora_magnitude_vector.weight");
        m.expect_shape("lora_magnitude_vector", &[out]).unwrap();

        // PEFT's creation-time magnitude = ||W0 + s B A||_row for these factors.
        let init = DoraLayer::from_factors(&be, &base, a.clone(), b.clone(), s, None).unwrap();
        assert_close(
            "magnitude_init",
            init.lora_magnitude_vector.data(),
            g.data("magnitude_init"),
            ATOL,
            RTOL,
        );

        let mut layer =
            DoraLayer::from_factors(&be, &base, a.clone(), b.clone(), s, Some(m.clone())).unwrap();
        let n = layer.weight_norm(&be, &base).unwrap();
        assert_close("weight_norm", n.data(), g.data("weight_norm"), ATOL, RTOL);
        assert!(
            m.data()
                .iter()
                .zip(n.data())
                .any(|(m, n)| (m / n - 1.0).abs() > 1e-3),
            "m / n == 1 would not test the magnitude"
        );

        let (y, saved) = layer.forward(&be, &base, &x).unwrap();
        assert_close("y", y.data(), g.data("y"), ATOL, RTOL);
        let grads = layer.backward(&be, &base, &x, &saved, &dy).unwrap();
        assert_close("grad.x", grads.dx.data(), g.data("grad.x"), GRAD_ATOL, 0.0);
        assert_close(
            "grad.lora_A.weight",
            grads.d_lora_a.data(),
            g.data("grad.lora_A.weight"),
            GRAD_ATOL,
            0.0,
        );
        assert_close(
            "grad.lora_B.weight",
            grads.d_lora_b.data(),
            g.data("grad.lora_B.weight"),
            GRAD_ATOL,
            0.0,
        );
        assert_close(
            "grad.lora_magnitude_vector.weight",
            grads.d_magnitude.data(),
            g.data("grad.lora_magnitude_vector.weight"),
            GRAD_ATOL,
            0.0,
        );

        // Merge, the merged layer's output, unmerge round trip.
        layer.merge(&be, &mut base).unwrap();
        assert!(
            layer.forward(&be, &base, &x).is_err(),
            "forward while merged"
        );
        assert_close(
            "merged.weight",
            dense(&base).data(),
            g.data("merged.weight"),
            ATOL,
            RTOL,
        );
        let y_merged = base.forward(&be, &x).unwrap();
        assert_close(
            "y through the merged weight",
            y_merged.data(),
            g.data("y"),
            1e-4,
            RTOL,
        );
        layer.unmerge(&be, &mut base).unwrap();
        assert_close(
            "unmerged weight vs W0",
            dense(&base).data(),
            g.data("W0"),
            ATOL,
            RTOL,
        );
        assert!(layer.unmerge(&be, &mut base).is_err(), "unmerge twice");
    }
}

#[test]
fn golden_vera_files() {
    let be = Cpu;
    for f in golden_files("vera_") {
        let g = Golden::read(&f);
        assert_eq!(g.meta_json("kind"), Value::from("vera"));
        let (mut base, inp, out, _t) = g.base();
        g.check_base(&base);
        let r = g.meta_usize("r");
        let (x, dy) = (g.tensor("x"), g.tensor("g"));
        let shared = VeraShared::from_tensors(g.tensor("vera_A"), g.tensor("vera_B")).unwrap();
        assert_eq!(shared.r(), r);
        assert!(
            shared.vera_a.dim(1) > inp && shared.vera_b.dim(0) > out,
            "the shared projections should be larger than the layer (slicing is tested)"
        );
        let layer = VeraLayer::from_vectors(
            &shared,
            &base,
            g.tensor("vera_lambda_d"),
            g.tensor("vera_lambda_b"),
        )
        .unwrap();
        let (y, h) = layer.forward(&be, &shared, &base, &x).unwrap();
        assert_close("y", y.data(), g.data("y"), ATOL, RTOL);
        let (dx, (dld, dlb)) = layer.backward(&be, &shared, &base, &x, &h, &dy).unwrap();
        assert_close("grad.x", dx.data(), g.data("grad.x"), GRAD_ATOL, 0.0);
        assert_close(
            "grad.vera_lambda_d",
            dld.data(),
            g.data("grad.vera_lambda_d"),
            GRAD_ATOL,
            0.0,
        );
        assert_close(
            "grad.vera_lambda_b",
            dlb.data(),
            g.data("grad.vera_lambda_b"),
            GRAD_ATOL,
            0.0,
        );

        layer.merge(&be, &shared, &mut base).unwrap();
        assert_close(
            "merged.weight",
            dense(&base).data(),
            g.data("merged.weight"),
            ATOL,
            RTOL,
        );
        layer.unmerge(&be, &shared, &mut base).unwrap();
        assert_close(
            "unmerged weight vs W0",
            dense(&base).data(),
            g.data("W0"),
            ATOL,
            RTOL,
        );

        // PEFT's init: lambda_b = 0, lambda_d = d_initial; the layer then equals the base.
        let d_initial = g.meta_json("d_initial").as_f64().unwrap() as f32;
        let fresh = VeraLayer::init(&be, &shared, &base, d_initial).unwrap();
        assert!(fresh.vera_lambda_d.data().iter().all(|&v| v == d_initial));
        assert!(fresh.vera_lambda_b.data().iter().all(|&v| v == 0.0));
        let (y0, _) = fresh.forward(&be, &shared, &base, &x).unwrap();
        assert_close(
            "y at init vs y_base",
            y0.data(),
            g.data("y_base"),
            ATOL,
            RTOL,
        );
    }
}

#[test]
fn golden_adalora_files() {
    let be = Cpu;
    for f in golden_files("adalora_") {
        let g = Golden::read(&f);
        assert_eq!(g.meta_json("kind"), Value::from("adalora"));
        let (mut base, _inp, _out, _t) = g.base();
        g.check_base(&base);
        let init_r = g.meta_usize("init_r");
        let alpha = g.meta_json("lora_alpha").as_f64().unwrap() as f32;
        let scaling = g.data("scaling")[0];
        let ranknum = g.data("ranknum")[0];
        assert_eq!(
            scaling,
            AdaLoraLayer::<Cpu>::scaling_for(alpha, init_r),
            "scaling = lora_alpha"
        );
        assert_eq!(ranknum, init_r as f32);
        let (x, dy) = (g.tensor("x"), g.tensor("g"));
        let keep: Vec<bool> = g.u8s["rank_mask"].iter().map(|&v| v != 0).collect();
        assert!(keep.iter().any(|k| !k), "want at least one masked rank");

        // Start from the file's E with the masked entries made non-zero, then apply the mask.
        let mut e = g.data("lora_E").to_vec();
        for (v, k) in e.iter_mut().zip(&keep) {
            if !k {
                assert_eq!(*v, 0.0, "PEFT's masked E entries are 0");
                *v = 0.5;
            }
        }
        let e_unmasked = Cpu.from_vec(e, &[init_r, 1]).unwrap();
        let mut layer = AdaLoraLayer::from_factors(
            &base,
            g.tensor("lora_A"),
            g.tensor("lora_B"),
            e_unmasked,
            scaling,
            ranknum,
        )
        .unwrap();
        layer.apply_rank_mask(&be, &keep).unwrap();
        assert_eq!(
            layer.lora_e.data(),
            g.data("lora_E"),
            "E after the rank mask"
        );
        let c = g.meta_json("effective_factor").as_f64().unwrap();
        assert!(
            (layer.factor() as f64 - c).abs() < 1e-6,
            "c = scaling/(ranknum+1e-5)"
        );

        let (y, h) = layer.forward(&be, &base, &x).unwrap();
        assert_close("y", y.data(), g.data("y"), ATOL, RTOL);
        let grads = layer.backward(&be, &base, &x, &h, &dy).unwrap();
        assert_close("grad.x", grads.dx.data(), g.data("grad.x"), GRAD_ATOL, 0.0);
        assert_close(
            "grad.lora_A",
            grads.d_lora_a.data(),
            g.data("grad.lora_A"),
            GRAD_ATOL,
            0.0,
        );
        assert_close(
            "grad.lora_B",
            grads.d_lora_b.data(),
            g.data("grad.lora_B"),
            GRAD_ATOL,
            0.0,
        );
        assert_close(
            "grad.lora_E",
            grads.d_lora_e.data(),
            g.data("grad.lora_E"),
            GRAD_ATOL,
            0.0,
        );
        for (i, k) in keep.iter().enumerate() {
            if !k {
                let de = grads.d_lora_e.data()[i];
                assert!(
                    de.abs() > 1e-4,
                    "grad.lora_E[{i}] of a masked rank should be non-zero, got {de}"
                );
            }
        }

        layer.merge(&be, &mut base).unwrap();
        assert_close(
            "merged.weight",
            dense(&base).data(),
            g.data("merged.weight"),
            ATOL,
            RTOL,
        );
        layer.unmerge(&be, &mut base).unwrap();
        assert_close(
            "unmerged weight vs W0",
            dense(&base).data(),
            g.data("W0"),
            ATOL,
            RTOL,
        );
    }
}
