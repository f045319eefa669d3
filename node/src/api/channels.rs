//! The cluster API's part in broadcast channels: turning a gateway's `ManageChannel` into a Raft command
//! and its outcome back, and the channel updates of a `WatchCluster` stream.

use courier_core::channel::{
    ChannelChange, ChannelCommand, ChannelId, ChannelPushType, ChannelRecord, ChannelRefusal, StoragePolicy,
};
use courier_proto::cluster::manage_channel_request::Action;
use courier_proto::cluster::{ChannelOutcome, ChannelUpdate, ManageChannelRequest, ManageChannelResponse};
use tonic::Status;

use crate::raft::channels::{ChannelEvent, ChannelWatch};
use crate::raft::{Command, CommandResponse};

/// Records per update when a watcher is sent the whole book: a million channels arrive in 500 messages of
/// about 300 KB, far under the cluster API's message limit.
const RECORDS_PER_UPDATE: usize = 2000;

/// The command a gateway's request asks for; `max_per_app` is this node's limit.
pub fn command(request: ManageChannelRequest, max_per_app: u32, now_ms: u64) -> Result<Command, Status> {
    let ManageChannelRequest { team_id, app, action } = request;
    let id =
        |bytes: &[u8]| ChannelId::from_slice(bytes).ok_or_else(|| Status::invalid_argument("a channel id is 16 bytes"));
    let command = match action {
        Some(Action::Create(create)) => {
            let policy = u8::try_from(create.message_storage_policy)
                .ok()
                .and_then(|policy| StoragePolicy::try_from(policy).ok())
                .ok_or_else(|| Status::invalid_argument("message-storage-policy is 0 or 1"))?;
            let push_type = ChannelPushType::parse(&create.push_type)
                .ok_or_else(|| Status::invalid_argument(format!("no channel push type {:?}", create.push_type)))?;
            let record = ChannelRecord { id: id(&create.id)?, team_id, app, policy, push_type, created_ms: now_ms };
            ChannelCommand::Create { record, max_per_app }
        }
        Some(Action::Delete(bytes)) => ChannelCommand::Delete { team_id, app, id: id(&bytes)? },
        None => return Err(Status::invalid_argument("a channel request creates or deletes")),
    };
    Ok(Command::Channel { command })
}

/// What the gateway hears of the state machine's answer.
pub fn answer(response: CommandResponse) -> Result<ManageChannelResponse, Status> {
    let (outcome, version) = match response {
        CommandResponse::ChannelApplied { version } => (ChannelOutcome::Done, version),
        CommandResponse::ChannelRefused { refusal } => {
            let outcome = match refusal {
                ChannelRefusal::TooMany => ChannelOutcome::TooMany,
                ChannelRefusal::Unknown => ChannelOutcome::UnknownChannel,
                ChannelRefusal::Exists => ChannelOutcome::Exists,
            };
            (outcome, 0)
        }
        CommandResponse::Refused { reason } => return Err(Status::invalid_argument(reason)),
        CommandResponse::Applied { .. } => return Err(Status::internal("a channel command applied as another")),
    };
    Ok(ManageChannelResponse { outcome: outcome as i32, version })
}

fn record_json(record: &ChannelRecord) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(record).map_err(|e| Status::internal(e.to_string()))
}

/// The whole book as a watcher's updates: the first resets, the rest add to it. An empty book is one
/// update that only resets.
pub fn whole_book(watch: &ChannelWatch) -> Result<Vec<ChannelUpdate>, Status> {
    let mut updates = Vec::new();
    let mut chunks = watch.records.chunks(RECORDS_PER_UPDATE).peekable();
    if chunks.peek().is_none() {
        return Ok(vec![ChannelUpdate { reset: true, version: watch.version, ..ChannelUpdate::default() }]);
    }
    for (n, chunk) in chunks.enumerate() {
        let put_json = chunk.iter().map(record_json).collect::<Result<_, _>>()?;
        updates.push(ChannelUpdate { reset: n == 0, version: watch.version, put_json, deleted: Vec::new() });
    }
    Ok(updates)
}

/// One change as a watcher's update; `None` for a reset, which the caller answers with the whole book.
pub fn change(event: &ChannelEvent) -> Result<Option<ChannelUpdate>, Status> {
    let ChannelEvent::Change { version, change } = event else {
        return Ok(None);
    };
    let mut update = ChannelUpdate { version: *version, ..ChannelUpdate::default() };
    match change {
        ChannelChange::Put { record } => update.put_json.push(record_json(record)?),
        ChannelChange::Delete { id } => update.deleted.push(id.0.to_vec()),
    }
    Ok(Some(update))
}
