//! What happens to a notification once it reaches the node that owns its device: the one place that
//! decides its life on the node. The forwarding stream calls `deliver`, the device session calls `acked`
//! and `backlog`, and the replication receiver calls `apply_replica`; none of them holds lifecycle logic of
//! its own.
//!
//! **Ack before commit.** A storable notification (future expiration) for a device with a live link here is
//! written to the link at once and kept in memory for up to `ack_wait` (default 25 ms, `--ack-wait-ms`). If
//! the device acks it within that window, which a healthy link does, nothing is ever written: no local
//! insert, no replica copy, no deletes (`courier_node_store_writes_elided_total`), and the gateway hears
//! `DELIVERED`. Otherwise it is committed like any other storable notification, locally and on the ring
//! successors at once, and the gateway hears `STORED` once it is durable on R copies, or `DELIVERED` if the
//! ack wins the race with the commit (the deletes then follow the inserts). Until one of the two happened
//! the gateway has no answer, so an owner that dies in between loses nothing that was answered: the gateway
//! retries on the next owner, and the device drops the repeat by apns-id.
//!
//! A notification for a device that is not linked here is committed first and then handed to a link that
//! may have appeared meanwhile. R copies means the replication factor, or every active member when fewer
//! are active; a commit that made fewer (a successor did not answer in time) is refused as TOO_FEW_COPIES,
//! which the gateway retries until its deadline: a 200 is never given for fewer copies than promised.
//!
//! A notification with expiration 0 (or already past) is never stored: it goes to a live link (`SENT`) or
//! is dropped (`DISCARDED`), as APNs does. Every outcome is logged for the provider API's status call
//! (`delivery_status`), and a push to a topic the device unregistered is refused.
//!
//! **Receipts.** When the notification's team has a webhook, each outcome also makes a receipt
//! (`store::receipts`, sent by `receipts`): in the store's commit that decides it, or on its own for an
//! outcome that stored nothing, and held by the device's other holders for this node's death.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_core::ids::{ApnsKey, FastMap};
use courier_core::webhook::{Event, EventKind};
use courier_proto::cluster::{
    DeliverOutcome, DeliverResult, HeldReceipt, Notification, QueueKey, RefusalReason, ReleasedReceipt, Subscription,
    UnsavedCopy,
};
use tokio::sync::oneshot;

use crate::delivery_status::{Disposition, StatusLog};
use crate::edge::registry::{Handoff, Registry};
use crate::ids::{DeviceId, unix_millis};
use crate::raft::state::NodeId;
use crate::receipts::unsaved::{Unsaved, UnsavedReceipts};
use crate::replication::{ReceiptCopy, Replicator};
use crate::store::receipts::event_for;
use crate::store::registrations::Registrations;
use crate::store::{Inserted, ReceiptRole, Removal, Store, StoreError};
use crate::view::{LocalView, Placement};

/// Who keeps a copy of a `delivered` receipt this node decides with nothing stored, against its death
/// before the receipt is sent or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptCopies {
    /// The device's other holders, sent one in the next replication message (`receipts::unsaved`).
    Holders,
    /// The gateway that forwarded the push (`ForwardBatch.holds_receipts`): it hears the receipt's time
    /// in the answer's `timestamp_ms` and keeps the copy itself, so no message per receipt goes to the
    /// holders.
    Sender,
}

/// How long a notification written to a live link waits for the device's ack before it is committed.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_millis(25);

/// The parts of the node a notification's life touches.
pub struct DeliveryParts {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub view: Arc<LocalView>,
    pub replicator: Arc<Replicator>,
    /// Receipts waiting for their endpoint before they are written.
    pub unsaved: Arc<UnsavedReceipts>,
    pub registrations: Registrations,
    pub status: Arc<StatusLog>,
    pub ack_wait: Duration,
}

#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

struct Inner {
    parts: DeliveryParts,
    /// Notifications on a live link whose device has not acked them yet and which are not yet answered
    /// as stored: an ack for one of these is taken here, not by the store.
    awaiting: Mutex<FastMap<(DeviceId, ApnsKey), Awaiting>>,
}

