//! Broadcast channels (APNs broadcast push): what a channel is, and the book of every channel the Raft
//! group has agreed on.
//!
//! Channels are not part of `ClusterState`: a cluster may hold up to `MAX_CHANNELS` of them, and the control
//! state is cloned, written out and sent to every gateway whole on every change. The book changes by one
//! record per command, is stored one row per channel, and reaches gateways as deltas. It has a version of
//! its own (`ChannelBook::version`), not the ring's epoch: creating a channel moves no device, so it must
//! not make every node rebalance or hold forwarded pushes behind Raft.
//!
//! A channel belongs to the team that created it and to one app (bundle id). Another team never sees it,
//! even one allowed the same app: every lookup is by (team, app, id), and a miss is `ChannelNotRegistered`.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// Most channels one team may have for one app, unless the node proposing the create says otherwise
/// (`--max-channels-per-app`); APNs allows 10,000.
pub const DEFAULT_MAX_CHANNELS_PER_APP: u32 = 10_000;
/// Most channels the whole cluster holds, whatever the per-app limit: the book is kept in memory on every
/// node and gateway (about 150 bytes a channel).
pub const MAX_CHANNELS: usize = 1_000_000;

/// A channel's id: 16 random bytes chosen by the gateway that created it, base64 (with padding) on the
/// wire, as APNs's are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub [u8; 16]);

impl ChannelId {
    pub fn random() -> Self {
        ChannelId(rand::random())
    }

    /// The id as a provider writes it: standard base64 of exactly 16 bytes. Anything else is not an id
    /// this cluster could have given out.
    pub fn parse(text: &str) -> Option<Self> {
        // 16 bytes are 24 characters of base64; a longer header is refused before it is decoded.
        if text.len() != 24 {
            return None;
        }
        let bytes = STANDARD.decode(text).ok()?;
        Some(ChannelId(bytes.try_into().ok()?))
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(ChannelId(bytes.try_into().ok()?))
    }
}

impl std::fmt::Display for ChannelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl Serialize for ChannelId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ChannelId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ChannelId::parse(&text).ok_or_else(|| serde::de::Error::custom("a channel id is 16 bytes in base64"))
    }
}

/// What happens to a broadcast no subscriber is linked to receive (APNs's `message-storage-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum StoragePolicy {
    /// 0: delivered to the subscribers linked now, never stored.
    NoStorage,
    /// 1: the most recent broadcast is kept (8 hours at most) for subscribers that link or subscribe later.
    MostRecent,
}

impl From<StoragePolicy> for u8 {
    fn from(policy: StoragePolicy) -> u8 {
        match policy {
            StoragePolicy::NoStorage => 0,
            StoragePolicy::MostRecent => 1,
        }
    }
}

impl TryFrom<u8> for StoragePolicy {
    type Error = String;
    fn try_from(value: u8) -> Result<Self, String> {
        match value {
            0 => Ok(StoragePolicy::NoStorage),
            1 => Ok(StoragePolicy::MostRecent),
            other => Err(format!("message-storage-policy is 0 or 1, not {other}")),
        }
    }
}

/// The kind of push a channel carries. APNs channels carry Live Activity updates only; alert and
/// background channels are a Courier extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelPushType {
    LiveActivity,
    Alert,
    Background,
}

impl ChannelPushType {
    /// The channel body's `push-type` (`LiveActivity`, APNs's spelling; the extensions capitalised alike).
    /// Case-insensitive, as the `apns-push-type` header is.
    pub fn parse(text: &str) -> Option<Self> {
        [ChannelPushType::LiveActivity, ChannelPushType::Alert, ChannelPushType::Background]
            .into_iter()
            .find(|kind| kind.body_name().eq_ignore_ascii_case(text))
    }

    /// As a channel's body names it.
    pub fn body_name(self) -> &'static str {
        match self {
            ChannelPushType::LiveActivity => "LiveActivity",
            ChannelPushType::Alert => "Alert",
            ChannelPushType::Background => "Background",
        }
    }

    /// As a broadcast's `apns-push-type` header names it.
    pub fn header_name(self) -> &'static str {
        match self {
            ChannelPushType::LiveActivity => "liveactivity",
            ChannelPushType::Alert => "alert",
            ChannelPushType::Background => "background",
        }
    }
}

