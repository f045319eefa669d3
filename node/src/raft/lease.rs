//! The owner's lease: a node acts as the owner of its devices only while it has heard from a Raft quorum
//! recently, so that a node cut off from the others stops before they give its devices to someone else.
//!
//! A follower holds the lease for `duration` after the last `AppendEntries` (heartbeats included) or
//! snapshot it accepted from a current leader. The leader holds it while a quorum acknowledged it within
//! `duration` (openraft's `millis_since_quorum_ack`); a leader that is the only voter always holds it. A
//! node without the lease refuses forwarded pushes as `NO_LEASE` (the gateway retries them elsewhere, as it
//! does `NOT_OWNER`), refuses device `Hello`s with `UNAVAILABLE`, and reports not ready.
//!
//! Why that fences: the leader marks a member down only after it has answered no probe for the failure
//! timeout, counted from its last answer; the cut-off node's lease ran from the last heartbeat it got,
//! which is no earlier than that answer less one probe interval. So with `duration + probe interval <
//! failure timeout` (checked at start; the default lease is two thirds of `failure timeout - probe
//! interval`) the cut-off node has stopped accepting before the epoch that moves its devices exists, and no
//! two nodes accept a device's notifications at the same time, as long as the nodes' clocks run at about
//! the same rate (they are monotonic clocks measuring intervals, never compared across machines).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Raft;
use super::state::NodeId;

pub struct Lease {
    raft: Raft,
    id: NodeId,
    duration: Duration,
    origin: Instant,
    /// Milliseconds after `origin` of the last contact with a current leader, plus one (0: none yet).
    last_contact: AtomicU64,
    /// What `held` found last time, so that a lapse is logged and counted once, when it is first seen.
    was_held: AtomicBool,
}

impl Lease {
    pub fn new(raft: Raft, id: NodeId, duration: Duration) -> Self {
        let was_held = AtomicBool::new(false);
        Lease { raft, id, duration, origin: Instant::now(), last_contact: AtomicU64::new(0), was_held }
    }

    /// A current leader's `AppendEntries` or snapshot was accepted just now.
    pub fn heard_from_leader(&self) {
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        self.last_contact.fetch_max(now, Ordering::Relaxed);
    }

    /// Whether this node may act as an owner now. A lease that was held and is not any more is a lapse:
    /// logged, and counted in `courier_node_lease_lapses_total`, when first seen here (every device
    /// `Hello`, forwarded push and readiness check asks, and the metrics task once a second). A leader
    /// that no quorum of its new voters has acknowledged yet (a member just joined) holds no lease either,
    /// but that is not counted: there was no contact that ended.
    pub fn held(&self) -> bool {
        let (held, since_ms) = self.check();
        if self.was_held.swap(held, Ordering::Relaxed) != held {
            if held {
                tracing::info!(node = self.id, "lease held: acting as an owner");
            } else if let Some(since_ms) = since_ms {
                tracing::warn!(
                    node = self.id,
                    lease_ms = self.duration.as_millis() as u64,
                    last_heard_ms_ago = since_ms,
                    "lease lapsed: refusing devices and pushes until a Raft quorum is heard from again"
                );
                metrics::counter!("courier_node_lease_lapses_total", "node" => self.id.to_string()).increment(1);
            } else {
                // A leader whose voters just changed (the cluster forming): no quorum of the new set has
                // acknowledged it yet. Not a lapse; it holds the lease again at their first answer.
                tracing::info!(node = self.id, "lease not held until the new voters acknowledge this leader");
            }
        }
        held
    }

    /// Whether the lease is held, and how long ago (ms) this node last heard from a quorum as leader, or
    /// from the leader as follower (`None`: never).
    fn check(&self) -> (bool, Option<u64>) {
        let limit = self.duration.as_millis() as u64;
        {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            if metrics.current_leader == Some(self.id) {
                if metrics.membership_config.membership().voter_ids().count() <= 1 {
                    return (true, Some(0));
                }
                let since = metrics.millis_since_quorum_ack;
                return (since.is_some_and(|ms| ms < limit), since);
            }
        }
        let last = self.last_contact.load(Ordering::Relaxed);
        if last == 0 {
            return (false, None);
        }
        let since = (self.origin.elapsed().as_millis() as u64 + 1).saturating_sub(last);
        (since < limit, Some(since))
    }
}
