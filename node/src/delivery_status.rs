//! Where each recent notification is, as its owning node saw it: the answer behind the provider API's
//! `GET /v1/status/{token}/{apns-id}` (a Courier extension; APNs has no such call).
//!
//! The owner records one entry per (device, apns-id) when `Deliver` disposes of a notification (stored;
//! accepted onto a live link without storing; dropped as discarded or unregistered), marks an earlier
//! stored notification dropped as `collapsed` when a newer one with the same collapse id replaces it, and
//! marks it delivered, with the time, when the device acks it. Expiry is decided when read: a stored
//! notification whose `apns-expiration` has passed unacked reads as expired.
//!
//! The log is memory only, bounded two ways: entries older than the retention window (default 24 h)
//! are evicted, and so are the oldest ones beyond the capacity (default 500,000 entries, about 250 bytes
//! each). A node restart forgets it. `delivery` writes it; the provider API's status call reads it.
//!
//! It is split into shards by device, each with its share of the capacity and its own lock: growing one
//! large table stalled every delivery on the node for the copy (p99 latency under load), and one lock was
//! taken by every push and every ack.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use courier_core::ids::{ApnsKey, FastMap};
use courier_core::webhook::{Event, EventKind, Packed, Receipted};
use courier_proto::cluster::{Notification, NotificationState, NotificationStatusResponse};

use crate::ids::DeviceId;

/// Default for how long entries are kept.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Default for how many entries are kept.
pub const DEFAULT_CAPACITY: usize = 500_000;
/// Most shards; a log with a capacity below this has one per entry it may hold.
const SHARDS: usize = 16;

#[derive(Debug, Clone)]
struct Entry {
    topic: String,
    collapse_id: String,
    /// When the entry was made; it is kept for the retention window from then.
    recorded_at_ms: u64,
    state: NotificationState,
    accepted_at_ms: u64,
    updated_at_ms: u64,
    delivered_at_ms: u64,
    expiration: u64,
    reason: &'static str,
    /// The team and device token of a notification sent on the link only, when the team gets receipts:
    /// its ack is told from here. (None for the others: an entry is kept for every push, and this was
    /// most of what receipts added to the log's memory. One allocation: a provider that sends everything
    /// with expiration 0 has one in every entry.)
    receipt: Option<Packed<2>>,
}

#[derive(Default)]
struct Log {
    entries: FastMap<(u128, ApnsKey), Entry>,
    /// Insertion order with insertion time, for eviction by age and by count.
    order: VecDeque<(u64, u128, ApnsKey)>,
    /// (device, topic, collapse id) → apns-id of the newest stored notification with that collapse id.
    collapse: FastMap<(u128, String, String), ApnsKey>,
}

/// The bounded, time-retained log of notification states on one node.
pub struct StatusLog {
    shards: Box<[Mutex<Log>]>,
    retention_ms: u64,
    /// Entries one shard keeps: the capacity shared out, rounded up.
    capacity: usize,
    /// Entries in all shards, for the gauge.
    entries: AtomicUsize,
}

impl Default for StatusLog {
    fn default() -> Self {
        StatusLog::new(DEFAULT_RETENTION, DEFAULT_CAPACITY)
    }
}

/// What the owner did with a notification, as far as the log is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Stored,
    /// Written to a live link, to be committed unless the device acks it first (ack-before-commit).
    Accepted,
    /// Written to a live link and never stored (expiration 0).
    Sent,
    Dropped(&'static str),
}

impl StatusLog {
    pub fn new(retention: Duration, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let shards = capacity.min(SHARDS);
        StatusLog {
            shards: (0..shards).map(|_| Mutex::new(Log::default())).collect(),
            retention_ms: retention.as_millis() as u64,
            capacity: capacity.div_ceil(shards),
            entries: AtomicUsize::new(0),
        }
    }