/// One channel as the Raft group agreed on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRecord {
    pub id: ChannelId,
    /// The team that created it; only that team sees it.
    pub team_id: String,
    /// The bundle id it was created for.
    pub app: String,
    pub policy: StoragePolicy,
    pub push_type: ChannelPushType,
    /// UNIX ms, from the command that created it.
    pub created_ms: u64,
}

/// One change the book takes, as it is stored and as gateways receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "change")]
pub enum ChannelChange {
    Put { record: ChannelRecord },
    Delete { id: ChannelId },
}

/// Every channel, by id, with how many each (team, app) holds.
#[derive(Debug, Clone, Default)]
pub struct ChannelBook {
    /// How many changes the book has taken since the cluster began: one per applied channel command.
    version: u64,
    channels: HashMap<ChannelId, ChannelRecord>,
    per_app: HashMap<(String, String), u32>,
}

impl ChannelBook {
    /// A book holding `records` at `version` (as stored, or as a snapshot carried it).
    pub fn from_records(version: u64, records: impl IntoIterator<Item = ChannelRecord>) -> Self {
        let mut book = ChannelBook { version, ..ChannelBook::default() };
        for record in records {
            book.put(record);
        }
        book
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// The channel `id` if `team` created it for `app`.
    pub fn get(&self, team: &str, app: &str, id: ChannelId) -> Option<&ChannelRecord> {
        self.channels.get(&id).filter(|record| record.team_id == team && record.app == app)
    }

    /// The channel `id`, whoever created it (for the nodes, which deliver by id alone).
    pub fn find(&self, id: ChannelId) -> Option<&ChannelRecord> {
        self.channels.get(&id)
    }

    /// The ids of `team`'s channels for `app`, oldest first.
    pub fn list(&self, team: &str, app: &str) -> Vec<&ChannelRecord> {
        let mut records: Vec<&ChannelRecord> =
            self.channels.values().filter(|record| record.team_id == team && record.app == app).collect();
        records.sort_by_key(|record| (record.created_ms, record.id));
        records
    }

    /// The channels of `app` and of `team` (each when given), by app then creation time; at most `limit`,
    /// and whether there were more.
    pub fn select(&self, app: Option<&str>, team: Option<&str>, limit: usize) -> (Vec<&ChannelRecord>, bool) {
        let mut records: Vec<&ChannelRecord> = self
            .channels
            .values()
            .filter(|r| app.is_none_or(|app| r.app == app) && team.is_none_or(|team| r.team_id == team))
            .collect();
        records.sort_by(|a, b| (&a.app, a.created_ms, a.id).cmp(&(&b.app, b.created_ms, b.id)));
        let more = records.len() > limit;
        records.truncate(limit);
        (records, more)
    }

    /// Every channel, for snapshots and for a watcher's first message.
    pub fn records(&self) -> impl Iterator<Item = &ChannelRecord> {
        self.channels.values()
    }

    /// How many channels `team` has for `app`.
    pub fn count(&self, team: &str, app: &str) -> u32 {
        self.per_app.get(&(team.to_string(), app.to_string())).copied().unwrap_or(0)
    }

    /// Takes one change and counts it in the version. Idempotent apart from the version: a put of a
    /// record already held replaces it, a delete of an unknown id changes nothing.
    pub fn take(&mut self, change: &ChannelChange) {
        match change {
            ChannelChange::Put { record } => self.put(record.clone()),
            ChannelChange::Delete { id } => self.delete(*id),
        }
        self.version += 1;
    }

    /// Takes a change from a watch stream, whose message says which version it brings the book to.
    pub fn take_at(&mut self, change: &ChannelChange, version: u64) {
        self.take(change);
        self.version = version;
    }

    /// Replaces the whole book (a watcher's first message, or a snapshot installed).
    pub fn reset(&mut self, version: u64) {
        *self = ChannelBook { version, ..ChannelBook::default() };
    }

    fn put(&mut self, record: ChannelRecord) {
        let key = (record.team_id.clone(), record.app.clone());
        if let Some(old) = self.channels.insert(record.id, record) {
            self.forget((old.team_id, old.app));
        }
        *self.per_app.entry(key).or_insert(0) += 1;
    }

    fn delete(&mut self, id: ChannelId) {
        if let Some(old) = self.channels.remove(&id) {
            self.forget((old.team_id, old.app));
        }
    }

    fn forget(&mut self, key: (String, String)) {
        if let Some(count) = self.per_app.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.per_app.remove(&key);
            }
        }
    }
}

