//! Every `kernels/*.cu` compiles with NVRTC for sm_80 and sm_90, and (when `ptxas` is found on
//! PATH or in `LORAFUSE_PTXAS`) the PTX assembles with `ptxas -arch=sm_80` and `-arch=sm_90`.
//!
//! Needs only libnvrtc (no GPU). Without it the test prints why and passes, unless
//! `LORAFUSE_REQUIRE` contains `nvrtc`, which turns the absence into a failure. A missing
//! `ptxas` is likewise a failure under `LORAFUSE_REQUIRE=nvrtc`.
#![cfg(feature = "cuda")]

mod common;

use lorafuse::backend::cuda::kernels;
use std::path::PathBuf;
use std::process::Command;

fn ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LORAFUSE_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("ptxas"))
        .find(|p| p.is_file())
}

/// Every .cu file in kernels/ must be registered in `kernels::SOURCES` (an unregistered file
/// would never be compiled or tested).
#[test]
fn every_cu_file_is_registered() {
    // LORAFUSE_REPO_DIR: the checkout when the binary runs elsewhere (scripts/gpu-check.sh).
    let root = std::env::var_os("LORAFUSE_REPO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let dir = root.join("kernels");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("kernels/ exists")
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            if p.extension()? != "cu" {
                return None;
            }
            Some(p.file_stem()?.to_string_lossy().into_owned())
        })
        .collect();
    files.sort();
    let mut known: Vec<String> = kernels::SOURCES
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    known.sort();
    assert_eq!(files, known, "kernels/*.cu and kernels::SOURCES differ");
    for (name, src) in kernels::SOURCES {
        let on_disk = std::fs::read_to_string(dir.join(format!("{name}.cu"))).unwrap();
        assert_eq!(&on_disk, src, "{name}.cu embedded copy is stale");
    }
}

#[test]
fn kernels_compile_with_nvrtc_and_assemble_with_ptxas() {
    if !kernels::nvrtc_available() {
        let msg = "libnvrtc not found: source scripts/cuda-env.sh (or put a CUDA 13 libnvrtc on \
                   LD_LIBRARY_PATH)";
        common::skip_or_fail("nvrtc", &format!("cuda_compile: {msg}"));
        return;
    }
    eprintln!("NVRTC include dir: {:?}", kernels::include_dir());
    let ptxas = ptxas();
    if ptxas.is_none() {
        common::skip_or_fail(
            "nvrtc",
            "cuda_compile: ptxas not found (PATH or LORAFUSE_PTXAS): PTX is compiled, not assembled",
        );
    }
    let tmp = std::env::temp_dir().join(format!("lorafuse-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut failures = Vec::new();
    let mut assembled = 0;
    for (name, _) in kernels::SOURCES {
        for sm in ["80", "90"] {
            let ptx = match kernels::compile_ptx(name, &format!("compute_{sm}")) {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("{name}.cu sm_{sm}: {e}"));
                    continue;
                }
            };
            assert!(
                ptx.contains(".entry"),
                "{name}.cu sm_{sm}: PTX without any kernel entry"
            );
            if let Some(ptxas) = &ptxas {
                let file = tmp.join(format!("{name}-sm{sm}.ptx"));
                std::fs::write(&file, &ptx).unwrap();
                let out = Command::new(ptxas)
                    .arg(format!("-arch=sm_{sm}"))
                    .arg("-o")
                    .arg(tmp.join(format!("{name}-sm{sm}.cubin")))
                    .arg(&file)
                    .output()
                    .expect("ptxas runs");
                if out.status.success() {
                    assembled += 1;
                } else {
                    failures.push(format!(
                        "ptxas -arch=sm_{sm} {name}.ptx:\n{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    eprintln!(
        "compiled {} modules for sm_80 and sm_90; assembled {assembled} PTX files",
        kernels::SOURCES.len()
    );
}

/// Every entry point that the Rust side launches exists in the PTX of its module, in all three
/// dtypes, so a renamed kernel fails here rather than at run time on a GPU.
#[test]
fn launched_entry_points_exist() {
    if !kernels::nvrtc_available() {
        common::skip_or_fail("nvrtc", "launched_entry_points_exist: libnvrtc not found");
        return;
    }
    let typed: &[(&str, &[&str])] = &[
        (
            "lora",
            &[
                "adapter_expand",
                "shrink_small",
                "linear_decode",
                "scale_rows",
                "scale_rc_from_f32",
                "scale_rc_to_f32",
                "lowrank_merge",
            ],
        ),
        (
            "dora",
            &[
                "row_sq_norms",
                "dora_norm_finish",
                "dora_bwd_scale",
                "dora_dm_finish",
            ],
        ),
        ("vera", &["lowrank_scale_grads"]),
        ("multi_lora", &["multi_shrink", "multi_expand"]),
        (
            "adalora",
            &[
                "adalora_update_ipt",
                "adalora_triplet_scores",
                "adalora_kthvalue",
                "adalora_rank_mask",
                "adalora_apply_mask",
                "adalora_orth_gram",
                "adalora_orth_total",
            ],
        ),
        (
            "nf4",
            &[
                "nf4_dequantize",
                "nf4_gemv",
                "nf4_row_sq_norms",
                "nf4_quantize",
            ],
        ),
        (
            "model",
            &[
                "gather_rows",
                "scatter_add_rows",
                "rmsnorm",
                "rmsnorm_bwd",
                "rmsnorm_dw",
                "rope",
                "attention_fwd",
                "attention_bwd_delta",
                "attention_bwd_dq",
                "attention_bwd_dkdv",
                "attention_cached_fwd",
                "swiglu",
                "swiglu_bwd",
                "cross_entropy",
                "cross_entropy_stats",
            ],
        ),
        (
            "optim",
            &["axpy", "scale", "sum_squares", "add_f32", "adamw"],
        ),
    ];
    for (module, names) in typed {
        let ptx = kernels::compile_ptx(module, "compute_80").unwrap();
        for n in *names {
            for sfx in ["f32", "f16", "bf16"] {
                let entry = format!(".entry {n}_{sfx}(");
                assert!(ptx.contains(&entry), "{module}.cu lacks {n}_{sfx}");
            }
        }
    }
    let nf4 = kernels::compile_ptx("nf4", "compute_80").unwrap();
    assert!(nf4.contains(".entry nf4_double_quant("));
}
