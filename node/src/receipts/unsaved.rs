//! Receipts not written yet: the `delivered` receipts of notifications acked before any commit (and of
//! ones with expiration 0, answered when handed to the link), which nothing stored. The owner keeps them in
//! memory and its team's task sends them from there. The device's copy holders (its first R − 1
//! successors, `Replicator::copy_holders`) are sent a copy in the next replication batch, at once or, with
//! `copy_after` (`--webhook-copy-after-ms`, default 0), only if the endpoint has not taken the receipt by
//! then; they keep it in memory too, until the owner says the endpoint took it (or they become the
//! device's owner, and send it). Only a receipt not taken within
//! `save_after` of its outcome, or refused by the endpoint, is written: queued on the owner, held in the
//! store by the others, as every other receipt is at once. So on a healthy endpoint most receipts never
//! cost a write, and the owner's death loses only those decided in its last replication batch (and, with
//! `copy_after`, those of its last `copy_after` the endpoint had not taken); once copied, losing one takes
//! the owner and its copy holders dying within `save_after`.
//!
//! Copies are numbered by their owner, and released by number: a holder keeps them by (owner, number),
//! so neither side formats, sends or hashes the event's id for the copy and its release, and the copier
//! sends every copy due in one message per holder. Numbers start from the owner's start time shifted
//! left by 20 bits, so a restarted owner never gives a number a holder may still keep from before.
//!
//! Whoever takes a receipt out of here owns it: the team's task while it sends it (and copies it if the
//! request outlasts `copy_after`, and writes it if the request fails), the sweep when it is overdue, the
//! adoption when this node now owns its device. Each side holds at most `cap` (per team on the owner, in all
//! on a holder); more are written at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_core::ids::FastMap;
use courier_core::webhook::Event;

use crate::ids::{DeviceId, unix_millis};
use crate::raft::state::NodeId;
use crate::replication::{ReceiptCopy, Replicator};
use crate::store::Store;

/// Beyond `save_after` and the sweep's interval, how long after its outcome a receipt kept here may still
/// be on its way to the store or the holders (a last request running over, a group commit under load).
const SAFE_MARGIN: Duration = Duration::from_secs(2);

/// Most unsaved receipts one team may have waiting on a node unless configured otherwise.
pub const DEFAULT_CAP_PER_TEAM: usize = 100_000;

/// One receipt kept in memory.
#[derive(Debug, Clone)]
pub struct Unsaved {
    pub device: DeviceId,
    pub event: Event,
    /// The copy the device's copy holders were sent, if they were (they must be told when it is
    /// released).
    pub copy: Option<Copied>,
    /// The gateway that forwarded the push keeps a copy instead of the holders (`ForwardBatch`'s
    /// `holds_receipts`): the receipt is never copied to them.
    pub held_by_sender: bool,
}

/// What a receipt's holders were sent: the copy's number, the event as JSON (which the batch body reuses
/// rather than serializing the event again), and who they are (its release goes to them).
#[derive(Debug, Clone, PartialEq)]
pub struct Copied {
    pub number: u64,
    pub json: Bytes,
    pub holders: Vec<NodeId>,
}

impl Copied {
    fn of(copy: &ReceiptCopy) -> Self {
        Copied { number: copy.number, json: copy.json.clone(), holders: copy.holders.clone() }
    }
}

impl Unsaved {
    /// A receipt not copied yet.
    pub fn new(device: DeviceId, event: Event) -> Self {
        Unsaved { device, event, copy: None, held_by_sender: false }
    }

    /// A receipt whose copy the gateway that forwarded its push keeps: never copied to the holders.
    pub fn held_by_sender(device: DeviceId, event: Event) -> Self {
        Unsaved { held_by_sender: true, ..Unsaved::new(device, event) }
    }

    /// Whether the device's copy holders must still be sent a copy.
    pub fn needs_copy(&self) -> bool {
        self.copy.is_none() && !self.held_by_sender
    }
}

