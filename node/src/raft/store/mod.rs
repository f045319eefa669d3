//! Durable storage for the node's Raft replica: the log, the vote and the state machine, in one redb file.
//!
//! `open` returns the two halves openraft's storage-v2 API asks for (in the shape of openraft's
//! `log-rocks` and `sm-rocks` examples, one file each). `LogStore` (`log.rs`) keeps log entries by index
//! plus the vote, the committed log id and the last purged log id; every write is committed (fsync)
//! before openraft is told it happened. `StateMachineStore` (`machine.rs`) keeps the applied
//! `ClusterState` together with the last applied log id and membership, rewritten in one transaction per
//! `apply` batch so a restarted node resumes where it stopped instead of replaying the log; it also keeps
//! the current snapshot, and publishes every new `ClusterState` on a watch channel for the rest of the
//! node.
//!
//! This is a separate database from the notification queues (`crate::store`): the control plane's write
//! pattern (small, rare, must be fsynced one by one) has nothing in common with the queue's group commits.
//! Nothing here interprets commands; that is `state::ClusterState::apply`. Records hold token-key secrets,
//! so they are never logged: only `Command`'s `Display` (which hides secrets) reaches the logs.

use std::path::Path;
use std::sync::Arc;

use openraft::{BasicNode, LogId, StorageError, StoredMembership};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::channels::ChannelShelf;
use super::{ClusterState, NodeId};
use courier_core::channel::{ChannelBook, ChannelRecord};

mod log;
mod machine;

pub use log::LogStore;
pub use machine::StateMachineStore;

/// Log index → serde_json of the `Entry`. Indexes are contiguous between the last purged and the last entry.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// The log's own bookkeeping (vote, committed, last purged), serde_json.
const LOG_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_log_meta");
/// The applied state machine and the current snapshot, serde_json (snapshot data as raw bytes).
const MACHINE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_machine");
/// The channel book: channel id (16 bytes) → serde_json of its `ChannelRecord`. Written in the same
/// transaction as the `APPLIED` image, whose `channels_version` it matches.
const CHANNELS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("raft_channels");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
/// The `MachineImage` as of the last applied batch or installed snapshot.
const APPLIED: &str = "applied";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";
/// How many snapshots this node has built: keeps snapshot ids unique across rebuilds at the same log id,
/// and across restarts.
const SNAPSHOT_SEQ: &str = "snapshot_seq";

type Membership = StoredMembership<NodeId, BasicNode>;
type RaftError = StorageError<NodeId>;

