//! Outbound gRPC to cluster members: one lazily connected mutual-TLS channel per address, shared by
//! every caller (Raft replication, forwarding to the leader, gateways delivering), so each peer costs one
//! HTTP/2 connection however many requests run over it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use courier_proto::cluster::cluster_client::ClusterClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::pki::PkiDir;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("peer address {addr:?}: {source}")]
    Endpoint { addr: String, source: tonic::transport::Error },
}

/// Channels to cluster members, keyed by their cluster API address.
pub struct Peers {
    ca: Certificate,
    identity: Identity,
    /// Name to verify on every peer's certificate instead of the address's host; `None` uses the host.
    server_name: Option<String>,
    connect_timeout: Duration,
    channels: Mutex<HashMap<String, ClusterClient<Channel>>>,
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl Peers {
    /// Presents the certificate `member` (`node-<K>`, `gateway` or `admin`) from `pki` to every peer; the
    /// role it names decides which RPCs the peers answer (`api::authz`).
    pub fn new(
        pki: &PkiDir,
        member: &str,
        server_name: Option<String>,
        connect_timeout: Duration,
    ) -> Result<Self, PeerError> {
        let read = |path: std::path::PathBuf| {
            std::fs::read(&path).map_err(|source| PeerError::Io { path: path.display().to_string(), source })
        };
        Ok(Peers {
            ca: Certificate::from_pem(read(pki.cluster_ca_cert())?),
            identity: Identity::from_pem(read(pki.member_cert(member))?, read(pki.member_key(member))?),
            server_name,
            connect_timeout,
            channels: Mutex::new(HashMap::new()),
        })
    }

    /// The client for the member at `addr`; the connection is made on first use and re-made by tonic
    /// after failures.
    pub fn client(&self, addr: &str) -> Result<ClusterClient<Channel>, PeerError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = channels.get(addr) {
            return Ok(client.clone());
        }
        let name = self.server_name.clone().unwrap_or_else(|| host_of(addr).to_string());
        let tls =
            ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone()).domain_name(name);
        let endpoint_error = |source| PeerError::Endpoint { addr: addr.to_string(), source };
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(endpoint_error)?
            .tls_config(tls)
            .map_err(endpoint_error)?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let client =
            ClusterClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
        channels.insert(addr.to_string(), client.clone());
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn hosts_are_split_from_ports() {
        assert_eq!(host_of("127.0.0.1:7400"), "127.0.0.1");
        assert_eq!(host_of("node-0.courier:7400"), "node-0.courier");
        assert_eq!(host_of("[::1]:7400"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }
}