/// A team's unsaved receipts, oldest first. The first `copied` have been copied to their holders: copies
/// are made oldest first and receipts leave from the front, so the copied ones are always a prefix.
#[derive(Debug, Default)]
struct TeamQueue {
    receipts: VecDeque<Unsaved>,
    copied: usize,
    /// Woken when the queue reaches a full batch, so that the team's task sends it at once rather than at
    /// its next look.
    filled: Arc<tokio::sync::Notify>,
}

impl TeamQueue {
    fn pop_front(&mut self) -> Option<Unsaved> {
        let receipt = self.receipts.pop_front()?;
        self.copied = self.copied.saturating_sub(1);
        Some(receipt)
    }
}

/// The unsaved receipts of every team this node owns devices for, oldest first, and the copies it holds
/// for other owners.
#[derive(Debug)]
pub struct UnsavedReceipts {
    save_after: Duration,
    copy_after: Duration,
    cap: usize,
    /// A full batch (`ReceiptSettings::batch_max`): reaching it wakes the team's task.
    batch_max: usize,
    teams: Mutex<HashMap<String, TeamQueue>>,
    held: Mutex<Held>,
    /// When this node process started (UNIX ms): what it keeps here began then.
    started_ms: u64,
    /// The next copy's number.
    next_copy: AtomicU64,
    /// Woken when a team without a queue here gets a receipt, so that its task starts.
    arrived: tokio::sync::Notify,
    /// Woken when a team's first receipt not copied yet arrives, so that the copier looks at its time.
    uncopied: tokio::sync::Notify,
}

/// Copies held for other owners (the event's JSON as it came, parsed only if it is written or taken over),
/// by owner and number, with the order they came in. Each is looked up three times (held, released, swept),
/// by a key of two integers from a cluster peer: a fast hash, not SipHash.
#[derive(Debug, Default)]
struct Held {
    copies: FastMap<(NodeId, u64), (DeviceId, Bytes)>,
    /// (when it came, UNIX ms; owner; number), oldest first; released ones are skipped when met.
    arrivals: VecDeque<(u64, NodeId, u64)>,
}

impl UnsavedReceipts {
    /// Keeps receipts up to `save_after` (zero: none is kept, each is written at once), and copies them to
    /// their holders after `copy_after` (zero: at once).
    pub fn new(save_after: Duration, copy_after: Duration, cap: usize) -> Self {
        UnsavedReceipts {
            save_after,
            copy_after,
            cap,
            batch_max: usize::MAX,
            teams: Mutex::new(HashMap::new()),
            held: Mutex::new(Held::default()),
            started_ms: unix_millis(),
            next_copy: AtomicU64::new(unix_millis() << 20),
            arrived: tokio::sync::Notify::new(),
            uncopied: tokio::sync::Notify::new(),
        }
    }

    /// Wakes a team's task (`filled`) when `batch_max` are waiting.
    pub fn with_batch_max(self, batch_max: usize) -> Self {
        UnsavedReceipts { batch_max: batch_max.max(1), ..self }
    }

    pub fn save_after(&self) -> Duration {
        self.save_after
    }

    pub fn copy_after(&self) -> Duration {
        self.copy_after
    }

