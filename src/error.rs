//! The one error type of lorafuse. Every fallible public function returns [`Result`].

use std::path::PathBuf;

/// Everything that can go wrong in lorafuse, each variant naming what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor had the wrong shape. `name` is the argument or file tensor name.
    #[error("shape mismatch for `{name}`: expected {expected}, got {actual:?}")]
    Shape {
        name: String,
        expected: String,
        actual: Vec<usize>,
    },
    /// An argument value is out of its valid range (r = 0, negative lr, unknown target ...).
    #[error("invalid argument `{name}`: {msg}")]
    InvalidArgument { name: String, msg: String },
    /// A tensor held NaN or Inf where finite values are required.
    #[error("non-finite value in `{name}` at flat index {index}")]
    NonFinite { name: String, index: usize },
    /// A file is malformed, truncated, or not what it claims to be.
    #[error("bad file {path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A needed tensor or metadata key is missing from a file.
    #[error("missing `{name}` in {path}")]
    Missing { path: PathBuf, name: String },
    /// A dataset could not be used (empty, malformed record with rejection requested ...).
    #[error("dataset error: {0}")]
    Data(String),
    /// The requested backend is not available on this machine.
    #[error("backend `{backend}` unavailable: {reason}")]
    BackendUnavailable { backend: String, reason: String },
    /// A backend failed while running a kernel (device lost, out of memory ...).
    #[error("backend `{backend}` failed: {msg}")]
    Backend { backend: String, msg: String },
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An I/O error, with the path it happened on.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// JSON (config or dataset) could not be parsed or written.
    #[error("JSON error in {context}: {msg}")]
    Json { context: String, msg: String },
}

/// `Result` with lorafuse's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn arg(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            msg: msg.into(),
        }
    }
    /// Shorthand for [`Error::Shape`].
    pub fn shape(name: impl Into<String>, expected: impl Into<String>, actual: &[usize]) -> Self {
        Error::Shape {
            name: name.into(),
            expected: expected.into(),
            actual: actual.to_vec(),
        }
    }
    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// Wraps an [`std::io::Error`] with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
