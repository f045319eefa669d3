//! Broadcasts on this node: which linked devices subscribe to which channel, the latest broadcast of
//! each channel that keeps one, and handing a broadcast to every local subscriber.
//!
//! - **Subscriptions are stored by the device's owner** (`StoredSubscriptions`: a row per subscription in
//!   the store, copied to the device's ring successors and handed over when the ring moves), and
//!   **indexed while the device is linked**: the index here holds only linked subscribers (a device id and
//!   its link's serial per subscription), filled from the stored rows when a device links and from its
//!   requests while it is linked, and emptied of a link's entries when it ends.
//! - **Every active node receives every broadcast** (the gateway sends it to each) and hands it to its own
//!   subscribers through their links' bounded queues with `try_send`: a subscriber whose queue is full
//!   misses it (counted), and no subscriber ever waits for another.
//! - **The latest broadcast of a policy-1 channel** is kept durably on every node that received it
//!   (`broadcasts.redb`, one row per channel, for at most `MAX_KEPT`), before it is handed out, and is
//!   sent to a subscriber whose `last_seen` is another broadcast, once, when it subscribes. A node that
//!   becomes active (starting, or back from down) asks its active peers for theirs and keeps the newer
//!   (`catch_up`), so a broadcast sent while it was away reaches the subscribers that link to it later.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_core::channel::{ChannelId, StoragePolicy};
use courier_proto::cluster::{Notification, Subscription};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::edge::registry::{Registry, SharedBroadcast};
use crate::ids::DeviceId;
use crate::raft::channels::ChannelShelf;
use crate::replication::Replicator;
use crate::store::{Store, StoreError, db_err};

/// How long a subscription to a channel this node does not have waits for the channel to be applied
/// here before it is refused: a channel created a moment ago reaches followers up to a Raft heartbeat later.
pub const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

/// Longest a channel's latest broadcast is kept, as APNs keeps it.
pub const MAX_KEPT: Duration = Duration::from_secs(8 * 3600);

/// Channel id (16 bytes) → the latest broadcast on it (a protobuf `Notification`).
const KEPT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kept_broadcasts");

/// What became of a broadcast on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// Handed to this many linked subscribers.
    Sent(u64),
    /// Kept durably, then handed to this many linked subscribers.
    Kept(u64),
    /// No such channel in this node's book.
    UnknownChannel,
}

/// Which links subscribe to which channel: channel → device → the subscribing link's serial.
#[derive(Default)]
struct Index {
    by_channel: HashMap<ChannelId, HashMap<DeviceId, u64>>,
    subscriptions: usize,
}

/// The node's broadcasts: its subscribers and its kept broadcasts.
#[derive(Clone)]
pub struct Broadcasts {
    index: Arc<Mutex<Index>>,
    db: Arc<Database>,
    registry: Arc<Registry>,
    channels: Arc<ChannelShelf>,
}

impl Broadcasts {
    pub fn open(path: &Path, registry: Arc<Registry>, channels: Arc<ChannelShelf>) -> Result<Self, StoreError> {
        let db = crate::store::open_private(path)?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(KEPT).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Broadcasts { index: Arc::default(), db: Arc::new(db), registry, channels })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Indexes `device`'s link `serial` as a subscriber of `channel`, and returns the channel's app and the
    /// kept broadcast the device should get now (one it has not seen); `None` if there is no such channel
    /// (after waiting up to `SUBSCRIBE_WAIT` for one not applied here yet, when `wait`). A kept broadcast
    /// that cannot be read is logged and not sent; the subscription holds.
    pub async fn subscribe(
        &self,
        device: DeviceId,
        serial: u64,
        channel: ChannelId,
        last_seen: &str,
        now_ms: u64,
        wait: bool,
    ) -> Option<(String, Option<Notification>)> {
        let wait = if wait { SUBSCRIBE_WAIT } else { Duration::ZERO };
        if !self.channels.has_or_awaits(channel, wait).await {
            return None;
        }
        let (app, keeps) = {
            let book = self.channels.read();
            let record = book.find(channel)?;
            (record.app.clone(), record.policy == StoragePolicy::MostRecent)
        };
        // Indexed before the kept broadcast is read: a broadcast arriving in between is handed to the link
        // as well, and the device drops the second copy by its apns_id.
        {
            let mut index = self.index();
            if index.by_channel.entry(channel).or_default().insert(device, serial).is_none() {
                index.subscriptions += 1;
            }
            metrics::gauge!("courier_node_channel_subscriptions").set(index.subscriptions as f64);
        }
        let kept = match keeps.then(|| self.kept(channel, now_ms)) {
            Some(Ok(kept)) => kept,
            Some(Err(error)) => {
                tracing::error!(%error, %channel, "reading a kept broadcast failed");
                None
            }
            None => None,
        };
        Some((app, kept.filter(|kept| kept.apns_id != last_seen)))
    }

