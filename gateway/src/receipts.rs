//! Copies of `delivered` receipts the gateway keeps for the nodes it forwards to.
//!
//! A push its device acknowledged before anything was stored leaves one trace: the receipt its owner keeps
//! in memory until the team's endpoint takes it or, within `--webhook-save-after-ms`, the owner writes it.
//! An owner that dies in between would take the receipt with it, so a copy must live elsewhere. The gateway
//! that forwarded the push already has everything the receipt says (team, token, topic, apns-id, when it
//! accepted the push); the node's answer adds when the device acknowledged it. So the gateway keeps the
//! copy, and no message per receipt goes between nodes: every batch says so (`holds_receipts`), and the
//! owner then sends its other holders no copy.
//!
//! Each node answer says before when every receipt it kept unsaved has been sent or written
//! (`receipts_safe_before_ms`, on the node's own clock, the clock of the receipts' times too) and when the
//! node process started. The copies before that time are dropped. A node that restarted (a new start time)
//! lost what it kept, and a node that leaves the active members (down, or removed) may have: their copies
//! are handed to the devices' owners now (`ForwardItem.receipt`), which queue them durably and send them.
//! A receipt may so be sent twice, under the same event id, which receivers drop repeats by.
//!
//! What is lost: a copy whose answer this gateway never read (the stream broke first), and copies of a node
//! whose death comes with this gateway's (two failures, as with the holders' copies). Each node has at most
//! `MAX_HELD_PER_NODE` copies here; beyond it the oldest go, counted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use courier_core::ids::DeviceId;
use courier_core::webhook::{Event, EventKind, Packed, Receipted};
use courier_proto::cluster::{HeldReceipt, Notification};
use tokio::sync::mpsc;

/// Most copies kept for one node: several seconds of a node's saturated push rate.
pub const MAX_HELD_PER_NODE: usize = 500_000;

/// One receipt's copy: what the receipt says, in one allocation (the push it came from is freed with its
/// answer, as it would be without receipts).
#[derive(Debug, Clone)]
pub struct Held {
    pub device: DeviceId,
    /// When the owner kept it (the receipt's time, the owner's clock) and when the owner's process started.
    pub at_ms: u64,
    pub started_ms: u64,
    accepted_at_ms: u64,
    /// The team, apns-id, token and topic.
    text: Packed<4>,
}

impl Held {
    /// The copy of the receipt of `notification`, which its owner answered DELIVERED at `at_ms`.
    pub fn of(device: DeviceId, notification: &Notification, at_ms: u64, started_ms: u64) -> Self {
        let text =
            Packed::new([&notification.team_id, &notification.apns_id, &notification.token, &notification.topic]);
        Held { device, at_ms, started_ms, accepted_at_ms: notification.accepted_at_ms, text }
    }

    pub fn apns_id(&self) -> &str {
        self.text.parts()[1]
    }

    /// The receipt as the owner would have sent it: the same event, so the same event id.
    pub fn receipt(&self) -> HeldReceipt {
        let [team_id, apns_id, token, topic] = self.text.parts();
        let of = Receipted { team_id, apns_id, token, topic, accepted_at_ms: self.accepted_at_ms };
        let event = Event::new(EventKind::Delivered, of, None, self.at_ms);
        let device_id = self.device.to_bytes().to_vec();
        HeldReceipt { device_id, event_json: event.to_json(), unsaved: false, event_id: event.id }
    }
}

/// The copies kept for one node address.
#[derive(Debug, Default)]
struct NodeCopies {
    /// Oldest first.
    copies: VecDeque<Held>,
    /// The node process's start time, as its latest answer gave it.
    started_ms: u64,
}

/// Every node's copies, and where copies to hand over go.
#[derive(Debug)]
pub struct HeldReceipts {
    nodes: Mutex<HashMap<String, NodeCopies>>,
    cap: usize,
    handover: mpsc::UnboundedSender<Vec<Held>>,
}

impl HeldReceipts {
    /// An empty set keeping at most `cap` copies per node; the receiver gets the copies to hand over.
    pub fn new(cap: usize) -> (Self, mpsc::UnboundedReceiver<Vec<Held>>) {
        let (handover, handed) = mpsc::unbounded_channel();
        (HeldReceipts { nodes: Mutex::default(), cap: cap.max(1), handover }, handed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeCopies>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The copies kept for `addr`, an empty entry made on first use.
    fn node<'a>(nodes: &'a mut HashMap<String, NodeCopies>, addr: &str) -> &'a mut NodeCopies {
        if !nodes.contains_key(addr) {
            nodes.insert(addr.to_string(), NodeCopies::default());
        }
        nodes.get_mut(addr).expect("inserted above")
    }

    fn hand_over(&self, copies: Vec<Held>) {
        if !copies.is_empty() {
            let _ = self.handover.send(copies);
        }
    }

    /// Keeps `held`, which the node at `addr` answered; handed over at once if that node has restarted
    /// since (its answer raced a newer process's).
    pub fn keep(&self, addr: &str, held: Held) {
        let mut nodes = self.lock();
        let node = Self::node(&mut nodes, addr);
        if node.started_ms > held.started_ms {
            drop(nodes);
            self.hand_over(vec![held]);
            return;
        }
        if node.copies.len() >= self.cap {
            node.copies.pop_front();
            metrics::counter!("courier_gateway_receipts_dropped_total", "reason" => "overflow").increment(1);
        }
        node.copies.push_back(held);
    }

