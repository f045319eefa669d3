//! Broadcasts on this node: which linked devices subscribe to which channel, the latest broadcast of
//! each channel that keeps one, and handing a broadcast to every local subscriber.
//!
//! - **Subscriptions belong to links.** A device subscribes on every link it opens (as it registers its
//!   topics), saying which broadcast of the channel it saw last. The index here holds only linked
//!   subscribers and forgets a link's subscriptions when it ends, so nothing is stored, replicated or moved
//!   when the ring changes: a device's subscriptions follow it to whichever node owns it, that node's death
//!   included. One entry per subscription (a device id and its link's serial).
//! - **Every active node receives every broadcast** (the gateway sends it to each) and hands it to its own
//!   subscribers through their links' bounded queues with `try_send`: a subscriber whose queue is full
//!   misses it (counted), and no subscriber ever waits for another.
//! - **The latest broadcast of a policy-1 channel** is kept durably on every node that received it
//!   (`broadcasts.redb`, one row per channel, for at most `MAX_KEPT`), before it is handed out, and is
//!   sent to a subscriber whose `last_seen` is another broadcast, once, when it subscribes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_core::channel::{ChannelId, StoragePolicy};
use courier_proto::cluster::Notification;
use prost::Message;
use redb::{Database, ReadableDatabase, TableDefinition};

use crate::edge::registry::Registry;
use crate::ids::DeviceId;
use crate::raft::channels::ChannelShelf;
use crate::store::{StoreError, db_err};

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
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(db_err)?;
        }
        // Broadcast payloads are the apps' data: owner-only.
        crate::secret_file::restrict(path).map_err(db_err)?;
        let db =
            Database::create(path).map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(KEPT).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Broadcasts { index: Arc::default(), db: Arc::new(db), registry, channels })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Subscribes `device`'s link `serial` to `channel`, and returns the channel's app and the kept
    /// broadcast the device should get now (one it has not seen); `None` if there is no such channel. A
    /// kept broadcast that cannot be read is logged and not sent; the subscription holds.
    pub fn subscribe(
        &self,
        device: DeviceId,
        serial: u64,
        channel: ChannelId,
        last_seen: &str,
        now_ms: u64,
    ) -> Option<(String, Option<Notification>)> {
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

    /// Ends `device`'s subscription to `channel`, if its link `serial` holds it.
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

    /// Linked subscribers of `channel` on this node.
    pub fn subscribers(&self, channel: ChannelId) -> usize {
        self.index().by_channel.get(&channel).map_or(0, HashMap::len)
    }

    /// Keeps `broadcast` if its channel keeps its latest one, then hands it to every linked subscriber.
    pub async fn deliver(&self, broadcast: Notification, now_ms: u64) -> Result<Handed, StoreError> {
        let Some(channel) = ChannelId::from_slice(&broadcast.channel_id) else {
            return Ok(Handed::UnknownChannel);
        };
        let Some(policy) = self.channels.read().find(channel).map(|record| record.policy) else {
            return Ok(Handed::UnknownChannel);
        };
        let keep = policy == StoragePolicy::MostRecent && broadcast.expiration * 1000 > now_ms;
        if keep {
            self.keep(channel, &broadcast).await?;
        }
        let broadcast = Arc::new(broadcast);
        let devices: Vec<(DeviceId, u64)> = match self.index().by_channel.get(&channel) {
            Some(devices) => devices.iter().map(|(device, serial)| (*device, *serial)).collect(),
            None => Vec::new(),
        };
        let mut handed = 0u64;
        for (device, serial) in devices {
            if self.registry.offer(device, serial, broadcast.clone()) {
                handed += 1;
            } else {
                metrics::counter!("courier_node_broadcasts_missed_total").increment(1);
            }
        }
        metrics::counter!("courier_node_broadcasts_total").increment(1);
        metrics::counter!("courier_node_broadcast_deliveries_total").increment(handed);
        Ok(if keep { Handed::Kept(handed) } else { Handed::Sent(handed) })
    }

    /// Stores `broadcast` as `channel`'s latest, replacing the one before; returns once committed.
    async fn keep(&self, channel: ChannelId, broadcast: &Notification) -> Result<(), StoreError> {
        let (db, bytes) = (self.db.clone(), broadcast.encode_to_vec());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(KEPT).map_err(db_err)?.insert(channel.0.as_slice(), bytes.as_slice()).map_err(db_err)?;
            txn.commit().map_err(db_err)
        })
        .await
        .map_err(db_err)?
    }

    /// `channel`'s kept broadcast, unless it has expired (an expired one is left for the next keep to
    /// replace; it is never sent).
    pub fn kept(&self, channel: ChannelId, now_ms: u64) -> Result<Option<Notification>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(KEPT).map_err(db_err)?;
        let Some(bytes) = table.get(channel.0.as_slice()).map_err(db_err)? else { return Ok(None) };
        let kept = Notification::decode(bytes.value()).map_err(db_err)?;
        Ok((kept.expiration * 1000 > now_ms).then_some(kept))
    }
}