    /// Takes `device`'s link `serial` out of `channel`'s linked subscribers, if it is there.
    pub fn unsubscribe(&self, device: DeviceId, serial: u64, channel: ChannelId) {
        let mut index = self.index();
        let Some(devices) = index.by_channel.get_mut(&channel) else { return };
        if devices.get(&device) == Some(&serial) {
            devices.remove(&device);
            if devices.is_empty() {
                index.by_channel.remove(&channel);
            }
            index.subscriptions -= 1;
        }
        metrics::gauge!("courier_node_channel_subscriptions").set(index.subscriptions as f64);
    }

    /// Forgets what this node holds for `channels` if the book no longer has them (deleted): their
    /// subscriptions in the index and their kept broadcasts. Every channel the node holds anything of when
    /// `channels` is `None`. Returns how many kept broadcasts it removed.
    pub async fn forget_deleted(&self, channels: Option<Vec<ChannelId>>) -> Result<usize, StoreError> {
        let deleted = |id: &ChannelId, book: &courier_core::channel::ChannelBook| book.find(*id).is_none();
        {
            let book = self.channels.read();
            let mut index = self.index();
            let gone: Vec<ChannelId> = match &channels {
                Some(ids) => ids.iter().filter(|id| deleted(id, &book)).copied().collect(),
                None => index.by_channel.keys().filter(|id| deleted(id, &book)).copied().collect(),
            };
            for id in gone {
                if let Some(devices) = index.by_channel.remove(&id) {
                    index.subscriptions -= devices.len();
                }
            }
            metrics::gauge!("courier_node_channel_subscriptions").set(index.subscriptions as f64);
        }
        let (db, shelf) = (self.db.clone(), self.channels.clone());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            let removed = {
                let mut table = txn.open_table(KEPT).map_err(db_err)?;
                let candidates: Vec<ChannelId> = match channels {
                    Some(ids) => ids,
                    None => {
                        let mut ids = Vec::new();
                        for row in table.iter().map_err(db_err)? {
                            let (key, _) = row.map_err(db_err)?;
                            ids.extend(ChannelId::from_slice(key.value()));
                        }
                        ids
                    }
                };
                let book = shelf.read();
                let mut removed = 0;
                for id in candidates.iter().filter(|id| deleted(id, &book)) {
                    if table.remove(id.0.as_slice()).map_err(db_err)?.is_some() {
                        removed += 1;
                    }
                }
                removed
            };
            txn.commit().map_err(db_err)?;
            Ok(removed)
        })
        .await
        .map_err(db_err)?
    }

    /// Linked subscribers of `channel` on this node.
    pub fn subscribers(&self, channel: ChannelId) -> usize {
        self.index().by_channel.get(&channel).map_or(0, HashMap::len)
    }

    /// Keeps `broadcast` if its channel keeps its latest one, then hands it to every linked subscriber.
    pub async fn deliver(&self, mut broadcast: Notification, now_ms: u64) -> Result<Handed, StoreError> {
        // However long the gateway asked, never kept past `MAX_KEPT`.
        broadcast.expiration = broadcast.expiration.min(now_ms / 1000 + MAX_KEPT.as_secs());
        let Some(channel) = ChannelId::from_slice(&broadcast.channel_id) else {
            return Ok(Handed::UnknownChannel);
        };
        let Some(policy) = self.channels.read().find(channel).map(|record| record.policy) else {
            return Ok(Handed::UnknownChannel);
        };
        let keep = policy == StoragePolicy::MostRecent && broadcast.expiration.saturating_mul(1000) > now_ms;
        if keep {
            self.keep(channel, &broadcast).await?;
        }
        // One frame for every subscriber: the device frame names no device.
        let shared = Arc::new(SharedBroadcast {
            frame: courier_device::codec::EncodedFrame::encode(&crate::edge::session::notification_frame(&broadcast)),
            channel,
            kept: keep.then(|| Arc::from(broadcast.apns_id.as_str())),
        });
        let devices: Vec<(DeviceId, u64)> = match self.index().by_channel.get(&channel) {
            Some(devices) => devices.iter().map(|(device, serial)| (*device, *serial)).collect(),
            None => Vec::new(),
        };
        let handed = self.registry.offer(&devices, &shared);
        metrics::counter!("courier_node_broadcasts_missed_total").increment(devices.len() as u64 - handed);
        metrics::counter!("courier_node_broadcasts_total").increment(1);
        metrics::counter!("courier_node_broadcast_deliveries_total").increment(handed);
        Ok(if keep { Handed::Kept(handed) } else { Handed::Sent(handed) })
    }

    /// Stores `broadcast` as `channel`'s latest unless a newer one is kept; returns once committed.
    async fn keep(&self, channel: ChannelId, broadcast: &Notification) -> Result<(), StoreError> {
        self.keep_newer(vec![(channel, broadcast.clone())]).await.map(|_| ())
    }

    /// Keeps each broadcast as its channel's latest unless the one kept is as new or newer (by when the
    /// gateway accepted it), deciding and writing in one transaction so that concurrent keeps cannot put an older
    /// one back. Returns how many it kept.
    async fn keep_newer(&self, broadcasts: Vec<(ChannelId, Notification)>) -> Result<usize, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            let mut kept = 0;
            {
                let mut table = txn.open_table(KEPT).map_err(db_err)?;
                for (channel, broadcast) in broadcasts {
                    let held = match table.get(channel.0.as_slice()).map_err(db_err)? {
                        Some(bytes) => Some(Notification::decode(bytes.value()).map_err(db_err)?),
                        None => None,
                    };
                    // Newer by acceptance time, ties broken by id, so every node settles on the same one.
                    let newer = held.is_none_or(|held| {
                        (held.accepted_at_ms, &held.apns_id) < (broadcast.accepted_at_ms, &broadcast.apns_id)
                    });
                    if newer {
                        table.insert(channel.0.as_slice(), broadcast.encode_to_vec().as_slice()).map_err(db_err)?;
                        kept += 1;
                    }
                }
            }
            txn.commit().map_err(db_err)?;
            Ok(kept)
        })
        .await
        .map_err(db_err)?
    }

    /// Every unexpired kept broadcast of a channel that still exists.
    pub fn all_kept(&self, now_ms: u64) -> Result<Vec<Notification>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(KEPT).map_err(db_err)?;
        let book = self.channels.read();
        let mut kept = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (key, value) = row.map_err(db_err)?;
            if ChannelId::from_slice(key.value()).is_none_or(|id| book.find(id).is_none()) {
                continue;
            }
            let broadcast = Notification::decode(value.value()).map_err(db_err)?;
            if broadcast.expiration.saturating_mul(1000) > now_ms {
                kept.push(broadcast);
            }
        }
        Ok(kept)
    }

    /// Keeps each of `fetched` (from a peer) that is newer than what this node keeps for its channel;
    /// returns how many it took.
    pub async fn merge(&self, fetched: Vec<Notification>, now_ms: u64) -> Result<usize, StoreError> {
        let known: Vec<(ChannelId, Notification)> = {
            let book = self.channels.read();
            fetched
                .into_iter()
                .filter(|broadcast| broadcast.expiration.saturating_mul(1000) > now_ms)
                .filter_map(|broadcast| Some((ChannelId::from_slice(&broadcast.channel_id)?, broadcast)))
                .filter(|(channel, _)| book.find(*channel).is_some())
                .collect()
        };
        if known.is_empty() {
            return Ok(0);
        }
        self.keep_newer(known).await
    }

    /// `channel`'s kept broadcast, unless it has expired (an expired one is left for the next keep to
    /// replace; it is never sent).
    pub fn kept(&self, channel: ChannelId, now_ms: u64) -> Result<Option<Notification>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(KEPT).map_err(db_err)?;
        let Some(bytes) = table.get(channel.0.as_slice()).map_err(db_err)? else { return Ok(None) };
        let kept = Notification::decode(bytes.value()).map_err(db_err)?;
        Ok((kept.expiration.saturating_mul(1000) > now_ms).then_some(kept))
    }
}

