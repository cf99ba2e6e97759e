//! Table tests of the HTTP rules.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};

use super::freshness::*;
use super::request::*;
use super::tags::*;
use crate::cache_control::CacheControl;
use crate::settings::*;

/// Header pairs in a table row.
type Pairs = &'static [(&'static str, &'static str)];

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_static(value));
    }
    map
}

#[test]
fn cache_control_parsing_table() {
    let cases: &[(&[(&str, &str)], CacheControl)] = &[
        (&[], CacheControl::default()),
        (
            &[("cache-control", "No-Store")],
            CacheControl {
                no_store: true,
                ..Default::default()
            },
        ),
        (
            &[
                ("cache-control", "max-age=10, S-MAXAGE=20"),
                ("cache-control", "max-age=99"),
            ],
            CacheControl {
                max_age: Some(10),
                s_maxage: Some(20),
                ..Default::default()
            },
        ),
        (
            &[("cache-control", "max-age=\"30\"")],
            CacheControl {
                max_age: Some(30),
                ..Default::default()
            },
        ),
        (
            &[("cache-control", "max-age=ten, foo=\"a,private\"")],
            CacheControl::default(),
        ),
        (
            &[("cache-control", "private=\"set-cookie, x\", public")],
            CacheControl {
                private: true,
                public: true,
                ..Default::default()
            },
        ),
        (
            &[("cache-control", " , no-cache ,, ")],
            CacheControl {
                no_cache: true,
                ..Default::default()
            },
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(&CacheControl::parse(&headers(input)), expected, "{input:?}");
    }
}

#[test]
fn request_classification_table() {
    use RequestAction::*;
    let rules = Rules::default();
    let cases: &[(Method, Pairs, RequestAction, bool)] = &[
        (Method::GET, &[], Lookup, false),
        (Method::POST, &[], Invalidate, false),
        (Method::DELETE, &[], Invalidate, false),
        (Method::OPTIONS, &[], Pass, false),
        (Method::HEAD, &[], HeadLookup, false),
        (Method::HEAD, &[("authorization", "Bearer x")], Pass, true),
        (Method::GET, &[("authorization", "Bearer x")], Lookup, true),
        (
            Method::GET,
            &[("authorization", "Bearer x"), ("cache-control", "no-cache")],
            Bypass(BypassReason::Authorization),
            true,
        ),
        (
            Method::GET,
            &[("proxy-authorization", "Basic x")],
            Lookup,
            true,
        ),
        (
            Method::HEAD,
            &[("proxy-authorization", "Basic x")],
            Pass,
            true,
        ),
        (
            Method::GET,
            &[("Cache-Control", "NO-STORE")],
            Bypass(BypassReason::NoStore),
            false,
        ),
        (
            Method::GET,
            &[("cookie", "session=abc")],
            Bypass(BypassReason::Cookie),
            false,
        ),
        (Method::HEAD, &[("cookie", "session=abc")], Pass, false),
        (
            Method::GET,
            &[("cache-control", "no-cache")],
            Refresh,
            false,
        ),
        (Method::GET, &[("pragma", "no-cache")], Refresh, false),
        (
            Method::GET,
            &[("pragma", "no-cache"), ("cache-control", "max-age=5")],
            Lookup,
            false,
        ),
    ];
    for (method, input, action, authorized) in cases {
        let plan = classify_request(&rules, method, &headers(input));
        assert_eq!(
            (plan.action, plan.authorized),
            (*action, *authorized),
            "{method} {input:?}"
        );
    }
    let no_refresh = Rules {
        honor_request_no_cache: false,
        ..Rules::default()
    };
    let h = headers(&[("cache-control", "no-cache, max-age=0, min-fresh=9")]);
    let plan = classify_request(&no_refresh, &Method::GET, &h);
    assert_eq!(plan.action, Lookup);
    assert_eq!(
        (plan.directives.max_age, plan.directives.min_fresh),
        (None, None)
    );
}

#[test]
fn storability_table() {
    let rules = Rules::default();
    let ok = StatusCode::OK;
    let secs = |s| Some(Duration::from_secs(s));
    let cases: &[(StatusCode, Pairs, bool, Option<Duration>)] = &[
        (ok, &[], false, secs(60)),
        (StatusCode::NOT_FOUND, &[], false, None),
        (StatusCode::NO_CONTENT, &[], false, secs(60)),
        (ok, &[("set-cookie", "a=b")], false, None),
        (ok, &[("cache-control", "Private")], false, None),
        (ok, &[("cache-control", "no-store")], false, None),
        (ok, &[("vary", "accept-encoding, *")], false, None),
        (ok, &[("cache-control", "max-age=5")], false, secs(5)),
        (
            ok,
            &[("cache-control", "max-age=5, s-maxage=9")],
            false,
            secs(9),
        ),
        (ok, &[("cache-control", "max-age=0")], false, None),
        (ok, &[("cache-control", "no-cache")], false, secs(60)),
        (
            ok,
            &[
                ("date", "Tue, 01 Jan 2030 00:00:00 GMT"),
                ("expires", "Tue, 01 Jan 2030 00:01:40 GMT"),
            ],
            false,
            secs(100),
        ),
        (ok, &[("expires", "0")], false, None),
        (
            ok,
            &[("cache-control", "max-age=7"), ("expires", "0")],
            false,
            secs(7),
        ),
        (ok, &[], true, None),
        (ok, &[("cache-control", "public")], true, secs(60)),
        (ok, &[("cache-control", "s-maxage=30")], true, secs(30)),
        (
            ok,
            &[
                ("cache-control", "private"),
                ("cdn-cache-control", "max-age=90"),
            ],
            false,
            secs(90),
        ),
        (
            ok,
            &[
                ("cache-control", "max-age=5"),
                ("surrogate-control", "no-store"),
            ],
            false,
            None,
        ),
    ];
    for (status, input, authorized, expected) in cases {
        assert_eq!(
            {
                let h = headers(input);
                storable_ttl(
                    &rules,
                    *status,
                    &h,
                    &CacheControl::for_cache(&h),
                    *authorized,
                )
            },
            *expected,
            "{status} {input:?}"
        );
    }
    let route_ttl = Rules {
        honor_origin_ttl: false,
        ..Rules::default()
    };
    let h = headers(&[("cache-control", "max-age=5")]);
    assert_eq!(
        storable_ttl(&route_ttl, ok, &h, &CacheControl::for_cache(&h), false),
        secs(60)
    );
}

#[test]
fn judging_a_stored_response_table() {
    use Verdict::*;
    let secs = Duration::from_secs;
    let rules = Rules {
        stale_while_revalidate: secs(10),
        stale_if_error: secs(100),
        ..Rules::default()
    };
    let plan = |req: &[(&'static str, &'static str)]| {
        classify_request(&rules, &Method::GET, &headers(req))
    };
    // (request, stored, age, ttl) -> verdict
    let cases: &[(Pairs, Pairs, u64, u64, Verdict)] = &[
        (&[], &[], 5, 60, Fresh),
        (
            &[],
            &[("cache-control", "no-cache")],
            5,
            60,
            Validate { if_error: false },
        ),
        (
            &[("cache-control", "max-age=3")],
            &[],
            5,
            60,
            Validate { if_error: false },
        ),
        (
            &[("cache-control", "min-fresh=58")],
            &[],
            5,
            60,
            Validate { if_error: false },
        ),
        (&[("cache-control", "min-fresh=50")], &[], 5, 60, Fresh),
        (&[], &[], 65, 60, StaleWhileRevalidate),
        (&[], &[], 80, 60, Validate { if_error: true }),
        (&[], &[], 200, 60, Validate { if_error: false }),
        (
            &[("cache-control", "max-stale")],
            &[],
            500,
            60,
            StaleAccepted,
        ),
        (
            &[("cache-control", "max-stale=10")],
            &[],
            65,
            60,
            StaleAccepted,
        ),
        (
            &[("cache-control", "max-stale=10")],
            &[],
            80,
            60,
            Validate { if_error: true },
        ),
        (
            &[("cache-control", "max-stale")],
            &[("cache-control", "must-revalidate")],
            65,
            60,
            Validate { if_error: false },
        ),
        (&[("authorization", "x")], &[], 5, 60, Unusable),
        (
            &[("authorization", "x")],
            &[("cache-control", "public")],
            5,
            60,
            Fresh,
        ),
    ];
    for (request, stored, age, ttl, expected) in cases {
        let verdict = judge(
            &rules,
            &plan(request),
            &CacheControl::for_cache(&headers(stored)),
            secs(*age),
            secs(*ttl),
        );
        assert_eq!(
            verdict, *expected,
            "request {request:?} stored {stored:?} age {age} ttl {ttl}"
        );
    }
}

#[test]
fn same_origin_targets() {
    let request: Uri = "/items/1".parse().unwrap();
    let host = HeaderValue::from_static("example.com");
    let target =
        |v: &'static str| same_origin_target(&HeaderValue::from_static(v), &request, Some(&host));
    assert_eq!(target("/items/2"), Some("/items/2".parse().unwrap()));
    assert_eq!(
        target("http://example.com/items/3?x=1").map(|u| u.path().to_owned()),
        Some("/items/3".into())
    );
    assert_eq!(target("https://evil.example/items/1"), None);
    assert_eq!(target("relative"), None);
}

#[test]
fn grace_table() {
    let secs = Duration::from_secs;
    let route = Rules {
        stale_while_revalidate: secs(5),
        stale_if_error: secs(7),
        ..Rules::default()
    };
    let cases: &[(&Rules, Pairs, (u64, u64))] = &[
        (&route, &[], (5, 7)),
        (
            &route,
            &[(
                "cache-control",
                "stale-while-revalidate=30, stale-if-error=1",
            )],
            (30, 7),
        ),
        (
            &route,
            &[(
                "cache-control",
                "max-age=5, Must-Revalidate, stale-if-error=60",
            )],
            (0, 0),
        ),
        (&route, &[("cache-control", "proxy-revalidate")], (0, 0)),
        (
            &Rules::default(),
            &[("cache-control", "stale-if-error=9")],
            (0, 9),
        ),
    ];
    for (rules, input, (revalidate, if_error)) in cases {
        let expected = Grace {
            revalidate: secs(*revalidate),
            if_error: secs(*if_error),
        };
        assert_eq!(
            grace(rules, &CacheControl::for_cache(&headers(input))),
            expected,
            "{input:?}"
        );
    }
    let no_origin = Rules {
        honor_origin_ttl: false,
        ..Rules::default()
    };
    let h = headers(&[("cache-control", "stale-while-revalidate=30")]);
    assert_eq!(
        grace(&no_origin, &CacheControl::for_cache(&h)),
        Grace::default()
    );
}

#[test]
fn response_tags_from_both_headers() {
    let h = headers(&[
        ("Cache-Tag", "a, b"),
        ("surrogate-key", "c  d"),
        ("cache-tag", ""),
    ]);
    assert_eq!(response_tags(&h), ["a", "b", "c", "d"]);
}

#[test]
fn status_set_membership() {
    let set = StatusSet::from_codes([200, 203, 404]);
    assert!(set.contains(StatusCode::NOT_FOUND));
    assert!(!set.contains(StatusCode::CREATED));
}
