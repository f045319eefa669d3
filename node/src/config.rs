//! The node's configuration: one definition, read from flags or `COURIER_…` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::edge::clones::{ClonePolicy, CloneSettings};
use crate::edge::limits::{AdmissionSettings, LinkLimits};
use crate::edge::{Enrolment, LinkSettings};
use crate::raft::control::ControlSettings;

#[derive(clap::Args, Debug, Clone)]
pub struct NodeConfig {
    /// This node's id in the cluster.
    #[arg(long, env = "COURIER_NODE_ID", default_value_t = 1)]
    pub node_id: u64,
    /// Take the node id from the host name's trailing ordinal plus one (`courier-node-0` is node 1), as
    /// a Kubernetes StatefulSet names its pods; overrides --node-id.
    #[arg(long, env = "COURIER_NODE_ID_FROM_HOSTNAME")]
    pub node_id_from_hostname: bool,
    /// Directory for the node's database (queues, issued device ids).
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "courier-data")]
    pub data_dir: PathBuf,
    /// Directory holding the CAs, this node's certificate (`node-<id>.pem`/`node-<id>.key`) and the token keys.
    #[arg(long, env = "COURIER_PKI_DIR", default_value = "courier-pki")]
    pub pki_dir: PathBuf,
    /// Where devices connect (mutual TLS).
    #[arg(long, env = "COURIER_DEVICE_ADDR", default_value = "0.0.0.0:5223")]
    pub device_addr: SocketAddr,
    /// Where gateways and other nodes call the cluster gRPC API (mutual TLS, cluster CA).
    #[arg(long, env = "COURIER_CLUSTER_ADDR", default_value = "0.0.0.0:7400")]
    pub cluster_addr: SocketAddr,
    /// Cluster API address other members and gateways use to reach this node, if it differs from
    /// --cluster-addr (a wildcard bind address, a DNS name in Kubernetes).
    #[arg(long, env = "COURIER_ADVERTISE_CLUSTER_ADDR")]
    pub advertise_cluster_addr: Option<String>,
    /// Device address given out in redirects, if it differs from --device-addr.
    #[arg(long, env = "COURIER_ADVERTISE_DEVICE_ADDR")]
    pub advertise_device_addr: Option<String>,
    /// Cluster API addresses of existing members to join through (comma-separated). Without any, a node
    /// with an empty data directory starts a new cluster; a node with Raft state resumes it either way.
    #[arg(long, env = "COURIER_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Raft heartbeat interval, in milliseconds.
    #[arg(long, env = "COURIER_RAFT_HEARTBEAT_MS", default_value_t = 250)]
    pub raft_heartbeat_ms: u64,
    /// Shortest Raft election timeout, in milliseconds (the longest is twice this).
    #[arg(long, env = "COURIER_RAFT_ELECTION_TIMEOUT_MS", default_value_t = 1000)]
    pub raft_election_timeout_ms: u64,
    /// Build a Raft snapshot (and compact the log) every this many entries.
    #[arg(long, env = "COURIER_RAFT_SNAPSHOT_LOGS", default_value_t = 1000)]
    pub raft_snapshot_logs: u64,
    /// How often the leader probes each member, in milliseconds.
    #[arg(long, env = "COURIER_PROBE_INTERVAL_MS", default_value_t = 500)]
    pub probe_interval_ms: u64,
    /// A member that answers no probe for this long is marked down, in milliseconds.
    #[arg(long, env = "COURIER_FAILURE_TIMEOUT_MS", default_value_t = 3000)]
    pub failure_timeout_ms: u64,
    /// When fewer members are active than the replication factor, whether a stored notification may be
    /// answered 200 on every active member (`true`, the default: a one- or two-node cluster keeps
    /// accepting) or only on R copies (`false`: the production overlay's choice; pushes are then answered
    /// 503 until enough nodes are back). Give every node the same value.
    #[arg(long, env = "COURIER_DEGRADED_WRITES", default_value_t = true, action = clap::ArgAction::Set)]
    pub degraded_writes: bool,
    /// Most broadcast channels one provider team may have for one app. Checked by the node a channel
    /// create reaches, and carried in the command, so give every node the same value.
    #[arg(long, env = "COURIER_MAX_CHANNELS_PER_APP", default_value_t = courier_core::channel::DEFAULT_MAX_CHANNELS_PER_APP)]
    pub max_channels_per_app: u32,
    /// A member marked down is marked active again only after answering every probe for this long, in
    /// milliseconds (default: the failure timeout), so a flapping link does not move its devices back and
    /// forth.
    #[arg(long, env = "COURIER_REJOIN_AFTER_MS")]
    pub rejoin_after_ms: Option<u64>,
    /// How long after its last contact with a Raft quorum this node still acts as an owner, in
    /// milliseconds (default: two thirds of the failure timeout less the probe interval). It must end before
    /// the leader's failure timeout would mark the node down (see `raft::lease`).
    #[arg(long, env = "COURIER_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Rotate the token key automatically this often, in seconds (unset: only on `courier ctl keys rotate`).
    #[arg(long, env = "COURIER_KEY_ROTATION_SECS")]
    pub key_rotation_secs: Option<u64>,
    /// How long a rotated-out token key still opens its tokens before they answer 410 ExpiredToken, in
    /// seconds.
    #[arg(long, env = "COURIER_KEY_GRACE_SECS", default_value_t = 7 * 86400)]
    pub key_grace_secs: u64,
    /// On SIGTERM, how long the node may spend handing its queues and links to other nodes before it
    /// exits anyway, in seconds.
    #[arg(long, env = "COURIER_DRAIN_DEADLINE_SECS", default_value_t = 30)]
    pub drain_deadline_secs: u64,
    /// Notifications kept per device and topic while it is offline; the oldest are dropped beyond this.
    #[arg(long, env = "COURIER_QUEUE_CAP_PER_TOPIC", default_value_t = crate::store::DEFAULT_CAP_PER_TOPIC)]
    pub queue_cap_per_topic: u64,
    /// Most device links per second this node redirects when the ring moves them elsewhere.
    #[arg(long, env = "COURIER_REDIRECT_RATE", default_value_t = 1000)]
    pub redirect_rate: u32,
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
    #[arg(long, env = "COURIER_MAX_FRAME_BYTES", default_value_t = courier_device::codec::DEFAULT_MAX_FRAME)]
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
    /// Time a new device connection has from accept to its first frame (any wait for a handshake slot,
    /// the TLS handshake and the first frame), in seconds.
    #[arg(long, env = "COURIER_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,
    /// Most device connections not yet past their first frame, from all addresses; beyond it new
    /// connections are closed at accept. They hold sockets on top of --max-links.
    #[arg(long, env = "COURIER_MAX_PENDING_LINKS", default_value_t = 16_384)]
    pub max_pending_links: usize,
    /// Most device connections not yet past their first frame from one source address (an IPv6 /64
    /// counts as one). Carrier NAT puts many devices behind one address: keep this well above the
    /// reconnects one address can make within --handshake-timeout-secs.
    #[arg(long, env = "COURIER_MAX_PENDING_PER_ADDRESS", default_value_t = 4096)]
    pub max_pending_per_address: usize,
    /// Most TLS handshakes in progress (ClientHello received) from one source address; beyond it the
    /// connection is closed. One address also holds at most half of the node's 128 handshake slots.
    #[arg(long, env = "COURIER_MAX_HANDSHAKES_PER_ADDRESS", default_value_t = 1024)]
    pub max_handshakes_per_address: usize,
    /// Longest a write to a device link may wait for the device to read, in milliseconds; a device
    /// slower than that is closed with SLOW_CONSUMER (and a node shutting down waits no longer on it).
    #[arg(long, env = "COURIER_LINK_WRITE_TIMEOUT_MS", default_value_t = 15_000)]
    pub link_write_timeout_ms: u64,
    /// Frames that cause writes (RegisterTopic, UnregisterTopic, acks for notifications the link never
    /// carried) a device link may send at once; beyond it and --link-write-rate the link is closed with
    /// RATE_LIMITED.
    #[arg(long, env = "COURIER_LINK_WRITE_BURST", default_value_t = 128)]
    pub link_write_burst: u32,
    /// The same frames a device link may send per second after its burst.
    #[arg(long, env = "COURIER_LINK_WRITE_RATE", default_value_t = 2.0)]
    pub link_write_rate: f64,
    /// Most app topics one device may register or unregister on a link, and unregistered topics stored
    /// per device; beyond it the link is closed with TOO_MANY_TOPICS and nothing is stored.
    #[arg(long, env = "COURIER_MAX_TOPICS_PER_DEVICE", default_value_t = 64)]
    pub max_topics_per_device: usize,
    /// Most device links this node holds at once; further connections are refused.
    #[arg(long, env = "COURIER_MAX_LINKS", default_value_t = 250_000)]
    pub max_links: usize,
    /// Threads of the runtime that does device links' TLS handshakes, which is separate from the one running
    /// Raft, the cluster API and the links' sessions, so that a burst of handshakes cannot delay heartbeats
    /// (default: `courier --worker-threads` if given, else one per CPU).
    #[arg(long, env = "COURIER_HANDSHAKE_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub handshake_threads: Option<u16>,
    /// How much nicer (lower priority, 0–19) the handshake threads run than the rest of the node. When the
    /// CPU is short the kernel then runs Raft heartbeats, member probes, the cluster API and live links
    /// first, so a burst of devices linking is served more slowly instead of costing the node its lease.
    /// 0: no difference.
    #[arg(long, env = "COURIER_HANDSHAKE_NICE", default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub handshake_nice: u8,
    /// What to do about a device certificate several devices seem to share (links that keep replacing
    /// each other from different source addresses): `alert` counts and records it and keeps the newer link;
    /// `refuse` also closes every link of the device and refuses new ones, and gateways answer its pushes
    /// 410 `ClonedIdentity`, until an operator clears or revokes it. Give every node the same policy.
    #[arg(long, env = "COURIER_ON_CLONE", value_enum, default_value_t = ClonePolicy::Alert)]
    pub on_clone: ClonePolicy,
    /// Window in which replacements of one device's link from different source addresses are counted, in
    /// seconds.
    #[arg(long, env = "COURIER_CLONE_WINDOW_SECS", default_value_t = 60)]
    pub clone_window_secs: u64,
    /// Replacements from different source addresses within the window that make a device a suspected
    /// clone (at least 2: one is a device changing networks).
    #[arg(long, env = "COURIER_CLONE_THRESHOLD", default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..))]
    pub clone_threshold: u32,
    /// How long the delivery-status log (provider API `GET /v1/status/…`) keeps an entry, in seconds.
    #[arg(long, env = "COURIER_STATUS_RETENTION_SECS", default_value_t = 24 * 3600)]
    pub status_retention_secs: u64,
    /// Most entries the delivery-status log holds (about 250 bytes each); the oldest go first.
    #[arg(long, env = "COURIER_STATUS_CAPACITY", default_value_t = crate::delivery_status::DEFAULT_CAPACITY)]
    pub status_capacity: usize,
    /// How long a notification written to a device's live link waits for the device's ack before it is
    /// committed to the store and the replicas, in milliseconds (1-10000). An ack within it saves every
    /// store write; the provider's answer waits at most this long plus one commit.
    #[arg(long, env = "COURIER_ACK_WAIT_MS", default_value_t = crate::delivery::DEFAULT_ACK_WAIT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub ack_wait_ms: u64,
    /// How long a gateway's batch stamped with a cluster epoch this node has not applied yet waits for
    /// it, in milliseconds; then its notifications are refused as EPOCH_AHEAD and the gateway retries them.
    #[arg(long, env = "COURIER_EPOCH_WAIT_MS",
          default_value_t = crate::api::forward::DEFAULT_EPOCH_WAIT.as_millis() as u64)]
    pub epoch_wait_ms: u64,
    /// Let webhook endpoints be `http://` and private, loopback or link-local addresses (a development
    /// cluster; `courier dev` sets it). Off in production: a team's URL must not reach inside the network.
    #[arg(long, env = "COURIER_WEBHOOKS_ALLOW_PRIVATE")]
    pub webhooks_allow_private: bool,
    /// Extra trusted CA certificates (PEM) for webhook endpoints, beside the public web PKI.
    #[arg(long, env = "COURIER_WEBHOOK_CA")]
    pub webhook_ca: Option<PathBuf>,
    /// Most receipts in one webhook request.
    #[arg(long, env = "COURIER_WEBHOOK_BATCH_MAX", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub webhook_batch_max: u64,
    /// How long a webhook batch waits to fill, in milliseconds.
    #[arg(long, env = "COURIER_WEBHOOK_BATCH_WAIT_MS", default_value_t = 500)]
    pub webhook_batch_wait_ms: u64,
    /// How long a receipt is retried before it is dropped, in seconds.
    #[arg(long, env = "COURIER_WEBHOOK_MAX_AGE_SECS", default_value_t = 24 * 3600)]
    pub webhook_max_age_secs: u64,
    /// Limit on connecting to a webhook endpoint and on each request, in milliseconds.
    #[arg(long, env = "COURIER_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000)]
    pub webhook_timeout_ms: u64,
    /// Most receipts queued on a node for one team; more are dropped and counted.
    #[arg(long, env = "COURIER_WEBHOOK_QUEUE_CAP", default_value_t = crate::store::DEFAULT_RECEIPTS_PER_TEAM)]
    pub webhook_queue_cap: u64,
    /// How long the `delivered` receipt of a notification nothing stored (acked before any commit) may wait
    /// in memory for its team's endpoint, in milliseconds, on the owner and (copied in the next replication
    /// batch) on the device's other holders, before it is written (queued on the owner, held in the others'
    /// stores). Losing one takes the owner and every other holder dying within that time. 0 writes each at
    /// once (in the next group commit and replication batch).
    #[arg(long, env = "COURIER_WEBHOOK_SAVE_AFTER_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub webhook_save_after_ms: u64,
    /// How long such a receipt waits for its team's endpoint to take it before the owner sends copies to
    /// the device's other holders (in the next replication batch), in milliseconds. 0 (the default) copies
    /// each at once, so that the owner's death loses only receipts decided in its last replication batch.
    /// More makes receipts cheaper (a receipt the endpoint takes in time never costs a message to another
    /// node) at the price of that window: the owner's death loses those decided in its last this-long that
    /// the endpoint had not taken. A batch of them leaves once its oldest has waited half of this, full or
    /// not. `BENCHMARKS.md` measures both.
    #[arg(long, env = "COURIER_WEBHOOK_COPY_AFTER_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub webhook_copy_after_ms: u64,
    /// How often the owner looks for stored notifications that expired, to send their receipts, in seconds.
    #[arg(long, env = "COURIER_WEBHOOK_EXPIRY_SWEEP_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub webhook_expiry_sweep_secs: u64,
}

