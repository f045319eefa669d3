//! Starting and stopping a node: binds its three listeners and wires the edge, the store and the cluster
//! API together. Shutdown is one broadcast: every link says goodbye, the gRPC server drains, the store's
//! writer commits what it holds, and `shutdown` returns only when all of that has finished.

use std::net::SocketAddr;
use std::sync::Arc;

use courier_proto::cluster::cluster_server::ClusterServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::ClusterService;
use crate::config::NodeConfig;
use crate::delivery::Delivery;
use crate::edge::registry::Registry;
use crate::edge::{self, Edge, stopped};
use crate::pki::{DeviceCa, PkiDir, PkiError};
use crate::store::{Store, StoreError};
use crate::telemetry::{self, Readiness};
use crate::tls::{self, TlsError};
use crate::token::{Keyring, KeyringError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Keys(#[from] KeyringError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("binding {what} on {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cluster API TLS: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// A started node. Dropping it without `shutdown` leaves its tasks running until the runtime ends.
pub struct RunningNode {
    pub device_addr: SocketAddr,
    pub cluster_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub store: Store,
    shutdown: watch::Sender<bool>,
    tracker: TaskTracker,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr).await.map_err(|source| NodeError::Bind { what, addr, source })
}

fn read(path: std::path::PathBuf) -> Result<Vec<u8>, NodeError> {
    std::fs::read(&path).map_err(|source| NodeError::Read { path: path.display().to_string(), source })
}

pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
    tls::install_crypto_provider();
    telemetry::prometheus();
    let pki = PkiDir::new(&config.pki_dir);
    let keyring = Keyring::load(&pki.token_keys())?;
    let device_ca = DeviceCa::load(&pki)?;
    let store = Store::open(&config.data_dir.join("courier.redb"))?;
    let registry = Arc::new(Registry::default());

    let device_listener = bind("the device port", config.device_addr).await?;
    let cluster_listener = bind("the cluster API", config.cluster_addr).await?;
    let metrics_listener = bind("the metrics port", config.metrics_addr).await?;
    let local = |l: &TcpListener, addr| l.local_addr().unwrap_or(addr);
    let device_addr = local(&device_listener, config.device_addr);
    let cluster_addr = local(&cluster_listener, config.cluster_addr);
    let metrics_addr = local(&metrics_listener, config.metrics_addr);

    let acceptor = TlsAcceptor::from(Arc::new(tls::device_server_config(&pki, "node")?));
    let grpc_tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(pki.member_cert("node"))?, read(pki.member_key("node"))?))
        .client_ca_root(Certificate::from_pem(read(pki.cluster_ca_cert())?));

    let (shutdown, shutdown_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    let edge = Arc::new(Edge {
        settings: config.link_settings(),
        keyring,
        store: store.clone(),
        registry: registry.clone(),
        device_ca,
    });
    tracker.spawn(edge::serve(device_listener, acceptor, edge, config.max_links, shutdown_rx.clone(), tracker.clone()));

    let service = ClusterService { delivery: Delivery { store: store.clone(), registry: registry.clone() } };
    let grpc = Server::builder()
        .tls_config(grpc_tls)?
        .add_service(ClusterServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(cluster_listener), {
            let mut rx = shutdown_rx.clone();
            async move { stopped(&mut rx).await }
        });
    tracker.spawn(async move {
        if let Err(error) = grpc.await {
            tracing::error!(%error, "cluster API server failed");
        }
    });

    let readiness = Readiness::default();
    readiness.set(true);
    let mut metrics_stop = shutdown_rx.clone();
    tracker.spawn(async move {
        let stop = async move { stopped(&mut metrics_stop).await };
        if let Err(error) = telemetry::serve(metrics_listener, vec![readiness], stop).await {
            tracing::error!(%error, "metrics server failed");
        }
    });

    tracing::info!(node_id = config.node_id, %device_addr, %cluster_addr, %metrics_addr, "node started");
    Ok(RunningNode { device_addr, cluster_addr, metrics_addr, registry, store, shutdown, tracker })
}

impl RunningNode {
    /// Closes every link with a goodbye, stops the listeners, commits the store and returns when all
    /// tasks have ended, leaving the data directory free to reopen.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.tracker.close();
        self.tracker.wait().await;
        self.store.close();
    }
}
