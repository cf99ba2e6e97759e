//! Fuzzing on stable Rust: property tests that feed generated and mutated input to the parts
//! that read untrusted bytes (the entry decoder, the `Cache-Control` parser, the key
//! encoder). They run with the unit tests (`cargo test`); set `PROPTEST_CASES` for a longer
//! run. A failure found here becomes a named regression test in the module it concerns.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use proptest::prelude::*;

use crate::cache_control::CacheControl;
use crate::entry::{self, CachedResponse, StoredValue};
use crate::key::{base_key, KeyFields};
use crate::settings::{DEFAULT_TARGETED, MAX_DELTA_SECS};

/// 512 cases per property in the suite (a fraction of a second), or `PROPTEST_CASES`.
fn config() -> ProptestConfig {
    let default = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        return default;
    }
    ProptestConfig {
        cases: 512,
        ..default
    }
}

/// A valid entry to mutate: a few headers and a body.
fn sample_entry(status: u16, body: &[u8], ttl_ms: u64) -> Bytes {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("text/plain"));
    headers.append("link", HeaderValue::from_static("</a>"));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    CachedResponse::encode(
        status,
        &headers,
        &[Bytes::copy_from_slice(body)],
        1,
        Duration::from_millis(ttl_ms),
    )
}

/// What a decoded entry must satisfy, whatever bytes it came from.
fn assert_meaningful(value: &StoredValue) {
    if let StoredValue::Response(r) = value {
        assert!(crate::entry::storable_status(r.status), "{:?}", r.status);
        assert!(r.ttl <= Duration::from_secs(MAX_DELTA_SECS));
        for name in entry::CONNECTION_HEADERS {
            assert!(!r.headers.contains_key(name));
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(value) = entry::decode(Bytes::from(bytes), &DEFAULT_TARGETED) {
            assert_meaningful(&value);
        }
    }

    #[test]
    fn decoding_mutated_entries_never_panics(
        status in 100u16..1000,
        body in prop::collection::vec(any::<u8>(), 0..64),
        ttl_ms in any::<u64>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = sample_entry(status, &body, ttl_ms).to_vec();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let keep = cut.index(bytes.len() + 1);
        for candidate in [bytes.clone(), bytes[..keep].to_vec()] {
            if let Ok(value) = entry::decode(Bytes::from(candidate), &DEFAULT_TARGETED) {
                assert_meaningful(&value);
            }
        }
    }

    #[test]
    fn cache_control_parsing_never_panics_and_clamps(
        directives in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "max-age", "s-maxage", "stale-if-error", "stale-while-revalidate",
                    "max-stale", "min-fresh", "no-cache", "private", "x-other", "MAX-AGE",
                ]),
                prop::option::of("[0-9]{0,40}|-[0-9]{1,3}|\"[0-9]{1,30}\"|[ -~]{0,8}"),
            ),
            0..6,
        ),
        junk in "[ -~]{0,40}",
    ) {
        let mut value: Vec<String> = directives
            .iter()
            .map(|(name, arg)| match arg {
                Some(arg) => format!("{name}={arg}"),
                None => (*name).to_owned(),
            })
            .collect();
        value.push(junk);
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&value.join(", ")) {
            headers.insert("cache-control", v);
        }
        let cc = CacheControl::parse(&headers);
        let secs = [cc.max_age, cc.s_maxage, cc.stale_if_error, cc.stale_while_revalidate, cc.min_fresh];
        for s in secs.into_iter().flatten().chain(cc.max_stale.flatten()) {
            prop_assert!(s <= MAX_DELTA_SECS);
        }
    }

    /// The attack on keys: the same characters split differently between fields (`/a:b?c`
    /// against `/a?b:c`). Two tuples share a key only when they are the same tuple.
    #[test]
    fn keys_are_equal_only_for_equal_fields(
        text in "[a-z:/?&=%.]{0,24}",
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 8),
        presence in prop::collection::vec(any::<bool>(), 6),
        method in prop::sample::select(vec!["GET", "HEAD", "M-SEARCH", "GETX"]),
    ) {
        let tuple = |cuts: &[prop::sample::Index], present: &[bool]| {
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(text.len() + 1)).collect();
            points.sort_unstable();
            let field = |i: usize| text[points[i]..points[i + 1]].to_owned();
            (
                present[0].then(|| field(0)),
                field(1),
                present[1].then(|| field(2)),
                present[2].then(|| text[points[3]..].to_owned()),
            )
        };
        let a = tuple(&cuts[..4], &presence[..3]);
        let b = tuple(&cuts[4..], &presence[3..]);
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let key = |t: &(Option<String>, String, Option<String>, Option<String>)| {
            base_key("p", &KeyFields {
                method: &method,
                authority: t.0.as_deref(),
                path: &t.1,
                query: t.2.as_deref(),
                extra: t.3.as_deref(),
                forwarded: None,
            })
        };
        prop_assert_eq!(a == b, key(&a) == key(&b), "{:?} vs {:?}", a, b);
    }
}

#[test]
fn keys_of_the_colon_collision_differ() {
    let get = Method::GET;
    let fields = |path, query| KeyFields {
        method: &get,
        authority: Some("example.com"),
        path,
        query,
        extra: None,
        forwarded: None,
    };
    assert_ne!(
        base_key("p", &fields("/api/search:q=tag", Some("rust"))),
        base_key("p", &fields("/api/search", Some("q=tag:rust")))
    );
    assert_ne!(
        base_key("p", &fields("/x", Some(""))),
        base_key("p", &fields("/x", None))
    );
    // Material moved between the last two fields never gives the same key.
    let extended = |extra, forwarded| KeyFields {
        extra,
        forwarded,
        ..fields("/x", None)
    };
    assert_ne!(
        base_key("p", &extended(Some("a"), None)),
        base_key("p", &extended(None, Some("a")))
    );
    assert_ne!(
        base_key("p", &extended(None, None)),
        base_key("p", &extended(None, Some("")))
    );
}
