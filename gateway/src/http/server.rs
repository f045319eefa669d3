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
//!
//! What a connection may cost before it has earned a request is bounded (`ConnectionLimits`): one deadline
//! from accept to the first request's HEADERS covers any wait for a handshake slot, the TLS handshake, and
//! the HTTP/2 preface and SETTINGS, so silent connections cannot hold the connection cap for long; each
//! source address (an IPv4 address, an IPv6 /64) may hold only so many connections and so many handshakes
//! in progress; and TLS handshakes in progress overall are bounded, the rest waiting their turn.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_core::shutdown::CancellationToken;
use courier_core::telemetry::GaugeHeld;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::jwt::AuthorizedProvider;
use super::{ConnectionAuth, PushService};

/// Streams one provider connection may have open at once (APNs allows 1000).
const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// How long a connection that missed its first-request deadline gets to take its GOAWAY before it is
/// dropped: a silent client never answers the PING of the graceful close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Pings on otherwise idle connections find providers that vanished without closing.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// A provider that does not answer a ping within this long is gone.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long in-flight requests may take to finish once shutdown has begun.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (usually out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Which of the provider-facing APIs a listener serves; they share everything but their routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Pushes and delivery status (`PushService::handle`).
    Push,
    /// Channel management (`PushService::handle_channels`).
    Channels,
}

/// The provider-facing HTTPS server.
pub struct ProviderServer {
    pub api: Api,
    pub listener: TcpListener,
    pub acceptor: TlsAcceptor,
    pub service: Arc<PushService>,
    /// One permit per open connection; when they run out, accepting waits.
    pub connections: Arc<Semaphore>,
    /// Becomes `true` when the gateway shuts down.
    pub shutdown: CancellationToken,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// What a connection may cost before its first request.
    pub limits: ConnectionLimits,
}

/// Bounds on connections that have not yet sent a request; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From accept to the first request's HEADERS; a connection that misses it is closed.
    pub first_request_timeout: Duration,
    /// Connections one source address may hold at once (0 = no limit); a further one is closed at accept.
    pub max_connections_per_address: usize,
    /// TLS handshakes in progress at once; the rest wait their turn.
    pub max_handshakes: usize,
    /// TLS handshakes one source address may have in progress at once (0 = no limit); the rest wait.
    pub max_handshakes_per_address: usize,
}

/// What one source address holds now.
struct Source {
    connections: usize,
    /// Its own handshake slots, so that one address cannot occupy every global one.
    handshakes: Arc<Semaphore>,
}

/// Connections and handshake slots per source address; an address leaves the table with its last
/// connection, so the table is as large as the number of addresses connected (itself bounded by the
/// connection cap).
struct Sources {
    limits: ConnectionLimits,
    table: Mutex<HashMap<IpAddr, Source>>,
}

/// One connection's place in its source's allowance; gives it back when dropped.
struct SourceSlot {
    sources: Arc<Sources>,
    key: IpAddr,
    handshakes: Arc<Semaphore>,
}

impl Sources {
    fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Sources { limits, table: Mutex::new(HashMap::new()) })
    }

    /// A place for one more connection from `ip`, unless that address already holds its share.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let key = courier_core::rate::source_key(ip);
        let max = self.limits.max_connections_per_address;
        let per_address_handshakes = match self.limits.max_handshakes_per_address {
            0 => Semaphore::MAX_PERMITS,
            n => n,
        };
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let source = table
            .entry(key)
            .or_insert_with(|| Source { connections: 0, handshakes: Arc::new(Semaphore::new(per_address_handshakes)) });
        if max != 0 && source.connections >= max {
            return None;
        }
        source.connections += 1;
        let handshakes = source.handshakes.clone();
        metrics::gauge!("courier_gateway_provider_source_addresses").set(table.len() as f64);
        Some(SourceSlot { sources: self.clone(), key, handshakes })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut table = self.sources.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(source) = table.get_mut(&self.key) {
            source.connections = source.connections.saturating_sub(1);
            if source.connections == 0 {
                table.remove(&self.key);
            }
        }
        metrics::gauge!("courier_gateway_provider_source_addresses").set(table.len() as f64);
    }
}

/// Counts a connection closed for missing its first-request deadline, by the stage it had reached.
fn missed_first_request(stage: &'static str) {
    metrics::counter!("courier_gateway_provider_first_request_timeouts_total", "stage" => stage).increment(1);
}

/// A handshake slot, waiting for it when none is free (and counting that it had to).
async fn turn<'a>(slots: &'a Semaphore, limit: &'static str) -> Option<tokio::sync::SemaphorePermit<'a>> {
    match slots.try_acquire() {
        Ok(permit) => Some(permit),
        Err(tokio::sync::TryAcquireError::Closed) => None,
        Err(tokio::sync::TryAcquireError::NoPermits) => {
            metrics::counter!("courier_gateway_provider_handshake_waits_total", "limit" => limit).increment(1);
            slots.acquire().await.ok()
        }
    }
}