struct Awaiting {
    /// Wakes `deliver` when the ack comes.
    wake: Option<oneshot::Sender<()>>,
    acked: bool,
}

/// Why a notification could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored here, but on fewer holders than the replication factor asks with the members active now.
    #[error("{made} of {wanted} copies made")]
    TooFewCopies { made: usize, wanted: usize },
}

impl CommitError {
    fn refusal(&self) -> RefusalReason {
        match self {
            CommitError::Store(_) => RefusalReason::StoreFailed,
            CommitError::TooFewCopies { .. } => RefusalReason::TooFewCopies,
        }
    }
}

/// One batch of operations another node sent this one (`ReplicateRequest`).
pub struct ReplicaOps {
    /// The node that sent them (numbers of unsaved copies are its own).
    pub from: NodeId,
    pub puts: Vec<Notification>,
    pub removes: Vec<QueueKey>,
    pub subscriptions: Vec<Subscription>,
    pub receipts: Vec<HeldReceipt>,
    pub released: Vec<ReleasedReceipt>,
    pub unsaved_copies: Vec<UnsavedCopy>,
    pub released_copies: Vec<u64>,
}

/// What went wrong applying a batch of replica operations.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("a device id is 16 bytes")]
    BadDeviceId,
    #[error("a channel id is 16 bytes")]
    BadChannelId,
    #[error("a held receipt is not an event")]
    BadReceipt,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn result(apns_id: &str, outcome: DeliverOutcome) -> DeliverResult {
    DeliverResult {
        apns_id: apns_id.to_string(),
        outcome: outcome as i32,
        reason: RefusalReason::Unspecified as i32,
        timestamp_ms: 0,
        subscribers: 0,
    }
}

/// A refusal of `apns_id`, counted by reason.
pub(crate) fn refused(apns_id: &str, reason: RefusalReason, timestamp_ms: u64) -> DeliverResult {
    metrics::counter!("courier_node_notifications_rejected_total", "reason" => reason.as_str_name()).increment(1);
    DeliverResult {
        apns_id: apns_id.to_string(),
        outcome: DeliverOutcome::Rejected as i32,
        reason: reason as i32,
        timestamp_ms,
        subscribers: 0,
    }
}

impl Delivery {
    pub fn new(parts: DeliveryParts) -> Self {
        Delivery { inner: Arc::new(Inner { parts, awaiting: Mutex::default() }) }
    }

    pub fn store(&self) -> &Store {
        &self.inner.parts.store
    }

    pub fn status(&self) -> &StatusLog {
        &self.inner.parts.status
    }

    pub fn view(&self) -> &LocalView {
        &self.inner.parts.view
    }

