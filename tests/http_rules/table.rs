//! The HTTP caching rules table and its runner, shared by `tests/http_rules.rs` (through an
//! axum app) and `proxy/tests/http_rules.rs` (through the `tower-redis-cache-proxy` binary).
//! See `tests/http_rules.rs` for how to add a row.
#![allow(dead_code)] // each runner uses its half of the table

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, Response, StatusCode};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower_redis_cache::{CacheLayer, MemoryStore};

/// The cache configuration of the proxy binary (`proxy/src/proxy.rs`, `cache_layer`, with its
/// defaults but heuristic freshness, which no row's response can use): keep the two in step.
pub fn proxy_layer() -> CacheLayer {
    CacheLayer::new(MemoryStore::new())
        .ttl(Duration::ZERO)
        .key_host(false)
}

/// One response of the scripted origin.
pub struct Reply {
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

/// The origin's replies for one path of a row, in order.
pub struct Script {
    /// Relative to the row (`/r` is served at `/{name}/r`), without a query.
    path: &'static str,
    replies: &'static [Reply],
}

/// One request of a row and what must come of it.
pub struct Step {
    pub method: &'static str,
    /// Relative to the row, with a query if any.
    pub path: &'static str,
    pub headers: &'static [(&'static str, &'static str)],
    /// The request body.
    pub body: &'static str,
    /// Repeat while `MISS`: the step needs the previous response stored (see the module docs).
    pub after_write: bool,
    pub status: u16,
    /// `None`: not checked (use `expect` for "absent").
    pub x_cache: Option<&'static str>,
    /// The response body, `None`: not checked.
    pub response_body: Option<&'static str>,
    /// The origin's requests for this row so far, this step's included ([`ANY`]: not checked).
    pub calls: usize,
    /// Response fields that must have this value (`None`: must be absent).
    pub expect: &'static [(&'static str, Option<&'static str>)],
    /// Fields of the origin's latest request of this row (`None`: must be absent).
    pub origin_saw: &'static [(&'static str, Option<&'static str>)],
    /// The body of the origin's latest request of this row, `None`: not checked.
    pub origin_got: Option<&'static str>,
}

/// `calls` of a step whose origin call count is not checked.
const ANY: usize = usize::MAX;

/// Stands for the origin's `host:port` in `origin_saw`.
const ORIGIN_HOST: &str = "{origin}";

const GET: Step = Step {
    method: "GET",
    path: "/r",
    headers: &[],
    body: "",
    after_write: false,
    status: 200,
    x_cache: None,
    response_body: None,
    calls: ANY,
    expect: &[],
    origin_saw: &[],
    origin_got: None,
};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Through {
    /// An axum app: the scripted origin as its handler, under the layer.
    App,
    /// The `tower-redis-cache-proxy` binary in front of a scripted origin server.
    Proxy,
}

const BOTH: &[Through] = &[Through::App, Through::Proxy];
const PROXY_ONLY: &[Through] = &[Through::Proxy];

pub struct Row {
    pub section: &'static str,
    pub rule: &'static str,
    pub name: &'static str,
    pub through: &'static [Through],
    pub origin: &'static [Script],
    pub steps: &'static [Step],
}

const MAX_AGE_60: (&str, &str) = ("cache-control", "max-age=60");
const MAX_AGE_600: (&str, &str) = ("cache-control", "max-age=600");

#[rustfmt::skip]
pub const RULES: &[Row] = &[
    Row {
        section: "RFC 9111 §4.2.1, §5.2.2.1",
        rule: "a response fresh by max-age is served from the cache",
        name: "max-age",
        through: BOTH,
        origin: &[Script { path: "/r", replies: &[ok(&[MAX_AGE_60], "v1"), ok(&[], "v2")] }],
        steps: &[
            Step { x_cache: Some("MISS"), response_body: Some("v1"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("HIT"), response_body: Some("v1"), calls: 1, ..GET },
        ],
    },
    Row {
        section: "RFC 9111 §4.2.1, §5.2.2.10",
        rule: "a shared cache takes s-maxage over max-age",
        name: "s-maxage",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[ok(&[("cache-control", "max-age=0, s-maxage=60")], "v1"), ok(&[], "v2")],
        }],
        steps: &[
            Step { x_cache: Some("MISS"), response_body: Some("v1"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("HIT"), response_body: Some("v1"), calls: 1, ..GET },
        ],
    },
    Row {
        section: "RFC 9111 §3, §5.2.2.5",
        rule: "a no-store response is not stored",
        name: "no-store",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[ok(&[("cache-control", "no-store, max-age=60")], "v1"), ok(&[], "v2")],
        }],
        steps: &[
            Step { x_cache: Some("MISS"), response_body: Some("v1"), calls: 1, ..GET },
            Step { x_cache: Some("MISS"), response_body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Row {
        section: "RFC 9111 §3, §5.2.2.7",
        rule: "a shared cache does not store a private response",
        name: "private",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[ok(&[("cache-control", "private, max-age=60")], "v1"), ok(&[], "v2")],
        }],
        steps: &[
            Step { x_cache: Some("MISS"), response_body: Some("v1"), calls: 1, ..GET },
            Step { x_cache: Some("MISS"), response_body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Row {
        section: "RFC 9111 §7.3 (stricter than §3: the layer's policy)",
        rule: "a response that sets a cookie is not stored",
        name: "set-cookie",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[ok(&[MAX_AGE_60, ("set-cookie", "session=1")], "v1"), ok(&[], "v2")],
        }],
        steps: &[
            Step { x_cache: Some("MISS"), response_body: Some("v1"), calls: 1, ..GET },
            Step { x_cache: Some("MISS"), response_body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Row {
        section: "RFC 9111 §4.1",
        rule: "Vary: Accept-Encoding keeps one variant per Accept-Encoding",
        name: "vary",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[
                ok(&[MAX_AGE_60, ("vary", "accept-encoding")], "for gzip"),
                ok(&[MAX_AGE_60, ("vary", "accept-encoding")], "for br"),
                ok(&[], "unexpected"),
            ],
        }],
        steps: &[
            Step { headers: &[("accept-encoding", "gzip")], x_cache: Some("MISS"), response_body: Some("for gzip"), calls: 1, ..GET },
            Step { headers: &[("accept-encoding", "br")], x_cache: Some("MISS"), response_body: Some("for br"), calls: 2, ..GET },
            Step { headers: &[("accept-encoding", "gzip")], after_write: true, x_cache: Some("HIT"), response_body: Some("for gzip"), calls: 2, ..GET },
            Step { headers: &[("accept-encoding", "br")], after_write: true, x_cache: Some("HIT"), response_body: Some("for br"), calls: 2, ..GET },
        ],
    },
    Row {
        section: "RFC 9111 §5.2.2.4, §4.3.1, §4.3.4",
        rule: "a no-cache response is stored but validated first; a 304 serves the stored body",
        name: "no-cache",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[
                ok(&[("cache-control", "no-cache, max-age=60"), ("etag", "\"a\"")], "v1"),
                Reply { status: 304, headers: &[("etag", "\"a\"")], body: "" },
            ],
        }],
        steps: &[
            Step { x_cache: Some("MISS"), response_body: Some("v1"), calls: 1, ..GET },
            Step {
                after_write: true,
                x_cache: Some("REVALIDATED"),
                response_body: Some("v1"),
                calls: 2,
                origin_saw: &[("if-none-match", Some("\"a\""))],
                ..GET
            },
        ],
    },
    Row {
        section: "RFC 9111 §4.2.2 (no heuristic freshness; TTL zero)",
        rule: "a response without explicit freshness is not stored",
        name: "no-freshness",
        through: BOTH,
        origin: &[Script { path: "/r", replies: &[ok(&[], "v1"), ok(&[], "v2")] }],
        steps: &[
            Step { x_cache: Some("MISS"), response_body: Some("v1"), calls: 1, ..GET },
            Step { x_cache: Some("MISS"), response_body: Some("v2"), calls: 2, ..GET },
        ],
    },
    Row {
        section: "RFC 9111 §3, §4.2.1",
        rule: "a final status other than 2xx with explicit freshness is stored",
        name: "status-404",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[
                Reply { status: 404, headers: &[MAX_AGE_60], body: "gone" },
                ok(&[], "back"),
            ],
        }],
        steps: &[
            Step { status: 404, x_cache: Some("MISS"), response_body: Some("gone"), calls: 1, ..GET },
            Step { status: 404, after_write: true, x_cache: Some("HIT"), response_body: Some("gone"), calls: 1, ..GET },
        ],
    },
    Row {
        section: "RFC 9110 §9.3.3, §6.4",
        rule: "a POST is forwarded with its body and not stored",
        name: "post",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[Reply { status: 201, headers: &[MAX_AGE_60], body: "created" }],
        }],
        steps: &[
            Step {
                method: "POST",
                body: "payload",
                status: 201,
                response_body: Some("created"),
                calls: 1,
                expect: &[("x-cache", None)],
                origin_got: Some("payload"),
                ..GET
            },
            Step {
                method: "POST",
                body: "again",
                status: 201,
                calls: 2,
                expect: &[("x-cache", None)],
                origin_got: Some("again"),
                ..GET
            },
        ],
    },
    Row {
        section: "RFC 9110 §7.6.1",
        rule: "hop-by-hop fields are removed in both directions",
        name: "hop-by-hop",
        through: PROXY_ONLY,
        origin: &[Script {
            path: "/r",
            replies: &[ok(
                &[MAX_AGE_60, ("connection", "x-foo"), ("x-foo", "1"), ("keep-alive", "timeout=5"), ("proxy-authenticate", "Basic")],
                "v1",
            )],
        }],
        steps: &[
            Step {
                headers: &[
                    ("connection", "x-bar"),
                    ("x-bar", "1"),
                    ("te", "trailers"),
                    ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"),
                    ("x-end-to-end", "kept"),
                ],
                x_cache: Some("MISS"),
                response_body: Some("v1"),
                calls: 1,
                expect: &[("connection", None), ("x-foo", None), ("keep-alive", None), ("proxy-authenticate", None)],
                origin_saw: &[
                    ("connection", None),
                    ("x-bar", None),
                    ("te", None),
                    ("proxy-authorization", None),
                    ("x-end-to-end", Some("kept")),
                ],
                ..GET
            },
            Step {
                after_write: true,
                x_cache: Some("HIT"),
                response_body: Some("v1"),
                calls: 1,
                expect: &[("connection", None), ("x-foo", None), ("keep-alive", None), ("proxy-authenticate", None)],
                ..GET
            },
        ],
    },
    Row {
        section: "RFC 9110 §7.2, §7.6.3; RFC 7239 §4",
        rule: "the proxy names the origin in Host, and itself in Via; it adds the client to X-Forwarded-For and Forwarded",
        name: "via",
        through: PROXY_ONLY,
        origin: &[
            Script { path: "/r", replies: &[ok(&[MAX_AGE_60], "v1")] },
            Script { path: "/chained", replies: &[ok(&[], "v1")] },
        ],
        steps: &[
            Step {
                headers: &[("host", "proxy.example")],
                x_cache: Some("MISS"),
                calls: 1,
                expect: &[("via", Some("1.1 tower-redis-cache"))],
                origin_saw: &[
                    ("host", Some(ORIGIN_HOST)),
                    ("via", Some("1.1 tower-redis-cache")),
                    ("x-forwarded-for", Some("127.0.0.1")),
                    ("x-forwarded-host", Some("proxy.example")),
                    ("x-forwarded-proto", Some("http")),
                    ("forwarded", Some("for=127.0.0.1;host=\"proxy.example\";proto=http")),
                ],
                ..GET
            },
            Step {
                headers: &[("host", "other.example")],
                after_write: true,
                x_cache: Some("HIT"),
                calls: 1,
                expect: &[("via", Some("1.1 tower-redis-cache"))],
                ..GET
            },
            Step {
                path: "/chained",
                // From a trusted peer (the runner's proxy trusts 127.0.0.1): the lists grow.
                headers: &[("host", "proxy.example"), ("via", "1.0 edge"), ("x-forwarded-for", "192.0.2.1"), ("forwarded", "for=192.0.2.1")],
                calls: 2,
                origin_saw: &[
                    ("via", Some("1.0 edge, 1.1 tower-redis-cache")),
                    ("x-forwarded-for", Some("192.0.2.1, 127.0.0.1")),
                    ("forwarded", Some("for=192.0.2.1, for=127.0.0.1;host=\"proxy.example\";proto=http")),
                ],
                ..GET
            },
        ],
    },
    // ---- Age calculation (RFC 9111 §4.2.3) ----
    Row {
        section: "RFC 9111 §4.2.3, §5.1",
        rule: "the age a response had on arrival counts: max-age=3600 with Age: 7200 is stale at once",
        name: "age-stale-on-arrival",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[
                ok(&[("cache-control", "max-age=3600"), ("age", "7200"), ("etag", "\"a\"")], "v1"),
                Reply { status: 304, headers: &[("etag", "\"a\"")], body: "" },
            ],
        }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step {
                after_write: true,
                x_cache: Some("REVALIDATED"),
                response_body: Some("v1"),
                calls: 2,
                origin_saw: &[("if-none-match", Some("\"a\""))],
                ..GET
            },
        ],
    },
    Row {
        section: "RFC 9111 §4.2.3, §5.1",
        rule: "a hit's Age is the current age: the origin's Age plus the time stored; an invalid Age is ignored",
        name: "age-current",
        through: BOTH,
        origin: &[
            Script { path: "/r", replies: &[ok(&[MAX_AGE_600, ("age", "100")], "v1")] },
            Script { path: "/bad", replies: &[ok(&[MAX_AGE_600, ("age", "-5")], "v1")] },
        ],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("HIT"), calls: 1, expect: &[("age", Some("100"))], ..GET },
            Step { path: "/bad", x_cache: Some("MISS"), calls: 2, ..GET },
            Step { path: "/bad", after_write: true, x_cache: Some("HIT"), calls: 2, expect: &[("age", Some("0"))], ..GET },
        ],
    },
    Row {
        section: "RFC 9111 §4.2.3, §4.2.1",
        rule: "Expires counts from the origin's Date, and the time since that Date is the response's age",
        name: "expires-dated-long-ago",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[
                ok(
                    &[
                        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                        ("expires", "Sun, 06 Nov 1994 09:49:37 GMT"),
                        ("etag", "\"a\""),
                    ],
                    "v1",
                ),
                Reply { status: 304, headers: &[("etag", "\"a\"")], body: "" },
            ],
        }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("REVALIDATED"), calls: 2, ..GET },
        ],
    },
    // ---- Storable statuses (RFC 9111 §3) ----
    Row {
        section: "RFC 9111 §3, RFC 9110 §15",
        rule: "with explicit freshness any understood final status is stored: 301, 410, 500",
        name: "statuses-explicit",
        through: BOTH,
        origin: &[
            Script { path: "/moved", replies: &[Reply { status: 301, headers: &[MAX_AGE_60, ("location", "/x")], body: "" }] },
            Script { path: "/gone", replies: &[Reply { status: 410, headers: &[("expires", "Fri, 01 Jan 2100 01:00:00 GMT"), ("date", "Fri, 01 Jan 2100 00:00:00 GMT")], body: "gone" }] },
            Script { path: "/err", replies: &[Reply { status: 500, headers: &[("cache-control", "s-maxage=60")], body: "oops" }] },
        ],
        steps: &[
            Step { path: "/moved", status: 301, x_cache: Some("MISS"), calls: 1, ..GET },
            Step { path: "/moved", status: 301, after_write: true, x_cache: Some("HIT"), calls: 1, expect: &[("location", Some("/x"))], ..GET },
            Step { path: "/gone", status: 410, x_cache: Some("MISS"), calls: 2, ..GET },
            Step { path: "/gone", status: 410, after_write: true, x_cache: Some("HIT"), response_body: Some("gone"), calls: 2, ..GET },
            Step { path: "/err", status: 500, x_cache: Some("MISS"), calls: 3, ..GET },
            Step { path: "/err", status: 500, after_write: true, x_cache: Some("HIT"), response_body: Some("oops"), calls: 3, ..GET },
        ],
    },
    // ---- Expires formats (RFC 9110 §5.6.7) ----
    Row {
        section: "RFC 9110 §5.6.7, RFC 9111 §5.3",
        rule: "Expires in asctime format or with wrong-case names is understood",
        name: "expires-formats",
        through: BOTH,
        origin: &[
            Script { path: "/asctime", replies: &[ok(&[("date", "Fri, 01 Jan 2100 00:00:00 GMT"), ("expires", "Fri Jan  1 01:00:00 2100")], "v1")] },
            Script { path: "/case", replies: &[ok(&[("date", "Fri, 01 Jan 2100 00:00:00 GMT"), ("expires", "fri, 01 JAN 2100 01:00:00 gmt")], "v1")] },
        ],
        steps: &[
            Step { path: "/asctime", x_cache: Some("MISS"), calls: 1, ..GET },
            Step { path: "/asctime", after_write: true, x_cache: Some("HIT"), calls: 1, ..GET },
            Step { path: "/case", x_cache: Some("MISS"), calls: 2, ..GET },
            Step { path: "/case", after_write: true, x_cache: Some("HIT"), calls: 2, ..GET },
        ],
    },
    Row {
        section: "RFC 9111 §5.3",
        rule: "an invalid Expires means already expired: stored only to revalidate",
        name: "expires-invalid",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[
                ok(&[("expires", "0"), ("etag", "\"a\"")], "v1"),
                Reply { status: 304, headers: &[("etag", "\"a\"")], body: "" },
            ],
        }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("REVALIDATED"), calls: 2, ..GET },
        ],
    },
    // ---- Invalidation (RFC 9111 §4.4) ----
    Row {
        section: "RFC 9111 §4.4",
        rule: "an extension method not known to be safe invalidates the URL and its same-origin Location",
        name: "invalidate-extension",
        through: BOTH,
        origin: &[
            Script { path: "/r", replies: &[ok(&[MAX_AGE_60], "v1"), ok(&[MAX_AGE_60], "v2")] },
            Script { path: "/other", replies: &[ok(&[MAX_AGE_60], "o1"), ok(&[MAX_AGE_60], "o2")] },
        ],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("HIT"), calls: 1, ..GET },
            Step { path: "/other", x_cache: Some("MISS"), calls: 2, ..GET },
            Step { path: "/other", after_write: true, x_cache: Some("HIT"), calls: 2, ..GET },
            Step { method: "M-SEARCH", path: "/r", calls: 3, ..GET },
            Step { x_cache: Some("MISS"), response_body: Some("v2"), calls: 4, ..GET },
            Step { method: "PURGE", path: "/other", calls: 5, ..GET },
            Step { path: "/other", x_cache: Some("MISS"), response_body: Some("o2"), calls: 6, ..GET },
        ],
    },
    // ---- Targeted fields (RFC 9213) ----
    Row {
        section: "RFC 9213 §2.1",
        rule: "CDN-Cache-Control is obeyed over Cache-Control and forwarded to the client",
        name: "cdn-cache-control",
        through: BOTH,
        origin: &[Script { path: "/r", replies: &[ok(&[("cache-control", "no-store"), ("cdn-cache-control", "max-age=60")], "v1")] }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, expect: &[("cdn-cache-control", Some("max-age=60"))], ..GET },
            Step { after_write: true, x_cache: Some("HIT"), calls: 1, expect: &[("cdn-cache-control", Some("max-age=60"))], ..GET },
        ],
    },
    Row {
        section: "RFC 9213 §2.1, RFC 8941 §3.2",
        rule: "a targeted field that is not a valid dictionary is ignored as a whole",
        name: "cdn-cache-control-invalid",
        through: BOTH,
        origin: &[Script { path: "/r", replies: &[ok(&[MAX_AGE_60, ("cdn-cache-control", "Max-Age=0, no-store")], "v1")] }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("HIT"), calls: 1, ..GET },
        ],
    },
    // ---- Conditional requests (RFC 9110 §13) ----
    Row {
        section: "RFC 9110 §13.1.3, §13.2.2",
        rule: "If-Modified-Since is answered with 304 from a stored response without Last-Modified, using its Date",
        name: "ims-date",
        through: BOTH,
        origin: &[Script { path: "/r", replies: &[ok(&[MAX_AGE_60, ("date", "Fri, 01 Jan 2100 00:00:00 GMT")], "v1")] }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("HIT"), calls: 1, ..GET },
            Step { headers: &[("if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT")], status: 304, x_cache: Some("HIT"), calls: 1, ..GET },
            Step { headers: &[("if-modified-since", "Thu, 31 Dec 2099 00:00:00 GMT")], status: 200, response_body: Some("v1"), calls: 1, ..GET },
        ],
    },
    Row {
        section: "RFC 9110 §13.1.2, §8.8.3.2",
        rule: "If-None-Match with a list, with *, and by weak comparison is answered with 304",
        name: "inm-lists",
        through: BOTH,
        origin: &[Script { path: "/r", replies: &[ok(&[MAX_AGE_60, ("etag", "W/\"b\"")], "v1")] }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("HIT"), calls: 1, ..GET },
            Step { headers: &[("if-none-match", "\"a\", \"b\"")], status: 304, calls: 1, ..GET },
            Step { headers: &[("if-none-match", "*")], status: 304, calls: 1, ..GET },
            Step { headers: &[("if-none-match", "\"c\"")], status: 200, response_body: Some("v1"), calls: 1, ..GET },
        ],
    },
    Row {
        section: "RFC 9111 §5.2.2.4, §4.3",
        rule: "a no-cache response is kept for validation even with no route TTL",
        name: "no-cache-zero-ttl",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[
                ok(&[("cache-control", "no-cache"), ("etag", "\"a\"")], "v1"),
                Reply { status: 304, headers: &[("etag", "\"a\"")], body: "" },
            ],
        }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step {
                after_write: true,
                x_cache: Some("REVALIDATED"),
                response_body: Some("v1"),
                calls: 2,
                origin_saw: &[("if-none-match", Some("\"a\""))],
                ..GET
            },
        ],
    },
    // ---- Range requests (RFC 9110 §14) ----
    Row {
        section: "RFC 9110 §14.1.2, §14.4, §15.3.7, §15.5.17",
        rule: "a single range of a stored response is answered from the store; an unsatisfiable one gets 416; several go to the origin",
        name: "range",
        through: BOTH,
        origin: &[Script { path: "/r", replies: &[ok(&[MAX_AGE_60], "0123456789")] }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("HIT"), calls: 1, ..GET },
            Step {
                headers: &[("range", "bytes=2-4")],
                status: 206,
                x_cache: Some("HIT"),
                response_body: Some("234"),
                calls: 1,
                expect: &[("content-range", Some("bytes 2-4/10")), ("content-length", Some("3"))],
                ..GET
            },
            Step { headers: &[("range", "bytes=-3")], status: 206, response_body: Some("789"), calls: 1, ..GET },
            Step { headers: &[("range", "bytes=7-")], status: 206, response_body: Some("789"), calls: 1, ..GET },
            Step { headers: &[("range", "bytes=20-")], status: 416, calls: 1, expect: &[("content-range", Some("bytes */10"))], ..GET },
            Step { headers: &[("range", "bytes=0-1, 4-5")], calls: 2, origin_saw: &[("range", Some("bytes=0-1, 4-5"))], ..GET },
            Step { headers: &[("range", "lines=1-2")], status: 200, response_body: Some("0123456789"), calls: 2, ..GET },
        ],
    },
    // ---- Vary normalisation ----
    Row {
        section: "RFC 9111 §4.1, RFC 9110 §12.5.3, §12.5.4",
        rule: "Accept-Encoding and Accept-Language values equal but for case, order, whitespace and q=1 select one variant",
        name: "vary-normalised",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[ok(&[MAX_AGE_60, ("vary", "Accept-Encoding, Accept-Language")], "v1"), ok(&[MAX_AGE_60, ("vary", "Accept-Encoding, Accept-Language")], "v2")],
        }],
        steps: &[
            Step { headers: &[("accept-encoding", "gzip, br"), ("accept-language", "en, fr;q=0.5")], x_cache: Some("MISS"), calls: 1, ..GET },
            Step {
                headers: &[("accept-encoding", "BR,gzip;q=1.0"), ("accept-language", "fr; q=0.50, EN")],
                after_write: true,
                x_cache: Some("HIT"),
                response_body: Some("v1"),
                calls: 1,
                ..GET
            },
            Step { headers: &[("accept-encoding", "gzip"), ("accept-language", "en, fr;q=0.5")], x_cache: Some("MISS"), response_body: Some("v2"), calls: 2, ..GET },
        ],
    },
    // ---- HEAD (RFC 9111 §4.3.5) ----
    Row {
        section: "RFC 9111 §4.3.5",
        rule: "a HEAD response with the same validator refreshes the stored GET response's headers",
        name: "head-refresh",
        through: BOTH,
        origin: &[Script {
            path: "/r",
            replies: &[
                ok(&[("cache-control", "max-age=0"), ("etag", "\"a\""), ("x-version", "1")], "v1"),
                Reply { status: 304, headers: &[("etag", "\"a\""), ("cache-control", "max-age=0")], body: "" },
                ok(&[MAX_AGE_60, ("etag", "\"a\""), ("x-version", "2")], ""),
            ],
        }],
        steps: &[
            Step { x_cache: Some("MISS"), calls: 1, ..GET },
            Step { after_write: true, x_cache: Some("REVALIDATED"), calls: 2, ..GET },
            Step { method: "HEAD", calls: 3, expect: &[("x-version", Some("2"))], ..GET },
            Step {
                after_write: true,
                x_cache: Some("HIT"),
                response_body: Some("v1"),
                calls: 3,
                expect: &[("x-version", Some("2"))],
                ..GET
            },
        ],
    },
];

