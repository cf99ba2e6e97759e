//! The fields through which a response names its tags for the cache.

use http::{HeaderMap, HeaderName};

/// The headers through which a response names its tags for the cache (Cloudflare's
/// comma-separated `Cache-Tag`, Fastly's space-separated `Surrogate-Key`). Meant for the cache
/// alone: the layer strips them before the client sees the response.
pub(crate) const TAG_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("cache-tag"),
    HeaderName::from_static("surrogate-key"),
];

/// The tags a response names in its tag headers.
pub(crate) fn response_tags(headers: &HeaderMap) -> Vec<String> {
    TAG_HEADERS
        .iter()
        .flat_map(|name| headers.get_all(name))
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(|c: char| c == ',' || c.is_ascii_whitespace()))
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
        .collect()
}
