//! Starting and stopping a node: opens its databases, starts its Raft replica, binds its three listeners
//! and wires the edge, the store, the control plane and the cluster API together, and starts the
//! background loops that live with the state they drive (`follow`, `Replicator`, `Control`). Shutdown is one broadcast: every
//! link says goodbye, the gRPC server drains, Raft stops, the store's writer commits what it holds, and
//! `shutdown` returns only when all of that has finished.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use courier_proto::cluster::cluster_server::ClusterServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::TcpListenerStream;

use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::ClusterService;
use crate::config::NodeConfig;
use crate::delivery::{Delivery, DeliveryParts};
use crate::edge::registry::Registry;
use crate::edge::runtime::HandshakeRuntime;
use crate::edge::{self, Edge};
use crate::peer::{PeerError, Peers};
use crate::pki::{ClusterRole, DeviceCa, PkiDir, PkiError};
use crate::raft::channels::ChannelShelf;
use crate::raft::control::{Control, ControlError};
use crate::raft::lease::Lease;
use crate::raft::network::Network;
use crate::raft::state::{Command, Epoch, MemberState};
use crate::raft::store::RaftStoreError;
use crate::replication::Replicator;
use crate::store::{Store, StoreError};
use crate::telemetry::{self, Readiness};
use crate::tls::{self, TlsError};
use crate::token::{Keyring, KeyringError};
use crate::view::LocalView;
use courier_core::listen::{BindError, bind};
use courier_core::shutdown::{CancellationToken, DropGuard, TaskTracker};
use courier_proto::cluster::JoinRequest;

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
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cluster API TLS: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error(transparent)]
    RaftStore(#[from] RaftStoreError),
    #[error("raft configuration: {0}")]
    RaftConfig(#[from] Box<openraft::ConfigError>),
    #[error("starting raft: {0}")]
    Raft(String),
    #[error("starting the device handshakes' runtime: {0}")]
    HandshakeRuntime(std::io::Error),
    #[error(transparent)]
    Peers(#[from] PeerError),
    #[error("bootstrapping the cluster: {0}")]
    Bootstrap(#[from] ControlError),
    #[error(
        "--lease-ms {lease_ms} must be shorter than --failure-timeout-ms {failure_timeout_ms} less \
         --probe-interval-ms {probe_interval_ms}, or a node cut off from the others could still accept \
         notifications when they give its devices to another node"
    )]
    LeaseTooLong { lease_ms: u64, failure_timeout_ms: u64, probe_interval_ms: u64 },
    #[error("--node-id-from-hostname: host name {0:?} does not end in -<number>")]
    NoOrdinal(String),
    #[error(
        "no certificate for node {id} ({cert} and its key): issue one with `courier pki issue node --id {id} --dir {dir}`"
    )]
    NoCertificate { id: u64, cert: String, dir: String },
    #[error(
        "{cert} is not node {id}'s certificate (it names {named}); issue one with `courier pki issue node --id {id}`"
    )]
    WrongCertificate { id: u64, cert: String, named: String },
}

/// Makes sure the PKI directory holds this node's own certificate (`node-<id>.pem` naming role node
/// `id`), so a misconfigured node stops at start with the command to run rather than failing handshakes.
fn check_node_certificate(pki: &PkiDir, id: u64) -> Result<(), NodeError> {
    let (cert, key) = (pki.node_cert(id), pki.node_key(id));
    if !cert.exists() || !key.exists() {
        return Err(NodeError::NoCertificate {
            id,
            cert: cert.display().to_string(),
            dir: pki.dir.display().to_string(),
        });
    }
    let chain = crate::pki::load_certs(&cert)?;
    let role = chain.first().and_then(crate::pki::role_from_cert);
    if role != Some(ClusterRole::Node(id)) {
        let named = role.map_or_else(|| "no role".to_string(), |r| r.to_string());
        return Err(NodeError::WrongCertificate { id, cert: cert.display().to_string(), named });
    }
    Ok(())
}

