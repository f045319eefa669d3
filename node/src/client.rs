//! The device side of a link: activation, connecting, registering topics, receiving and acking.
//!
//! Used by `courier device`, the tests and the load generator, so it is the reference client of the
//! frame protocol. It answers pings, keeps the link alive, and drops notifications whose apns-id it has
//! recently surfaced: delivery on the wire is at-least-once, to the app it is once.
//!
//! Where a link goes first: to the node that owned the device when it was activated (`Activated.owner`,
//! kept with the credentials), which saves the redirect and second handshake a link to any other node
//! would cost; to the configured endpoint when there is no such owner or it does not answer (or turns
//! every device away, shutting down or full). Redirects are followed either way, since the ring may have
//! moved since activation.
//!
//! Which name a node's certificate must carry: on a connection to the configured endpoint, the name the
//! device was configured with (`DeviceEndpoint::server_name`, which every node's certificate may carry,
//! e.g. a load balancer's name); on a connection to the owner or after a redirect, the name the activation
//! or the redirect gives (`node-<K>.courier.internal`), which only node K's certificate carries, so a node
//! cannot pass itself off as the one the device was sent to.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use courier_proto::device::{self as wire, DeviceFrame, GoodbyeReason, ServerFrame, device_frame, server_frame};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

use crate::edge::codec::{DEFAULT_MAX_FRAME, FrameCodec, FrameError};
use crate::ids::DeviceId;
use crate::pki::{self, PkiError};
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("link: {0}")]
    Frame(#[from] FrameError),
    #[error("the node said goodbye: {reason:?} ({detail})")]
    Goodbye { reason: GoodbyeReason, detail: String },
    #[error("the node closed the link")]
    Closed,
    #[error("redirected to {0}")]
    Redirected(RedirectTarget),
    #[error("node address {0:?} does not resolve")]
    Unresolvable(String),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("device credentials in {path}: {detail}")]
    Credentials { path: PathBuf, detail: String },
}

impl ClientError {
    /// The node was not reached, went away before answering `Hello`, or turns every device away for now
    /// (shutting down, at its link limit), as opposed to refusing this device: another node may still
    /// take the link.
    pub fn another_node_may_answer(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::Timeout(_)
                | ClientError::Closed
                | ClientError::Unresolvable(_)
                | ClientError::Goodbye { reason: GoodbyeReason::Shutdown | GoodbyeReason::Unavailable, .. }
        )
    }
}

/// Where a redirect (or an activation's owner) sends a device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RedirectTarget {
    /// The node's device address (host:port).
    pub device_addr: String,
    /// The name that node's certificate must carry; empty (from nodes older than the field) keeps the
    /// configured name.
    pub server_name: String,
}

impl From<wire::Redirect> for RedirectTarget {
    fn from(redirect: wire::Redirect) -> Self {
        RedirectTarget { device_addr: redirect.device_addr, server_name: redirect.server_name }
    }
}

impl std::fmt::Display for RedirectTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.server_name.is_empty() {
            f.write_str(&self.device_addr)
        } else {
            write!(f, "{} ({})", self.device_addr, self.server_name)
        }
    }
}

/// Where and how to reach a node's device port.
#[derive(Debug, Clone)]
pub struct DeviceEndpoint {
    pub addr: SocketAddr,
    /// Name checked against the certificate of the first node the device connects to; nodes it is
    /// redirected to are checked by the name the redirect gives.
    pub server_name: String,
    /// The cluster CA, which signs node certificates.
    pub ca_path: PathBuf,
}

/// A device's identity: the certificate the device CA issued and its private key.
#[derive(Clone)]
pub struct DeviceCredentials {
    pub device_id: DeviceId,
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The node that owned the device id when it was activated, where the first link goes. `None` when
    /// the activating node knew no owner (or predates `Activated.owner`), or for credentials saved before
    /// it was kept: the link then starts at the configured endpoint.
    pub owner: Option<RedirectTarget>,
}

