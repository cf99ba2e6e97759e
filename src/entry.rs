//! The stored form of a response, and its versioned binary encoding.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! magic "TRC" | version u8 | kind u8
//! kind 0 (response): stored_at_ms u64 | ttl_ms u64 | status u16 | header_count u32
//!                    | { name_len u16 | name | value_len u32 | value }* | body_len u64 | body
//! kind 1 (variants): name_count u16 | { name_len u16 | name }*
//! kind 2 (uncacheable): nothing more (a hit-for-miss mark: the last answer could not be stored)
//! ```
//!
//! Decoding slices the input `Bytes`: header values and the body share the buffer the store
//! returned, so a hit copies no body bytes. The decoder checks every length and every header
//! name and value, and returns an error (never panics) on anything malformed. It also checks
//! that the entry means something a cache may replay: a final status other than 206 / 304, no
//! connection-level or framing headers, no body where the status allows none, and a TTL
//! within RFC 9111's 2^31 s. A store holding garbage (or an attacker's bytes) gives misses.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use crate::cache_control::CacheControl;
use crate::settings::{clamp, MAX_DELTA_SECS};

const MAGIC: &[u8; 3] = b"TRC";
const VERSION: u8 = 1;
const KIND_RESPONSE: u8 = 0;
const KIND_VARIANTS: u8 = 1;
const KIND_UNCACHEABLE: u8 = 2;
const PREAMBLE: usize = MAGIC.len() + 2;

/// Headers that describe one connection or the framing of one message (RFC 9110 §7.6.1,
/// §6.1): never stored, never accepted from a store. `Content-Length` is recomputed from the
/// stored body on replay.
pub(crate) const CONNECTION_HEADERS: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::CONTENT_LENGTH,
];

/// A response as stored: status, every header value in order, body bytes, and when it was
/// stored for how long.
#[derive(Debug, Clone)]
pub(crate) struct CachedResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// Milliseconds since the Unix epoch: wall time, because several app instances share
    /// the entry and compute its age (read from [`crate::clock`]).
    pub(crate) stored_at_ms: u64,
    pub(crate) ttl: Duration,
    /// The directives this cache obeys, parsed once from `headers` when the entry is decoded
    /// (every judgement of the entry reads them).
    pub(crate) directives: CacheControl,
}

/// What a base key holds: the response itself, or (for a response with `Vary`) the names of
/// the request headers that select a variant stored under a secondary key.
// Decoded once per lookup and taken apart at once: boxing the response would cost an
// allocation per hit to save stack bytes no one keeps.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum StoredValue {
    Response(CachedResponse),
    Variants(Vec<HeaderName>),
    /// A hit-for-miss mark: the last answer for this key could not be stored, so requests
    /// go straight to the origin instead of waiting for one another.
    Uncacheable,
}

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(&'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "undecodable cache entry: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

impl CachedResponse {
    /// Whole seconds since the entry was stored (0 if the clock went backwards).
    pub(crate) fn age(&self, now_ms: u64) -> Duration {
        Duration::from_secs(now_ms.saturating_sub(self.stored_at_ms) / 1000)
    }

    /// Time since the entry was stored (zero if the clock went backwards).
    pub(crate) fn elapsed(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.stored_at_ms))
    }

    /// How long ago the entry's TTL ran out, or `None` while it is fresh.
    pub(crate) fn staleness(&self, now_ms: u64) -> Option<Duration> {
        let age_ms = now_ms.saturating_sub(self.stored_at_ms);
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        (age_ms >= ttl_ms).then(|| Duration::from_millis(age_ms - ttl_ms))
    }

    /// Encodes the response whose body arrived as `chunks` (copied once, into the entry).
    pub(crate) fn encode(
        status: StatusCode,
        headers: &HeaderMap,
        chunks: &[Bytes],
        stored_at_ms: u64,
        ttl: Duration,
    ) -> Bytes {
        let body_len: usize = chunks.iter().map(Bytes::len).sum();
        let headers_len: usize = headers
            .iter()
            .map(|(n, v)| 2 + n.as_str().len() + 4 + v.len())
            .sum();
        let mut buf =
            BytesMut::with_capacity(PREAMBLE + 8 + 8 + 2 + 4 + headers_len + 8 + body_len);
        buf.put_slice(MAGIC);
        buf.put_u8(VERSION);
        buf.put_u8(KIND_RESPONSE);
        buf.put_u64(stored_at_ms);
        buf.put_u64(clamp(ttl).as_millis() as u64);
        buf.put_u16(status.as_u16());
        buf.put_u32(headers.len() as u32);
        for (name, value) in headers {
            buf.put_u16(name.as_str().len() as u16);
            buf.put_slice(name.as_str().as_bytes());
            buf.put_u32(value.len() as u32);
            buf.put_slice(value.as_bytes());
        }
        buf.put_u64(body_len as u64);
        for chunk in chunks {
            buf.put_slice(chunk);
        }
        buf.freeze()
    }
}

