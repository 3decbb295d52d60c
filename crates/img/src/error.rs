//! The error type of `strata-img`: every failure a subcommand reports, printed by `main`
//! as one line `strata-img: <message>` and mapped to the exit code qemu-img would use.

/// A subcommand failure.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A message in qemu-img's wording; exit code 1.
    #[error("{0}")]
    Msg(String),
    /// A message with a specific exit code (compare uses 2 and 4, check uses 63).
    #[error("{msg}")]
    Code {
        /// The message to print.
        msg: String,
        /// The exit code.
        code: i32,
    },
    /// An error from the image library; exit code 1.
    #[error(transparent)]
    Image(#[from] strata_image::Error),
}

impl CliError {
    /// A message error with exit code 1.
    pub fn msg(m: impl Into<String>) -> Self {
        CliError::Msg(m.into())
    }

    /// A message error with a specific exit code.
    pub fn code(m: impl Into<String>, code: i32) -> Self {
        CliError::Code {
            msg: m.into(),
            code,
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Code { code, .. } => *code,
            _ => 1,
        }
    }

    /// Prefixes the message with `ctx: ` (e.g. the file name, as qemu-img create does).
    pub fn context(self, ctx: &str) -> Self {
        let code = self.exit_code();
        CliError::Code {
            msg: format!("{ctx}: {self}"),
            code,
        }
    }
}

/// The result type of subcommands: the exit code on success.
pub type CliResult<T> = Result<T, CliError>;

/// Removes Rust's " (os error N)" suffixes so that messages read like `strerror`.
pub fn clean_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(pos) = rest.find(" (os error ") {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos + " (os error ".len()..];
        match tail.find(')') {
            Some(end) if tail[..end].chars().all(|c| c.is_ascii_digit() || c == '-') => {
                rest = &tail[end + 1..];
            }
            _ => {
                out.push_str(" (os error ");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_os_error_suffix() {
        assert_eq!(
            clean_message("Could not open 'x': No such file or directory (os error 2)"),
            "Could not open 'x': No such file or directory"
        );
        assert_eq!(clean_message("a (os error x) b"), "a (os error x) b");
    }
}
