//! `tower-redis-cache-proxy`: a caching reverse proxy in front of any HTTP service, on
//! tower-redis-cache. N nodes share one cache (Redis, Sentinel, Cluster or two tiers), fill a
//! cold URL with one upstream call, and are purged in one call.
//!
//! ```sh
//! UPSTREAM=http://127.0.0.1:8000 cargo run --release -p tower-redis-cache-proxy
//! tower-redis-cache-proxy --config proxy.toml      # or CONFIG=proxy.toml
//! tower-redis-cache-proxy --check --config proxy.toml
//! ```
//!
//! See `proxy/README.md` for the configuration file and the environment variables.

mod admin;
mod config;
mod forward;
mod proxy;
mod server;
mod store;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, Sources};

const USAGE: &str = "\
usage: tower-redis-cache-proxy [--config FILE] [--check]

  --config FILE   read a TOML configuration (also CONFIG=FILE); environment variables
                  override it: UPSTREAM, LISTEN, STORE, REDIS_URL, STORE_TIERED,
                  TRUSTED_PROXIES, LOG_REQUESTS, MAX_CONNECTIONS, ADMIN_LISTEN, ADMIN_TOKEN
  --check         check the configuration and exit

With no configuration at all, UPSTREAM=http://host:port is enough: the proxy listens on
127.0.0.1:8080 and caches in this process's memory.
";

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tower-redis-cache-proxy: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut config_path = std::env::var("CONFIG").ok().filter(|p| !p.is_empty());
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                config_path = Some(args.next().ok_or("--config needs a file name")?);
            }
            "--check" => check = true,
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    let text = match &config_path {
        Some(path) => {
            Some(std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?)
        }
        None => None,
    };
    let env = |name: &str| std::env::var(name).ok();
    let config = Config::load(Sources {
        file: config_path.as_deref().zip(text.as_deref()),
        env: &env,
    })?;
    if check {
        println!("configuration ok");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(start(Arc::new(config)))
}

async fn start(config: Arc<Config>) -> Result<(), Box<dyn std::error::Error>> {
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let stores = Arc::new(store::Stores::build(&config.store).await?);
    let proxy = Arc::new(
        proxy::Proxy::new(config.clone(), stores.store.clone()).map_err(|e| e.to_string())?,
    );

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", config.listen))?;
    let (stop, stopped) = watch::channel(false);
    let wait_stop = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let mut stdout = std::io::stdout();
    // Tests and scripts read these lines to learn the ports when they asked for port 0.
    writeln!(stdout, "listening on http://{}", listener.local_addr()?)?;
    if let Some(admin) = &config.admin {
        let admin_listener = TcpListener::bind(admin.listen)
            .await
            .map_err(|e| format!("admin listener on {}: {e}", admin.listen))?;
        writeln!(stdout, "admin on http://{}", admin_listener.local_addr()?)?;
        let admin = Arc::new(admin::Admin {
            proxy: proxy.clone(),
            stores: stores.clone(),
            token: admin.token.clone(),
            metrics,
            prefix_purge_depth: config.prefix_purge_depth,
        });
        tokio::spawn(server::serve_admin(
            admin_listener,
            admin,
            wait_stop(stopped.clone()),
        ));
    }
    writeln!(stdout, "proxying to {}", config.upstream)?;
    writeln!(stdout, "store: {}", stores.description)?;
    stdout.flush()?;

    tokio::spawn(async move {
        signal().await;
        println!("shutting down: no new connections, finishing in-flight requests");
        let _ = std::io::stdout().flush();
        let _ = stop.send(true);
    });
    let clean = server::serve(listener, proxy.clone(), &config.limits, wait_stop(stopped)).await;
    if !clean {
        eprintln!(
            "connections still open after {:?}: closing them",
            config.limits.shutdown_timeout
        );
    }
    // The last responses' writes to the store, bounded: a dead store must not hold the exit.
    let flushes = futures_join(proxy.layers().map(|l| l.flush()).collect());
    let _ = tokio::time::timeout(Duration::from_secs(5), flushes).await;
    println!("stopped");
    Ok(())
}

async fn futures_join(flushes: Vec<impl std::future::Future<Output = ()>>) {
    for flush in flushes {
        flush.await;
    }
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
