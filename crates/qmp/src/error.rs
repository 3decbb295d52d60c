//! QMP errors: the error classes of QEMU's `qapi/error.json` and the error
//! value a command handler returns.

use std::fmt;

/// The `class` member of a QMP error response (`QapiErrorClass` in QEMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Most errors.
    GenericError,
    /// The requested command does not exist (or is not allowed yet).
    CommandNotFound,
    /// A device exists but has no medium / is not active.
    DeviceNotActive,
    /// The requested device (or node) does not exist.
    DeviceNotFound,
    /// KVM lacks a capability (kept for completeness).
    KVMMissingCap,
}

impl ErrorClass {
    /// The wire name of the class.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as QMP reports it: `{"class": ..., "desc": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable description (QEMU's exact text where one exists).
    pub desc: String,
}

impl QmpError {
    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `DeviceNotActive` error.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }
}
