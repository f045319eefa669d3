//! Bounds of the cluster protocol that both ends keep: the node enforces them, the gateway stays inside
//! them.

use std::time::Duration;

/// Most notifications one `Forward` batch may carry (a larger batch ends the stream with `InvalidArgument`).
pub const MAX_FORWARD_BATCH: usize = 1024;

/// Items a node has read from one `Forward` stream and not answered yet beyond which it reads no further
/// batch, so a gateway faster than the node is slowed by HTTP/2 flow control rather than by the node's
/// memory.
pub const MAX_UNANSWERED: usize = 16_384;

/// How often a `WatchCluster` stream carries a heartbeat: the gateway takes three missed ones as a silent
/// node (`courier_gateway::watch`).
pub const WATCH_HEARTBEAT: Duration = Duration::from_secs(1);
