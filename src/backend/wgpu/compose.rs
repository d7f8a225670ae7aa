//! How the wgpu backend composes a shader module from the files in `shaders/`: a reduction
//! prelude in front ([`with_prelude`]) and f16 storage for frozen weights ([`f16_variant`]).
//! Pure std: the backend (`ctx.rs`) calls these at run time, and `build.rs` validates every
//! composition with naga through the same functions (`shader_check.rs`).

/// `src` with the storage arrays `names` (each declared `var<storage, read> NAME: array<f32>;`
/// and read only through `fn ld_NAME(i: u32) -> f32 { return NAME[i]; }`) turned into
/// `array<f16>` read as f32, and `enable f16;` prepended (one line: every other line keeps its
/// number). Errors: a declaration or loader not found.
pub fn f16_variant(src: &str, names: &[&str]) -> Result<String, String> {
    let mut out = format!("enable f16;\n{src}");
    for n in names {
        let decl = format!("var<storage, read> {n}: array<f32>;");
        let load = format!("fn ld_{n}(i: u32) -> f32 {{ return {n}[i]; }}");
        if !out.contains(&decl) || !out.contains(&load) {
            return Err(format!(
                "shader has no f32 array `{n}` read through `ld_{n}` to make f16"
            ));
        }
        out = out
            .replace(&decl, &format!("var<storage, read> {n}: array<f16>;"))
            .replace(
                &load,
                &format!("fn ld_{n}(i: u32) -> f32 {{ return f32({n}[i]); }}"),
            );
    }
    Ok(out)
}

/// `src` behind the reduction prelude `prelude`, as `Ctx::reduce_kernel` joins them.
pub fn with_prelude(prelude: &str, src: &str) -> String {
    format!("{prelude}\n{src}")
}