    /// After each answer of the node at `addr`: drops the copies it says it no longer needs, and hands over
    /// those of an earlier process of it.
    pub fn answered(&self, addr: &str, started_ms: u64, safe_before_ms: u64) {
        // A node of an earlier release says neither, and keeps no receipt for the gateway to copy.
        if started_ms == 0 {
            return;
        }
        let mut nodes = self.lock();
        let node = Self::node(&mut nodes, addr);
        // An answer of an earlier process, read late, says nothing of the current one's.
        if started_ms < node.started_ms {
            return;
        }
        let mut lost = Vec::new();
        if started_ms > node.started_ms {
            let (earlier, current): (Vec<Held>, Vec<Held>) =
                std::mem::take(&mut node.copies).into_iter().partition(|h| h.started_ms < started_ms);
            (lost, node.copies) = (earlier, current.into());
            node.started_ms = started_ms;
        }
        while node.copies.front().is_some_and(|h| h.at_ms < safe_before_ms && h.started_ms == node.started_ms) {
            node.copies.pop_front();
        }
        drop(nodes);
        self.hand_over(lost);
    }

    /// Hands over every copy kept for a node address not in `active`.
    pub fn keep_only(&self, active: &HashSet<String>) {
        let mut gone = Vec::new();
        self.lock().retain(|addr, node| {
            if active.contains(addr) {
                return true;
            }
            gone.extend(std::mem::take(&mut node.copies));
            false
        });
        self.hand_over(gone);
    }

    /// How many copies are kept, all nodes.
    pub fn len(&self) -> usize {
        self.lock().values().map(|n| n.copies.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(apns_id: &str, at_ms: u64, started_ms: u64) -> Held {
        let notification = Notification {
            device_id: DeviceId(7).to_bytes().to_vec(),
            topic: "com.example".into(),
            apns_id: apns_id.into(),
            payload: b"{}".to_vec(),
            team_id: "TEAM".into(),
            token: "abcd".into(),
            accepted_at_ms: 5,
            ..Default::default()
        };
        Held::of(DeviceId(7), &notification, at_ms, started_ms)
    }

    fn ids(batch: &[Held]) -> Vec<&str> {
        batch.iter().map(Held::apns_id).collect()
    }

    #[test]
    fn copies_go_when_the_node_says_they_are_safe_and_are_handed_over_when_it_restarts_or_leaves() {
        let (held_receipts, mut handed) = HeldReceipts::new(3);
        held_receipts.answered("n1", 100, 0);
        for (id, at) in [("a", 1_000), ("b", 1_010), ("c", 1_020)] {
            held_receipts.keep("n1", held(id, at, 100));
        }
        held_receipts.answered("n2", 200, 0);
        held_receipts.keep("n2", held("x", 2_000, 200));
        // Safe before 1,010: only "a" goes.
        held_receipts.answered("n1", 100, 1_010);
        assert_eq!(held_receipts.len(), 3);
        assert!(handed.try_recv().is_err(), "nothing handed over");
        // Past the cap the oldest goes.
        held_receipts.keep("n1", held("d", 1_030, 100));
        held_receipts.keep("n1", held("e", 1_040, 100));
        assert_eq!(held_receipts.len(), 4);
        // n1 restarted: everything its first process kept is handed over; a late copy of that process too.
        held_receipts.answered("n1", 300, 0);
        assert_eq!(ids(&handed.try_recv().expect("handed over")), ["c", "d", "e"]);
        held_receipts.keep("n1", held("f", 1_050, 100));
        assert_eq!(ids(&handed.try_recv().expect("handed over")), ["f"]);
        held_receipts.keep("n1", held("g", 1_060, 300));
        assert_eq!(held_receipts.len(), 2);
        // n2 leaves the active members: its copies are handed over; n1's stay.
        held_receipts.keep_only(&HashSet::from(["n1".to_string()]));
        assert_eq!(ids(&handed.try_recv().expect("handed over")), ["x"]);
        assert_eq!(held_receipts.len(), 1);
        // A node of an earlier release (no start time) changes nothing.
        held_receipts.answered("n1", 0, u64::MAX);
        assert_eq!(held_receipts.len(), 1);
    }

    #[test]
    fn a_handed_over_receipt_is_the_event_the_owner_would_have_sent() {
        let copy = held("apns-1", 1_234, 100).receipt();
        let of =
            Receipted { team_id: "TEAM", apns_id: "apns-1", token: "abcd", topic: "com.example", accepted_at_ms: 5 };
        let event = Event::new(EventKind::Delivered, of, None, 1_234);
        assert_eq!(copy.event_id, event.id);
        assert_eq!(copy.event_json, event.to_json());
        assert_eq!(copy.device_id, DeviceId(7).to_bytes().to_vec());
        let parsed: Event = serde_json::from_slice(&copy.event_json).expect("json");
        assert_eq!((parsed.delivered_at_ms, parsed.at_ms), (Some(1_234), 1_234));
    }
}
