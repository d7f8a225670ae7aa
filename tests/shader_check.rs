//! The shader check build.rs runs (`src/backend/wgpu/shader_check.rs`): the shaders pass in
//! every composition the wgpu backend builds, and a broken copy of a shader is reported with
//! its file and line, also where the line sits behind a reduction prelude or an f16 header.

#[path = "../src/backend/wgpu/compose.rs"]
mod compose;
#[path = "../src/backend/wgpu/shader_check.rs"]
mod shader_check;

use std::path::{Path, PathBuf};

/// A copy of `shaders/` in a fresh temporary folder, removed on drop.
struct Copy {
    root: PathBuf,
    dir: PathBuf,
}

impl Copy {
    fn new(tag: &str) -> Copy {
        let root = std::env::temp_dir().join(format!(
            "lorafuse-shader-check-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("shaders");
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
        Copy { root, dir }
    }

    /// Inserts `line` into `file` before its second top-level function (module scope, past the
    /// file's first lines; before the function's attributes); returns the 1-based number the
    /// new line has.
    fn insert(&self, file: &str, line: &str) -> u32 {
        let path = self.dir.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        let starts = |i: usize| {
            let l: &str = lines[i];
            (l.starts_with("fn ") || l.starts_with('@'))
                && (i == 0 || !lines[i - 1].starts_with('@'))
        };
        let at = (0..lines.len())
            .filter(|&i| starts(i))
            .nth(1)
            .expect("a second top-level fn");
        lines.insert(at, line);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        at as u32 + 1
    }

    fn check(&self) -> shader_check::Report {
        shader_check::check_dir(&self.dir).unwrap()
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The single error of `report`, checked to name `file` at `line` holding `text`.
fn only_error<'a>(
    report: &'a shader_check::Report,
    file: &str,
    line: u32,
    text: &str,
) -> &'a shader_check::ShaderError {
    let shown: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(report.errors.len(), 1, "errors: {shown:#?}");
    let e = &report.errors[0];
    eprintln!("{e}");
    assert_eq!((e.file.as_str(), e.line), (file, line), "{e}");
    assert_eq!(e.text, text, "{e}");
    assert!(e.column > 0, "{e}");
    assert!(e.to_string().starts_with(&format!("{file}:{line}:")), "{e}");
    e
}

#[test]
fn unmodified_shaders_pass_in_every_composition() {
    let copy = Copy::new("clean");
    let report = copy.check();
    let shown: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
    assert!(report.errors.is_empty(), "errors: {shown:#?}");
    for what in [
        "shaders/reduce_subgroup.wgsl",
        "shaders/elementwise.wgsl",
        "shaders/matmul.wgsl with f16 a",
        "shaders/matmul.wgsl with f16 b",
        "shaders/matmul.wgsl with f16 a, b",
        "shaders/norm.wgsl behind shaders/reduce.wgsl",
        "shaders/loss.wgsl behind shaders/reduce_subgroup.wgsl",
        "shaders/adapters.wgsl behind shaders/reduce.wgsl with f16 x, y",
        "shaders/adapters.wgsl behind shaders/reduce_subgroup.wgsl with f16 y",
    ] {
        assert!(
            report.checked.iter().any(|c| c == what),
            "{what} not checked"
        );
    }
    // A reduction shader is not validated alone (it does not compile without a prelude).
    assert!(!report.checked.iter().any(|c| c == "shaders/norm.wgsl"));
    eprintln!("{} compositions valid", report.checked.len());
}

#[test]
fn broken_standalone_shader_is_reported_at_its_line() {
    let copy = Copy::new("matmul");
    let bad = "const BROKEN: f32 = ;";
    let line = copy.insert("matmul.wgsl", bad);
    let report = copy.check();
    // The plain module and its three f16 variants fail at the same place: one error.
    let e = only_error(&report, "shaders/matmul.wgsl", line, bad);
    assert!(e.message.contains("expected"), "{e}");
}

#[test]
fn undefined_name_behind_the_prelude_is_reported_in_the_shader() {
    let copy = Copy::new("norm");
    let bad = "const BROKEN: f32 = no_such_name;";
    let line = copy.insert("norm.wgsl", bad);
    let report = copy.check();
    let e = only_error(&report, "shaders/norm.wgsl", line, bad);
    assert!(e.message.contains("no_such_name"), "{e}");
    assert!(e.variant.contains("behind shaders/reduce"), "{e}");
}

#[test]
fn error_behind_prelude_and_f16_header_maps_into_the_shader() {
    let copy = Copy::new("adapters");
    // Parses, fails validation (a u32 returned as f32): located by the validator's span.
    let bad = "fn broken() -> f32 { let a = 1u; return a; }";
    let line = copy.insert("adapters.wgsl", bad);
    let report = copy.check();
    // Two preludes times three f16 variants and the plain module: all map to this line.
    let e = only_error(&report, "shaders/adapters.wgsl", line, bad);
    assert!(e.message.contains("return"), "{e}");
}

#[test]
fn error_in_a_prelude_names_the_prelude_once() {
    let copy = Copy::new("prelude");
    let bad = "const BROKEN: u32 = 1.5;";
    let line = copy.insert("reduce.wgsl", bad);
    let report = copy.check();
    only_error(&report, "shaders/reduce.wgsl", line, bad);
}

#[test]
fn subgroup_operations_need_the_subgroup_prelude() {
    // Without SUBGROUP (a standalone shader runs on devices without it) naga rejects them.
    let copy = Copy::new("subgroup");
    let bad = "fn broken(v: f32) -> f32 { return subgroupAdd(v); }";
    let line = copy.insert("elementwise.wgsl", bad);
    let report = copy.check();
    assert_eq!(report.errors.len(), 1, "{:#?}", report.errors);
    let e = &report.errors[0];
    eprintln!("{e}");
    assert_eq!(
        (e.file.as_str(), e.line),
        ("shaders/elementwise.wgsl", line),
        "{e}"
    );
}