    /// The shard holding `device`'s entries, locked.
    fn lock(&self, device: DeviceId) -> std::sync::MutexGuard<'_, Log> {
        let folded = (device.0 as u64) ^ ((device.0 >> 64) as u64);
        let shard = &self.shards[(folded % self.shards.len() as u64) as usize];
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what the owner did with `notification` at `now_ms`. A provider's retry of an apns-id
    /// already logged for the device changes nothing, except that a notification accepted onto a live link
    /// becomes stored when it had to be committed before the device acked it. `apns_key` is the key of
    /// `notification.apns_id`, which the caller has made already.
    pub fn record(
        &self,
        device: DeviceId,
        apns_key: &ApnsKey,
        notification: &Notification,
        disposition: Disposition,
        now_ms: u64,
    ) {
        let mut log = self.lock(device);
        let key = (device.0, apns_key.clone());
        if let Some(entry) = log.entries.get_mut(&key) {
            if entry.state == NotificationState::Accepted && disposition == Disposition::Stored {
                entry.state = NotificationState::Stored;
                entry.updated_at_ms = now_ms;
                Self::collapse(&mut log, device, &key.1, notification, now_ms);
            }
            return;
        }
        let (state, reason) = match disposition {
            Disposition::Stored => (NotificationState::Stored, ""),
            Disposition::Accepted | Disposition::Sent => (NotificationState::Accepted, ""),
            Disposition::Dropped(reason) => (NotificationState::Dropped, reason),
        };
        if disposition == Disposition::Stored {
            Self::collapse(&mut log, device, &key.1, notification, now_ms);
        }
        let entry = Entry {
            topic: notification.topic.clone(),
            collapse_id: notification.collapse_id.clone(),
            recorded_at_ms: now_ms,
            state,
            accepted_at_ms: notification.accepted_at_ms,
            updated_at_ms: now_ms,
            delivered_at_ms: 0,
            expiration: notification.expiration,
            reason,
            receipt: (disposition == Disposition::Sent && !notification.team_id.is_empty())
                .then(|| Packed::new([&notification.team_id, &notification.token])),
        };
        log.order.push_back((now_ms, device.0, key.1.clone()));
        log.entries.insert(key, entry);
        // Counted under the shard's lock, so an entry is always counted before it can be evicted.
        self.entries.fetch_add(1, Ordering::Relaxed);
        let evicted = self.evict(&mut log, now_ms);
        let entries = self.entries.fetch_sub(evicted, Ordering::Relaxed) - evicted;
        drop(log);
        metrics::gauge!("courier_node_status_entries").set(entries as f64);
    }

    /// A stored notification with a collapse id replaces the device's earlier stored one with the same id.
    fn collapse(log: &mut Log, device: DeviceId, apns_key: &ApnsKey, notification: &Notification, now_ms: u64) {
        if notification.collapse_id.is_empty() {
            return;
        }
        let collapse_key = (device.0, notification.topic.clone(), notification.collapse_id.clone());
        if let Some(previous) = log.collapse.insert(collapse_key, apns_key.clone())
            && previous != *apns_key
            && let Some(old) = log.entries.get_mut(&(device.0, previous))
            && old.state == NotificationState::Stored
        {
            old.state = NotificationState::Dropped;
            old.reason = "collapsed";
            old.updated_at_ms = now_ms;
        }
    }

    /// The device acked `apns_id` at `now_ms`. Returns the `delivered` receipt of one sent on the link only
    /// (`Disposition::Sent`) when its team gets receipts: a stored one's comes from the store's delete, and
    /// one acked before its commit has its receipt made by the task that wrote it to the link. `apns_key`
    /// is the key of `apns_id`, which the caller has made already.
    pub fn delivered(&self, device: DeviceId, apns_id: &str, apns_key: &ApnsKey, now_ms: u64) -> Option<Event> {
        let mut log = self.lock(device);
        let entry = log.entries.get_mut(&(device.0, apns_key.clone()))?;
        if entry.state == NotificationState::Delivered {
            return None;
        }
        let unstored = entry.state == NotificationState::Accepted;
        entry.state = NotificationState::Delivered;
        entry.reason = "";
        entry.delivered_at_ms = now_ms;
        entry.updated_at_ms = now_ms;
        let [team_id, token] = entry.receipt.as_ref().filter(|_| unstored)?.parts();
        let of = Receipted { team_id, apns_id, token, topic: &entry.topic, accepted_at_ms: entry.accepted_at_ms };
        Some(Event::new(EventKind::Delivered, of, None, now_ms))
    }

