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
            Bypass(crate::observe::Bypass::Authorization),
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
            Bypass(crate::observe::Bypass::NoStore),
            false,
        ),
        (
            Method::GET,
            &[("cookie", "session=abc")],
            Bypass(crate::observe::Bypass::Cookie),
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
                    &CacheControl::for_cache(&h, &DEFAULT_TARGETED),
                    *authorized,
                )
                .ok()
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
        storable_ttl(
            &route_ttl,
            ok,
            &h,
            &CacheControl::for_cache(&h, &DEFAULT_TARGETED),
            false
        )
        .ok(),
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
            &CacheControl::for_cache(&headers(stored), &DEFAULT_TARGETED),
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
            grace(
                rules,
                &CacheControl::for_cache(&headers(input), &DEFAULT_TARGETED)
            ),
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
        grace(&no_origin, &CacheControl::for_cache(&h, &DEFAULT_TARGETED)),
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

#[test]
fn age_values_first_valid_and_saturating() {
    let cases: &[(Pairs, Option<u64>)] = &[
        (&[], None),
        (&[("age", "120")], Some(120)),
        (&[("age", " 7 ")], Some(7)),
        (&[("age", "-5")], None),
        (&[("age", "60;x=1")], None),
        (&[("age", "abc"), ("age", "30")], Some(30)),
        (&[("age", "10"), ("age", "99")], Some(10)),
        (&[("age", "99999999999999999999999")], Some(MAX_DELTA_SECS)),
    ];
    for (input, expected) in cases {
        assert_eq!(age_value(&headers(input)), *expected, "{input:?}");
    }
}

#[test]
fn initial_age_is_the_larger_of_apparent_and_corrected_age() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    let date = |s: u64| httpdate::fmt_http_date(at(s));
    let h = |pairs: &[(&'static str, String)]| {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(*n, HeaderValue::from_str(v).unwrap());
        }
        map
    };
    let (sent, received) = (at(1_000_000), at(1_000_002));
    // Age plus the request's 2 s delay.
    let age_only = h(&[("age", "100".into())]);
    assert_eq!(
        initial_age(&age_only, sent, received),
        Duration::from_secs(102)
    );
    // Date 50 s before arrival, no Age: apparent age.
    let dated = h(&[("date", date(1_000_002 - 50))]);
    assert_eq!(initial_age(&dated, sent, received), Duration::from_secs(50));
    // Both: the larger.
    let both = h(&[("date", date(1_000_002 - 50)), ("age", "10".into())]);
    assert_eq!(initial_age(&both, sent, received), Duration::from_secs(50));
    // A Date in the future (clock skew) is no age at all.
    let future = h(&[("date", date(1_000_500))]);
    assert_eq!(initial_age(&future, sent, received), Duration::from_secs(2));
    let _ = SystemTime::now();
}

