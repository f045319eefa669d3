//! The node's durable store: per-device queues of notifications waiting for an ack, devices' broadcast
//! channel subscriptions, and the register of device ids ever issued.
//!
//! It is one redb database in the node's data directory. All writes go through a single writer thread
//! that group-commits: it takes every operation waiting in its channel, applies them in one write
//! transaction and commits once (fsync), then answers each caller. Callers see a notification as stored
//! only after that commit. Reads use redb's MVCC read transactions and never wait for the writer.
//!
//! This module knows nothing about sockets or devices' links; it deals in `cluster::Notification`s.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use courier_proto::cluster::{Notification, Subscription};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::ids::{DeviceId, unix_millis};

// Provider API: which apps devices unregistered (410 Unregistered); a separate database.
pub mod registrations;
// Devices' channel subscriptions: tables in this database, written by the same writer.
mod subscriptions;
// Receipts waiting for their team's webhook: tables in this database, written by the same writer.
pub mod receipts;
// What devices lost while away (told on their next link): a table in this database, same writer.
mod missed;

use courier_core::webhook::{Event, EventKind};
pub use receipts::{QueuedReceipt, ReceiptRole};

/// (device id, sequence number) → encoded `cluster::Notification`. Sequence numbers only grow, so a
/// device's range reads back in arrival order.
const QUEUE: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("queue");
/// (device id, apns-id) → sequence number: finds the entry an ack refers to, and makes a provider's
/// retry of the same apns-id idempotent.
const BY_APNS_ID: TableDefinition<(u128, &str), u64> = TableDefinition::new("queue_by_apns_id");
/// (device id, topic, collapse id) → sequence number of the newest notification with that collapse id.
const BY_COLLAPSE: TableDefinition<(u128, &str, &str), u64> = TableDefinition::new("queue_by_collapse_id");
/// (device id, topic) → notifications queued for it, to enforce the per-topic cap.
const COUNTS: TableDefinition<(u128, &str), u64> = TableDefinition::new("queue_counts");
/// Counters that must survive restarts.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Every device id ever issued → activation time (UNIX ms); guarantees ids are never handed out twice.
const DEVICES: TableDefinition<u128, u64> = TableDefinition::new("devices");

const NEXT_SEQ: &str = "next_seq";
/// Notifications kept per device and topic unless configured otherwise.
pub const DEFAULT_CAP_PER_TOPIC: u64 = 100;
/// Receipts one team may have queued unless configured otherwise.
pub const DEFAULT_RECEIPTS_PER_TEAM: u64 = 1_000_000;
/// Upper bound on operations folded into one commit, to bound the latency of the first one.
const MAX_GROUP: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the store at {path}: {source}")]
    Open { path: String, source: redb::DatabaseError },
    #[error("store: {0}")]
    Db(String),
    #[error("the store is shut down")]
    Closed,
}

/// A redb error as a store error (redb has one error type per operation).
/// Opens (creating if needed, with its directory) a redb file of the apps' data: notification payloads,
/// registrations, kept broadcasts. Owner-only, like every secret.
pub(crate) fn open_private(path: &Path) -> Result<Database, StoreError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(db_err)?;
    }
    crate::secret_file::restrict(path).map_err(db_err)?;
    Database::create(path).map_err(|source| StoreError::Open { path: path.display().to_string(), source })
}

pub(crate) fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The distinct devices of a table keyed by device id first, in order, given the first device at or after
/// an id: it jumps from one device's rows to the next instead of reading every row.
fn distinct_devices(
    mut first_from: impl FnMut(u128) -> Result<Option<u128>, StoreError>,
) -> Result<Vec<DeviceId>, StoreError> {
    let mut devices = Vec::new();
    let mut from = 0u128;
    while let Some(device) = first_from(from)? {
        devices.push(DeviceId(device));
        match device.checked_add(1) {
            Some(next) => from = next,
            None => break,
        }
    }
    Ok(devices)
}

/// What inserting a notification did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Stored as a new queue entry.
    New,
    /// Stored, replacing an earlier notification with the same collapse id.
    Collapsed,
    /// An entry with this apns-id is already queued for the device; nothing changed.
    Duplicate,
}

/// Why the owner removes a queued notification, when its team gets a receipt for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The device acked it.
    Delivered { at_ms: u64 },
    /// Its expiration passed first.
    Expired { at_ms: u64 },
}

enum WriteOp {
    /// What the notification collapses or pushes out of a full queue gets a `dropped` receipt, kept as the
    /// role says.
    Insert(Box<Notification>, oneshot::Sender<Result<Inserted, StoreError>>, ReceiptRole),
    /// With a removal, the notification's receipt is kept as the role says.
    Remove(DeviceId, String, Option<oneshot::Sender<Result<bool, StoreError>>>, Option<Removal>, ReceiptRole),
    /// Receipts for outcomes that stored nothing, kept as the role says; answers how many.
    Receipts(Vec<(DeviceId, Event)>, ReceiptRole, Option<oneshot::Sender<Result<usize, StoreError>>>),
    /// Deletes a team's receipts the endpoint took (or that were given up on); answers how many.
    RemoveReceipts(String, Vec<u64>, oneshot::Sender<Result<usize, StoreError>>),
    /// Drops held copies of receipts the owner's endpoint took.
    ReleaseHeld(Vec<(DeviceId, String)>),
    /// Moves held receipts of these devices (now owned here) to the send queue; answers how many.
    AdoptHeld(Vec<DeviceId>, oneshot::Sender<Result<usize, StoreError>>),
    /// Drops held receipts decided before this time (UNIX ms); answers how many.
    PruneHeld(u64, oneshot::Sender<Result<usize, StoreError>>),
    /// Takes off the lost counts a device was told of.
    MissedTold(DeviceId, Vec<(String, u64, u64)>),
    ClaimDeviceId(DeviceId, oneshot::Sender<Result<bool, StoreError>>),
    /// Stores or removes subscriptions, in order; answers how many rows changed.
    Subscriptions(Vec<Subscription>, Option<oneshot::Sender<Result<usize, StoreError>>>),
    /// Removes every subscription to these channels; answers how many.
    ForgetChannels(BTreeSet<[u8; 16]>, oneshot::Sender<Result<usize, StoreError>>),
    /// Commit what came before, then end the writer thread.
    Stop,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    writer: mpsc::Sender<WriteOp>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
    /// Notified after a commit that queued receipts.
    receipts_queued: Arc<tokio::sync::Notify>,
}