/// A started node. Dropping it without `shutdown` tells its tasks to stop but waits for none of them.
pub struct RunningNode {
    pub device_addr: SocketAddr,
    pub cluster_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub store: Store,
    pub control: Arc<Control>,
    pub view: Arc<LocalView>,
    /// The last epoch whose ring this node has rebalanced its queues for.
    pub rebalanced: watch::Receiver<Epoch>,
    shutdown: CancellationToken,
    _stop_on_drop: DropGuard,
    tracker: TaskTracker,
    /// Device handshakes run here (`HandshakeRuntime`); dropped last, once `tracker` has seen them end.
    _handshakes: HandshakeRuntime,
}

fn read(path: std::path::PathBuf) -> Result<Vec<u8>, NodeError> {
    std::fs::read(&path).map_err(|source| NodeError::Read { path: path.display().to_string(), source })
}

pub async fn start(mut config: NodeConfig) -> Result<RunningNode, NodeError> {
    tls::install_crypto_provider();
    let hostname = std::env::var("HOSTNAME").unwrap_or_default();
    config.node_id = config.resolve_node_id(&hostname).ok_or(NodeError::NoOrdinal(hostname))?;
    telemetry::prometheus();
    telemetry::describe_node_metrics();
    let pki = PkiDir::new(&config.pki_dir);
    check_node_certificate(&pki, config.node_id)?;
    let member = PkiDir::node_member(config.node_id);
    let device_ca = DeviceCa::load(&pki)?;
    crate::pki::export_certificate_expiry(&[
        ("node", pki.node_cert(config.node_id)),
        ("cluster-ca", pki.cluster_ca_cert()),
        ("device-ca", pki.device_ca_cert()),
    ]);
    let store = Store::open_with_limits(
        &config.data_dir.join("courier.redb"),
        config.queue_cap_per_topic,
        config.webhook_queue_cap,
    )?;
    let (clone_reports, clone_reports_rx) = tokio::sync::mpsc::channel(edge::clones::REPORT_QUEUE);
    let registry = Arc::new(Registry::new(&config.clone_settings(), Some(clone_reports)));
    // Provider API: unregistered topics and the delivery-status log.
    let registrations = crate::store::registrations::Registrations::open(&config.data_dir.join("registrations.redb"))?;
    let status = Arc::new(config.status_log());

    let (device_listener, device_addr) = bind("the device port", config.device_addr).await?;
    let (cluster_listener, cluster_addr) = bind("the cluster API", config.cluster_addr).await?;
    let (metrics_listener, metrics_addr) = bind("the metrics port", config.metrics_addr).await?;
    let advertised_cluster = config.advertised_cluster_addr(cluster_addr);
    let advertised_device = config.advertised_device_addr(device_addr);

    // The control plane: Raft over the cluster API, its state published on a watch channel.
    let channels = ChannelShelf::new(courier_core::channel::ChannelBook::default());
    let (log_store, state_machine, state) =
        crate::raft::store::open_with(&config.data_dir.join("raft.redb"), channels.clone())?;
    let committed_index = log_store.committed_index();
    let peers = Arc::new(Peers::new(&pki, &member, None, Duration::from_secs(2))?);
    let raft = crate::raft::Raft::new(
        config.node_id,
        Arc::new(config.raft_config()?),
        Network { peers: peers.clone() },
        log_store,
        state_machine,
    )
    .await
    .map_err(|e| NodeError::Raft(e.to_string()))?;
    let lease = Arc::new(Lease::new(raft.clone(), config.node_id, config.lease()?));
    let control = Arc::new(Control {
        id: config.node_id,
        raft: raft.clone(),
        state: state.clone(),
        peers: peers.clone(),
        settings: config.control_settings(),
        lease: lease.clone(),
        membership_changes: tokio::sync::Mutex::new(()),
        channels,
    });
    let view = Arc::new(LocalView::new(config.node_id, state.borrow().clone(), Some(lease)));
    let replicator =
        Arc::new(Replicator::new(config.node_id, peers, view.clone(), Duration::from_secs(2), config.degraded_writes));
    let (rebalanced, rebalanced_rx) = watch::channel(Epoch::default());
    let keyring = Keyring::default();
    state.borrow().sync_keyring(&keyring);

    let acceptor = TlsAcceptor::from(Arc::new(tls::device_server_config(&pki, &member)?));
    let grpc_tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(pki.member_cert(&member))?, read(pki.member_key(&member))?))
        .client_ca_root(Certificate::from_pem(read(pki.cluster_ca_cert())?));

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(crate::follow::follow_state(
        state.clone(),
        crate::follow::Followers {
            view: view.clone(),
            keyring: keyring.clone(),
            registry: registry.clone(),
            store: store.clone(),
            replicator: replicator.clone(),
            rebalanced,
        },
        config.redirect_rate,
        shutdown.clone(),
    ));
    let unsaved = Arc::new(config.unsaved_receipts());
    let delivery = Delivery::new(DeliveryParts {
        store: store.clone(),
        unsaved: unsaved.clone(),
        registry: registry.clone(),
        view: view.clone(),
        replicator: replicator.clone(),
        registrations: registrations.clone(),
        status,
        ack_wait: config.ack_wait(),
    });
    let broadcasts = crate::broadcast::Broadcasts::open(
        &config.data_dir.join("broadcasts.redb"),
        registry.clone(),
        control.channels.clone(),
    )?;
    let subscriptions = crate::broadcast::StoredSubscriptions::new(store.clone(), replicator.clone());
    let edge = Arc::new(Edge {
        settings: config.link_settings(),
        keyring,
        store: store.clone(),
        registry: registry.clone(),
        device_ca,
        view: view.clone(),
        delivery: delivery.clone(),
        registrations,
        broadcasts: broadcasts.clone(),
        subscriptions: subscriptions.clone(),
    });
    tracker.spawn(edge::clones::report(clone_reports_rx, control.clone(), shutdown.clone()));
    let handshakes =
        HandshakeRuntime::new(config.handshake_threads, config.handshake_nice).map_err(NodeError::HandshakeRuntime)?;
    // The accept loop and the handshakes run on the handshake runtime, the sessions here (`edge::serve`).
    let device_listener = handshakes.adopt(device_listener).map_err(NodeError::HandshakeRuntime)?;
    let sessions = tokio::runtime::Handle::current();
    let serving =
        edge::serve(device_listener, acceptor, edge, config.max_links, shutdown.clone(), tracker.clone(), sessions);
    tracker.spawn_on(serving, handshakes.handle());

    let receipts = crate::receipts::run(
        store.clone(),
        view.clone(),
        replicator.clone(),
        unsaved,
        config.receipt_settings(),
        shutdown.clone(),
    );
    tracker.spawn(async move {
        if let Err(error) = receipts.await {
            tracing::error!(%error, "webhook receipts are not sent");
        }
    });
    tracker.spawn(crate::broadcast::catch_up(control.clone(), broadcasts.clone(), shutdown.clone()));
    tracker.spawn(crate::broadcast::forget_deleted_channels(broadcasts.clone(), subscriptions, shutdown.clone()));
    let service = ClusterService {
        delivery,
        broadcasts,
        control: control.clone(),
        shutdown: shutdown.clone(),
        epoch_wait: config.epoch_wait(),
        webhooks_allow_private: config.webhooks_allow_private,
    };
    // Keepalive pings close a connection whose peer vanished (cut off, or gone without a FIN), which a
    // graceful shutdown would otherwise wait on for as long as TCP takes to give up.
    let grpc = Server::builder()
        .http2_keepalive_interval(Some(GRPC_KEEPALIVE))
        .http2_keepalive_timeout(Some(GRPC_KEEPALIVE))
        .tls_config(grpc_tls)?
        .add_service(
            ClusterServer::new(service).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20),
        )
        .serve_with_incoming_shutdown(cluster_incoming(cluster_listener), shutdown.clone().cancelled_owned());
    let stop = shutdown.clone();
    tracker.spawn(async move {
        // In-flight calls get `GRPC_DRAIN` to finish after shutdown begins; connections still open then
        // (to a peer that stopped answering) are dropped rather than held on to.
        let drained = async move {
            stop.cancelled().await;
            tokio::time::sleep(GRPC_DRAIN).await;
        };
        tokio::select! {
            served = grpc => if let Err(error) = served {
                tracing::error!(%error, "cluster API server failed");
            },
            _ = drained => tracing::warn!("cluster API connections still open {GRPC_DRAIN:?} into shutdown; dropped"),
        }
    });

    let initialized = raft.is_initialized().await.map_err(|e| NodeError::Raft(e.to_string()))?;
    let seeds = config.join_seeds(&advertised_cluster);
    if !initialized && seeds.is_empty() {
        control.initialize(&advertised_cluster, &advertised_device, &pki).await?;
    } else if !initialized {
        let request = JoinRequest {
            node_id: config.node_id,
            cluster_addr: advertised_cluster.clone(),
            device_addr: advertised_device.clone(),
        };
        let (control, stop) = (control.clone(), shutdown.clone());
        tracker.spawn(async move { control.join_through(&seeds, request, stop).await });
    }
    tracker.spawn(control.clone().run_leader_duties(shutdown.clone()));
    tracker.spawn(replicator.clone().sweep_orphans_every_few_seconds(store.clone(), shutdown.clone()));
    if initialized {
        tracker.spawn(control.clone().reactivate(shutdown.clone()));
    }
    tracker.spawn(crate::raft::report::export_metrics(control.clone(), committed_index, shutdown.clone()));
    tracker.spawn(telemetry::measure_runtime_lag("main", shutdown.clone()));
    tracker.spawn_on(telemetry::measure_runtime_lag("handshakes", shutdown.clone()), handshakes.handle());

    // Set every 200 ms (`Control::track_readiness`): a flag older than a second is from before a stall.
    let readiness = Readiness::refreshed_within(Duration::from_secs(1));
    tracker.spawn(control.clone().track_readiness(readiness.clone(), shutdown.clone()));
    let metrics_stop = shutdown.clone().cancelled_owned();
    tracker.spawn(async move {
        let stop = metrics_stop;
        if let Err(error) = telemetry::serve(metrics_listener, vec![readiness], stop).await {
            tracing::error!(%error, "metrics server failed");
        }
    });

    tracing::info!(node_id = config.node_id, %device_addr, %cluster_addr, %metrics_addr, "node started");
    Ok(RunningNode {
        device_addr,
        cluster_addr,
        metrics_addr,
        registry,
        store,
        control,
        view,
        rebalanced: rebalanced_rx,
        _stop_on_drop: shutdown.clone().drop_guard(),
        shutdown,
        tracker,
        _handshakes: handshakes,
    })
}

