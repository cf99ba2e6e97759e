//! Cache keys: `{prefix}:{md5 hex}` of the request's method, authority, path and raw query
//! (and any extra material the route keys on), each field length-prefixed so no two distinct
//! requests share a key.
//!
//! User input reaches the key only through the hash, so keys are bounded in length and cannot
//! escape the prefix's namespace.

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
}

/// Writes one field as a tag byte, a 4-byte length and the bytes (or a lone absent tag), so
/// that the concatenation of fields decodes back to exactly one tuple: `GET /a:b?c` and
/// `GET /a?b:c` hash different material, whatever bytes the fields contain.
fn field(hasher: &mut Md5, tag: u8, value: Option<&[u8]>) {
    match value {
        None => hasher.update([tag, 0]),
        Some(bytes) => {
            hasher.update([tag, 1]);
            // Request lines and headers are far below 4 GiB; saturate rather than wrap anyway.
            hasher.update(u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
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
    with_hex(prefix, "", hasher.finalize().into())
}

/// A user function adding key material: see [`CacheLayer::key_fn`](crate::CacheLayer::key_fn).
pub(crate) type KeyFn = Arc<dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync>;

/// How a route derives keys from requests.
#[derive(Clone)]
pub(crate) struct Keying {
    /// Key on the request's authority (URI authority, else `Host`).
    pub(crate) host: bool,
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
            .field("sort_query", &self.sort_query)
            .field("ignore_params", &self.ignore_params)
            .field("key_cookies", &self.key_cookies)
            .field("key_fn", &self.key_fn.is_some())
            .finish()
    }
}

/// Why a request has no key: the user's key function declined it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoKey;

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
        let extra = self.extra(parts)?;
        Ok(self.key_with(prefix, method, uri, &parts.headers, extra.as_deref()))
    }

    /// The key for `uri` with already computed extra material.
    pub(crate) fn key_with(
        &self,
        prefix: &str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        extra: Option<&str>,
    ) -> String {
        // A request naming no host (a test's `oneshot`, HTTP/1.0) is keyed apart from every
        // named host.
        let authority = self.host.then(|| authority(uri, headers)).flatten();
        let query = uri.query().map(|q| self.query(q));
        base_key(
            prefix,
            &KeyFields {
                method,
                authority: authority.as_deref(),
                path: uri.path(),
                query: query.as_deref(),
                extra,
            },
        )
    }

    /// Key material beyond the URL: the named cookies' values, then the key function's.
    pub(crate) fn extra(&self, parts: &http::request::Parts) -> Result<Option<String>, NoKey> {
        let custom = match &self.key_fn {
            Some(f) => Some(f(parts).ok_or(NoKey)?),
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

    fn query<'q>(&self, query: &'q str) -> std::borrow::Cow<'q, str> {
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
/// `Host` header's.
pub(crate) fn authority<'a>(
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Option<std::borrow::Cow<'a, str>> {
    let raw = match uri.authority() {
        Some(authority) => authority.as_str(),
        None => headers.get(http::header::HOST)?.to_str().ok()?,
    };
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut key = String::with_capacity(head.len() + infix.len() + 1 + digest.len() * 2);
    key.push_str(head);
    key.push_str(infix);
    key.push(':');
    // Hex digits are ASCII, so each byte is a char: push them as one string, not one by one.
    let mut hex = [0u8; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    key.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    key
}

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
            keying.key_with("p", &Method::GET, &uri, &upper, None),
            keying.key_with("p", &Method::GET, &uri, &lower, None),
        );
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