/// Devices' channel subscriptions as their owner stores them (the store's `channel_subscriptions`), each
/// change copied to the device's ring successors so that a new owner has them after the owner's death.
#[derive(Clone)]
pub struct StoredSubscriptions {
    store: Store,
    replicator: Arc<Replicator>,
}

fn subscription(device: DeviceId, channel: ChannelId, last_seen: &str, subscribed: bool) -> Subscription {
    Subscription {
        device_id: device.to_bytes().to_vec(),
        channel_id: channel.0.to_vec(),
        last_seen: last_seen.to_string(),
        subscribed,
    }
}

impl StoredSubscriptions {
    pub fn new(store: Store, replicator: Arc<Replicator>) -> Self {
        StoredSubscriptions { store, replicator }
    }

    /// Durably stores that `device` subscribes to `channel` and has had its kept broadcast `last_seen`,
    /// then copies that to the device's successors and waits for them (`Replicator::copy_subscription`).
    pub async fn save(&self, device: DeviceId, channel: ChannelId, last_seen: &str) -> Result<(), StoreError> {
        self.change(device, subscription(device, channel, last_seen, true)).await
    }

    /// Durably removes `device`'s subscription to `channel`, then its copies, waiting for them.
    pub async fn remove(&self, device: DeviceId, channel: ChannelId) -> Result<(), StoreError> {
        self.change(device, subscription(device, channel, "", false)).await
    }

