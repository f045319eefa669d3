//! TLS connections to a node's device port: one `Connector` per identity, reused so that reconnects resume
//! their TLS session instead of repeating the full handshake.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use courier_core::tls;
use courier_proto::device::ServerFrame;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

use crate::codec::{DEFAULT_MAX_FRAME, FrameCodec};
use crate::credentials::{DeviceCredentials, DeviceEndpoint};
use crate::error::ClientError;
use crate::redirect::RedirectTarget;

pub(crate) type ClientLink = Framed<TlsStream<TcpStream>, FrameCodec<ServerFrame>>;

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
    pub(crate) async fn open(&self, addr: SocketAddr) -> Result<(ClientLink, bool), ClientError> {
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
        Ok((crate::codec::lean(tls, FrameCodec::new(DEFAULT_MAX_FRAME)), resumed))
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

/// The first address `host:port` resolves to (a redirect names the node's advertised device address; the
/// load generator resolves its endpoints with this too).
pub async fn resolve(device_addr: &str) -> Result<SocketAddr, ClientError> {
    tokio::net::lookup_host(device_addr)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| ClientError::Unresolvable(device_addr.to_string()))
}
