//! The gateway's copy of the cluster's channel book, kept by the cluster watch from the channel updates of
//! `WatchCluster`. Channel reads and broadcast checks are answered from it without asking a node; a write
//! is answered once the copy has reached the version the write produced, so that a provider reading after
//! its own write sees it.
//!
//! After a failover to a member that has applied less, the copy may for a moment be older than it was
//! (the stream starts over with that member's whole book); it catches up as that member applies.

use std::sync::{RwLock, RwLockReadGuard};
use std::time::Duration;

use courier_core::channel::{ChannelBook, ChannelChange, ChannelId, ChannelRecord};
use courier_proto::cluster::ChannelUpdate;
use tokio::sync::watch;

/// The channel book as this gateway last heard it.
pub struct ChannelView {
    book: RwLock<ChannelBook>,
    version: watch::Sender<u64>,
}

impl Default for ChannelView {
    fn default() -> Self {
        ChannelView { book: RwLock::default(), version: watch::Sender::new(0) }
    }
}

impl ChannelView {
    pub fn read(&self) -> RwLockReadGuard<'_, ChannelBook> {
        self.book.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies one update from the watch stream; an update that does not decode leaves the copy as it was
    /// and says why (the caller leaves that node).
    pub fn apply(&self, update: &ChannelUpdate) -> Result<(), String> {
        let puts = update
            .put_json
            .iter()
            .map(|json| serde_json::from_slice::<ChannelRecord>(json))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("an unreadable channel record: {e}"))?;
        let deletes = update
            .deleted
            .iter()
            .map(|id| ChannelId::from_slice(id).ok_or("a deleted channel id is not 16 bytes"))
            .collect::<Result<Vec<_>, _>>()?;
        {
            let mut book = self.book.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            if update.reset {
                book.reset(update.version);
            }
            for record in puts {
                book.take_at(&ChannelChange::Put { record }, update.version);
            }
            for id in deletes {
                book.take_at(&ChannelChange::Delete { id }, update.version);
            }
        }
        self.version.send_replace(update.version);
        metrics::gauge!("courier_gateway_channels").set(self.read().len() as f64);
        Ok(())
    }

    /// Waits until the copy has reached `version`, for `limit` at most; false if it did not.
    pub async fn caught_up(&self, version: u64, limit: Duration) -> bool {
        let mut versions = self.version.subscribe();
        tokio::time::timeout(limit, versions.wait_for(|held| *held >= version)).await.is_ok_and(|seen| seen.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use courier_core::channel::{ChannelPushType, StoragePolicy};

    use super::*;

    fn json(n: u8) -> Vec<u8> {
        let record = ChannelRecord {
            id: ChannelId([n; 16]),
            team_id: "T".into(),
            app: "a".into(),
            policy: StoragePolicy::NoStorage,
            push_type: ChannelPushType::LiveActivity,
            created_ms: u64::from(n),
        };
        serde_json::to_vec(&record).expect("json")
    }

    #[tokio::test]
    async fn updates_build_the_book_and_a_writer_waits_for_its_version() {
        let view = ChannelView::default();
        view.apply(&ChannelUpdate { reset: true, version: 5, put_json: vec![json(1), json(2)], deleted: vec![] })
            .expect("whole book");
        view.apply(&ChannelUpdate { reset: false, version: 5, put_json: vec![json(3)], deleted: vec![] })
            .expect("rest of the book");
        assert_eq!(view.read().list("T", "a").len(), 3);
        assert!(view.caught_up(5, Duration::ZERO).await);
        assert!(!view.caught_up(6, Duration::from_millis(10)).await);
        view.apply(&ChannelUpdate { reset: false, version: 6, put_json: vec![], deleted: vec![vec![1; 16]] })
            .expect("delete");
        assert!(view.caught_up(6, Duration::ZERO).await);
        assert!(view.read().get("T", "a", ChannelId([1; 16])).is_none());
        // A reset drops whatever was held before it.
        view.apply(&ChannelUpdate { reset: true, version: 7, put_json: vec![json(9)], deleted: vec![] })
            .expect("reset");
        assert_eq!(view.read().len(), 1);
        assert_eq!(view.read().version(), 7);
        // A bad record changes nothing.
        let bad = ChannelUpdate { reset: true, version: 8, put_json: vec![b"{}".to_vec()], deleted: vec![] };
        assert!(view.apply(&bad).is_err());
        assert_eq!(view.read().len(), 1);
    }
}