impl ProviderServer {
    /// Accepts connections until shutdown, then waits (at most `SHUTDOWN_GRACE`) for them to drain.
    pub async fn run(self) {
        let ProviderServer { api, listener, acceptor, service, connections, shutdown, idle_timeout, limits } = self;
        let sources = Sources::new(limits);
        let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
        let mut tasks = JoinSet::new();
        loop {
            // Reap finished connections so the set only holds live ones.
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = connections.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a provider connection failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let accepted_at = tokio::time::Instant::now();
            let Some(source) = sources.admit(peer.ip()) else {
                tracing::debug!(%peer, "refusing a provider connection: its address holds its share already");
                let reason = "address_connections";
                metrics::counter!("courier_gateway_provider_connections_refused_total", "reason" => reason)
                    .increment(1);
                drop(tcp);
                continue;
            };
            tracing::debug!(%peer, "provider connected");
            let connection = Connection {
                api,
                acceptor: acceptor.clone(),
                service: service.clone(),
                idle_timeout,
                first_request_deadline: accepted_at + limits.first_request_timeout,
                handshakes: handshakes.clone(),
                source,
            };
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

/// Requests in progress on one connection and when the last one ended, for the idle timeout.
struct Activity {
    started: tokio::time::Instant,
    /// Whether any request has begun: until one has, the first-request deadline applies.
    begun: AtomicBool,
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
            begun: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.begun.store(true, Ordering::Relaxed);
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

    fn has_begun(&self) -> bool {
        self.begun.load(Ordering::Relaxed)
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

/// One connection task's share of the server.
struct Connection {
    api: Api,
    acceptor: TlsAcceptor,
    service: Arc<PushService>,
    idle_timeout: Duration,
    /// Accept time plus the first-request timeout.
    first_request_deadline: tokio::time::Instant,
    /// Handshake slots for the whole server.
    handshakes: Arc<Semaphore>,
    /// This connection's place in its source address's allowance, held until it closes.
    source: SourceSlot,
}

/// Who the client certificate (if any) says the provider is. rustls has already checked the chain to the
/// provider CA; a certificate from anywhere else failed the handshake.
fn connection_auth(certificates: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> ConnectionAuth {
    match certificates.and_then(|chain| chain.first()) {
        None => ConnectionAuth::Token,
        Some(leaf) => match courier_core::pki::provider_identity_from_cert(leaf) {
            Some(identity) => ConnectionAuth::Certificate(AuthorizedProvider::from_certificate(identity)),
            None => ConnectionAuth::BadCertificate,
        },
    }
}

impl Connection {
    async fn serve(self, tcp: TcpStream, shutdown: CancellationToken, _permit: OwnedSemaphorePermit) {
        let Connection { api, acceptor, service, idle_timeout, first_request_deadline, handshakes, source } = self;
        let _gauge = GaugeHeld::new("courier_gateway_provider_connections");
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            // Wait for this address's turn first, so that one address never holds more than its share of the
            // server's slots.
            let _address_turn = turn(&source.handshakes, "address").await?;
            let _turn = turn(&handshakes, "total").await?;
            let _in_progress = GaugeHeld::new("courier_gateway_provider_handshakes");
            Some(acceptor.accept(tcp).await)
        };
        let tls = tokio::select! {
            _ = shutdown.cancelled() => return,
            handshake = tokio::time::timeout_at(first_request_deadline, handshake) => match handshake {
                Ok(Some(Ok(tls))) => tls,
                Ok(Some(Err(error))) => {
                    tracing::debug!(%error, "provider TLS handshake failed");
                    metrics::counter!("courier_gateway_provider_handshake_failures_total").increment(1);
                    return;
                }
                Ok(None) => return,
                Err(_) => {
                    tracing::debug!("provider TLS handshake missed the first-request deadline");
                    missed_first_request("handshake");
                    return;
                }
            },
        };
        let auth = Arc::new(connection_auth(tls.get_ref().1.peer_certificates()));
        let activity = Activity::new();
        let handler_activity = activity.clone();
        let handler = service_fn(move |request| {
            let (service, auth, busy) = (service.clone(), auth.clone(), handler_activity.begin());
            // Boxed: hyper moves each stream's future into a task of its own, and a request's whole
            // state machine (routing and forwarding included) is large enough that copying it showed in
            // profiles; a box is moved as one pointer.
            Box::pin(async move {
                let response = match api {
                    Api::Push => service.handle(request, &auth).await,
                    Api::Channels => service.handle_channels(request, &auth).await,
                };
                drop(busy);
                Ok::<_, Infallible>(response)
            })
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
                _ = shutdown.cancelled() => {
                    // GOAWAY: no new streams, but the ones already open run to completion.
                    connection.as_mut().graceful_shutdown();
                    break connection.await;
                }
                _ = tokio::time::sleep_until(first_request_deadline), if !activity.has_begun() => {
                    // A request may have begun since the branch was armed.
                    if !activity.has_begun() {
                        tracing::debug!("closing a provider connection that sent no request in time");
                        missed_first_request("request");
                        connection.as_mut().graceful_shutdown();
                        break tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await.unwrap_or(Ok(()));
                    }
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
        drop(source);
    }
}
