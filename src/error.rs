//! The one error type of the crate.

use std::fmt;

/// What went wrong, in a form a program can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection URL could not be parsed or names an unsupported scheme.
    InvalidUrl,
    /// The server could not be reached, or the connection broke.
    Unreachable,
    /// The operation did not finish within the configured operation timeout.
    Timeout,
    /// A stored value could not be encoded or decoded.
    Codec,
    /// The backend answered with an error (for example a Redis error reply).
    Backend,
    /// An argument cannot be used as given (for example a relative URL where the layer
    /// needs the host, or a value over the store's size limit).
    InvalidInput,
    /// The store does not implement this operation (tags or locks on a custom
    /// [`Store`](crate::Store) that keeps the trait's defaults).
    Unsupported,
    /// The computation of a value failed in another, concurrent call that this call waited
    /// on (see `RedisCache::get_or_insert_with`); the message carries that call's error.
    Compute,
}

/// An error from a store or the typed client.
///
/// The response layer never surfaces these to HTTP clients: a store error is a cache miss.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a human-readable `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

/// The message alone: the cause is [`source`](std::error::Error::source), so that
/// reporters walking the chain (anyhow, eyre, tracing's error fields) print it once.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
