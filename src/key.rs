//! Cache keys: `{prefix}:{md5 hex}` of the request's method, authority, path and raw query
//! (and any extra material the route keys on), each field length-prefixed so no two distinct
//! requests share a key.
//!
//! User input reaches the key only through the hash, so keys are bounded in length and cannot
//! escape the prefix's namespace.

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use md5::{Digest, Md5};

/// What a request's key is made of: the fields [`base_key`] hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyFields<'a> {
    pub(crate) method: &'a Method,
    /// Lower-cased authority (`host[:port]`), or `None` when the route does not key on it.
    pub(crate) authority: Option<&'a str>,
    pub(crate) path: &'a str,
    /// The query exactly as sent (`Some("")` for a bare `?`), or its normalised form.
    pub(crate) query: Option<&'a str>,
    /// Anything else the route keys on (named cookies, a user key function's output).
    pub(crate) extra: Option<&'a str>,
    /// The forwarded host and scheme the app may read (see [`forwarded_material`]), when the
    /// request carries any.
    pub(crate) forwarded: Option<&'a str>,
}

/// Writes one field as a tag byte, a 4-byte length and the bytes (or a lone absent tag), so
/// that the concatenation of fields decodes back to exactly one tuple: `GET /a:b?c` and
/// `GET /a?b:c` hash different material, whatever bytes the fields contain.
fn field(hasher: &mut Md5, tag: u8, value: Option<&[u8]>) {
    match value {
        None => hasher.update([tag, 0]),
        Some(bytes) => {
            // Request lines and headers are far below 4 GiB; saturate rather than wrap anyway.
            let [l0, l1, l2, l3] = u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes();
            // The tag, presence and length in one update: each call into the hasher costs
            // more than the six bytes it hashes.
            hasher.update([tag, 1, l0, l1, l2, l3]);
            hasher.update(bytes);
        }
    }
}

/// The key of the entry for `fields` under `prefix`.
pub(crate) fn base_key(prefix: &str, fields: &KeyFields<'_>) -> String {
    let mut hasher = Md5::new();
    hasher.update(b"trc-key-v2");
    field(&mut hasher, b'm', Some(fields.method.as_str().as_bytes()));
    field(&mut hasher, b'a', fields.authority.map(str::as_bytes));
    field(&mut hasher, b'p', Some(fields.path.as_bytes()));
    field(&mut hasher, b'q', fields.query.map(str::as_bytes));
    field(&mut hasher, b'x', fields.extra.map(str::as_bytes));
    // Only present when the request carries forwarded host or scheme information: the field
    // is the last one and tagged, so keys without it are unchanged and still unambiguous.
    if let Some(forwarded) = fields.forwarded {
        field(&mut hasher, b'f', Some(forwarded.as_bytes()));
    }
    with_hex(prefix, "", hasher.finalize().into())
}

/// A user function adding key material: see [`CacheLayer::key_fn`](crate::CacheLayer::key_fn).
pub(crate) type KeyFn = Arc<dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync>;

/// How a route derives keys from requests.
#[derive(Clone)]
pub(crate) struct Keying {
    /// Key on the request's authority (URI authority, else `Host`).
    pub(crate) host: bool,
    /// Key on the forwarded host and scheme (`Forwarded`, `X-Forwarded-Host`,
    /// `X-Forwarded-Proto`) when the request carries them.
    pub(crate) forwarded: bool,
    /// Sort the query's pairs by name and drop empty ones (opt-in: apps may read pairs in
    /// order).
    pub(crate) sort_query: bool,
    /// Query parameters left out of the key (`utm_*` style prefixes end in `*`).
    pub(crate) ignore_params: Arc<[String]>,
    /// Cookies whose values are part of the key.
    pub(crate) key_cookies: Arc<[String]>,
    pub(crate) key_fn: Option<KeyFn>,
}

impl Default for Keying {
    fn default() -> Self {
        Self {
            host: true,
            forwarded: true,
            sort_query: false,
            ignore_params: Arc::from([]),
            key_cookies: Arc::from([]),
            key_fn: None,
        }
    }
}

