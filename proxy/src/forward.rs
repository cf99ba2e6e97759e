//! Forwarding to the upstream as RFC 9110 §7.6 says: hop-by-hop fields removed both ways,
//! `Via`, `X-Forwarded-*` and `Forwarded`, bodies streamed both ways, upgrades tunnelled, and
//! the proxy's own `502` / `504` when the upstream fails.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::{Config, Upstream};

/// Every body the proxy sends: the upstream's, streamed, or its own short ones.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The proxy's own short body.
pub fn text_body(text: &'static str) -> ProxyBody {
    Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Set on a request by the server: who sent it.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
}

/// Set on the proxy's own `502` / `504`: the upstream failed, so the response is not the
/// upstream's and must not be labelled a cache miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayError {
    /// Connecting or sending failed, or the upstream broke the connection (`502`).
    Unreachable,
    /// No response head within the response timeout (`504`).
    Timeout,
}

/// The upstream client, shared by every request: a connection pool with connect and response
/// timeouts, http or https (rustls, the system's roots).
#[derive(Clone)]
pub struct Forward {
    inner: Arc<ForwardInner>,
}

struct ForwardInner {
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    upstream: Upstream,
    host: HeaderValue,
    response_timeout: Duration,
    prefix_purge_depth: usize,
}

impl Forward {
    /// A client for `config`'s upstream.
    pub fn new(config: &Config) -> Result<Self, BoxError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.limits.connect_timeout));
        http.set_nodelay(true);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(native_roots())
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(config.limits.pool_idle_per_host)
            .build(connector);
        Ok(Forward {
            inner: Arc::new(ForwardInner {
                client,
                host: HeaderValue::from_str(config.upstream.authority.as_str())?,
                upstream: config.upstream.clone(),
                response_timeout: config.limits.response_timeout,
                prefix_purge_depth: config.prefix_purge_depth,
            }),
        })
    }

    /// The upstream's URI for `path_and_query`.
    fn target(&self, req: &Request<Incoming>) -> Uri {
        let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        Uri::builder()
            .scheme(if self.inner.upstream.https {
                "https"
            } else {
                "http"
            })
            .authority(self.inner.upstream.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .unwrap_or_else(|_| Uri::from_static("/"))
    }

    /// Sends `req` (hop-by-hop fields already removed, forwarding fields already checked) to
    /// the upstream and hands back its response head with the body streaming.
    pub async fn forward(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let peer = req.extensions().get::<Peer>().copied();
        let target = self.target(&req);
        let path = req.uri().path().to_owned();
        add_forwarding(&mut req, peer, &self.inner.host);
        *req.uri_mut() = target;
        // Our connection to the upstream is HTTP/1.1, whatever the client spoke.
        *req.version_mut() = Version::HTTP_11;
        let sent = self.inner.client.request(req);
        let mut response = match tokio::time::timeout(self.inner.response_timeout, sent).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                metrics::counter!("proxy_upstream_errors_total", "kind" => "unreachable")
                    .increment(1);
                eprintln!("upstream {}: {}", self.inner.upstream, error_chain(&error));
                return gateway_error(GatewayError::Unreachable);
            }
            Err(_) => {
                metrics::counter!("proxy_upstream_errors_total", "kind" => "timeout").increment(1);
                return gateway_error(GatewayError::Timeout);
            }
        };
        let version = response.version();
        strip_hop_by_hop(response.headers_mut());
        append_via(response.headers_mut(), version);
        add_prefix_tags(response.headers_mut(), &path, self.inner.prefix_purge_depth);
        // The server answers in its own version (hyper would answer an HTTP/1.1 client in
        // HTTP/1.0 if the upstream's were left on the response).
        *response.version_mut() = Version::default();
        response.map(|body| body.map_err(BoxError::from).boxed_unsync())
    }

    /// Forwards an `Upgrade` request (WebSocket and others) and, when the upstream agrees
    /// (`101`), joins the two connections until either side closes. Never cached.
    pub async fn tunnel(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let protocol = req.headers().get(header::UPGRADE).cloned();
        let client_side = hyper::upgrade::on(&mut req);
        strip_hop_by_hop(req.headers_mut());
        if let Some(protocol) = &protocol {
            req.headers_mut().insert(header::UPGRADE, protocol.clone());
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let peer = req.extensions().get::<Peer>().copied();
        let target = self.target(&req);
        add_forwarding(&mut req, peer, &self.inner.host);
        *req.uri_mut() = target;
        *req.version_mut() = Version::HTTP_11;
        let sent = self.inner.client.request(req);
        let mut response = match tokio::time::timeout(self.inner.response_timeout, sent).await {
            Ok(Ok(response)) => response,
            Ok(Err(_)) => return gateway_error(GatewayError::Unreachable),
            Err(_) => return gateway_error(GatewayError::Timeout),
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(response.headers_mut());
            let version = response.version();
            append_via(response.headers_mut(), version);
            *response.version_mut() = Version::default();
            return response.map(|body| body.map_err(BoxError::from).boxed_unsync());
        }
        let upstream_side = hyper::upgrade::on(&mut response);
        let upgrade = response.headers().get(header::UPGRADE).cloned();
        tokio::spawn(async move {
            let (Ok(client), Ok(upstream)) = (client_side.await, upstream_side.await) else {
                return;
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
        let (mut parts, _) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(upgrade) = upgrade {
            parts.headers.insert(header::UPGRADE, upgrade);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        append_via(&mut parts.headers, parts.version);
        parts.version = Version::default();
        Response::from_parts(parts, text_body(""))
    }
}

/// A `tower::Service` view of [`Forward::forward`], for the cache layer to wrap.
impl tower_service::Service<Request<Incoming>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(req).await) })
    }
}

