#![doc = include_str!("../docs/crate.md")]
#![warn(missing_docs)]
#![deny(unsafe_code)]
#![deny(unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The modules form a stack, from what users build down to what everything reads; no module
// imports from one above it (docs/ARCHITECTURE.md; checked by tests/architecture.rs).
mod cache;
mod cache_control;
#[cfg(feature = "client")]
mod client;
mod clock;
mod coalesce;
mod entry;
mod error;
mod key;
mod observe;
mod rules;
mod settings;
pub mod store;

#[cfg(test)]
mod properties;

pub use cache::answer::{CACHE_STATUS, X_CACHE};
pub use cache::body::CacheBody;
pub use cache::future::ResponseFuture;
pub use cache::invalidate::Invalidator;
pub use cache::layer::CacheLayer;
pub use cache::service::CacheService;
#[cfg(feature = "client")]
pub use client::RedisCache;
pub use error::{Error, ErrorKind, Result};
pub use observe::{BypassCounts, CacheStats, NotStoredCounts, StoreErrorCounts, Timing};
#[cfg(feature = "memory")]
pub use store::memory::{MemoryStore, MemoryStoreBuilder, MemoryStoreStats};
#[cfg(feature = "redis")]
pub use store::redis::{RedisHealth, RedisStore, RedisStoreBuilder, RedisStoreStats};
#[cfg(feature = "tiered")]
pub use store::tiered::{TieredBusStats, TieredStore, TieredStoreBuilder};
pub use store::Store;

/// Compiles the README's Rust examples as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Compiles the Rust examples of docs/client-and-tags.md (moved from the README) as doctests.
#[cfg(all(doctest, feature = "client"))]
#[doc = include_str!("../docs/client-and-tags.md")]
pub struct ClientDocDoctests;

/// NOT PUBLIC API. Thin wrappers over crate internals for the criterion benchmarks in
/// `benches/` and the benchmark examples, behind the non-default feature `bench-internals`;
/// hidden from the docs, exempt from semver, and may change or vanish in any release.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod __bench {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, Method, StatusCode, Uri};

    use crate::cache_control::CacheControl;
    use crate::rules::request;
    use crate::settings::Rules;

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
                forwarded: None,
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
        crate::entry::decode(bytes, &crate::settings::DEFAULT_TARGETED)
    }

    /// `CacheControl::parse`; the parsed value is opaque.
    pub fn parse_cache_control(headers: &HeaderMap) -> impl std::fmt::Debug {
        CacheControl::parse(headers)
    }

    /// The default rules of a layer, for [`classify_request`].
    #[derive(Debug, Default)]
    pub struct BenchRules(Rules);

    /// A `MemoryStore` behind the `Store` trait's required methods only, so it offers no memo
    /// slot and no read without waiting: every hit decodes the stored bytes, as on a store
    /// that serialises values.
    #[cfg(feature = "memory")]
    pub struct DecodeEveryHit(pub crate::MemoryStore);

    #[cfg(feature = "memory")]
    impl crate::Store for DecodeEveryHit {
        fn get<'a>(&'a self, key: &'a str) -> crate::store::StoreFuture<'a, Option<Bytes>> {
            self.0.get(key)
        }

        fn set<'a>(
            &'a self,
            key: &'a str,
            value: Bytes,
            ttl: Duration,
        ) -> crate::store::StoreFuture<'a, ()> {
            self.0.set(key, value, ttl)
        }

        fn delete<'a>(&'a self, key: &'a str) -> crate::store::StoreFuture<'a, bool> {
            self.0.delete(key)
        }
    }

    /// `rules::request::classify_request`; the action is opaque.
    pub fn classify_request(
        rules: &BenchRules,
        method: &Method,
        headers: &HeaderMap,
    ) -> impl std::fmt::Debug {
        request::classify_request(&rules.0, method, headers)
    }
}
