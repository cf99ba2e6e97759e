//! HTTP caching rules of a shared cache, one table row per rule, each naming its RFC section
//! (RFC 9111 caching, RFC 9110 conditional requests, RFC 5861 stale directives, RFC 9211
//! Cache-Status, RFC 9213 targeted Cache-Control). Every row runs a scenario through real HTTP
//! against its own redis-server: a scripted handler (its Nth call gives the Nth response),
//! then requests with the outcome each must have.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, Response, StatusCode};
use axum::Router;
use common::{advance_clock, send, serve, RedisServer};
use tower_redis_cache::{CacheLayer, RedisStore};

/// One response of the scripted handler.
struct Reply {
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
}

const fn ok(headers: &'static [(&'static str, &'static str)], body: &'static str) -> Reply {
    Reply {
        status: 200,
        headers,
        body,
    }
}

/// One request of a scenario and what must come of it.
struct Step {
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// Move the cache's clock this far first (to let an entry go stale); Redis's clock
    /// does not move.
    after_ms: u64,
    status: u16,
    x_cache: Option<&'static str>,
    /// The body, or `None` to skip the check.
    body: Option<&'static str>,
    /// Handler calls so far, including this step's.
    calls: usize,
    /// Response headers that must have this value (`None`: must be absent).
    expect_headers: &'static [(&'static str, Option<&'static str>)],
    /// Response headers whose value must start with this.
    header_prefixes: &'static [(&'static str, &'static str)],
    /// Headers the handler must have received on its last call.
    handler_saw: &'static [(&'static str, &'static str)],
}

/// `calls` value for a step whose handler call count is not checked.
const ANY: usize = usize::MAX;

const GET: Step = Step {
    method: "GET",
    path: "/r",
    headers: &[],
    after_ms: 0,
    status: 200,
    x_cache: None,
    body: None,
    calls: 0,
    expect_headers: &[],
    header_prefixes: &[],
    handler_saw: &[],
};

struct Rule {
    section: &'static str,
    rule: &'static str,
    layer: fn(CacheLayer) -> CacheLayer,
    replies: &'static [Reply],
    steps: &'static [Step],
}

fn same(layer: CacheLayer) -> CacheLayer {
    layer
}

fn strip_targeted(layer: CacheLayer) -> CacheLayer {
    layer.strip_targeted_fields(true)
}

fn own_targeted_field(layer: CacheLayer) -> CacheLayer {
    layer.targeted_fields([
        http::HeaderName::from_static("myapp-cache-control"),
        http::HeaderName::from_static("cdn-cache-control"),
    ])
}

fn ttl_1s(layer: CacheLayer) -> CacheLayer {
    layer.ttl(Duration::from_secs(1))
}

const GZIP: &str = "\u{1f}\u{8b}pretend-gzip";

