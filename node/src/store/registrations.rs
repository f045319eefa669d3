//! Which apps each device has unregistered, and when: the record behind APNs's 410 `Unregistered`.
//!
//! A device that sends `UnregisterTopic` (the app was removed, or it stopped wanting pushes) gets a row
//! (device id, app topic) → UNIX ms; registering the topic again deletes it. `Deliver` on the owning node
//! consults it before storing anything, so later pushes to that token answer 410 with the time. It is its
//! own small redb database (`registrations.redb` beside the queue), written rarely; it never touches the
//! queue's group-commit writer. The lookup for a push opens a read transaction only when a count of rows
//! per bucket of device ids (`RowCounts`, in memory, rebuilt at open) says a row may exist: few devices
//! ever unregister an app, and the read transaction was 3% of a node's CPU under push load.
//!
//! The row lives on the node the device was connected to when it unregistered (its ring owner). It does
//! not follow the device when the ring moves it; see the gateway README.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{StoreError, db_err};
use crate::ids::DeviceId;

/// (device id, app topic) → when the device unregistered it, UNIX ms.
const UNREGISTERED: TableDefinition<(u128, &str), u64> = TableDefinition::new("unregistered_topics");

/// Handle to the registrations database; cheap to clone.
#[derive(Clone)]
pub struct Registrations {
    db: Arc<Database>,
    counts: Arc<RowCounts>,
}

/// Buckets of device ids: 2^18 one-byte counts, 256 KiB a node.
const BUCKET_BITS: u32 = 18;

/// How many rows the table holds for the devices of each bucket, so that a lookup can tell that no row
/// matches without reading the table. A count is raised before the commit that adds a row and lowered
/// after the commit that removes one, so it is never below the rows committed; it may be above (a commit
/// that failed), which only costs a read. A count that reaches `u8::MAX` stays there.
struct RowCounts(Box<[AtomicU8]>);

impl RowCounts {
    fn new() -> Self {
        RowCounts((0..1usize << BUCKET_BITS).map(|_| AtomicU8::new(0)).collect())
    }

    fn bucket(&self, device: DeviceId) -> &AtomicU8 {
        // Device ids are random, but nothing relies on it: the multiply spreads any pattern of ids.
        let folded = (device.0 as u64) ^ ((device.0 >> 64) as u64);
        &self.0[(folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - BUCKET_BITS)) as usize]
    }

    fn added(&self, device: DeviceId) {
        let _ = self.bucket(device).fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_add(1));
    }

    fn removed(&self, device: DeviceId) {
        let lower = |n: u8| (n > 0 && n < u8::MAX).then(|| n - 1);
        let _ = self.bucket(device).fetch_update(Ordering::SeqCst, Ordering::SeqCst, lower);
    }

    /// Whether `device` may have a row; `false` means it has none.
    fn may_have(&self, device: DeviceId) -> bool {
        self.bucket(device).load(Ordering::SeqCst) > 0
    }
}

impl Registrations {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = super::open_private(path)?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(UNREGISTERED).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        let counts = RowCounts::new();
        let txn = db.begin_read().map_err(db_err)?;
        for row in txn.open_table(UNREGISTERED).map_err(db_err)?.iter().map_err(db_err)? {
            counts.added(DeviceId(row.map_err(db_err)?.0.value().0));
        }
        Ok(Registrations { db: Arc::new(db), counts: Arc::new(counts) })
    }

    /// Durably records that `device` unregistered `topic` at `at_ms`; returns once committed.
    pub async fn unregister(&self, device: DeviceId, topic: &str, at_ms: u64) -> Result<(), StoreError> {
        let (db, counts, topic) = (self.db.clone(), self.counts.clone(), crate::topic::app_topic(topic).to_string());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            let mut table = txn.open_table(UNREGISTERED).map_err(db_err)?;
            if table.insert((device.0, topic.as_str()), at_ms).map_err(db_err)?.is_none() {
                counts.added(device);
            }
            drop(table);
            txn.commit().map_err(db_err)
        })
        .await
        .map_err(db_err)?
    }

    /// Like `unregister`, but records nothing (and returns `false`) when `device` already has `max`
    /// unregistered topics and `topic` is not one of them: one device's rows stay bounded.
    pub async fn unregister_capped(
        &self,
        device: DeviceId,
        topic: &str,
        at_ms: u64,
        max: usize,
    ) -> Result<bool, StoreError> {
        let (db, counts, topic) = (self.db.clone(), self.counts.clone(), crate::topic::app_topic(topic).to_string());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut table = txn.open_table(UNREGISTERED).map_err(db_err)?;
                let known = table.get((device.0, topic.as_str())).map_err(db_err)?.is_some();
                if !known && count_rows(&table, device)? >= max {
                    return Ok(false);
                }
                if table.insert((device.0, topic.as_str()), at_ms).map_err(db_err)?.is_none() {
                    counts.added(device);
                }
            }
            txn.commit().map_err(db_err)?;
            Ok(true)
        })
        .await
        .map_err(db_err)?
    }

    /// How many topics `device` has unregistered.
    pub fn unregistered_count(&self, device: DeviceId) -> Result<usize, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        count_rows(&txn.open_table(UNREGISTERED).map_err(db_err)?, device)
    }

    /// Forgets an unregistration of `topic` by `device` (it registered the topic again).
    pub async fn register(&self, device: DeviceId, topic: &str) -> Result<(), StoreError> {
        if self.unregistered_at(device, topic)?.is_none() {
            // The common case: nothing to forget, no write transaction.
            return Ok(());
        }
        let (db, counts, topic) = (self.db.clone(), self.counts.clone(), crate::topic::app_topic(topic).to_string());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            let removed = txn
                .open_table(UNREGISTERED)
                .map_err(db_err)?
                .remove((device.0, topic.as_str()))
                .map_err(db_err)?
                .is_some();
            txn.commit().map_err(db_err)?;
            if removed {
                counts.removed(device);
            }
            Ok(())
        })
        .await
        .map_err(db_err)?
    }

    /// When `device` unregistered the app of `topic` (any of its channels), if it has.
    pub fn unregistered_at(&self, device: DeviceId, topic: &str) -> Result<Option<u64>, StoreError> {
        if !self.counts.may_have(device) {
            return Ok(None);
        }
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(UNREGISTERED).map_err(db_err)?;
        Ok(table.get((device.0, crate::topic::app_topic(topic))).map_err(db_err)?.map(|v| v.value()))
    }
}