impl std::fmt::Debug for Keying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keying")
            .field("host", &self.host)
            .field("forwarded", &self.forwarded)
            .field("sort_query", &self.sort_query)
            .field("ignore_params", &self.ignore_params)
            .field("key_cookies", &self.key_cookies)
            .field("key_fn", &self.key_fn.is_some())
            .finish()
    }
}

/// Why a request has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoKey {
    /// The user's key function declined it.
    Declined,
    /// The request names two different hosts (an absolute-form target and a `Host` header
    /// that disagree, or several `Host` fields): the app may render for either, so no key can
    /// say which page the response is.
    AuthorityMismatch,
}

impl Keying {
    /// The key of the entry `method` would use for the request with `parts` (the URI to key
    /// on, which under axum's `nest` is the original one).
    pub(crate) fn key(
        &self,
        prefix: &str,
        method: &Method,
        uri: &Uri,
        parts: &http::request::Parts,
    ) -> Result<String, NoKey> {
        let authority = match self.host {
            true => request_authority(uri, &parts.headers).ok_or(NoKey::AuthorityMismatch)?,
            false => None,
        };
        let extra = self.extra(parts)?;
        let forwarded = match self.forwarded {
            true => forwarded_material(&parts.headers),
            false => None,
        };
        Ok(self.key_of(
            prefix,
            method,
            uri,
            authority.as_deref(),
            extra.as_deref(),
            forwarded.as_deref(),
        ))
    }

    /// The URL's key: what a GET for `uri` without extra material, forwarded information or
    /// `Vary` would be stored under. Every entry stored for the URL under another key (a
    /// `Vary` variant, a key extended by cookies, a key function or forwarded information) is
    /// recorded in the tag set [`url_tag_key`] of this key, so invalidating the URL reaches it.
    pub(crate) fn url_key(&self, prefix: &str, uri: &Uri, headers: &HeaderMap) -> String {
        let authority = self.host.then(|| authority(uri, headers)).flatten();
        self.url_key_on(prefix, uri, authority.as_deref())
    }

    /// [`url_key`](Self::url_key) with the host given (lower-cased; `None`: no host). The
    /// route's host keying decides whether it is used.
    pub(crate) fn url_key_on(&self, prefix: &str, uri: &Uri, host: Option<&str>) -> String {
        let host = host.filter(|_| self.host);
        self.key_of(prefix, &Method::GET, uri, host, None, None)
    }

    fn key_of(
        &self,
        prefix: &str,
        method: &Method,
        uri: &Uri,
        authority: Option<&str>,
        extra: Option<&str>,
        forwarded: Option<&str>,
    ) -> String {
        let query = uri.query().map(|q| self.query(q));
        base_key(
            prefix,
            &KeyFields {
                method,
                authority,
                path: uri.path(),
                query: query.as_deref(),
                extra,
                forwarded,
            },
        )
    }

    /// Key material beyond the URL: the named cookies' values, then the key function's.
    pub(crate) fn extra(&self, parts: &http::request::Parts) -> Result<Option<String>, NoKey> {
        let custom = match &self.key_fn {
            Some(f) => Some(f(parts).ok_or(NoKey::Declined)?),
            None => None,
        };
        if self.key_cookies.is_empty() {
            return Ok(custom);
        }
        let mut extra = String::new();
        for name in self.key_cookies.iter() {
            // Length-prefixed like the key's fields, so values cannot run into each other.
            match cookie_value(&parts.headers, name) {
                Some(value) => extra.push_str(&format!("{}:{value};", value.len())),
                None => extra.push('-'),
            }
        }
        if let Some(custom) = custom {
            extra.push_str(&format!("|{}:{custom}", custom.len()));
        }
        Ok(Some(extra))
    }

    fn query<'q>(&self, query: &'q str) -> Cow<'q, str> {
        if !self.sort_query && self.ignore_params.is_empty() {
            return query.into();
        }
        let mut pairs: Vec<&str> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| !self.ignored(p.split_once('=').map_or(*p, |(name, _)| name)))
            .collect();
        if self.sort_query {
            // A stable sort by name alone: the order of repeated names is kept.
            pairs.sort_by_key(|pair| pair.split_once('=').map_or(*pair, |(name, _)| name));
        }
        pairs.join("&").into()
    }

    fn ignored(&self, name: &str) -> bool {
        self.ignore_params
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            })
    }
}