const RULES: &[Rule] = &[
    Rule {
        section: "RFC 9111 §4.2.1, §5.2.2.10",
        rule: "s-maxage takes precedence over max-age in a shared cache",
        layer: same,
        replies: &[ok(&[("cache-control", "max-age=1, s-maxage=60")], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_ms: 1200, x_cache: Some("HIT"), body: Some("v1"), calls: 1, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §4.2.1, §5.2.2.1",
        rule: "max-age sets the freshness lifetime",
        layer: same,
        replies: &[ok(&[("cache-control", "max-age=1")], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { x_cache: Some("HIT"), calls: 1, ..GET },
            Step { after_ms: 1200, x_cache: Some("MISS"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §4.2.1, §5.3",
        rule: "Expires minus Date gives the lifetime when max-age is absent",
        layer: same,
        replies: &[
            ok(&[("date", "Tue, 01 Jan 2030 00:00:00 GMT"), ("expires", "Tue, 01 Jan 2030 00:00:01 GMT")], "v1"),
            ok(&[], "v2"),
        ],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { x_cache: Some("HIT"), body: Some("v1"), calls: 1, ..GET },
            Step { after_ms: 1200, x_cache: Some("MISS"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.3",
        rule: "an invalid Expires means already expired: not stored",
        layer: same,
        replies: &[ok(&[("expires", "0")], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { x_cache: Some("MISS"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §4.2.1",
        rule: "with several max-age directives the first is used",
        layer: same,
        replies: &[ok(&[("cache-control", "max-age=60"), ("cache-control", "max-age=1")], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_ms: 1200, x_cache: Some("HIT"), calls: 1, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.2",
        rule: "unknown and malformed directives are ignored",
        layer: same,
        replies: &[ok(&[("cache-control", "foo, bar=\"x, private\", max-age=ten, s-maxage=60")], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { x_cache: Some("HIT"), calls: 1, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.2.2.4, §4.3",
        rule: "a no-cache response is stored but validated with the origin before each reuse",
        layer: same,
        replies: &[
            ok(&[("cache-control", "no-cache"), ("etag", "\"v1\"")], "v1"),
            Reply { status: 304, headers: &[("etag", "\"v1\"")], body: "" },
        ],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step {
                x_cache: Some("REVALIDATED"),
                body: Some("v1"),
                calls: 2,
                handler_saw: &[("if-none-match", "\"v1\"")],
                ..GET
            },
        ],
    },
    Rule {
        section: "RFC 9111 §4.3.4",
        rule: "a 304 from the origin refreshes the stored entry's headers and lifetime, keeping its body",
        layer: ttl_1s,
        replies: &[
            ok(&[("etag", "\"v1\""), ("x-version", "1")], "v1"),
            Reply { status: 304, headers: &[("etag", "\"v1\""), ("x-version", "2"), ("cache-control", "max-age=60")], body: "" },
        ],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step {
                after_ms: 1200,
                x_cache: Some("REVALIDATED"),
                body: Some("v1"),
                calls: 2,
                expect_headers: &[("x-version", Some("2"))],
                handler_saw: &[("if-none-match", "\"v1\"")],
                ..GET
            },
            Step { after_ms: 200, x_cache: Some("HIT"), body: Some("v1"), calls: 2, expect_headers: &[("x-version", Some("2"))], ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §4.3.3",
        rule: "a full response to a validation replaces the stored entry",
        layer: ttl_1s,
        replies: &[ok(&[("last-modified", "Tue, 01 Jan 2030 00:00:00 GMT")], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step {
                after_ms: 1200,
                x_cache: Some("MISS"),
                body: Some("v2"),
                calls: 2,
                handler_saw: &[("if-modified-since", "Tue, 01 Jan 2030 00:00:00 GMT")],
                ..GET
            },
            Step { after_ms: 200, x_cache: Some("HIT"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.2.2.2; RFC 5861 §4",
        rule: "must-revalidate: never served stale, not even on error",
        layer: |l| l.stale_if_error(Duration::from_secs(60)),
        replies: &[
            ok(&[("cache-control", "max-age=1, must-revalidate")], "v1"),
            Reply { status: 500, headers: &[], body: "down" },
        ],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_ms: 1200, status: 500, body: Some("down"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.2.2.8",
        rule: "proxy-revalidate: never served stale by a shared cache",
        layer: |l| l.stale_while_revalidate(Duration::from_secs(60)),
        replies: &[ok(&[("cache-control", "max-age=1, proxy-revalidate")], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_ms: 1200, x_cache: Some("MISS"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 5861 §3",
        rule: "stale-while-revalidate=N serves the stale copy at once",
        layer: same,
        replies: &[ok(&[("cache-control", "max-age=1, stale-while-revalidate=60")], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_ms: 1200, x_cache: Some("STALE"), body: Some("v1"), calls: ANY, header_prefixes: &[("cache-status", "tower-redis-cache; hit; ttl=-")], ..GET },
        ],
    },
    Rule {
        section: "RFC 5861 §4",
        rule: "stale-if-error=N serves the stale copy when the origin fails",
        layer: same,
        replies: &[
            ok(&[("cache-control", "max-age=1, stale-if-error=60")], "v1"),
            Reply { status: 503, headers: &[], body: "down" },
        ],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_ms: 1200, x_cache: Some("STALE"), body: Some("v1"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §3.5",
        rule: "a response to an Authorization request marked public is stored and shared",
        layer: same,
        replies: &[ok(&[("cache-control", "public, max-age=60")], "shared")],
        steps: &[
            Step { headers: &[("authorization", "Bearer a")], x_cache: Some("MISS"), calls: 1, ..GET },
            Step { headers: &[("authorization", "Bearer b")], x_cache: Some("HIT"), calls: 1, ..GET },
            Step { x_cache: Some("HIT"), body: Some("shared"), calls: 1, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §3.5",
        rule: "s-maxage also allows storing a response to an Authorization request",
        layer: same,
        replies: &[ok(&[("cache-control", "s-maxage=60")], "shared")],
        steps: &[
            Step { headers: &[("authorization", "Bearer a")], x_cache: Some("MISS"), calls: 1, ..GET },
            Step { x_cache: Some("HIT"), calls: 1, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §3.5",
        rule: "without public/s-maxage/must-revalidate an Authorization reply is neither stored nor served a stored copy",
        layer: same,
        replies: &[ok(&[("cache-control", "max-age=60")], "alice's"), ok(&[("cache-control", "max-age=60")], "anon")],
        steps: &[
            Step { headers: &[("authorization", "Bearer a")], x_cache: Some("BYPASS"), calls: 1, ..GET },
            Step { x_cache: Some("MISS"), body: Some("anon"), calls: 2, ..GET },
            Step { headers: &[("authorization", "Bearer a")], x_cache: Some("BYPASS"), calls: 3, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.4",
        rule: "Pragma: no-cache counts only when Cache-Control is absent",
        layer: same,
        replies: &[ok(&[], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { headers: &[("pragma", "no-cache"), ("cache-control", "max-stale=0")], x_cache: Some("HIT"), calls: 1, ..GET },
            Step { headers: &[("pragma", "no-cache")], x_cache: Some("REFRESH"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.2.1.4",
        rule: "request no-cache: the stored copy is not used",
        layer: same,
        replies: &[ok(&[], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { headers: &[("cache-control", "no-cache")], x_cache: Some("REFRESH"), body: Some("v2"), calls: 2, ..GET },
            Step { after_ms: 200, x_cache: Some("HIT"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.2.1.5",
        rule: "request no-store: nothing is stored",
        layer: same,
        replies: &[ok(&[], "v1"), ok(&[], "v2")],
        steps: &[
            Step { headers: &[("cache-control", "no-store")], x_cache: Some("BYPASS"), calls: 1, ..GET },
            Step { x_cache: Some("MISS"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.2.1.1",
        rule: "request max-age: a stored copy older than that is not used",
        layer: same,
        replies: &[ok(&[], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_ms: 1100, headers: &[("cache-control", "max-age=0")], body: Some("v2"), calls: 2, ..GET },
            Step { after_ms: 200, headers: &[("cache-control", "max-age=30")], x_cache: Some("HIT"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.2.1.2",
        rule: "request max-stale: a stale copy within the limit is served",
        layer: |l| l.ttl(Duration::from_secs(1)).stale_if_error(Duration::from_secs(60)),
        replies: &[ok(&[], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_ms: 1200, headers: &[("cache-control", "max-stale=60")], x_cache: Some("STALE"), body: Some("v1"), calls: 1, ..GET },
            Step { headers: &[("cache-control", "max-stale=0")], x_cache: Some("MISS"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.2.1.3",
        rule: "request min-fresh: a copy fresh for less than that is not used",
        layer: same,
        replies: &[ok(&[], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { headers: &[("cache-control", "min-fresh=30")], x_cache: Some("HIT"), calls: 1, ..GET },
            Step { headers: &[("cache-control", "min-fresh=3600")], body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §5.2.1.7",
        rule: "only-if-cached: 504 when nothing is stored, the stored copy otherwise",
        layer: same,
        replies: &[ok(&[], "v1")],
        steps: &[
            Step { headers: &[("cache-control", "only-if-cached")], status: 504, calls: 0, ..GET },
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { headers: &[("cache-control", "only-if-cached")], x_cache: Some("HIT"), body: Some("v1"), calls: 1, ..GET },
        ],
    },
    Rule {
        section: "RFC 9211 §2",
        rule: "Cache-Status says hit (with ttl) or how the request was forwarded",
        layer: same,
        replies: &[ok(&[("cache-control", "max-age=60")], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, expect_headers: &[("cache-status", Some("tower-redis-cache; fwd=uri-miss"))], ..GET },
            Step { x_cache: Some("HIT"), calls: 1, header_prefixes: &[("cache-status", "tower-redis-cache; hit; ttl=")], ..GET },
            Step {
                headers: &[("cache-control", "no-cache")],
                x_cache: Some("REFRESH"),
                calls: 2,
                expect_headers: &[("cache-status", Some("tower-redis-cache; fwd=request"))],
                ..GET
            },
        ],
    },
    Rule {
        section: "RFC 9111 §5.1, §4.2.3",
        rule: "Age on every hit is the current age: the origin's Age plus the time stored",
        layer: same,
        replies: &[ok(&[("age", "100"), ("cache-control", "max-age=600")], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, expect_headers: &[("age", Some("100"))], ..GET },
            Step { x_cache: Some("HIT"), calls: 1, expect_headers: &[("age", Some("100"))], ..GET },
            Step { after_ms: 1000, x_cache: Some("HIT"), calls: 1, expect_headers: &[("age", Some("101"))], ..GET },
        ],
    },
    Rule {
        section: "RFC 9110 §6.6.1",
        rule: "the origin's Date is preserved on hits",
        layer: same,
        replies: &[ok(&[("date", "Tue, 01 Jan 2030 00:00:00 GMT")], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { x_cache: Some("HIT"), calls: 1, expect_headers: &[("date", Some("Tue, 01 Jan 2030 00:00:00 GMT"))], ..GET },
        ],
    },
    Rule {
        section: "RFC 9110 §13.1.2, §15.4.5",
        rule: "If-None-Match matching a fresh entry's ETag gets 304 with validators and no body",
        layer: same,
        replies: &[ok(&[("etag", "\"abc\""), ("cache-control", "max-age=60")], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step {
                headers: &[("if-none-match", "W/\"abc\"")],
                status: 304,
                x_cache: Some("HIT"),
                body: Some(""),
                calls: 1,
                expect_headers: &[("etag", Some("\"abc\"")), ("cache-control", Some("max-age=60"))],
                ..GET
            },
            Step { headers: &[("if-none-match", "\"other\"")], status: 200, x_cache: Some("HIT"), body: Some("v1"), calls: 1, ..GET },
        ],
    },
    Rule {
        section: "RFC 9110 §13.1.3",
        rule: "If-Modified-Since at or after Last-Modified gets 304",
        layer: same,
        replies: &[ok(&[("last-modified", "Tue, 01 Jan 2030 00:00:00 GMT")], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { headers: &[("if-modified-since", "Tue, 01 Jan 2030 00:00:00 GMT")], status: 304, body: Some(""), calls: 1, ..GET },
            Step { headers: &[("if-modified-since", "Mon, 31 Dec 2029 00:00:00 GMT")], status: 200, body: Some("v1"), calls: 1, ..GET },
        ],
    },
    Rule {
        section: "RFC 9110 §8.8.3 (strong validator, opt-in)",
        rule: "generate_etag gives hits a strong ETag from the body, usable for 304s",
        layer: |l| l.generate_etag(true),
        replies: &[ok(&[], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            // md5("v1")
            Step { x_cache: Some("HIT"), calls: 1, expect_headers: &[("etag", Some("\"6654c734ccab8f440ff0825eb443dc7f\""))], ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §4.1",
        rule: "Vary keys on the listed headers, normalized (case, whitespace, order)",
        layer: same,
        replies: &[ok(&[("vary", "X-B, x-a")], "a1b2"), ok(&[("vary", "x-a, x-b")], "other")],
        steps: &[
            Step { headers: &[("x-a", "1"), ("x-b", "2")], x_cache: Some("MISS"), calls: 1, ..GET },
            Step { headers: &[("X-B", "2 "), ("X-A", " 1")], x_cache: Some("HIT"), body: Some("a1b2"), calls: 1, ..GET },
            Step { headers: &[("x-a", "1"), ("x-b", "3")], x_cache: Some("MISS"), body: Some("other"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §4.1",
        rule: "a response that changes its Vary replaces the older variants",
        layer: same,
        replies: &[ok(&[("vary", "accept-language")], "english"), ok(&[], "any language")],
        steps: &[
            Step { headers: &[("accept-language", "en")], x_cache: Some("MISS"), calls: 1, ..GET },
            Step { headers: &[("accept-language", "en"), ("cache-control", "no-cache")], x_cache: Some("REFRESH"), calls: 2, ..GET },
            Step { after_ms: 200, headers: &[("accept-language", "en")], x_cache: Some("HIT"), body: Some("any language"), calls: 2, ..GET },
            Step { headers: &[("accept-language", "fr")], x_cache: Some("HIT"), body: Some("any language"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9110 §12.5.3",
        rule: "a client that did not ask for gzip never receives a stored gzip body, even without Vary",
        layer: same,
        replies: &[ok(&[("content-encoding", "gzip")], GZIP), ok(&[], "identity")],
        steps: &[
            Step { headers: &[("accept-encoding", "gzip")], x_cache: Some("MISS"), calls: 1, ..GET },
            Step { headers: &[("accept-encoding", "gzip")], x_cache: Some("HIT"), calls: 1, ..GET },
            Step { x_cache: Some("MISS"), body: Some("identity"), calls: 2, expect_headers: &[("content-encoding", None)], ..GET },
            Step { headers: &[("accept-encoding", "br, gzip;q=0")], x_cache: Some("HIT"), body: Some("identity"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §4.4",
        rule: "a successful unsafe request invalidates the URL's stored GET response",
        layer: same,
        replies: &[ok(&[], "v1"), ok(&[], "posted"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { method: "POST", x_cache: None, body: Some("posted"), calls: 2, ..GET },
            Step { x_cache: Some("MISS"), body: Some("v2"), calls: 3, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §4.4",
        rule: "a failed unsafe request invalidates nothing",
        layer: same,
        replies: &[ok(&[], "v1"), Reply { status: 500, headers: &[], body: "failed" }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { method: "DELETE", status: 500, calls: 2, ..GET },
            Step { x_cache: Some("HIT"), body: Some("v1"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §4.4",
        rule: "same-origin Location and Content-Location are invalidated too, other origins are not",
        layer: same,
        replies: &[
            ok(&[], "other"),
            ok(&[], "evil"),
            Reply { status: 201, headers: &[("location", "/other"), ("content-location", "http://evil.example/evil")], body: "" },
            ok(&[], "other v2"),
            ok(&[], "evil v2"),
        ],
        steps: &[
            Step { path: "/other", x_cache: Some("MISS"), calls: 1, ..GET },
            Step { path: "/evil", x_cache: Some("MISS"), calls: 2, ..GET },
            Step { method: "PUT", status: 201, calls: 3, ..GET },
            Step { path: "/other", x_cache: Some("MISS"), body: Some("other v2"), calls: 4, ..GET },
            Step { path: "/evil", x_cache: Some("HIT"), body: Some("evil"), calls: 4, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §3.3, §3.4",
        rule: "a partial (206) response is never stored as the URL's response",
        layer: same,
        replies: &[
            Reply { status: 206, headers: &[("content-range", "bytes 0-1/5")], body: "12" },
            ok(&[], "12345"),
        ],
        steps: &[
            Step { headers: &[("range", "bytes=0-1")], status: 206, x_cache: Some("MISS"), calls: 1, ..GET },
            Step { x_cache: Some("MISS"), body: Some("12345"), calls: 2, ..GET },
            Step { x_cache: Some("HIT"), body: Some("12345"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "RFC 9111 §3.1, RFC 9110 §7.6.1",
        rule: "hop-by-hop fields are not stored; Content-Length is right on replay",
        layer: same,
        replies: &[ok(&[("connection", "x-hop"), ("x-hop", "1"), ("keep-alive", "timeout=5"), ("x-end", "kept")], "12345")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step {
                x_cache: Some("HIT"),
                calls: 1,
                expect_headers: &[("x-hop", None), ("keep-alive", None), ("x-end", Some("kept")), ("content-length", Some("5"))],
                ..GET
            },
        ],
    },
    Rule {
        section: "RFC 9213 §2",
        rule: "CDN-Cache-Control gives the cache its own lifetime and is forwarded (a CDN in front obeys it too)",
        layer: same,
        replies: &[ok(&[("cache-control", "no-store"), ("cdn-cache-control", "max-age=60")], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, expect_headers: &[("cdn-cache-control", Some("max-age=60")), ("cache-control", Some("no-store"))], ..GET },
            Step { x_cache: Some("HIT"), calls: 1, expect_headers: &[("cdn-cache-control", Some("max-age=60")), ("cache-control", Some("no-store"))], ..GET },
        ],
    },
    Rule {
        section: "RFC 9213 §2.1",
        rule: "a route may strip the targeted fields it obeys before clients see them",
        layer: strip_targeted,
        replies: &[ok(&[("cache-control", "no-store"), ("cdn-cache-control", "max-age=60")], "v1")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, expect_headers: &[("cdn-cache-control", None)], ..GET },
            Step { x_cache: Some("HIT"), calls: 1, expect_headers: &[("cdn-cache-control", None), ("cache-control", Some("no-store"))], ..GET },
        ],
    },
    Rule {
        section: "RFC 9213 §2.1",
        rule: "a route may obey a targeted field of its own first (the CDN's is then only forwarded)",
        layer: own_targeted_field,
        replies: &[ok(&[("myapp-cache-control", "no-store"), ("cdn-cache-control", "max-age=60")], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, expect_headers: &[("cdn-cache-control", Some("max-age=60"))], ..GET },
            Step { x_cache: Some("MISS"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Rule {
        section: "Surrogate-Control (Edge Architecture 1.0)",
        rule: "Surrogate-Control likewise targets the cache, and is forwarded",
        layer: same,
        replies: &[ok(&[("cache-control", "max-age=60"), ("surrogate-control", "no-store")], "v1"), ok(&[], "v2")],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, expect_headers: &[("surrogate-control", Some("no-store"))], ..GET },
            Step { x_cache: Some("MISS"), body: Some("v2"), calls: 2, ..GET },
        ],
    },
];

/// Runs one rule's scenario; returns a description of the first failed expectation.
async fn run(rule: &'static Rule) -> Result<(), String> {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    // A generous operation timeout: on a loaded CI machine a timed-out lookup would turn an
    // expected HIT into a MISS.
    let store = RedisStore::builder(&redis.url())
        .operation_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let seen: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        tower::service_fn(move |req: Request<Body>| {
            let seen = seen.clone();
            async move {
                let mut seen = seen.lock().unwrap();
                seen.push(req.headers().clone());
                let reply = &rule.replies[(seen.len() - 1).min(rule.replies.len() - 1)];
                let mut response = Response::new(Body::from(reply.body));
                *response.status_mut() = StatusCode::from_u16(reply.status).unwrap();
                for (name, value) in reply.headers {
                    response.headers_mut().append(*name, value.parse().unwrap());
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let layer = (rule.layer)(CacheLayer::new(store));
    let app = Router::new().fallback_service(handler).layer(layer.clone());
    let addr = serve(app).await;
    for (i, step) in rule.steps.iter().enumerate() {
        if step.after_ms > 0 {
            advance_clock(Duration::from_millis(step.after_ms)).await;
        }
        let method = Method::from_bytes(step.method.as_bytes()).unwrap();
        let reply = send(addr, method, step.path, step.headers).await;
        let fail = |what: String| {
            Err(format!(
                "step {} ({} {}): {what}; got {reply:?}",
                i + 1,
                step.method,
                step.path
            ))
        };
        let calls = seen.lock().unwrap().len();
        if reply.status.as_u16() != step.status {
            return fail(format!("status {} != {}", reply.status, step.status));
        }
        if reply.x_cache() != step.x_cache && (step.x_cache.is_some() || step.method != "GET") {
            return fail(format!(
                "x-cache {:?} != {:?}",
                reply.x_cache(),
                step.x_cache
            ));
        }
        if step.body.is_some_and(|b| reply.body != b.as_bytes()) {
            return fail(format!("body != {:?}", step.body));
        }
        if step.calls != ANY && calls != step.calls {
            return fail(format!("handler calls {calls} != {}", step.calls));
        }
        for (name, value) in step.expect_headers {
            if reply.header(name) != *value {
                return fail(format!(
                    "header {name}: {:?} != {value:?}",
                    reply.header(name)
                ));
            }
        }
        for (name, prefix) in step.header_prefixes {
            if !reply.header(name).is_some_and(|v| v.starts_with(prefix)) {
                return fail(format!("header {name} does not start with {prefix:?}"));
            }
        }
        for (name, value) in step.handler_saw {
            let last = seen
                .lock()
                .unwrap()
                .last()
                .and_then(|h| h.get(*name).cloned());
            if last.as_ref().and_then(|v| v.to_str().ok()) != Some(*value) {
                return fail(format!("handler saw {name}: {last:?}, expected {value:?}"));
            }
        }
        // The background write of a miss lands before the next step.
        layer.flush().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_of_the_table_holds() {
    // Rules run concurrently, a few at a time, each on a current-thread runtime of its own
    // so that it can move its own clock.
    let slots = Arc::new(tokio::sync::Semaphore::new(4));
    let runs: Vec<_> = RULES
        .iter()
        .map(|rule| {
            let slots = slots.clone();
            let run = tokio::spawn(async move {
                let _slot = slots.acquire().await.unwrap();
                tokio::task::spawn_blocking(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(run(rule))
                })
                .await
                .unwrap()
            });
            (rule, run)
        })
        .collect();
    let mut failures = Vec::new();
    for (rule, run) in runs {
        if let Err(e) = run.await.unwrap() {
            failures.push(format!("[{}] {}: {e}", rule.section, rule.rule));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rules failed:\n{}",
        failures.len(),
        RULES.len(),
        failures.join("\n")
    );
}
