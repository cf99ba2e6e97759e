//! How the cache treats a request (RFC 9111 §5.2.1, §3.5, §4.4, plus the route's settings).

use http::header::{AUTHORIZATION, CACHE_CONTROL, PRAGMA, PROXY_AUTHORIZATION};
use http::{HeaderMap, HeaderValue, Method, Uri};

use crate::cache_control::{split_list, CacheControl};
use crate::key;
pub(crate) use crate::observe::Bypass;
use crate::settings::{CookieRule, Rules};

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestAction {
    /// Not the cache's business: call the handler, leave the response untouched.
    Pass,
    /// A method not known to be safe (POST, PUT, PATCH, DELETE, extension methods) the route
    /// does not cache: call the handler; on success drop the stored GET entries of the URL
    /// (RFC 9111 §4.4).
    Invalidate,
    /// A HEAD request: answer from a fresh GET entry if there is one, else pass.
    HeadLookup,
    /// Call the handler, store nothing, say `X-Cache: BYPASS` (and why).
    Bypass(Bypass),
    /// Call the handler without looking up, then store (`X-Cache: REFRESH`).
    Refresh,
    /// Look up; on a miss call the handler and store.
    Lookup,
}

/// How the cache treats a request, and what the request asks of a stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestPlan {
    pub(crate) action: RequestAction,
    /// The request carries `Authorization`: only responses marked shareable (`public`,
    /// `s-maxage`, `must-revalidate`) may be served to it or stored from it (RFC 9111 §3.5).
    pub(crate) authorized: bool,
    /// The request's `Cache-Control` (client limits on age and staleness).
    pub(crate) directives: CacheControl,
}

/// Decides how the cache treats a request (RFC 9111 §5.2.1, plus the route's rules).
pub(crate) fn classify_request(rules: &Rules, method: &Method, headers: &HeaderMap) -> RequestPlan {
    let mut cc = CacheControl::parse(headers);
    // Proxy credentials are credentials too: a reply to them is as personal.
    let authorized = (headers.contains_key(AUTHORIZATION)
        || headers.contains_key(PROXY_AUTHORIZATION))
        && !rules.cache_authorized;
    let personal_cookie = personal_cookie(&rules.cookies, headers);
    let has_cache_control = headers.contains_key(CACHE_CONTROL);
    if !rules.honor_request_no_cache {
        // The route does not let clients force handler calls: drop every directive that
        // would (`no-cache`, and `max-age` / `min-fresh` that reject a stored response).
        cc.no_cache = false;
        cc.max_age = None;
        cc.min_fresh = None;
    }
    let wants_fresh = cc.no_cache
        || (rules.honor_request_no_cache && !has_cache_control && pragma_no_cache(headers));
    let action = if method == Method::HEAD {
        // HEAD responses are never stored (their empty body must not reach a GET); a HEAD is
        // answered from the GET entry when the route caches GET.
        let usable = rules.methods.contains(&Method::GET)
            && !authorized
            && !personal_cookie
            && !cc.no_store
            && !wants_fresh;
        if usable {
            RequestAction::HeadLookup
        } else {
            RequestAction::Pass
        }
    } else if !rules.methods.contains(method) {
        if is_unsafe(method) {
            RequestAction::Invalidate
        } else {
            RequestAction::Pass
        }
    } else if super::range::is_multi_range(headers) {
        // Several ranges need a multipart body; the handler builds it (RFC 9110 §14.6).
        RequestAction::Pass
    } else if cc.no_store {
        RequestAction::Bypass(Bypass::NoStore)
    } else if personal_cookie {
        RequestAction::Bypass(Bypass::Cookie)
    } else if wants_fresh {
        if authorized {
            RequestAction::Bypass(Bypass::Authorization)
        } else {
            RequestAction::Refresh
        }
    } else {
        RequestAction::Lookup
    };
    RequestPlan {
        action,
        authorized,
        directives: cc,
    }
}

/// The URL a `Location` / `Content-Location` value names, when it is on the request's own
/// origin (a path, or an absolute URL whose authority is the request's Host); a write must
/// not invalidate entries of other sites (RFC 9111 §4.4).
pub(crate) fn same_origin_target(
    value: &HeaderValue,
    request: &Uri,
    host: Option<&HeaderValue>,
) -> Option<Uri> {
    let target: Uri = value.to_str().ok()?.parse().ok()?;
    match target.authority() {
        None => target.path().starts_with('/').then_some(target),
        Some(authority) => {
            let own = request
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| host.and_then(|h| h.to_str().ok()).map(str::to_owned))?;
            authority
                .as_str()
                .eq_ignore_ascii_case(&own)
                .then_some(target)
        }
    }
}

/// Any method not known to be safe (RFC 9110 §9.2.1), extension methods included, may
/// change the resource: RFC 9111 §4.4 invalidates on it.
fn is_unsafe(method: &Method) -> bool {
    ![Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(method)
}

fn pragma_no_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(PRAGMA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .any(|d| d.eq_ignore_ascii_case("no-cache"))
}

/// Whether a request carries a cookie that may personalise the page: one the route neither
/// ignores nor keys on.
fn personal_cookie(rule: &CookieRule, headers: &HeaderMap) -> bool {
    !rule.cache_all
        && key::cookies(headers).any(|(name, _)| {
            !rule.ignore.iter().any(|n| n == name) && !rule.key_on.iter().any(|n| n == name)
        })
}