impl Store {
    /// Opens with the default cap of `DEFAULT_CAP_PER_TOPIC` notifications per device and topic.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cap(path, DEFAULT_CAP_PER_TOPIC)
    }

    /// Opens the store; a device's queue for one topic keeps at most `cap_per_topic` notifications, the
    /// oldest dropped (and counted) first.
    pub fn open_with_cap(path: &Path, cap_per_topic: u64) -> Result<Self, StoreError> {
        Self::open_with_limits(path, cap_per_topic, DEFAULT_RECEIPTS_PER_TEAM)
    }

    /// `open_with_cap`, and at most `receipts_per_team` receipts queued for one team (more are dropped and
    /// counted).
    pub fn open_with_limits(path: &Path, cap_per_topic: u64, receipts_per_team: u64) -> Result<Self, StoreError> {
        let cap_per_topic = cap_per_topic.max(1);
        let db = open_private(path)?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(QUEUE).map_err(db_err)?;
            txn.open_table(BY_APNS_ID).map_err(db_err)?;
            txn.open_table(BY_COLLAPSE).map_err(db_err)?;
            txn.open_table(COUNTS).map_err(db_err)?;
            txn.open_table(META).map_err(db_err)?;
            txn.open_table(DEVICES).map_err(db_err)?;
            txn.open_table(subscriptions::SUBSCRIPTIONS).map_err(db_err)?;
            txn.open_table(receipts::RECEIPTS).map_err(db_err)?;
            txn.open_table(receipts::RECEIPT_COUNTS).map_err(db_err)?;
            txn.open_table(receipts::HELD).map_err(db_err)?;
            txn.open_table(missed::MISSED).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        let db = Arc::new(db);
        let (writer, ops) = mpsc::channel(MAX_GROUP * 4);
        let writer_db = db.clone();
        let receipts_queued = Arc::new(tokio::sync::Notify::new());
        let limits =
            Limits { cap_per_topic, receipts_per_team: receipts_per_team.max(1), queued: receipts_queued.clone() };
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(writer_db, ops, limits))
            .map_err(db_err)?;
        Ok(Store { db, writer, thread: Arc::new(std::sync::Mutex::new(Some(thread))), receipts_queued })
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(op(reply)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Durably queues `notification` for its device; returns once committed. `role` says what becomes of
    /// the `dropped` receipt of a notification it collapses or pushes out of a full queue: the owner queues
    /// it, another holder (a copy) holds it.
    pub async fn insert(&self, notification: Notification, role: ReceiptRole) -> Result<Inserted, StoreError> {
        self.submit(|reply| WriteOp::Insert(Box::new(notification), reply, role)).await
    }

    /// Deletes the queued notification `apns_id` of `device`; `false` if there was none. With a removal,
    /// its receipt is kept as `role` says.
    pub async fn remove(
        &self,
        device: DeviceId,
        apns_id: &str,
        receipt: Option<Removal>,
        role: ReceiptRole,
    ) -> Result<bool, StoreError> {
        let apns_id = apns_id.to_string();
        self.submit(|reply| WriteOp::Remove(device, apns_id, Some(reply), receipt, role)).await
    }

    /// The owner's removal, queued without waiting for it (device acks: losing one only means a
    /// redelivery). With `receipt`, the notification's team gets that receipt in the same commit.
    pub fn remove_later(&self, device: DeviceId, apns_id: &str, receipt: Option<Removal>) {
        let op = WriteOp::Remove(device, apns_id.to_string(), None, receipt, ReceiptRole::Queue);
        let _ = self.writer.try_send(op);
    }

    /// Keeps receipts for outcomes that stored nothing, as `role` says; returns once committed.
    pub async fn keep_receipts(&self, events: Vec<(DeviceId, Event)>, role: ReceiptRole) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        self.submit(|reply| WriteOp::Receipts(events, role, Some(reply))).await
    }

    /// `keep_receipts` to the send queue, without waiting for the commit.
    pub fn queue_receipts(&self, events: Vec<(DeviceId, Event)>) {
        if events.is_empty() {
            return;
        }
        match self.writer.try_send(WriteOp::Receipts(events, ReceiptRole::Queue, None)) {
            Ok(()) => {}
            // A burst filled the writer's queue: wait for room on a task of its own rather than drop them.
            Err(mpsc::error::TrySendError::Full(op)) => {
                let writer = self.writer.clone();
                tokio::spawn(async move {
                    let _ = writer.send(op).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(WriteOp::Receipts(events, ..))) => {
                metrics::counter!("courier_webhook_events_total", "outcome" => "store_failed")
                    .increment(events.len() as u64);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Drops held copies of receipts the owner's endpoint took, without waiting.
    pub fn release_held(&self, released: Vec<(DeviceId, String)>) {
        if !released.is_empty() {
            let _ = self.writer.try_send(WriteOp::ReleaseHeld(released));
        }
    }

    /// Moves the held receipts of `devices`, now owned here, to the send queue; returns how many.
    pub async fn adopt_held(&self, devices: Vec<DeviceId>) -> Result<usize, StoreError> {
        if devices.is_empty() {
            return Ok(0);
        }
        self.submit(|reply| WriteOp::AdoptHeld(devices, reply)).await
    }

    /// Drops held receipts decided before `before_ms`; returns how many.
    pub async fn prune_held(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.submit(|reply| WriteOp::PruneHeld(before_ms, reply)).await
    }

    /// What the device lost while away, by topic: (topic, pushed out of the full queue, expired).
    pub async fn missed(&self, device: DeviceId) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.read(move |txn| missed::of_device(&txn.open_table(missed::MISSED).map_err(db_err)?, device)).await
    }

    /// Takes off the counts the device was told of, without waiting.
    pub fn missed_told(&self, device: DeviceId, counts: Vec<(String, u64, u64)>) {
        if !counts.is_empty() {
            let _ = self.writer.try_send(WriteOp::MissedTold(device, counts));
        }
    }

    /// Devices with held receipts here.
    pub async fn held_devices(&self) -> Result<Vec<DeviceId>, StoreError> {
        self.read(|txn| receipts::held_devices(&txn.open_table(receipts::HELD).map_err(db_err)?)).await
    }

    /// Teams with receipts queued here, with how many each has.
    pub async fn receipt_teams(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(|txn| receipts::teams(&txn.open_table(receipts::RECEIPT_COUNTS).map_err(db_err)?)).await
    }

    /// The team's oldest `limit` receipts, and the sequence numbers of rows that could not be read.
    pub async fn receipts(&self, team: &str, limit: usize) -> Result<(Vec<QueuedReceipt>, Vec<u64>), StoreError> {
        let team = team.to_string();
        self.read(move |txn| receipts::oldest(&txn.open_table(receipts::RECEIPTS).map_err(db_err)?, &team, limit)).await
    }

    /// Deletes the team's receipts with these sequence numbers; returns how many there were, once committed.
    pub async fn remove_receipts(&self, team: &str, seqs: Vec<u64>) -> Result<usize, StoreError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let team = team.to_string();
        self.submit(|reply| WriteOp::RemoveReceipts(team, seqs, reply)).await
    }

    /// Wakes when a commit has queued receipts.
    pub fn receipts_queued(&self) -> Arc<tokio::sync::Notify> {
        self.receipts_queued.clone()
    }

    /// Queued notifications with a receipt team whose expiration has passed: (device, apns-id).
    pub async fn expired_with_receipts(&self, now_secs: u64) -> Result<Vec<(DeviceId, String)>, StoreError> {
        self.read(move |txn| {
            let queue = txn.open_table(QUEUE).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in queue.iter().map_err(db_err)? {
                let (key, value) = entry.map_err(db_err)?;
                let Ok(n) = Notification::decode(value.value()) else { continue };
                if !n.team_id.is_empty() && n.expiration <= now_secs {
                    out.push((DeviceId(key.value().0), n.apns_id));
                }
            }
            Ok(out)
        })
        .await
    }

    /// Records `device` as issued; `false` if that id was issued before.
    pub async fn claim_device_id(&self, device: DeviceId) -> Result<bool, StoreError> {
        self.submit(|reply| WriteOp::ClaimDeviceId(device, reply)).await
    }

    /// Durably stores (or, with `subscribed` false, removes) devices' channel subscriptions, in order, in
    /// one commit; returns how many rows changed, once committed.
    pub async fn save_subscriptions(&self, changes: Vec<Subscription>) -> Result<usize, StoreError> {
        if changes.is_empty() {
            return Ok(0);
        }
        self.submit(|reply| WriteOp::Subscriptions(changes, Some(reply))).await
    }

    /// Queues subscription changes without waiting for them (what a device has seen: losing it only means
    /// a kept broadcast sent twice, which the device drops).
    pub fn save_subscriptions_later(&self, changes: Vec<Subscription>) {
        let _ = self.writer.try_send(WriteOp::Subscriptions(changes, None));
    }

    /// Removes every device's subscription to `channels` (deleted); returns how many there were.
    pub async fn forget_channels(&self, channels: BTreeSet<[u8; 16]>) -> Result<usize, StoreError> {
        if channels.is_empty() {
            return Ok(0);
        }
        self.submit(|reply| WriteOp::ForgetChannels(channels, reply)).await
    }

    /// The device's channel subscriptions.
    pub async fn subscriptions(&self, device: DeviceId) -> Result<Vec<Subscription>, StoreError> {
        self.read(move |txn| {
            subscriptions::of_device(&txn.open_table(subscriptions::SUBSCRIPTIONS).map_err(db_err)?, device)
        })
        .await
    }

    /// Every channel some device stored here subscribes to.
    pub async fn subscribed_channels(&self) -> Result<BTreeSet<[u8; 16]>, StoreError> {
        self.read(|txn| subscriptions::channels(&txn.open_table(subscriptions::SUBSCRIPTIONS).map_err(db_err)?)).await
    }

    /// Runs `read` in a read transaction off the runtime.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(redb::ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || read(db.begin_read().map_err(db_err)?)).await.map_err(db_err)?
    }

    /// The device's queued, unexpired notifications in arrival order. Expired ones are deleted.
    pub async fn pending(&self, device: DeviceId) -> Result<Vec<Notification>, StoreError> {
        Ok(self.pending_many(vec![device]).await?.pop().unwrap_or_default())
    }

    /// `pending` for each of `devices`, in that order, read in one transaction.
    pub async fn pending_many(&self, devices: Vec<DeviceId>) -> Result<Vec<Vec<Notification>>, StoreError> {
        let queues = self.queues(devices.clone()).await?;
        let now_secs = unix_millis() / 1000;
        Ok(devices
            .into_iter()
            .zip(queues)
            .map(|(device, queue)| {
                let (live, expired): (Vec<_>, Vec<_>) = queue.into_iter().partition(|n| n.expiration > now_secs);
                self.drop_expired_later(device, expired);
                live
            })
            .collect())
    }

    /// Each device's queue as stored, expired notifications included, in arrival order.
    async fn queues(&self, devices: Vec<DeviceId>) -> Result<Vec<Vec<Notification>>, StoreError> {
        self.read(move |txn| {
            let queue = txn.open_table(QUEUE).map_err(db_err)?;
            devices
                .iter()
                .map(|device| {
                    let mut out = Vec::new();
                    for entry in queue.range((device.0, 0)..=(device.0, u64::MAX)).map_err(db_err)? {
                        let (_, value) = entry.map_err(db_err)?;
                        out.push(Notification::decode(value.value()).map_err(db_err)?);
                    }
                    Ok(out)
                })
                .collect()
        })
        .await
    }

    /// Counts `expired` and deletes them without waiting (a holder that is not the owner sends no receipts).
    fn drop_expired_later(&self, device: DeviceId, expired: Vec<Notification>) {
        metrics::counter!("courier_node_notifications_expired_total").increment(expired.len() as u64);
        for n in expired {
            let _ = self.writer.try_send(WriteOp::Remove(device, n.apns_id, None, None, ReceiptRole::None));
        }
    }

    /// `pending`, read by the device's owner: expired ones are deleted with their team's `expired` receipt,
    /// before this returns.
    pub async fn pending_as_owner(&self, device: DeviceId) -> Result<Vec<Notification>, StoreError> {
        let entries = self.queues(vec![device]).await?.pop().unwrap_or_default();
        let now_ms = unix_millis();
        let (live, expired): (Vec<_>, Vec<_>) = entries.into_iter().partition(|n| n.expiration > now_ms / 1000);
        metrics::counter!("courier_node_notifications_expired_total").increment(expired.len() as u64);
        // Awaited, together (one group commit): the device is told what it lost (`missed`) right after.
        let expiry = Some(Removal::Expired { at_ms: now_ms });
        let removed = futures_util::future::join_all(
            expired.iter().map(|n| self.remove(device, &n.apns_id, expiry, ReceiptRole::Queue)),
        )
        .await;
        removed.into_iter().collect::<Result<Vec<bool>, StoreError>>()?;
        Ok(live)
    }

    /// Every device with at least one queued notification or channel subscription (a primary's or a
    /// replica's copy), in order.
    pub async fn devices(&self) -> Result<Vec<DeviceId>, StoreError> {
        self.devices_holding(true).await
    }

    /// Every device with at least one queued notification, and with `subscribed` also those with a channel
    /// subscription, in order.
    pub async fn devices_holding(&self, subscribed: bool) -> Result<Vec<DeviceId>, StoreError> {
        self.read(move |txn| {
            let queue = txn.open_table(QUEUE).map_err(db_err)?;
            let mut devices = distinct_devices(|from| match queue.range((from, 0)..).map_err(db_err)?.next() {
                Some(entry) => Ok(Some(entry.map_err(db_err)?.0.value().0)),
                None => Ok(None),
            })?;
            if subscribed {
                let table = txn.open_table(subscriptions::SUBSCRIPTIONS).map_err(db_err)?;
                devices.extend(subscriptions::devices(&table)?);
                devices.sort_unstable_by_key(|d| d.0);
                devices.dedup();
            }
            Ok(devices)
        })
        .await
    }

    /// Number of queued notifications across all devices.
    pub async fn queued(&self) -> Result<u64, StoreError> {
        self.read(|txn| txn.open_table(QUEUE).map_err(db_err)?.len().map_err(db_err)).await
    }

    /// Stops the writer after it has committed everything already submitted.
    pub fn close(&self) {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            // Clones of this handle may still hold senders, so the writer is told to stop rather than
            // waiting for every sender to drop. Operations queued before the stop are still committed.
            if self.writer.try_send(WriteOp::Stop).is_err() {
                let writer = self.writer.clone();
                let _ = std::thread::spawn(move || writer.blocking_send(WriteOp::Stop)).join();
            }
            let _ = thread.join();
        }
    }
}

