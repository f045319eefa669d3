//! Sockets, TLS and HTTP/2 for the provider API: accepting connections, bounding them, and draining them
//! on shutdown.
//!
//! Every connection is TLS and then an HTTP/2 server connection whose streams are handed to `PushService`.
//! ALPN `h2` is offered, but a client that negotiates no ALPN and simply sends the HTTP/2 preface is
//! served too; the one certificate is served whatever SNI says (or without SNI, for clients dialling an IP
//! address). A client certificate from the provider CA, when offered, authenticates the whole connection
//! (`ConnectionAuth`). The first SETTINGS frame allows 1000 concurrent streams; PINGs are answered, and
//! the server pings idle connections to find dead ones; a connection with no request for the idle timeout
//! (an hour by default) is closed with GOAWAY. One watch signal tells the accept loop to stop and every
//! connection to send the two-step GOAWAY (hyper/h2's graceful shutdown); streams already open run to
//! completion, for a bounded time.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::jwt::AuthorizedProvider;
use super::{ConnectionAuth, PushService};

/// Streams one provider connection may have open at once (APNs allows 1000).
const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// A client that connects but never finishes the TLS handshake is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pings on otherwise idle connections find providers that vanished without closing.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// A provider that does not answer a ping within this long is gone.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(30);
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
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
}

/// Resolves once shutdown is signalled (or the signal's sender is gone, which means the same).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

impl ProviderServer {
    /// Accepts connections until shutdown, then waits (at most `SHUTDOWN_GRACE`) for them to drain.
    pub async fn run(self) {
        let ProviderServer { listener, acceptor, service, connections, mut shutdown, idle_timeout } = self;
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
            let connection = Connection { acceptor: acceptor.clone(), service: service.clone(), idle_timeout };
            tasks.spawn(connection.serve(tcp, shutdown.clone(), permit));
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

/// Requests in progress on one connection and when the last one ended, for the idle timeout.
struct Activity {
    started: tokio::time::Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` when a request last began or ended.
    last_ms: AtomicU64,
}

/// Marks one request in progress until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            started: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// When the connection will have been idle for `timeout`, counting from the last activity.
    fn idle_deadline(&self, timeout: Duration) -> tokio::time::Instant {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return tokio::time::Instant::now() + timeout;
        }
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + timeout
    }

    fn is_idle(&self, timeout: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && tokio::time::Instant::now() >= self.idle_deadline(timeout)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every connection task shares.
struct Connection {
    acceptor: TlsAcceptor,
    service: Arc<PushService>,
    idle_timeout: Duration,
}

/// Who the client certificate (if any) says the provider is. rustls has already checked the chain to the
/// provider CA; a certificate from anywhere else failed the handshake.
fn connection_auth(certificates: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> ConnectionAuth {
    match certificates.and_then(|chain| chain.first()) {
        None => ConnectionAuth::Token,
        Some(leaf) => match courier_node::pki::provider_identity_from_cert(leaf) {
            Some(identity) => ConnectionAuth::Certificate(AuthorizedProvider::from_certificate(identity)),
            None => ConnectionAuth::BadCertificate,
        },
    }
}

impl Connection {
    async fn serve(self, tcp: TcpStream, mut shutdown: watch::Receiver<bool>, _permit: OwnedSemaphorePermit) {
        let Connection { acceptor, service, idle_timeout } = self;
        let _gauge = ConnectionGauge::open();
        let _ = tcp.set_nodelay(true);
        let tls = tokio::select! {
            _ = stopping(&mut shutdown) => return,
            handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "provider TLS handshake failed");
                    metrics::counter!("courier_gateway_provider_handshake_failures_total").increment(1);
                    return;
                }
                Err(_) => {
                    tracing::debug!("provider TLS handshake timed out");
                    return;
                }
            },
        };
        let auth = Arc::new(connection_auth(tls.get_ref().1.peer_certificates()));
        let activity = Activity::new();
        let handler_activity = activity.clone();
        let handler = service_fn(move |request| {
            let (service, auth, busy) = (service.clone(), auth.clone(), handler_activity.begin());
            async move {
                let response = service.handle(request, &auth).await;
                drop(busy);
                Ok::<_, Infallible>(response)
            }
        });
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
        let connection = builder.serve_connection(TokioIo::new(tls), handler);
        let mut connection = std::pin::pin!(connection);
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break result,
                _ = stopping(&mut shutdown) => {
                    // GOAWAY: no new streams, but the ones already open run to completion.
                    connection.as_mut().graceful_shutdown();
                    break connection.await;
                }
                _ = tokio::time::sleep_until(activity.idle_deadline(idle_timeout)) => {
                    if activity.is_idle(idle_timeout) {
                        tracing::debug!("closing an idle provider connection");
                        connection.as_mut().graceful_shutdown();
                        break connection.await;
                    }
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "provider connection ended with an error");
        }
    }
}
