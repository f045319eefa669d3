//! The node's configuration: one definition, read from flags or `COURIER_…` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::edge::{Enrolment, LinkSettings};

#[derive(clap::Args, Debug, Clone)]
pub struct NodeConfig {
    /// This node's id in the cluster.
    #[arg(long, env = "COURIER_NODE_ID", default_value_t = 1)]
    pub node_id: u64,
    /// Directory for the node's database (queues, issued device ids).
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "courier-data")]
    pub data_dir: PathBuf,
    /// Directory holding the CAs, this node's certificate (`node.pem`/`node.key`) and the token keys.
    #[arg(long, env = "COURIER_PKI_DIR", default_value = "courier-pki")]
    pub pki_dir: PathBuf,
    /// Where devices connect (mutual TLS).
    #[arg(long, env = "COURIER_DEVICE_ADDR", default_value = "0.0.0.0:5223")]
    pub device_addr: SocketAddr,
    /// Where gateways and other nodes call the cluster gRPC API (mutual TLS, cluster CA).
    #[arg(long, env = "COURIER_CLUSTER_ADDR", default_value = "0.0.0.0:7400")]
    pub cluster_addr: SocketAddr,
    /// Prometheus metrics and health endpoints.
    #[arg(long = "node-metrics-addr", env = "COURIER_NODE_METRICS_ADDR", default_value = "0.0.0.0:9400")]
    pub metrics_addr: SocketAddr,
    /// Secret a device must present to activate. Without it (and without --open-enrolment) activation is
    /// refused.
    #[arg(long, env = "COURIER_ENROLMENT_SECRET", hide_env_values = true)]
    pub enrolment_secret: Option<String>,
    /// Accept every activation request, whatever secret it carries (development clusters only).
    #[arg(long, env = "COURIER_OPEN_ENROLMENT")]
    pub open_enrolment: bool,
    /// Hard limit on one device-link frame, in bytes.
    #[arg(long, env = "COURIER_MAX_FRAME_BYTES", default_value_t = crate::edge::codec::DEFAULT_MAX_FRAME)]
    pub max_frame_bytes: usize,
    /// Shortest keepalive interval a device may negotiate, in seconds.
    #[arg(long, env = "COURIER_KEEPALIVE_MIN_SECS", default_value_t = 10)]
    pub keepalive_min_secs: u64,
    /// Longest keepalive interval a device may negotiate, in seconds.
    #[arg(long, env = "COURIER_KEEPALIVE_MAX_SECS", default_value_t = 1800)]
    pub keepalive_max_secs: u64,
    /// Keepalive for devices that do not ask for one, in seconds.
    #[arg(long, env = "COURIER_KEEPALIVE_DEFAULT_SECS", default_value_t = 300)]
    pub keepalive_default_secs: u64,
    /// Time a new link has for its TLS handshake and first frame, in seconds.
    #[arg(long, env = "COURIER_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,
    /// Most device links this node holds at once; further connections are refused.
    #[arg(long, env = "COURIER_MAX_LINKS", default_value_t = 250_000)]
    pub max_links: usize,
}

#[derive(Parser)]
struct DefaultsOnly {
    #[command(flatten)]
    config: NodeConfig,
}

impl NodeConfig {
    /// The defaults (and any `COURIER_…` environment variables), as if no flag were given.
    pub fn from_defaults() -> Self {
        DefaultsOnly::parse_from(["courier-node"]).config
    }

    /// A node on loopback with OS-chosen ports, open enrolment: for tests and `dev`.
    pub fn local(pki_dir: PathBuf, data_dir: PathBuf) -> Self {
        let any_port: SocketAddr = ([127, 0, 0, 1], 0).into();
        NodeConfig {
            pki_dir,
            data_dir,
            device_addr: any_port,
            cluster_addr: any_port,
            metrics_addr: any_port,
            open_enrolment: true,
            ..Self::from_defaults()
        }
    }

    pub fn link_settings(&self) -> LinkSettings {
        let enrolment = match (&self.enrolment_secret, self.open_enrolment) {
            (_, true) => Enrolment::AcceptAny,
            (Some(secret), false) => Enrolment::Secret(secret.clone()),
            (None, false) => Enrolment::Closed,
        };
        LinkSettings {
            max_frame: self.max_frame_bytes,
            keepalive_min: Duration::from_secs(self.keepalive_min_secs),
            keepalive_max: Duration::from_secs(self.keepalive_max_secs.max(self.keepalive_min_secs)),
            keepalive_default: Duration::from_secs(self.keepalive_default_secs),
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
            enrolment,
        }
    }
}
