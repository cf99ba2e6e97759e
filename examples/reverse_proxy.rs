//! A caching reverse proxy: the cache in front of any HTTP origin.
//!
//! ```sh
//! ORIGIN=http://127.0.0.1:8080 PORT=3000 cargo run --example reverse_proxy
//! ORIGIN=http://127.0.0.1:8080 REDIS_URL=redis://127.0.0.1:6379 cargo run --example reverse_proxy
//! curl -si localhost:3000/some/page   # X-Cache: MISS, then HIT if the origin gave a lifetime
//! ```
//!
//! - `ORIGIN`: the origin's base URL, `http://host[:port]` (plain HTTP/1.1).
//! - `PORT`: the port to listen on, on 127.0.0.1 (default 3000; `0` picks a free one). The
//!   bound address is printed as `listening on http://127.0.0.1:NNNN`.
//! - `REDIS_URL`: store responses in Redis; without it, in this process's memory.
//!
//! Every request (any method, any path and query, bodies streamed both ways) is forwarded to
//! the origin. Hop-by-hop headers are removed in both directions (RFC 9110 §7.6.1), `Host` is
//! the origin's, `Via`, `X-Forwarded-For` and `Forwarded` are added, and an origin that cannot
//! be reached is answered with `502 Bad Gateway`.
//!
//! Only the origin decides what is cached: the layer's TTL is zero, so a response (of any
//! status) is stored only when it carries an explicit lifetime (`s-maxage`, `max-age`,
//! `Expires`). Upgrades (WebSocket) are not supported: `Upgrade` is a
//! hop-by-hop header and is removed like the others.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Request, Response, StatusCode, Uri, Version};
use axum::Router;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::ServiceBuilder;
use tower_redis_cache::{CacheLayer, MemoryStore, RedisStore, Store};

/// The name this proxy gives itself in `Via` (RFC 9110 §7.6.3).
const PSEUDONYM: &str = "tower-redis-cache";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let origin: Uri = std::env::var("ORIGIN")
        .map_err(|_| "set ORIGIN to the origin's base URL, e.g. http://127.0.0.1:8080")?
        .parse()?;
    if origin.scheme_str() != Some("http") || origin.authority().is_none() {
        return Err(format!("ORIGIN must be http://host[:port], not {origin}").into());
    }
    let store: Arc<dyn Store> = match std::env::var("REDIS_URL") {
        Ok(url) => {
            println!("store: Redis at {url}");
            Arc::new(RedisStore::connect(&url).await?)
        }
        Err(_) => {
            println!("store: in-memory (set REDIS_URL to use Redis)");
            Arc::new(MemoryStore::new())
        }
    };

    let forward = Forward {
        client: Client::builder(TokioExecutor::new()).build_http(),
        origin: Arc::new(origin.clone()),
    };
    let app = Router::new()
        .fallback_service(tower::service_fn(move |req| forward.clone().call(req)))
        .layer(
            // Outermost first: the cache sees the request as the origin will (no hop-by-hop
            // fields), and the origin's response after `Forward` has cleaned it.
            ServiceBuilder::new()
                .map_request(strip_request)
                .layer(cache_layer(store)),
        );

    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    // A test (or a script) reads this line to learn the port when PORT is 0.
    println!("listening on http://{}", listener.local_addr()?);
    println!("proxying to {origin}");
    std::io::stdout().flush()?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

/// The cache, configured for a proxy that knows nothing of its origin's content.
fn cache_layer(store: Arc<dyn Store>) -> CacheLayer {
    CacheLayer::with_shared_store(store)
        // The origin sets every lifetime: what it gives no explicit freshness is not stored
        // (any final status it gives a lifetime to is, a `404` or a `301` as much as a `200`:
        // RFC 9111 §3).
        .ttl(Duration::ZERO)
        // One origin, reached with its own `Host` whatever name the client used for the proxy,
        // and no `X-Forwarded-Host`: its answer cannot depend on the client's `Host`, so
        // keying on it would only split the cache per alias of the proxy (and let a client
        // fill the store with made-up hosts).
        .key_host(false)
}

/// Forwards a request to the origin and hands back its response, streaming both bodies.
#[derive(Clone)]
struct Forward {
    client: Client<HttpConnector, Body>,
    origin: Arc<Uri>,
}

impl Forward {
    async fn call(self, mut req: Request<Body>) -> Result<Response<Body>, Infallible> {
        let authority = self
            .origin
            .authority()
            .expect("checked at start-up")
            .clone();
        // Origin form only: a client may send an absolute URI, naming the proxy.
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query(path_and_query)
            .build()
            .expect("the origin's scheme and authority with a valid path");
        let version = req.version();
        let client_ip = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let headers = req.headers_mut();
        headers.insert(
            header::HOST,
            HeaderValue::from_str(authority.as_str()).expect("an authority is a valid value"),
        );
        append_via(headers, version);
        if let Some(ip) = client_ip {
            append_list(headers, "x-forwarded-for", &ip.to_string());
            // Forwarded (RFC 7239) quotes IPv6 addresses, which contain ':'.
            let node = match ip {
                std::net::IpAddr::V4(v4) => v4.to_string(),
                std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
            };
            append_list(headers, "forwarded", &format!("for={node};proto=http"));
        }
        // Our connection to the origin is HTTP/1.1, whatever the client spoke.
        *req.version_mut() = Version::HTTP_11;

        let mut response = match self.client.request(req).await {
            Ok(response) => response.map(Body::new),
            Err(error) => {
                eprintln!("origin {authority} unreachable: {error}");
                let mut bad = Response::new(Body::from("502 Bad Gateway: origin unreachable\n"));
                *bad.status_mut() = StatusCode::BAD_GATEWAY;
                return Ok(bad);
            }
        };
        let version = response.version();
        strip_hop_by_hop(response.headers_mut());
        append_via(response.headers_mut(), version);
        // Our server speaks its own version to the client: hyper would answer in HTTP/1.0
        // to an HTTP/1.1 client if the origin's version were left on the response.
        *response.version_mut() = Version::default();
        Ok(response)
    }
}

/// The client's hop-by-hop fields describe its connection to us, not a request to the origin,
/// and must not sway the cache either.
fn strip_request(mut req: Request<Body>) -> Request<Body> {
    strip_hop_by_hop(req.headers_mut());
    req
}

/// Removes the hop-by-hop fields of RFC 9110 §7.6.1: those `Connection` names, `Connection`
/// itself, and the fields defined as hop-by-hop whether listed or not. `Proxy-Authenticate`
/// (from an origin) and `Proxy-Authorization` (from a client) are for a proxy's own
/// authentication, which this one does not do.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
}

/// Adds this proxy to `Via`, after the intermediaries already listed (RFC 9110 §7.6.3).
fn append_via(headers: &mut HeaderMap, received: Version) {
    let protocol = match received {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    append_list(headers, "via", &format!("{protocol} {PSEUDONYM}"));
}

/// Appends `item` to the comma-separated list in `name`, folding repeated fields into one.
fn append_list(headers: &mut HeaderMap, name: &'static str, item: &str) {
    let mut items: Vec<String> = headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::to_owned)
        .collect();
    items.push(item.to_owned());
    if let Ok(value) = HeaderValue::from_str(&items.join(", ")) {
        headers.insert(name, value);
    }
}
