//! The `Cache-Control` family of fields, parsed once: the request's directives, and a
//! response's (from `CDN-Cache-Control` / `Surrogate-Control` when present, RFC 9213). Every
//! delta-seconds value is clamped to 2^31 s.

use http::header::CACHE_CONTROL;
use http::{HeaderMap, HeaderName};

use crate::settings::MAX_DELTA_SECS;

/// The directives of the `Cache-Control` header fields that the layer acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct CacheControl {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
    pub(crate) must_revalidate: bool,
    pub(crate) stale_while_revalidate: Option<u64>,
    pub(crate) stale_if_error: Option<u64>,
    /// Request only: `max-stale`, with its limit (`Some(None)`: any staleness).
    pub(crate) max_stale: Option<Option<u64>>,
    /// Request only: `min-fresh`.
    pub(crate) min_fresh: Option<u64>,
    /// Request only: `only-if-cached`.
    pub(crate) only_if_cached: bool,
}

impl CacheControl {
    /// Parses every `Cache-Control` field line. Names are case-insensitive; unknown or
    /// malformed directives are ignored; for a repeated numeric directive the first wins.
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        Self::parse_field(headers, &CACHE_CONTROL)
    }

    /// The directives this cache obeys on a response (RFC 9213 §2.1): those of the first of
    /// the `targeted` fields (in priority order) that is present and valid, which then replace
    /// `Cache-Control` for this cache alone; otherwise `Cache-Control`. A targeted field that
    /// is not a valid Structured Fields dictionary is ignored as a whole.
    pub(crate) fn for_cache(headers: &HeaderMap, targeted: &[HeaderName]) -> Self {
        let valid = |name: &&HeaderName| {
            let mut values = headers.get_all(*name).iter().peekable();
            values.peek().is_some() && values.all(|v| v.to_str().is_ok_and(is_sf_dictionary))
        };
        match targeted.iter().find(valid) {
            Some(name) => Self::parse_field(headers, name),
            None => Self::parse(headers),
        }
    }

    fn parse_field(headers: &HeaderMap, field: &HeaderName) -> Self {
        let mut cc = Self::default();
        for value in headers.get_all(field) {
            let Ok(value) = value.to_str() else { continue };
            for directive in split_list(value) {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive, None),
                };
                // Digits only (no sign); values past 2^31 s mean "very long" (RFC 9111
                // §1.2.2), including those too large for any integer type.
                let seconds = || {
                    arg.filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()))
                        .map(|a| {
                            a.parse::<u64>()
                                .map_or(MAX_DELTA_SECS, |s| s.min(MAX_DELTA_SECS))
                        })
                };
                if name.eq_ignore_ascii_case("no-store") {
                    cc.no_store = true;
                } else if name.eq_ignore_ascii_case("no-cache") {
                    // `no-cache="field"` limits the directive to fields; storing any part
                    // of such a response would need per-field handling, so treat it whole.
                    cc.no_cache = true;
                } else if name.eq_ignore_ascii_case("private") {
                    cc.private = true;
                } else if name.eq_ignore_ascii_case("public") {
                    cc.public = true;
                } else if name.eq_ignore_ascii_case("max-age") {
                    cc.max_age = cc.max_age.or_else(seconds);
                } else if name.eq_ignore_ascii_case("s-maxage") {
                    cc.s_maxage = cc.s_maxage.or_else(seconds);
                } else if name.eq_ignore_ascii_case("must-revalidate")
                    || name.eq_ignore_ascii_case("proxy-revalidate")
                {
                    cc.must_revalidate = true;
                } else if name.eq_ignore_ascii_case("stale-while-revalidate") {
                    cc.stale_while_revalidate = cc.stale_while_revalidate.or_else(seconds);
                } else if name.eq_ignore_ascii_case("stale-if-error") {
                    cc.stale_if_error = cc.stale_if_error.or_else(seconds);
                } else if name.eq_ignore_ascii_case("max-stale") {
                    // Without a value: any staleness; with a malformed one: ignored.
                    match arg {
                        None => cc.max_stale = cc.max_stale.or(Some(None)),
                        Some(_) => cc.max_stale = cc.max_stale.or(seconds().map(Some)),
                    }
                } else if name.eq_ignore_ascii_case("min-fresh") {
                    cc.min_fresh = cc.min_fresh.or_else(seconds);
                } else if name.eq_ignore_ascii_case("only-if-cached") {
                    cc.only_if_cached = true;
                }
            }
        }
        cc
    }
}

/// Splits a comma-separated header list, ignoring commas inside quoted strings, trimming
/// whitespace and dropping empty elements.
pub(crate) fn split_list(value: &str) -> impl Iterator<Item = &str> {
    split_outside_quotes(value, ',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

impl CacheControl {
    /// RFC 9111 §3.5: directives that let a shared cache reuse a response to a request with
    /// `Authorization`.
    pub(crate) fn shareable_when_authorized(&self) -> bool {
        self.public || self.s_maxage.is_some() || self.must_revalidate
    }
}

/// Whether `value` parses as a Structured Fields dictionary (RFC 8941 §3.2), the syntax of
/// targeted cache-control fields: lower-case keys, each bare (true) or with an integer,
/// decimal, string, token or boolean value, and parameters of the same kind.
pub(crate) fn is_sf_dictionary(value: &str) -> bool {
    let value = value.trim_matches(|c| c == ' ' || c == '\t');
    if value.is_empty() {
        return true;
    }
    split_members(value).all(|member| {
        let mut parts = split_params(member.trim_matches(|c| c == ' ' || c == '\t'));
        let Some(head) = parts.next() else {
            return false;
        };
        let item_ok = match head.split_once('=') {
            Some((key, item)) => is_sf_key(key) && is_bare_item(item),
            None => is_sf_key(head),
        };
        item_ok
            && parts.all(|param| match param.trim_start().split_once('=') {
                Some((key, item)) => is_sf_key(key) && is_bare_item(item),
                None => is_sf_key(param.trim_start()),
            })
    })
}

/// Splits on `sep` outside quoted strings.
fn split_outside_quotes(value: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut in_quotes = false;
    let mut escaped = false;
    value.split(move |c: char| {
        if escaped {
            escaped = false;
        } else if in_quotes && c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_quotes = !in_quotes;
        } else if c == sep && !in_quotes {
            return true;
        }
        false
    })
}

fn split_members(value: &str) -> impl Iterator<Item = &str> {
    split_outside_quotes(value, ',')
}

fn split_params(member: &str) -> impl Iterator<Item = &str> {
    split_outside_quotes(member, ';')
}

fn is_sf_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.' | b'*')
        })
}

fn is_bare_item(item: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let number = item.strip_prefix('-').unwrap_or(item);
    match item.as_bytes().first() {
        Some(b'"') => {
            item.len() >= 2
                && item.ends_with('"')
                && item[1..item.len() - 1]
                    .bytes()
                    .all(|b| (0x20..0x7f).contains(&b))
        }
        Some(b'?') => item == "?0" || item == "?1",
        Some(b) if b.is_ascii_alphabetic() || *b == b'*' => item
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b)),
        _ => match number.split_once('.') {
            None => digits(number) && number.len() <= 15,
            Some((int, frac)) => digits(int) && digits(frac) && int.len() <= 12 && frac.len() <= 3,
        },
    }
}