    /// When this node process started (UNIX ms), for gateways that keep receipt copies: a change tells
    /// them the receipts kept here were lost.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// The time before which every receipt this node decided and kept here has been taken by its endpoint
    /// or written, by `now_ms` (`ForwardResults.receipts_safe_before_ms`): one is taken out by its team's
    /// task or the sweep within `save_after` of its outcome (the sweep looks every quarter of it, a request
    /// of unsaved receipts may run `UNSAVED_MIN_TIMEOUT` past it), and written in the next group commit;
    /// `SAFE_MARGIN` covers the rest.
    pub fn safe_before_ms(&self, now_ms: u64) -> u64 {
        let after = self.save_after + self.save_after / 4 + SAFE_MARGIN;
        now_ms.saturating_sub(after.as_millis() as u64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TeamQueue>> {
        self.teams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers `receipt` for its copy and gives the copy, for the holders `holders_of` names for its
    /// device, unless it was copied already.
    fn copy_of(&self, receipt: &Unsaved, holders_of: &impl Fn(DeviceId) -> Vec<NodeId>) -> Option<ReceiptCopy> {
        if !receipt.needs_copy() {
            return None;
        }
        let json = Bytes::from(receipt.event.to_json());
        let number = self.next_copy.fetch_add(1, Ordering::Relaxed);
        Some(ReceiptCopy { number, device: receipt.device, json, holders: holders_of(receipt.device) })
    }

    /// Keeps `receipt` for its team's task; gives it back when it must be written now instead (keeping
    /// is off, or the team has `cap` waiting).
    #[must_use = "a receipt given back must be written"]
    pub fn keep(&self, receipt: Unsaved) -> Option<Unsaved> {
        if self.save_after.is_zero() {
            return Some(receipt);
        }
        let mut teams = self.lock();
        // Looked up before it is entered, so that the team's name is copied only for its first receipt.
        let first = !teams.contains_key(&receipt.event.team_id);
        if first {
            teams.insert(receipt.event.team_id.clone(), TeamQueue::default());
        }
        let Some(queue) = teams.get_mut(&receipt.event.team_id) else { return Some(receipt) };
        if queue.receipts.len() >= self.cap {
            return Some(receipt);
        }
        let first_uncopied = receipt.needs_copy() && queue.copied == queue.receipts.len();
        if !receipt.needs_copy() && queue.copied == queue.receipts.len() {
            queue.copied += 1;
        }
        queue.receipts.push_back(receipt);
        if queue.receipts.len() == self.batch_max {
            queue.filled.notify_one();
        }
        drop(teams);
        if first {
            self.arrived.notify_one();
        }
        if first_uncopied {
            self.uncopied.notify_one();
        }
        None
    }

    /// Numbers the receipts kept `copy_after` or longer before `now_ms` and not copied yet, and gives their
    /// copies (for the holders `holders_of` names); with the time the next one is due (UNIX ms), if any is
    /// waiting.
    pub fn copies_due(
        &self,
        now_ms: u64,
        holders_of: impl Fn(DeviceId) -> Vec<NodeId>,
    ) -> (Vec<ReceiptCopy>, Option<u64>) {
        let after_ms = self.copy_after.as_millis() as u64;
        let mut copies = Vec::new();
        let mut next_ms: Option<u64> = None;
        for queue in self.lock().values_mut() {
            while let Some(receipt) = queue.receipts.get_mut(queue.copied) {
                if !receipt.needs_copy() {
                    queue.copied += 1;
                    continue;
                }
                let due_ms = receipt.event.at_ms.saturating_add(after_ms);
                if due_ms > now_ms {
                    next_ms = Some(next_ms.map_or(due_ms, |n| n.min(due_ms)));
                    break;
                }
                if let Some(copy) = self.copy_of(receipt, &holders_of) {
                    receipt.copy = Some(Copied::of(&copy));
                    copies.push(copy);
                }
                queue.copied += 1;
            }
        }
        (copies, next_ms)
    }

    /// Numbers those of `receipts` not copied yet and gives their copies (for the holders `holders_of`
    /// names), each with its receipt's index; the caller sends them (`send`) and marks the receipts
    /// (`mark_copied`).
    pub fn copies_of(
        &self,
        receipts: &[Unsaved],
        holders_of: impl Fn(DeviceId) -> Vec<NodeId>,
    ) -> Vec<(usize, ReceiptCopy)> {
        receipts.iter().enumerate().filter_map(|(i, r)| Some((i, self.copy_of(r, &holders_of)?))).collect()
    }

    /// Resolves when a receipt not copied yet arrives where none was waiting to be copied.
    pub async fn uncopied(&self) {
        self.uncopied.notified().await
    }

    /// Resolves when a team that had no queue here gets one. A queue emptied by `take` stays (its team's
    /// task is running, and takes what comes next) until `overdue` clears out empty ones.
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }

    /// Teams with receipts waiting here, and how many each has.
    pub fn teams(&self) -> Vec<(String, usize)> {
        self.lock()
            .iter()
            .filter(|(_, q)| !q.receipts.is_empty())
            .map(|(team, q)| (team.clone(), q.receipts.len()))
            .collect()
    }

    /// Resolves once `team` has a full batch waiting (at once if it filled since the last call).
    pub fn filled(&self, team: &str) -> impl Future<Output = ()> + use<> {
        let filled = self.lock().get(team).map(|queue| queue.filled.clone());
        async move {
            match filled {
                Some(filled) => filled.notified().await,
                None => std::future::pending().await,
            }
        }
    }

    /// How many the team has waiting, and when its oldest was decided (UNIX ms).
    pub fn waiting(&self, team: &str) -> (usize, Option<u64>) {
        self.lock().get(team).map_or((0, None), |q| (q.receipts.len(), q.receipts.front().map(|r| r.event.at_ms)))
    }

    /// Takes the team's oldest `max`; the caller now owns them.
    pub fn take(&self, team: &str, max: usize) -> Vec<Unsaved> {
        let mut teams = self.lock();
        let Some(queue) = teams.get_mut(team) else { return Vec::new() };
        let n = max.min(queue.receipts.len());
        let taken: Vec<Unsaved> = queue.receipts.drain(..n).collect();
        queue.copied = queue.copied.saturating_sub(n);
        taken
    }

    /// Takes every receipt decided `save_after` or longer before `now_ms`, of every team, and drops the
    /// queues left empty.
    pub fn overdue(&self, now_ms: u64) -> Vec<Unsaved> {
        let due_before = now_ms.saturating_sub(self.save_after.as_millis() as u64);
        let mut teams = self.lock();
        let mut taken = Vec::new();
        teams.retain(|_, queue| {
            while queue.receipts.front().is_some_and(|r| r.event.at_ms <= due_before) {
                taken.extend(queue.pop_front());
            }
            !queue.receipts.is_empty()
        });
        taken
    }

    /// Takes all of them (the node is stopping).
    pub fn drain(&self) -> Vec<Unsaved> {
        self.lock().drain().flat_map(|(_, queue)| queue.receipts).collect()
    }

    /// How many are waiting, all teams.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().values().map(|q| q.receipts.len()).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds the unsaved copies owner `from` sent (number, device, event as JSON); gives back those that
    /// must be written now instead (keeping is off, or `cap` are held).
    #[must_use = "copies given back must be written"]
    pub fn hold(&self, from: NodeId, copies: Vec<ReceiptCopy>, now_ms: u64) -> Vec<(DeviceId, Bytes)> {
        let mut held = self.lock_held();
        let mut back = Vec::new();
        for ReceiptCopy { number, device, json, .. } in copies {
            if self.save_after.is_zero() || held.copies.len() >= self.cap {
                back.push((device, json));
                continue;
            }
            held.arrivals.push_back((now_ms, from, number));
            held.copies.insert((from, number), (device, json));
        }
        back
    }

    /// Drops the copies owner `from` numbered `numbers` (its endpoint took them, or it wrote them); numbers
    /// not held here are ignored.
    pub fn release(&self, from: NodeId, numbers: &[u64]) {
        let mut held = self.lock_held();
        for number in numbers {
            held.copies.remove(&(from, *number));
        }
    }

    /// Takes the held copies that came `save_after` or longer before `now_ms`.
    pub fn held_overdue(&self, now_ms: u64) -> Vec<(DeviceId, Event)> {
        let due_before = now_ms.saturating_sub(self.save_after.as_millis() as u64);
        let mut held = self.lock_held();
        let mut taken = Vec::new();
        while held.arrivals.front().is_some_and(|(at, ..)| *at <= due_before) {
            let Some((_, from, number)) = held.arrivals.pop_front() else { break };
            if let Some((device, json)) = held.copies.remove(&(from, number)) {
                taken.extend(parsed(device, &json));
            }
        }
        if held.copies.is_empty() {
            held.arrivals.clear();
        }
        taken
    }

    /// Takes the held copies of the devices `owned` says this node now owns.
    pub fn adopt(&self, owned: impl Fn(DeviceId) -> bool) -> Vec<(DeviceId, Event)> {
        let mut held = self.lock_held();
        let mut taken = Vec::new();
        held.copies.retain(|_, (device, json)| {
            if !owned(*device) {
                return true;
            }
            taken.extend(parsed(*device, json));
            false
        });
        taken
    }

    /// Takes every held copy (the node is stopping).
    pub fn drain_held(&self) -> Vec<(DeviceId, Event)> {
        let mut held = self.lock_held();
        held.arrivals.clear();
        held.copies.drain().filter_map(|(_, (device, json))| parsed(device, &json)).collect()
    }

    /// How many copies are held here.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.lock_held().copies.len()
    }
}

/// A held copy's event; one that does not parse is dropped and counted (`unreadable`).
pub fn parsed(device: DeviceId, json: &[u8]) -> Option<(DeviceId, Event)> {
    match serde_json::from_slice::<Event>(json) {
        Ok(event) => Some((device, event)),
        Err(_) => {
            metrics::counter!("courier_webhook_events_total", "outcome" => "unreadable").increment(1);
            None
        }
    }
}

/// Sends the holders copies `copies_of` numbered; gives each one's receipt index and what was sent, for
/// `mark_copied`.
pub fn send_numbered(replicator: &Replicator, copies: Vec<(usize, ReceiptCopy)>) -> Vec<(usize, Copied)> {
    let marks = copies.iter().map(|(i, copy)| (*i, Copied::of(copy))).collect();
    send(replicator, copies.into_iter().map(|(_, copy)| copy).collect());
    marks
}

/// Marks the receipts `send_numbered` copied.
pub fn mark_copied(receipts: &mut [Unsaved], marks: &[(usize, Copied)]) {
    for (i, copied) in marks {
        if let Some(receipt) = receipts.get_mut(*i) {
            receipt.copy = Some(copied.clone());
        }
    }
}

/// Tells the holders of those of `receipts` that were copied to drop their copies.
pub fn release(replicator: &Replicator, receipts: &[Unsaved]) {
    replicator.release_copies(receipts.iter().filter_map(|r| r.copy.as_ref().map(|c| (&c.holders[..], c.number))));
}

/// Sends the holders these copies, to keep unsaved; counted as `copied`.
pub fn send(replicator: &Replicator, copies: Vec<ReceiptCopy>) {
    if copies.is_empty() {
        return;
    }
    // With R = 1 (or every other candidate skipped) a copy has no holder to go to.
    let sent = copies.iter().filter(|c| !c.holders.is_empty()).count();
    metrics::counter!("courier_webhook_events_total", "outcome" => "copied").increment(sent as u64);
    replicator.copy_unsaved(copies);
}

/// For receipts written here rather than kept in memory (or no longer): the holders drop the unsaved
/// copies they were sent and are sent copies to write instead (the JSON they were sent, when there is
/// one), so that a later release by event id (`Replicator::release_receipts`, when the written receipt is
/// sent) finds them. Gives the receipts to write.
fn held_in_stores(replicator: &Replicator, receipts: Vec<Unsaved>) -> Vec<(DeviceId, Event)> {
    release(replicator, &receipts);
    receipts
        .into_iter()
        .map(|Unsaved { device, event, copy, .. }| {
            let json = match copy {
                Some(copied) => copied.json.to_vec(),
                None => event.to_json(),
            };
            replicator.hold_receipt_later(device, event.id.clone(), json);
            (device, event)
        })
        .collect()
}

/// Queues receipts that waited unsaved and were not taken here (in the next group commit), without
/// waiting; counted as `saved`. The other holders are told to write their copies too.
pub fn save_late(store: &Store, replicator: &Replicator, receipts: Vec<Unsaved>) {
    if receipts.is_empty() {
        return;
    }
    metrics::counter!("courier_webhook_events_total", "outcome" => "saved").increment(receipts.len() as u64);
    store.queue_receipts(held_in_stores(replicator, receipts));
}

/// `save_late` for the receipts left when the node stops, awaited; counted as `saved`.
pub async fn save_at_stop(store: &Store, replicator: &Replicator, receipts: Vec<Unsaved>) {
    if receipts.is_empty() {
        return;
    }
    metrics::counter!("courier_webhook_events_total", "outcome" => "saved").increment(receipts.len() as u64);
    let receipts = held_in_stores(replicator, receipts);
    if let Err(error) = store.keep_receipts(receipts, crate::store::ReceiptRole::Queue).await {
        tracing::error!(%error, "writing unsaved receipts at shutdown failed");
    }
}

/// Keeps a receipt decided with nothing stored, without waiting for any write: unsaved here, and copied
/// to the device's copy holders by the copier once it is `copy_after` old (at its next turn when that is
/// zero); or, when keeping is off or full, queued here and copied to the holders' stores in the next group
/// commit and replication batch.
pub fn keep(unsaved: &UnsavedReceipts, store: &Store, replicator: &Replicator, receipt: Unsaved) -> bool {
    match unsaved.keep(receipt) {
        Some(receipt) => {
            store.queue_receipts(held_in_stores(replicator, vec![receipt]));
            false
        }
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::webhook::{EventKind, Receipted};

    fn receipt(team: &str, apns_id: &str, at_ms: u64) -> Unsaved {
        let of = Receipted { team_id: team, apns_id, token: "t", topic: "com.example", accepted_at_ms: at_ms };
        Unsaved::new(DeviceId(7), Event::new(EventKind::Delivered, of, None, at_ms))
    }

    fn ids(receipts: &[Unsaved]) -> Vec<&str> {
        receipts.iter().map(|r| r.event.apns_id.as_str()).collect()
    }

    /// Whether a wait (`arrived`, `filled`) is over: polled once, without a runtime.
    fn woken(wait: std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
        wait.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())).is_ready()
    }