    /// Durably stores that a link handed `device` the kept broadcast `apns_id` of `channel`, copying that
    /// to its successors unawaited: a lost copy costs at most that broadcast sent again.
    pub async fn handed(&self, device: DeviceId, channel: ChannelId, apns_id: &str) -> Result<(), StoreError> {
        let change = subscription(device, channel, apns_id, true);
        self.store.save_subscriptions(vec![change.clone()]).await?;
        self.replicator.copy_subscription_later(device, &change);
        Ok(())
    }

    async fn change(&self, device: DeviceId, change: Subscription) -> Result<(), StoreError> {
        self.store.save_subscriptions(vec![change.clone()]).await?;
        self.replicator.copy_subscription(device, &change).await;
        Ok(())
    }

    /// Records, unawaited, the kept broadcasts a link handed its device (channel, apns_id), so that the
    /// device's next link does not get them again.
    pub fn seen_later(&self, device: DeviceId, seen: Vec<(ChannelId, Arc<str>)>) {
        if seen.is_empty() {
            return;
        }
        let changes: Vec<Subscription> =
            seen.iter().map(|(channel, apns_id)| subscription(device, *channel, apns_id, true)).collect();
        for change in &changes {
            self.replicator.copy_subscription_later(device, change);
        }
        self.store.save_subscriptions_later(changes);
    }

    /// The device's stored subscriptions, each with the kept broadcast it has had.
    pub async fn of(&self, device: DeviceId) -> Result<Vec<(ChannelId, String)>, StoreError> {
        let stored = self.store.subscriptions(device).await?;
        Ok(stored.into_iter().filter_map(|s| Some((ChannelId::from_slice(&s.channel_id)?, s.last_seen))).collect())
    }

    /// Removes every stored subscription to `channels` (every channel stored here, with `None`) that
    /// `book` no longer has; returns how many.
    async fn forget_deleted(&self, channels: Option<Vec<ChannelId>>, book: &ChannelShelf) -> Result<usize, StoreError> {
        let candidates: Vec<[u8; 16]> = match channels {
            Some(ids) => ids.into_iter().map(|id| id.0).collect(),
            None => self.store.subscribed_channels().await?.into_iter().collect(),
        };
        let gone = {
            let book = book.read();
            candidates.into_iter().filter(|id| book.find(ChannelId(*id)).is_none()).collect()
        };
        self.store.forget_channels(gone).await
    }
}