    /// The state of `apns_id` for `device` as of `now_ms`.
    pub fn get(&self, device: DeviceId, apns_id: &str, now_ms: u64) -> NotificationStatusResponse {
        let log = self.lock(device);
        let Some(entry) = log.entries.get(&(device.0, ApnsKey::of(apns_id))) else {
            return NotificationStatusResponse::default();
        };
        if entry.recorded_at_ms.saturating_add(self.retention_ms) < now_ms {
            return NotificationStatusResponse::default();
        }
        let mut state = entry.state;
        let mut updated_at_ms = entry.updated_at_ms;
        let expired_at_ms = entry.expiration.saturating_mul(1000);
        if state == NotificationState::Stored && entry.expiration != 0 && expired_at_ms <= now_ms {
            state = NotificationState::Expired;
            updated_at_ms = expired_at_ms.max(entry.updated_at_ms);
        }
        NotificationStatusResponse {
            found: true,
            state: state as i32,
            topic: entry.topic.clone(),
            accepted_at_ms: entry.accepted_at_ms,
            updated_at_ms,
            delivered_at_ms: entry.delivered_at_ms,
            expiration: entry.expiration,
            reason: entry.reason.to_string(),
        }
    }

    /// Drops a shard's entries past the retention window or beyond its capacity; how many went.
    fn evict(&self, log: &mut Log, now_ms: u64) -> usize {
        let mut evicted = 0;
        while let Some((at, _, _)) = log.order.front() {
            let too_old = at.saturating_add(self.retention_ms) < now_ms;
            if !too_old && log.entries.len() <= self.capacity {
                break;
            }
            let Some((_, device, apns_key)) = log.order.pop_front() else { break };
            let Some(((_, apns_key), entry)) = log.entries.remove_entry(&(device, apns_key)) else { continue };
            evicted += 1;
            if !entry.collapse_id.is_empty() {
                let key = (device, entry.topic, entry.collapse_id);
                if log.collapse.get(&key) == Some(&apns_key) {
                    log.collapse.remove(&key);
                }
            }
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(apns_id: &str, collapse: &str, expiration: u64) -> Notification {
        Notification {
            device_id: DeviceId(1).to_bytes().to_vec(),
            topic: "com.example.app".into(),
            apns_id: apns_id.into(),
            collapse_id: collapse.into(),
            expiration,
            accepted_at_ms: 1_000,
            ..Notification::default()
        }
    }

    fn record(log: &StatusLog, device: DeviceId, notification: &Notification, disposition: Disposition, now: u64) {
        log.record(device, &ApnsKey::of(&notification.apns_id), notification, disposition, now);
    }

    fn delivered(log: &StatusLog, device: DeviceId, apns_id: &str, now: u64) -> Option<Event> {
        log.delivered(device, apns_id, &ApnsKey::of(apns_id), now)
    }

    fn state(log: &StatusLog, apns_id: &str, now: u64) -> (Option<NotificationState>, String) {
        let status = log.get(DeviceId(1), apns_id, now);
        (status.found.then(|| NotificationState::try_from(status.state).unwrap()), status.reason)
    }

    #[test]
    fn stored_delivered_collapsed_expired_dropped() {
        let log = StatusLog::new(Duration::from_secs(3600), 100);
        let later = 1_000;
        record(&log, DeviceId(1), &notification("a", "", later), Disposition::Stored, 1_000);
        assert_eq!(state(&log, "a", 2_000).0, Some(NotificationState::Stored));
        delivered(&log, DeviceId(1), "a", 3_000);
        let status = log.get(DeviceId(1), "a", 4_000);
        assert_eq!(status.state, NotificationState::Delivered as i32);
        assert_eq!(status.delivered_at_ms, 3_000);

        record(&log, DeviceId(1), &notification("b", "score", later), Disposition::Stored, 1_000);
        record(&log, DeviceId(1), &notification("c", "score", later), Disposition::Stored, 1_100);
        assert_eq!(state(&log, "b", 2_000), (Some(NotificationState::Dropped), "collapsed".into()));
        assert_eq!(state(&log, "c", 2_000).0, Some(NotificationState::Stored));
        // Past its expiration (seconds) and never acked.
        assert_eq!(state(&log, "c", later * 1000 + 1).0, Some(NotificationState::Expired));

        record(&log, DeviceId(1), &notification("d", "", 0), Disposition::Dropped("discarded"), 1_000);
        assert_eq!(state(&log, "d", 2_000), (Some(NotificationState::Dropped), "discarded".into()));
        assert_eq!(state(&log, "nope", 2_000).0, None);
        // A retry of a logged apns-id changes nothing.
        record(&log, DeviceId(1), &notification("a", "", later), Disposition::Stored, 5_000);
        assert_eq!(state(&log, "a", 6_000).0, Some(NotificationState::Delivered));
    }

    #[test]
    fn an_accepted_notification_becomes_stored_or_delivered() {
        let log = StatusLog::new(Duration::from_secs(3600), 100);
        record(&log, DeviceId(1), &notification("a", "", 9_999), Disposition::Accepted, 1_000);
        assert_eq!(state(&log, "a", 1_500).0, Some(NotificationState::Accepted));
        record(&log, DeviceId(1), &notification("a", "", 9_999), Disposition::Stored, 2_000);
        let status = log.get(DeviceId(1), "a", 2_500);
        assert_eq!((status.state, status.updated_at_ms), (NotificationState::Stored as i32, 2_000));
        record(&log, DeviceId(1), &notification("b", "", 9_999), Disposition::Accepted, 3_000);
        delivered(&log, DeviceId(1), "b", 3_100);
        // A later commit of a notification already acked does not turn it back.
        record(&log, DeviceId(1), &notification("b", "", 9_999), Disposition::Stored, 3_200);
        assert_eq!(state(&log, "b", 4_000).0, Some(NotificationState::Delivered));
    }

    #[test]
    fn an_ack_of_one_sent_on_the_link_only_gives_its_receipt() {
        let log = StatusLog::new(Duration::from_secs(3600), 100);
        let of_team = |apns_id| Notification {
            team_id: "TEAM1".into(),
            token: "ab12".into(),
            ..notification(apns_id, "", 9_999)
        };
        record(&log, DeviceId(1), &of_team("a"), Disposition::Sent, 1_000);
        record(&log, DeviceId(1), &of_team("b"), Disposition::Accepted, 1_000);
        record(&log, DeviceId(1), &of_team("c"), Disposition::Stored, 1_000);
        assert_eq!(state(&log, "a", 1_500).0, Some(NotificationState::Accepted));
        let receipt = delivered(&log, DeviceId(1), "a", 2_000).expect("a receipt");
        assert_eq!(
            (receipt.team_id.as_str(), receipt.token.as_str(), receipt.apns_id.as_str()),
            ("TEAM1", "ab12", "a")
        );
        assert_eq!(
            (receipt.topic.as_str(), receipt.accepted_at_ms, receipt.delivered_at_ms),
            ("com.example.app", 1_000, Some(2_000))
        );
        // Acked before its commit: the task that wrote it to the link makes the receipt, not the log; the
        // ack is logged all the same.
        assert!(delivered(&log, DeviceId(1), "b", 2_000).is_none());
        assert_eq!(state(&log, "b", 2_500).0, Some(NotificationState::Delivered));
        // A stored one's receipt comes from the store's delete; an ack seen twice gives one receipt.
        assert!(delivered(&log, DeviceId(1), "c", 2_000).is_none());
        assert!(delivered(&log, DeviceId(1), "a", 2_100).is_none());
        // A team without receipts: none.
        record(&log, DeviceId(1), &notification("d", "", 9_999), Disposition::Sent, 1_000);
        assert!(delivered(&log, DeviceId(1), "d", 2_000).is_none());
    }

    #[test]
    fn entries_are_found_by_their_uuid_in_either_case_and_others_by_their_text() {
        let id = "6E8B3C1A-9F2D-4B7E-A1C3-5D6E7F809A1B";
        let log = StatusLog::new(Duration::from_secs(3600), 100);
        record(&log, DeviceId(1), &notification(id, "", 9_999), Disposition::Stored, 1_000);
        record(&log, DeviceId(1), &notification("not-a-uuid", "", 9_999), Disposition::Stored, 1_000);
        assert_eq!(state(&log, &id.to_lowercase(), 1_500).0, Some(NotificationState::Stored));
        assert_eq!(state(&log, "not-a-uuid", 1_500).0, Some(NotificationState::Stored));
        assert_eq!(state(&log, "NOT-A-UUID", 1_500).0, None);
        assert_eq!(state(&log, "6E8B3C1A-9F2D-4B7E-A1C3-5D6E7F809A1C", 1_500).0, None);
        delivered(&log, DeviceId(1), &id.to_lowercase(), 2_000);
        assert_eq!(state(&log, id, 2_500).0, Some(NotificationState::Delivered));
        // Collapsing and eviction find the keyed entries too.
        let (a, b) = ("00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b");
        record(&log, DeviceId(1), &notification(a, "score", 9_999), Disposition::Stored, 1_000);
        record(&log, DeviceId(1), &notification(b, "score", 9_999), Disposition::Stored, 1_100);
        assert_eq!(state(&log, a, 1_500), (Some(NotificationState::Dropped), "collapsed".into()));
        record(&log, DeviceId(1), &notification("late", "", 9_999), Disposition::Stored, 3_601_050);
        // The three recorded at 1,000 went (b, at 1,100, is not a retention window old yet).
        assert_eq!(log.entries.load(Ordering::Relaxed), 2, "evicted by age");
        assert_eq!(state(&log, "late", 3_601_060).0, Some(NotificationState::Stored));
    }

    #[test]
    fn the_capacity_bounds_entries_across_shards() {
        let log = StatusLog::new(Duration::from_secs(3600), 160);
        let mut n = notification("x", "", 0);
        for device in 0..2_000u128 {
            n.apns_id = format!("id-{device}");
            n.device_id = DeviceId(device * 0x9e37_79b9_7f4a_7c15).to_bytes().to_vec();
            record(&log, DeviceId(device * 0x9e37_79b9_7f4a_7c15), &n, Disposition::Accepted, 1_000);
        }
        let kept = (0..2_000u128)
            .filter(|device| log.get(DeviceId(device * 0x9e37_79b9_7f4a_7c15), &format!("id-{device}"), 1_000).found)
            .count();
        // Each of the 16 shards keeps its sixteenth of the capacity (10), and no more.
        assert!(kept <= 160, "{kept} entries kept");
        assert!(kept >= 120, "{kept} entries kept: shards should fill evenly");
        assert_eq!(log.entries.load(Ordering::Relaxed), kept);
        // The newest survive.
        assert!(log.get(DeviceId(1_999 * 0x9e37_79b9_7f4a_7c15), "id-1999", 1_000).found);
    }

    #[test]
    fn entries_are_bounded_by_count_and_age() {
        let log = StatusLog::new(Duration::from_secs(10), 3);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            record(&log, DeviceId(1), &notification(id, "", 0), Disposition::Accepted, 1_000 + i as u64);
        }
        assert_eq!(state(&log, "a", 2_000).0, None, "the oldest beyond capacity is gone");
        assert_eq!(state(&log, "d", 2_000).0, Some(NotificationState::Accepted));
        record(&log, DeviceId(1), &notification("e", "", 0), Disposition::Accepted, 60_000);
        assert_eq!(state(&log, "b", 60_000).0, None, "older than the retention window");
        assert_eq!(state(&log, "d", 60_000).0, None);
        assert_eq!(state(&log, "e", 60_000).0, Some(NotificationState::Accepted));
    }
}
