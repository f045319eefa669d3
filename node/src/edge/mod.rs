//! The edge: devices' mutual-TLS links to this node.
//!
//! `serve` accepts TCP connections on the device port, completes the TLS handshake (a client certificate
//! from the device CA is verified when offered) and hands each link to `session`, which speaks the frame
//! protocol. `courier_device::codec` (the frame codec the device SDK shares) is the only code that sees
//! the link's bytes; `registry` maps device ids to live links;
//! `limits` bounds what connections (before their first frame) and links may cost.
//! `clones` recognises one device certificate used by several devices. `runtime` runs the accept loop
//! and the handshakes on threads of their own; `socket` lets a link move from there to its session.

pub mod clones;
pub mod limits;
pub mod registry;
pub mod runtime;
pub mod session;
pub mod socket;

use std::sync::Arc;
use std::time::Duration;

use courier_core::shutdown::{CancellationToken, TaskTracker};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use crate::pki::DeviceCa;
use crate::store::Store;
use crate::token::Keyring;
use registry::Registry;

/// Who may activate a device.
#[derive(Clone)]
pub enum Enrolment {
    /// Any request is accepted: for `dev` clusters only.
    AcceptAny,
    /// The request must carry this secret.
    Secret(String),
    /// Activation is refused.
    Closed,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Enrolment::AcceptAny => "AcceptAny",
            Enrolment::Secret(_) => "Secret(<redacted>)",
            Enrolment::Closed => "Closed",
        })
    }
}

impl Enrolment {
    pub fn admits(&self, offered: &str) -> bool {
        match self {
            Enrolment::AcceptAny => true,
            Enrolment::Secret(secret) => {
                // Compare digests, folding every byte, so timing reveals nothing about the secret.
                let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
                let (a, b) = (digest(secret), digest(offered));
                a.as_ref().iter().zip(b.as_ref()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
            }
            Enrolment::Closed => false,
        }
    }
}

/// The link protocol's limits.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// Hard limit on one frame's body.
    pub max_frame: usize,
    /// Keepalive intervals a device may negotiate; a request outside is clamped.
    pub keepalive_min: Duration,
    pub keepalive_max: Duration,
    /// Used when the device asks for 0.
    pub keepalive_default: Duration,
    /// Time a connection has from accept to its first frame: any wait for a handshake slot, the TLS
    /// handshake and the first frame.
    pub handshake_timeout: Duration,
    /// Caps on connections not yet past their first frame.
    pub admission: limits::AdmissionSettings,
    /// Rate and size limits of a live link, and its write timeout.
    pub link_limits: limits::LinkLimits,
    pub enrolment: Enrolment,
}

impl LinkSettings {
    pub fn negotiate_keepalive(&self, requested_secs: u32) -> Duration {
        if requested_secs == 0 {
            return self.keepalive_default.clamp(self.keepalive_min, self.keepalive_max);
        }
        Duration::from_secs(u64::from(requested_secs)).clamp(self.keepalive_min, self.keepalive_max)
    }
}

/// Everything a link's task needs, shared by all links.
pub struct Edge {
    pub settings: LinkSettings,
    pub keyring: Keyring,
    pub store: Store,
    pub registry: Arc<Registry>,
    pub device_ca: DeviceCa,
    /// Placement and revocations of the current epoch.
    pub view: Arc<crate::view::LocalView>,
    /// A notification's life: acks and the backlog a device gets when it links.
    pub delivery: crate::delivery::Delivery,
    /// Provider API: topics devices unregistered (410 Unregistered).
    pub registrations: crate::store::registrations::Registrations,
    /// Broadcast channels: linked subscribers and kept broadcasts.
    pub broadcasts: crate::broadcast::Broadcasts,
    /// Devices' stored channel subscriptions.
    pub subscriptions: crate::broadcast::StoredSubscriptions,
}

/// Why a connection that passed admission still did not become a link.
enum Handshake {
    Done(Box<session::Link>),
    Refused(limits::Refusal),
    Failed,
}