// ---------------------------------------------------------------------------------------------
// The scripted origin

/// A request as the origin received it.
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// Serves every row's scripts, and records what it receives.
#[derive(Default)]
pub struct Origin {
    scripts: Mutex<Vec<(String, &'static [Reply])>>,
    seen: Mutex<Vec<Seen>>,
}

impl Origin {
    fn add_row(&self, row: &'static Row) {
        let mut scripts = self.scripts.lock().unwrap();
        for script in row.origin {
            scripts.push((format!("/{}{}", row.name, script.path), script.replies));
        }
    }

    async fn respond(&self, req: Request<Body>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let replies = self
            .scripts
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, replies)| *replies);
        let Some(replies) = replies else {
            let mut response = Response::new(Body::from(format!("no script for {path}")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            return response;
        };
        let reply = {
            let mut seen = self.seen.lock().unwrap();
            let n = seen.iter().filter(|s| s.path == path).count();
            seen.push(Seen {
                path,
                headers: parts.headers,
                body,
            });
            &replies[n.min(replies.len() - 1)]
        };
        let mut response = Response::new(Body::from(reply.body));
        *response.status_mut() = StatusCode::from_u16(reply.status).unwrap();
        for (name, value) in reply.headers {
            response.headers_mut().append(*name, value.parse().unwrap());
        }
        response
    }

    /// The origin's requests under `prefix` so far.
    fn calls(&self, prefix: &str) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|s| s.path.starts_with(prefix)).count()
    }

    /// Forgets the requests under `prefix` after the first `keep`.
    fn rewind(&self, prefix: &str, keep: usize) {
        let mut n = 0;
        self.seen.lock().unwrap().retain(|s| {
            if !s.path.starts_with(prefix) {
                return true;
            }
            n += 1;
            n <= keep
        });
    }

    /// The latest request under `prefix`: its headers and body.
    fn latest(&self, prefix: &str) -> Option<(HeaderMap, Bytes)> {
        let seen = self.seen.lock().unwrap();
        let last = seen.iter().rev().find(|s| s.path.starts_with(prefix))?;
        Some((last.headers.clone(), last.body.clone()))
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new().fallback_service(tower::service_fn(move |req: Request<Body>| {
            let origin = self.clone();
            async move { Ok::<_, std::convert::Infallible>(origin.respond(req).await) }
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// The runner

/// A response as the client saw it.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<not text>"))
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn send(client: &HttpClient, addr: SocketAddr, path: &str, step: &Step) -> Answer {
    let mut request = Request::builder()
        .method(Method::from_bytes(step.method.as_bytes()).unwrap())
        .uri(format!("http://{addr}{path}"));
    for (name, value) in step.headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::from(step.body)).unwrap();
    let response = client.request(request).await.expect("request failed");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("read body").to_bytes(),
    }
}

/// Runs one row's steps against `addr` (the app or the proxy).
async fn run_row(
    row: &'static Row,
    addr: SocketAddr,
    origin: &Origin,
    origin_host: &str,
) -> Result<(), String> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let prefix = format!("/{}/", row.name);
    for (i, step) in row.steps.iter().enumerate() {
        let path = format!("/{}{}", row.name, step.path);
        let calls_before = origin.calls(&prefix);
        let deadline = Instant::now() + Duration::from_secs(5);
        let answer = loop {
            let answer = send(&client, addr, &path, step).await;
            if step.after_write
                && answer.header("x-cache") == Some("MISS")
                && Instant::now() < deadline
            {
                // The previous response's write has not landed: undo this attempt's origin
                // request and ask again.
                origin.rewind(&prefix, calls_before);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            break answer;
        };
        let fail = |what: String| {
            Err(format!(
                "step {} ({} {path}): {what}; got {} {:?} {:?}",
                i + 1,
                step.method,
                answer.status,
                answer.headers,
                String::from_utf8_lossy(&answer.body)
            ))
        };
        if answer.status.as_u16() != step.status {
            return fail(format!("status {} != {}", answer.status, step.status));
        }
        if step.x_cache.is_some() && answer.header("x-cache") != step.x_cache {
            return fail(format!(
                "x-cache {:?} != {:?}",
                answer.header("x-cache"),
                step.x_cache
            ));
        }
        if step
            .response_body
            .is_some_and(|b| answer.body != b.as_bytes())
        {
            return fail(format!("body != {:?}", step.response_body));
        }
        let calls = origin.calls(&prefix);
        if step.calls != ANY && calls != step.calls {
            return fail(format!("origin calls {calls} != {}", step.calls));
        }
        for (name, value) in step.expect {
            if answer.header(name) != *value {
                return fail(format!("{name}: {:?} != {value:?}", answer.header(name)));
            }
        }
        let latest = origin.latest(&prefix);
        for (name, value) in step.origin_saw {
            let value = value.map(|v| if v == ORIGIN_HOST { origin_host } else { v });
            let saw = latest
                .as_ref()
                .and_then(|(headers, _)| headers.get(*name))
                .map(|v| v.to_str().unwrap_or("<not text>"));
            if saw != value {
                return fail(format!(
                    "the origin saw {name}: {saw:?}, expected {value:?}"
                ));
            }
        }
        if let Some(expected) = step.origin_got {
            let got = latest
                .as_ref()
                .map(|(_, body)| String::from_utf8_lossy(body));
            if got.as_deref() != Some(expected) {
                return fail(format!(
                    "the origin got body {got:?}, expected {expected:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Runs every row meant for `through` concurrently against `addr`, whose origin is `origin`;
/// reports every failing row.
pub async fn run_table(
    through: Through,
    addr: SocketAddr,
    origin: Arc<Origin>,
    origin_host: String,
) {
    let filter = std::env::var("HTTP_RULES").unwrap_or_default();
    let rows: Vec<&'static Row> = RULES
        .iter()
        .filter(|row| row.through.contains(&through) && row.name.contains(&filter))
        .collect();
    for row in &rows {
        origin.add_row(row);
    }
    let origin_host: Arc<str> = origin_host.into();
    let runs: Vec<_> = rows
        .iter()
        .map(|&row| {
            let (origin, origin_host) = (origin.clone(), origin_host.clone());
            (
                row,
                tokio::spawn(async move { run_row(row, addr, &origin, &origin_host).await }),
            )
        })
        .collect();
    let mut failures = Vec::new();
    for (row, run) in runs {
        let outcome = run
            .await
            .unwrap_or_else(|panic| Err(format!("panicked: {panic}")));
        if let Err(e) = outcome {
            failures.push(format!(
                "[{}] {} ({}): {e}",
                row.section, row.rule, row.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed through the {through:?}:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}