impl std::fmt::Debug for DeviceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCredentials").field("device_id", &self.device_id).finish_non_exhaustive()
    }
}

impl DeviceCredentials {
    /// Writes `device.pem`, `device.key` and, when there is an owner, `owner.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), ClientError> {
        let err = |e: std::io::Error| ClientError::Credentials { path: dir.into(), detail: e.to_string() };
        std::fs::create_dir_all(dir).map_err(err)?;
        let cert = pem::encode(&pem::Pem::new("CERTIFICATE", self.cert_der.clone()));
        std::fs::write(dir.join("device.pem"), cert).map_err(err)?;
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", self.key_der.clone()));
        crate::secret_file::write_secret(&dir.join("device.key"), key.as_bytes()).map_err(err)?;
        let owner_path = dir.join(OWNER_FILE);
        match &self.owner {
            Some(owner) => {
                let json = serde_json::to_vec_pretty(owner).map_err(|e| err(e.into()))?;
                std::fs::write(owner_path, json).map_err(err)
            }
            // An owner file left by earlier credentials in this directory belongs to another device.
            None => match std::fs::remove_file(owner_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(err(e)),
                _ => Ok(()),
            },
        }
    }

    /// Reads credentials saved by `save`; `None` if `dir` has none. Directories saved before the owner was
    /// kept (no `owner.json`) load with no owner.
    pub fn load(dir: &Path) -> Result<Option<Self>, ClientError> {
        let (cert_path, key_path) = (dir.join("device.pem"), dir.join("device.key"));
        if !cert_path.exists() || !key_path.exists() {
            return Ok(None);
        }
        let cert = pki::load_certs(&cert_path)?.remove(0);
        let key = match pki::load_key(&key_path)? {
            PrivateKeyDer::Pkcs8(key) => key.secret_pkcs8_der().to_vec(),
            _ => {
                return Err(ClientError::Credentials { path: key_path, detail: "expected a PKCS#8 key".into() });
            }
        };
        let device_id = pki::device_id_from_cert(&cert).ok_or_else(|| ClientError::Credentials {
            path: cert_path,
            detail: "certificate names no device id".into(),
        })?;
        let owner_path = dir.join(OWNER_FILE);
        let owner = match std::fs::read(&owner_path) {
            Ok(json) => Some(serde_json::from_slice(&json).map_err(|e| ClientError::Credentials {
                path: owner_path,
                detail: format!("not an owner address: {e}"),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ClientError::Credentials { path: owner_path, detail: e.to_string() }),
        };
        Ok(Some(DeviceCredentials { device_id, cert_der: cert.to_vec(), key_der: key, owner }))
    }
}

/// The file in a credentials directory naming the owner learned at activation (JSON: `device_addr`,
/// `server_name`).
const OWNER_FILE: &str = "owner.json";

/// Redirects followed before giving up (more means the cluster's views disagree).
pub const MAX_REDIRECTS: usize = 4;

type ClientLink = Framed<TlsStream<TcpStream>, FrameCodec<ServerFrame>>;

/// A TLS client for one identity (or none, to activate), built once and reused: the CA is parsed once,
/// and the TLS sessions the nodes hand out are remembered, so a reconnect resumes instead of repeating the
/// full handshake. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    /// Local address links are opened from; `None` lets the OS choose.
    bind: Option<IpAddr>,
}

/// How long connecting and the TLS handshake may take together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sessions a connector remembers per server name; a device talks to few nodes.
const SESSIONS_PER_CONNECTOR: usize = 4;

impl Connector {
    /// A connector trusting the CA in `endpoint.ca_path`, presenting `identity` when given.
    pub fn new(endpoint: &DeviceEndpoint, identity: Option<&DeviceCredentials>) -> Result<Self, ClientError> {
        Self::with_roots(Arc::new(tls::roots_from(&endpoint.ca_path)?), &endpoint.server_name, identity)
    }