/// What a channel command asks of the book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum ChannelCommand {
    /// Creates `record`, unless its team already has `max_per_app` channels for the app (the limit of the
    /// node that proposed it, carried in the command so that every node decides alike).
    Create { record: ChannelRecord, max_per_app: u32 },
    /// Deletes the channel if `team_id` created it for `app`.
    Delete { team_id: String, app: String, id: ChannelId },
}

/// Why the book refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelRefusal {
    /// The team has as many channels for the app as it may, or the cluster has `MAX_CHANNELS`.
    TooMany,
    /// A channel with this id exists already (ids are random: a retried create).
    Exists,
    /// No such channel for this team and app.
    Unknown,
}

/// The changes earlier commands of one apply batch made, which later ones must see before they are stored.
#[derive(Debug, Default)]
pub struct PendingChanges {
    changes: Vec<ChannelChange>,
    /// Net channels added per (team, app) by `changes`.
    added: HashMap<(String, String), i64>,
    total_added: i64,
}

impl PendingChanges {
    pub fn changes(&self) -> &[ChannelChange] {
        &self.changes
    }

    pub fn into_changes(self) -> Vec<ChannelChange> {
        self.changes
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The record `id` would have after the pending changes, if they say anything of it.
    fn latest(&self, id: ChannelId) -> Option<Option<&ChannelRecord>> {
        self.changes.iter().rev().find_map(|change| match change {
            ChannelChange::Put { record } if record.id == id => Some(Some(record)),
            ChannelChange::Delete { id: deleted } if *deleted == id => Some(None),
            _ => None,
        })
    }

    fn push(&mut self, change: ChannelChange, key: (String, String), delta: i64) {
        *self.added.entry(key).or_insert(0) += delta;
        self.total_added += delta;
        self.changes.push(change);
    }
}

impl ChannelBook {
    /// Decides `command` against this book as `pending` leaves it, and adds the change to `pending` when
    /// it is taken. Deterministic: every node decides every command of the log alike.
    pub fn decide(&self, command: &ChannelCommand, pending: &mut PendingChanges) -> Result<(), ChannelRefusal> {
        match command {
            ChannelCommand::Create { record, max_per_app } => {
                let exists = match pending.latest(record.id) {
                    Some(latest) => latest.is_some(),
                    None => self.channels.contains_key(&record.id),
                };
                if exists {
                    return Err(ChannelRefusal::Exists);
                }
                let key = (record.team_id.clone(), record.app.clone());
                let count = i64::from(self.count(&key.0, &key.1)) + pending.added.get(&key).copied().unwrap_or(0);
                let total = self.channels.len() as i64 + pending.total_added;
                if count >= i64::from(*max_per_app) || total >= MAX_CHANNELS as i64 {
                    return Err(ChannelRefusal::TooMany);
                }
                pending.push(ChannelChange::Put { record: record.clone() }, key, 1);
                Ok(())
            }
            ChannelCommand::Delete { team_id, app, id } => {
                let current = match pending.latest(*id) {
                    Some(latest) => latest,
                    None => self.channels.get(id),
                };
                match current {
                    Some(record) if record.team_id == *team_id && record.app == *app => {
                        pending.push(ChannelChange::Delete { id: *id }, (team_id.clone(), app.clone()), -1);
                        Ok(())
                    }
                    _ => Err(ChannelRefusal::Unknown),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8, team: &str, app: &str) -> ChannelRecord {
        ChannelRecord {
            id: ChannelId([n; 16]),
            team_id: team.into(),
            app: app.into(),
            policy: StoragePolicy::NoStorage,
            push_type: ChannelPushType::LiveActivity,
            created_ms: u64::from(n),
        }
    }

    fn create(n: u8, team: &str, app: &str, max_per_app: u32) -> ChannelCommand {
        ChannelCommand::Create { record: record(n, team, app), max_per_app }
    }

    #[test]
    fn ids_are_sixteen_bytes_of_standard_base64() {
        let id = ChannelId([0xfb; 16]);
        let text = id.to_string();
        assert_eq!(text, "+/v7+/v7+/v7+/v7+/v7+w==");
        assert_eq!(ChannelId::parse(&text), Some(id));
        assert_eq!(serde_json::to_string(&id).expect("json"), format!("\"{text}\""));
        for bad in ["", "+/v7+/v7+/v7+/v7+/v7+w=", "-_v7-_v7-_v7-_v7-_v7-w==", "AAAAAAAAAAAAAAAAAAAAAAAAAAAA", "ÿÿ"] {
            assert_eq!(ChannelId::parse(bad), None, "{bad:?}");
        }
        assert_ne!(ChannelId::random(), ChannelId::random());
    }

    #[test]
    fn push_types_and_policies_read_as_apns_writes_them() {
        assert_eq!(ChannelPushType::parse("LiveActivity"), Some(ChannelPushType::LiveActivity));
        assert_eq!(ChannelPushType::parse("liveactivity"), Some(ChannelPushType::LiveActivity));
        assert_eq!(ChannelPushType::parse("alert"), Some(ChannelPushType::Alert));
        assert_eq!(ChannelPushType::parse("voip"), None);
        assert_eq!(StoragePolicy::try_from(1), Ok(StoragePolicy::MostRecent));
        assert!(StoragePolicy::try_from(2).is_err());
        let json = serde_json::to_value(record(1, "T", "a")).expect("json");
        assert_eq!(json["policy"], 0);
        assert_eq!(json["push_type"], "liveactivity");
    }

    #[test]
    fn a_batch_sees_its_own_earlier_changes() {
        let book = ChannelBook::from_records(7, [record(1, "T", "app")]);
        let mut pending = PendingChanges::default();
        assert_eq!(book.decide(&create(2, "T", "app", 3), &mut pending), Ok(()));
        // The third channel of the app is the limit; a fourth is refused though none is stored yet.
        assert_eq!(book.decide(&create(3, "T", "app", 3), &mut pending), Ok(()));
        assert_eq!(book.decide(&create(4, "T", "app", 3), &mut pending), Err(ChannelRefusal::TooMany));
        // Another team's count, and another app's, are their own.
        assert_eq!(book.decide(&create(4, "U", "app", 3), &mut pending), Ok(()));
        assert_eq!(book.decide(&create(5, "T", "other", 3), &mut pending), Ok(()));
        // A create of an id already held, in the book or in the batch, is refused.
        assert_eq!(book.decide(&create(1, "T", "x", 3), &mut pending), Err(ChannelRefusal::Exists));
        assert_eq!(book.decide(&create(2, "T", "x", 3), &mut pending), Err(ChannelRefusal::Exists));
        // A delete frees a place for the next create in the same batch.
        let delete = |n: u8, team: &str| ChannelCommand::Delete {
            team_id: team.into(),
            app: "app".into(),
            id: ChannelId([n; 16]),
        };
        assert_eq!(book.decide(&delete(1, "U"), &mut pending), Err(ChannelRefusal::Unknown), "not U's channel");
        assert_eq!(book.decide(&delete(1, "T"), &mut pending), Ok(()));
        assert_eq!(book.decide(&delete(1, "T"), &mut pending), Err(ChannelRefusal::Unknown), "already deleted");
        assert_eq!(book.decide(&create(6, "T", "app", 3), &mut pending), Ok(()));
        assert_eq!(pending.changes().len(), 6);

        let mut applied = book.clone();
        for change in pending.changes() {
            applied.take(change);
        }
        assert_eq!(applied.version(), 13);
        assert_eq!(applied.count("T", "app"), 3);
        let ids: Vec<u8> = applied.list("T", "app").iter().map(|r| r.id.0[0]).collect();
        assert_eq!(ids, [2, 3, 6]);
        assert!(applied.get("T", "app", ChannelId([1; 16])).is_none());
        assert!(applied.get("U", "app", ChannelId([2; 16])).is_none(), "another team never sees it");
        assert_eq!(applied.len(), 5);
    }

    #[test]
    fn replacing_a_record_keeps_the_counts_right() {
        let mut book = ChannelBook::default();
        book.take(&ChannelChange::Put { record: record(1, "T", "a") });
        book.take(&ChannelChange::Put { record: record(1, "T", "a") });
        assert_eq!(book.count("T", "a"), 1);
        book.take(&ChannelChange::Put { record: record(1, "T", "b") });
        assert_eq!((book.count("T", "a"), book.count("T", "b")), (0, 1));
        book.take(&ChannelChange::Delete { id: ChannelId([1; 16]) });
        book.take(&ChannelChange::Delete { id: ChannelId([1; 16]) });
        assert!(book.is_empty());
        assert_eq!(book.count("T", "b"), 0);
        assert_eq!(book.version(), 5);
    }
}
