//! The state machine (openraft's `RaftStateMachine`): the applied `ClusterState` with the last applied log
//! id and membership, rewritten in one transaction per apply batch, the current snapshot, and the watch
//! channel every new state is published on.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use redb::{Database, ReadableDatabase};
use tokio::sync::watch;

use super::*;
use crate::raft::channels::ChannelShelf;
use crate::raft::{ClusterState, CommandResponse, NodeId, TypeConfig};
use courier_core::channel::{ChannelBook, ChannelChange, ChannelRecord, PendingChanges};

/// The applied control state. Clones are snapshot builders: they capture the state as of the clone.
#[derive(Clone)]
pub struct StateMachineStore {
    pub(super) db: Arc<Database>,
    pub(super) last_applied: Option<LogId<NodeId>>,
    pub(super) last_membership: Membership,
    /// Shared with the watch channel, so publishing costs no copy; `apply` copies on write.
    pub(super) state: Arc<ClusterState>,
    /// Behind an `Arc` because snapshot builders are clones of this struct; only the original publishes.
    pub(super) published: Arc<watch::Sender<Arc<ClusterState>>>,
    /// The channel book, shared with the rest of the node; the state machine is its only writer.
    pub(super) channels: Arc<ChannelShelf>,
    /// In a snapshot builder: the channels as of when it was made (`channels` moves on without it).
    pub(super) frozen_channels: Option<Arc<(u64, Vec<ChannelRecord>)>>,
}

impl StateMachineStore {
    /// The state as of the last apply or snapshot install.
    pub fn state(&self) -> Arc<ClusterState> {
        self.state.clone()
    }

    /// The channel book this node has applied.
    pub fn channels(&self) -> Arc<ChannelShelf> {
        self.channels.clone()
    }

    /// The channels as of this builder's making, or now.
    fn channel_records(&self) -> (u64, Vec<ChannelRecord>) {
        match &self.frozen_channels {
            Some(frozen) => (frozen.0, frozen.1.clone()),
            None => {
                let book = self.channels.read();
                (book.version(), book.records().cloned().collect())
            }
        }
    }

