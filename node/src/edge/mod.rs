//! The edge: devices' mutual-TLS links to this node.
//!
//! `serve` accepts TCP connections on the device port, completes the TLS handshake (a client certificate
//! from the device CA is verified when offered) and hands each link to `session`, which speaks the frame
//! protocol. `codec` is the only code that sees the link's bytes; `registry` maps device ids to live links;
//! `clones` recognises one device certificate used by several devices.

pub mod clones;
pub mod codec;
pub mod registry;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

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
    /// Time allowed for the TLS handshake plus the first frame.
    pub handshake_timeout: Duration,
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
    /// Tells the replicas when the device acks.
    pub replicator: Arc<crate::replication::Replicator>,
    /// Provider API: topics devices unregistered (410 Unregistered) and delivery status (acks).
    pub registrations: crate::store::registrations::Registrations,
    pub status: Arc<crate::status_log::StatusLog>,
}

/// Completes when `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// TLS handshakes a node works on at once. In a reconnect storm the rest wait their turn without costing
/// CPU, so each handshake finishes quickly instead of all of them slowly (and timing out, and retrying).
const MAX_CONCURRENT_HANDSHAKES: usize = 128;

/// The TLS handshake of one device connection (after waiting its turn), within the handshake timeout.
async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    edge: &Edge,
    handshakes: &Semaphore,
) -> Option<Box<session::Link>> {
    let _turn = handshakes.acquire().await.ok()?;
    match tokio::time::timeout(edge.settings.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(session::boxed_link(tls, edge.settings.max_frame)),
        Ok(Err(error)) => {
            metrics::counter!("courier_node_handshake_failures_total").increment(1);
            tracing::debug!(%peer, %error, "device TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::counter!("courier_node_handshake_failures_total").increment(1);
            tracing::debug!(%peer, "device TLS handshake timed out");
            None
        }
    }
}

/// Accepts device links until `shutdown` turns true. Each link runs on `tracker`, so the caller can wait
/// for every link to say goodbye.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    edge: Arc<Edge>,
    max_links: usize,
    mut shutdown: watch::Receiver<bool>,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(max_links));
    let handshakes = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
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
            _ = stopped(&mut shutdown) => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("courier_node_links_refused_total", "reason" => "capacity").increment(1);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, edge, shutdown, handshakes) =
            (acceptor.clone(), edge.clone(), shutdown.clone(), handshakes.clone());
        tracker.spawn(async move {
            // The handshake's state is boxed and freed when it completes, so that the task, which is sized
            // for its largest state and lives as long as the link, carries only the session.
            if let Some(link) = Box::pin(handshake(&acceptor, tcp, peer, &edge, &handshakes)).await {
                session::run(link, edge, shutdown).await;
            }
            drop(permit);
        });
    }
}
