//! What the coordinator and its worker processes say to each other: JSON lines, the spec and commands on
//! the worker's stdin, progress reports on its stdout.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The first line a worker reads: which devices it runs and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub worker: usize,
    /// The device cache directory of this cluster (see `devices`).
    pub cache: PathBuf,
    /// Global index of this worker's first device, and how many it runs.
    pub first: usize,
    pub count: usize,
    /// Node device endpoints; device `i` starts on `endpoints[i % len]`.
    pub endpoints: Vec<String>,
    /// Where each node of a spawned cluster takes device links now, by the name its certificate carries:
    /// a cached device's owner names its node by that name and by the address it had when the device was
    /// activated, and a spawned cluster's ports change at every start. Empty for an existing cluster.
    #[serde(default)]
    pub owner_addrs: BTreeMap<String, String>,
    pub ca: PathBuf,
    pub server_name: String,
    /// Device `i` opens its links from `source_addrs[i % len]`; empty lets the OS choose.
    pub source_addrs: Vec<IpAddr>,
    /// Register this topic on first connect and report the token; `None` for bare links.
    pub topic: Option<String>,
    /// Notifications whose payload names another run are counted as stale, not received.
    pub run_id: u32,
    /// Link attempts in flight at once in this worker.
    pub connect_concurrency: usize,
    pub max_backoff_ms: u64,
}

/// A command on a worker's stdin after the spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Start every device that is not running.
    Connect,
    /// Close (with goodbye, acking what arrived) the links of devices whose index is a multiple of `every`.
    Disconnect { every: usize },
    /// The node at this device address is about to be killed: links lost to it count as orphaned, and the
    /// first delivery each orphan gets through another node is its recovery. The worker says it has taken
    /// this in its reports (`Progress::armed`); the kill waits for that (`Swarm::arm_kill`).
    Killing { addr: String },
    /// Subscribe device `i`'s link to broadcast channel `channels[i % len]` (base64 ids), now and on every
    /// link it opens later: a subscription lasts as long as its link.
    Subscribe { channels: Vec<String> },
    /// Close every link, send a last report and exit.
    Exit,
}

/// A worker's report, one JSON line every 200 ms. Counters are totals since start; lists are what is new
/// since the previous report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub worker: usize,
    /// Links open now (past the welcome).
    pub links: u64,
    /// Devices running (connected or trying to).
    pub running: u64,
    /// Handshakes that ended in a welcome: full, and resumed from an earlier session.
    pub full: u64,
    pub resumed: u64,
    /// Handshakes that ended in a redirect to another node.
    pub redirected: u64,
    /// Failed link attempts by reason, with one example message each.
    pub connect_errors: BTreeMap<String, u64>,
    pub error_samples: BTreeMap<String, String>,
    /// Established links that broke (not closed by us).
    pub drops: u64,
    /// New receipts: (sequence number, end-to-end latency in µs, receiving device index).
    pub receipts: Vec<(u64, u64, u64)>,
    /// Links subscribed to their device's channel now (after `Subscribe`).
    pub subscribed: u64,
    /// Subscriptions refused, by reason (the device tries again after a pause).
    pub subscribe_refusals: BTreeMap<String, u64>,
    /// New broadcast receipts: (broadcast sequence number, receiving device index, `clock_micros` at
    /// receipt).
    pub broadcasts: Vec<(u64, u64, u64)>,
    /// Notifications from another run (left over in a queue).
    pub stale: u64,
    /// New tokens: (device index, token).
    pub tokens: Vec<(u64, String)>,
    /// Links lost to the killed node, and (new) UNIX µs at which an orphan first received through another.
    pub orphaned: u64,
    pub recovered: Vec<u64>,
    /// The worker has taken `Killing`: links it sees break from now on are counted as orphaned.
    #[serde(default)]
    pub armed: bool,
    /// This worker's resident memory.
    pub rss: u64,
    /// Set on the last report, after `Exit`.
    pub done: bool,
}

/// The payload marker the swarm reads back: `"lt":[run, seq, device, sent_unix_us]`.
#[derive(Debug, Deserialize)]
pub struct Marker {
    pub lt: (u32, u64, u64, u64),
}

/// The payload marker of a broadcast: `"lb":[run, seq]`. A broadcast's apns-id is the gateway's own
/// (`apns-unique-id`), so the sequence number travels in the payload.
#[derive(Debug, Deserialize)]
pub struct BroadcastMarker {
    pub lb: (u32, u64),
}

/// The payload of broadcast `seq`: a Live Activity update carrying the marker.
pub fn broadcast_payload(run_id: u32, seq: u64, unix_secs: u64) -> Vec<u8> {
    format!(
        r#"{{"aps":{{"timestamp":{unix_secs},"event":"update","content-state":{{"seq":{seq}}}}},"lb":[{run_id},{seq}]}}"#
    )
    .into_bytes()
}

/// The apns-id of sequence number `seq` in run `run_id`: a well-formed UUID the ledger can read back.
pub fn apns_id(run_id: u32, seq: u64) -> String {
    format!("{run_id:08x}-0000-4000-8000-{seq:012x}")
}

/// The payload of one push: a silent notification carrying the marker.
pub fn payload(run_id: u32, seq: u64, device: u64, sent_us: u64) -> Vec<u8> {
    format!(r#"{{"aps":{{"content-available":1}},"lt":[{run_id},{seq},{device},{sent_us}]}}"#).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_marker_round_trips() {
        let marker: Marker = serde_json::from_slice(&payload(7, 42, 3, 1_700_000_000_000_000)).unwrap();
        assert_eq!(marker.lt, (7, 42, 3, 1_700_000_000_000_000));
    }

    #[test]
    fn broadcast_marker_round_trips() {
        let payload = broadcast_payload(7, 42, 1_700_000_000);
        let marker: BroadcastMarker = serde_json::from_slice(&payload).unwrap();
        assert_eq!(marker.lb, (7, 42));
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&payload).unwrap();
        assert_eq!(object["aps"]["event"], "update", "a Live Activity update");
    }

    #[test]
    fn apns_ids_are_uuids_and_distinct() {
        let a = apns_id(0xdeadbeef, 1);
        assert_eq!(a, "deadbeef-0000-4000-8000-000000000001");
        assert_ne!(a, apns_id(0xdeadbeef, 2));
        assert_eq!(a.len(), 36);
    }
}
