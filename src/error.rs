//! The crate's one error type.

use std::fmt;
use std::io;

/// Everything that can stop a proxy from starting or a connection from being served.
///
/// Variants record which side failed, so that health accounting can blame a backend and never a
/// client that went away.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the message names the file, line, field and fix.
    Config(String),
    /// A listener could not be bound.
    Bind {
        /// The address that was asked for.
        addr: String,
        /// Why the system refused it.
        source: io::Error,
    },
    /// Connecting to a backend failed or timed out.
    UpstreamConnect {
        /// The backend as configured (`host:port`).
        backend: String,
        /// Why; `TimedOut` for the connect timeout.
        source: io::Error,
    },
    /// Every backend was tried and none could be connected to.
    NoHealthyBackend {
        /// How many backends were tried.
        tried: usize,
    },
    /// Any other I/O failure.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(msg) => f.write_str(msg),
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::UpstreamConnect { backend, source } => {
                write!(f, "cannot connect to backend {backend}: {source}")
            }
            Error::NoHealthyBackend { tried } => {
                write!(f, "no backend could be connected to ({tried} tried)")
            }
            Error::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } | Error::UpstreamConnect { source, .. } => Some(source),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}
