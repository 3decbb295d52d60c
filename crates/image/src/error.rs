//! The error type of `strata-image`: every failure a format driver or the file
//! protocol can report, worded so that a command-line tool can print it as one line.

use std::io;

/// Errors from storage nodes and format drivers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error from the operating system, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done when the error happened.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The image is malformed: a header field, a table or an entry is invalid.
    #[error("{0}")]
    Corrupt(String),
    /// The image uses a feature this implementation refuses to open.
    #[error("{0}")]
    Unsupported(String),
    /// The caller asked for something impossible (a bad option, an out-of-range request).
    #[error("{0}")]
    InvalidArgument(String),
    /// A write was attempted on a read-only node.
    #[error("Block node is read-only")]
    ReadOnly,
    /// The image ran out of space in some bounded structure (L1 table, refcount table).
    #[error("{0}")]
    NoSpace(String),
}

impl Error {
    /// Wraps an `io::Error` with a description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A malformed-image error.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }

    /// An invalid-argument error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// An unsupported-feature error.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }

    /// The operating system's errno, for errors that came from a system call.
    pub fn os_errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            Error::NoSpace(_) => Some(libc::ENOSPC),
            _ => None,
        }
    }

    /// The errno behind this error, where there is one (used for EINVAL/ENOSPC policies).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            Error::NoSpace(_) => Some(libc::ENOSPC),
            Error::ReadOnly => Some(libc::EPERM),
            Error::InvalidArgument(_) => Some(libc::EINVAL),
            Error::Unsupported(_) => Some(libc::ENOTSUP),
            Error::Corrupt(_) => Some(libc::EIO),
        }
    }
}

/// The result type of `strata-image`.
pub type Result<T> = std::result::Result<T, Error>;
