//! The applied channel book as the rest of the node reads it, and the changes it takes as watchers hear
//! them.
//!
//! The state machine (`store::machine`) decides channel commands and stores them; once they are committed
//! it hands them here. A change is published while the book's write lock is held, and a watcher reads the
//! whole book and subscribes under the read lock, so a watcher sees every change exactly once after the
//! records it started from, never one twice or one missed. A watcher too slow for the bounded queue of
//! changes, or one that was watching when a snapshot replaced the book, is told to start over.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use courier_core::channel::{ChannelBook, ChannelChange, ChannelRecord};
use tokio::sync::broadcast;

/// Changes a watcher may fall behind by before it must read the whole book again.
const WATCH_QUEUE: usize = 4096;

/// What a watcher hears after its first read.
#[derive(Debug, Clone)]
pub enum ChannelEvent {
    /// One change, which brings the book to `version`.
    Change { version: u64, change: ChannelChange },
    /// The book was replaced (a snapshot was installed): read it whole again.
    Reset,
}

/// The node's channel book, shared by the state machine, the cluster API and the device links.
pub struct ChannelShelf {
    book: RwLock<ChannelBook>,
    events: broadcast::Sender<ChannelEvent>,
    /// The book's version, for waiting on a change without reading every event.
    version: tokio::sync::watch::Sender<u64>,
}

/// A watcher's start: every record at `version`, and the changes after it.
pub struct ChannelWatch {
    pub version: u64,
    pub records: Vec<ChannelRecord>,
    pub events: broadcast::Receiver<ChannelEvent>,
}

impl ChannelShelf {
    pub fn new(book: ChannelBook) -> Arc<Self> {
        let (events, _) = broadcast::channel(WATCH_QUEUE);
        let version = tokio::sync::watch::Sender::new(book.version());
        Arc::new(ChannelShelf { book: RwLock::new(book), events, version })
    }

    /// The book as applied. Hold the guard briefly: the state machine waits for it to apply.
    pub fn read(&self) -> RwLockReadGuard<'_, ChannelBook> {
        self.book.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every record now, and a receiver of every change after them.
    pub fn watch(&self) -> ChannelWatch {
        let book = self.read();
        let events = self.events.subscribe();
        ChannelWatch { version: book.version(), records: book.records().cloned().collect(), events }
    }

    /// Takes committed changes, publishing each.
    pub fn take(&self, changes: &[ChannelChange]) {
        let mut book = self.book.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for change in changes {
            book.take(change);
            // No receiver is not an error: nobody is watching.
            let _ = self.events.send(ChannelEvent::Change { version: book.version(), change: change.clone() });
        }
        let version = book.version();
        // The version watch's lock is never taken under the book's (see `has_or_awaits`).
        drop(book);
        self.version.send_replace(version);
    }

