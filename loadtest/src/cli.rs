//! Command-line interface: one subcommand per scenario, sharing the target, swarm, load and output flags.

use std::net::IpAddr;
use std::path::PathBuf;

/// Where the loadtest keeps what it makes between runs (a spawned cluster's PKI, cached device keys): never
/// the working directory, so a run inside a checkout cannot leave private keys where git would pick them up.
pub fn state_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("COURIER_LOADTEST_HOME") {
        return dir;
    }
    let cache = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|home| home.join(".cache")));
    cache.unwrap_or_else(std::env::temp_dir).join("courier-loadtest")
}

#[derive(clap::Parser)]
#[command(
    name = "courier-loadtest",
    version,
    about = "Load-test a Courier cluster: real mutual-TLS device links, HTTP/2 provider load, and a ledger of \
             every notification",
    after_help = "Examples:\n  courier-loadtest connect --spawn 3 --devices 20000\n  courier-loadtest push \
                  --spawn 3 --devices 1000 --rate max --duration 20\n  courier-loadtest broadcast --spawn 6 \
                  --devices 100000 --channels 1\n  courier-loadtest push --device-addr node-0.example:5223 \
                  --provider-addr 10.0.0.5:443 --pki-dir ./pki --rate 5000"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Ramp to N idle links: connect rate, handshakes, failures, and node memory per link.
    Connect(ConnectArgs),
    /// End-to-end pushes to connected devices: throughput, latency percentiles, errors by reason.
    Push(PushArgs),
    /// Store notifications for offline devices, then reconnect them all: drain rate.
    Offline(OfflineArgs),
    /// Kill one node process mid-run; the ledger proves exactly-once delivery and times the recovery.
    Failover(FailoverArgs),
    /// Broadcast channels: every device subscribed, then broadcasts one at a time; time from the send to the
    /// last subscriber's receipt, deliveries per second, and subscribers missed.
    Broadcast(BroadcastArgs),
    /// A seeded random schedule of faults (pause, kill, restart, partition) under push load; the ledger's verdict and a
    /// timeline of faults, epochs and error rates.
    Chaos(ChaosArgs),
    /// Internal: one device-swarm worker process, driven over stdin/stdout by the coordinator.
    #[command(hide = true)]
    Worker,
}

/// Where the cluster is: spawned here, or an existing one.
#[derive(clap::Args, Clone, Debug)]
pub struct TargetArgs {
    /// Start a local cluster of N `courier node` processes and one `courier gateway` as child processes on
    /// loopback (PKI kept in --spawn-dir between runs, node data wiped at each start).
    #[arg(long, value_name = "N")]
    pub spawn: Option<usize>,
    /// Directory for the spawned cluster's PKI, data and logs (default: `cluster/` in the state directory,
    /// outside any source tree: `$COURIER_LOADTEST_HOME`, else `$XDG_CACHE_HOME/courier-loadtest`, else
    /// `~/.cache/courier-loadtest`).
    #[arg(long, default_value_os_t = state_dir().join("cluster"))]
    pub spawn_dir: PathBuf,
    /// The `courier` binary to spawn (default: the one beside this binary).
    #[arg(long)]
    pub courier_bin: Option<PathBuf>,
    /// Runtime threads of each spawned node and gateway process (`courier --worker-threads`; default one
    /// per CPU). On 2 cores, 1 and 2 gave the same push throughput within run-to-run noise (BENCHMARKS.md).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub spawn_threads: Option<u16>,
    /// Extra flag for every spawned node, e.g. `--node-arg=--failure-timeout-ms=1000` (repeatable).
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// Extra flag for the spawned gateway (repeatable).
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// Spawned nodes bind fixed ports, so that a node restarted by a scenario comes back at the addresses
    /// the cluster and the devices know (set by scenarios, not a flag).
    #[arg(skip)]
    pub restartable: bool,
    /// Spawned nodes run in a network namespace each (`fabric`), so that a scenario can cut one off from
    /// the others (set by scenarios; needs root and iproute2).
    #[arg(skip)]
    pub partitionable: bool,

    /// Existing cluster: node device endpoints (host:port, comma-separated). Devices start on them round-robin
    /// and follow redirects to their owners.
    #[arg(long, value_delimiter = ',')]
    pub device_addr: Vec<String>,
    /// Existing cluster: the gateway's provider API (host:port).
    #[arg(long)]
    pub provider_addr: Option<String>,
    /// Existing cluster: the gateway's channel management port (host:port; `broadcast` creates its
    /// channels there).
    #[arg(long)]
    pub channels_addr: Option<String>,
    /// Existing cluster: a Courier PKI directory to take the CA and the provider credential from
    /// (`cluster-ca.pem`, `provider.json`, `AuthKey_<kid>.p8`).
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// Existing cluster: the CA that signs node and gateway certificates (instead of --pki-dir).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Existing cluster: the provider's ES256 `.p8` signing key (instead of --pki-dir).
    #[arg(long)]
    pub provider_key: Option<PathBuf>,
    #[arg(long)]
    pub team_id: Option<String>,
    #[arg(long)]
    pub key_id: Option<String>,
    /// TLS server name checked against node and gateway certificates.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Enrolment secret for activating devices (empty for clusters with open enrolment).
    #[arg(long, env = "COURIER_ENROLMENT_SECRET", default_value = "", hide_env_values = true)]
    pub enrolment_secret: String,
    /// Existing cluster: node metrics URLs (http://host:port/metrics, comma-separated), read for
    /// `process_resident_memory_bytes` to compute memory per link.
    #[arg(long, value_delimiter = ',')]
    pub node_metrics: Vec<String>,
}

