//! Devices' broadcast channel subscriptions, in the queue's database: (device id, channel id) → the
//! apns_id of the channel's kept broadcast the device has had (empty if none).
//!
//! The owner of a device writes a row when the device subscribes and removes it when it unsubscribes,
//! through the store's group-committing writer, and copies each change to the device's ring successors
//! (`replication`), which apply it to the same table. Rows move with the device's queue when the ring
//! changes, and leave with their channel when it is deleted.

use std::collections::BTreeSet;

use courier_proto::cluster::Subscription;
use redb::{ReadableTable, TableDefinition};

use super::{StoreError, db_err};
use crate::ids::DeviceId;

pub(super) const SUBSCRIPTIONS: TableDefinition<(u128, &[u8]), &str> = TableDefinition::new("channel_subscriptions");

type Table<'t> = redb::Table<'t, (u128, &'static [u8]), &'static str>;

/// A channel id as the table keys it: exactly 16 bytes.
fn channel_key(channel: &[u8]) -> Result<[u8; 16], StoreError> {
    channel.try_into().map_err(|_| StoreError::Db("a channel id is 16 bytes".into()))
}

/// Stores or removes one subscription inside the writer's transaction; `true` if a row changed.
pub(super) fn apply(table: &mut Table<'_>, change: &Subscription) -> Result<bool, StoreError> {
    let device =
        DeviceId::from_slice(&change.device_id).ok_or_else(|| StoreError::Db("device id is not 16 bytes".into()))?;
    let channel = channel_key(&change.channel_id)?;
    let key = (device.0, channel.as_slice());
    if change.subscribed {
        let unchanged = table.get(key).map_err(db_err)?.is_some_and(|seen| seen.value() == change.last_seen);
        if !unchanged {
            table.insert(key, change.last_seen.as_str()).map_err(db_err)?;
        }
        Ok(!unchanged)
    } else {
        Ok(table.remove(key).map_err(db_err)?.is_some())
    }
}

/// Removes every row of the given channels; returns how many.
pub(super) fn forget(table: &mut Table<'_>, channels: &BTreeSet<[u8; 16]>) -> Result<usize, StoreError> {
    let doomed: Vec<(u128, [u8; 16])> = table
        .iter()
        .map_err(db_err)?
        .filter_map(|entry| match entry {
            Ok((key, _)) => {
                let (device, channel) = key.value();
                let channel = <[u8; 16]>::try_from(channel).ok()?;
                channels.contains(&channel).then_some(Ok((device, channel)))
            }
            Err(e) => Some(Err(db_err(e))),
        })
        .collect::<Result<_, _>>()?;
    for (device, channel) in &doomed {
        table.remove((*device, channel.as_slice())).map_err(db_err)?;
    }
    Ok(doomed.len())
}

/// The device's subscriptions, as the copies a holder sends.
pub(super) fn of_device(
    table: &impl ReadableTable<(u128, &'static [u8]), &'static str>,
    device: DeviceId,
) -> Result<Vec<Subscription>, StoreError> {
    let (low, high) = ([0u8; 16], [0xffu8; 16]);
    let mut out = Vec::new();
    for entry in table.range((device.0, low.as_slice())..=(device.0, high.as_slice())).map_err(db_err)? {
        let (key, seen) = entry.map_err(db_err)?;
        out.push(Subscription {
            device_id: device.to_bytes().to_vec(),
            channel_id: key.value().1.to_vec(),
            last_seen: seen.value().to_string(),
            subscribed: true,
        });
    }
    Ok(out)
}

/// Every device with at least one subscription, in order.
pub(super) fn devices(
    table: &impl ReadableTable<(u128, &'static [u8]), &'static str>,
) -> Result<Vec<DeviceId>, StoreError> {
    let empty: &[u8] = &[];
    super::distinct_devices(|from| match table.range((from, empty)..).map_err(db_err)?.next() {
        Some(entry) => Ok(Some(entry.map_err(db_err)?.0.value().0)),
        None => Ok(None),
    })
}

/// Every channel some device here subscribes to.
pub(super) fn channels(
    table: &impl ReadableTable<(u128, &'static [u8]), &'static str>,
) -> Result<BTreeSet<[u8; 16]>, StoreError> {
    let mut channels = BTreeSet::new();
    for entry in table.iter().map_err(db_err)? {
        let (key, _) = entry.map_err(db_err)?;
        if let Ok(channel) = <[u8; 16]>::try_from(key.value().1) {
            channels.insert(channel);
        }
    }
    Ok(channels)
}