/// A bound address others can dial: a wildcard IP becomes loopback.
fn reachable(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], bound.port())).to_string()
    } else {
        bound.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinal_host_names_give_node_ids() {
        let mut config = NodeConfig::from_defaults();
        config.node_id = 7;
        assert_eq!(config.resolve_node_id("anything"), Some(7));
        config.node_id_from_hostname = true;
        assert_eq!(config.resolve_node_id("courier-node-0"), Some(1));
        assert_eq!(config.resolve_node_id("courier-node-12"), Some(13));
        assert_eq!(config.resolve_node_id("courier-node"), None);
    }

    #[test]
    fn clone_flags_parse_and_a_threshold_below_two_is_refused() {
        let parse = |args: &[&str]| DefaultsOnly::try_parse_from(["courier-node"].iter().chain(args)).map(|d| d.config);
        let config = parse(&["--on-clone", "refuse", "--clone-window-secs", "30", "--clone-threshold", "4"]).unwrap();
        let expected = CloneSettings { window: Duration::from_secs(30), threshold: 4, policy: ClonePolicy::Refuse };
        assert_eq!(config.clone_settings(), expected);
        assert_eq!(NodeConfig::from_defaults().clone_settings(), CloneSettings::default());
        assert!(parse(&["--clone-threshold", "1"]).is_err(), "one replacement is a network change, never a clone");
        assert!(parse(&["--on-clone", "ignore"]).is_err());
    }

    #[test]
    fn a_node_never_joins_through_itself() {
        let mut config = NodeConfig::from_defaults();
        config.join = vec!["node-0.courier:7400".into(), "node-1.courier:7400".into()];
        assert_eq!(config.join_seeds("node-0.courier:7400"), ["node-1.courier:7400"]);
        config.join = vec!["node-0.courier:7400".into()];
        assert!(config.join_seeds("node-0.courier:7400").is_empty());
    }
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

    /// Resolves `--node-id-from-hostname` against `hostname`; `None` if it asks for that and the host
    /// name ends in no number.
    pub fn resolve_node_id(&self, hostname: &str) -> Option<u64> {
        if !self.node_id_from_hostname {
            return Some(self.node_id);
        }
        let (_, ordinal) = hostname.rsplit_once('-')?;
        ordinal.parse::<u64>().ok().map(|n| n + 1)
    }

    /// Join seeds other than this node itself: in a StatefulSet every pod is given the same seed list,
    /// and the pod that finds only itself there starts the cluster.
    pub fn join_seeds(&self, advertised_cluster_addr: &str) -> Vec<String> {
        self.join.iter().filter(|seed| seed.as_str() != advertised_cluster_addr).cloned().collect()
    }

    /// Where others reach the cluster API: the advertised address, else the bound one.
    pub fn advertised_cluster_addr(&self, bound: SocketAddr) -> String {
        self.advertise_cluster_addr.clone().unwrap_or_else(|| reachable(bound))
    }

    pub fn advertised_device_addr(&self, bound: SocketAddr) -> String {
        self.advertise_device_addr.clone().unwrap_or_else(|| reachable(bound))
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

    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms)
    }

    pub fn receipt_settings(&self) -> crate::receipts::ReceiptSettings {
        crate::receipts::ReceiptSettings {
            batch_max: self.webhook_batch_max as usize,
            batch_wait: Duration::from_millis(self.webhook_batch_wait_ms),
            max_age: Duration::from_secs(self.webhook_max_age_secs),
            request_timeout: Duration::from_millis(self.webhook_timeout_ms),
            allow_private: self.webhooks_allow_private,
            extra_roots: self.webhook_ca.clone(),
            expiry_sweep: Duration::from_secs(self.webhook_expiry_sweep_secs),
        }
    }

    /// Where receipts wait before they are copied and written, as `--webhook-copy-after-ms` and
    /// `--webhook-save-after-ms` say.
    pub fn unsaved_receipts(&self) -> crate::receipts::unsaved::UnsavedReceipts {
        crate::receipts::unsaved::UnsavedReceipts::new(
            Duration::from_millis(self.webhook_save_after_ms),
            Duration::from_millis(self.webhook_copy_after_ms),
            crate::receipts::unsaved::DEFAULT_CAP_PER_TEAM,
        )
        .with_batch_max(self.webhook_batch_max as usize)
    }

    pub fn epoch_wait(&self) -> Duration {
        Duration::from_millis(self.epoch_wait_ms)
    }

    pub fn status_log(&self) -> crate::delivery_status::StatusLog {
        crate::delivery_status::StatusLog::new(Duration::from_secs(self.status_retention_secs), self.status_capacity)
    }

    /// The owner's lease: `--lease-ms`, or two thirds of what the failure timeout leaves after a probe interval
    /// (at least three Raft heartbeats); refused when it would outlast the failure timeout.
    pub fn lease(&self) -> Result<Duration, crate::node::NodeError> {
        let room = self.failure_timeout_ms.saturating_sub(self.probe_interval_ms);
        let lease_ms = self.lease_ms.unwrap_or((room * 2 / 3).max(self.raft_heartbeat_ms * 3));
        if lease_ms == 0 || lease_ms >= room {
            return Err(crate::node::NodeError::LeaseTooLong {
                lease_ms,
                failure_timeout_ms: self.failure_timeout_ms,
                probe_interval_ms: self.probe_interval_ms,
            });
        }
        Ok(Duration::from_millis(lease_ms))
    }

    pub fn control_settings(&self) -> ControlSettings {
        ControlSettings {
            probe_interval: Duration::from_millis(self.probe_interval_ms.max(10)),
            failure_timeout: Duration::from_millis(self.failure_timeout_ms),
            rejoin_after: Duration::from_millis(self.rejoin_after_ms.unwrap_or(self.failure_timeout_ms)),
            key_rotation: self.key_rotation_secs.map(Duration::from_secs),
            key_grace: Duration::from_secs(self.key_grace_secs),
            max_channels_per_app: self.max_channels_per_app,
        }
    }

    pub fn raft_config(&self) -> Result<openraft::Config, Box<openraft::ConfigError>> {
        let election = self.raft_election_timeout_ms.max(self.raft_heartbeat_ms * 3);
        openraft::Config {
            cluster_name: "courier".into(),
            heartbeat_interval: self.raft_heartbeat_ms,
            election_timeout_min: election,
            election_timeout_max: election * 2,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.raft_snapshot_logs.max(1)),
            max_in_snapshot_log_to_keep: self.raft_snapshot_logs / 2,
            purge_batch_size: 64,
            ..Default::default()
        }
        .validate()
        .map_err(Box::new)
    }

    pub fn clone_settings(&self) -> CloneSettings {
        CloneSettings {
            window: Duration::from_secs(self.clone_window_secs),
            threshold: self.clone_threshold,
            policy: self.on_clone,
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
            admission: AdmissionSettings {
                max_pending: self.max_pending_links,
                max_pending_per_source: self.max_pending_per_address,
                max_handshakes_per_source: self.max_handshakes_per_address,
            },
            link_limits: LinkLimits {
                write_burst: self.link_write_burst,
                write_rate: self.link_write_rate,
                max_topics: self.max_topics_per_device,
                write_timeout: Duration::from_millis(self.link_write_timeout_ms.max(1)),
            },
            enrolment,
        }
    }
}
