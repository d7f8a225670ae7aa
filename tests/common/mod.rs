//! Helpers shared by the integration tests: where the golden files and the real model are, and
//! how a test that lacks an optional resource skips (loudly) or fails.
//!
//! Environment:
//! * `LORAFUSE_GOLDEN_DIR`: the golden folder (default `tests/golden` in the repository).
//! * `LORAFUSE_MODEL`: path of the SmolLM2-135M-Instruct GGUF for the tests that need it.
//! * `LORAFUSE_REQUIRE`: comma/space separated resources whose absence fails a test instead of
//!   skipping it (`model`, `cuda`, `wgpu` ...).
//! * `LORAFUSE_SKIP_LOG`: a file every skip appends one `resource<TAB>reason` line to, so that
//!   `scripts/test.sh` can end with a summary (cargo hides the `SKIP` lines of passing tests).

#![allow(dead_code)] // each test binary uses a different subset

#[cfg(feature = "candle")]
pub mod candle;

use std::path::{Path, PathBuf};

/// The golden folder: `$LORAFUSE_GOLDEN_DIR`, else `<crate>/tests/golden`.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("LORAFUSE_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"),
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
/// loud `SKIP:` line and appends `what<TAB>reason` to `$LORAFUSE_SKIP_LOG` when it is set. The
/// caller returns right after.
pub fn skip_or_fail(what: &str, reason: &str) {
    if required(what) {
        panic!("LORAFUSE_REQUIRE lists `{what}` but it is unavailable: {reason}");
    }
    println!("SKIP: {reason}");
    eprintln!("SKIP: {reason}");
    if let Some(log) = std::env::var_os("LORAFUSE_SKIP_LOG") {
        use std::io::Write;
        // One short write per line in append mode, so parallel tests do not interleave.
        let line = format!("{what}\t{}\n", reason.replace(['\n', '\t'], " "));
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!(
                "cannot append to LORAFUSE_SKIP_LOG {}: {e}",
                Path::new(&log).display()
            );
        }
    }
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