/// What the writer enforces, and whom it tells about receipts.
struct Limits {
    cap_per_topic: u64,
    receipts_per_team: u64,
    queued: Arc<tokio::sync::Notify>,
}

fn write_loop(db: Arc<Database>, mut ops: mpsc::Receiver<WriteOp>, limits: Limits) {
    let mut batch = Vec::with_capacity(MAX_GROUP);
    loop {
        let Some(first) = ops.blocking_recv() else {
            return;
        };
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let stop = batch.iter().any(|op| matches!(op, WriteOp::Stop));
        if apply_batch(&db, &mut batch, &limits) > 0 {
            limits.queued.notify_one();
        }
        if stop {
            return;
        }
    }
}

enum Outcome {
    Inserted(Result<Inserted, StoreError>),
    Removed(Result<bool, StoreError>),
    Counted(Result<usize, StoreError>),
}

/// Applies and commits one group of operations, answering each; returns how many receipts it queued.
fn apply_batch(db: &Database, batch: &mut Vec<WriteOp>, limits: &Limits) -> usize {
    let started = std::time::Instant::now();
    let cap_per_topic = limits.cap_per_topic;
    let result = (|| -> Result<(Vec<Outcome>, usize), StoreError> {
        let txn = db.begin_write().map_err(db_err)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let queued;
        {
            let mut tables = Tables {
                queue: txn.open_table(QUEUE).map_err(db_err)?,
                by_id: txn.open_table(BY_APNS_ID).map_err(db_err)?,
                by_collapse: txn.open_table(BY_COLLAPSE).map_err(db_err)?,
                counts: txn.open_table(COUNTS).map_err(db_err)?,
            };
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let mut devices = txn.open_table(DEVICES).map_err(db_err)?;
            let mut subscribed = txn.open_table(subscriptions::SUBSCRIPTIONS).map_err(db_err)?;
            let mut next_seq = meta.get(NEXT_SEQ).map_err(db_err)?.map(|v| v.value()).unwrap_or(1);
            let mut receipts = receipts::ReceiptTables {
                rows: txn.open_table(receipts::RECEIPTS).map_err(db_err)?,
                counts: txn.open_table(receipts::RECEIPT_COUNTS).map_err(db_err)?,
                held: txn.open_table(receipts::HELD).map_err(db_err)?,
                next_seq: meta.get(receipts::NEXT_RECEIPT_SEQ).map_err(db_err)?.map(|v| v.value()).unwrap_or(1),
                cap: limits.receipts_per_team,
                added: 0,
            };
            let mut dropped = Vec::new();
            let mut lost = txn.open_table(missed::MISSED).map_err(db_err)?;
            for op in batch.iter() {
                let outcome = match op {
                    WriteOp::Insert(n, _, role) => {
                        let inserted = tables.insert(n, &mut next_seq, cap_per_topic, &mut dropped);
                        for (old, reason) in dropped.drain(..) {
                            if *role == ReceiptRole::Queue
                                && reason == "queue_overflow"
                                && let Some(device) = DeviceId::from_slice(&old.device_id)
                            {
                                missed::count(&mut lost, device, &old.topic, true)?;
                            }
                            // The drop is decided by the notification that caused it, at its acceptance: every
                            // holder makes the same receipt.
                            let at_ms = n.accepted_at_ms;
                            if let (Some(event), Some(device)) = (
                                receipts::event_for(&old, EventKind::Dropped, Some(reason), at_ms),
                                DeviceId::from_slice(&old.device_id),
                            ) {
                                receipts.keep(*role, device, &event)?;
                            }
                        }
                        Outcome::Inserted(inserted)
                    }
                    WriteOp::Remove(device, apns_id, _, receipt, role) => {
                        let removed = tables.remove(*device, apns_id);
                        if let (Ok(Some(old)), Some(Removal::Expired { .. }), ReceiptRole::Queue) =
                            (&removed, receipt, role)
                        {
                            missed::count(&mut lost, *device, &old.topic, false)?;
                        }
                        if let (Ok(Some(old)), Some(receipt)) = (&removed, receipt) {
                            let event = match *receipt {
                                Removal::Delivered { at_ms } => {
                                    receipts::event_for(old, EventKind::Delivered, None, at_ms)
                                }
                                Removal::Expired { at_ms } => receipts::event_for(old, EventKind::Expired, None, at_ms),
                            };
                            if let Some(event) = event {
                                receipts.keep(*role, *device, &event)?;
                            }
                        }
                        Outcome::Removed(removed.map(|old| old.is_some()))
                    }
                    WriteOp::Receipts(events, role, _) => {
                        for (device, event) in events {
                            receipts.keep(*role, *device, event)?;
                        }
                        Outcome::Counted(Ok(events.len()))
                    }
                    WriteOp::RemoveReceipts(team, seqs, _) => Outcome::Counted(receipts.remove(team, seqs)),
                    WriteOp::ReleaseHeld(released) => Outcome::Counted(receipts.release(released)),
                    WriteOp::AdoptHeld(devices, _) => Outcome::Counted(receipts.adopt(devices)),
                    WriteOp::PruneHeld(before_ms, _) => Outcome::Counted(receipts.prune(*before_ms)),
                    WriteOp::MissedTold(device, counts) => {
                        Outcome::Counted(missed::told(&mut lost, *device, counts).map(|_| counts.len()))
                    }
                    WriteOp::ClaimDeviceId(device, _) => {
                        let fresh = devices.get(device.0).map_err(db_err)?.is_none();
                        if fresh {
                            devices.insert(device.0, unix_millis()).map_err(db_err)?;
                        }
                        Outcome::Removed(Ok(fresh))
                    }
                    WriteOp::Subscriptions(changes, _) => Outcome::Counted(
                        changes
                            .iter()
                            .try_fold(0, |n, c| Ok(n + usize::from(subscriptions::apply(&mut subscribed, c)?))),
                    ),
                    WriteOp::ForgetChannels(channels, _) => {
                        Outcome::Counted(subscriptions::forget(&mut subscribed, channels))
                    }
                    WriteOp::Stop => Outcome::Removed(Ok(true)),
                };
                outcomes.push(outcome);
            }
            meta.insert(NEXT_SEQ, next_seq).map_err(db_err)?;
            meta.insert(receipts::NEXT_RECEIPT_SEQ, receipts.next_seq).map_err(db_err)?;
            queued = receipts.added;
        }
        txn.commit().map_err(db_err)?;
        Ok((outcomes, queued))
    })();
    metrics::histogram!("courier_node_store_commit_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("courier_node_store_commit_batch_size").record(batch.len() as f64);
    match result {
        Ok((outcomes, queued)) => {
            for (op, outcome) in batch.drain(..).zip(outcomes) {
                match (op, outcome) {
                    (WriteOp::Insert(_, reply, _), Outcome::Inserted(r)) => {
                        let _ = reply.send(r);
                    }
                    (WriteOp::Remove(_, _, Some(reply), _, _), Outcome::Removed(r))
                    | (WriteOp::ClaimDeviceId(_, reply), Outcome::Removed(r)) => {
                        let _ = reply.send(r);
                    }
                    (WriteOp::Subscriptions(_, Some(reply)), Outcome::Counted(r))
                    | (WriteOp::ForgetChannels(_, reply), Outcome::Counted(r))
                    | (WriteOp::RemoveReceipts(_, _, reply), Outcome::Counted(r))
                    | (WriteOp::Receipts(_, _, Some(reply)), Outcome::Counted(r))
                    | (WriteOp::AdoptHeld(_, reply), Outcome::Counted(r))
                    | (WriteOp::PruneHeld(_, reply), Outcome::Counted(r)) => {
                        let _ = reply.send(r);
                    }
                    _ => {}
                }
            }
            queued
        }
        Err(e) => {
            tracing::error!(error = %e, "store commit failed");
            for op in batch.drain(..) {
                let err = StoreError::Db(e.to_string());
                match op {
                    WriteOp::Insert(_, reply, _) => {
                        let _ = reply.send(Err(err));
                    }
                    WriteOp::Remove(_, _, Some(reply), _, _) | WriteOp::ClaimDeviceId(_, reply) => {
                        let _ = reply.send(Err(err));
                    }
                    WriteOp::Subscriptions(_, Some(reply))
                    | WriteOp::ForgetChannels(_, reply)
                    | WriteOp::RemoveReceipts(_, _, reply)
                    | WriteOp::Receipts(_, _, Some(reply))
                    | WriteOp::AdoptHeld(_, reply)
                    | WriteOp::PruneHeld(_, reply) => {
                        let _ = reply.send(Err(err));
                    }
                    WriteOp::Receipts(events, _, None) => {
                        metrics::counter!("courier_webhook_events_total", "outcome" => "store_failed")
                            .increment(events.len() as u64);
                    }
                    WriteOp::Remove(_, _, None, _, _)
                    | WriteOp::Subscriptions(_, None)
                    | WriteOp::ReleaseHeld(_)
                    | WriteOp::MissedTold(..)
                    | WriteOp::Stop => {}
                }
            }
            0
        }
    }
}

type Table<'t, K, V> = redb::Table<'t, K, V>;

/// The queue's tables inside one write transaction.
struct Tables<'t> {
    queue: Table<'t, (u128, u64), &'static [u8]>,
    by_id: Table<'t, (u128, &'static str), u64>,
    by_collapse: Table<'t, (u128, &'static str, &'static str), u64>,
    counts: Table<'t, (u128, &'static str), u64>,
}