    #[test]
    fn a_team_s_task_is_woken_when_a_full_batch_waits_and_not_before() {
        let unsaved = UnsavedReceipts::new(Duration::from_millis(1000), Duration::ZERO, 10).with_batch_max(3);
        let mut nothing_yet = std::pin::pin!(unsaved.filled("A"));
        assert!(!woken(nothing_yet.as_mut()), "no queue for A yet");
        assert!(unsaved.keep(receipt("A", "a1", 100)).is_none());
        assert!(unsaved.keep(receipt("B", "b1", 100)).is_none());
        assert!(unsaved.keep(receipt("A", "a2", 110)).is_none());
        let mut filled = std::pin::pin!(unsaved.filled("A"));
        assert!(!woken(filled.as_mut()), "two of three");
        assert!(unsaved.keep(receipt("A", "a3", 120)).is_none());
        assert!(woken(filled.as_mut()), "the third fills A's batch");
        assert!(unsaved.keep(receipt("A", "a4", 130)).is_none());
        assert!(!woken(std::pin::pin!(unsaved.filled("A")).as_mut()), "past a full batch, no second wake-up");
        assert!(!woken(std::pin::pin!(unsaved.filled("B")).as_mut()), "B's one does not fill B's");
        assert_eq!(ids(&unsaved.take("A", 3)), ["a1", "a2", "a3"]);
        for (id, at) in [("a5", 140), ("a6", 150)] {
            assert!(unsaved.keep(receipt("A", id, at)).is_none());
        }
        assert!(woken(std::pin::pin!(unsaved.filled("A")).as_mut()), "filled again after its task took one");
    }