    /// Whether channel `id` is in the book, waiting up to `limit` for it to arrive: a channel a gateway
    /// just created may not be applied here yet (followers apply a committed entry up to a Raft heartbeat
    /// later), and a device told of it at once subscribes at once.
    ///
    /// The book is read with no lock of the version watch held (`watch::Receiver::wait_for` would hold one
    /// around the read), and the state machine publishes a version after letting go of the book: taking
    /// the two locks in both orders hung a node's links and its state machine for good.
    pub async fn has_or_awaits(&self, id: courier_core::channel::ChannelId, limit: std::time::Duration) -> bool {
        let mut versions = self.version.subscribe();
        let arrived = async {
            loop {
                // Seen before the read: a change applied after it wakes `changed`.
                versions.mark_unchanged();
                if self.read().find(id).is_some() {
                    return true;
                }
                if versions.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(limit, arrived).await.unwrap_or(false)
    }

    /// Replaces the whole book (a snapshot installed) and tells every watcher to read it again.
    pub fn replace(&self, book: ChannelBook) {
        let mut held = self.book.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let version = book.version();
        *held = book;
        let _ = self.events.send(ChannelEvent::Reset);
        drop(held);
        self.version.send_replace(version);
    }
}

#[cfg(test)]
mod tests {
    use courier_core::channel::{ChannelId, ChannelPushType, StoragePolicy};

    use super::*;

    fn put(n: u8) -> ChannelChange {
        ChannelChange::Put {
            record: ChannelRecord {
                id: ChannelId([n; 16]),
                team_id: "T".into(),
                app: "a".into(),
                policy: StoragePolicy::MostRecent,
                push_type: ChannelPushType::LiveActivity,
                created_ms: 1,
            },
        }
    }

    #[test]
    fn a_watcher_hears_each_change_after_its_start_once() {
        let shelf = ChannelShelf::new(ChannelBook::default());
        shelf.take(&[put(1)]);
        let mut watch = shelf.watch();
        assert_eq!((watch.version, watch.records.len()), (1, 1));
        shelf.take(&[put(2), ChannelChange::Delete { id: ChannelId([1; 16]) }]);
        let versions: Vec<u64> = (0..2)
            .map(|_| match watch.events.try_recv().expect("a change") {
                ChannelEvent::Change { version, .. } => version,
                ChannelEvent::Reset => panic!("no reset was made"),
            })
            .collect();
        assert_eq!(versions, [2, 3]);
        assert!(watch.events.try_recv().is_err(), "nothing more");
        shelf.replace(ChannelBook::default());
        assert!(matches!(watch.events.try_recv(), Ok(ChannelEvent::Reset)));
        assert!(shelf.read().is_empty());
    }

    #[tokio::test]
    async fn a_channel_not_applied_yet_is_waited_for() {
        let shelf = ChannelShelf::new(ChannelBook::default());
        let id = ChannelId([7; 16]);
        assert!(!shelf.has_or_awaits(id, std::time::Duration::from_millis(20)).await, "never created");
        let waiting = {
            let shelf = shelf.clone();
            tokio::spawn(async move { shelf.has_or_awaits(id, std::time::Duration::from_secs(10)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        shelf.take(&[put(7)]);
        assert!(waiting.await.expect("task"), "seen once applied");
        assert!(shelf.has_or_awaits(id, std::time::Duration::ZERO).await, "already there");
    }

    /// A link waiting for a channel and the state machine applying channels at the same moment: each takes
    /// the book's lock and the version watch's lock, and neither may hold one while it waits for the other.
    /// With the order crossed this hangs both (a node whose devices subscribed to a channel just created
    /// stopped whole once), so the threads below must finish.
    #[test]
    fn waiting_for_a_channel_while_channels_are_applied_does_not_hang() {
        const ROUNDS: u8 = 16;
        let shelf = ChannelShelf::new(ChannelBook::default());
        let (done, finished) = std::sync::mpsc::channel();
        let applier = {
            let (shelf, done) = (shelf.clone(), done.clone());
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    for n in 0..=u8::MAX {
                        shelf.take(&[put(n)]);
                        shelf.take(&[ChannelChange::Delete { id: ChannelId([n; 16]) }]);
                    }
                    let _ = done.send(("applier", round));
                }
            })
        };
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let (shelf, done) = (shelf.clone(), done.clone());
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
                    for round in 0..ROUNDS {
                        for n in 0..=u8::MAX {
                            runtime.block_on(shelf.has_or_awaits(ChannelId([n; 16]), std::time::Duration::ZERO));
                        }
                        let _ = done.send(("waiter", round));
                    }
                })
            })
            .collect();
        drop(done);
        // Each thread reports every round; a hang stops the reports.
        let mut reports = 0;
        loop {
            match finished.recv_timeout(std::time::Duration::from_secs(20)) {
                Ok(_) => reports += 1,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("no thread finished a round in 20 s after {reports} rounds: the locks deadlocked")
                }
            }
        }
        assert_eq!(reports, 3 * usize::from(ROUNDS));
        applier.join().expect("applier");
        waiters.into_iter().for_each(|w| w.join().expect("waiter"));
        assert!(shelf.read().is_empty(), "every channel put was deleted again");
    }
}