/// The TLS handshake of one device connection: reads the whole ClientHello (costing no slot, so silent
/// connections take none), then waits for a handshake slot and completes the handshake. The caller
/// bounds it by the connection's deadline.
async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    edge: &Edge,
    pending: &mut limits::Pending,
) -> Handshake {
    let start = match LazyConfigAcceptor::new(rustls::server::Acceptor::default(), socket::Socket::new(tcp)).await {
        Ok(start) => start,
        Err(error) => {
            metrics::counter!("courier_node_handshake_failures_total").increment(1);
            tracing::debug!(%peer, %error, "device sent no usable ClientHello");
            return Handshake::Failed;
        }
    };
    if let Err(refusal) = pending.start_handshake() {
        return Handshake::Refused(refusal);
    }
    let Some(_slot) = pending.slot().await else {
        return Handshake::Failed;
    };
    let outcome = match start.into_stream(acceptor.config().clone()).await {
        Ok(tls) => Handshake::Done(session::boxed_link(tls, edge.settings.max_frame)),
        Err(error) => {
            metrics::counter!("courier_node_handshake_failures_total").increment(1);
            tracing::debug!(%peer, %error, "device TLS handshake failed");
            Handshake::Failed
        }
    };
    pending.end_handshake();
    outcome
}

/// One connection from accept to goodbye: the handshake and the first frame within one deadline from
/// accept, a link permit once the handshake is done, then the session. The handshake runs where this task
/// does (the handshake runtime); the session runs on `sessions`, with the socket moved there, so that a
/// session's notifications and acks never wait on the other runtime.
async fn connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    edge: Arc<Edge>,
    mut pending: limits::Pending,
    shutdown: CancellationToken,
    sessions: Sessions,
) {
    let deadline = tokio::time::Instant::now() + edge.settings.handshake_timeout;
    // The handshake's state is boxed and freed when it completes, so that the task, which is sized for its
    // largest state and lives as long as the link, carries only the session.
    let shaken = tokio::time::timeout_at(deadline, Box::pin(handshake(&acceptor, tcp, peer, &edge, &mut pending)));
    let shaken = tokio::select! {
        shaken = shaken => shaken,
        _ = shutdown.cancelled() => return,
    };
    let mut link = match shaken {
        Ok(Handshake::Done(link)) => link,
        Ok(Handshake::Refused(refusal)) => {
            refusal.count();
            tracing::debug!(%peer, reason = refusal.as_str(), "device connection refused");
            return;
        }
        Ok(Handshake::Failed) => return,
        Err(_) => {
            metrics::counter!("courier_node_handshake_failures_total").increment(1);
            tracing::debug!(%peer, "device TLS handshake did not finish before the deadline");
            return;
        }
    };
    let Ok(permit) = sessions.permits.try_acquire_owned() else {
        metrics::counter!("courier_node_links_refused_total", "reason" => "capacity").increment(1);
        session::refuse_at_capacity(&mut link).await;
        return;
    };
    let Sessions { runtime, tracker, .. } = sessions;
    if let Err(error) = link.get_mut().get_mut().0.move_to(&runtime) {
        tracing::debug!(%peer, %error, "a device link's socket could not move to the session runtime");
        return;
    }
    let opening = session::Opening { deadline, pending, shutdown: shutdown.clone() };
    tracker.spawn_on(
        async move {
            let _permit = permit;
            session::run(link, edge, shutdown, opening).await;
        },
        &runtime,
    );
}

/// Where a connection goes once its handshake is done: it takes one of the node's link permits
/// (`--max-links`), and its session runs on `runtime` (the node's main one), tracked by `tracker`.
#[derive(Clone)]
struct Sessions {
    permits: Arc<Semaphore>,
    runtime: tokio::runtime::Handle,
    tracker: TaskTracker,
}

/// Accepts device links until `shutdown` turns true. Each connection's handshake runs on `tracker` here, its
/// session on `sessions` (`connection`), so the caller can wait for every link to say goodbye.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    edge: Arc<Edge>,
    max_links: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    sessions: tokio::runtime::Handle,
) {
    let sessions =
        Sessions { permits: Arc::new(Semaphore::new(max_links)), runtime: sessions, tracker: tracker.clone() };
    let admission = limits::Admission::new(edge.settings.admission.clone());
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and similar: back off rather than spin.
                    tracing::warn!(%error, "accepting a device connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let pending = match admission.admit(peer.ip()) {
            Ok(pending) => pending,
            Err(refusal) => {
                // Refused before any TLS work: the cheapest answer is to close the socket.
                refusal.count();
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tracker.spawn(connection(
            acceptor.clone(),
            tcp,
            peer,
            edge.clone(),
            pending,
            shutdown.clone(),
            sessions.clone(),
        ));
    }
}