    #[test]
    fn a_team_queue_emptied_by_its_task_stays_until_the_sweep_so_its_next_receipt_wakes_nobody() {
        let unsaved = UnsavedReceipts::new(Duration::from_millis(1000), Duration::from_millis(25), 10);
        let mut arrived = std::pin::pin!(unsaved.arrived());
        assert!(unsaved.keep(receipt("A", "a1", 100)).is_none());
        assert!(woken(arrived.as_mut()), "A's first receipt starts its task");
        assert_eq!(ids(&unsaved.take("A", 5)), ["a1"]);
        assert!(unsaved.teams().is_empty(), "nothing waits");
        let mut arrived = std::pin::pin!(unsaved.arrived());
        assert!(unsaved.keep(receipt("A", "a2", 150)).is_none());
        assert!(!woken(arrived.as_mut()), "A's task is running: no wake-up");
        assert_eq!(ids(&unsaved.take("A", 5)), ["a2"]);
        assert!(unsaved.overdue(200).is_empty(), "the sweep drops the empty queue");
        assert!(unsaved.keep(receipt("A", "a3", 250)).is_none());
        assert!(woken(arrived.as_mut()), "after the sweep, the next receipt wakes the dispatcher again");
    }

    #[test]
    fn kept_receipts_are_taken_in_order_per_team_and_only_overdue_ones_are_swept() {
        let unsaved = UnsavedReceipts::new(Duration::from_millis(1000), Duration::from_millis(25), 10);
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
    fn held_copies_are_released_by_owner_and_number_swept_when_overdue_or_adopted_by_their_new_owner() {
        let unsaved = UnsavedReceipts::new(Duration::from_millis(1000), Duration::from_millis(25), 4);
        let copy = |number: u64, device: u128, apns_id: &str| {
            let json = serde_json::to_vec(&receipt("A", apns_id, 0).event).expect("json");
            ReceiptCopy { number, device: DeviceId(device), json: json.into(), holders: Vec::new() }
        };
        // Owners 1 and 2 both number from 7: the same number from two owners is two copies.
        assert!(unsaved.hold(1, vec![copy(7, 1, "r1"), copy(8, 2, "r2")], 100).is_empty());
        assert!(unsaved.hold(2, vec![copy(7, 1, "r3")], 900).is_empty());
        let back = unsaved.hold(1, vec![copy(9, 3, "r4"), copy(10, 3, "r5")], 950);
        assert_eq!(back.len(), 1, "the fifth is past the cap: written at once");
        assert_eq!(back[0].0, DeviceId(3));
        // Owner 1 releases r1, and a number it never sent; owner 2's 7 stays.
        unsaved.release(1, &[7, 99]);
        assert_eq!(unsaved.held(), 3);
        // r1 was released: only r2 came a second before 1,250 ms.
        let overdue = unsaved.held_overdue(1250);
        assert_eq!(overdue.iter().map(|(d, e)| (d.0, e.apns_id.as_str())).collect::<Vec<_>>(), [(2, "r2")]);
        let adopted = unsaved.adopt(|d| d == DeviceId(1));
        assert_eq!(adopted.iter().map(|(d, e)| (d.0, e.apns_id.as_str())).collect::<Vec<_>>(), [(1, "r3")]);
        assert_eq!(unsaved.drain_held().iter().map(|(_, e)| e.apns_id.as_str()).collect::<Vec<_>>(), ["r4"]);
        assert_eq!(unsaved.held(), 0);
        assert!(unsaved.held_overdue(10_000).is_empty());
    }

    #[test]
    fn copies_are_due_oldest_first_after_copy_after_and_only_once_whatever_was_taken_meanwhile() {
        let unsaved = UnsavedReceipts::new(Duration::from_millis(1000), Duration::from_millis(25), 10);
        for (team, id, at) in [("A", "a1", 100), ("B", "b1", 110), ("A", "a2", 120), ("A", "a3", 200)] {
            assert!(unsaved.keep(receipt(team, id, at)).is_none());
        }
        // Copies go to the holders named for their device when they are made.
        let holders = |device: DeviceId| vec![device.0 as NodeId + 1];
        let copied = |copies: &[ReceiptCopy]| {
            let mut ids: Vec<String> =
                copies.iter().map(|c| serde_json::from_slice::<Event>(&c.json).expect("json").apns_id).collect();
            ids.sort();
            ids
        };
        // Before any has waited 25 ms nothing is due; the copier is told when to look again.
        assert_eq!(unsaved.copies_due(124, holders), (Vec::new(), Some(125)));
        // The endpoint took a1 in time: it is never copied.
        assert_eq!(ids(&unsaved.take("A", 1)), ["a1"]);
        let (due, next) = unsaved.copies_due(150, holders);
        assert_eq!(copied(&due), ["a2", "b1"]);
        let numbers: std::collections::BTreeSet<u64> = due.iter().map(|c| c.number).collect();
        assert_eq!(numbers.len(), 2, "each copy has a number of its own");
        assert_eq!(next, Some(225), "a3 is next");
        assert!(unsaved.copies_due(150, holders).0.is_empty(), "each is copied once");
        // What is taken after its copy went says so, so that its holders are told to drop it.
        let taken = unsaved.take("A", 2);
        assert_eq!(
            taken.iter().map(|r| (r.event.apns_id.as_str(), r.copy.is_some())).collect::<Vec<_>>(),
            [("a2", true), ("a3", false)]
        );
        let a2 = taken[0].copy.as_ref().expect("copied");
        assert!(numbers.contains(&a2.number), "with the number its copy went under");
        assert_eq!(serde_json::from_slice::<Event>(&a2.json).expect("json").apns_id, "a2", "and its JSON");
        assert_eq!(a2.holders, [8], "and where it went, for its release");
        // The team's task copies a3 itself if its request outlasts copy_after: a new number, once.
        let mut taken = taken;
        let late = unsaved.copies_of(&taken, holders);
        assert_eq!(late.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1]);
        assert!(!numbers.contains(&late[0].1.number));
        mark_copied(&mut taken, &[(1, Copied::of(&late[0].1))]);
        assert!(unsaved.copies_of(&taken, holders).is_empty());
        assert_eq!(unsaved.copies_due(300, holders), (Vec::new(), None), "a3 left with the team's task; b1 was copied");
        assert!(unsaved.keep(receipt("B", "b2", 310)).is_none());
        assert_eq!(unsaved.copies_due(320, holders), (Vec::new(), Some(335)), "b1's copy is not counted again");
        assert_eq!(copied(&unsaved.copies_due(335, holders).0), ["b2"]);
        assert_eq!(unsaved.take("B", 5).iter().map(|r| r.copy.is_some()).collect::<Vec<_>>(), [true, true]);
    }

