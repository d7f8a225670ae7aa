//! Validation of the WGSL shaders with naga (the front end and validator wgpu runs), each
//! shader composed as the wgpu backend composes it at run time:
//!
//! - a shader in [`REDUCE_USERS`] behind each prelude of [`PRELUDES`], joined by a newline
//!   (`Ctx::reduce_kernel`); every other shader as it is (`Ctx::kernel`); each prelude alone;
//! - plus, for every composition, its f16 variants ([`f16_variant`]): each array read through
//!   an `ld_` loader made f16 alone, and all of them together.
//!
//! A composition is parsed and validated with the capabilities the device has when it runs:
//! `SUBGROUP` for the subgroup prelude, `SHADER_FLOAT16` for an f16 variant, nothing else.
//! Errors name the file the line is in (the shader or the prelude), the line and column there,
//! and naga's message.
//!
//! Pure std + naga: `build.rs` and `tests/shader_check.rs` include this file with `#[path]`,
//! beside `compose.rs` (the composition rules the backend itself runs, so the two cannot drift).

use super::compose::{f16_variant, with_prelude};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use std::fmt;
use std::path::Path;

/// The reduction preludes (`shaders/reduce.wgsl`, `shaders/reduce_subgroup.wgsl` in
/// `Ctx::reduce_kernel`) and the capabilities each needs.
pub const PRELUDES: &[(&str, Capabilities)] = &[
    ("reduce.wgsl", Capabilities::empty()),
    ("reduce_subgroup.wgsl", Capabilities::SUBGROUP),
];

/// The shaders the host compiles behind a reduction prelude (`Ctx::reduce_kernel` in ops.rs
/// for norm and loss, adapters.rs, adalora.rs); every other shader is compiled as it is.
pub const REDUCE_USERS: &[&str] = &["adalora.wgsl", "adapters.wgsl", "loss.wgsl", "norm.wgsl"];

/// A shader that naga rejects, located in the file that holds the offending line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShaderError {
    /// The file, as `shaders/NAME.wgsl` (the folder's name, then the file's).
    pub file: String,
    /// 1-based line in `file`; 0 where naga gives no location.
    pub line: u32,
    /// 1-based column (in bytes) in that line; 0 where naga gives no location.
    pub column: u32,
    /// The composition that failed, e.g. `shaders/norm.wgsl behind shaders/reduce.wgsl`.
    pub variant: String,
    /// naga's message (with its chain of causes).
    pub message: String,
    /// The text of the offending line (empty where there is no location).
    pub text: String,
}

impl fmt::Display for ShaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {} (in {})", self.file, self.message, self.variant)
        } else {
            write!(
                f,
                "{}:{}:{}: {} (in {})\n{:>5} | {}",
                self.file, self.line, self.column, self.message, self.variant, self.line, self.text
            )
        }
    }
}

/// What [`check_dir`] did: the compositions it validated and the errors it found (one per
/// distinct file, line, column and message).
#[derive(Debug, Default)]
pub struct Report {
    /// One description per composition validated.
    pub checked: Vec<String>,
    /// Empty when every composition is valid.
    pub errors: Vec<ShaderError>,
}

/// The storage arrays of `src` that [`f16_variant`] can make f16 (those with an `ld_` loader).
pub fn f16_arrays(src: &str) -> Vec<String> {
    src.lines()
        .filter_map(|l| l.trim().strip_prefix("fn ld_")?.split_once('('))
        .map(|(name, _)| name.to_string())
        .filter(|n| f16_variant(src, &[n]).is_ok())
        .collect()
}

/// The lines a prelude takes in front of the shader (the prelude and the joining newline).
fn prelude_lines(prelude: &str) -> u32 {
    prelude.matches('\n').count() as u32 + 1
}

