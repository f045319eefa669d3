//! Sockets, TLS and HTTP/2 for the provider API: accepting connections, bounding them, and draining them
//! on shutdown.
//!
//! Every connection is TLS with ALPN `h2` and then an HTTP/2 server connection whose streams are handed to
//! `PushService`. One watch signal tells the accept loop to stop and every connection to send GOAWAY; the
//! accept loop owns the connection tasks and gives them a bounded time to finish their streams.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::PushService;

/// Streams one provider connection may have open at once (APNs allows 1000).
const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// A client that connects but never finishes the TLS handshake is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pings on otherwise idle connections find providers that vanished without closing.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// How long in-flight requests may take to finish once shutdown has begun.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (usually out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The provider-facing HTTPS server.
pub struct ProviderServer {
    pub listener: TcpListener,
    pub acceptor: TlsAcceptor,
    pub service: Arc<PushService>,
    /// One permit per open connection; when they run out, accepting waits.
    pub connections: Arc<Semaphore>,
    /// Becomes `true` when the gateway shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// Resolves once shutdown is signalled (or the signal's sender is gone, which means the same).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

impl ProviderServer {
    /// Accepts connections until shutdown, then waits (at most `SHUTDOWN_GRACE`) for them to drain.
    pub async fn run(self) {
        let ProviderServer { listener, acceptor, service, connections, mut shutdown } = self;
        let mut tasks = JoinSet::new();
        loop {
            // Reap finished connections so the set only holds live ones.
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                _ = stopping(&mut shutdown) => break,
                permit = connections.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = stopping(&mut shutdown) => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a provider connection failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            tracing::debug!(%peer, "provider connected");
            tasks.spawn(serve_connection(tcp, acceptor.clone(), service.clone(), shutdown.clone(), permit));
        }
        drop(listener);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(remaining = tasks.len(), "provider connections did not drain in time; closing them");
            tasks.shutdown().await;
        }
    }
}

/// Keeps `courier_gateway_provider_connections` right however a connection task ends.
struct ConnectionGauge;

impl ConnectionGauge {
    fn open() -> Self {
        metrics::gauge!("courier_gateway_provider_connections").increment(1.0);
        ConnectionGauge
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("courier_gateway_provider_connections").decrement(1.0);
    }
}

async fn serve_connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    service: Arc<PushService>,
    mut shutdown: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let _gauge = ConnectionGauge::open();
    let _ = tcp.set_nodelay(true);
    let tls = tokio::select! {
        _ = stopping(&mut shutdown) => return,
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::debug!(%error, "provider TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("provider TLS handshake timed out");
                return;
            }
        },
    };
    let handler = service_fn(move |request| {
        let service = service.clone();
        async move { Ok::<_, Infallible>(service.handle(request).await) }
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE_INTERVAL);
    let connection = builder.serve_connection(TokioIo::new(tls), handler);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stopping(&mut shutdown) => {
            // GOAWAY: no new streams, but the ones already open run to completion.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "provider connection ended with an error");
    }
}