    #[test]
    fn a_receipt_whose_gateway_keeps_the_copy_is_never_copied_and_does_not_hold_up_the_others() {
        let unsaved = UnsavedReceipts::new(Duration::from_millis(1000), Duration::from_millis(25), 10);
        let held = |id: &str, at: u64| {
            let r = receipt("A", id, at);
            Unsaved::held_by_sender(r.device, r.event)
        };
        let mut uncopied = std::pin::pin!(unsaved.uncopied());
        assert!(unsaved.keep(held("g1", 100)).is_none());
        assert!(!woken(uncopied.as_mut()), "nothing to copy: the copier is not woken");
        assert!(unsaved.keep(receipt("A", "a1", 110)).is_none());
        assert!(woken(uncopied.as_mut()), "a receipt to copy wakes it");
        assert!(unsaved.keep(held("g2", 120)).is_none());
        assert!(unsaved.keep(receipt("A", "a2", 130)).is_none());
        let holders = |device: DeviceId| vec![device.0 as NodeId + 1];
        let (due, next) = unsaved.copies_due(200, holders);
        let copied: Vec<String> =
            due.iter().map(|c| serde_json::from_slice::<Event>(&c.json).expect("json").apns_id).collect();
        assert_eq!(copied, ["a1", "a2"], "only the holders' ones");
        assert_eq!(next, None);
        let taken = unsaved.take("A", 10);
        assert_eq!(ids(&taken), ["g1", "a1", "g2", "a2"]);
        assert_eq!(taken.iter().map(|r| r.copy.is_some()).collect::<Vec<_>>(), [false, true, false, true]);
        assert!(unsaved.copies_of(&taken, holders).is_empty(), "nor copied by the team's task");
        assert!(unsaved.safe_before_ms(10_000) < 10_000 - 1_000, "not before save_after has passed");
    }

    #[test]
    fn a_full_team_or_keeping_turned_off_gives_the_receipt_back_to_be_written() {
        let unsaved = UnsavedReceipts::new(Duration::from_millis(1000), Duration::from_millis(25), 2);
        assert!(unsaved.keep(receipt("A", "a1", 1)).is_none());
        assert!(unsaved.keep(receipt("A", "a2", 2)).is_none());
        let back = unsaved.keep(receipt("A", "a3", 3)).expect("the team is full");
        assert_eq!(back.event.apns_id, "a3");
        assert!(unsaved.keep(receipt("B", "b1", 3)).is_none(), "another team has room");
        let off = UnsavedReceipts::new(Duration::ZERO, Duration::ZERO, 2);
        assert!(off.keep(receipt("A", "a1", 1)).is_some());
        assert!(off.is_empty());
    }
}
