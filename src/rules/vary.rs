//! `Vary`: the request headers a response varies on.

use http::header::VARY;
use http::{HeaderMap, HeaderName};

use crate::cache_control::split_list;

/// The request headers a response varies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Vary {
    /// `Vary: *`: every request is different; never store.
    Any,
    /// These header names, lower-cased, sorted, without duplicates (possibly none).
    Headers(Vec<HeaderName>),
}

/// Reads every `Vary` field line into a normalized list.
pub(crate) fn vary_names(headers: &HeaderMap) -> Vary {
    let mut names = Vec::new();
    for value in headers.get_all(VARY) {
        let Ok(value) = value.to_str() else {
            return Vary::Any;
        };
        for name in split_list(value) {
            if name == "*" {
                return Vary::Any;
            }
            // An unparseable name cannot be matched against requests: refuse to store.
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) => names.push(name),
                Err(_) => return Vary::Any,
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Vary::Headers(names)
}