/// The request's authority, lower-cased: the URI's (absolute-form targets, HTTP/2), else the
/// `Host` header's. For naming a URL to invalidate; requests are keyed on
/// [`request_authority`], which also refuses disagreeing hosts.
pub(crate) fn authority<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<Cow<'a, str>> {
    match uri.authority() {
        Some(authority) => normalised_host(authority.as_str()),
        None => normalised_host(headers.get(http::header::HOST)?.to_str().ok()?),
    }
}

/// The authority a request is keyed on: `Some(None)` when it names none, `Some(Some(host))`
/// when every place that names one (the target's authority, each `Host` field) names the same
/// host (case-insensitively), `None` when they disagree. An app reading `Host` (as axum's
/// `Host` extractor and most apps do) and one reading the URI must render for the same key:
/// `GET http://victim.example/ HTTP/1.1` with `Host: attacker.example` must never store the
/// attacker's page under victim.example's key.
pub(crate) fn request_authority<'a>(
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Option<Option<Cow<'a, str>>> {
    let mut named = uri.authority().map(|a| a.as_str());
    for host in headers.get_all(http::header::HOST) {
        // A `Host` that is not text is as good as a second, different host.
        let host = host.to_str().ok()?;
        match named {
            Some(first) if !first.trim().eq_ignore_ascii_case(host.trim()) => return None,
            Some(_) => {}
            None => named = Some(host),
        }
    }
    Some(named.and_then(normalised_host))
}

/// A host trimmed and lower-cased (copied only when it has upper-case letters), or `None`
/// when empty.
fn normalised_host(raw: &str) -> Option<Cow<'_, str>> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    // Most hosts arrive lower-cased already: copy only the ones that are not.
    Some(match raw.bytes().any(|b| b.is_ascii_uppercase()) {
        true => raw.to_ascii_lowercase().into(),
        false => raw.into(),
    })
}

/// Request header fields through which a proxy (or a client, if nothing in front of the app
/// strips them) names the host and scheme the app should render for; axum-extra's `Host` and
/// `Scheme` extractors read them before `Host` and the target's scheme.
pub(crate) const FORWARDED_FIELDS: [HeaderName; 3] = [
    http::header::FORWARDED,
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
];

/// The forwarded host and scheme information a request carries, as key material: every
/// line of each [`FORWARDED_FIELDS`] field, each length-prefixed; `None` when the request
/// carries none of them, so ordinary requests keep their plain key.
///
/// The target's own scheme (absolute-form and HTTP/2 targets carry one) is not keyed: every
/// HTTP/2 request and every `oneshot` with an absolute URI would get a key apart from its
/// HTTP/1.1 twin, and an app rendering from `uri.scheme()` can key it with a key function.
pub(crate) fn forwarded_material(headers: &HeaderMap) -> Option<String> {
    if !FORWARDED_FIELDS.iter().any(|n| headers.contains_key(n)) {
        return None;
    }
    let mut material = String::new();
    for (tag, name) in ['f', 'h', 'p'].into_iter().zip(&FORWARDED_FIELDS) {
        for value in headers.get_all(name) {
            let value = String::from_utf8_lossy(value.as_bytes().trim_ascii());
            material.push_str(&format!("{tag}{}:{value};", value.len()));
        }
    }
    Some(material)
}

/// The cookies a request carries, as `(name, value)` pairs from every `Cookie` field line.
pub(crate) fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) => (name.trim(), value.trim()),
            None => ("", pair),
        })
}

fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    cookies(headers).find(|(n, _)| *n == name).map(|(_, v)| v)
}

/// The store key of a tag's set: `{namespace}__tag:{tag}`, the one format of the layer (whose
/// namespace is `{key_prefix}:`, see [`layer_namespace`]) and of
/// [`RedisCache`](crate::RedisCache) (`{prefix}:`, or nothing without a prefix), so that both
/// reach the same tag sets under the same prefix.
pub(crate) fn tag_key(namespace: &str, tag: &str) -> String {
    format!("{namespace}__tag:{tag}")
}