impl Tables<'_> {
    fn adjust_count(&mut self, device: DeviceId, topic: &str, delta: i64) -> Result<u64, StoreError> {
        let current = self.counts.get((device.0, topic)).map_err(db_err)?.map(|v| v.value()).unwrap_or(0);
        let next = current.saturating_add_signed(delta);
        if next == 0 {
            self.counts.remove((device.0, topic)).map_err(db_err)?;
        } else {
            self.counts.insert((device.0, topic), next).map_err(db_err)?;
        }
        Ok(next)
    }

    /// Queues `n`; the notifications it replaces (collapse id) or pushes out (the cap) go to `dropped`, with
    /// the reason.
    fn insert(
        &mut self,
        n: &Notification,
        next_seq: &mut u64,
        cap_per_topic: u64,
        dropped: &mut Vec<(Notification, &'static str)>,
    ) -> Result<Inserted, StoreError> {
        let device =
            DeviceId::from_slice(&n.device_id).ok_or_else(|| StoreError::Db("device id is not 16 bytes".into()))?;
        if self.by_id.get((device.0, n.apns_id.as_str())).map_err(db_err)?.is_some() {
            return Ok(Inserted::Duplicate);
        }
        let mut inserted = Inserted::New;
        if !n.collapse_id.is_empty() {
            let key = (device.0, n.topic.as_str(), n.collapse_id.as_str());
            let previous = self.by_collapse.get(key).map_err(db_err)?.map(|v| v.value());
            if let Some(old_seq) = previous {
                let old =
                    self.queue.remove((device.0, old_seq)).map_err(db_err)?.map(|v| Notification::decode(v.value()));
                if let Some(Ok(old)) = old {
                    self.by_id.remove((device.0, old.apns_id.as_str())).map_err(db_err)?;
                    self.adjust_count(device, &old.topic, -1)?;
                    inserted = Inserted::Collapsed;
                    dropped.push((old, "collapsed"));
                }
            }
        }
        let seq = *next_seq;
        *next_seq += 1;
        self.queue.insert((device.0, seq), n.encode_to_vec().as_slice()).map_err(db_err)?;
        self.by_id.insert((device.0, n.apns_id.as_str()), seq).map_err(db_err)?;
        if !n.collapse_id.is_empty() {
            self.by_collapse.insert((device.0, n.topic.as_str(), n.collapse_id.as_str()), seq).map_err(db_err)?;
        }
        if self.adjust_count(device, &n.topic, 1)? > cap_per_topic
            && let Some(old) = self.drop_oldest(device, &n.topic)?
        {
            dropped.push((old, "queue_overflow"));
        }
        Ok(inserted)
    }

    /// Removes the device's oldest notification for `topic`, to keep the queue within its cap.
    fn drop_oldest(&mut self, device: DeviceId, topic: &str) -> Result<Option<Notification>, StoreError> {
        let mut oldest = None;
        for entry in self.queue.range((device.0, 0)..=(device.0, u64::MAX)).map_err(db_err)? {
            let (_, value) = entry.map_err(db_err)?;
            let n = Notification::decode(value.value()).map_err(db_err)?;
            if n.topic == topic {
                oldest = Some(n.apns_id);
                break;
            }
        }
        let Some(apns_id) = oldest else { return Ok(None) };
        metrics::counter!("courier_node_notifications_dropped_total", "reason" => "queue_full").increment(1);
        self.remove(device, &apns_id)
    }

    /// Removes the device's notification `apns_id`; returns it, if it was queued.
    fn remove(&mut self, device: DeviceId, apns_id: &str) -> Result<Option<Notification>, StoreError> {
        let Some(seq) = self.by_id.remove((device.0, apns_id)).map_err(db_err)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let removed = self.queue.remove((device.0, seq)).map_err(db_err)?.map(|v| Notification::decode(v.value()));
        if let Some(Ok(old)) = &removed {
            self.adjust_count(device, &old.topic, -1)?;
            if !old.collapse_id.is_empty() {
                let key = (device.0, old.topic.as_str(), old.collapse_id.as_str());
                let current = self.by_collapse.get(key).map_err(db_err)?.map(|v| v.value());
                if current == Some(seq) {
                    self.by_collapse.remove(key).map_err(db_err)?;
                }
            }
        }
        // A row that does not decode is gone all the same; it names no team to tell.
        Ok(Some(removed.and_then(Result::ok).unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(device: DeviceId, apns_id: &str, collapse: &str, expiration: u64) -> Notification {
        Notification {
            device_id: device.to_bytes().to_vec(),
            topic: "com.example.app".into(),
            apns_id: apns_id.into(),
            payload: br#"{"aps":{}}"#.to_vec(),
            priority: 10,
            expiration,
            collapse_id: collapse.into(),
            push_type: "alert".into(),
            accepted_at_ms: unix_millis(),
            channel_id: Vec::new(),
            team_id: String::new(),
            token: String::new(),
        }
    }

    /// A notification whose team gets receipts.
    fn receipted(device: DeviceId, apns_id: &str, collapse: &str, expiration: u64) -> Notification {
        Notification {
            team_id: "TEAM".into(),
            token: "ab12".into(),
            ..notification(device, apns_id, collapse, expiration)
        }
    }

    fn later() -> u64 {
        unix_millis() / 1000 + 3600
    }

    #[tokio::test]
    async fn queue_survives_reopen_collapses_and_deletes_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let device = DeviceId(7);
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(
                store.insert(notification(device, "a", "", later()), ReceiptRole::None).await.unwrap(),
                Inserted::New
            );
            assert_eq!(
                store.insert(notification(device, "a", "", later()), ReceiptRole::None).await.unwrap(),
                Inserted::Duplicate
            );
            assert_eq!(
                store.insert(notification(device, "b", "score", later()), ReceiptRole::None).await.unwrap(),
                Inserted::New
            );
            assert_eq!(
                store.insert(notification(device, "c", "score", later()), ReceiptRole::None).await.unwrap(),
                Inserted::Collapsed
            );
            assert_eq!(store.insert(notification(device, "d", "", 1), ReceiptRole::None).await.unwrap(), Inserted::New);
            store.close();
        }
        let store = Store::open(&path).unwrap();
        let ids: Vec<_> = store.pending(device).await.unwrap().into_iter().map(|n| n.apns_id).collect();
        assert_eq!(ids, ["a", "c"], "collapsed b and expired d must not come back");
        assert!(store.remove(device, "a", None, ReceiptRole::None).await.unwrap());
        assert!(!store.remove(device, "a", None, ReceiptRole::None).await.unwrap());
        assert!(store.remove(device, "c", None, ReceiptRole::None).await.unwrap());
        assert!(store.pending(device).await.unwrap().is_empty());
        assert!(store.pending(DeviceId(8)).await.unwrap().is_empty());
        // After its collapse entry was acked, the same collapse id starts afresh.
        assert_eq!(
            store.insert(notification(device, "e", "score", later()), ReceiptRole::None).await.unwrap(),
            Inserted::New
        );
        store.close();
    }

    #[tokio::test]
    async fn a_full_topic_queue_drops_its_oldest_and_other_topics_are_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with_cap(&dir.path().join("node.redb"), 3).unwrap();
        let device = DeviceId(9);
        for i in 0..5 {
            store.insert(notification(device, &format!("a{i}"), "", later()), ReceiptRole::None).await.unwrap();
        }
        let mut other = notification(device, "b0", "", later());
        other.topic = "com.example.other".into();
        store.insert(other, ReceiptRole::None).await.unwrap();
        let ids: Vec<_> = store.pending(device).await.unwrap().into_iter().map(|n| n.apns_id).collect();
        assert_eq!(ids, ["a2", "a3", "a4", "b0"]);
        // Acks free room: the count follows removals.
        assert!(store.remove(device, "a2", None, ReceiptRole::None).await.unwrap());
        store.insert(notification(device, "a5", "", later()), ReceiptRole::None).await.unwrap();
        let ids: Vec<_> = store.pending(device).await.unwrap().into_iter().map(|n| n.apns_id).collect();
        assert_eq!(ids, ["a3", "a4", "b0", "a5"]);
        assert_eq!(store.devices().await.unwrap(), [device]);
        store.insert(notification(DeviceId(u128::MAX), "z", "", later()), ReceiptRole::None).await.unwrap();
        store.insert(notification(DeviceId(2), "y", "", later()), ReceiptRole::None).await.unwrap();
        assert_eq!(store.devices().await.unwrap(), [DeviceId(2), device, DeviceId(u128::MAX)]);
        store.close();
    }

    fn subscription(device: u128, channel: u8, last_seen: &str, subscribed: bool) -> Subscription {
        Subscription {
            device_id: DeviceId(device).to_bytes().to_vec(),
            channel_id: vec![channel; 16],
            last_seen: last_seen.into(),
            subscribed,
        }
    }

    #[tokio::test]
    async fn subscriptions_survive_reopen_count_as_devices_and_leave_with_their_channel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        {
            let store = Store::open(&path).unwrap();
            let first =
                vec![subscription(5, 1, "", true), subscription(5, 2, "k1", true), subscription(6, 1, "", true)];
            assert_eq!(store.save_subscriptions(first).await.unwrap(), 3);
            assert_eq!(store.save_subscriptions(vec![subscription(5, 2, "k1", true)]).await.unwrap(), 0, "unchanged");
            store.close();
        }
        let store = Store::open(&path).unwrap();
        // Device 5's rows: (the channel id's first byte, last seen).
        let of_5 = || async {
            let rows = store.subscriptions(DeviceId(5)).await.unwrap();
            rows.into_iter().map(|s| (s.channel_id[0], s.last_seen)).collect::<Vec<_>>()
        };
        assert_eq!(of_5().await, [(1, String::new()), (2, "k1".to_string())]);
        store.insert(notification(DeviceId(4), "a", "", later()), ReceiptRole::None).await.unwrap();
        store.insert(notification(DeviceId(5), "b", "", later()), ReceiptRole::None).await.unwrap();
        assert_eq!(store.devices().await.unwrap(), [DeviceId(4), DeviceId(5), DeviceId(6)], "queues and subscriptions");

        // An update, an unsubscription, and one that was never there.
        let changes =
            vec![subscription(5, 2, "k2", true), subscription(5, 1, "", false), subscription(7, 1, "", false)];
        assert_eq!(store.save_subscriptions(changes).await.unwrap(), 2);
        assert_eq!(of_5().await, [(2, "k2".to_string())]);

        // A malformed change is refused and leaves the rows as they were.
        let bad = Subscription { channel_id: vec![1; 3], ..subscription(8, 1, "", true) };
        assert!(store.save_subscriptions(vec![bad]).await.is_err());
        assert_eq!(store.subscribed_channels().await.unwrap(), BTreeSet::from([[1; 16], [2; 16]]));

        assert_eq!(store.forget_channels(BTreeSet::from([[2; 16]])).await.unwrap(), 1);
        assert!(store.subscriptions(DeviceId(5)).await.unwrap().is_empty());
        assert_eq!(store.subscriptions(DeviceId(6)).await.unwrap().len(), 1, "other channels stay");
        store.close();
    }

    #[tokio::test]
    async fn device_ids_are_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.redb")).unwrap();
        assert!(store.claim_device_id(DeviceId(1)).await.unwrap());
        assert!(!store.claim_device_id(DeviceId(1)).await.unwrap());
        assert!(store.claim_device_id(DeviceId(2)).await.unwrap());
        store.close();
    }

    #[tokio::test]
    async fn concurrent_inserts_are_group_committed_and_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.redb")).unwrap();
        let mut tasks = Vec::new();
        for i in 0..500u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .insert(
                        notification(DeviceId(u128::from(i % 10)), &format!("id-{i}"), "", later()),
                        ReceiptRole::None,
                    )
                    .await
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), Inserted::New);
        }
        assert_eq!(store.queued().await.unwrap(), 500);
        assert_eq!(store.pending(DeviceId(3)).await.unwrap().len(), 50);
        store.close();
    }

    #[tokio::test]
    async fn the_owner_queues_receipts_in_the_commit_that_decides_them_and_other_holders_hold_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let device = DeviceId(11);
        {
            let store = Store::open_with_limits(&path, 2, 6).unwrap();
            // Another holder's copies: what they decide is held, not queued.
            let copy_of = DeviceId(12);
            store.insert(receipted(copy_of, "r1", "c", later()), ReceiptRole::Hold).await.unwrap();
            store.insert(receipted(copy_of, "r2", "c", later()), ReceiptRole::Hold).await.unwrap();
            let acked = Some(Removal::Delivered { at_ms: 9 });
            assert!(store.remove(copy_of, "r2", acked, ReceiptRole::Hold).await.unwrap());
            // Merging another holder's queue decides nothing.
            store.insert(receipted(device, "m1", "m", later()), ReceiptRole::None).await.unwrap();
            store.insert(receipted(device, "m2", "m", later()), ReceiptRole::None).await.unwrap();
            assert!(store.remove(device, "m2", None, ReceiptRole::None).await.unwrap());
            assert!(store.receipt_teams().await.unwrap().is_empty());
            assert_eq!(store.held_devices().await.unwrap(), [copy_of]);

            // The owner's: a collapses into b; d pushes b out of the full queue (cap 2), e pushes c out; d
            // has expired when the queue is read, and e is acked. Acking nothing queued tells nothing.
            store.insert(receipted(device, "a", "s", later()), ReceiptRole::Queue).await.unwrap();
            store.insert(receipted(device, "b", "s", later()), ReceiptRole::Queue).await.unwrap();
            store.insert(receipted(device, "c", "", later()), ReceiptRole::Queue).await.unwrap();
            store.insert(receipted(device, "d", "", 1), ReceiptRole::Queue).await.unwrap();
            store.insert(receipted(device, "e", "", later()), ReceiptRole::Queue).await.unwrap();
            let pending: Vec<String> =
                store.pending_as_owner(device).await.unwrap().into_iter().map(|n| n.apns_id).collect();
            assert_eq!(pending, ["e"]);
            store.remove_later(device, "e", Some(Removal::Delivered { at_ms: 42 }));
            store.remove_later(device, "nothing", Some(Removal::Delivered { at_ms: 43 }));
            store.remove(device, "flush", None, ReceiptRole::None).await.unwrap();
            let (queued, unreadable) = store.receipts("TEAM", 10).await.unwrap();
            assert!(unreadable.is_empty());
            let seen: Vec<(&str, &str, Option<&str>)> = queued
                .iter()
                .map(|r| (r.event.apns_id.as_str(), r.event.outcome.as_str(), r.event.reason.as_deref()))
                .collect();
            assert_eq!(
                seen,
                [
                    ("a", "dropped", Some("collapsed")),
                    ("b", "dropped", Some("queue_overflow")),
                    ("c", "dropped", Some("queue_overflow")),
                    ("d", "expired", None),
                    ("e", "delivered", None),
                ]
            );
            assert_eq!(queued[4].event.delivered_at_ms, Some(42));
            assert!(queued.windows(2).all(|w| w[0].seq < w[1].seq));

            // The team's queue holds 6: of two more, one is taken.
            let of = courier_core::webhook::Receipted {
                team_id: "TEAM",
                apns_id: "x",
                token: "ab12",
                topic: "com.example.app",
                accepted_at_ms: 1,
            };
            let extra = |id| Event { apns_id: id, ..Event::new(EventKind::Unregistered, of, None, 7) };
            store.queue_receipts(vec![(device, extra("x1".into())), (device, extra("x2".into()))]);
            store.remove(device, "flush", None, ReceiptRole::None).await.unwrap();
            assert_eq!(store.receipt_teams().await.unwrap(), [("TEAM".to_string(), 6)]);
            let first_two = queued[..2].iter().map(|r| r.seq).collect();
            assert_eq!(store.remove_receipts("TEAM", first_two).await.unwrap(), 2);
            store.close();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.receipt_teams().await.unwrap(), [("TEAM".to_string(), 4)]);
        let left: Vec<String> =
            store.receipts("TEAM", 10).await.unwrap().0.into_iter().map(|r| r.event.apns_id).collect();
        assert_eq!(left, ["c", "d", "e", "x1"]);

        // The owner's endpoint took r1's receipt; this node then owns the device and sends the other.
        let collapsed =
            receipts::event_for(&receipted(DeviceId(12), "r1", "", 0), EventKind::Dropped, None, 0).unwrap();
        store.release_held(vec![(DeviceId(12), collapsed.id)]);
        assert_eq!(store.adopt_held(vec![DeviceId(12)]).await.unwrap(), 1);
        assert!(store.held_devices().await.unwrap().is_empty());
        let (queued, _) = store.receipts("TEAM", 10).await.unwrap();
        let last = queued.last().expect("adopted");
        assert_eq!(
            (last.device, last.event.apns_id.as_str(), last.event.outcome),
            (DeviceId(12), "r2", EventKind::Delivered)
        );
        assert_eq!(last.event.delivered_at_ms, Some(9));

        // Held copies past the retry window go.
        let old = Event { at_ms: 5, ..last.event.clone() };
        store.keep_receipts(vec![(DeviceId(13), old)], ReceiptRole::Hold).await.unwrap();
        assert_eq!(store.held_devices().await.unwrap(), [DeviceId(13)]);
        assert_eq!(store.prune_held(6).await.unwrap(), 1);
        assert!(store.held_devices().await.unwrap().is_empty());
        store.close();
    }
}