/// Encodes a hit-for-miss mark.
pub(crate) fn encode_uncacheable() -> Bytes {
    let mut buf = BytesMut::with_capacity(PREAMBLE);
    buf.put_slice(MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(KIND_UNCACHEABLE);
    buf.freeze()
}

/// Encodes a variants marker.
pub(crate) fn encode_variants(names: &[HeaderName]) -> Bytes {
    let mut buf = BytesMut::with_capacity(
        PREAMBLE + 2 + names.iter().map(|n| 2 + n.as_str().len()).sum::<usize>(),
    );
    buf.put_slice(MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(KIND_VARIANTS);
    buf.put_u16(names.len() as u16);
    for name in names {
        buf.put_u16(name.as_str().len() as u16);
        buf.put_slice(name.as_str().as_bytes());
    }
    buf.freeze()
}

/// Whether a response with `status` can be replayed from a store at all: a final status
/// (200-599) other than 206, which holds part of a body and would be replayed as the whole,
/// and 304, which only confirms another response.
pub(crate) fn storable_status(status: StatusCode) -> bool {
    (200..=599).contains(&status.as_u16())
        && status != StatusCode::PARTIAL_CONTENT
        && status != StatusCode::NOT_MODIFIED
}

/// A cursor over the stored bytes that fails instead of reading past the end. Integers and
/// names are read from the buffer in place; only header values and the body become `Bytes`
/// (a slice of a shared `Bytes` costs two atomic operations, paid on every hit).
struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    /// The next `n` bytes, borrowed.
    fn bytes(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError("length overflow"))?;
        let out = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError("truncated"))?;
        self.pos = end;
        Ok(out)
    }

    /// The next `n` bytes, as a slice of the stored buffer.
    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.bytes(n)?;
        Ok(self.buf.slice(start..self.pos))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let out = *rest.first_chunk::<N>().ok_or(DecodeError("truncated"))?;
        self.pos += N;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }

    fn header_name(&mut self) -> Result<HeaderName, DecodeError> {
        let len = self.u16()? as usize;
        HeaderName::from_bytes(self.bytes(len)?).map_err(|_| DecodeError("bad header name"))
    }

    fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        out
    }
}

/// Whether `name` is one of [`CONNECTION_HEADERS`]: a match on the name's text, which the
/// compiler turns into a switch on its length, where the list would be ten comparisons per
/// stored header on every decoding hit.
fn is_connection_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "content-length"
    )
}

