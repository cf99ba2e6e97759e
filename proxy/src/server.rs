//! The listeners: HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) to clients with upgrades,
//! a bound on open connections, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admin::Admin;
use crate::config::Limits;
use crate::proxy::Proxy;

/// Serves `proxy` on `listener` until `shutdown` resolves; then stops accepting, lets every
/// open connection finish its in-flight requests (at most `limits.shutdown_timeout`), and
/// returns whether they all did.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: &Limits,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let connections = metrics::gauge!("proxy_connections_active");
    tokio::pin!(shutdown);
    loop {
        // At the limit, stop accepting: new connections wait in the listen backlog until one
        // closes, rather than each taking memory and a task.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    eprintln!("accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        // Boxed as a `Send` future here, where its types are concrete: inside the spawned
        // block the compiler cannot prove the body's error conversion for every lifetime.
        let connection: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(graceful.watch(connection));
        let connections = connections.clone();
        connections.increment(1.0);
        tokio::spawn(async move {
            let _ = connection.await;
            connections.decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => true,
        () = tokio::time::sleep(limits.shutdown_timeout) => false,
    }
}

/// Serves the admin endpoints (HTTP/1.1) until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { admin.handle(req).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
