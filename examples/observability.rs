//! Observability: an axum app whose cache reports to Prometheus at `/metrics` and as JSON at
//! `/cache/stats`.
//!
//! ```sh
//! cargo run --example observability --features metrics
//! curl -s localhost:3000/items/1 >/dev/null; curl -s localhost:3000/items/1 >/dev/null
//! curl -s localhost:3000/metrics | grep http_cache_requests_total
//! curl -s localhost:3000/cache/stats
//! ```
//!
//! `PORT` overrides the port (default 3000).

use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::{json, Map, Value};
use tower_redis_cache::{CacheLayer, MemoryStore};

async fn get_item(Path(id): Path<u64>) -> Json<Value> {
    Json(json!({ "id": id, "name": format!("item {id}") }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The recorder goes in before the first request: each layer registers its metrics then.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    // One layer per route, named after the route (never the raw path): `route="items"`.
    let items = CacheLayer::new(MemoryStore::new())
        .ttl(Duration::from_secs(60))
        .route_name("items");
    let stats = items.clone();

    let app = Router::new()
        .route("/items/{id}", get(get_item).layer(items))
        .route(
            "/metrics",
            get(move || std::future::ready(prometheus.render())),
        )
        .route(
            "/cache/stats",
            get(move || {
                let counters: Map<String, Value> = stats
                    .stats()
                    .counters()
                    .into_iter()
                    .map(|(name, value)| (name, value.into()))
                    .collect();
                std::future::ready(Json(json!({ "items": counters })))
            }),
        );

    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://127.0.0.1:{port}");
    println!("try: curl -s localhost:{port}/metrics | grep http_cache_requests_total");
    axum::serve(listener, app).await?;
    Ok(())
}