/// The device swarm.
#[derive(clap::Args, Clone, Debug)]
pub struct SwarmArgs {
    /// Devices (one mutual-TLS link each).
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Worker processes holding the links (default: enough that each holds at most 15,000).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Local addresses links are opened from, round-robin (default: 127.0.0.1 up to 127.0.0.k, one per
    /// 20,000 links, when the cluster is on loopback).
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Vec<IpAddr>,
    /// Where activated device certificates and keys are cached, per cluster CA, so reruns skip activation
    /// (default: `devices/` in the state directory, see --spawn-dir; files are owner-only).
    #[arg(long, default_value_os_t = state_dir().join("devices"))]
    pub cache_dir: PathBuf,
    /// Topic the devices register.
    #[arg(long, default_value = "com.example.loadtest")]
    pub topic: String,
    /// Link attempts (and broadcast channel subscriptions) in flight at once, across all workers.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Nice steps the simulated devices' worker processes run below normal (0–19). They stand for devices
    /// elsewhere; on the cluster's machine, at full priority, their TLS handshakes starve the nodes' Raft
    /// traffic as no real fleet can. Default: 5 for `connect` (as nice as the nodes' handshake threads),
    /// 0 for the other scenarios, whose figures include the devices' share of the work.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub device_nice: Option<u8>,
    /// Longest pause between reconnect attempts (backoff doubles from 50 ms with jitter up to this).
    #[arg(long, default_value_t = 1000)]
    pub max_backoff_ms: u64,
    /// Give up waiting for the swarm to reach its links or tokens after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub ramp_timeout: u64,
}

/// Provider load.
#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    /// HTTP/2 connections to the gateway.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Concurrent streams per connection.
    #[arg(long, default_value_t = 64)]
    pub streams: usize,
    /// Pushes per second (open-loop: sends follow the schedule however slowly the cluster answers), or `max`
    /// to send as fast as the cluster answers.
    #[arg(long, default_value = "max")]
    pub rate: Rate,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    Max,
    PerSecond(f64),
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(Rate::Max);
        }
        match s.parse::<f64>() {
            Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(Rate::PerSecond(rate)),
            _ => Err(format!("{s:?} is neither `max` nor a positive number of pushes per second")),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::Max => f.write_str("max"),
            Rate::PerSecond(rate) => write!(f, "{rate}"),
        }
    }
}

/// Output and pass/fail.
#[derive(clap::Args, Clone, Debug)]
pub struct OutputArgs {
    /// JSON result file (default: loadtest-<scenario>.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Exit 1 when errors exceed this fraction of attempts (pushes, or link attempts for `connect`).
    #[arg(long, default_value_t = 0.001)]
    pub max_error_rate: f64,
    /// Seconds to wait after the load for accepted notifications still on their way.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Seconds the links stay idle before node memory is read.
    #[arg(long, default_value_t = 3)]
    pub hold: u64,
    /// Skip the second ramp, which closes every link and reconnects with TLS session resumption.
    #[arg(long)]
    pub no_resume: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub struct PushArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Give the provider team a webhook served by this process (spawned clusters only; their nodes then
    /// allow loopback endpoints) and report its delivery receipts: one per delivered push, signatures
    /// checked, and how fast they came.
    #[arg(long)]
    pub webhook: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub struct OfflineArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Notifications stored per device while it is offline (at most the cluster's per-topic queue cap,
    /// 100 by default, or the oldest are dropped).
    #[arg(long, default_value_t = 10)]
    pub per_device: usize,
}

#[derive(clap::Args, Clone, Debug)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Which spawned node to SIGKILL (1-based; default: the last).
    #[arg(long)]
    pub kill_node: Option<usize>,
    /// Seconds into the load at which the node is killed.
    #[arg(long, default_value_t = 3.0)]
    pub kill_after: f64,
    /// Every Nth device stays offline during the load and reconnects at the end, so stored notifications
    /// are part of the ledger too (0: all online).
    #[arg(long, default_value_t = 3)]
    pub offline_every: usize,
}

#[derive(clap::Args, Clone, Debug)]
pub struct BroadcastArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Broadcast channels, created for --topic's app at the start; device `i` subscribes to channel
    /// `i % C`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub channels: u16,
    /// The channels' `message-storage-policy`: 0 keeps nothing, 1 keeps each channel's latest broadcast
    /// for subscribers that link later.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub policy: u8,
    /// Broadcasts per channel. They go one at a time: each is sent once the one before has reached every
    /// subscriber (or its settle timeout passed) and `--interval-ms` more have gone by.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub sends: u32,
    /// Pause between one broadcast's end and the next send, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Seconds after its send by which a subscriber must have a broadcast; one that has not is missed.
    #[arg(long, default_value_t = 10.0)]
    pub settle_timeout: f64,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// The faults to draw from, comma-separated (`partition` needs root and iproute2).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "pause,kill,restart,partition")]
    pub faults: Vec<Fault>,
    /// Seed of the schedule (default: random, printed so a run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Mean seconds of calm between the cluster being ready again and the next fault.
    #[arg(long, default_value_t = 4.0)]
    pub calm: f64,
    /// Every Nth device stays offline during the load and reconnects at the end (0: all online).
    #[arg(long, default_value_t = 3)]
    pub offline_every: usize,
}

/// A fault `chaos` injects into one spawned node.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// SIGSTOP for one to three failure timeouts, then SIGCONT.
    Pause,
    /// SIGKILL, then started again on its data after one to three seconds.
    Kill,
    /// SIGTERM (drain), then started again at once.
    Restart,
    /// Cut off from the other nodes (still reached by the gateway and the devices) for half a failure
    /// timeout to three of them, then healed.
    Partition,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Pause => "pause",
            Fault::Kill => "kill",
            Fault::Restart => "restart",
            Fault::Partition => "partition",
        }
    }
}