/// What a layer's keys start with: `{key_prefix}:` (also when the prefix is empty).
pub(crate) fn layer_namespace(key_prefix: &str) -> String {
    format!("{key_prefix}:")
}

/// The tag set recording every entry of the URL whose key is `url_key` (see
/// [`Keying::url_key`]) that is not stored under `url_key` itself: `{prefix}:__tag:__url:{hex}`.
pub(crate) fn url_tag_key(prefix: &str, url_key: &str) -> String {
    let hex = url_key
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(':'))
        .unwrap_or(url_key);
    tag_key(&layer_namespace(prefix), &format!("__url:{hex}"))
}

/// The key of `key`'s fail-safe throttle: present while a failed handler call's stale copy
/// stands in without calling the handler again.
pub(crate) fn fail_safe_key(key: &str) -> String {
    format!("{key}:fail-safe")
}

/// A stored variant of a response with `Vary`: the normalized header names and the variant's
/// own key.
pub(crate) type Variant = (Vec<HeaderName>, String);

/// The key of the variant of `base` selected by the request's values of the `names` headers.
/// `Accept-Encoding` and `Accept-Language` are normalised first (see [`normalised_accept`]),
/// so equivalent requests share a variant.
pub(crate) fn variant_key(base: &str, names: &[HeaderName], request: &HeaderMap) -> String {
    let mut hasher = Md5::new();
    for name in names {
        field(&mut hasher, b'n', Some(name.as_str().as_bytes()));
        if *name == http::header::ACCEPT_ENCODING || *name == http::header::ACCEPT_LANGUAGE {
            let normalised = normalised_accept(request.get_all(name));
            field(&mut hasher, b'a', normalised.as_deref().map(str::as_bytes));
            continue;
        }
        let values: Vec<&[u8]> = request
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes().trim_ascii())
            .collect();
        hasher.update(
            u32::try_from(values.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        for value in values {
            field(&mut hasher, b'v', Some(value));
        }
    }
    with_hex(base, ":v", hasher.finalize().into())
}

/// An `Accept-*` list in canonical form: every field line's members, lower-cased, without
/// whitespace, with `q` in thousandths (`q=1` dropped as the default), sorted, without
/// duplicates. `gzip, br` and `BR;q=1.0,gzip` are the same; `None` when the field is absent.
/// A member whose `q` does not parse is kept as written, so odd input never merges with
/// another request's.
fn normalised_accept(values: http::header::GetAll<'_, HeaderValue>) -> Option<String> {
    let mut members: Vec<String> = Vec::new();
    let mut present = false;
    for value in values {
        present = true;
        let text = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
        for member in text.split(',') {
            let member: String = member
                .chars()
                .filter(|c| !c.is_ascii_whitespace())
                .collect();
            if member.is_empty() {
                continue;
            }
            let (token, q) = match member.split_once(";q=") {
                Some((token, q)) => (token.to_owned(), Some(q.to_owned())),
                None => (member.clone(), None),
            };
            let q = match q.as_deref().map(str::parse::<f64>) {
                None => Some(1000),
                Some(Ok(q)) if (0.0..=1.0).contains(&q) => Some((q * 1000.0).round() as u32),
                Some(_) => None,
            };
            members.push(match q {
                Some(1000) => token,
                Some(q) => format!("{token};q={q}"),
                None => member,
            });
        }
    }
    members.sort();
    members.dedup();
    present.then(|| members.join(","))
}

/// A strong entity tag for a body: the quoted md5 hex of its bytes.
pub(crate) fn body_etag(chunks: &[bytes::Bytes]) -> HeaderValue {
    let mut hasher = Md5::new();
    for chunk in chunks {
        hasher.update(chunk);
    }
    let tag = format!("\"{}\"", &with_hex("", "", hasher.finalize().into())[1..]);
    HeaderValue::from_str(&tag).expect("hex is a valid header value")
}

fn with_hex(head: &str, infix: &str, digest: [u8; 16]) -> String {
    let mut key = String::with_capacity(head.len() + infix.len() + 1 + digest.len() * 2);
    key.push_str(head);
    key.push_str(infix);
    key.push(':');
    // Two digits per byte from a table, then pushed as one string (hex digits are ASCII).
    let mut hex = [0u8; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(digest) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    key.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    key
}

/// The two lower-case hex digits of every byte.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [HEX[byte >> 4], HEX[byte & 0xf]];
        byte += 1;
    }
    pairs
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_keyed_case_insensitively_and_copied_only_when_upper_case() {
        let uri: Uri = "/items/1".parse().unwrap();
        let host = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::HOST, HeaderValue::from_static(value));
            headers
        };
        let (upper, lower) = (host(" Example.COM:8080 "), host("example.com:8080"));
        let upper_authority = authority(&uri, &upper).unwrap();
        let lower_authority = authority(&uri, &lower).unwrap();
        assert_eq!(upper_authority, "example.com:8080");
        assert_eq!(upper_authority, lower_authority);
        assert!(matches!(lower_authority, std::borrow::Cow::Borrowed(_)));
        assert_eq!(authority(&uri, &host("  ")), None);
        let keying = Keying::default();
        assert_eq!(
            keying.url_key("p", &uri, &upper),
            keying.url_key("p", &uri, &lower)
        );
    }

    #[test]
    fn a_request_naming_two_hosts_has_no_authority_to_key_on() {
        let headers = |hosts: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for host in hosts {
                headers.append(http::header::HOST, HeaderValue::from_static(host));
            }
            headers
        };
        let absolute: Uri = "http://Victim.example/tenant".parse().unwrap();
        let origin: Uri = "/tenant".parse().unwrap();
        let host =
            |uri, hosts| request_authority(uri, &headers(hosts)).map(|a| a.map(Cow::into_owned));
        assert_eq!(host(&absolute, &["attacker.example"]), None);
        assert_eq!(
            host(&absolute, &["victim.EXAMPLE "]),
            Some(Some("victim.example".into()))
        );
        assert_eq!(host(&absolute, &[]), Some(Some("victim.example".into())));
        assert_eq!(host(&origin, &["a.example", "b.example"]), None);
        assert_eq!(
            host(&origin, &["a.example", "A.example"]),
            Some(Some("a.example".into()))
        );
        assert_eq!(host(&origin, &[]), Some(None));
    }

    #[test]
    fn forwarded_host_and_scheme_are_key_material_only_when_present() {
        assert_eq!(forwarded_material(&HeaderMap::new()), None);
        let with = |name: &'static str, value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            forwarded_material(&headers).expect("present")
        };
        let all = [
            with("forwarded", "host=a.example"),
            with("x-forwarded-host", "a.example"),
            with("x-forwarded-proto", "https"),
            with("x-forwarded-host", "b.example"),
            with("x-forwarded-host", ""),
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn accept_encoding_and_language_variants_are_normalised() {
        let names = [http::header::ACCEPT_ENCODING, http::header::ACCEPT_LANGUAGE];
        let key = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(*n, HeaderValue::from_static(v));
            }
            variant_key("p:base", &names, &h)
        };
        let same = [
            key(&[
                ("accept-encoding", "gzip, br"),
                ("accept-language", "en, fr;q=0.5"),
            ]),
            key(&[
                ("accept-encoding", "BR,gzip;q=1.0"),
                ("accept-language", "FR; q=0.50 ,EN"),
            ]),
            key(&[
                ("accept-encoding", "br"),
                ("accept-encoding", "gzip"),
                ("accept-language", "en,fr;q=0.500"),
            ]),
        ];
        assert!(same.iter().all(|k| *k == same[0]), "{same:?}");
        assert_ne!(
            same[0],
            key(&[
                ("accept-encoding", "gzip"),
                ("accept-language", "en, fr;q=0.5")
            ])
        );
        assert_ne!(
            same[0],
            key(&[
                ("accept-encoding", "gzip, br"),
                ("accept-language", "en, fr;q=0.6")
            ])
        );
        assert_ne!(
            key(&[]),
            key(&[("accept-encoding", "")]),
            "absent differs from empty"
        );
    }
}