/// A broadcast from a gateway's `Forward` stream, answered as the stream answers: SENT, STORED (kept), or
/// REJECTED with UNKNOWN_CHANNEL or STORE_FAILED; `subscribers` says to how many linked subscribers it went.
pub async fn deliver_forwarded(
    broadcasts: &Broadcasts,
    broadcast: Notification,
) -> courier_proto::cluster::DeliverResult {
    use courier_proto::cluster::{DeliverOutcome, RefusalReason};
    let apns_id = broadcast.apns_id.clone();
    let (outcome, subscribers) = match broadcasts.deliver(broadcast, crate::ids::unix_millis()).await {
        Ok(Handed::Sent(n)) => (DeliverOutcome::Sent, n),
        Ok(Handed::Kept(n)) => (DeliverOutcome::Stored, n),
        Ok(Handed::UnknownChannel) => return crate::delivery::refused(&apns_id, RefusalReason::UnknownChannel, 0),
        Err(error) => {
            tracing::error!(%error, "keeping a broadcast failed");
            return crate::delivery::refused(&apns_id, RefusalReason::StoreFailed, 0);
        }
    };
    courier_proto::cluster::DeliverResult { subscribers, ..crate::delivery::result(&apns_id, outcome) }
}

/// Forgets deleted channels' subscriptions (linked and stored) and kept broadcasts: each as its delete is
/// applied, and all of them at start (channels deleted while the node was down) and whenever the book was
/// replaced or this watcher fell behind, until `shutdown`.
pub async fn forget_deleted_channels(
    broadcasts: Broadcasts,
    stored: StoredSubscriptions,
    shutdown: courier_core::shutdown::CancellationToken,
) {
    use crate::raft::channels::ChannelEvent;
    use courier_core::channel::ChannelChange;
    use tokio::sync::broadcast::error::RecvError;
    let mut watch = broadcasts.channels.watch();
    let mut sweep = Some(None);
    loop {
        if let Some(channels) = sweep.take() {
            if let Err(error) = broadcasts.forget_deleted(channels.clone()).await {
                tracing::error!(%error, "forgetting deleted channels' kept broadcasts failed");
            }
            if let Err(error) = stored.forget_deleted(channels, &broadcasts.channels).await {
                tracing::error!(%error, "forgetting deleted channels' stored subscriptions failed");
            }
        }
        let event = tokio::select! {
            event = watch.events.recv() => event,
            _ = shutdown.cancelled() => return,
        };
        sweep = match event {
            Ok(ChannelEvent::Change { change: ChannelChange::Delete { id }, .. }) => Some(Some(vec![id])),
            Ok(ChannelEvent::Change { .. }) => None,
            Ok(ChannelEvent::Reset) | Err(RecvError::Lagged(_)) => Some(None),
            Err(RecvError::Closed) => return,
        };
    }
}

