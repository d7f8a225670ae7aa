//! QLoRA against PEFT 0.21.2 + bitsandbytes 0.50.2 (golden/README.md section 6): a LoRA adapter
//! over a `bnb.nn.Linear4bit` base (NF4, double quant, fp32 compute). The NF4 base is rebuilt
//! from the file's checkpoint tensors (and re-quantized from `W_fp32_before_quant`, which must
//! give the same tensor), then the forward and the backward run on the NF4 kernels, which never
//! materialize the dequantized weight.

mod common;

use lorafuse::adapter::{Linear, LoraLayer};
use lorafuse::backend::Backend;
use lorafuse::quant::nf4::{Absmax, NESTED_BLOCKSIZE, Nf4Tensor, quantize_nf4};
use lorafuse::{Cpu, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::PathBuf;

/// Every `qlora_nf4_*.safetensors` in the golden folder, sorted (at least one).
fn golden_files() -> Vec<PathBuf> {
    let dir = common::golden_dir();
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("golden dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("qlora_nf4_") && name.ends_with(".safetensors")
        })
        .collect();
    v.sort();
    assert!(
        !v.is_empty(),
        "no qlora_nf4_*.safetensors in {}",
        dir.display()
    );
    v
}

struct Golden<'a> {
    st: SafeTensors<'a>,
    meta: HashMap<String, String>,
}

impl Golden<'_> {
    fn f32s(&self, name: &str) -> Vec<f32> {
        let t = self
            .st
            .tensor(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn u8s(&self, name: &str) -> Vec<u8> {
        let t = self
            .st
            .tensor(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        t.data().to_vec()
    }
    fn shape(&self, name: &str) -> Vec<usize> {
        self.st.tensor(name).unwrap().shape().to_vec()
    }
    fn tensor(&self, name: &str) -> Tensor<Cpu> {
        Cpu.from_vec(self.f32s(name), &self.shape(name)).unwrap()
    }
    fn meta_usize(&self, key: &str) -> usize {
        self.meta[key]
            .parse()
            .unwrap_or_else(|e| panic!("metadata {key}: {e}"))
    }
}

/// Asserts `|got - want| <= atol + rtol |want|` elementwise, printing the worst error.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        worst = worst.max(err);
        assert!(
            err <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g:e}, want {w:e} (|diff| {err:e})"
        );
    }
    println!("  {what}: {} values, max |diff| {worst:.2e}", got.len());
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits());
    assert!(
        bad.is_none(),
        "{what}: differs at {}: {:e} vs {:e}",
        bad.unwrap(),
        got[bad.unwrap()],
        want[bad.unwrap()]
    );
    println!("  {what}: {} values bit for bit", got.len());
}

#[test]
fn qlora_nf4_matches_peft_bitsandbytes() {
    for path in golden_files() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let path = common::golden_file(&name);
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap_or_default();
        let g = Golden {
            st: SafeTensors::deserialize(&bytes).unwrap(),
            meta,
        };
        assert_eq!(g.meta["kind"], "qlora_nf4", "{name}: kind");
        assert_eq!(g.meta["compute_dtype"], "float32", "{name}: compute dtype");
        let (din, dout) = (g.meta_usize("in_features"), g.meta_usize("out_features"));
        let blocksize = g.meta_usize("blocksize");
        let double = g.meta.get("compress_statistics").map(String::as_str) == Some("true");
        println!("{name}: in {din} out {dout} blocksize {blocksize} double quant {double}");

        // The NF4 base from the checkpoint tensors.
        let absmax = if double {
            Absmax::Double {
                absmax_q: g.u8s("weight.absmax_q"),
                nested_absmax: g.f32s("weight.nested_absmax"),
                nested_code: g.f32s("weight.nested_code"),
                offset: g.f32s("weight.offset")[0],
                nested_blocksize: NESTED_BLOCKSIZE,
            }
        } else {
            Absmax::F32(g.f32s("weight.absmax"))
        };
        let q = Nf4Tensor::from_parts(g.u8s("weight.packed"), absmax, vec![dout, din], blocksize)
            .unwrap();
        assert_bits(
            "dequantize vs W_dequant",
            &q.dequantize(),
            &g.f32s("W_dequant"),
        );
        // Quantizing the fp32 weight ourselves gives the very same tensor.
        let ours = quantize_nf4(
            &g.f32s("W_fp32_before_quant"),
            &[dout, din],
            blocksize,
            double,
        )
        .unwrap();
        assert!(
            ours == q,
            "{name}: quantize_nf4(W_fp32_before_quant) differs"
        );
        println!("  quantize_nf4(W_fp32_before_quant) equals the checkpoint tensors");

        let mut base = Linear::nf4(&Cpu, &q).unwrap();
        base.bias = Some(g.tensor("bias"));
        assert!(base.weight.is_quantized());
        let scaling = g.f32s("scaling")[0];
        let layer = LoraLayer::from_factors(
            &base,
            g.tensor("lora_A.weight"),
            g.tensor("lora_B.weight"),
            scaling,
        )
        .unwrap();
        let x = g.tensor("x");
        let (y, h) = layer.forward(&Cpu, &base, &x).unwrap();
        assert_close("y", y.data(), &g.f32s("y"), 1e-5, 1e-5);
        let dy = g.tensor("g");
        let (dx, (da, db)) = layer.backward(&Cpu, &base, &x, &h, &dy).unwrap();
        assert_close("grad.x", dx.data(), &g.f32s("grad.x"), 5e-5, 1e-5);
        assert_close(
            "grad.lora_A.weight",
            da.data(),
            &g.f32s("grad.lora_A.weight"),
            5e-5,
            1e-5,
        );
        assert_close(
            "grad.lora_B.weight",
            db.data(),
            &g.f32s("grad.lora_B.weight"),
            5e-5,
            1e-5,
        );
        // The base alone: x W_dequant^T + bias, within f32 summation-order error.
        let y_base = base.forward(&Cpu, &x).unwrap();
        let dense = Cpu
            .linear(&x, &g.tensor("W_dequant"), Some(&g.tensor("bias")))
            .unwrap();
        assert_close("base y vs dense", y_base.data(), dense.data(), 1e-6, 1e-6);
    }
}
