//! Receipts not written yet: the `delivered` receipts of notifications acked before any commit (and of
//! ones with expiration 0, answered when handed to the link), which nothing stored. Their team's task sends
//! them from memory; only one its endpoint has not taken within `save_after` of its outcome is written
//! (queued in the store and copied to the device's other holders, as every other receipt is at once). On a
//! healthy endpoint most never cost a write or a copy; an owner killed in that time loses the ones it held.
//!
//! Whoever takes a receipt out of here owns it: the team's task while it sends it (and writes it if the
//! request fails), the sweep when it is overdue. A team holds at most `cap`; more are written at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use courier_core::webhook::Event;

use crate::ids::DeviceId;
use crate::replication::Replicator;
use crate::store::Store;

/// Most unsaved receipts one team may have waiting on a node unless configured otherwise.
pub const DEFAULT_CAP_PER_TEAM: usize = 100_000;

/// One receipt kept in memory.
#[derive(Debug, Clone)]
pub struct Unsaved {
    pub device: DeviceId,
    pub event: Event,
}

/// The unsaved receipts of every team, oldest first.
#[derive(Debug)]
pub struct UnsavedReceipts {
    save_after: Duration,
    cap: usize,
    teams: Mutex<HashMap<String, VecDeque<Unsaved>>>,
    /// Woken when a team's first receipt arrives, so that its task starts.
    arrived: tokio::sync::Notify,
}

impl UnsavedReceipts {
    /// Keeps receipts up to `save_after` (zero: none is kept, each is written at once).
    pub fn new(save_after: Duration, cap: usize) -> Self {
        UnsavedReceipts { save_after, cap, teams: Mutex::new(HashMap::new()), arrived: tokio::sync::Notify::new() }
    }

