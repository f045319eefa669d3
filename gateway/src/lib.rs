//! A Courier gateway: the APNs-compatible provider API in front of the cluster.
//!
//! It terminates providers' HTTPS/HTTP2 connections, authenticates their JWTs, opens device tokens with
//! the token keyring, and forwards each accepted push to the owning node over mutual-TLS gRPC. It keeps no
//! state of its own beyond caches: any number of gateways can run side by side. `start` brings one up;
//! `RunningGateway::shutdown` drains it. `provider` is the client half, for the CLI, tests and load tests.

pub mod config;
pub mod http;
pub mod provider;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use courier_node::pki::{PkiDir, PkiError, ProviderCredential};
use courier_node::telemetry::Readiness;
use courier_node::tls::TlsError;
use courier_node::token::{Keyring, KeyringError};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::http::PushService;
use crate::http::jwt::{CredentialError, JwtVerifier, ProviderCredentials};
use crate::http::server::{ProviderServer, SHUTDOWN_GRACE};
pub use config::GatewayConfig;
use route::{NodeRouter, RouteError};

/// Provider connections one gateway holds at once; beyond this, new connections wait to be accepted.
const MAX_PROVIDER_CONNECTIONS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A started gateway. Dropping it leaves its tasks running; call `shutdown` to stop them.
pub struct RunningGateway {
    /// Where the provider API actually listens (the OS picks the port when configured with 0).
    pub provider_addr: SocketAddr,
    /// Where metrics and health endpoints actually listen.
    pub metrics_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    provider_task: JoinHandle<()>,
    metrics_task: JoinHandle<()>,
}

impl std::fmt::Debug for RunningGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningGateway")
            .field("provider_addr", &self.provider_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish()
    }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "courier_gateway_notifications_accepted_total",
        "Pushes the owning node accepted (stored, sent or discarded by expiration)."
    );
    metrics::describe_counter!(
        "courier_gateway_notifications_rejected_total",
        "Pushes answered with an error, by APNs reason."
    );
    metrics::describe_gauge!("courier_gateway_provider_connections", "Open provider HTTP/2 connections.");
    metrics::describe_histogram!(
        "courier_gateway_forward_latency_seconds",
        metrics::Unit::Seconds,
        "Time from forwarding a push to the node until its answer."
    );
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr).await.map_err(|source| GatewayError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, GatewayError> {
    listener.local_addr().map_err(|source| GatewayError::Bind { addr, source })
}

/// Loads keys and certificates from the PKI directory, binds both ports and starts serving.
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, GatewayError> {
    courier_node::tls::install_crypto_provider();
    courier_node::telemetry::prometheus();
    describe_metrics();

    let pki = PkiDir::new(&config.pki_dir);
    let chain = courier_node::pki::load_certs(&pki.member_cert("gateway"))?;
    let key = courier_node::pki::load_key(&pki.member_key("gateway"))?;
    let tls = courier_node::tls::server_config(chain, key, &[b"h2"])?;
    let keyring = Keyring::load(&pki.token_keys())?;
    let credentials = ProviderCredentials::new(vec![ProviderCredential::load(&pki.provider_credential())?])?;
    let timeout = Duration::from_millis(config.request_timeout_ms);
    let router = NodeRouter::new(&pki, &config.node_addr, &config.node_server_name, timeout)?;
    let service = Arc::new(PushService {
        verifier: JwtVerifier::new(credentials, config.max_jwt_age_secs),
        keyring,
        router,
        body_timeout: timeout,
    });

    let provider_listener = bind(config.provider_addr).await?;
    let provider_addr = local_addr(&provider_listener, config.provider_addr)?;
    let metrics_listener = bind(config.metrics_addr).await?;
    let metrics_addr = local_addr(&metrics_listener, config.metrics_addr)?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let server = ProviderServer {
        listener: provider_listener,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        service,
        connections: Arc::new(Semaphore::new(MAX_PROVIDER_CONNECTIONS)),
        shutdown: shutdown_rx.clone(),
    };
    let provider_task = tokio::spawn(server.run());

    // Ready as soon as the provider port accepts; the node connection is made lazily and its absence
    // shows as 503s, which a load balancer should not mistake for a dead gateway.
    let readiness = Readiness::default();
    readiness.set(true);
    let mut metrics_shutdown = shutdown_rx;
    let metrics_task = tokio::spawn(async move {
        let stop = async move {
            let _ = metrics_shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(error) = courier_node::telemetry::serve(metrics_listener, vec![readiness], stop).await {
            tracing::error!(%error, "gateway metrics server failed");
        }
    });

    tracing::info!(%provider_addr, %metrics_addr, node = %config.node_addr, "gateway started");
    Ok(RunningGateway { provider_addr, metrics_addr, shutdown, provider_task, metrics_task })
}

impl RunningGateway {
    /// Stops accepting, lets in-flight requests finish (for a few seconds at most) and joins every task.
    pub async fn shutdown(self) {
        let RunningGateway { shutdown, mut provider_task, mut metrics_task, .. } = self;
        let _ = shutdown.send(true);
        // The provider server bounds its own drain; the margin covers a task that ignores the signal.
        let limit = SHUTDOWN_GRACE + Duration::from_secs(1);
        if tokio::time::timeout(limit, &mut provider_task).await.is_err() {
            provider_task.abort();
            let _ = provider_task.await;
        }
        if tokio::time::timeout(limit, &mut metrics_task).await.is_err() {
            metrics_task.abort();
            let _ = metrics_task.await;
        }
        tracing::info!("gateway stopped");
    }
}