    /// As `new`, with the trusted roots already loaded (many connectors can share one root store).
    pub fn with_roots(
        roots: Arc<rustls::RootCertStore>,
        server_name: &str,
        identity: Option<&DeviceCredentials>,
    ) -> Result<Self, ClientError> {
        let identity = identity.map(|c| {
            (
                vec![CertificateDer::from(c.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_der.clone())),
            )
        });
        let mut config = tls::client_config_with_roots(roots, identity, &[])?;
        config.resumption = rustls::client::Resumption::in_memory_sessions(SESSIONS_PER_CONNECTOR);
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| ClientError::Unexpected(format!("server name {server_name:?}: {e}")))?;
        Ok(Connector { config: Arc::new(config), server_name, bind: None })
    }

    /// The same connector (identity, roots, remembered sessions) checking nodes by `server_name`.
    pub fn named(&self, server_name: &str) -> Result<Self, ClientError> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| ClientError::Unexpected(format!("server name {server_name:?}: {e}")))?;
        Ok(Connector { server_name, ..self.clone() })
    }

    /// The connector for the node `to` names: checked by its own name, or by this one's when the redirect
    /// gives none.
    pub fn for_redirect(&self, to: &RedirectTarget) -> Result<Self, ClientError> {
        if to.server_name.is_empty() { Ok(self.clone()) } else { self.named(&to.server_name) }
    }

    /// The name this connector checks nodes' certificates against.
    pub fn server_name(&self) -> String {
        self.server_name.to_str().into_owned()
    }

    /// Opens links from `ip` (for instance one of several 127.0.0.x, to spread many links over more
    /// source ports).
    pub fn bind_to(mut self, ip: IpAddr) -> Self {
        self.bind = Some(ip);
        self
    }

    async fn tcp(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let Some(ip) = self.bind else {
            return TcpStream::connect(addr).await;
        };
        let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        bind_address_no_port(&socket);
        socket.bind(SocketAddr::new(ip, 0))?;
        socket.connect(addr).await
    }

    /// Opens a TLS link to `addr`; also says whether the handshake resumed an earlier session.
    async fn open(&self, addr: SocketAddr) -> Result<(ClientLink, bool), ClientError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.open_unbounded(addr))
            .await
            .map_err(|_| ClientError::Timeout(HANDSHAKE_TIMEOUT))?
    }

    async fn open_unbounded(&self, addr: SocketAddr) -> Result<(ClientLink, bool), ClientError> {
        let tcp = self.tcp(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        Ok((crate::edge::codec::lean(tls, FrameCodec::new(DEFAULT_MAX_FRAME)), resumed))
    }
}

/// Lets a socket bound to an address (port 0) pick its port only at connect, per destination, so one
/// source address is not limited to one ephemeral port range across all destinations. Linux only.
#[cfg(target_os = "linux")]
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_socket: &TcpSocket) {}

fn device_frame(kind: device_frame::Kind) -> DeviceFrame {
    DeviceFrame { kind: Some(kind) }
}

async fn next_frame(link: &mut ClientLink, wait: Duration) -> Result<server_frame::Kind, ClientError> {
    match tokio::time::timeout(wait, link.next()).await {
        Err(_) => Err(ClientError::Timeout(wait)),
        Ok(None) => Err(ClientError::Closed),
        Ok(Some(frame)) => match frame?.kind {
            Some(server_frame::Kind::Goodbye(bye)) => Err(ClientError::Goodbye {
                reason: GoodbyeReason::try_from(bye.reason).unwrap_or(GoodbyeReason::Unspecified),
                detail: bye.detail,
            }),
            Some(kind) => Ok(kind),
            None => Err(ClientError::Unexpected("empty frame".into())),
        },
    }
}

/// Asks the node for a device certificate: a fresh key, a CSR, and the enrolment secret.
pub async fn activate(endpoint: &DeviceEndpoint, enrolment_secret: &str) -> Result<DeviceCredentials, ClientError> {
    activate_via(&Connector::new(endpoint, None)?, endpoint.addr, enrolment_secret).await
}