/// The cluster API's connections, with Nagle's algorithm off: replies are small and latency-bound, and
/// with it on a reply can sit behind the peer's delayed ACK (40 ms on Linux).
fn cluster_incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    })
}

/// How often the cluster API pings an idle connection, and how long it waits for the answer.
const GRPC_KEEPALIVE: Duration = Duration::from_secs(5);

/// How long the cluster API's in-flight calls have to finish once shutdown begins.
const GRPC_DRAIN: Duration = Duration::from_secs(5);

impl RunningNode {
    /// Closes every link with a goodbye, stops the listeners, commits the store and returns when all
    /// tasks have ended, leaving the data directory free to reopen.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        if let Err(error) = self.control.raft.shutdown().await {
            tracing::warn!(%error, "raft did not stop cleanly");
        }
        self.store.close();
    }

    /// Leaves the ring gracefully: marks itself draining through Raft, waits until its queues are with
    /// their new holders and its links are redirected (or `deadline` passes), then shuts down.
    pub async fn drain(self, deadline: Duration) {
        let give_up = tokio::time::Instant::now() + deadline;
        let now_ms = crate::ids::unix_millis();
        let command = Command::SetMemberState { id: self.control.id, state: MemberState::Draining, now_ms };
        match tokio::time::timeout_at(give_up, self.control.apply(command)).await {
            Ok(Ok(epoch)) => {
                tracing::info!(epoch = epoch.0, "draining: handing over queues and links");
                let mut rebalanced = self.rebalanced.clone();
                let _ = tokio::time::timeout_at(give_up, rebalanced.wait_for(|done| *done >= epoch)).await;
                while !self.registry.is_empty() && tokio::time::Instant::now() < give_up {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "could not mark this node draining; stopping anyway"),
            Err(_) => tracing::warn!("drain deadline passed before the cluster accepted it; stopping anyway"),
        }
        self.shutdown().await;
    }

    /// Whether this node is an active member with a known leader (what `/readyz` says).
    pub fn is_ready(&self) -> bool {
        self.control.is_serving()
    }
}
