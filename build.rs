//! Validates every `shaders/*.wgsl` with naga, composed as the wgpu backend composes it (see
//! `src/backend/wgpu/shader_check.rs`): a shader error fails the build with its file, line and
//! naga's message. Embeds `kernels/*.cu` with the hash of each module's source (the PTX cache
//! key) in `$OUT_DIR/kernels.rs`. Never needs nvcc or a GPU.

#[path = "src/backend/wgpu/compose.rs"]
mod compose;
#[path = "src/backend/wgpu/shader_check.rs"]
mod shader_check;

use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let root = Path::new(&root);
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-changed=kernels");
    check_shaders(&root.join("shaders"));
    let code = kernels_rs(&root.join("kernels"));
    std::fs::write(Path::new(&out).join("kernels.rs"), code).expect("writing kernels.rs");
}

/// Prints every shader error naga reports and fails the build if there is one.
fn check_shaders(dir: &Path) {
    let report = shader_check::check_dir(dir).expect("reading shaders/");
    assert!(!report.checked.is_empty(), "no shaders found in shaders/");
    for e in &report.errors {
        eprintln!("error: invalid WGSL: {e}");
    }
    if !report.errors.is_empty() {
        std::process::exit(1);
    }
}

/// The text of `$OUT_DIR/kernels.rs`: `COMMON`, `SOURCES` (sorted by module name) and
/// `HASHES` (hex sha256 of each module's source with `common.cuh` pasted in).
fn kernels_rs(dir: &Path) -> String {
    let common = std::fs::read_to_string(dir.join("common.cuh")).expect("reading common.cuh");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("reading kernels/")
        .map(|e| e.expect("reading kernels/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| {
            p.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    let file =
        |n: &str| format!("include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/kernels/{n}\"))");
    let mut code = String::new();
    code +=
        "/// `common.cuh`: dtype conversions, reductions and the `LF_INST` instantiation macro.\n";
    let _ = writeln!(code, "pub const COMMON: &str = {};", file("common.cuh"));
    code +=
        "\n/// Every kernel source file, by module name (the file stem in `kernels/`), sorted.\n";
    code += "pub const SOURCES: &[(&str, &str)] = &[\n";
    for n in &names {
        let _ = writeln!(code, "    ({n:?}, {}),", file(&format!("{n}.cu")));
    }
    code += "];\n\n/// Hex sha256 of each module's source with `common.cuh` pasted in ([`source`]), by\n";
    code += "/// module name, in the order of [`SOURCES`].\n";
    code += "pub const HASHES: &[(&str, &str)] = &[\n";
    for n in &names {
        let src = std::fs::read_to_string(dir.join(format!("{n}.cu"))).expect("reading a .cu");
        let full = src.replace("#include \"common.cuh\"", &common);
        let hex: String = Sha256::digest(full.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let _ = writeln!(code, "    ({n:?}, {hex:?}),");
    }
    code += "];\n";
    code
}