/// As `activate`, through a connector without identity (reused across many activations).
pub async fn activate_via(
    connector: &Connector,
    addr: SocketAddr,
    enrolment_secret: &str,
) -> Result<DeviceCredentials, ClientError> {
    let (key, csr_der) = pki::new_device_key_and_csr()?;
    let (mut link, _) = connector.open(addr).await?;
    let request = wire::Activate { csr_der, enrolment_secret: enrolment_secret.to_string() };
    link.send(device_frame(device_frame::Kind::Activate(request))).await?;
    match next_frame(&mut link, Duration::from_secs(10)).await? {
        server_frame::Kind::Activated(activated) => {
            let device_id = activated
                .device_id
                .parse()
                .map_err(|_| ClientError::Unexpected(format!("device id {:?}", activated.device_id)))?;
            Ok(DeviceCredentials {
                device_id,
                cert_der: activated.certificate_der,
                key_der: key.serialize_der(),
                owner: activated.owner.map(RedirectTarget::from).filter(|owner| !owner.device_addr.is_empty()),
            })
        }
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

/// The first address `host:port` resolves to (a redirect names the node's advertised device address).
pub async fn resolve(device_addr: &str) -> Result<SocketAddr, ClientError> {
    tokio::net::lookup_host(device_addr)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| ClientError::Unresolvable(device_addr.to_string()))
}

/// Something the node sent that the app may care about.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    Notification(wire::Notification),
    TokenUpdated { topic: String, token: String },
    Redirect(RedirectTarget),
}

/// Remembers the last `capacity` apns-ids surfaced, to drop redeliveries. An app keeps one for its whole
/// life and moves it from link to link (`DeviceLink::seen`), so a redelivery after a reconnect is dropped
/// too.
pub struct SeenIds {
    order: VecDeque<String>,
    set: HashSet<String>,
    capacity: usize,
}

impl Default for SeenIds {
    fn default() -> Self {
        SeenIds::new(DEFAULT_SEEN)
    }
}

/// How many apns-ids a device remembers by default.
pub const DEFAULT_SEEN: usize = 4096;

impl SeenIds {
    pub fn new(capacity: usize) -> Self {
        SeenIds { order: VecDeque::new(), set: HashSet::new(), capacity: capacity.max(1) }
    }

    /// `true` if `id` is new (and now remembered).
    pub fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        self.order.push_back(id.to_string());
        self.set.insert(id.to_string());
        true
    }
}

/// A live, authenticated link.
pub struct DeviceLink {
    link: ClientLink,
    /// The node this link is to (after redirects).
    pub node_addr: SocketAddr,
    pub device_id: DeviceId,
    pub keepalive: Duration,
    /// Whether the TLS handshake resumed an earlier session rather than doing a full one.
    pub resumed: bool,
    /// Frames that arrived while waiting for a specific answer.
    buffered: VecDeque<server_frame::Kind>,
    /// apns-ids already surfaced to the app; move it between links to keep dropping redeliveries.
    pub seen: SeenIds,
    /// Notifications handed to the app whose ack is not yet sent. Acks go out at the start of the next
    /// call, so that a caller that cancels a call (a timeout around it) never loses a notification: it is
    /// either not yet taken off the link, or returned and then acked.
    unacked: VecDeque<String>,
    last_sent: Instant,
}