    fn image_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let (channels_version, channels) = self.channel_records();
        serde_json::to_vec(&MachineImage {
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
            state: &*self.state,
            channels_version,
            channels: Some(channels),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftError> {
        let data = self.image_bytes().map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let last_log_id = self.last_applied;
        let last_membership = self.last_membership.clone();
        let db = self.db.clone();
        let stored_data = data.clone();
        let meta = blocking(move || {
            let txn = db.begin_write()?;
            let meta = {
                let mut machine = txn.open_table(MACHINE)?;
                let seq = read_json::<u64>(&machine, SNAPSHOT_SEQ)?.unwrap_or(0) + 1;
                machine.insert(SNAPSHOT_SEQ, serde_json::to_vec(&seq)?.as_slice())?;
                let snapshot_id = match last_log_id {
                    Some(id) => format!("{}-{}-{seq}", id.leader_id.term, id.index),
                    None => format!("0-0-{seq}"),
                };
                let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
                // A builder holds the state as of when it was made; if a newer snapshot was installed
                // meanwhile, it stays the current one.
                let current: Option<SnapshotMeta<NodeId, BasicNode>> = read_json(&machine, SNAPSHOT_META)?;
                if current.is_none_or(|current| current.last_log_id <= meta.last_log_id) {
                    machine.insert(SNAPSHOT_META, serde_json::to_vec(&meta)?.as_slice())?;
                    machine.insert(SNAPSHOT_DATA, stored_data.as_slice())?;
                }
                meta
            };
            txn.commit()?;
            Ok(meta)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, epoch = self.state.epoch.0, "built Raft snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), RaftError> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, RaftError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Applied to copies first, so a failed write leaves this state machine as it was on disk.
        // Channel commands are decided against the book as the batch's earlier ones leave it, and reach the
        // shelf only once stored.
        let mut state = self.state.clone();
        let mut batch_last = None;
        let mut last_membership = self.last_membership.clone();
        let mut responses = Vec::new();
        let mut pending = PendingChanges::default();
        let mut state_touched = false;
        let channels_version = {
            let book = self.channels.read();
            for entry in entries {
                batch_last = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Blank => CommandResponse::Applied { epoch: state.epoch },
                    EntryPayload::Normal(command) => {
                        let response = match command.as_channel() {
                            Some(channel) => match command.validate(&state) {
                                Err(reason) => CommandResponse::Refused { reason },
                                Ok(()) => match book.decide(channel, &mut pending) {
                                    Ok(()) => CommandResponse::ChannelApplied {
                                        version: book.version() + pending.changes().len() as u64,
                                    },
                                    Err(refusal) => CommandResponse::ChannelRefused { refusal },
                                },
                            },
                            None => {
                                state_touched = true;
                                Arc::make_mut(&mut state).apply(&command)
                            }
                        };
                        tracing::debug!(index = entry.log_id.index, %command, ?response, "applied");
                        response
                    }
                    EntryPayload::Membership(membership) => {
                        state_touched = true;
                        last_membership = StoredMembership::new(Some(entry.log_id), membership);
                        CommandResponse::Applied { epoch: state.epoch }
                    }
                };
                responses.push(response);
            }
            book.version() + pending.changes().len() as u64
        };
        let Some(last) = batch_last else {
            return Ok(responses);
        };

        let bytes = serde_json::to_vec(&MachineImage {
            last_applied: Some(last),
            last_membership: last_membership.clone(),
            state: &*state,
            channels_version,
            channels: None,
        })
        .map_err(|e| StorageIOError::apply(last, &e))?;
        let changes = Arc::new(pending.into_changes());
        let stored = changes.clone();
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            txn.open_table(MACHINE)?.insert(APPLIED, bytes.as_slice())?;
            if !stored.is_empty() {
                let mut table = txn.open_table(CHANNELS)?;
                for change in stored.iter() {
                    match change {
                        ChannelChange::Put { record } => {
                            table.insert(record.id.0.as_slice(), serde_json::to_vec(record)?.as_slice())?;
                        }
                        ChannelChange::Delete { id } => {
                            table.remove(id.0.as_slice())?;
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::apply(last, &e))?;

        self.last_applied = Some(last);
        self.last_membership = last_membership;
        self.state = state;
        self.channels.take(&changes);
        // A batch of channel commands alone moves no epoch: nothing that follows the state needs to hear it.
        if state_touched {
            self.published.send_replace(self.state.clone());
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let mut builder = self.clone();
        builder.frozen_channels = Some(Arc::new(self.channel_records()));
        builder
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftError> {
        let signature = meta.signature();
        let data = snapshot.into_inner();
        // The bytes came from another node: decode and check them before anything is replaced.
        let image: MachineImage<ClusterState> =
            serde_json::from_slice(&data).map_err(|e| StorageIOError::read_snapshot(Some(signature.clone()), &e))?;
        if image.last_applied != meta.last_log_id || image.last_membership != meta.last_membership {
            let e = RaftStoreError::SnapshotMismatch { snapshot_id: meta.snapshot_id.clone() };
            return Err(StorageIOError::read_snapshot(Some(signature), &e).into());
        }

        let meta_bytes =
            serde_json::to_vec(meta).map_err(|e| StorageIOError::write_snapshot(Some(signature.clone()), &e))?;
        let records = image.channels.unwrap_or_default();
        // The applied image keeps its channels in their table, not inline.
        let applied = serde_json::to_vec(&MachineImage {
            last_applied: image.last_applied,
            last_membership: image.last_membership.clone(),
            state: &image.state,
            channels_version: image.channels_version,
            channels: None,
        })
        .map_err(|e| StorageIOError::write_snapshot(Some(signature.clone()), &e))?;
        let rows = records
            .iter()
            .map(|record| Ok((record.id, serde_json::to_vec(record)?)))
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .map_err(|e| StorageIOError::write_snapshot(Some(signature.clone()), &e))?;
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut machine = txn.open_table(MACHINE)?;
                machine.insert(APPLIED, applied.as_slice())?;
                machine.insert(SNAPSHOT_META, meta_bytes.as_slice())?;
                machine.insert(SNAPSHOT_DATA, data.as_slice())?;
            }
            txn.delete_table(CHANNELS)?;
            {
                let mut table = txn.open_table(CHANNELS)?;
                for (id, bytes) in &rows {
                    table.insert(id.0.as_slice(), bytes.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(signature), &e))?;

        self.last_applied = image.last_applied;
        self.last_membership = image.last_membership;
        self.channels.replace(ChannelBook::from_records(image.channels_version, records));
        let mut state = image.state;
        state.repair_ring();
        self.state = Arc::new(state);
        self.published.send_replace(self.state.clone());
        tracing::info!(snapshot = %meta.snapshot_id, epoch = self.state.epoch.0, "installed Raft snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, RaftError> {
        let db = self.db.clone();
        let stored = blocking(move || {
            let txn = db.begin_read()?;
            let machine = txn.open_table(MACHINE)?;
            let Some(meta) = read_json::<SnapshotMeta<NodeId, BasicNode>>(&machine, SNAPSHOT_META)? else {
                return Ok(None);
            };
            // Both are written in one transaction, so one without the other means the file is damaged.
            let Some(data) = machine.get(SNAPSHOT_DATA)? else {
                return Err(RaftStoreError::SnapshotDataMissing { snapshot_id: meta.snapshot_id });
            };
            let data = data.value().to_vec();
            Ok(Some((meta, data)))
        })
        .await
        .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}
