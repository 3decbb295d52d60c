//! Errors of the block graph, carrying the QMP error class QEMU reports for them.

/// QMP error classes the block layer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Everything without a more specific class.
    GenericError,
    /// A named device or node does not exist (used where QEMU uses it).
    DeviceNotFound,
    /// A block job does not exist.
    DeviceNotActive,
}

impl ErrorClass {
    /// The class name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

/// An error from the block graph: a QMP class and QEMU's message text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct BlockError {
    /// The QMP error class.
    pub class: ErrorClass,
    /// The human-readable description.
    pub desc: String,
    /// The operating-system error behind it, if any (for guests and job events).
    pub errno: Option<i32>,
}

impl BlockError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        BlockError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
            errno: None,
        }
    }

    /// A `DeviceNotFound` error.
    pub fn not_found(desc: impl Into<String>) -> Self {
        BlockError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
            errno: None,
        }
    }
}

impl From<strata_image::Error> for BlockError {
    fn from(e: strata_image::Error) -> Self {
        let errno = e.os_errno();
        BlockError {
            class: ErrorClass::GenericError,
            desc: e.to_string(),
            errno,
        }
    }
}

/// The C library's text for an errno ("Input/output error"), as QEMU reports job errors.
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The result type of the block layer.
pub type BlockResult<T> = Result<T, BlockError>;
