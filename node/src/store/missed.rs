//! What each device lost while it was away, per topic: notifications pushed out of its full queue and ones
//! that expired before it linked, (device id, topic) → (dropped, expired). Only the owner counts (its own
//! queue's drops and expirations); the device is told on its next link (`Missed`), and the counts it was
//! told are then taken off. An owner that dies takes its counts with it: the device then hears of what
//! the new owner saw only.

use redb::{ReadableTable, TableDefinition};

use super::{StoreError, db_err};
use crate::ids::DeviceId;

pub(super) const MISSED: TableDefinition<(u128, &str), (u64, u64)> = TableDefinition::new("missed");

type Table<'t> = redb::Table<'t, (u128, &'static str), (u64, u64)>;

/// Counts one notification of `topic` lost by `device`: pushed out (`dropped`) or expired.
pub(super) fn count(table: &mut Table<'_>, device: DeviceId, topic: &str, dropped: bool) -> Result<(), StoreError> {
    let (d, e) = table.get((device.0, topic)).map_err(db_err)?.map_or((0, 0), |v| v.value());
    let next = if dropped { (d + 1, e) } else { (d, e + 1) };
    table.insert((device.0, topic), next).map_err(db_err)?;
    Ok(())
}

/// Takes off counts the device was told of; what was counted meanwhile stays.
pub(super) fn told(table: &mut Table<'_>, device: DeviceId, counts: &[(String, u64, u64)]) -> Result<(), StoreError> {
    for (topic, dropped, expired) in counts {
        let Some((d, e)) = table.get((device.0, topic.as_str())).map_err(db_err)?.map(|v| v.value()) else { continue };
        let left = (d.saturating_sub(*dropped), e.saturating_sub(*expired));
        if left == (0, 0) {
            table.remove((device.0, topic.as_str())).map_err(db_err)?;
        } else {
            table.insert((device.0, topic.as_str()), left).map_err(db_err)?;
        }
    }
    Ok(())
}

/// The device's counts: (topic, dropped, expired), by topic.
pub(super) fn of_device(
    table: &impl ReadableTable<(u128, &'static str), (u64, u64)>,
    device: DeviceId,
) -> Result<Vec<(String, u64, u64)>, StoreError> {
    table
        .range((device.0, "")..=(device.0, "\u{10ffff}"))
        .map_err(db_err)?
        .map(|entry| {
            let (key, value) = entry.map_err(db_err)?;
            let (dropped, expired) = value.value();
            Ok((key.value().1.to_string(), dropped, expired))
        })
        .collect()
}