#[derive(Debug, thiserror::Error)]
pub enum RaftStoreError {
    #[error("creating the directory of {path}: {source}")]
    CreateDir { path: String, source: std::io::Error },
    #[error("making {path} readable by its owner only: {source}")]
    Restrict { path: String, source: std::io::Error },
    #[error("opening the Raft database at {path}: {source}")]
    Open { path: String, source: redb::DatabaseError },
    #[error("Raft database transaction: {0}")]
    Transaction(#[from] Box<redb::TransactionError>),
    #[error("Raft database table: {0}")]
    Table(#[from] Box<redb::TableError>),
    #[error("Raft database: {0}")]
    Storage(#[from] Box<redb::StorageError>),
    #[error("Raft database commit: {0}")]
    Commit(#[from] Box<redb::CommitError>),
    #[error("encoding or decoding a Raft record: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("the storage task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("snapshot {snapshot_id} does not match its metadata")]
    SnapshotMismatch { snapshot_id: String },
    #[error("snapshot {snapshot_id} has metadata but no data")]
    SnapshotDataMissing { snapshot_id: String },
}

// redb's errors are large; boxing them keeps every `Result` in this module small.
impl From<redb::TransactionError> for RaftStoreError {
    fn from(e: redb::TransactionError) -> Self {
        RaftStoreError::Transaction(Box::new(e))
    }
}

impl From<redb::TableError> for RaftStoreError {
    fn from(e: redb::TableError) -> Self {
        RaftStoreError::Table(Box::new(e))
    }
}

impl From<redb::StorageError> for RaftStoreError {
    fn from(e: redb::StorageError) -> Self {
        RaftStoreError::Storage(Box::new(e))
    }
}

impl From<redb::CommitError> for RaftStoreError {
    fn from(e: redb::CommitError) -> Self {
        RaftStoreError::Commit(Box::new(e))
    }
}

/// Everything the state machine is, as persisted after each apply batch and as carried in a snapshot.
/// Generic over how the state is held so it serializes from a borrow and deserializes into an owned value.
#[derive(Serialize, Deserialize)]
struct MachineImage<S> {
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    state: S,
    /// The channel book's version; absent from images written before channels existed.
    #[serde(default)]
    channels_version: u64,
    /// Every channel, in a snapshot only: the applied image leaves them in `CHANNELS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    channels: Option<Vec<ChannelRecord>>,
}

/// Just the log id of a stored entry, so finding the last log id does not decode its command.
#[derive(Deserialize)]
struct EntryLogId {
    log_id: LogId<NodeId>,
}

/// Opens (creating if needed) the Raft database at `path` and returns the log store, the state machine and
/// a receiver that always holds the latest applied `ClusterState`, starting with what was persisted.
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore, watch::Receiver<Arc<ClusterState>>), RaftStoreError> {
    open_with(path, ChannelShelf::new(ChannelBook::default()))
}

/// `open`, loading the stored channels into `channels` (the shelf the rest of the node reads them from).
pub fn open_with(
    path: &Path,
    channels: Arc<ChannelShelf>,
) -> Result<(LogStore, StateMachineStore, watch::Receiver<Arc<ClusterState>>), RaftStoreError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|source| RaftStoreError::CreateDir { path: path.display().to_string(), source })?;
    }
    // It holds the token keys: owner-only, like every other secret.
    crate::secret_file::restrict(path)
        .map_err(|source| RaftStoreError::Restrict { path: path.display().to_string(), source })?;
    let db =
        Database::create(path).map_err(|source| RaftStoreError::Open { path: path.display().to_string(), source })?;
    let txn = db.begin_write()?;
    {
        // Created up front so read transactions never meet a missing table.
        txn.open_table(LOG)?;
        txn.open_table(LOG_META)?;
        txn.open_table(MACHINE)?;
        txn.open_table(CHANNELS)?;
    }
    txn.commit()?;

    let image: MachineImage<ClusterState> = {
        let txn = db.begin_read()?;
        let machine = txn.open_table(MACHINE)?;
        read_json(&machine, APPLIED)?.unwrap_or_else(|| MachineImage {
            last_applied: None,
            last_membership: Membership::default(),
            state: ClusterState::default(),
            channels_version: 0,
            channels: None,
        })
    };
    let records = {
        let txn = db.begin_read()?;
        let table = txn.open_table(CHANNELS)?;
        let mut records = Vec::new();
        for row in table.iter()? {
            let (_, value) = row?;
            records.push(serde_json::from_slice::<ChannelRecord>(value.value())?);
        }
        records
    };
    channels.replace(ChannelBook::from_records(image.channels_version, records));
    let mut state = image.state;
    state.repair_ring();
    let state = Arc::new(state);
    let (published, receiver) = watch::channel(state.clone());
    let db = Arc::new(db);
    let log = LogStore { db: db.clone(), committed_index: Arc::new(std::sync::atomic::AtomicU64::new(0)) };
    let machine = StateMachineStore {
        db,
        last_applied: image.last_applied,
        last_membership: image.last_membership,
        state,
        published: Arc::new(published),
        channels,
        frozen_channels: None,
    };
    Ok((log, machine, receiver))
}

fn read_json<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, RaftStoreError> {
    match table.get(key)? {
        Some(value) => Ok(Some(serde_json::from_slice(value.value())?)),
        None => Ok(None),
    }
}

