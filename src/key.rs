//! Cache keys: `{prefix}:{md5 hex of METHOD:PATH:QUERY}`, the query's pairs sorted by name.
//!
//! User input reaches the key only through the hash, so keys are bounded in length and cannot
//! escape the prefix's namespace.

use http::{HeaderMap, HeaderName, Method, Uri};
use md5::{Digest, Md5};

/// The key of the entry for `method` on `uri`.
pub(crate) fn base_key(prefix: &str, method: &Method, uri: &Uri) -> String {
    let mut hasher = Md5::new();
    hasher.update(method.as_str().as_bytes());
    hasher.update(b":");
    hasher.update(uri.path().as_bytes());
    hasher.update(b":");
    if let Some(query) = uri.query() {
        let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        // A stable sort by name alone: `?a=1&b=2` and `?b=2&a=1` share an entry, while the
        // order of repeated names (`?a=2&a=1`), which apps may read as a list, is kept.
        pairs.sort_by_key(|pair| pair.split_once('=').map_or(*pair, |(name, _)| name));
        for (i, pair) in pairs.iter().enumerate() {
            if i > 0 {
                hasher.update(b"&");
            }
            hasher.update(pair.as_bytes());
        }
    }
    with_hex(prefix, "", &hasher.finalize())
}

/// A stored variant of a response with `Vary`: the normalized header names and the variant's
/// own key.
pub(crate) type Variant = (Vec<HeaderName>, String);

/// The key of the variant of `base` selected by the request's values of the `names` headers.
pub(crate) fn variant_key(base: &str, names: &[HeaderName], request: &HeaderMap) -> String {
    let mut hasher = Md5::new();
    for name in names {
        hasher.update(name.as_str().as_bytes());
        hasher.update(b":");
        for (i, value) in request.get_all(name).iter().enumerate() {
            if i > 0 {
                hasher.update(b",");
            }
            hasher.update(value.as_bytes().trim_ascii());
        }
        hasher.update(b"\n");
    }
    with_hex(base, ":v", &hasher.finalize())
}

/// A strong entity tag for a body: the quoted md5 hex of its bytes.
pub(crate) fn body_etag(chunks: &[bytes::Bytes]) -> http::HeaderValue {
    let mut hasher = Md5::new();
    for chunk in chunks {
        hasher.update(chunk);
    }
    let tag = format!("\"{}\"", &with_hex("", "", &hasher.finalize())[1..]);
    http::HeaderValue::from_str(&tag).expect("hex is a valid header value")
}

fn with_hex(head: &str, infix: &str, digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut key = String::with_capacity(head.len() + infix.len() + 1 + digest.len() * 2);
    key.push_str(head);
    key.push_str(infix);
    key.push(':');
    for byte in digest {
        key.push(char::from(HEX[usize::from(byte >> 4)]));
        key.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uri: &str) -> String {
        base_key("p", &Method::GET, &uri.parse().unwrap())
    }

    #[test]
    fn key_is_prefix_and_md5_of_method_path_sorted_query() {
        // md5("GET:/items/1:a=1&b=2")
        let expected = format!("p:{:x}", Md5::digest(b"GET:/items/1:a=1&b=2"));
        assert_eq!(key("/items/1?b=2&a=1"), expected);
        assert_eq!(key("/items/1?a=1&b=2"), expected);
        assert_eq!(key("/items/1?a=1&&b=2&"), expected);
    }

    #[test]
    fn keys_differ_by_method_path_query_and_repeated_value_order() {
        let get = key("/x?a=1");
        assert_ne!(
            get,
            base_key("p", &Method::POST, &"/x?a=1".parse().unwrap())
        );
        assert_ne!(get, key("/y?a=1"));
        assert_ne!(get, key("/x?a=2"));
        assert_ne!(key("/x?a=1&a=2"), key("/x?a=2&a=1"));
        assert_eq!(key("/x"), key("/x?"));
    }

    #[test]
    fn variant_keys_follow_request_values() {
        let names = [HeaderName::from_static("accept-encoding")];
        let mut gzip = HeaderMap::new();
        gzip.insert("accept-encoding", "gzip".parse().unwrap());
        let mut br = HeaderMap::new();
        br.insert("accept-encoding", " br".parse().unwrap());
        let mut gzip_spaced = HeaderMap::new();
        gzip_spaced.insert("accept-encoding", "gzip ".parse().unwrap());
        let base = key("/x");
        assert_ne!(
            variant_key(&base, &names, &gzip),
            variant_key(&base, &names, &br)
        );
        assert_eq!(
            variant_key(&base, &names, &gzip),
            variant_key(&base, &names, &gzip_spaced)
        );
        assert_ne!(
            variant_key(&base, &names, &HeaderMap::new()),
            variant_key(&base, &names, &gzip)
        );
    }
}
