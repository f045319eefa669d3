//! The Raft log and the vote (openraft's `RaftLogStorage`): entries by index, plus the vote, the committed
//! log id and the last purged log id, each write committed (fsync) before openraft hears it happened.

use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable};
use serde::Serialize;

use super::*;
use crate::raft::{NodeId, TypeConfig};

/// The Raft log and vote. Clones share the database and serve as openraft's log readers.
#[derive(Clone)]
pub struct LogStore {
    pub(super) db: Arc<Database>,
    /// The last committed log index openraft reported, for the `courier_raft_committed_index` gauge.
    pub(super) committed_index: Arc<std::sync::atomic::AtomicU64>,
}

impl LogStore {
    /// A live reading of the committed log index (0 before anything is committed).
    pub fn committed_index(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.committed_index.clone()
    }

    /// Writes one log-meta record durably.
    async fn put_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), RaftStoreError> {
        let bytes = serde_json::to_vec(value)?;
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            txn.open_table(LOG_META)?.insert(key, bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_meta<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, RaftStoreError> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read()?;
            read_json(&txn.open_table(LOG_META)?, key)
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, RaftError> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read()?;
            let log = txn.open_table(LOG)?;
            let mut entries = Vec::new();
            for row in log.range::<u64>(bounds)? {
                let (_, value) = row?;
                entries.push(serde_json::from_slice(value.value())?);
            }
            Ok(entries)
        })
        .await
        .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftError> {
        let db = self.db.clone();
        let (last_purged_log_id, last_entry) = blocking(move || {
            let txn = db.begin_read()?;
            let last_purged: Option<LogId<NodeId>> = read_json(&txn.open_table(LOG_META)?, LAST_PURGED)?;
            let last_entry = match txn.open_table(LOG)?.last()? {
                Some((_, value)) => Some(serde_json::from_slice::<EntryLogId>(value.value())?.log_id),
                None => None,
            };
            Ok((last_purged, last_entry))
        })
        .await
        .map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(LogState { last_purged_log_id, last_log_id: last_entry.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftError> {
        self.put_meta(VOTE, vote).await.map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftError> {
        self.get_meta(VOTE).await.map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), RaftError> {
        let index = committed.map_or(0, |c| c.index);
        self.committed_index.store(index, std::sync::atomic::Ordering::Relaxed);
        self.put_meta(COMMITTED, &committed)
            .await
            .map_err(|e| StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, &e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, RaftError> {
        // Stored as `Option` itself, so "never saved" and "saved as None" both read back as None.
        let committed: Option<Option<LogId<NodeId>>> = self
            .get_meta(COMMITTED)
            .await
            .map_err(|e| StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, &e))?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), RaftError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows = entries
            .into_iter()
            .map(|entry| Ok((entry.log_id.index, serde_json::to_vec(&entry)?)))
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut log = txn.open_table(LOG)?;
                for (index, bytes) in &rows {
                    log.insert(*index, bytes.as_slice())?;
                }
            }
            // Default durability is immediate: once this returns the entries are on disk, which is what
            // the callback below promises openraft.
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e))?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftError> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            txn.open_table(LOG)?.retain_in(log_id.index.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Delete, &e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftError> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(LOG_META)?;
                let previous: Option<LogId<NodeId>> = read_json(&meta, LAST_PURGED)?;
                // Openraft only purges forwards; keeping the maximum makes a replayed purge harmless.
                if previous < Some(log_id) {
                    meta.insert(LAST_PURGED, serde_json::to_vec(&log_id)?.as_slice())?;
                }
                txn.open_table(LOG)?.retain_in(..=log_id.index, |_, _| false)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Delete, &e).into())
    }
}