/// Runs redb work off the async workers: commits fsync, and openraft's core and state-machine tasks share
/// the runtime with the node's network I/O.
async fn blocking<T, F>(work: F) -> Result<T, RaftStoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, RaftStoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(work).await?
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
    use openraft::testing::{StoreBuilder, Suite, blank_ent, log_id, membership_ent};
    use openraft::{RaftLogReader, RaftSnapshotBuilder};
    use std::io::Cursor;

    use openraft::{CommittedLeaderId, Entry, EntryPayload, Membership, SnapshotMeta, StorageIOError, Vote};
    use tempfile::TempDir;

    use super::*;
    use crate::raft::TypeConfig;
    use crate::raft::state::{Command, CommandResponse, Epoch, MemberState, RingParams};
    use crate::token::{TokenKey, TokenKeyId};

    /// Opens a fresh store in its own directory; the directory lives as long as the suite's guard.
    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
        async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), RaftError> {
            let dir = TempDir::new().map_err(|e| StorageIOError::write(&e))?;
            let (log, machine, _) = open(&dir.path().join("raft.redb")).map_err(|e| StorageIOError::write(&e))?;
            Ok((dir, log, machine))
        }
    }

    #[test]
    fn passes_openraft_storage_suite() {
        // The suite builds its own runtimes, so this is a plain test.
        if let Err(e) = Suite::test_all(Builder) {
            panic!("openraft storage suite: {e}");
        }
    }

    fn normal(term: u64, index: u64, command: Command) -> Entry<TypeConfig> {
        Entry { log_id: log_id(term, 1, index), payload: EntryPayload::Normal(command) }
    }

    fn put_member(id: NodeId) -> Command {
        Command::PutMember {
            id,
            device_addr: format!("10.0.0.{id}:5223"),
            cluster_addr: format!("10.0.0.{id}:7000"),
            device_name: String::new(),
            now_ms: 1_000 + id,
        }
    }

    fn voters(ids: &[NodeId]) -> Vec<BTreeSet<NodeId>> {
        vec![ids.iter().copied().collect()]
    }

    /// The state as JSON: `ClusterState` has no `PartialEq` (token keys are not comparable).
    fn as_json(state: &ClusterState) -> serde_json::Value {
        serde_json::to_value(state).expect("cluster state serializes")
    }

    /// A state machine with two members, one token key and a membership change, at log index 5.
    async fn populate(machine: &mut StateMachineStore) -> Vec<CommandResponse> {
        let key = TokenKey::from_secret(TokenKeyId(7), [0x5a; 32]);
        let entries = vec![
            blank_ent::<TypeConfig>(1, 1, 1),
            membership_ent::<TypeConfig>(1, 1, 2, voters(&[1, 2])),
            normal(1, 3, put_member(1)),
            normal(1, 4, put_member(2)),
            normal(1, 5, Command::RotateTokenKey { key, now_ms: 2_000 }),
            normal(1, 6, Command::SetMemberState { id: 9, state: MemberState::Active, now_ms: 3_000 }),
        ];
        machine.apply(entries).await.expect("apply")
    }

    #[tokio::test]
    async fn apply_answers_each_entry_in_order() {
        let dir = TempDir::new().expect("tempdir");
        let (_log, mut machine, _watch) = open(&dir.path().join("raft.redb")).expect("open");
        let responses = populate(&mut machine).await;
        assert_eq!(
            responses,
            [
                CommandResponse::Applied { epoch: Epoch(0) },
                CommandResponse::Applied { epoch: Epoch(0) },
                CommandResponse::Applied { epoch: Epoch(1) },
                CommandResponse::Applied { epoch: Epoch(2) },
                CommandResponse::Applied { epoch: Epoch(3) },
                CommandResponse::Refused { reason: "no such member".into() },
            ]
        );
        assert!(machine.apply(Vec::new()).await.expect("empty batch").is_empty());
    }

    /// An entry written before commands were bounded (a `SetRing` of u32::MAX virtual nodes would make
    /// every process build a ring of billions of points) replays as a refusal that changes nothing, and
    /// the entries after it apply as usual.
    #[tokio::test]
    async fn an_out_of_bounds_entry_in_an_old_log_replays_as_a_refusal() {
        let dir = TempDir::new().expect("tempdir");
        let (_log, mut machine, _watch) = open(&dir.path().join("raft.redb")).expect("open");
        populate(&mut machine).await;
        let before = as_json(&machine.state());
        let huge = RingParams { vnodes: u32::MAX, replication_factor: u32::MAX };
        let responses = machine
            .apply([normal(1, 7, Command::SetRing { params: huge }), normal(1, 8, put_member(3))])
            .await
            .expect("apply");
        assert!(
            matches!(&responses[0], CommandResponse::Refused { reason } if reason.contains("vnodes")),
            "{responses:?}"
        );
        assert_eq!(responses[1], CommandResponse::Applied { epoch: Epoch(4) });
        let state = machine.state();
        assert_eq!(state.ring, RingParams::default());
        assert_eq!(state.epoch, Epoch(4));
        assert_eq!(as_json(&state)["ring"], before["ring"]);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_raft_database_holding_token_keys_is_owner_only() {
        let dir = TempDir::new().expect("tempdir");
        let path = dir.path().join("raft.redb");
        let (_log, mut machine, _watch) = open(&path).expect("open");
        populate(&mut machine).await;
        assert_eq!(crate::secret_file::mode(&path).expect("mode"), 0o600);
    }

    #[tokio::test]
    async fn state_machine_survives_a_reopen() {
        let dir = TempDir::new().expect("tempdir");
        let path = dir.path().join("raft.redb");
        let (expected_state, expected_applied) = {
            let (_log, mut machine, mut watch) = open(&path).expect("open");
            populate(&mut machine).await;
            let published = watch.borrow_and_update().clone();
            assert_eq!(as_json(&published), as_json(&machine.state()), "apply publishes its state");
            (as_json(&machine.state()), machine.applied_state().await.expect("applied state"))
        };

        let (_log, mut machine, watch) = open(&path).expect("reopen");
        assert_eq!(machine.applied_state().await.expect("applied state"), expected_applied);
        assert_eq!(expected_applied.0, Some(log_id(1, 1, 6)));
        assert_eq!(expected_applied.1.log_id(), &Some(log_id(1, 1, 2)));
        assert_eq!(expected_applied.1.membership(), &Membership::new(voters(&[1, 2]), None));
        assert_eq!(as_json(&machine.state()), expected_state);
        assert_eq!(as_json(&watch.borrow()), expected_state, "the receiver starts from the persisted state");
        assert_eq!(machine.state().epoch, Epoch(3));
        assert_eq!(machine.state().active_key().map(|r| r.key.id), Some(TokenKeyId(7)));
    }

    /// A state an older version persisted with a ring no process can build opens with the default ring.
    #[tokio::test]
    async fn a_stored_ring_out_of_bounds_opens_as_the_default() {
        let dir = TempDir::new().expect("tempdir");
        let path = dir.path().join("raft.redb");
        {
            let (_log, mut machine, _watch) = open(&path).expect("open");
            populate(&mut machine).await;
            let txn = machine.db.begin_write().expect("write");
            {
                let mut table = txn.open_table(MACHINE).expect("machine table");
                let mut image: serde_json::Value =
                    serde_json::from_slice(table.get(APPLIED).expect("read").expect("applied").value()).expect("json");
                image["state"]["ring"]["vnodes"] = u32::MAX.into();
                table.insert(APPLIED, serde_json::to_vec(&image).expect("json").as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let (_log, machine, watch) = open(&path).expect("reopen");
        assert_eq!(machine.state().ring, RingParams::default());
        assert_eq!(watch.borrow().ring, RingParams::default());
        assert_eq!(machine.state().epoch, Epoch(3), "the rest of the state is as stored");
    }

    #[tokio::test]
    async fn snapshot_moves_the_state_to_a_fresh_store() {
        let dir = TempDir::new().expect("tempdir");
        let (_log, mut leader, _leader_watch) = open(&dir.path().join("leader.redb")).expect("open leader");
        populate(&mut leader).await;
        let built = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");
        assert_eq!(built.meta.last_log_id, Some(log_id(1, 1, 6)));
        let again = leader.get_snapshot_builder().await.build_snapshot().await.expect("rebuild");
        assert_ne!(again.meta.snapshot_id, built.meta.snapshot_id, "snapshot ids are unique");
        let current = leader.get_current_snapshot().await.expect("current").expect("a snapshot");
        assert_eq!(current.meta, again.meta);

        let follower_path = dir.path().join("follower.redb");
        {
            let (_log, mut follower, mut follower_watch) = open(&follower_path).expect("open follower");
            let mut received = follower.begin_receiving_snapshot().await.expect("begin");
            assert!(received.get_ref().is_empty());
            *received = *current.snapshot;
            follower.install_snapshot(&current.meta, received).await.expect("install");

            assert!(follower_watch.has_changed().expect("sender alive"), "install publishes");
            let published = follower_watch.borrow_and_update().clone();
            assert_eq!(as_json(&published), as_json(&leader.state()));
            assert_eq!(
                follower.applied_state().await.expect("applied"),
                leader.applied_state().await.expect("applied")
            );
            let installed = follower.get_current_snapshot().await.expect("current").expect("a snapshot");
            assert_eq!(installed.meta, current.meta);
        }

        // The installed state is the follower's applied state from now on, restarts included.
        let (_log, mut follower, follower_watch) = open(&follower_path).expect("reopen follower");
        assert_eq!(follower.applied_state().await.expect("applied"), leader.applied_state().await.expect("applied"));
        assert_eq!(as_json(&follower_watch.borrow()), as_json(&leader.state()));
        let responses = follower.apply([normal(2, 7, put_member(3))]).await.expect("apply after install");
        assert_eq!(responses, [CommandResponse::Applied { epoch: Epoch(4) }]);
    }

    #[tokio::test]
    async fn a_stale_builder_does_not_replace_an_installed_snapshot() {
        let dir = TempDir::new().expect("tempdir");
        let (_log, mut leader, _leader_watch) = open(&dir.path().join("leader.redb")).expect("open leader");
        populate(&mut leader).await;
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");

        let (_log, mut follower, _follower_watch) = open(&dir.path().join("follower.redb")).expect("open follower");
        let mut stale = follower.get_snapshot_builder().await;
        follower.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install");
        let late = stale.build_snapshot().await.expect("stale build");
        assert_eq!(late.meta.last_log_id, None);
        let current = follower.get_current_snapshot().await.expect("current").expect("a snapshot");
        assert_eq!(current.meta, snapshot.meta);
    }

    #[tokio::test]
    async fn hostile_snapshot_bytes_change_nothing() {
        let dir = TempDir::new().expect("tempdir");
        let (_log, mut machine, watch) = open(&dir.path().join("raft.redb")).expect("open");
        populate(&mut machine).await;
        let before = (as_json(&machine.state()), machine.applied_state().await.expect("applied"));
        let genuine = machine.get_snapshot_builder().await.build_snapshot().await.expect("build");

        let mut lying_meta = genuine.meta.clone();
        lying_meta.last_log_id = Some(log_id(9, 9, 99));
        let hostile: [(SnapshotMeta<NodeId, BasicNode>, Vec<u8>); 4] = [
            (genuine.meta.clone(), Vec::new()),
            (genuine.meta.clone(), vec![0xff; 64]),
            (genuine.meta.clone(), b"{\"last_applied\":null,\"state\":[1,2,3]}".to_vec()),
            (lying_meta, genuine.snapshot.get_ref().clone()),
        ];
        for (meta, bytes) in hostile {
            let result = machine.install_snapshot(&meta, Box::new(Cursor::new(bytes))).await;
            assert!(result.is_err(), "installed a hostile snapshot");
        }
        assert_eq!((as_json(&machine.state()), machine.applied_state().await.expect("applied")), before);
        assert_eq!(as_json(&watch.borrow()), before.0);
        let current = machine.get_current_snapshot().await.expect("current").expect("a snapshot");
        assert_eq!(current.meta, genuine.meta);
    }

    fn channel(n: u8, team: &str) -> ChannelRecord {
        ChannelRecord {
            id: courier_core::channel::ChannelId([n; 16]),
            team_id: team.into(),
            app: "com.example.app".into(),
            policy: courier_core::channel::StoragePolicy::MostRecent,
            push_type: courier_core::channel::ChannelPushType::LiveActivity,
            created_ms: u64::from(n),
        }
    }

    fn create(n: u8, team: &str) -> Command {
        Command::Channel {
            command: courier_core::channel::ChannelCommand::Create { record: channel(n, team), max_per_app: 2 },
        }
    }

    fn ids(shelf: &ChannelShelf) -> Vec<u8> {
        let mut ids: Vec<u8> = shelf.read().records().map(|r| r.id.0[0]).collect();
        ids.sort();
        ids
    }

    /// Channel commands change the book, not the control state: no epoch moves and nothing is published on
    /// the state watch. The book is stored row by row, survives a reopen and travels in snapshots, where
    /// an installed one replaces whatever channels the receiver held.
    #[tokio::test]
    async fn channels_are_stored_apart_from_the_state_and_travel_in_snapshots() {
        let dir = TempDir::new().expect("tempdir");
        let path = dir.path().join("raft.redb");
        let shelf = ChannelShelf::new(ChannelBook::default());
        let (log, mut machine, mut watch) = open_with(&path, shelf.clone()).expect("open");
        populate(&mut machine).await;
        watch.borrow_and_update();
        let mut changes = shelf.watch().events;
        let delete = Command::Channel {
            command: courier_core::channel::ChannelCommand::Delete {
                team_id: "T".into(),
                app: "com.example.app".into(),
                id: courier_core::channel::ChannelId([1; 16]),
            },
        };
        let responses = machine
            .apply([
                normal(1, 7, create(1, "T")),
                normal(1, 8, create(2, "T")),
                normal(1, 9, create(3, "T")),
                normal(1, 10, delete),
                normal(1, 11, create(3, "T")),
                normal(1, 12, create(4, "U")),
            ])
            .await
            .expect("apply");
        use courier_core::channel::ChannelRefusal;
        assert_eq!(
            responses,
            [
                CommandResponse::ChannelApplied { version: 1 },
                CommandResponse::ChannelApplied { version: 2 },
                CommandResponse::ChannelRefused { refusal: ChannelRefusal::TooMany },
                CommandResponse::ChannelApplied { version: 3 },
                CommandResponse::ChannelApplied { version: 4 },
                CommandResponse::ChannelApplied { version: 5 },
            ]
        );
        assert_eq!(machine.state().epoch, Epoch(3), "channels move no epoch");
        assert!(!watch.has_changed().expect("sender alive"), "a batch of channel commands publishes no state");
        assert_eq!(ids(&shelf), [2, 3, 4]);
        let mut heard = 0;
        while changes.try_recv().is_ok() {
            heard += 1;
        }
        assert_eq!(heard, 5, "each change is published once");
        let snapshot = machine.get_snapshot_builder().await.build_snapshot().await.expect("build");
        drop((log, machine));

        let reopened = ChannelShelf::new(ChannelBook::default());
        let (_log, _machine, _watch) = open_with(&path, reopened.clone()).expect("reopen");
        assert_eq!(ids(&reopened), [2, 3, 4]);
        assert_eq!(reopened.read().version(), 5);
        assert_eq!(reopened.read().count("T", "com.example.app"), 2);

        // A follower holding a channel the snapshot does not have ends up with exactly the snapshot's.
        let follower_shelf = ChannelShelf::new(ChannelBook::default());
        let follower_path = dir.path().join("follower.redb");
        {
            let (_log, mut follower, _watch) = open_with(&follower_path, follower_shelf.clone()).expect("follower");
            follower.apply([normal(1, 1, create(9, "V"))]).await.expect("apply");
            let mut resets = follower_shelf.watch().events;
            follower.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install");
            assert!(matches!(resets.try_recv(), Ok(crate::raft::channels::ChannelEvent::Reset)));
        }
        assert_eq!(ids(&follower_shelf), [2, 3, 4]);
        let again = ChannelShelf::new(ChannelBook::default());
        let (_log, _follower, _watch) = open_with(&follower_path, again.clone()).expect("reopen follower");
        assert_eq!(ids(&again), [2, 3, 4], "the installed channels replaced the stored ones");
        assert_eq!(again.read().version(), 5);
    }

    #[tokio::test]
    async fn log_survives_a_reopen() {
        let dir = TempDir::new().expect("tempdir");
        let path = dir.path().join("raft.redb");
        let vote = Vote::new_committed(3, 2);
        {
            let (mut log, _machine, _watch) = open(&path).expect("open");
            assert_eq!(log.read_vote().await.expect("vote"), None);
            let state = log.get_log_state().await.expect("log state");
            assert_eq!((state.last_purged_log_id, state.last_log_id), (None, None));

            log.save_vote(&vote).await.expect("save vote");
            let entries: Vec<_> = (1..=10).map(|i| blank_ent::<TypeConfig>(1, 1, i)).collect();
            log.blocking_append(entries).await.expect("append");
            log.blocking_append([normal(2, 11, put_member(4))]).await.expect("append normal");
            log.truncate(log_id(1, 1, 9)).await.expect("truncate");
            log.blocking_append([blank_ent::<TypeConfig>(3, 2, 9)]).await.expect("append after truncate");
            log.purge(log_id(1, 1, 4)).await.expect("purge");
            log.save_committed(Some(log_id(1, 1, 8))).await.expect("save committed");
        }

        let (mut log, _machine, _watch) = open(&path).expect("reopen");
        assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
        assert_eq!(log.read_committed().await.expect("committed"), Some(log_id(1, 1, 8)));
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 4)));
        assert_eq!(state.last_log_id, Some(log_id(3, 2, 9)));
        let mut reader = log.get_log_reader().await;
        let entries = reader.try_get_log_entries(0..100).await.expect("read");
        let ids: Vec<_> = entries.iter().map(|e| e.log_id).collect();
        let expected: Vec<_> = (5..=8).map(|i| log_id(1, 1, i)).chain([log_id(3, 2, 9)]).collect();
        assert_eq!(ids, expected);
        assert_eq!(reader.try_get_log_entries(6..=7).await.expect("read").len(), 2);
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 8..6;
        assert!(reader.try_get_log_entries(backwards).await.expect("read backwards").is_empty());
        assert!(reader.try_get_log_entries(7..7).await.expect("read empty").is_empty());

        // Purging everything leaves the last purged id standing in for the last log id.
        log.purge(log_id(3, 2, 9)).await.expect("purge all");
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_log_id, Some(log_id(3, 2, 9)));
        assert!(reader.try_get_log_entries(..).await.expect("read").is_empty());
        let leader = CommittedLeaderId::new(3, 2);
        assert_eq!(state.last_purged_log_id.map(|id| id.leader_id), Some(leader));
    }
}
