//! A Courier gateway: the APNs-compatible provider API in front of the cluster.
//!
//! It terminates providers' HTTPS/HTTP2 connections, authenticates their JWTs, opens device tokens with
//! the token keyring, and forwards each accepted push to the owning node over mutual-TLS gRPC. It keeps no
//! state of its own beyond caches: any number of gateways can run side by side. `start` brings one up;
//! `RunningGateway::shutdown` drains it. `provider` is the client half, for the CLI, tests and load tests.

pub mod channels;
pub mod config;
pub mod http;
pub mod provider;
pub mod receipts;
pub mod route;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use courier_core::listen::{BindError, bind};
use courier_core::peer::{PeerError, Peers};
use courier_core::pki::{PkiDir, PkiError};
use courier_core::shutdown::{CancellationToken, DropGuard};
use courier_core::telemetry::Readiness;
use courier_core::tls::TlsError;
use courier_core::token::Keyring;
use tokio::sync::Semaphore;
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::channels::ChannelView;
use crate::http::PushService;
use crate::http::jwt::{JwtVerifier, ProviderCredentials};
use crate::http::ratelimit::{Limit, RateLimiter};
use crate::http::server::{Api, ConnectionLimits, ProviderServer, SHUTDOWN_GRACE};
pub use config::GatewayConfig;
use route::NodeRouter;
use watch::{ClusterWatch, ViewReceiver};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Peers(#[from] PeerError),
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// A started gateway. Dropping it tells its tasks to stop but waits for none of them; `shutdown` drains
/// and joins them.
pub struct RunningGateway {
    /// Where the provider API actually listens (the OS picks the port when configured with 0).
    pub provider_addr: SocketAddr,
    /// Where channel management actually listens.
    pub channels_addr: SocketAddr,
    /// Where metrics and health endpoints actually listen.
    pub metrics_addr: SocketAddr,
    /// The latest view of the cluster this gateway routes by.
    pub view: ViewReceiver,
    /// Copies of receipts the owners kept unsaved for pushes forwarded here (`receipts`).
    pub receipt_copies: Arc<receipts::HeldReceipts>,
    shutdown: CancellationToken,
    _stop_on_drop: DropGuard,
    provider_task: JoinHandle<()>,
    channels_task: JoinHandle<()>,
    metrics_task: JoinHandle<()>,
    watch_task: JoinHandle<()>,
}

impl std::fmt::Debug for RunningGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningGateway")
            .field("provider_addr", &self.provider_addr)
            .field("channels_addr", &self.channels_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish()
    }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "courier_gateway_notifications_accepted_total",
        "Pushes answered 200, by the owning node's outcome: delivered (the device acked before it had to be \
         stored), stored (durable on R copies), sent (expiration 0, on a live link), discarded (expiration 0, \
         device away)."
    );
    metrics::describe_counter!(
        "courier_gateway_notifications_rejected_total",
        "Pushes answered with an error, by APNs reason."
    );
    metrics::describe_gauge!("courier_gateway_provider_connections", "Open provider HTTP/2 connections.");
    metrics::describe_counter!(
        "courier_gateway_provider_handshake_failures_total",
        "Provider TLS handshakes that failed (including client certificates from another CA)."
    );
    metrics::describe_gauge!(
        "courier_gateway_provider_handshakes",
        "Provider TLS handshakes in progress (bounded by --provider-max-handshakes)."
    );
    metrics::describe_counter!(
        "courier_gateway_provider_handshake_waits_total",
        "Provider TLS handshakes that waited for a slot, by the limit that made them wait (address or total)."
    );
    metrics::describe_gauge!(
        "courier_gateway_provider_source_addresses",
        "Source addresses (IPv4 addresses, IPv6 /64s) holding provider connections."
    );
    metrics::describe_counter!(
        "courier_gateway_provider_connections_refused_total",
        "Provider connections closed at accept, by reason (address_connections: the source address held its share)."
    );
    metrics::describe_counter!(
        "courier_gateway_provider_first_request_timeouts_total",
        "Provider connections closed for sending no request within the first-request timeout, by the stage \
         they had reached (handshake: waiting for or in the TLS handshake; request: TLS done, no request)."
    );
    metrics::describe_counter!(
        "courier_gateway_rate_limited_total",
        "Pushes refused with 429 TooManyRequests, by scope (device token or provider team)."
    );
    metrics::describe_counter!(
        "courier_gateway_jwt_signature_checks_total",
        "Provider JWT signatures checked (each distinct token once, then cached)."
    );
    metrics::describe_counter!(
        "courier_gateway_provider_token_updates_refused_total",
        "Provider JWTs refused with 429 TooManyProviderTokenUpdates."
    );
    metrics::describe_counter!(
        "courier_gateway_forward_retries_total",
        "Forwarded pushes retried on the owner of a newer cluster view."
    );
    metrics::describe_gauge!("courier_gateway_cluster_epoch", "Cluster epoch of the view this gateway routes by.");
    metrics::describe_gauge!(
        "courier_gateway_channels",
        "Broadcast channels in this gateway's copy of the channel book."
    );
    metrics::describe_counter!(
        "courier_gateway_channel_requests_total",
        "Channel management requests, by call (create, read, delete, list; refused before the call was known) \
         and outcome (ok, or the APNs reason)."
    );
    metrics::describe_histogram!(
        "courier_gateway_forward_latency_seconds",
        metrics::Unit::Seconds,
        "Time from forwarding a push to the node until its answer."
    );
    metrics::describe_histogram!(
        "courier_gateway_forward_batch_size",
        "Pushes in one batch the gateway sent on a node's Forward stream."
    );
}