/// The proxy's own `502` or `504`, with a short body; marked so the server labels it as an
/// upstream failure rather than a cache outcome.
pub fn gateway_error(kind: GatewayError) -> Response<ProxyBody> {
    let (status, body) = match kind {
        GatewayError::Unreachable => (
            StatusCode::BAD_GATEWAY,
            "502 Bad Gateway: the upstream could not be reached\n",
        ),
        GatewayError::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "504 Gateway Timeout: the upstream did not answer in time\n",
        ),
    };
    let mut response = Response::new(text_body(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Never stored, whatever the route's TTL.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response.extensions_mut().insert(kind);
    response
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn native_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs();
    for cert in found {
        let _ = roots.add(cert);
    }
    roots
}

/// The system's root certificates. Our own `ClientConfig` (rather than hyper-rustls's
/// `with_native_roots`) pins the ring provider, whatever else the process installed.
fn rustls_native_certs() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let result = rustls_native_certs::load_native_certs();
    for error in &result.errors {
        eprintln!("reading the system's root certificates: {error}");
    }
    result.certs
}

/// Whether `req` asks to switch protocols (HTTP/1.1 `Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the hop-by-hop fields of RFC 9110 §7.6.1: those `Connection` names, `Connection`
/// itself, and the fields defined as hop-by-hop whether listed or not. `Proxy-Authenticate`
/// and `Proxy-Authorization` are for a proxy's own authentication, which this one does not do.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(connection) = headers.get(header::CONNECTION) {
        // Most requests name nothing but `keep-alive` or `close`: no allocation then.
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        let _ = connection;
        for name in listed {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// The forwarding fields any client can forge; kept only from trusted peers.
pub const FORWARDING: [HeaderName; 5] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
];

