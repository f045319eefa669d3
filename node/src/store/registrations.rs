//! Which apps each device has unregistered, and when: the record behind APNs's 410 `Unregistered`.
//!
//! A device that sends `UnregisterTopic` (the app was removed, or it stopped wanting pushes) gets a row
//! (device id, app topic) → UNIX ms; registering the topic again deletes it. `Deliver` on the owning node
//! consults it before storing anything, so later pushes to that token answer 410 with the time. It is its
//! own small redb database (`registrations.redb` beside the queue), written rarely and read once per push
//! through an MVCC read transaction; it never touches the queue's group-commit writer.
//!
//! The row lives on the node the device was connected to when it unregistered (its ring owner). It does
//! not follow the device when the ring moves it; see the gateway README.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{StoreError, db_err};
use crate::ids::DeviceId;

/// (device id, app topic) → when the device unregistered it, UNIX ms.
const UNREGISTERED: TableDefinition<(u128, &str), u64> = TableDefinition::new("unregistered_topics");

/// Handle to the registrations database; cheap to clone.
#[derive(Clone)]
pub struct Registrations {
    db: Arc<Database>,
}

impl Registrations {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = super::open_private(path)?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(UNREGISTERED).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Registrations { db: Arc::new(db) })
    }

    /// Durably records that `device` unregistered `topic` at `at_ms`; returns once committed.
    pub async fn unregister(&self, device: DeviceId, topic: &str, at_ms: u64) -> Result<(), StoreError> {
        let (db, topic) = (self.db.clone(), crate::topic::app_topic(topic).to_string());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(UNREGISTERED).map_err(db_err)?.insert((device.0, topic.as_str()), at_ms).map_err(db_err)?;
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
        let (db, topic) = (self.db.clone(), crate::topic::app_topic(topic).to_string());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut table = txn.open_table(UNREGISTERED).map_err(db_err)?;
                let known = table.get((device.0, topic.as_str())).map_err(db_err)?.is_some();
                if !known && count_rows(&table, device)? >= max {
                    return Ok(false);
                }
                table.insert((device.0, topic.as_str()), at_ms).map_err(db_err)?;
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
        let (db, topic) = (self.db.clone(), crate::topic::app_topic(topic).to_string());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(UNREGISTERED).map_err(db_err)?.remove((device.0, topic.as_str())).map_err(db_err)?;
            txn.commit().map_err(db_err)
        })
        .await
        .map_err(db_err)?
    }

    /// When `device` unregistered the app of `topic` (any of its channels), if it has.
    pub fn unregistered_at(&self, device: DeviceId, topic: &str) -> Result<Option<u64>, StoreError> {
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