/// The provider API's TLS: the gateway certificate for every client (with or without SNI), ALPN `h2`,
/// and an optional client certificate, which must then chain to the provider CA. A certificate from any
/// other issuer fails the handshake (the client sees a TLS alert, not an HTTP answer). A PKI directory
/// made before the provider CA existed gets token authentication only.
fn provider_tls(
    pki: &PkiDir,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, GatewayError> {
    let provider_ca = pki.provider_ca_cert();
    if !provider_ca.exists() {
        tracing::warn!(path = %provider_ca.display(), "no provider CA: certificate-based provider auth is off");
        return Ok(courier_core::tls::server_config(chain, key, &[b"h2"])?);
    }
    let roots = courier_core::tls::roots_from(&provider_ca)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        courier_core::tls::crypto_provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(TlsError::from)?;
    let mut config = rustls::ServerConfig::builder_with_provider(courier_core::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::from)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::from)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Loads keys and certificates from the PKI directory, binds both ports and starts serving.
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, GatewayError> {
    courier_core::tls::install_crypto_provider();
    courier_core::telemetry::prometheus();
    describe_metrics();

    let pki = PkiDir::new(&config.pki_dir);
    courier_core::pki::export_certificate_expiry(&[
        ("gateway", pki.member_cert("gateway")),
        ("cluster-ca", pki.cluster_ca_cert()),
    ]);
    let chain = courier_core::pki::load_certs(&pki.member_cert("gateway"))?;
    let key = courier_core::pki::load_key(&pki.member_key("gateway"))?;
    let tls = provider_tls(&pki, chain, key)?;
    // Keys and credentials arrive with the first view from the cluster; until then every push is refused.
    let keyring = Keyring::default();
    let credentials = ProviderCredentials::default();
    let timeout = Duration::from_millis(config.request_timeout_ms);
    let peers = Arc::new(Peers::new(&pki, "gateway", config.node_server_name.clone(), timeout)?);
    let (views, view) = signal::channel(None);
    // Ready while the cluster watch hears a node that knows its leader (see `watch`).
    let readiness = Readiness::default();
    let channels = Arc::new(ChannelView::default());
    let cluster_watch = ClusterWatch {
        seeds: config.node_addrs.clone(),
        peers: peers.clone(),
        keyring: keyring.clone(),
        credentials: credentials.clone(),
        readiness: readiness.clone(),
        channels: channels.clone(),
    };
    let shutdown = CancellationToken::new();
    let (router, receipt_handover) = NodeRouter::new(peers, view.clone(), timeout, shutdown.clone());
    tokio::spawn(router.clone().open_streams_ahead());
    tokio::spawn(router.clone().keep_receipts_safe(receipt_handover));
    let receipt_copies = router.held_receipts();
    let limit = |per_sec: f64, burst: u32| Limit { per_sec, burst: f64::from(burst) };
    let service = Arc::new(PushService {
        verifier: JwtVerifier::with_refresh_limit(credentials, config.max_jwt_age_secs, config.min_jwt_refresh_secs),
        keyring,
        router,
        body_timeout: timeout,
        device_limit: RateLimiter::new("device", limit(config.device_rate_per_sec, config.device_burst)),
        team_limit: RateLimiter::new("team", limit(config.team_rate_per_sec, config.team_burst)),
        channels,
    });

    let (provider_listener, provider_addr) = bind("the provider port", config.provider_addr).await?;
    let (channels_listener, channels_addr) = bind("the channels port", config.channels_addr).await?;
    let (metrics_listener, metrics_addr) = bind("the metrics port", config.metrics_addr).await?;

    // The two provider-facing listeners share the TLS setup, the service and the connection cap; each has
    // its own per-address and handshake bookkeeping.
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let server = |api, listener| ProviderServer {
        api,
        listener,
        acceptor: acceptor.clone(),
        service: service.clone(),
        connections: connections.clone(),
        shutdown: shutdown.clone(),
        idle_timeout: Duration::from_secs(config.idle_timeout_secs.max(1)),
        limits: ConnectionLimits {
            first_request_timeout: Duration::from_millis(config.first_request_timeout_ms.max(1)),
            max_connections_per_address: config.max_connections_per_address,
            max_handshakes: config.max_handshakes.max(1),
            max_handshakes_per_address: config.max_handshakes_per_address,
        },
    };
    let provider_task = tokio::spawn(server(Api::Push, provider_listener).run());
    let channels_task = tokio::spawn(server(Api::Channels, channels_listener).run());
    let watch_task = tokio::spawn(cluster_watch.run(views, shutdown.clone()));

    let stop = shutdown.clone().cancelled_owned();
    let metrics_task = tokio::spawn(async move {
        if let Err(error) = courier_core::telemetry::serve(metrics_listener, vec![readiness], stop).await {
            tracing::error!(%error, "gateway metrics server failed");
        }
    });

    tracing::info!(%provider_addr, %channels_addr, %metrics_addr, nodes = ?config.node_addrs, "gateway started");
    let _stop_on_drop = shutdown.clone().drop_guard();
    Ok(RunningGateway {
        provider_addr,
        channels_addr,
        metrics_addr,
        view,
        receipt_copies,
        shutdown,
        _stop_on_drop,
        provider_task,
        channels_task,
        metrics_task,
        watch_task,
    })
}

impl RunningGateway {
    /// The epoch of the view it routes by, once it has one.
    pub fn epoch(&self) -> Option<u64> {
        self.view.borrow().as_ref().map(|v| v.epoch.0)
    }

    /// Stops accepting, lets in-flight requests finish (for a few seconds at most) and joins every task.
    pub async fn shutdown(self) {
        let RunningGateway { shutdown, provider_task, channels_task, metrics_task, watch_task, .. } = self;
        shutdown.cancel();
        let _ = watch_task.await;
        // The servers bound their own drain; the margin covers a task that ignores the signal.
        let limit = SHUTDOWN_GRACE + Duration::from_secs(1);
        for mut task in [provider_task, channels_task, metrics_task] {
            if tokio::time::timeout(limit, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        tracing::info!("gateway stopped");
    }
}
