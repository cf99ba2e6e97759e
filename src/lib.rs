#![doc = include_str!("../docs/crate.md")]
#![warn(missing_docs)]
#![deny(unsafe_code)]
#![deny(unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod answer;
mod body;
#[cfg(feature = "redis")]
mod client;
mod coalesce;
mod conditional;
mod entry;
mod error;
mod invalidate;
mod key;
mod layer;
mod lookup;
mod policy;
#[cfg(test)]
mod properties;
mod service;
pub mod store;
mod write;

pub use answer::X_CACHE;
pub use body::CacheBody;
#[cfg(feature = "redis")]
pub use client::RedisCache;
pub use error::{Error, ErrorKind, Result};
pub use invalidate::Invalidator;
pub use layer::CacheLayer;
pub use service::{CacheService, ResponseFuture};
#[cfg(feature = "memory")]
pub use store::MemoryStore;
#[cfg(feature = "redis")]
pub use store::RedisStore;
pub use store::Store;

/// Compiles the README's Rust examples as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// NOT PUBLIC API. Thin wrappers over crate internals for the criterion benchmarks in
/// `benches/`; hidden from the docs, exempt from semver, and may change or vanish in any
/// release.
#[doc(hidden)]
pub mod __bench {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, Method, StatusCode, Uri};

    use crate::policy::{self, CacheControl, Rules};

    /// `key::base_key` of a request for `uri` on `host`.
    pub fn base_key(prefix: &str, method: &Method, host: &str, uri: &Uri) -> String {
        crate::key::base_key(
            prefix,
            &crate::key::KeyFields {
                method,
                authority: Some(host),
                path: uri.path(),
                query: uri.query(),
                extra: None,
            },
        )
    }

    /// `entry::CachedResponse::encode`.
    pub fn encode(
        status: StatusCode,
        headers: &HeaderMap,
        chunks: &[Bytes],
        stored_at_ms: u64,
        ttl: Duration,
    ) -> Bytes {
        crate::entry::CachedResponse::encode(status, headers, chunks, stored_at_ms, ttl)
    }

    /// `entry::decode`; the decoded value is opaque.
    pub fn decode(bytes: Bytes) -> impl std::fmt::Debug {
        crate::entry::decode(bytes)
    }

    /// `policy::CacheControl::parse`; the parsed value is opaque.
    pub fn parse_cache_control(headers: &HeaderMap) -> impl std::fmt::Debug {
        CacheControl::parse(headers)
    }

    /// The default rules of a layer, for [`classify_request`].
    #[derive(Debug, Default)]
    pub struct BenchRules(Rules);

    /// `policy::classify_request`; the action is opaque.
    pub fn classify_request(
        rules: &BenchRules,
        method: &Method,
        headers: &HeaderMap,
    ) -> impl std::fmt::Debug {
        policy::classify_request(&rules.0, method, headers)
    }
}