/// Whenever this node becomes an active member (at start, or back from down), fetches the kept broadcasts
/// of its active peers and keeps those newer than its own, until `shutdown`.
pub async fn catch_up(
    control: Arc<crate::raft::control::Control>,
    broadcasts: Broadcasts,
    shutdown: courier_core::shutdown::CancellationToken,
) {
    use crate::raft::state::MemberState;
    let mut states = control.state.clone();
    let mut was_active = false;
    loop {
        let state = states.borrow_and_update().clone();
        let active = state.members.get(&control.id).is_some_and(|m| m.state == MemberState::Active);
        if active && !was_active {
            let peers: Vec<String> = state
                .members
                .values()
                .filter(|m| m.id != control.id && m.state == MemberState::Active)
                .map(|m| m.cluster_addr.clone())
                .collect();
            for addr in peers {
                let fetched = async {
                    let mut client = control.peers.client(&addr).map_err(|e| e.to_string())?;
                    let mut request = tonic::Request::new(courier_proto::cluster::FetchKeptRequest {});
                    request.set_timeout(Duration::from_secs(5));
                    client.fetch_kept(request).await.map(|r| r.into_inner().kept).map_err(|s| s.to_string())
                };
                match fetched.await {
                    Ok(kept) => match broadcasts.merge(kept, crate::ids::unix_millis()).await {
                        Ok(taken) if taken > 0 => tracing::info!(%addr, taken, "kept broadcasts caught up from a peer"),
                        Ok(_) => {}
                        Err(error) => tracing::error!(%error, "keeping fetched broadcasts failed"),
                    },
                    Err(error) => tracing::warn!(%addr, %error, "fetching a peer's kept broadcasts failed"),
                }
            }
        }
        was_active = active;
        tokio::select! {
            changed = states.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use courier_core::channel::{ChannelBook, ChannelChange, ChannelPushType, ChannelRecord};

    use super::*;

    const NOW_MS: u64 = 1_000_000_000;

    fn open(dir: &Path, registry: Arc<Registry>, channels: Arc<ChannelShelf>) -> Broadcasts {
        Broadcasts::open(&dir.join("broadcasts.redb"), registry, channels).expect("open")
    }

    fn book_with(channels: &[(u8, StoragePolicy)]) -> Arc<ChannelShelf> {
        let shelf = ChannelShelf::new(ChannelBook::default());
        let changes: Vec<ChannelChange> = channels
            .iter()
            .map(|(n, policy)| ChannelChange::Put {
                record: ChannelRecord {
                    id: ChannelId([*n; 16]),
                    team_id: "T".into(),
                    app: "com.example.app".into(),
                    policy: *policy,
                    push_type: ChannelPushType::LiveActivity,
                    created_ms: 1,
                },
            })
            .collect();
        shelf.take(&changes);
        shelf
    }

    fn broadcast(channel: u8, id: &str, accepted_at_ms: u64, expiration: u64) -> Notification {
        Notification {
            apns_id: id.into(),
            topic: "com.example.app".into(),
            payload: b"{}".to_vec(),
            expiration,
            accepted_at_ms,
            channel_id: vec![channel; 16],
            ..Notification::default()
        }
    }

    #[tokio::test]
    async fn fan_out_reaches_each_linked_subscriber_and_skips_a_full_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Arc::new(Registry::default());
        let broadcasts = open(dir.path(), registry.clone(), book_with(&[(1, StoragePolicy::NoStorage)]));
        let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
        let (a, b, c) = (DeviceId(1), DeviceId(2), DeviceId(3));
        let mut link_a = registry.attach(a, localhost).expect("attach");
        let link_b = registry.attach(b, localhost).expect("attach");
        let channel = ChannelId([1; 16]);
        for (device, serial) in [(a, link_a.serial), (b, link_b.serial)] {
            assert!(broadcasts.subscribe(device, serial, channel, "", NOW_MS, false).await.is_some());
        }
        assert!(broadcasts.subscribe(c, 99, ChannelId([9; 16]), "", NOW_MS, false).await.is_none(), "no such channel");
        assert_eq!(broadcasts.subscribers(channel), 2);

        // Fill b's queue; a still gets the broadcast and b only misses it.
        let mut queued = 0;
        let filler = Arc::new(SharedBroadcast {
            frame: courier_device::codec::EncodedFrame(bytes::Bytes::from_static(&[0, 0, 0, 0])),
            channel,
            kept: None,
        });
        while registry.offer(&[(b, link_b.serial)], &filler) == 1 {
            queued += 1;
        }
        assert!(queued > 0);
        let handed = broadcasts.deliver(broadcast(1, "x", NOW_MS, 0), NOW_MS).await.expect("deliver");
        assert_eq!(handed, Handed::Sent(1));
        let Ok(crate::edge::registry::Outgoing::Broadcast(handed)) = link_a.notifications.try_recv() else {
            panic!("a has it")
        };
        let expected = crate::edge::session::notification_frame(&broadcast(1, "x", NOW_MS, 0));
        assert_eq!(
            handed.frame,
            courier_device::codec::EncodedFrame::encode(&expected),
            "the device frame, encoded once"
        );
        assert_eq!((handed.channel, handed.kept.as_deref()), (channel, None), "a policy-0 broadcast is not kept");
        assert_eq!(registry.serial(b), Some(link_b.serial), "a full queue does not close the link");

        // A subscription held by an older link of the device is not the current link's.
        broadcasts.unsubscribe(a, link_a.serial + 1, channel);
        assert_eq!(broadcasts.subscribers(channel), 2);
        broadcasts.unsubscribe(a, link_a.serial, channel);
        assert_eq!(broadcasts.subscribers(channel), 1);
        assert_eq!(
            broadcasts.deliver(broadcast(9, "y", NOW_MS, 0), NOW_MS).await.expect("deliver"),
            Handed::UnknownChannel
        );
    }

    #[tokio::test]
    async fn a_deleted_channel_leaves_no_subscription_or_kept_broadcast() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shelf = book_with(&[(1, StoragePolicy::MostRecent), (2, StoragePolicy::MostRecent)]);
        let broadcasts = open(dir.path(), Arc::new(Registry::default()), shelf.clone());
        let later = NOW_MS / 1000 + 60;
        for channel in [1, 2] {
            broadcasts.deliver(broadcast(channel, "b", NOW_MS, later), NOW_MS).await.expect("deliver");
            assert!(broadcasts.subscribe(DeviceId(7), 1, ChannelId([channel; 16]), "", NOW_MS, false).await.is_some());
        }
        // Nothing to forget while both exist.
        assert_eq!(broadcasts.forget_deleted(None).await.expect("sweep"), 0);
        shelf.take(&[ChannelChange::Delete { id: ChannelId([1; 16]) }]);
        assert_eq!(broadcasts.forget_deleted(Some(vec![ChannelId([1; 16])])).await.expect("forget"), 1);
        assert_eq!(broadcasts.subscribers(ChannelId([1; 16])), 0);
        assert_eq!(broadcasts.subscribers(ChannelId([2; 16])), 1, "the other channel is untouched");
        let txn = broadcasts.db.begin_read().expect("read");
        let table = txn.open_table(KEPT).expect("table");
        assert!(table.get([1u8; 16].as_slice()).expect("get").is_none(), "its kept row is gone");
        assert!(table.get([2u8; 16].as_slice()).expect("get").is_some());
        drop((table, txn));
        // A sweep finds a channel deleted without its own event (deleted while the node was down).
        shelf.take(&[ChannelChange::Delete { id: ChannelId([2; 16]) }]);
        assert_eq!(broadcasts.forget_deleted(None).await.expect("sweep"), 1);
        assert_eq!(broadcasts.subscribers(ChannelId([2; 16])), 0);
    }

    #[tokio::test]
    async fn only_the_newest_broadcast_is_kept_and_merged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shelf = book_with(&[(1, StoragePolicy::MostRecent), (2, StoragePolicy::NoStorage)]);
        let broadcasts = open(dir.path(), Arc::new(Registry::default()), shelf);
        let later = NOW_MS / 1000 + 60;
        let channel = ChannelId([1; 16]);
        assert_eq!(
            broadcasts.deliver(broadcast(1, "b", NOW_MS, later), NOW_MS).await.expect("deliver"),
            Handed::Kept(0)
        );
        // An older one arriving late is handed out but does not replace the newer.
        assert_eq!(
            broadcasts.deliver(broadcast(1, "a", NOW_MS - 5, later), NOW_MS).await.expect("deliver"),
            Handed::Kept(0)
        );
        assert_eq!(broadcasts.kept(channel, NOW_MS).expect("read").map(|k| k.apns_id), Some("b".into()));
        // Policy 0 keeps nothing; an expiration of 0 keeps nothing either; a day is cut to 8 hours.
        assert_eq!(
            broadcasts.deliver(broadcast(2, "c", NOW_MS, later), NOW_MS).await.expect("deliver"),
            Handed::Sent(0)
        );
        assert_eq!(broadcasts.kept(ChannelId([2; 16]), NOW_MS).expect("read"), None);
        let day = broadcasts.deliver(broadcast(1, "d", NOW_MS + 1, NOW_MS / 1000 + 86_400), NOW_MS).await;
        assert_eq!(day.expect("deliver"), Handed::Kept(0));
        let kept = broadcasts.kept(channel, NOW_MS).expect("read").expect("kept");
        assert_eq!(kept.expiration, NOW_MS / 1000 + MAX_KEPT.as_secs());
        // Expired: never sent.
        assert_eq!(broadcasts.kept(channel, (NOW_MS / 1000 + MAX_KEPT.as_secs() + 1) * 1000).expect("read"), None);

        // A peer's newer broadcast is merged, an older one and one of an unknown channel are not.
        let fetched = vec![
            broadcast(1, "e", NOW_MS + 10, later),
            broadcast(1, "old", NOW_MS - 10, later),
            broadcast(7, "f", NOW_MS + 10, later),
        ];
        assert_eq!(broadcasts.merge(fetched, NOW_MS).await.expect("merge"), 1);
        assert_eq!(broadcasts.kept(channel, NOW_MS).expect("read").map(|k| k.apns_id), Some("e".into()));
        let all: Vec<String> = broadcasts.all_kept(NOW_MS).expect("all").into_iter().map(|k| k.apns_id).collect();
        assert_eq!(all, ["e"]);
    }
}