    fn awaiting(&self) -> std::sync::MutexGuard<'_, FastMap<(DeviceId, ApnsKey), Awaiting>> {
        self.inner.awaiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Disposes of one notification forwarded by a gateway for a device this node owns; `copies` says who
    /// keeps the copy of a receipt decided with nothing stored.
    pub async fn deliver(&self, notification: Notification, copies: ReceiptCopies) -> DeliverResult {
        let parts = &self.inner.parts;
        let apns_id = notification.apns_id.clone();
        let Some(device) = DeviceId::from_slice(&notification.device_id) else {
            return refused(&apns_id, RefusalReason::BadDeviceId, 0);
        };
        if parts.view.placement(device) != Placement::Here {
            return refused(&apns_id, RefusalReason::NotOwner, 0);
        }
        // Cut off from the quorum for longer than the lease: the others may be giving the device to
        // another node, so this one must not accept for it (`raft::lease`).
        if !parts.view.holds_lease() {
            return refused(&apns_id, RefusalReason::NoLease, 0);
        }
        // The gateway refuses these from its view already; this covers a gateway a moment behind.
        if let Some(since_ms) = parts.view.get().state.refused_clone(device) {
            return refused(&apns_id, RefusalReason::ClonedIdentity, since_ms);
        }
        match parts.registrations.unregistered_at(device, &notification.topic) {
            Ok(Some(at_ms)) => {
                let event = event_for(&notification, EventKind::Unregistered, Some("Unregistered"), unix_millis());
                self.keep_receipt(device, event).await;
                return refused(&apns_id, RefusalReason::Unregistered, at_ms);
            }
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "reading registrations failed; delivering anyway"),
        }
        let now_ms = unix_millis();
        let notification = Arc::new(notification);
        let key = (device, ApnsKey::of(&apns_id));
        if notification.expiration <= now_ms / 1000 {
            return match parts.registry.hand_off(device, notification.clone()) {
                Handoff::Sent(_) => {
                    metrics::counter!("courier_node_notifications_sent_total").increment(1);
                    parts.status.record(device, &key.1, &notification, Disposition::Sent, now_ms);
                    result(&apns_id, DeliverOutcome::Sent)
                }
                Handoff::NotConnected | Handoff::SlowConsumer => {
                    metrics::counter!("courier_node_notifications_discarded_total").increment(1);
                    parts.status.record(device, &key.1, &notification, Disposition::Dropped("discarded"), now_ms);
                    self.keep_receipt(device, event_for(&notification, EventKind::Dropped, Some("discarded"), now_ms))
                        .await;
                    result(&apns_id, DeliverOutcome::Discarded)
                }
            };
        }
        let (wake, mut woken) = oneshot::channel();
        let waiting = {
            let mut awaiting = self.awaiting();
            // A provider's retry of an apns-id still on its way takes the committed path.
            !awaiting.contains_key(&key) && {
                awaiting.insert(key.clone(), Awaiting { wake: Some(wake), acked: false });
                true
            }
        };
        if waiting {
            parts.status.record(device, &key.1, &notification, Disposition::Accepted, now_ms);
            match parts.registry.hand_off(device, notification.clone()) {
                Handoff::Sent(serial) => {
                    return self.await_ack(device, key, notification, &mut woken, serial, copies).await;
                }
                Handoff::NotConnected | Handoff::SlowConsumer => {
                    self.awaiting().remove(&key);
                }
            }
        }
        match self.commit(device, &notification).await {
            Ok(Inserted::Duplicate) => {
                // A provider's retry: the copies exist again; do not hand it to the link again.
                metrics::counter!("courier_node_notifications_duplicate_total").increment(1);
                result(&apns_id, DeliverOutcome::Stored)
            }
            Ok(_) => {
                parts.status.record(device, &key.1, &notification, Disposition::Stored, unix_millis());
                // Durable here and on the replicas; now to the device if it linked meanwhile.
                parts.registry.hand_off(device, notification);
                result(&apns_id, DeliverOutcome::Stored)
            }
            Err(error) => refused(&apns_id, error.refusal(), 0),
        }
    }

    /// The rest of a notification written to the link with `serial`: answered `DELIVERED` if the ack comes
    /// within the window, else committed; whichever of the ack and the commit finishes first answers.
    async fn await_ack(
        &self,
        device: DeviceId,
        key: (DeviceId, ApnsKey),
        notification: Arc<Notification>,
        woken: &mut oneshot::Receiver<()>,
        serial: u64,
        copies: ReceiptCopies,
    ) -> DeliverResult {
        let parts = &self.inner.parts;
        let apns_id = notification.apns_id.clone();
        let _ = tokio::time::timeout(parts.ack_wait, &mut *woken).await;
        let acked_in_time = {
            let mut awaiting = self.awaiting();
            awaiting.get(&key).is_some_and(|a| a.acked) && awaiting.remove(&key).is_some()
        };
        if acked_in_time {
            // Each copy's insert and delete.
            let wanted = parts.replicator.copies_wanted() as u64;
            metrics::counter!("courier_node_store_writes_elided_total").increment(2 * wanted);
            // Nothing was stored, so the receipt is the only trace. It is kept here and copied to the
            // successors (or to nobody, when the gateway keeps the copy) without the answer waiting
            // (`receipt_later`).
            let at_ms = unix_millis();
            let event = event_for(&notification, EventKind::Delivered, None, at_ms);
            let mut answer = result(&apns_id, DeliverOutcome::Delivered);
            if self.receipt_later(device, event, copies) && copies == ReceiptCopies::Sender {
                answer.timestamp_ms = at_ms;
            }
            return answer;
        }
        // Not acked in time: commit, still listening for the ack. The commit runs on its own task so that
        // an ack answering first does not cancel it: the deletes must follow the inserts.
        let (done, committed) = oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.commit(device, &notification).await;
            let acked = this.awaiting().remove(&key).is_some_and(|a| a.acked);
            match &outcome {
                // Whatever was stored of it goes again: the device has it.
                Ok(_) | Err(CommitError::TooFewCopies { .. }) if acked => this.forget(device, &notification.apns_id),
                Ok(inserted) if *inserted != Inserted::Duplicate => {
                    this.inner.parts.status.record(device, &key.1, &notification, Disposition::Stored, unix_millis());
                    // The link it was written to has gone; a newer one gets it from here.
                    if this.inner.parts.registry.serial(device).is_some_and(|now| now != serial) {
                        this.inner.parts.registry.hand_off(device, notification);
                    }
                }
                _ => {}
            }
            let _ = done.send(outcome.map(|_| ()).map_err(|error| error.refusal()));
        });
        tokio::select! {
            biased;
            stored = committed => match stored {
                Ok(Ok(())) => result(&apns_id, DeliverOutcome::Stored),
                Ok(Err(refusal)) => refused(&apns_id, refusal, 0),
                Err(_) => refused(&apns_id, RefusalReason::StoreFailed, 0),
            },
            Ok(()) = woken => result(&apns_id, DeliverOutcome::Delivered),
        }
    }

    /// Makes a receipt decided with nothing stored durable before the answer that follows it: queued here
    /// and held by the device's other holders, which send it if this node dies first.
    /// False when the store failed (logged).
    async fn keep_receipt(&self, device: DeviceId, event: Option<Event>) -> bool {
        let Some(event) = event else { return true };
        let parts = &self.inner.parts;
        let (kept, _) = tokio::join!(
            parts.store.keep_receipts(vec![(device, event.clone())], ReceiptRole::Queue),
            parts.replicator.hold_receipts(device, std::slice::from_ref(&event)),
        );
        kept.inspect_err(|error| tracing::error!(%error, "keeping a receipt failed")).is_ok()
    }

    /// Keeps a receipt decided with nothing stored without waiting for it to be written: for the acks of
    /// notifications that were on the link only, the common case of a healthy link, where waiting for two
    /// more commits would cost the provider's answer what ack-before-commit saved. It waits unsaved here
    /// and on the device's other holders (`receipts::unsaved`), which it reaches in the next replication
    /// batch; an owner killed before that batch left loses it.
    /// True when it is kept unsaved (false: there is none, or it was queued).
    fn receipt_later(&self, device: DeviceId, event: Option<Event>, copies: ReceiptCopies) -> bool {
        let Some(event) = event else { return false };
        let parts = &self.inner.parts;
        let receipt = match copies {
            ReceiptCopies::Holders => Unsaved::new(device, event),
            ReceiptCopies::Sender => Unsaved::held_by_sender(device, event),
        };
        crate::receipts::unsaved::keep(&parts.unsaved, &parts.store, &parts.replicator, receipt)
    }

    /// Takes over a receipt a gateway kept for a node that died or restarted before sending or writing it
    /// (`ForwardItem.receipt`): queued here and held by the device's other holders, as a receipt decided
    /// here is, before the answer (`STORED`).
    pub async fn adopt_receipt(&self, receipt: HeldReceipt) -> DeliverResult {
        let apns_id = String::new();
        let Some(device) = DeviceId::from_slice(&receipt.device_id) else {
            return refused(&apns_id, RefusalReason::BadDeviceId, 0);
        };
        let Some((device, event)) = crate::receipts::unsaved::parsed(device, &receipt.event_json) else {
            return refused(&apns_id, RefusalReason::Unspecified, 0);
        };
        let apns_id = event.apns_id.clone();
        if !self.keep_receipt(device, Some(event)).await {
            return refused(&apns_id, RefusalReason::StoreFailed, 0);
        }
        metrics::counter!("courier_webhook_events_total", "outcome" => "adopted").increment(1);
        result(&apns_id, DeliverOutcome::Stored)
    }

    /// The receipts' part of every answer to a gateway that keeps receipt copies: the time before which
    /// every receipt kept here unsaved has been sent or written, and when this process started.
    pub fn receipts_safe(&self) -> (u64, u64) {
        let unsaved = &self.inner.parts.unsaved;
        (unsaved.safe_before_ms(unix_millis()), unsaved.started_ms())
    }

    /// Inserts locally and on the device's ring successors at the same time: done only once both are, on
    /// as many holders as the replication factor asks with the members active now.
    async fn commit(&self, device: DeviceId, notification: &Notification) -> Result<Inserted, CommitError> {
        let parts = &self.inner.parts;
        let (stored, copies) = tokio::join!(
            parts.store.insert(notification.clone(), ReceiptRole::Queue),
            parts.replicator.put(device, notification)
        );
        let inserted = stored.inspect_err(|error| tracing::error!(%error, "storing a notification failed"))?;
        if inserted != Inserted::Duplicate {
            if inserted == Inserted::Collapsed {
                metrics::counter!("courier_node_notifications_collapsed_total").increment(1);
            }
            metrics::counter!("courier_node_notifications_stored_total").increment(1);
        }
        if !copies.enough() {
            tracing::debug!(%device, made = copies.made, wanted = copies.wanted, "too few copies; not promised");
            return Err(CommitError::TooFewCopies { made: copies.made, wanted: copies.wanted });
        }
        Ok(inserted)
    }

    /// The device acked `apns_id` on a link that carried it.
    pub fn acked(&self, device: DeviceId, apns_id: &str) {
        let parts = &self.inner.parts;
        let key = (device, ApnsKey::of(apns_id));
        let unstored = parts.status.delivered(device, apns_id, &key.1, unix_millis());
        {
            let mut awaiting = self.awaiting();
            if let Some(waiting) = awaiting.get_mut(&key) {
                // Not stored yet, or being stored: whoever holds it deletes what it stored, and makes the
                // receipt.
                waiting.acked = true;
                if let Some(wake) = waiting.wake.take() {
                    let _ = wake.send(());
                }
                return;
            }
        }
        // The receipt of one that was on the link only (expiration 0: answered when handed to the link);
        // a stored one's comes with its delete.
        self.receipt_later(device, unstored, ReceiptCopies::Holders);
        self.forget(device, apns_id);
    }

    /// Deletes an acked notification here and on the other holders; not awaited (a lost delete only means
    /// a redelivery the device drops).
    fn forget(&self, device: DeviceId, apns_id: &str) {
        let at_ms = unix_millis();
        self.inner.parts.store.remove_later(device, apns_id, Some(Removal::Delivered { at_ms }));
        self.inner.parts.replicator.remove(device, apns_id, Some(at_ms));
    }

    /// What a device that just linked here must receive: everything queued for it on any of its holders,
    /// merged into the local store first, in arrival order.
    pub async fn backlog(&self, device: DeviceId) -> Result<Vec<Notification>, StoreError> {
        let parts = &self.inner.parts;
        parts.replicator.gather(&parts.store, device).await;
        parts.store.pending_as_owner(device).await
    }

    /// What the device lost while away, by topic: (topic, pushed out of its full queue, expired). Read
    /// after `backlog`, which finds the expired ones.
    pub async fn missed(&self, device: DeviceId) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.inner.parts.store.missed(device).await
    }

    /// The device was told `counts` (`missed`).
    pub fn missed_told(&self, device: DeviceId, counts: Vec<(String, u64, u64)>) {
        self.inner.parts.store.missed_told(device, counts);
    }

    /// Applies copies, deletes, subscription changes and receipts another node sent this one (its replica
    /// role, or queues handed over when the ring moved). This node holds the receipts they decide, to send
    /// them if it becomes the device's owner. Returns how many operations were applied.
    pub async fn apply_replica(&self, ops: ReplicaOps) -> Result<usize, ReplicaError> {
        let parts = &self.inner.parts;
        let ReplicaOps { from, puts, removes, subscriptions, receipts, released, unsaved_copies, released_copies } =
            ops;
        // Checked first, so that a malformed batch changes nothing: subscription changes and receipts are
        // applied in order, after the puts and removes.
        for change in &subscriptions {
            DeviceId::from_slice(&change.device_id).ok_or(ReplicaError::BadDeviceId)?;
            if change.channel_id.len() != 16 {
                return Err(ReplicaError::BadChannelId);
            }
        }
        // Receipts to hold in the store are parsed now; unsaved copies are kept as they came
        // (`receipts::unsaved`). A copy marked unsaved by a node of an earlier release is written too.
        let receipts_parsed = receipts
            .into_iter()
            .map(|r| {
                let device = DeviceId::from_slice(&r.device_id).ok_or(ReplicaError::BadDeviceId)?;
                let event = serde_json::from_slice::<Event>(&r.event_json).map_err(|_| ReplicaError::BadReceipt)?;
                Ok((device, event))
            })
            .collect::<Result<Vec<_>, ReplicaError>>()?;
        let unsaved_copies = unsaved_copies
            .into_iter()
            .map(|c| {
                let device = DeviceId::from_slice(&c.device_id).ok_or(ReplicaError::BadDeviceId)?;
                // Copied out: a slice would keep the whole request's buffer for as long as this copy is held.
                let json = bytes::Bytes::copy_from_slice(&c.event_json);
                Ok(ReceiptCopy { number: c.number, device, json, holders: Vec::new() })
            })
            .collect::<Result<Vec<_>, ReplicaError>>()?;
        let released = released
            .into_iter()
            .map(|r| Ok((DeviceId::from_slice(&r.device_id).ok_or(ReplicaError::BadDeviceId)?, r.event_id)))
            .collect::<Result<Vec<_>, ReplicaError>>()?;
        let puts = futures_util::future::join_all(puts.into_iter().map(|n| async move {
            let device = DeviceId::from_slice(&n.device_id).ok_or(ReplicaError::BadDeviceId)?;
            let notification = Arc::new(n);
            let inserted = parts.store.insert((*notification).clone(), ReceiptRole::Hold).await?;
            // A queue handed over to this node's device while it is connected here goes straight to it.
            if inserted != Inserted::Duplicate && parts.view.placement(device) == Placement::Here {
                parts.registry.hand_off(device, notification);
            }
            Ok::<_, ReplicaError>(())
        }))
        .await;
        let removes = futures_util::future::join_all(removes.into_iter().map(|key| async move {
            let device = DeviceId::from_slice(&key.device_id).ok_or(ReplicaError::BadDeviceId)?;
            let acked = (key.delivered_at_ms != 0).then_some(Removal::Delivered { at_ms: key.delivered_at_ms });
            parts.store.remove(device, &key.apns_id, acked, ReceiptRole::Hold).await?;
            Ok::<_, ReplicaError>(())
        }))
        .await;
        let mut applied = puts.into_iter().chain(removes).collect::<Result<Vec<()>, ReplicaError>>()?.len();
        applied += subscriptions.len() + unsaved_copies.len() + receipts_parsed.len() + released.len();
        applied += released_copies.len();
        parts.store.save_subscriptions(subscriptions).await?;
        // Unsaved copies are held in memory (the owner has them too), the rest in the store.
        let mut to_store = receipts_parsed;
        for (device, json) in parts.unsaved.hold(from, unsaved_copies, unix_millis()) {
            to_store.extend(crate::receipts::unsaved::parsed(device, &json));
        }
        parts.store.keep_receipts(to_store, ReceiptRole::Hold).await?;
        parts.unsaved.release(from, &released_copies);
        parts.store.release_held(released);
        metrics::counter!("courier_node_replicated_ops_total").increment(applied as u64);
        Ok(applied)
    }
}