/// Parses and validates one composition: `src` (from `file`) behind `prelude` (a file name and
/// its text), as the f16 variant of `f16` (none: the plain one), with the capabilities `caps`
/// (plus `SHADER_FLOAT16` for an f16 variant). Returns a description of the composition and
/// its error, mapped back to the file that holds the offending line.
fn check_one(
    (file, src): (&str, &str),
    prelude: Option<(&str, &str)>,
    f16: &[&str],
    mut caps: Capabilities,
) -> (String, Result<(), ShaderError>) {
    let mut variant = file.to_string();
    let mut source = match prelude {
        Some((pfile, ptext)) => {
            variant += &format!(" behind {pfile}");
            with_prelude(ptext, src)
        }
        None => src.to_string(),
    };
    let header = u32::from(!f16.is_empty());
    if !f16.is_empty() {
        variant += &format!(" with f16 {}", f16.join(", "));
        caps |= Capabilities::SHADER_FLOAT16;
        source = match f16_variant(&source, f16) {
            Ok(s) => s,
            Err(message) => {
                let e = ShaderError {
                    file: file.to_string(),
                    line: 0,
                    column: 0,
                    variant: variant.clone(),
                    message,
                    text: String::new(),
                };
                return (variant, Err(e));
            }
        };
    }
    let mut options = naga::front::wgsl::Options::new();
    options.capabilities = caps;
    let found = match naga::front::wgsl::Frontend::new_with_options(options).parse(&source) {
        Err(e) => {
            let mut message = e.message().to_string();
            for (_, label) in e.labels() {
                if !message.contains(label) {
                    message += &format!("; {label}");
                }
            }
            Some((e.location(&source), message))
        }
        Ok(module) => match Validator::new(ValidationFlags::all(), caps).validate(&module) {
            Err(e) => {
                let mut message = e.as_inner().to_string();
                let mut cause = std::error::Error::source(e.as_inner());
                while let Some(c) = cause {
                    message += &format!(": {c}");
                    cause = c.source();
                }
                // The narrowest span: the expression or statement rather than its function.
                let spans = e.spans().map(|(s, _)| s).filter(|s| s.is_defined());
                let loc = spans.map(|s| s.location(&source)).min_by_key(|l| l.length);
                Some((loc, message))
            }
            Ok(_) => None,
        },
    };
    let Some((loc, message)) = found else {
        return (variant, Ok(()));
    };
    let (line, column) = loc.map_or((0, 0), |l| (l.line_number, l.line_position));
    let text = match line {
        0 => "",
        l => source.lines().nth(l as usize - 1).unwrap_or(""),
    };
    // Map the line of the composed source back into the file that holds it.
    let (file, line) = match prelude {
        _ if line == 0 => (file.to_string(), 0),
        _ if line <= header => (format!("{file} (its `enable f16;` line)"), line),
        Some((pfile, ptext)) if line <= header + prelude_lines(ptext) => {
            (pfile.to_string(), line - header)
        }
        Some((_, ptext)) => (file.to_string(), line - header - prelude_lines(ptext)),
        None => (file.to_string(), line - header),
    };
    let e = ShaderError {
        file,
        line,
        column,
        variant: variant.clone(),
        message,
        text: text.to_string(),
    };
    (variant, Err(e))
}

/// Validates every `*.wgsl` file of `dir` in each composition the wgpu backend builds from it
/// (see the module docs). Files are named `DIR/NAME.wgsl` after the folder's own name.
///
/// Errors: `dir` or a file in it cannot be read (a shader naga rejects is in
/// [`Report::errors`], not an `Err`).
pub fn check_dir(dir: &Path) -> std::io::Result<Report> {
    let folder = dir
        .file_name()
        .map_or_else(|| "shaders".into(), |n| n.to_string_lossy().into_owned());
    let mut shaders = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wgsl") {
            let name = path.file_name().unwrap_or_default();
            let name = name.to_string_lossy().into_owned();
            shaders.push((name, std::fs::read_to_string(&path)?));
        }
    }
    shaders.sort();
    let mut report = Report::default();
    let mut record = |(what, res): (String, Result<(), ShaderError>)| {
        report.checked.push(what);
        if let Err(e) = res {
            let key = |e: &ShaderError| (e.file.clone(), e.line, e.column, e.message.clone());
            if !report.errors.iter().any(|o| key(o) == key(&e)) {
                report.errors.push(e);
            }
        }
    };
    // Each prelude alone first; one that fails is reported once, not behind every shader.
    let mut preludes = Vec::new();
    for &(pname, caps) in PRELUDES {
        if let Some((_, ptext)) = shaders.iter().find(|(n, _)| n == pname) {
            let pfile = format!("{folder}/{pname}");
            let (what, res) = check_one((&pfile, ptext), None, &[], caps);
            if res.is_ok() {
                preludes.push((pfile, ptext.as_str(), caps));
            }
            record((what, res));
        }
    }
    for (name, src) in &shaders {
        if PRELUDES.iter().any(|(p, _)| p == name) {
            continue;
        }
        let file = format!("{folder}/{name}");
        let arrays = f16_arrays(src);
        let mut sets: Vec<Vec<&str>> = vec![vec![]];
        sets.extend(arrays.iter().map(|a| vec![a.as_str()]));
        if arrays.len() > 1 {
            sets.push(arrays.iter().map(String::as_str).collect());
        }
        let behind: Vec<(Option<(&str, &str)>, Capabilities)> =
            if REDUCE_USERS.contains(&name.as_str()) {
                let p = preludes.iter();
                p.map(|(f, t, c)| (Some((f.as_str(), *t)), *c)).collect()
            } else {
                vec![(None, Capabilities::empty())]
            };
        for &(prelude, caps) in &behind {
            for set in &sets {
                record(check_one((&file, src), prelude, set, caps));
            }
        }
    }
    Ok(report)
}
