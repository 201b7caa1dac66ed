//! Serving the router over HTTP/1.1 with the limits a listener needs, which axum's own `serve`
//! does not set (it gives hyper no timer, so no header deadline exists at all):
//! - at most `api.max_connections` open connections: past it, new ones wait in the kernel's
//!   accept backlog instead of costing memory and tasks here;
//! - `api.header_timeout_secs` to read a request's headers, counted from when the connection
//!   is ready for the next request, so it also closes keep-alive connections idle that long
//!   (and slow-loris clients that trickle headers);
//! - the body deadline is the extractors' (`JsonBody`, the dashboard's forms);
//! - on shutdown: stop accepting, let each connection finish the request it is serving, then
//!   close it.
//!
//! Each request carries the peer address as `ConnectInfo<SocketAddr>` (the login limiter keys
//! on it).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::Shutdown;

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown`; returns once every connection has closed.
pub async fn run(router: Router, listener: TcpListener, limits: Limits, shutdown: Shutdown) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    let mut accept_errors = 0u32;
    loop {
        let permit = tokio::select! {
            _ = shutdown.clone() => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.clone() => break,
            r = listener.accept() => match r {
                Ok(v) => {
                    accept_errors = 0;
                    v
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the permit is kept
                    // for the next try.
                    accept_errors += 1;
                    if accept_errors == 1 || accept_errors.is_power_of_two() {
                        tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let mut stop = stop_rx.clone();
        tracker.spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().call(req)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    tracker.close();
    tracker.wait().await;
}
