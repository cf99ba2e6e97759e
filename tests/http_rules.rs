//! HTTP caching rules, one table row per rule with its RFC section, each run twice: through an
//! axum app whose handler is a scripted origin (here), and through the
//! `tower-redis-cache-proxy` binary (a process of its own) in front of a scripted origin
//! server (`proxy/tests/http_rules.rs`). The table and its runner are in
//! `tests/http_rules/table.rs`. Both use the proxy's cache
//! configuration ([`proxy_layer`]: TTL zero, so only explicit freshness is stored; no host in
//! the key; any final status), so a row holds for an app and for a proxy alike.
//!
//! # Adding a row
//!
//! Append a [`Row`] to [`RULES`]:
//!
//! - `section`: the RFC section(s) of the rule, `rule`: the rule in one sentence;
//! - `name`: a slug unique in the table. Every path of the row lives under `/{name}`: one app
//!   and one proxy (and their stores) serve the whole table, concurrently, so rows must not
//!   share paths;
//! - `through`: [`BOTH`], or [`PROXY_ONLY`] for what only a proxy does (hop-by-hop fields,
//!   `Via`);
//! - `origin`: one [`Script`] per path (relative to the row, without the query): the Nth request
//!   the origin receives for that path gets the Nth [`Reply`], the last one repeats;
//! - `steps`: the requests, in order, each with what must come of it. Start from [`GET`] and
//!   override fields (`Step { x_cache: Some("HIT"), calls: 1, ..GET }`). `calls` counts the
//!   origin's requests for the whole row so far (this step's included); `origin_saw` checks the
//!   origin's latest request of the row (`None`: the field must be absent); [`ORIGIN_HOST`]
//!   stands for the origin's `host:port`.
//!
//! Waiting: the layer writes an entry in the background once the body has been sent, so a step
//! that needs the previous response stored sets `after_write: true`. The runner then repeats
//! the request (every 10 ms, for up to 5 s) while it is a `MISS`, and rewinds the origin's
//! script and call count for each early attempt, so the row reads as if the write had landed
//! at once. Only use it where the origin's next reply would not itself be stored (a 304, or a
//! reply without explicit freshness), as an early attempt's reply reaches the cache. No row
//! sleeps; a row that needs time to pass belongs in `tests/rfc9111.rs` (or uses a `Date` in
//! the past).
//!
//! `HTTP_RULES=name` runs only the rows whose name contains `name`.
#![cfg(all(feature = "redis", feature = "memory"))]

mod common;
#[path = "http_rules/table.rs"]
mod table;

use std::sync::Arc;

use common::serve;
use table::{proxy_layer, run_table, Origin, Through, RULES};

#[test]
fn row_names_are_unique_slugs() {
    for (i, row) in RULES.iter().enumerate() {
        assert!(
            !row.name.is_empty()
                && row
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "row name {:?} is not a slug",
            row.name
        );
        assert!(
            RULES[..i].iter().all(|other| other.name != row.name),
            "two rows are named {:?}",
            row.name
        );
        for step in row.steps {
            assert!(
                step.path.starts_with('/'),
                "{}: path {:?}",
                row.name,
                step.path
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_holds_through_an_axum_app() {
    let origin = Arc::new(Origin::default());
    let app = origin.clone().router().layer(proxy_layer());
    let addr = serve(app).await;
    run_table(Through::App, addr, origin, addr.to_string()).await;
}
