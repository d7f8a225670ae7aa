//! Writing a file so that an interrupted write never leaves a half-written file at its path:
//! the bytes go to a temporary sibling (same folder, so the rename is atomic), are synced, and
//! are renamed over the target; the temporary is removed on any failure.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The temporary sibling of `path` an atomic write uses: `.tmp-<pid>-<name>`, the extension
/// kept last (plotters picks the image format from it).
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".tmp-{}-{name}", std::process::id()))
}

/// Writes `bytes` to `path` atomically. Errors: the I/O error, naming the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        use std::io::Write;
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))?;
        f.sync_all().map_err(|e| Error::io(tmp, e))
    })
}

/// Lets `write` create the file at the temporary sibling of `path` (for writers that want a
/// path, such as the PNG encoder), then renames it into place. Errors: `write`'s, or the
/// rename's naming the path; the temporary is removed either way.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let res =
        write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