#[test]
fn http_dates_in_all_three_formats_and_any_case() {
    use super::date::http_date;
    let expected = http_date(&HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"));
    assert!(expected.is_some());
    for text in [
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        "sun, 06 NOV 1994 08:49:37 gmt",
        "SUNDAY, 06-nov-94 08:49:37 GMT",
        "sun nov  6 08:49:37 1994",
    ] {
        assert_eq!(
            http_date(&HeaderValue::from_static(text)),
            expected,
            "{text}"
        );
    }
    for invalid in ["0", "-1", "yesterday", "Sun, 06 Nov 1994"] {
        assert_eq!(
            http_date(&HeaderValue::from_static(invalid)),
            None,
            "{invalid}"
        );
    }
}

#[test]
fn expires_in_any_format_sets_the_lifetime_and_an_invalid_one_means_expired() {
    let rules = Rules {
        ttl: Duration::from_secs(60),
        ..Rules::default()
    };
    let ttl = |pairs: &[(&'static str, &'static str)]| {
        let h = headers(pairs);
        storable_ttl(
            &rules,
            StatusCode::OK,
            &h,
            &CacheControl::for_cache(&h, &DEFAULT_TARGETED),
            false,
        )
        .ok()
    };
    let date = ("date", "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(
        ttl(&[date, ("expires", "sun, 06 nov 1994 08:59:37 GMT")]),
        Some(Duration::from_secs(600))
    );
    assert_eq!(
        ttl(&[date, ("expires", "Sunday, 06-Nov-94 09:49:37 GMT")]),
        Some(Duration::from_secs(3600))
    );
    assert_eq!(
        ttl(&[date, ("expires", "Sun Nov  6 08:50:37 1994")]),
        Some(Duration::from_secs(60))
    );
    assert_eq!(
        ttl(&[date, ("expires", "0")]),
        None,
        "invalid: already expired"
    );
}

#[test]
fn explicit_freshness_lets_any_understood_final_status_be_stored() {
    let rules = Rules::default();
    let ttl = |status: u16, pairs: &[(&'static str, &'static str)]| {
        let h = headers(pairs);
        let cc = CacheControl::for_cache(&h, &DEFAULT_TARGETED);
        storable_ttl(
            &rules,
            StatusCode::from_u16(status).unwrap(),
            &h,
            &cc,
            false,
        )
        .ok()
    };
    let secs = |s| Some(Duration::from_secs(s));
    for status in [301, 302, 307, 308, 404, 410, 500, 503] {
        assert_eq!(
            ttl(status, &[("cache-control", "max-age=30")]),
            secs(30),
            "{status}"
        );
        assert_eq!(
            ttl(status, &[("cache-control", "s-maxage=40")]),
            secs(40),
            "{status}"
        );
        // Without explicit freshness the route's 2xx set governs.
        assert_eq!(ttl(status, &[]), None, "{status}");
        assert_eq!(
            ttl(status, &[("cache-control", "public")]),
            None,
            "{status}"
        );
    }
    for never in [206, 304] {
        assert_eq!(
            ttl(never, &[("cache-control", "max-age=30")]),
            None,
            "{never}"
        );
    }
    // A status the cache does not understand.
    assert_eq!(
        ttl(299, &[("cache-control", "max-age=30")]),
        secs(60),
        "route set, route TTL"
    );
    assert_eq!(ttl(599, &[("cache-control", "max-age=30")]), None);
}

#[test]
fn heuristic_freshness_is_an_opt_in_fraction_of_the_time_since_last_modified() {
    let off = Rules {
        ttl: Duration::ZERO,
        ..Rules::default()
    };
    let on = Rules {
        heuristic_fraction: Some(0.1),
        ..off.clone()
    };
    let ttl = |rules: &Rules, status: u16, pairs: &[(&'static str, &'static str)]| {
        let h = headers(pairs);
        let cc = CacheControl::for_cache(&h, &DEFAULT_TARGETED);
        storable_ttl(rules, StatusCode::from_u16(status).unwrap(), &h, &cc, false).ok()
    };
    let dated = [
        ("date", "Sun, 06 Nov 1994 18:49:37 GMT"),
        ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ];
    // Off: stale at once, kept only to revalidate with its Last-Modified.
    assert_eq!(ttl(&off, 200, &dated), Some(Duration::ZERO));
    assert_eq!(ttl(&on, 200, &dated), Some(Duration::from_secs(3600)));
    assert_eq!(
        ttl(&on, 404, &dated),
        Some(Duration::from_secs(3600)),
        "heuristically cacheable"
    );
    assert_eq!(ttl(&on, 302, &dated), None, "302 is not");
    let public = [dated[0], dated[1], ("cache-control", "public")];
    assert_eq!(
        ttl(&on, 302, &public),
        Some(Duration::from_secs(3600)),
        "unless public"
    );
    assert_eq!(
        ttl(&on, 200, &dated[..1]),
        None,
        "no Last-Modified, no heuristic"
    );
}

#[test]
fn a_no_cache_response_with_a_validator_is_kept_for_validation_without_a_route_ttl() {
    let proxy = Rules {
        ttl: Duration::ZERO,
        ..Rules::default()
    };
    let ttl = |pairs: &[(&'static str, &'static str)]| {
        let h = headers(pairs);
        storable_ttl(
            &proxy,
            StatusCode::OK,
            &h,
            &CacheControl::for_cache(&h, &DEFAULT_TARGETED),
            false,
        )
        .ok()
    };
    assert_eq!(
        ttl(&[("cache-control", "no-cache"), ("etag", "\"a\"")]),
        Some(Duration::ZERO)
    );
    assert_eq!(
        ttl(&[("cache-control", "no-cache")]),
        None,
        "nothing to validate with"
    );
    assert_eq!(ttl(&[]), None, "no explicit freshness, no route TTL");
}

#[test]
fn targeted_fields_win_in_order_and_an_invalid_one_is_ignored_whole() {
    use http::HeaderName;
    let cc = |pairs: &[(&'static str, &'static str)], targeted: &[HeaderName]| {
        CacheControl::for_cache(&headers(pairs), targeted)
    };
    let base = ("cache-control", "max-age=10");
    let cdn = ("cdn-cache-control", "max-age=60");
    assert_eq!(cc(&[base, cdn], &DEFAULT_TARGETED).max_age, Some(60));
    assert_eq!(
        cc(&[base, cdn], &[]).max_age,
        Some(10),
        "no targeted fields obeyed"
    );
    let own = [
        HeaderName::from_static("my-cache-control"),
        DEFAULT_TARGETED[0].clone(),
    ];
    assert_eq!(
        cc(&[base, cdn, ("my-cache-control", "max-age=5")], &own).max_age,
        Some(5)
    );
    for invalid in [
        "Max-Age=60",
        "max-age=6 0",
        "max-age=\"60",
        "max-age=60,,",
        "max-age=1.2345",
    ] {
        let got = cc(&[base, ("cdn-cache-control", invalid)], &DEFAULT_TARGETED);
        assert_eq!(got.max_age, Some(10), "{invalid} is not a dictionary");
    }
    for valid in [
        "max-age=60, private",
        "no-store",
        "max-age=60;a=1, x=?1, y=\"s\", z=tok/1",
    ] {
        assert!(crate::cache_control::is_sf_dictionary(valid), "{valid}");
    }
}

#[test]
fn range_answers_from_a_stored_body() {
    use super::range::{answer, is_multi_range, RangeAnswer::*};
    let stored = headers(&[
        ("etag", "\"v1\""),
        ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ]);
    let cases: &[(Pairs, super::range::RangeAnswer)] = &[
        (&[], Full),
        (&[("range", "bytes=0-4")], Partial { start: 0, end: 4 }),
        (&[("range", "bytes=5-")], Partial { start: 5, end: 9 }),
        (&[("range", "bytes=-3")], Partial { start: 7, end: 9 }),
        (&[("range", "bytes=-30")], Partial { start: 0, end: 9 }),
        (&[("range", "bytes=8-100")], Partial { start: 8, end: 9 }),
        (&[("range", "bytes=10-")], Unsatisfiable),
        (&[("range", "bytes=-0")], Unsatisfiable),
        (&[("range", "bytes=5-2")], Full),
        (&[("range", "items=0-4")], Full),
        (&[("range", "bytes=a-b")], Full),
        (
            &[("range", "bytes=0-4"), ("if-range", "\"v1\"")],
            Partial { start: 0, end: 4 },
        ),
        (&[("range", "bytes=0-4"), ("if-range", "\"v2\"")], Full),
        (&[("range", "bytes=0-4"), ("if-range", "W/\"v1\"")], Full),
        (
            &[
                ("range", "bytes=0-4"),
                ("if-range", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ],
            Partial { start: 0, end: 4 },
        ),
        (
            &[
                ("range", "bytes=0-4"),
                ("if-range", "Mon, 07 Nov 1994 08:49:37 GMT"),
            ],
            Full,
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(
            answer(&headers(request), &stored, 10),
            *expected,
            "{request:?}"
        );
    }
    assert!(is_multi_range(&headers(&[("range", "bytes=0-1, 4-5")])));
    assert!(!is_multi_range(&headers(&[("range", "bytes=0-1")])));
}

#[test]
fn every_method_not_known_safe_invalidates() {
    let rules = Rules::default();
    for method in [
        "POST", "PUT", "PATCH", "DELETE", "M-SEARCH", "PURGE", "LOCK",
    ] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let plan = classify_request(&rules, &method, &HeaderMap::new());
        assert_eq!(plan.action, RequestAction::Invalidate, "{method}");
    }
    for method in [Method::OPTIONS, Method::TRACE] {
        let plan = classify_request(&rules, &method, &HeaderMap::new());
        assert_eq!(plan.action, RequestAction::Pass, "{method}");
    }
    let multi = headers(&[("range", "bytes=0-1,3-4")]);
    assert_eq!(
        classify_request(&rules, &Method::GET, &multi).action,
        RequestAction::Pass
    );
}
