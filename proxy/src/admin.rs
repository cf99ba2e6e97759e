//! The admin listener (off unless configured): purges behind a token, health, readiness and
//! Prometheus metrics.
//!
//! - `POST /purge?url=/path?query` drops every stored response of a URL (its variants too);
//! - `POST /purge?tag=name` drops those tagged `name` (`Cache-Tag` / `Surrogate-Key`);
//! - `POST /purge?prefix=/dir/` drops those under a directory prefix;
//! - `GET /healthz` (the process answers), `GET /readyz` (the store answers), `GET /metrics`.
//!
//! Purges need `Authorization: Bearer <token>`. They act on the shared store, so every node
//! sharing it sees them (two-tier nodes through their invalidation channel).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;

use crate::forward::{prefix_tag, MAX_PREFIX_BYTES};
use crate::proxy::Proxy;
use crate::store::Stores;

/// What the admin endpoints answer from.
pub struct Admin {
    pub proxy: Arc<Proxy>,
    pub stores: Arc<Stores>,
    pub token: String,
    pub metrics: PrometheusHandle,
    pub prefix_purge_depth: usize,
}

impl Admin {
    /// Answers one admin request.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = req.uri().path();
        let response = match (req.method(), path) {
            (&Method::GET, "/healthz") => reply(StatusCode::OK, "ok\n".to_owned()),
            (&Method::GET, "/readyz") => {
                if self.stores.ready().await {
                    reply(StatusCode::OK, "ready\n".to_owned())
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the store does not answer\n".to_owned(),
                    )
                }
            }
            (&Method::GET, "/metrics") => {
                let mut response = reply(StatusCode::OK, self.metrics.render());
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            (&Method::POST, "/purge") => {
                if !self.authorized(&req) {
                    let mut response = reply(
                        StatusCode::UNAUTHORIZED,
                        "a valid bearer token is required\n".to_owned(),
                    );
                    response.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Bearer"),
                    );
                    return Ok(response);
                }
                self.purge(req.uri().query().unwrap_or("")).await
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/purge") => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".to_owned(),
            ),
            _ => reply(StatusCode::NOT_FOUND, "not found\n".to_owned()),
        };
        Ok(response)
    }

    /// `Authorization: Bearer <token>`, compared in constant time.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(given) = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        else {
            return false;
        };
        given.ct_eq(self.token.as_bytes()).into()
    }

    async fn purge(&self, query: &str) -> Response<Full<Bytes>> {
        let pairs: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                Some((percent_decode(k)?, percent_decode(v)?))
            })
            .collect();
        let [(kind, value)] = pairs.as_slice() else {
            return reply(
                StatusCode::BAD_REQUEST,
                "give exactly one of url=, tag= or prefix= (percent-encoded)\n".to_owned(),
            );
        };
        let invalidator = self.proxy.invalidator("/");
        let outcome = match kind.as_str() {
            "url" => {
                let Ok(uri) = value.parse::<http::Uri>() else {
                    return reply(StatusCode::BAD_REQUEST, format!("{value:?} is not a URL\n"));
                };
                if !uri.path().starts_with('/') {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        "the URL's path starts with '/'\n".to_owned(),
                    );
                }
                self.proxy
                    .invalidator(uri.path())
                    .invalidate(&uri)
                    .await
                    .map(u64::from)
            }
            "tag" if !value.is_empty() => invalidator.invalidate_tag(value).await,
            "prefix" => {
                let depth = value.matches('/').count().saturating_sub(1);
                if !value.starts_with('/') || !value.ends_with('/') {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        "a prefix is a directory: it starts and ends with '/' (purge one page with url=)\n".to_owned(),
                    );
                }
                if depth > self.prefix_purge_depth || value.len() > MAX_PREFIX_BYTES {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "responses are tagged with at most {} directories (prefix_purge_depth) and {MAX_PREFIX_BYTES} bytes\n",
                            self.prefix_purge_depth
                        ),
                    );
                }
                invalidator.invalidate_tag(&prefix_tag(value)).await
            }
            _ => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "give exactly one of url=, tag= or prefix=\n".to_owned(),
                )
            }
        };
        match outcome {
            Ok(n) => reply(StatusCode::OK, format!("{{\"purged\":{n}}}\n")),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the store failed: {e}\n"),
            ),
        }
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// `%XX` and `+` decoded; `None` for a bad escape or text that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_are_percent_decoded_and_bad_escapes_refused() {
        assert_eq!(percent_decode("%2Fa%3Fb%3D1").as_deref(), Some("/a?b=1"));
        assert_eq!(percent_decode("a+b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
