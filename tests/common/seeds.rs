//! The golden cases of `golden/seeds/` (transformers' tiny Llama, PEFT's and the `adapters`
//! library's files): reading a case's `io.safetensors`, its batch, the base model, PEFT's names.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lorafuse::backend::Backend;
use lorafuse::io::hf::HfFolder;
use lorafuse::io::load::llama_from_hf;
use lorafuse::io::peft::{apply_adapter, load_adapter};
use lorafuse::model::llama::{Llama, PackedBatch};
use safetensors::{Dtype, SafeTensors};

use super::common;

/// `golden/seeds/<case>/`, printed as the folder being checked.
pub fn case_dir(case: &str) -> PathBuf {
    let dir = common::golden_dir().join("seeds").join(case);
    assert!(
        dir.is_dir(),
        "golden folder {} is missing (set LORAFUSE_GOLDEN_DIR)",
        dir.display()
    );
    println!("checking golden folder {}", dir.display());
    dir
}

/// Every tensor of a safetensors file as f32 (ints converted), with its metadata.
pub struct Io {
    pub path: PathBuf,
    pub t: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: HashMap<String, String>,
}

pub fn read_io(path: &Path) -> Io {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    let mut t = HashMap::new();
    for (name, v) in st.tensors() {
        let d = v.data();
        let data: Vec<f32> = match v.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            other => panic!("{}: {name} has dtype {other:?}", path.display()),
        };
        t.insert(name, (v.shape().to_vec(), data));
    }
    Io {
        path: path.to_path_buf(),
        t,
        meta,
    }
}

impl Io {
    pub fn get(&self, k: &str) -> &(Vec<usize>, Vec<f32>) {
        self.t
            .get(k)
            .unwrap_or_else(|| panic!("{}: no tensor `{k}`", self.path.display()))
    }
    /// The batch of `input_ids`, `attention_mask`, `labels` without the padding, and each row's
    /// length.
    pub fn batch(&self) -> (PackedBatch, Vec<usize>) {
        let (shape, ids) = self.get("input_ids");
        let (_, mask) = self.get("attention_mask");
        let labels = self.t.get("labels").map(|x| &x.1);
        let (b, t) = (shape[0], shape[1]);
        let mut ex = Vec::new();
        let mut lens = Vec::new();
        for r in 0..b {
            let n = (0..t).filter(|&j| mask[r * t + j] > 0.5).count();
            let row_ids: Vec<u32> = (0..n).map(|j| ids[r * t + j] as u32).collect();
            let row_lab: Vec<i32> = (0..n)
                .map(|j| labels.map_or(-100, |l| l[r * t + j] as i32))
                .collect();
            ex.push((row_ids, row_lab));
            lens.push(n);
        }
        let batch = PackedBatch::from_examples(ex.iter().map(|(i, l)| (&i[..], &l[..]))).unwrap();
        (batch, lens)
    }
}

pub fn base_model<B: Backend>(be: &B) -> Llama<B> {
    let dir = case_dir("base");
    let mut f = HfFolder::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    llama_from_hf(be, &mut f, None).unwrap()
}

pub fn upload<B: Backend>(be: &B, io: &Io, key: &str) -> lorafuse::backend::Tensor<B> {
    let (s, d) = io.get(key);
    be.upload(d, s).unwrap()
}

/// PEFT's in-memory name of a lorafuse trainable: `base_model.model.` + the path, with the
/// adapter name `default` where PEFT's module dict puts it.
pub fn peft_name(name: &str) -> String {
    if name == "score.weight" {
        return "base_model.model.score.modules_to_save.default.weight".into();
    }
    if let Some(rest) = name.strip_prefix("prompt_encoder.") {
        return format!("prompt_encoder.default.{rest}");
    }
    for (sfx, with) in [
        (".ia3_l", ".ia3_l.default"),
        (".beft_bias", ".beft_bias.default"),
        (
            ".ln_tuning_layers.weight",
            ".ln_tuning_layers.default.weight",
        ),
        (".lora_A.weight", ".lora_A.default.weight"),
        (".lora_B.weight", ".lora_B.default.weight"),
    ] {
        if let Some(p) = name.strip_suffix(sfx) {
            return format!("base_model.model.{p}{with}");
        }
    }
    panic!("no PEFT name for `{name}`")
}

/// Compares `grads` (in the order of `names`, the model's trainable names) with the case's
/// `grad.*` tensors, `name_of` mapping a lorafuse name to the golden one: as many tensors as the
/// case has gradients, each within `rtol` of the largest entry of the golden tensor (or
/// `atol_floor`, for gradients that are zero in exact arithmetic).
pub fn check_grads<B: Backend>(
    be: &B,
    io: &Io,
    names: &[String],
    grads: &[lorafuse::backend::Tensor<B>],
    name_of: &dyn Fn(&str) -> String,
    rtol: f32,
    atol_floor: f32,
) {
    let path = io.path.display().to_string();
    let golden_grads = io.t.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        names.len(),
        golden_grads,
        "{path}: {} trainable tensors, the case has {golden_grads} gradients: {names:?}",
        names.len()
    );
    for (name, g) in names.iter().zip(grads) {
        let gname = format!("grad.{}", name_of(name));
        let (gs, gd) = io.get(&gname);
        let ours = be.download(g).unwrap();
        assert_eq!(
            ours.len(),
            gd.len(),
            "{path}: {gname} has shape {gs:?}, ours {:?}",
            g.shape()
        );
        let scale = gd.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let err = ours
            .iter()
            .zip(gd)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= (rtol * scale).max(atol_floor),
            "{path}: {gname} differs by {err} (largest entry {scale})"
        );
    }
}

/// Loads `<case>/` (the folder PEFT saved) onto the base model, then sets the trainable
/// tensors to the case's `param.*` values (the saved folder has the prompt's output only).
pub fn peft_case<B: Backend>(be: &B, case: &str) -> (Llama<B>, Io) {
    let dir = case_dir(case);
    let io = read_io(&dir.join("io.safetensors"));
    let mut model = base_model(be);
    let (cfg, tensors) = load_adapter(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    apply_adapter(be, &mut model, &cfg, &tensors)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    (model, io)
}
