//! Exit codes, and the one place errors become them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the command ran and found a problem: `inspect verify` found corruption (or `inspect dump` a damaged batch, or with `--records` a record that does not decode), a `group seek` was refused |
//! | 2 | usage error or invalid input (bad flag, bad offset spec, malformed input line) |
//! | 3 | the broker could not be reached (connection refused, timeout, TLS handshake) |
//! | 4 | the broker refused the request (unknown topic, already exists, not authorized, …) |
//! | 130 | interrupted by Ctrl-C (`replay` prints where to resume first) |
//!
//! A closed stdout (`spool tail t | head`) is not an error: the command stops and exits 0.

use std::process::ExitCode;

/// An error with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// Bad flags or input: exit 2.
    #[error("{0}")]
    Usage(String),
    /// The command found a problem it reports (already printed): exit 1.
    #[error("{0}")]
    Problem(String),
    /// From the client library: 3 or 4 depending on the kind.
    #[error(transparent)]
    Client(#[from] spool_client::Error),
    /// Anything else (I/O, files): exit 2.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Other(e.into())
    }
}

/// Shorthand for a usage error.
pub(crate) fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

pub(crate) type CliResult<T = ()> = Result<T, CliError>;

impl CliError {
    fn is_broken_pipe(&self) -> bool {
        let io = match self {
            CliError::Other(e) => e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()),
            _ => None,
        };
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The process exit code.
    pub(crate) fn code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Other(_) => 2,
            CliError::Problem(_) => 1,
            CliError::Client(e) => client_code(e),
        }
    }
}

fn client_code(e: &spool_client::Error) -> u8 {
    use spool_client::Error as E;
    match e {
        E::Connect { .. } | E::Unavailable { .. } | E::Timeout(_) | E::ShuttingDown { .. } => 3,
        E::Config(_) | E::InvalidAddress { .. } => 2,
        _ => 4,
    }
}

/// Prints `e` on stderr (unless stdout was closed) and returns its exit code.
pub(crate) fn report(e: &CliError) -> ExitCode {
    if e.is_broken_pipe() {
        return ExitCode::SUCCESS;
    }
    match e {
        CliError::Other(e) => status!("spool: {}", chain(e.chain())),
        e => status!("spool: {e}"),
    }
    ExitCode::from(e.code())
}

/// An error and its causes joined by ": ", leaving out a cause whose text the error before it
/// already showed (many errors print their source in their own message, as the engine's
/// `open FILE: No such file or directory (os error 2)` does, and also return it as source).
pub(crate) fn chain<'a>(
    errors: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for e in errors {
        let text = e.to_string();
        if last.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        last = text;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_says_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let io_text = io.to_string();
        let e = anyhow::Error::new(io).context(format!("open /x: {io_text}"));
        let e = e.context("inspecting /x");
        assert_eq!(
            chain(e.chain()),
            format!("inspecting /x: open /x: {io_text}")
        );
    }
}