    pub fn save_after(&self) -> Duration {
        self.save_after
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Unsaved>>> {
        self.teams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `receipt` for its team's task; gives it back when it must be written now instead (keeping
    /// is off, or the team has `cap` waiting).
    #[must_use = "a receipt given back must be written"]
    pub fn keep(&self, receipt: Unsaved) -> Option<Unsaved> {
        if self.save_after.is_zero() {
            return Some(receipt);
        }
        let mut teams = self.lock();
        let queue = teams.entry(receipt.event.team_id.clone()).or_default();
        if queue.len() >= self.cap {
            return Some(receipt);
        }
        let first = queue.is_empty();
        queue.push_back(receipt);
        drop(teams);
        if first {
            self.arrived.notify_one();
        }
        None
    }

    /// Resolves when a team that had none gets one.
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }

    /// Teams with receipts waiting here, and how many each has.
    pub fn teams(&self) -> Vec<(String, usize)> {
        self.lock().iter().filter(|(_, q)| !q.is_empty()).map(|(team, q)| (team.clone(), q.len())).collect()
    }

    /// How many the team has waiting, and when its oldest was decided (UNIX ms).
    pub fn waiting(&self, team: &str) -> (usize, Option<u64>) {
        self.lock().get(team).map_or((0, None), |q| (q.len(), q.front().map(|r| r.event.at_ms)))
    }

    /// Takes the team's oldest `max`; the caller now owns them.
    pub fn take(&self, team: &str, max: usize) -> Vec<Unsaved> {
        let mut teams = self.lock();
        let Some(queue) = teams.get_mut(team) else { return Vec::new() };
        let taken: Vec<Unsaved> = queue.drain(..max.min(queue.len())).collect();
        if queue.is_empty() {
            teams.remove(team);
        }
        taken
    }

    /// Takes every receipt decided `save_after` or longer before `now_ms`, of every team.
    pub fn overdue(&self, now_ms: u64) -> Vec<Unsaved> {
        let due_before = now_ms.saturating_sub(self.save_after.as_millis() as u64);
        let mut teams = self.lock();
        let mut taken = Vec::new();
        teams.retain(|_, queue| {
            while queue.front().is_some_and(|r| r.event.at_ms <= due_before) {
                taken.extend(queue.pop_front());
            }
            !queue.is_empty()
        });
        taken
    }

    /// Takes all of them (the node is stopping).
    pub fn drain(&self) -> Vec<Unsaved> {
        self.lock().drain().flat_map(|(_, queue)| queue).collect()
    }

    /// How many are waiting, all teams.
    pub fn len(&self) -> usize {
        self.lock().values().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes receipts that waited unsaved and were not taken; counted as `saved`.
pub fn save_late(store: &Store, replicator: &Replicator, receipts: Vec<Unsaved>) {
    metrics::counter!("courier_webhook_events_total", "outcome" => "saved").increment(receipts.len() as u64);
    save(store, replicator, receipts);
}

/// Writes receipts as every receipt decided with nothing stored is written: copied to the device's other
/// holders (in their next replication batch) and queued here (in the next group commit), without waiting.
pub fn save(store: &Store, replicator: &Replicator, receipts: Vec<Unsaved>) {
    if receipts.is_empty() {
        return;
    }
    let mut events = Vec::with_capacity(receipts.len());
    for Unsaved { device, event } in receipts {
        replicator.hold_receipts_later(device, std::slice::from_ref(&event));
        events.push((device, event));
    }
    store.queue_receipts(events);
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::webhook::{EventKind, Receipted};

    fn receipt(team: &str, apns_id: &str, at_ms: u64) -> Unsaved {
        let of = Receipted { team_id: team, apns_id, token: "t", topic: "com.example", accepted_at_ms: at_ms };
        Unsaved { device: DeviceId(7), event: Event::new(EventKind::Delivered, of, None, at_ms) }
    }

    fn ids(receipts: &[Unsaved]) -> Vec<&str> {
        receipts.iter().map(|r| r.event.apns_id.as_str()).collect()
    }

    #[test]
    fn kept_receipts_are_taken_in_order_per_team_and_only_overdue_ones_are_swept() {
        let unsaved = UnsavedReceipts::new(Duration::from_millis(1000), 10);
        for (team, id, at) in [("A", "a1", 100), ("B", "b1", 200), ("A", "a2", 900), ("A", "a3", 1500)] {
            assert!(unsaved.keep(receipt(team, id, at)).is_none(), "kept");
        }
        assert_eq!(unsaved.waiting("A"), (3, Some(100)));
        let mut teams = unsaved.teams();
        teams.sort();
        assert_eq!(teams, [("A".to_string(), 3), ("B".to_string(), 1)]);
        // At 1,100 ms only what was decided by 100 ms is a second old.
        assert_eq!(ids(&unsaved.overdue(1100)), ["a1"]);
        assert_eq!(ids(&unsaved.take("A", 1)), ["a2"]);
        assert_eq!(ids(&unsaved.overdue(2000)), ["b1"]);
        assert_eq!(unsaved.teams(), [("A".to_string(), 1)]);
        assert_eq!(ids(&unsaved.drain()), ["a3"]);
        assert!(unsaved.is_empty() && unsaved.take("A", 5).is_empty());
    }

    #[test]
    fn a_full_team_or_keeping_turned_off_gives_the_receipt_back_to_be_written() {
        let unsaved = UnsavedReceipts::new(Duration::from_millis(1000), 2);
        assert!(unsaved.keep(receipt("A", "a1", 1)).is_none());
        assert!(unsaved.keep(receipt("A", "a2", 2)).is_none());
        let back = unsaved.keep(receipt("A", "a3", 3)).expect("the team is full");
        assert_eq!(back.event.apns_id, "a3");
        assert!(unsaved.keep(receipt("B", "b1", 3)).is_none(), "another team has room");
        let off = UnsavedReceipts::new(Duration::ZERO, 2);
        assert!(off.keep(receipt("A", "a1", 1)).is_some());
        assert!(off.is_empty());
    }
}
