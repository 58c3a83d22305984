//! The one error type of the library. Every variant that concerns a file names it, so that the
//! binary can print a single line a user can act on.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are malformed or inconsistent.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A model, tensor type or option that affq does not support.
    #[error("{0}")]
    Unsupported(String),
    /// A command-line plan that cannot be carried out (bad flag values, conflicting options).
    #[error("{0}")]
    Usage(String),
    /// A failure inside a tensor operation; not the user's fault.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Anything else that happens at run time (e.g. a numerical failure).
    #[error("{0}")]
    Runtime(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// Exit code contract (README "Exit codes"): 2 for bad input or usage, 1 for run-time failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound
                | std::io::ErrorKind::InvalidData
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::PermissionDenied
                | std::io::ErrorKind::AlreadyExists => 2,
                _ => 1,
            },
            Error::Format { .. } | Error::Unsupported(_) | Error::Usage(_) => 2,
            Error::Candle(_) | Error::Runtime(_) => 1,
        }
    }
}
