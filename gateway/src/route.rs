//! Forwarding accepted notifications to the node that owns their device, over the cluster gRPC API.
//!
//! Today there is one node to forward to; the ring that picks among many arrives with `WatchCluster`.
//! The gRPC channel is made once and shared: every push is one more HTTP/2 stream on the same mutual-TLS
//! connection, never a connection of its own.

use std::time::Duration;

use courier_node::pki::PkiDir;
use courier_proto::cluster::cluster_client::ClusterClient;
use courier_proto::cluster::{DeliverOutcome, DeliverRequest, Notification};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("node address {addr:?}: {source}")]
    Endpoint { addr: String, source: tonic::transport::Error },
}

/// How the owner node disposed of one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Stored, sent or (expiration 0, device away) discarded: the provider hears 200 in all three cases.
    Accepted(DeliverOutcome),
    /// The node refused it with this APNs reason.
    Rejected(String),
    /// The node could not be reached or did not answer in time; the provider should retry.
    Unavailable(String),
}

/// The gateway's way to the cluster.
#[derive(Clone)]
pub struct NodeRouter {
    client: ClusterClient<Channel>,
    timeout: Duration,
}

impl NodeRouter {
    /// Prepares a mutual-TLS channel to `node_addr` presenting the gateway's cluster certificate. The
    /// connection itself is made on first use, so a gateway can start before its node.
    pub fn new(pki: &PkiDir, node_addr: &str, node_server_name: &str, timeout: Duration) -> Result<Self, RouteError> {
        let read = |path: std::path::PathBuf| {
            std::fs::read(&path).map_err(|source| RouteError::Io { path: path.display().to_string(), source })
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(pki.cluster_ca_cert())?))
            .identity(Identity::from_pem(read(pki.member_cert("gateway"))?, read(pki.member_key("gateway"))?))
            .domain_name(node_server_name);
        let endpoint_error = |source| RouteError::Endpoint { addr: node_addr.to_string(), source };
        let channel = Endpoint::from_shared(format!("https://{node_addr}"))
            .map_err(endpoint_error)?
            .tls_config(tls)
            .map_err(endpoint_error)?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(NodeRouter { client: ClusterClient::new(channel), timeout })
    }

    /// Hands one notification to its owner and waits, at most the configured timeout, for the outcome.
    pub async fn deliver(&self, notification: Notification) -> Delivery {
        let apns_id = notification.apns_id.clone();
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(DeliverRequest { notifications: vec![notification] });
        request.set_timeout(self.timeout);
        let response = match tokio::time::timeout(self.timeout, client.deliver(request)).await {
            Err(_) => return Delivery::Unavailable("timed out".into()),
            Ok(Err(status)) => return Delivery::Unavailable(status.to_string()),
            Ok(Ok(response)) => response.into_inner(),
        };
        let Some(result) = response.results.into_iter().next() else {
            return Delivery::Unavailable("the node answered with no result".into());
        };
        if result.apns_id != apns_id {
            return Delivery::Unavailable(format!("the node answered for apns-id {:?}", result.apns_id));
        }
        match DeliverOutcome::try_from(result.outcome) {
            Ok(outcome @ (DeliverOutcome::Stored | DeliverOutcome::Sent | DeliverOutcome::Discarded)) => {
                Delivery::Accepted(outcome)
            }
            Ok(DeliverOutcome::Rejected) if !result.reason.is_empty() => Delivery::Rejected(result.reason),
            Ok(DeliverOutcome::Rejected) => Delivery::Rejected("InternalServerError".into()),
            Ok(DeliverOutcome::Unspecified) | Err(_) => {
                Delivery::Unavailable(format!("the node answered with outcome {}", result.outcome))
            }
        }
    }
}