/// Removes the forwarding fields of an untrusted peer, before the cache keys the request.
pub fn strip_untrusted_forwarding(headers: &mut HeaderMap) {
    for name in &FORWARDING {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

/// `Host` becomes the upstream's; the client's goes to `X-Forwarded-Host` and `Forwarded`
/// (unless a trusted peer set them), the client's address is appended to `X-Forwarded-For`
/// and `Forwarded`, and this proxy to `Via`.
fn add_forwarding(req: &mut Request<Incoming>, peer: Option<Peer>, upstream_host: &HeaderValue) {
    let version = req.version();
    let client_host = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let headers = req.headers_mut();
    headers.insert(header::HOST, upstream_host.clone());
    append_via(headers, version);
    let Some(peer) = peer else { return };
    let ip = peer.addr.ip();
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    append_list(headers, "x-forwarded-for", &ip.to_string());
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    if let Some(host) = &client_host {
        if !headers.contains_key("x-forwarded-host") {
            headers.insert("x-forwarded-host", host.clone());
        }
    }
    // Forwarded (RFC 7239) quotes IPv6 addresses and hosts with a port (':' is no token).
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut element = format!("for={node}");
    if let Some(host) = client_host.as_ref().and_then(|h| h.to_str().ok()) {
        if host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        {
            element.push_str(&format!(";host=\"{host}\""));
        }
    }
    element.push_str(";proto=http");
    append_list(headers, "forwarded", &element);
}

/// Adds this proxy (`tower-redis-cache`) to `Via`, after the intermediaries already listed (RFC 9110 §7.6.3).
fn append_via(headers: &mut HeaderMap, received: Version) {
    let via = match received {
        Version::HTTP_10 => "1.0 tower-redis-cache",
        Version::HTTP_2 => "2 tower-redis-cache",
        Version::HTTP_3 => "3 tower-redis-cache",
        _ => "1.1 tower-redis-cache",
    };
    append_list(headers, "via", via);
}

/// Appends `item` to the comma-separated list in `name`, folding repeated fields into one.
fn append_list(headers: &mut HeaderMap, name: &'static str, item: &str) {
    let mut joined = String::new();
    for value in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
        joined.push_str(value);
        joined.push_str(", ");
    }
    joined.push_str(item);
    if let Ok(value) = HeaderValue::from_str(&joined) {
        headers.insert(name, value);
    }
}

/// The tag that marks every response under the path `prefix` (ending in `/`).
pub fn prefix_tag(prefix: &str) -> String {
    // Tags are split on commas and whitespace; paths carry neither unescaped but a comma.
    format!("trc-prefix:{}", prefix.replace(',', "%2C"))
}

/// Longest prefix tagged: a bound on the tag keys' length.
pub const MAX_PREFIX_BYTES: usize = 256;

/// Tags the response with its path's directory prefixes (`/`, `/a/`, `/a/b/`, up to `depth`
/// directories), through the `Surrogate-Key` field the cache reads tags from (and strips
/// before clients see the response), so that a purge by prefix is one tag invalidation.
fn add_prefix_tags(headers: &mut HeaderMap, path: &str, depth: usize) {
    if depth == 0 {
        return;
    }
    let mut tags = String::new();
    let mut end = 0;
    for (n, (i, _)) in path.match_indices('/').enumerate() {
        if n > depth || i + 1 > MAX_PREFIX_BYTES {
            break;
        }
        end = i + 1;
        if !tags.is_empty() {
            tags.push(' ');
        }
        tags.push_str(&prefix_tag(&path[..end]));
    }
    let _ = end;
    if tags.is_empty() {
        return;
    }
    let name = HeaderName::from_static("surrogate-key");
    if let Ok(value) = HeaderValue::from_str(&tags) {
        headers.append(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-foo, close"));
        headers.insert("x-foo", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn responses_are_tagged_with_their_directory_prefixes() {
        let mut headers = HeaderMap::new();
        add_prefix_tags(&mut headers, "/a/b/c.html", 4);
        assert_eq!(
            headers.get("surrogate-key").unwrap(),
            "trc-prefix:/ trc-prefix:/a/ trc-prefix:/a/b/"
        );
        let mut headers = HeaderMap::new();
        add_prefix_tags(&mut headers, "/a/b/c/d/e", 2);
        assert_eq!(
            headers.get("surrogate-key").unwrap(),
            "trc-prefix:/ trc-prefix:/a/ trc-prefix:/a/b/"
        );
        let mut headers = HeaderMap::new();
        add_prefix_tags(&mut headers, "/a,b/", 4);
        assert_eq!(
            headers.get("surrogate-key").unwrap(),
            "trc-prefix:/ trc-prefix:/a%2Cb/"
        );
    }

    #[test]
    fn lists_are_folded_into_one_field() {
        let mut headers = HeaderMap::new();
        headers.append("via", HeaderValue::from_static("1.0 a"));
        headers.append("via", HeaderValue::from_static("1.1 b"));
        append_via(&mut headers, Version::HTTP_11);
        assert_eq!(headers.get_all("via").iter().count(), 1);
        assert_eq!(
            headers.get("via").unwrap(),
            "1.0 a, 1.1 b, 1.1 tower-redis-cache"
        );
    }
}
