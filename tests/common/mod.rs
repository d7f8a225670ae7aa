//! Helpers shared by the integration tests: where the golden files and the real model are, and
//! how a test that lacks an optional resource skips (loudly) or fails.
//!
//! Environment:
//! * `LORAFUSE_GOLDEN_DIR`: the golden folder (default `../shared/golden` beside the crate).
//! * `LORAFUSE_MODEL`: path of the SmolLM2-135M-Instruct GGUF for the tests that need it.
//! * `LORAFUSE_REQUIRE`: comma/space separated resources whose absence fails a test instead of
//!   skipping it (`model`, `cuda`, `wgpu` ...).

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

/// The golden folder: `$LORAFUSE_GOLDEN_DIR`, else `<crate>/../shared/golden`.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("LORAFUSE_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/golden"),
    }
}

/// `golden_dir()/rel`, printed as the file being checked; panics with the path if it is missing
/// (golden files ship with the repository, so a missing one is a failure, not a skip).
pub fn golden_file(rel: &str) -> PathBuf {
    let path = golden_dir().join(rel);
    assert!(
        path.is_file(),
        "golden file {} is missing (set LORAFUSE_GOLDEN_DIR)",
        path.display()
    );
    println!("checking golden file {}", path.display());
    path
}

/// The real model from `$LORAFUSE_MODEL`, if it is set and names an existing file.
pub fn model_path() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("LORAFUSE_MODEL")?);
    path.is_file().then_some(path)
}

/// Whether `$LORAFUSE_REQUIRE` lists `what`.
pub fn required(what: &str) -> bool {
    std::env::var("LORAFUSE_REQUIRE")
        .map(|v| {
            v.split(|c: char| c == ',' || c.is_whitespace())
                .any(|w| w.eq_ignore_ascii_case(what))
        })
        .unwrap_or(false)
}

/// Reports that `what` is unavailable: panics if `LORAFUSE_REQUIRE` lists `what`, else prints a
/// loud `SKIP:` line. The caller returns right after.
pub fn skip_or_fail(what: &str, reason: &str) {
    if required(what) {
        panic!("LORAFUSE_REQUIRE lists `{what}` but it is unavailable: {reason}");
    }
    println!("SKIP: {reason}");
    eprintln!("SKIP: {reason}");
}

/// The real model, or `None` after [`skip_or_fail`] (`"model"`) when `LORAFUSE_MODEL` is unset
/// or does not name a file. `test` names the skipping test in the message.
pub fn model_or_skip(test: &str) -> Option<PathBuf> {
    let found = model_path();
    match &found {
        Some(p) => println!("using model {}", p.display()),
        None => {
            let why = match std::env::var_os("LORAFUSE_MODEL") {
                None => "LORAFUSE_MODEL is not set".to_string(),
                Some(p) => format!("LORAFUSE_MODEL={} is not a file", Path::new(&p).display()),
            };
            skip_or_fail(
                "model",
                &format!("{test} needs the SmolLM2 GGUF: {why} (set LORAFUSE_MODEL)"),
            );
        }
    }
    found
}