impl DeviceLink {
    /// Opens a mutual-TLS link and says hello, asking for `keepalive_secs` (0 = the node's default): to
    /// the owner the credentials name when it takes the link, else to the endpoint, following redirects to the
    /// node that owns this device.
    pub async fn connect(
        endpoint: &DeviceEndpoint,
        credentials: &DeviceCredentials,
        keepalive_secs: u32,
    ) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, credentials, keepalive_secs, &[]).await
    }

    /// As `connect`, telling the node which (topic, token) pairs the device holds, so that tokens minted
    /// under a rotated-out key come back replaced (`LinkEvent::TokenUpdated`).
    pub async fn connect_with(
        endpoint: &DeviceEndpoint,
        credentials: &DeviceCredentials,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let connector = Connector::new(endpoint, Some(credentials))?;
        let device_id = credentials.device_id;
        if let Some(owner) = &credentials.owner {
            match Self::connect_to_owner(&connector, owner, device_id, keepalive_secs, held_tokens).await {
                Err(error) if error.another_node_may_answer() => {
                    tracing::debug!(%owner, %error, "the owner from activation did not take the link; trying the endpoint");
                }
                answered => return answered,
            }
        }
        Self::connect_via(&connector, endpoint.addr, device_id, keepalive_secs, held_tokens).await
    }

    /// Connects to `owner` (checked by the name it gives) through `connector`, following redirects from
    /// there.
    pub async fn connect_to_owner(
        connector: &Connector,
        owner: &RedirectTarget,
        device_id: DeviceId,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let addr = resolve(&owner.device_addr).await?;
        let first = connector.for_redirect(owner)?;
        Self::follow_redirects(connector, first, addr, device_id, keepalive_secs, held_tokens).await
    }

    /// Connects through a reusable `connector` (built with this device's credentials), following
    /// redirects (each target checked by the name its redirect gives); the connector's remembered sessions
    /// make reconnects resume.
    pub async fn connect_via(
        connector: &Connector,
        addr: SocketAddr,
        device_id: DeviceId,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        Self::follow_redirects(connector, connector.clone(), addr, device_id, keepalive_secs, held_tokens).await
    }

    /// Connects through `first` to `addr`, then through `connector` named as each redirect says.
    async fn follow_redirects(
        connector: &Connector,
        first: Connector,
        mut addr: SocketAddr,
        device_id: DeviceId,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let mut current = first;
        for _ in 0..MAX_REDIRECTS {
            match Self::connect_once(&current, addr, device_id, keepalive_secs, held_tokens).await {
                Err(ClientError::Redirected(to)) => {
                    addr = resolve(&to.device_addr).await?;
                    current = connector.for_redirect(&to)?;
                }
                other => return other,
            }
        }
        Err(ClientError::Unexpected(format!("more than {MAX_REDIRECTS} redirects")))
    }

    /// One attempt on `addr`; a redirect comes back as `ClientError::Redirected`.
    pub async fn connect_once(
        connector: &Connector,
        addr: SocketAddr,
        device_id: DeviceId,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let (mut link, resumed) = connector.open(addr).await?;
        let hello = wire::Hello {
            keepalive_secs,
            client: concat!("courier/", env!("CARGO_PKG_VERSION")).into(),
            held_tokens: held_tokens
                .iter()
                .map(|(topic, token)| wire::HeldToken { topic: topic.clone(), token: token.clone() })
                .collect(),
        };
        link.send(device_frame(device_frame::Kind::Hello(hello))).await?;
        match next_frame(&mut link, Duration::from_secs(10)).await? {
            server_frame::Kind::Redirect(redirect) => Err(ClientError::Redirected(redirect.into())),
            server_frame::Kind::Welcome(welcome) => Ok(DeviceLink {
                node_addr: addr,
                link,
                device_id,
                keepalive: Duration::from_secs(u64::from(welcome.keepalive_secs.max(1))),
                resumed,
                buffered: VecDeque::new(),
                seen: SeenIds::default(),
                unacked: VecDeque::new(),
                last_sent: Instant::now(),
            }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn send(&mut self, kind: device_frame::Kind) -> Result<(), ClientError> {
        self.link.send(device_frame(kind)).await?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Reads frames until `want` picks one out, buffering the rest for `next_event`.
    async fn wait_for<T>(&mut self, mut want: impl FnMut(&server_frame::Kind) -> Option<T>) -> Result<T, ClientError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let kind = next_frame(&mut self.link, deadline.saturating_duration_since(Instant::now())).await?;
            if let Some(found) = want(&kind) {
                return Ok(found);
            }
            self.buffered.push_back(kind);
        }
    }

    /// Registers a topic and returns the device token for it.
    pub async fn register(&mut self, topic: &str) -> Result<String, ClientError> {
        self.send(device_frame::Kind::RegisterTopic(wire::RegisterTopic { topic: topic.into() })).await?;
        self.wait_for(|kind| match kind {
            server_frame::Kind::TokenIssued(issued) if issued.topic == topic => Some(issued.token.clone()),
            _ => None,
        })
        .await
    }

    pub async fn unregister(&mut self, topic: &str) -> Result<(), ClientError> {
        self.send(device_frame::Kind::UnregisterTopic(wire::UnregisterTopic { topic: topic.into() })).await?;
        self.wait_for(|kind| matches!(kind, server_frame::Kind::TopicUnregistered(t) if t.topic == topic).then_some(()))
            .await
    }

    pub async fn ack(&mut self, apns_id: &str) -> Result<(), ClientError> {
        self.send(device_frame::Kind::Ack(wire::Ack { apns_id: apns_id.into() })).await
    }

    /// The next event, answering pings and keeping the link alive meanwhile. Every notification is
    /// returned, duplicates included; `next_notification` is the app-level view.
    pub async fn next_event(&mut self) -> Result<LinkEvent, ClientError> {
        loop {
            let kind = match self.buffered.pop_front() {
                Some(kind) => kind,
                None => {
                    crate::edge::codec::release_idle_buffers(&mut self.link);
                    let ping_at = self.last_sent + self.keepalive;
                    tokio::select! {
                        frame = next_frame(&mut self.link, Duration::from_secs(365 * 86400)) => frame?,
                        _ = tokio::time::sleep_until(ping_at) => {
                            self.send(device_frame::Kind::Ping(wire::Ping { nonce: rand::random() })).await?;
                            continue;
                        }
                    }
                }
            };
            match kind {
                server_frame::Kind::Notification(n) => return Ok(LinkEvent::Notification(n)),
                server_frame::Kind::TokenUpdated(t) => {
                    return Ok(LinkEvent::TokenUpdated { topic: t.topic, token: t.token });
                }
                server_frame::Kind::Redirect(r) => return Ok(LinkEvent::Redirect(r.into())),
                server_frame::Kind::Ping(ping) => {
                    self.send(device_frame::Kind::Pong(wire::Pong { nonce: ping.nonce })).await?;
                }
                _ => {}
            }
        }
    }

    /// The next event the app should see; redeliveries are dropped. Each notification is acked when the
    /// app next calls (or closes the link), i.e. after the app has it. Cancel-safe.
    pub async fn next_app_event(&mut self) -> Result<LinkEvent, ClientError> {
        loop {
            self.flush_acks().await?;
            match self.next_event().await? {
                LinkEvent::Notification(n) => {
                    self.unacked.push_back(n.apns_id.clone());
                    if self.seen.insert(&n.apns_id) {
                        return Ok(LinkEvent::Notification(n));
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// Sends the acks owed for notifications already handed to the app.
    pub async fn flush_acks(&mut self) -> Result<(), ClientError> {
        while let Some(apns_id) = self.unacked.front().cloned() {
            // Taken off only once sent: a cancelled send is repeated, and a repeated ack is harmless.
            self.ack(&apns_id).await?;
            self.unacked.pop_front();
        }
        Ok(())
    }

    /// The next notification the app has not seen, skipping other events.
    pub async fn next_notification(&mut self) -> Result<wire::Notification, ClientError> {
        loop {
            if let LinkEvent::Notification(n) = self.next_app_event().await? {
                return Ok(n);
            }
        }
    }

    /// Sends a ping and returns every notification that arrives before its pong, acking none. The node
    /// answers frames in order, so once the pong is back nothing queued before the ping is still on the way.
    pub async fn sync(&mut self) -> Result<Vec<wire::Notification>, ClientError> {
        let nonce: u64 = rand::random();
        self.send(device_frame::Kind::Ping(wire::Ping { nonce })).await?;
        // Frames already buffered come first in `buffered`, those read while waiting after them.
        self.wait_for(|kind| match kind {
            server_frame::Kind::Pong(pong) if pong.nonce == nonce => Some(()),
            _ => None,
        })
        .await?;
        let arrived = self
            .buffered
            .drain(..)
            .filter_map(|kind| match kind {
                server_frame::Kind::Notification(n) => Some(n),
                _ => None,
            })
            .collect();
        Ok(arrived)
    }

    /// Says goodbye and closes, acking what the app has received.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.flush_acks().await?;
        let bye = wire::Goodbye { reason: GoodbyeReason::ClientClosing as i32, detail: String::new() };
        self.send(device_frame::Kind::Goodbye(bye)).await?;
        SinkExt::<DeviceFrame>::close(&mut self.link).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(dir: &Path, owner: Option<RedirectTarget>) -> DeviceCredentials {
        pki::init(dir, &pki::PkiOptions::default()).unwrap();
        let ca = pki::DeviceCa::load(&pki::PkiDir::new(dir)).unwrap();
        let (key, csr) = pki::new_device_key_and_csr().unwrap();
        let device_id = DeviceId::random();
        let cert = ca.issue(&csr, device_id).unwrap();
        DeviceCredentials { device_id, cert_der: cert.to_vec(), key_der: key.serialize_der(), owner }
    }

    #[test]
    fn credentials_keep_their_owner_and_older_directories_load_without_one() {
        let pki_dir = tempfile::tempdir().unwrap();
        let owner =
            RedirectTarget { device_addr: "10.0.0.2:5223".into(), server_name: "node-2.courier.internal".into() };
        let credentials = issued(pki_dir.path(), Some(owner.clone()));
        let home = tempfile::tempdir().unwrap();
        credentials.save(home.path()).unwrap();
        let loaded = DeviceCredentials::load(home.path()).unwrap().unwrap();
        assert_eq!((loaded.device_id, loaded.owner), (credentials.device_id, Some(owner)));

        // A directory written before owners were kept.
        std::fs::remove_file(home.path().join(OWNER_FILE)).unwrap();
        let old = DeviceCredentials::load(home.path()).unwrap().unwrap();
        assert_eq!((old.device_id, old.owner), (credentials.device_id, None));

        // Credentials without an owner saved over ones with one leave no owner behind.
        credentials.save(home.path()).unwrap();
        DeviceCredentials { owner: None, ..credentials.clone() }.save(home.path()).unwrap();
        assert_eq!(DeviceCredentials::load(home.path()).unwrap().unwrap().owner, None);

        std::fs::write(home.path().join(OWNER_FILE), "{not json").unwrap();
        let damaged = DeviceCredentials::load(home.path()).unwrap_err();
        assert!(matches!(damaged, ClientError::Credentials { .. }), "{damaged}");
    }

    #[test]
    fn only_node_wide_failures_send_a_device_to_another_node() {
        let bye = |reason| ClientError::Goodbye { reason, detail: String::new() };
        assert!(bye(GoodbyeReason::Shutdown).another_node_may_answer());
        assert!(bye(GoodbyeReason::Unavailable).another_node_may_answer());
        assert!(ClientError::Closed.another_node_may_answer());
        assert!(ClientError::Unresolvable("nowhere:1".into()).another_node_may_answer());
        for refused in [GoodbyeReason::Revoked, GoodbyeReason::ClonedIdentity, GoodbyeReason::BadCertificate] {
            assert!(!bye(refused).another_node_may_answer(), "{refused:?} refuses the device on every node");
        }
    }

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut recent = SeenIds::new(2);
        assert!(recent.insert("a"));
        assert!(!recent.insert("a"));
        assert!(recent.insert("b"));
        assert!(recent.insert("c"));
        assert!(recent.insert("a"), "a was evicted by c");
        assert!(!recent.insert("c"));
    }
}