/// Decodes what [`CachedResponse::encode`] or [`encode_variants`] produced.
///
/// `targeted`: the targeted cache-control fields the reader obeys, for the entry's parsed
/// directives.
pub(crate) fn decode(buf: Bytes, targeted: &[HeaderName]) -> Result<StoredValue, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    if &r.array::<3>()? != MAGIC {
        return Err(DecodeError("not a tower-redis-cache entry"));
    }
    if r.array::<1>()?[0] != VERSION {
        return Err(DecodeError("unknown entry version"));
    }
    match r.array::<1>()?[0] {
        KIND_RESPONSE => {
            let stored_at_ms = r.u64()?;
            let ttl = Duration::from_millis(r.u64()?);
            if ttl > Duration::from_secs(MAX_DELTA_SECS) {
                return Err(DecodeError("TTL beyond 2^31 s"));
            }
            let status =
                StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError("bad status code"))?;
            if !storable_status(status) {
                return Err(DecodeError("status a cache never replays"));
            }
            let count = r.u32()? as usize;
            // Each header takes at least 6 bytes, which bounds the allocation below by the
            // input's size however large the count claims to be.
            if count > (r.buf.len() - r.pos) / 6 {
                return Err(DecodeError("header count exceeds entry size"));
            }
            // Room for the headers a replay adds (Age, Content-Length, X-Cache, Cache-Status):
            // growing the map on every hit measurably slowed the hit path.
            let mut headers = HeaderMap::with_capacity(count + 4);
            for _ in 0..count {
                let name = r.header_name()?;
                if is_connection_header(&name) {
                    return Err(DecodeError("connection or framing header"));
                }
                let len = r.u32()? as usize;
                let value = HeaderValue::from_maybe_shared(r.take(len)?)
                    .map_err(|_| DecodeError("bad header value"))?;
                headers.append(name, value);
            }
            let body_len = r.u64()?;
            let body = r.rest();
            if body.len() as u64 != body_len {
                return Err(DecodeError("body length mismatch"));
            }
            if status == StatusCode::NO_CONTENT && !body.is_empty() {
                return Err(DecodeError("body on a 204"));
            }
            Ok(StoredValue::Response(CachedResponse {
                status,
                directives: CacheControl::for_cache(&headers, targeted),
                headers,
                body,
                stored_at_ms,
                ttl,
            }))
        }
        KIND_VARIANTS => {
            let count = r.u16()? as usize;
            let mut names = Vec::with_capacity(count.min(64));
            for _ in 0..count {
                names.push(r.header_name()?);
            }
            if r.pos != r.buf.len() {
                return Err(DecodeError("trailing bytes"));
            }
            Ok(StoredValue::Variants(names))
        }
        KIND_UNCACHEABLE if r.pos == r.buf.len() => Ok(StoredValue::Uncacheable),
        _ => Err(DecodeError("unknown entry kind")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bytes {
        let mut headers = HeaderMap::new();
        headers.append("link", HeaderValue::from_static("</a>; rel=preload"));
        headers.append("link", HeaderValue::from_static("</b>; rel=preload"));
        headers.insert("content-type", HeaderValue::from_static("image/png"));
        let body = [
            Bytes::from_static(b"\x89PNG\r\n\x1a\n"),
            Bytes::from_static(&[0, 255, 1]),
        ];
        CachedResponse::encode(
            StatusCode::CREATED,
            &headers,
            &body,
            42,
            Duration::from_secs(7),
        )
    }

    #[test]
    fn round_trips_status_headers_in_order_and_binary_body() {
        let StoredValue::Response(r) = decode(sample(), &[]).unwrap() else {
            panic!("expected a response")
        };
        assert_eq!(r.status, StatusCode::CREATED);
        let links: Vec<_> = r.headers.get_all("link").iter().collect();
        assert_eq!(links, ["</a>; rel=preload", "</b>; rel=preload"]);
        assert_eq!(&r.body[..], b"\x89PNG\r\n\x1a\n\x00\xff\x01");
        assert_eq!((r.stored_at_ms, r.ttl), (42, Duration::from_secs(7)));
    }

    #[test]
    fn the_connection_header_check_names_exactly_the_listed_headers() {
        for name in &CONNECTION_HEADERS {
            assert!(is_connection_header(name), "{name}");
        }
        for name in [
            header::CONTENT_TYPE,
            header::DATE,
            header::ETAG,
            header::VARY,
        ] {
            assert!(!is_connection_header(&name), "{name}");
        }
    }

    #[test]
    fn variants_round_trip() {
        let names = vec![
            HeaderName::from_static("accept-encoding"),
            HeaderName::from_static("x-a"),
        ];
        assert!(matches!(
            decode(encode_uncacheable(), &[]),
            Ok(StoredValue::Uncacheable)
        ));
        let mut padded = encode_uncacheable().to_vec();
        padded.push(0);
        assert!(decode(Bytes::from(padded), &[]).is_err());
        let StoredValue::Variants(got) = decode(encode_variants(&names), &[]).unwrap() else {
            panic!("expected variants")
        };
        assert_eq!(got, names);
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let full = sample();
        for len in 0..full.len() {
            assert!(
                decode(full.slice(..len), &[]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
        for i in 0..full.len() {
            for byte in [0u8, 0x7f, 0xff, b'\n'] {
                let mut bytes = full.to_vec();
                bytes[i] = byte;
                let _ = decode(Bytes::from(bytes), &[]);
            }
        }
        assert!(decode(Bytes::from_static(b"{\"json\": true}"), &[]).is_err());
        assert!(decode(Bytes::new(), &[]).is_err());
    }

    /// Two instances share an entry; one's wall clock was an hour behind when it started and is
    /// then set right. Within the re-check period both give the entry the same age and the same
    /// freshness, computed from the stored time.
    #[tokio::test(start_paused = true)]
    async fn instances_agree_on_an_age_once_a_clock_is_set_right() {
        use std::sync::atomic::{AtomicI64, Ordering};
        use std::sync::Arc;

        use crate::clock::tests::stepped;
        use crate::clock::Clock;

        let right = Clock::new(std::time::SystemTime::now);
        let step = Arc::new(AtomicI64::new(-3_600_000));
        let wrong = Clock::new(stepped(&step));
        let stored = CachedResponse::encode(
            StatusCode::OK,
            &HeaderMap::new(),
            &[],
            right.now_ms(),
            Duration::from_secs(60),
        );
        let StoredValue::Response(entry) = decode(stored, &[]).unwrap() else {
            panic!("expected a response")
        };
        assert_eq!(entry.age(wrong.now_ms()), Duration::ZERO, "an hour behind");

        step.store(0, Ordering::Relaxed);
        // Half a second over, so the measurement error of either clock (microseconds) cannot
        // move the whole seconds.
        tokio::time::advance(Duration::from_millis(90_500)).await;
        for clock in [right.now_ms(), wrong.now_ms()] {
            assert_eq!(entry.age(clock), Duration::from_secs(90));
            assert_eq!(
                entry.staleness(clock).map(|d| d.as_secs()),
                Some(30),
                "stale for 30 s by either clock"
            );
        }
    }
}
