//! The quickstart: an axum app caching `GET /items/{id}` for 60 s.
//!
//! ```sh
//! cargo run --example quickstart                                  # in-memory store
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example quickstart # Redis store
//! curl -si localhost:3000/items/1   # X-Cache: MISS
//! curl -si localhost:3000/items/1   # X-Cache: HIT
//! ```
//!
//! `PORT` overrides the port (default 3000).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tower_redis_cache::{CacheLayer, MemoryStore, RedisStore, Store};

/// Stands in for a slow database query.
async fn get_item(Path(id): Path<u64>) -> Json<Value> {
    tokio::time::sleep(Duration::from_millis(50)).await;
    Json(json!({ "id": id, "name": format!("item {id}") }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
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

    let app = Router::new().route(
        "/items/{id}",
        get(get_item).layer(CacheLayer::with_shared_store(store).ttl(Duration::from_secs(60))),
    );

    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://127.0.0.1:{port}");
    println!("try: curl -si localhost:{port}/items/1 | grep -i x-cache   (twice: MISS, then HIT)");
    axum::serve(listener, app).await?;
    Ok(())
}