fn count_rows(table: &impl ReadableTable<(u128, &'static str), u64>, device: DeviceId) -> Result<usize, StoreError> {
    let mut rows = 0;
    for row in table.range((device.0, "")..).map_err(db_err)? {
        let (key, _) = row.map_err(db_err)?;
        if key.value().0 != device.0 {
            break;
        }
        rows += 1;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unregistrations_survive_reopen_and_registering_clears_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registrations.redb");
        let device = DeviceId(42);
        {
            let registrations = Registrations::open(&path).unwrap();
            assert_eq!(registrations.unregistered_at(device, "com.example.app").unwrap(), None);
            registrations.unregister(device, "com.example.app", 1234).await.unwrap();
        }
        let registrations = Registrations::open(&path).unwrap();
        assert_eq!(registrations.unregistered_at(device, "com.example.app").unwrap(), Some(1234));
        assert_eq!(registrations.unregistered_at(device, "com.example.app.voip").unwrap(), Some(1234));
        assert_eq!(registrations.unregistered_at(device, "com.example.other").unwrap(), None);
        assert_eq!(registrations.unregistered_at(DeviceId(43), "com.example.app").unwrap(), None);
        registrations.register(device, "com.example.app").await.unwrap();
        assert_eq!(registrations.unregistered_at(device, "com.example.app").unwrap(), None);
        registrations.register(device, "com.example.app").await.unwrap();
    }

    /// The counts that spare most lookups a read never hide a row: a bucket shared by two devices stays
    /// counted while either has a row, and one that saturates stays counted for good.
    #[tokio::test]
    async fn row_counts_never_hide_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registrations.redb");
        let registrations = Registrations::open(&path).unwrap();
        let counts = &registrations.counts;
        // Two devices in one bucket.
        let first = DeviceId(1);
        let second = (2..).map(DeviceId).find(|d| std::ptr::eq(counts.bucket(*d), counts.bucket(first))).unwrap();
        assert!(!counts.may_have(first), "an empty table has nothing in any bucket");
        registrations.unregister(first, "com.example.a", 1).await.unwrap();
        registrations.unregister(first, "com.example.a", 2).await.unwrap();
        registrations.unregister(second, "com.example.a", 3).await.unwrap();
        assert_eq!(counts.bucket(first).load(Ordering::SeqCst), 2, "a row again is not a second row");
        registrations.register(first, "com.example.a").await.unwrap();
        assert_eq!(registrations.unregistered_at(first, "com.example.a").unwrap(), None);
        assert_eq!(registrations.unregistered_at(second, "com.example.a").unwrap(), Some(3), "still counted");
        registrations.register(second, "com.example.a").await.unwrap();
        assert!(!counts.may_have(first) && !counts.may_have(second));

        // Saturated: more rows than a count holds, then all of them removed but one.
        for n in 0..300 {
            registrations.unregister(first, &format!("com.example.app{n}"), n).await.unwrap();
        }
        for n in 1..300 {
            registrations.register(first, &format!("com.example.app{n}")).await.unwrap();
        }
        assert_eq!(registrations.unregistered_at(first, "com.example.app0").unwrap(), Some(0));
        drop(registrations);
        // Counted again from the table at open.
        let registrations = Registrations::open(&path).unwrap();
        assert_eq!(registrations.counts.bucket(first).load(Ordering::SeqCst), 1);
        assert_eq!(registrations.unregistered_at(first, "com.example.app0").unwrap(), Some(0));
    }

    #[tokio::test]
    async fn unregistrations_per_device_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let registrations = Registrations::open(&dir.path().join("registrations.redb")).unwrap();
        let (device, neighbour) = (DeviceId(7), DeviceId(8));
        registrations.unregister(neighbour, "com.example.z", 1).await.unwrap();
        assert!(registrations.unregister_capped(device, "com.example.a", 1, 2).await.unwrap());
        assert!(registrations.unregister_capped(device, "com.example.b", 1, 2).await.unwrap());
        assert!(!registrations.unregister_capped(device, "com.example.c", 1, 2).await.unwrap());
        assert!(registrations.unregister_capped(device, "com.example.a.voip", 2, 2).await.unwrap(), "a known app");
        assert_eq!(registrations.unregistered_count(device).unwrap(), 2);
        assert_eq!(registrations.unregistered_at(device, "com.example.c").unwrap(), None);
        assert_eq!(registrations.unregistered_count(neighbour).unwrap(), 1);
    }
}
