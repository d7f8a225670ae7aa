//! The CUDA C++ sources in `kernels/` and their run-time compilation with NVRTC.
//!
//! Each `kernels/*.cu` file is embedded in the binary; `#include "common.cuh"` is replaced by
//! that file's text before compiling, so NVRTC needs an include path only for the toolkit's
//! `cuda_fp16.h` / `cuda_bf16.h`. That path is taken from `LORAFUSE_CUDA_INCLUDE`, else
//! `CUDA_HOME`/`CUDA_PATH`, else the `include/` folder next to a `libnvrtc.so*` found on
//! `LD_LIBRARY_PATH` (the layout of the `nvidia-cuda-nvrtc` pip wheel and of the toolkit), else
//! `/usr/local/cuda/include`.
//!
//! Compiled PTX is cached on disk per compute capability and per hash of (source, options):
//! `$LORAFUSE_CACHE/ptx/` or `~/.cache/lorafuse/ptx/`, written atomically (temp file + rename),
//! so a second process start skips NVRTC. The source's hash is computed by build.rs
//! ([`HASHES`]), not at run time.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

// `COMMON`, `SOURCES` and `HASHES`, written by build.rs from `kernels/`.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The hex sha256 of [`source`]`(name)`, computed at build time. Errors: an unknown module.
pub fn source_hash(name: &str) -> Result<&'static str> {
    HASHES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, h)| h)
        .ok_or_else(|| Error::arg("kernel module", format!("no kernels/{name}.cu")))
}

/// The source of module `name` with `common.cuh` pasted in. Errors: an unknown module.
pub fn source(name: &str) -> Result<String> {
    let (_, src) = SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| Error::arg("kernel module", format!("no kernels/{name}.cu")))?;
    Ok(src.replace("#include \"common.cuh\"", COMMON))
}

fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda".into(),
        msg: msg.into(),
    }
}

/// True when a `libnvrtc` shared library can be loaded on this machine.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

fn has_headers(dir: &Path) -> bool {
    dir.join("cuda_fp16.h").is_file() && dir.join("cuda_bf16.h").is_file()
}

/// The folder holding `cuda_fp16.h` and `cuda_bf16.h` for NVRTC, if one is found (see the
/// module docs for the search order).
pub fn include_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LORAFUSE_CUDA_INCLUDE") {
        let d = PathBuf::from(d);
        if has_headers(&d) {
            return Some(d);
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            let d = PathBuf::from(d).join("include");
            if has_headers(&d) {
                return Some(d);
            }
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        for dir in std::env::split_paths(&paths) {
            let has_nvrtc = std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("libnvrtc.so"))
                })
                .unwrap_or(false);
            if has_nvrtc
                && let Some(parent) = dir.parent()
                && has_headers(&parent.join("include"))
            {
                return Some(parent.join("include"));
            }
        }
    }
    let d = PathBuf::from("/usr/local/cuda/include");
    has_headers(&d).then_some(d)
}

/// NVRTC options for a virtual architecture such as `compute_90`.
fn options(arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    if let Some(inc) = include_dir() {
        o.push(format!("--include-path={}", inc.display()));
    }
    o
}

/// Compiles module `name` (a `kernels/<name>.cu` stem) to PTX for `arch` (`compute_80`,
/// `compute_90`, ...) with NVRTC. Errors: NVRTC missing, or the compile log on failure.
pub fn compile_ptx(name: &str, arch: &str) -> Result<String> {
    if !nvrtc_available() {
        return Err(err(
            "libnvrtc not found (install the nvidia-cuda-nvrtc wheel or the CUDA toolkit and \
             put its lib folder on LD_LIBRARY_PATH)",
        ));
    }
    let src = source(name)?;
    let opts = cudarc::nvrtc::CompileOptions {
        options: options(arch),
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let res = std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(&src, opts))
        .map_err(|_| err(format!("NVRTC panicked compiling kernels/{name}.cu")))?;
    match res {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, options, .. }) => Err(err(format!(
            "NVRTC failed on kernels/{name}.cu with {options:?}:\n{}",
            log.to_string_lossy()
        ))),
        Err(e) => Err(err(format!("NVRTC failed on kernels/{name}.cu: {e}"))),
    }
}

/// The PTX cache folder: `$LORAFUSE_CACHE/ptx` or `~/.cache/lorafuse/ptx`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LORAFUSE_CACHE") {
        return Some(PathBuf::from(d).join("ptx"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lorafuse/ptx"))
}

/// The cache file of module `name` for `arch`, named by a hash of the source's hash
/// ([`source_hash`]) and the options. Errors: an unknown module.
fn cache_path(name: &str, arch: &str) -> Result<Option<PathBuf>> {
    let Some(dir) = cache_dir() else {
        return Ok(None);
    };
    let mut h = Sha256::new();
    h.update(source_hash(name)?.as_bytes());
    for o in options(arch) {
        h.update(o.as_bytes());
        h.update([0u8]);
    }
    let hex: String = h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Some(dir.join(format!("{name}-{arch}-{hex}.ptx"))))
}

/// PTX of module `name` for `arch`, from the disk cache or compiled (and then cached; a cache
/// that cannot be written is not an error). `fresh` skips reading the cache.
pub(crate) fn cached_ptx(name: &str, arch: &str, fresh: bool) -> Result<String> {
    let path = cache_path(name, arch)?;
    if !fresh
        && let Some(p) = &path
        && let Ok(ptx) = std::fs::read_to_string(p)
    {
        return Ok(ptx);
    }
    let ptx = compile_ptx(name, arch)?;
    if let Some(p) = &path
        && let Some(dir) = p.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            p.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        if std::fs::write(&tmp, &ptx).is_ok() && std::fs::rename(&tmp, p).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash build.rs embedded is the sha256 of the source as [`source`] builds it, for
    /// every module, and the tables list the same modules in the same order.
    #[test]
    fn embedded_hashes_match_sources() {
        assert_eq!(SOURCES.len(), HASHES.len());
        for ((name, _), (hname, hash)) in SOURCES.iter().zip(HASHES) {
            assert_eq!(name, hname);
            let hex: String = Sha256::digest(source(name).unwrap().as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(*hash, hex, "kernels/{name}.cu");
        }
        assert!(source_hash("no_such_module").is_err());
    }
}
