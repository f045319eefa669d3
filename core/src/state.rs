//! The control state the Raft group agrees on, and the commands that change it.
//!
//! `ClusterState` is the whole replicated state machine: members, ring parameters, token keys, provider
//! credentials, revoked devices, suspected clones and the epoch. `apply` is the only code that changes it: a
//! plain match over `Command`, deterministic (every timestamp travels inside the command), bumping the epoch on every change
//! it makes. Data-plane traffic never comes here.
//!
//! `Command::validate` bounds what one command may ask for (ring size, counts of members, keys, teams,
//! topics and revocations, string sizes), so that no write through Raft can make the state, or what every
//! node and gateway builds from it, grow without limit. `Control::propose` checks it before a command
//! reaches the log and `apply` checks it again, so an out-of-bounds entry already in an old log replays as
//! a refusal that changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::channel::{ChannelCommand, ChannelRefusal};
use crate::ids::DeviceId;
pub use crate::token::KeyState;
use crate::token::{TokenKey, TokenKeyId};
use crate::webhook::{EventKind, SigningSecret, Webhook};

pub type NodeId = u64;

/// Version of the control state; every applied change increments it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Added, not yet serving its share of the ring.
    Joining,
    Active,
    /// Leaving: handing its devices over before it stops.
    Draining,
    /// Missed heartbeats for longer than the failure timeout.
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Active => "active",
            MemberState::Draining => "draining",
            MemberState::Down => "down",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    /// Where devices connect (host:port), given out in redirects.
    pub device_addr: String,
    /// Where the cluster gRPC API listens (host:port).
    pub cluster_addr: String,
    /// The name on this node's certificate that devices check after a redirect here; empty in states
    /// written before it existed (`device_name()` fills the default in).
    #[serde(default)]
    pub device_name: String,
    pub state: MemberState,
    /// When `state` last changed, UNIX ms (from the command that changed it).
    pub since_ms: u64,
}

impl Member {
    /// The name devices check this node's certificate against after a redirect.
    pub fn device_name(&self) -> String {
        if self.device_name.is_empty() { crate::pki::node_device_name(self.id) } else { self.device_name.clone() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingParams {
    /// Virtual nodes per member on the consistent-hash ring.
    pub vnodes: u32,
    /// Copies of each stored notification: the owner plus R-1 successors.
    pub replication_factor: u32,
}

impl RingParams {
    /// How many nodes hold each stored notification: the replication factor, at least one (a factor of 0
    /// in an old log is refused when applied, so this is a guard, not a setting).
    pub fn copies(&self) -> usize {
        self.replication_factor.max(1) as usize
    }
}

impl Default for RingParams {
    fn default() -> Self {
        RingParams { vnodes: 128, replication_factor: 2 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenKeyRecord {
    pub key: TokenKey,
    pub created_ms: u64,
    pub state: KeyState,
    pub state_since_ms: u64,
}

/// A provider team's signing keys and the topics it may push to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderTeam {
    /// Key id (`kid`) → SPKI PEM public key.
    pub keys: BTreeMap<String, String>,
    /// Topics the team may use; empty = any.
    pub topics: Vec<String>,
}

/// A device id whose certificate several devices seem to share (see `edge::clones`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspectedClone {
    /// When it was first recorded, UNIX ms.
    pub since_ms: u64,
    /// The node that detected it.
    pub node: NodeId,
    /// Source addresses of the competing links.
    pub addrs: Vec<String>,
    /// Links and pushes for the device are refused until an operator clears or revokes it.
    pub refuse: bool,
}

/// Most suspected clones the state records; more are refused until an operator clears or revokes some.
pub const MAX_SUSPECTED_CLONES: usize = 10_000;
/// Most source addresses recorded per suspected clone.
pub const MAX_CLONE_ADDRS: usize = 8;
/// Longest recorded address (an IPv6 address with a zone fits).
const MAX_CLONE_ADDR_LEN: usize = 64;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterState {
    pub epoch: Epoch,
    pub members: BTreeMap<NodeId, Member>,
    pub ring: RingParams,
    pub token_keys: BTreeMap<TokenKeyId, TokenKeyRecord>,
    /// Team id → team.
    pub providers: BTreeMap<String, ProviderTeam>,
    pub revoked: BTreeSet<DeviceId>,
    /// Device id → the suspicion; absent from states written before clones were recorded.
    #[serde(default)]
    pub suspected_clones: BTreeMap<DeviceId, SuspectedClone>,
    /// Teams (JWT or certificate) that may not use broadcast channels: their channel requests and broadcasts
    /// answer `FeatureNotEnabled`. Every team may unless listed; absent from states written before channels.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub broadcast_disabled: BTreeSet<String>,
    /// Team id → where its delivery receipts go (`crate::webhook`); absent from states written before them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub webhooks: BTreeMap<String, Webhook>,
}

/// The bounds `Command::validate` enforces. Each is far above what a real cluster uses and low enough
/// that the whole state stays a few tens of MiB at worst: it is cloned and written out on every apply.
pub mod limits {
    /// Virtual nodes per member: every process builds a ring of members × vnodes points.
    pub const MAX_VNODES: u32 = 1024;
    /// Copies of each notification (owner included); more than the members there are buys nothing.
    pub const MAX_REPLICATION_FACTOR: u32 = 8;
    /// Members in the control state (Raft voters are capped separately, at `MAX_VOTERS`).
    pub const MAX_MEMBERS: usize = 256;
    /// A member's device or cluster address (`host:port`; a DNS name is at most 253 bytes).
    pub const MAX_ADDR_LEN: usize = 262;
    /// Token keys of every state, retired ones included (they stay to answer `ExpiredToken`): a daily
    /// rotation lasts almost three years.
    pub const MAX_TOKEN_KEYS: usize = 1024;
    /// Provider teams.
    pub const MAX_TEAMS: usize = 1000;
    /// Signing keys of one team.
    pub const MAX_KEYS_PER_TEAM: usize = 16;
    /// Topics one team may be restricted to.
    pub const MAX_TOPICS_PER_TEAM: usize = 100;
    /// A team id or key id (Apple's are 10 characters).
    pub const MAX_ID_LEN: usize = 64;
    /// A topic, as the provider API accepts it.
    pub const MAX_TOPIC_LEN: usize = crate::topic::MAX_TOPIC_LEN;
    /// A provider public key's PEM text (a P-256 key is under 200 bytes).
    pub const MAX_PEM_LEN: usize = 2048;
    /// Revoked device ids.
    pub const MAX_REVOKED: usize = 100_000;
}

/// A change to the control state, proposed through Raft.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Command {
    /// Adds a member (as joining) or updates its addresses.
    PutMember {
        id: NodeId,
        device_addr: String,
        cluster_addr: String,
        /// Empty (and absent from older logs): `pki::node_device_name(id)`.
        #[serde(default)]
        device_name: String,
        now_ms: u64,
    },
    SetMemberState {
        id: NodeId,
        state: MemberState,
        now_ms: u64,
    },
    RemoveMember {
        id: NodeId,
    },
    SetRing {
        params: RingParams,
    },
    /// Makes `key` the active key; the previously active one becomes accepting.
    RotateTokenKey {
        key: TokenKey,
        now_ms: u64,
    },
    RetireTokenKey {
        id: TokenKeyId,
        now_ms: u64,
    },
    PutProviderKey {
        team_id: String,
        key_id: String,
        public_key_pem: String,
        topics: Vec<String>,
    },
    /// Removes one key of a team, or the whole team when `key_id` is `None`.
    RemoveProvider {
        team_id: String,
        key_id: Option<String>,
    },
    /// Revokes the device id (and ends any suspicion of it being cloned: revocation supersedes it).
    RevokeDevice {
        device: DeviceId,
    },
    /// Records that links with this device certificate keep replacing each other from different source
    /// addresses. Recording it again changes nothing, except that `refuse` can be turned on.
    SuspectClone {
        device: DeviceId,
        node: NodeId,
        addrs: Vec<String>,
        refuse: bool,
        now_ms: u64,
    },
    /// An operator's verdict that the device is not (or no longer) cloned: its links and pushes work again.
    ClearClone {
        device: DeviceId,
    },
    /// Allows or forbids a team broadcast channels (every team may until forbidden).
    SetBroadcast {
        team_id: String,
        enabled: bool,
    },
    /// Sets a team's webhook endpoint and the events it gets. A team without one gets `secret` as its
    /// signing secret; one with an endpoint keeps its secrets (`RotateWebhookSecret` changes them).
    SetWebhook {
        team_id: String,
        url: String,
        events: BTreeSet<EventKind>,
        secret: SigningSecret,
        now_ms: u64,
    },
    RemoveWebhook {
        team_id: String,
    },
    /// Makes `secret` the team's signing secret; the ones it had keep signing for `grace_ms` as well.
    RotateWebhookSecret {
        team_id: String,
        secret: SigningSecret,
        grace_ms: u64,
        now_ms: u64,
    },
    /// A change to the broadcast channels. Applied to the channel book (`crate::channel`), never to this
    /// state: it leaves the epoch alone.
    Channel {
        command: ChannelCommand,
    },
}

impl Command {
    /// Whether a node proposes this on its own (membership it reports about itself, failure detection,
    /// suspected clones), rather than an operator through `courier ctl`. A node certificate may propose only
    /// these, so a stolen node key cannot rotate keys, add providers or revoke devices.
    pub fn is_cluster_internal(&self) -> bool {
        matches!(self, Command::PutMember { .. } | Command::SetMemberState { .. } | Command::SuspectClone { .. })
    }

    /// The channel command this is, if it is one.
    pub fn as_channel(&self) -> Option<&ChannelCommand> {
        match self {
            Command::Channel { command } => Some(command),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Applied; the state is now at this epoch.
    Applied { epoch: Epoch },
    /// Valid Raft entry, refused by the state machine; nothing changed.
    Refused { reason: String },
    /// A channel command taken; the channel book is now at this version.
    ChannelApplied { version: u64 },
    /// A channel command the book refused; nothing changed.
    ChannelRefused { refusal: ChannelRefusal },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints secrets: token keys show only their id.
        match self {
            Command::PutMember { id, .. } => write!(f, "put-member {id}"),
            Command::SetMemberState { id, state, .. } => write!(f, "member {id} -> {}", state.as_str()),
            Command::RemoveMember { id } => write!(f, "remove-member {id}"),
            Command::SetRing { params } => write!(f, "ring {params:?}"),
            Command::RotateTokenKey { key, .. } => write!(f, "rotate-token-key -> {}", key.id.0),
            Command::RetireTokenKey { id, .. } => write!(f, "retire-token-key {}", id.0),
            Command::PutProviderKey { team_id, key_id, .. } => write!(f, "put-provider {team_id}/{key_id}"),
            Command::RemoveProvider { team_id, key_id } => write!(f, "remove-provider {team_id}/{key_id:?}"),
            Command::RevokeDevice { device } => write!(f, "revoke {device}"),
            Command::SuspectClone { device, refuse, .. } => write!(f, "suspect-clone {device} (refuse: {refuse})"),
            Command::ClearClone { device } => write!(f, "clear-clone {device}"),
            Command::SetBroadcast { team_id, enabled } => write!(f, "broadcast {team_id} (enabled: {enabled})"),
            Command::SetWebhook { team_id, url, .. } => write!(f, "set-webhook {team_id} -> {url}"),
            Command::RemoveWebhook { team_id } => write!(f, "remove-webhook {team_id}"),
            Command::RotateWebhookSecret { team_id, secret, .. } => {
                write!(f, "rotate-webhook-secret {team_id} -> {}", secret.fingerprint())
            }
            Command::Channel { command: ChannelCommand::Create { record, .. } } => {
                write!(f, "create-channel {} ({}/{})", record.id, record.team_id, record.app)
            }
            Command::Channel { command: ChannelCommand::Delete { id, team_id, app } } => {
                write!(f, "delete-channel {id} ({team_id}/{app})")
            }
        }
    }
}

impl Command {
    /// Whether `state` may take this command within `limits`; the error is the reason given to whoever
    /// proposed it. Cheap (no allocation beyond the reason) except for parsing a provider key's PEM.
    /// Checks only bounds and well-formedness: `ClusterState::apply` decides the rest (missing members,
    /// the active key, …).
    pub fn validate(&self, state: &ClusterState) -> Result<(), String> {
        use limits::*;
        match self {
            Command::PutMember { id, device_addr, cluster_addr, device_name, .. } => {
                check_len("device address", device_addr, MAX_ADDR_LEN)?;
                check_len("cluster address", cluster_addr, MAX_ADDR_LEN)?;
                check_len("device name", device_name, MAX_ADDR_LEN)?;
                if !state.members.contains_key(id) && state.members.len() >= MAX_MEMBERS {
                    return Err(format!("the cluster already has {MAX_MEMBERS} members, the most it may have"));
                }
            }
            Command::SetMemberState { .. } | Command::RemoveMember { .. } | Command::RetireTokenKey { .. } => {}
            Command::SetRing { params } => {
                if !(1..=MAX_VNODES).contains(&params.vnodes) {
                    return Err(format!("vnodes must be 1 to {MAX_VNODES}, not {}", params.vnodes));
                }
                if !(1..=MAX_REPLICATION_FACTOR).contains(&params.replication_factor) {
                    return Err(format!(
                        "replication factor must be 1 to {MAX_REPLICATION_FACTOR}, not {}",
                        params.replication_factor
                    ));
                }
            }
            Command::RotateTokenKey { key, .. } => {
                if !state.token_keys.contains_key(&key.id) && state.token_keys.len() >= MAX_TOKEN_KEYS {
                    return Err(format!("the cluster already holds {MAX_TOKEN_KEYS} token keys, the most it may"));
                }
            }
            Command::PutProviderKey { team_id, key_id, public_key_pem, topics } => {
                check_id("team id", team_id)?;
                check_id("key id", key_id)?;
                check_len("provider public key", public_key_pem, MAX_PEM_LEN)?;
                if topics.len() > MAX_TOPICS_PER_TEAM {
                    return Err(format!("{} topics; a team may have at most {MAX_TOPICS_PER_TEAM}", topics.len()));
                }
                for topic in topics {
                    if topic.is_empty() {
                        return Err("a topic must not be empty".into());
                    }
                    check_len("topic", topic, MAX_TOPIC_LEN)?;
                }
                match state.providers.get(team_id) {
                    None if state.providers.len() >= MAX_TEAMS => {
                        return Err(format!("the cluster already has {MAX_TEAMS} provider teams, the most it may"));
                    }
                    Some(team) if !team.keys.contains_key(key_id) && team.keys.len() >= MAX_KEYS_PER_TEAM => {
                        return Err(format!("team {team_id} already has {MAX_KEYS_PER_TEAM} keys, the most it may"));
                    }
                    _ => {}
                }
                crate::pki::check_es256_public_key(public_key_pem)
                    .map_err(|why| format!("provider public key: {why}"))?;
            }
            Command::RemoveProvider { team_id, key_id } => {
                check_len("team id", team_id, MAX_ID_LEN)?;
                if let Some(key_id) = key_id {
                    check_len("key id", key_id, MAX_ID_LEN)?;
                }
            }
            Command::RevokeDevice { device } => {
                if !state.revoked.contains(device) && state.revoked.len() >= MAX_REVOKED {
                    return Err(format!("{MAX_REVOKED} devices are already revoked, the most the cluster holds"));
                }
            }
            Command::SuspectClone { device, addrs, .. } => {
                if addrs.len() > MAX_CLONE_ADDRS || addrs.iter().any(|a| a.is_empty() || a.len() > MAX_CLONE_ADDR_LEN) {
                    return Err(format!(
                        "at most {MAX_CLONE_ADDRS} source addresses of 1-{MAX_CLONE_ADDR_LEN} bytes each"
                    ));
                }
                if !state.suspected_clones.contains_key(device) && state.suspected_clones.len() >= MAX_SUSPECTED_CLONES
                {
                    return Err("too many suspected clones recorded; clear or revoke some first".into());
                }
            }
            Command::ClearClone { .. } => {}
            Command::SetBroadcast { team_id, enabled } => {
                check_id("team id", team_id)?;
                if !enabled
                    && !state.broadcast_disabled.contains(team_id)
                    && state.broadcast_disabled.len() >= MAX_TEAMS
                {
                    return Err(format!(
                        "{MAX_TEAMS} teams are already kept from broadcast, the most the cluster holds"
                    ));
                }
            }
            Command::SetWebhook { team_id, url, events, secret, .. } => {
                check_id("team id", team_id)?;
                crate::webhook::check_url(url, true)?;
                if events.is_empty() {
                    return Err("a webhook must get at least one kind of event".into());
                }
                check_secret(secret)?;
                if !state.webhooks.contains_key(team_id) && state.webhooks.len() >= MAX_TEAMS {
                    return Err(format!("{MAX_TEAMS} teams already have a webhook, the most the cluster holds"));
                }
            }
            Command::RemoveWebhook { team_id } => check_id("team id", team_id)?,
            Command::RotateWebhookSecret { team_id, secret, .. } => {
                check_id("team id", team_id)?;
                check_secret(secret)?;
            }
            Command::Channel { command } => {
                let (team_id, app) = match command {
                    ChannelCommand::Create { record, .. } => (&record.team_id, &record.app),
                    ChannelCommand::Delete { team_id, app, .. } => (team_id, app),
                };
                check_id("team id", team_id)?;
                if app.is_empty() {
                    return Err("a channel's app must not be empty".into());
                }
                check_len("app", app, MAX_TOPIC_LEN)?;
            }
        }
        Ok(())
    }
}

/// Refuses `value` longer than `max` bytes, saying how long it was rather than echoing it.
fn check_len(what: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{what} is {} bytes; at most {max} are allowed", value.len()));
    }
    Ok(())
}

/// A webhook signing secret of the length the spec allows.
fn check_secret(secret: &SigningSecret) -> Result<(), String> {
    if !crate::webhook::SECRET_LEN.contains(&secret.key.len()) {
        return Err(format!("a signing secret is {:?} bytes, not {}", crate::webhook::SECRET_LEN, secret.key.len()));
    }
    Ok(())
}

/// A team or key id: 1 to `MAX_ID_LEN` bytes.
fn check_id(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    check_len(what, value, limits::MAX_ID_LEN)
}

impl ClusterState {
    /// Applies one command. A refused command changes nothing, the epoch included; a command out of
    /// `limits` is refused here too, so one that reached the log before the limits existed is harmless.
    pub fn apply(&mut self, command: &Command) -> CommandResponse {
        let refused = |reason: &str| CommandResponse::Refused { reason: reason.to_string() };
        if let Err(reason) = command.validate(self) {
            return CommandResponse::Refused { reason };
        }
        match command {
            Command::PutMember { id, device_addr, cluster_addr, device_name, now_ms } => {
                let member = self.members.entry(*id).or_insert_with(|| Member {
                    id: *id,
                    device_addr: String::new(),
                    cluster_addr: String::new(),
                    device_name: String::new(),
                    state: MemberState::Joining,
                    since_ms: *now_ms,
                });
                member.device_addr.clone_from(device_addr);
                member.cluster_addr.clone_from(cluster_addr);
                member.device_name.clone_from(device_name);
            }
            Command::SetMemberState { id, state, now_ms } => {
                let Some(member) = self.members.get_mut(id) else { return refused("no such member") };
                if member.state == *state {
                    return CommandResponse::Applied { epoch: self.epoch };
                }
                member.state = *state;
                member.since_ms = *now_ms;
            }
            Command::RemoveMember { id } => {
                if self.members.remove(id).is_none() {
                    return refused("no such member");
                }
            }
            Command::SetRing { params } => self.ring = *params,
            Command::RotateTokenKey { key, now_ms } => {
                if self.token_keys.contains_key(&key.id) {
                    return refused("a token key with this id exists");
                }
                for record in self.token_keys.values_mut() {
                    if record.state == KeyState::Active {
                        record.state = KeyState::Accepting;
                        record.state_since_ms = *now_ms;
                    }
                }
                let record = TokenKeyRecord {
                    key: key.clone(),
                    created_ms: *now_ms,
                    state: KeyState::Active,
                    state_since_ms: *now_ms,
                };
                self.token_keys.insert(key.id, record);
            }
            Command::RetireTokenKey { id, now_ms } => {
                let Some(record) = self.token_keys.get_mut(id) else { return refused("no such token key") };
                match record.state {
                    KeyState::Active => return refused("the active key cannot be retired; rotate first"),
                    KeyState::Retired => return CommandResponse::Applied { epoch: self.epoch },
                    KeyState::Accepting => {
                        record.state = KeyState::Retired;
                        record.state_since_ms = *now_ms;
                    }
                }
            }
            Command::PutProviderKey { team_id, key_id, public_key_pem, topics } => {
                let team = self.providers.entry(team_id.clone()).or_default();
                team.keys.insert(key_id.clone(), public_key_pem.clone());
                // Adding a key without naming topics keeps the team's restriction instead of lifting it.
                if !topics.is_empty() {
                    team.topics.clone_from(topics);
                }
            }
            Command::RemoveProvider { team_id, key_id } => {
                let Some(team) = self.providers.get_mut(team_id) else { return refused("no such team") };
                match key_id {
                    None => {
                        self.providers.remove(team_id);
                    }
                    Some(key_id) => {
                        if team.keys.remove(key_id).is_none() {
                            return refused("no such key");
                        }
                        if team.keys.is_empty() {
                            self.providers.remove(team_id);
                        }
                    }
                }
            }
            Command::RevokeDevice { device } => {
                let newly_revoked = self.revoked.insert(*device);
                let suspicion_ended = self.suspected_clones.remove(device).is_some();
                if !newly_revoked && !suspicion_ended {
                    return CommandResponse::Applied { epoch: self.epoch };
                }
            }
            Command::SuspectClone { device, node, addrs, refuse, now_ms } => {
                if self.revoked.contains(device) {
                    return refused("the device is revoked");
                }
                match self.suspected_clones.get_mut(device) {
                    Some(known) if known.refuse || !*refuse => return CommandResponse::Applied { epoch: self.epoch },
                    Some(known) => known.refuse = true,
                    None => {
                        let record =
                            SuspectedClone { since_ms: *now_ms, node: *node, addrs: addrs.clone(), refuse: *refuse };
                        self.suspected_clones.insert(*device, record);
                    }
                }
            }
            Command::ClearClone { device } => {
                if self.suspected_clones.remove(device).is_none() {
                    return refused("the device is not a suspected clone");
                }
            }
            Command::SetBroadcast { team_id, enabled } => {
                let changed = if *enabled {
                    self.broadcast_disabled.remove(team_id)
                } else {
                    self.broadcast_disabled.insert(team_id.clone())
                };
                if !changed {
                    return CommandResponse::Applied { epoch: self.epoch };
                }
            }
            Command::SetWebhook { team_id, url, events, secret, now_ms } => match self.webhooks.get_mut(team_id) {
                Some(hook) => {
                    if hook.url == *url && hook.events == *events {
                        return CommandResponse::Applied { epoch: self.epoch };
                    }
                    hook.url.clone_from(url);
                    hook.events.clone_from(events);
                    hook.updated_ms = *now_ms;
                }
                None => {
                    let hook = Webhook {
                        url: url.clone(),
                        events: events.clone(),
                        secrets: vec![SigningSecret { retires_ms: None, ..secret.clone() }],
                        created_ms: *now_ms,
                        updated_ms: *now_ms,
                    };
                    self.webhooks.insert(team_id.clone(), hook);
                }
            },
            Command::RemoveWebhook { team_id } => {
                if self.webhooks.remove(team_id).is_none() {
                    return refused("the team has no webhook");
                }
            }
            Command::RotateWebhookSecret { team_id, secret, grace_ms, now_ms } => {
                let Some(hook) = self.webhooks.get_mut(team_id) else { return refused("the team has no webhook") };
                let retires = now_ms.saturating_add(*grace_ms);
                hook.secrets.retain(|s| s.live_at(*now_ms));
                for old in &mut hook.secrets {
                    old.retires_ms = Some(old.retires_ms.map_or(retires, |r| r.min(retires)));
                }
                hook.secrets.insert(0, SigningSecret { retires_ms: None, ..secret.clone() });
                hook.secrets.truncate(crate::webhook::MAX_SECRETS);
                hook.updated_ms = *now_ms;
            }
            // The state machine hands these to the channel book; reaching here is a bug, and changes nothing.
            Command::Channel { .. } => return refused("a channel command is not applied to the control state"),
        }
        self.epoch.0 += 1;
        CommandResponse::Applied { epoch: self.epoch }
    }

    /// Puts ring parameters out of `limits` back to the defaults, saying so; true if it did. A state
    /// persisted (or snapshotted) by a version without limits may hold a ring no process can build, and
    /// would crash every node on every start. Every node repairs the same state the same way, so their
    /// views still agree.
    pub fn repair_ring(&mut self) -> bool {
        if (Command::SetRing { params: self.ring }).validate(self).is_ok() {
            return false;
        }
        tracing::warn!(ring = ?self.ring, "ring parameters out of bounds in the stored state; using the defaults");
        self.ring = RingParams::default();
        true
    }

    /// Makes `keyring` hold exactly this state's token keys in their states; an empty key set (a cluster
    /// not yet bootstrapped) leaves it as it is.
    pub fn sync_keyring(&self, keyring: &crate::token::Keyring) {
        if !self.token_keys.is_empty() {
            keyring.replace_with_states(self.token_keys.values().map(|r| (r.key.clone(), r.state)));
        }
    }

    pub fn active_key(&self) -> Option<&TokenKeyRecord> {
        self.token_keys.values().find(|r| r.state == KeyState::Active)
    }

    /// The device is a suspected clone whose links and pushes are refused.
    pub fn refuses_clone(&self, device: DeviceId) -> bool {
        self.refused_clone(device).is_some()
    }

    /// Since when (UNIX ms) the device has been refused as a clone, if it is.
    pub fn refused_clone(&self, device: DeviceId) -> Option<u64> {
        self.suspected_clones.get(&device).filter(|s| s.refuse).map(|s| s.since_ms)
    }

    /// The state with every webhook's signing secrets left out: what processes that do not sign receipts
    /// (gateways) are given.
    pub fn without_webhook_secrets(&self) -> std::borrow::Cow<'_, ClusterState> {
        if self.webhooks.values().all(|hook| hook.secrets.is_empty()) {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut state = self.clone();
        for hook in state.webhooks.values_mut() {
            *hook = hook.redacted();
        }
        std::borrow::Cow::Owned(state)
    }

    /// Members in `state`, by id.
    pub fn members_in(&self, state: MemberState) -> impl Iterator<Item = &Member> {
        self.members.values().filter(move |m| m.state == state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_bumps_the_epoch_and_refusals_do_not() {
        let mut state = ClusterState::default();
        let put = Command::PutMember {
            id: 1,
            device_addr: "a:1".into(),
            cluster_addr: "a:2".into(),
            device_name: String::new(),
            now_ms: 5,
        };
        assert_eq!(state.apply(&put), CommandResponse::Applied { epoch: Epoch(1) });
        assert_eq!(state.members[&1].state, MemberState::Joining);
        let active = Command::SetMemberState { id: 1, state: MemberState::Active, now_ms: 6 };
        assert_eq!(state.apply(&active), CommandResponse::Applied { epoch: Epoch(2) });
        assert_eq!(state.apply(&active), CommandResponse::Applied { epoch: Epoch(2) }, "no-op keeps the epoch");
        let missing = Command::SetMemberState { id: 9, state: MemberState::Down, now_ms: 7 };
        assert!(matches!(state.apply(&missing), CommandResponse::Refused { .. }));
        assert_eq!(state.epoch, Epoch(2));
    }

    #[test]
    fn a_team_may_be_kept_from_broadcast_and_allowed_again() {
        let mut state = ClusterState::default();
        let set = |enabled: bool| Command::SetBroadcast { team_id: "TEAM".into(), enabled };
        assert_eq!(state.apply(&set(true)), CommandResponse::Applied { epoch: Epoch(0) }, "allowed already");
        assert_eq!(state.apply(&set(false)), CommandResponse::Applied { epoch: Epoch(1) });
        assert!(state.broadcast_disabled.contains("TEAM"));
        assert_eq!(state.apply(&set(false)), CommandResponse::Applied { epoch: Epoch(1) }, "no-op keeps the epoch");
        assert_eq!(state.apply(&set(true)), CommandResponse::Applied { epoch: Epoch(2) });
        assert!(state.broadcast_disabled.is_empty());
        let empty = Command::SetBroadcast { team_id: String::new(), enabled: false };
        assert!(matches!(state.apply(&empty), CommandResponse::Refused { .. }));
        // States written before the field existed read as every team allowed.
        let old: ClusterState = serde_json::from_str(r#"{"epoch":3,"members":{},"ring":{"vnodes":128,"replication_factor":2},"token_keys":{},"providers":{},"revoked":[]}"#).expect("an old state");
        assert!(old.broadcast_disabled.is_empty());
    }

    #[test]
    fn rotation_keeps_one_active_key_and_retires_only_accepting_ones() {
        let mut state = ClusterState::default();
        let k1 = TokenKey::from_secret(TokenKeyId(1), [1; 32]);
        let k2 = TokenKey::from_secret(TokenKeyId(2), [2; 32]);
        state.apply(&Command::RotateTokenKey { key: k1.clone(), now_ms: 1 });
        state.apply(&Command::RotateTokenKey { key: k2, now_ms: 2 });
        assert_eq!(state.active_key().map(|r| r.key.id), Some(TokenKeyId(2)));
        assert_eq!(state.token_keys[&TokenKeyId(1)].state, KeyState::Accepting);
        let retire_active = Command::RetireTokenKey { id: TokenKeyId(2), now_ms: 3 };
        assert!(matches!(state.apply(&retire_active), CommandResponse::Refused { .. }));
        state.apply(&Command::RetireTokenKey { id: TokenKeyId(1), now_ms: 3 });
        assert_eq!(state.token_keys[&TokenKeyId(1)].state, KeyState::Retired);
        assert!(matches!(
            state.apply(&Command::RotateTokenKey { key: k1, now_ms: 4 }),
            CommandResponse::Refused { .. }
        ));
    }

    #[test]
    fn provider_keys_come_and_go_and_bad_keys_are_refused() {
        let mut state = ClusterState::default();
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().public_key_pem();
        let put = |kid: &str, topics: Vec<String>| Command::PutProviderKey {
            team_id: "TEAM".into(),
            key_id: kid.into(),
            public_key_pem: pem.clone(),
            topics,
        };
        assert!(matches!(state.apply(&put("A", vec!["t.a".into()])), CommandResponse::Applied { .. }));
        state.apply(&put("B", vec![]));
        assert_eq!(state.providers["TEAM"].topics, ["t.a"], "a key added without topics keeps the team's");
        let bad = Command::PutProviderKey {
            team_id: "OTHER".into(),
            key_id: "K".into(),
            public_key_pem: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----".into(),
            topics: vec![],
        };
        let epoch = state.epoch;
        assert!(matches!(state.apply(&bad), CommandResponse::Refused { .. }));
        assert_eq!(state.epoch, epoch);
        assert!(!state.providers.contains_key("OTHER"));
        state.apply(&Command::RemoveProvider { team_id: "TEAM".into(), key_id: Some("A".into()) });
        assert_eq!(state.providers["TEAM"].keys.keys().collect::<Vec<_>>(), ["B"]);
        state.apply(&Command::RemoveProvider { team_id: "TEAM".into(), key_id: Some("B".into()) });
        assert!(state.providers.is_empty());
    }

    fn p256_pem() -> String {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().public_key_pem()
    }

    fn put_provider(team: &str, kid: &str, pem: &str, topics: Vec<String>) -> Command {
        Command::PutProviderKey { team_id: team.into(), key_id: kid.into(), public_key_pem: pem.into(), topics }
    }

    /// `validate` refuses `command` naming `what`, and `apply` refuses it too without changing anything.
    fn refused_everywhere(state: &mut ClusterState, command: &Command, what: &str) {
        let reason = command.validate(state).expect_err(&format!("validate takes {command}"));
        assert!(reason.contains(what), "{command}: {reason:?} should name {what:?}");
        let before = serde_json::to_value(&*state).unwrap();
        assert_eq!(state.apply(command), CommandResponse::Refused { reason }, "{command}");
        assert_eq!(serde_json::to_value(&*state).unwrap(), before, "a refused {command} changed the state");
    }

    #[test]
    fn ring_parameters_are_bounded() {
        let mut state = ClusterState::default();
        for (vnodes, replication_factor, what) in [
            (0, 2, "vnodes"),
            (limits::MAX_VNODES + 1, 2, "vnodes"),
            (u32::MAX, 2, "vnodes"),
            (128, 0, "replication factor"),
            (128, limits::MAX_REPLICATION_FACTOR + 1, "replication factor"),
        ] {
            refused_everywhere(
                &mut state,
                &Command::SetRing { params: RingParams { vnodes, replication_factor } },
                what,
            );
        }
        let largest = RingParams { vnodes: limits::MAX_VNODES, replication_factor: limits::MAX_REPLICATION_FACTOR };
        assert_eq!(state.apply(&Command::SetRing { params: largest }), CommandResponse::Applied { epoch: Epoch(1) });
        assert_eq!(state.ring, largest);
    }

    #[test]
    fn a_stored_ring_out_of_bounds_is_repaired_to_the_defaults() {
        let huge = RingParams { vnodes: u32::MAX, replication_factor: 3 };
        let mut state = ClusterState { ring: huge, ..ClusterState::default() };
        assert!(state.repair_ring());
        assert_eq!(state.ring, RingParams::default());
        let fine = RingParams { vnodes: 64, replication_factor: 3 };
        let mut state = ClusterState { ring: fine, ..ClusterState::default() };
        assert!(!state.repair_ring());
        assert_eq!(state.ring, fine);
    }

    #[test]
    fn members_and_their_addresses_are_bounded() {
        let mut state = ClusterState::default();
        let put = |id, addr: String| Command::PutMember {
            id,
            device_addr: addr.clone(),
            cluster_addr: addr,
            device_name: String::new(),
            now_ms: 1,
        };
        refused_everywhere(&mut state, &put(1, "a".repeat(limits::MAX_ADDR_LEN + 1)), "address");
        for id in 0..limits::MAX_MEMBERS as u64 {
            assert!(matches!(state.apply(&put(id, format!("n{id}:1"))), CommandResponse::Applied { .. }));
        }
        refused_everywhere(&mut state, &put(9999, "late:1".into()), "members");
        // An existing member may still change its addresses at the limit.
        assert!(matches!(state.apply(&put(0, "a".repeat(limits::MAX_ADDR_LEN))), CommandResponse::Applied { .. }));
    }

    #[test]
    fn token_keys_are_bounded() {
        let mut state = ClusterState::default();
        for id in 0..limits::MAX_TOKEN_KEYS as u32 {
            let key = TokenKey::from_secret(TokenKeyId(id), [1; 32]);
            assert!(matches!(
                state.apply(&Command::RotateTokenKey { key, now_ms: 1 }),
                CommandResponse::Applied { .. }
            ));
        }
        let one_more = TokenKey::from_secret(TokenKeyId(u32::MAX), [2; 32]);
        refused_everywhere(&mut state, &Command::RotateTokenKey { key: one_more, now_ms: 2 }, "token keys");
    }

    #[test]
    fn provider_ids_keys_and_topics_are_bounded() {
        let mut state = ClusterState::default();
        let pem = p256_pem();
        let long_id = "T".repeat(limits::MAX_ID_LEN + 1);
        refused_everywhere(&mut state, &put_provider(&long_id, "K", &pem, vec![]), "team id");
        refused_everywhere(&mut state, &put_provider("", "K", &pem, vec![]), "team id");
        refused_everywhere(&mut state, &put_provider("TEAM", &long_id, &pem, vec![]), "key id");
        refused_everywhere(&mut state, &put_provider("TEAM", "", &pem, vec![]), "key id");
        let huge_pem = format!("{pem}{}", " ".repeat(limits::MAX_PEM_LEN));
        refused_everywhere(&mut state, &put_provider("TEAM", "K", &huge_pem, vec![]), "public key");
        refused_everywhere(&mut state, &put_provider("TEAM", "K", "not a key", vec![]), "public key");
        let topics = (0..=limits::MAX_TOPICS_PER_TEAM).map(|i| format!("app.{i}")).collect();
        refused_everywhere(&mut state, &put_provider("TEAM", "K", &pem, topics), "topics");
        refused_everywhere(&mut state, &put_provider("TEAM", "K", &pem, vec!["t".repeat(256)]), "topic");
        refused_everywhere(&mut state, &put_provider("TEAM", "K", &pem, vec![String::new()]), "topic");
        refused_everywhere(&mut state, &Command::RemoveProvider { team_id: long_id.clone(), key_id: None }, "team id");

        for kid in 0..limits::MAX_KEYS_PER_TEAM {
            let command = put_provider("TEAM", &format!("K{kid}"), &pem, vec![]);
            assert!(matches!(state.apply(&command), CommandResponse::Applied { .. }));
        }
        refused_everywhere(&mut state, &put_provider("TEAM", "ONE-MORE", &pem, vec![]), "keys");
        assert!(matches!(state.apply(&put_provider("TEAM", "K0", &pem, vec![])), CommandResponse::Applied { .. }));

        for team in 1..limits::MAX_TEAMS {
            assert!(matches!(
                state.apply(&put_provider(&format!("T{team}"), "K", &pem, vec![])),
                CommandResponse::Applied { .. }
            ));
        }
        refused_everywhere(&mut state, &put_provider("NEW-TEAM", "K", &pem, vec![]), "teams");
    }

    #[test]
    fn revocations_are_bounded() {
        let revoked = (0..limits::MAX_REVOKED as u128).map(DeviceId).collect();
        let mut state = ClusterState { revoked, ..ClusterState::default() };
        refused_everywhere(&mut state, &Command::RevokeDevice { device: DeviceId(u128::MAX) }, "revoked");
        let again = Command::RevokeDevice { device: DeviceId(0) };
        assert_eq!(state.apply(&again), CommandResponse::Applied { epoch: Epoch(0) }, "revoking again is a no-op");
    }

    #[test]
    fn suspected_clones_are_recorded_escalated_cleared_and_bounded() {
        let mut state = ClusterState::default();
        let suspect = |device: u128, refuse: bool| Command::SuspectClone {
            device: DeviceId(device),
            node: 1,
            addrs: vec!["127.0.0.2".into(), "127.0.0.3".into()],
            refuse,
            now_ms: 10,
        };
        assert_eq!(state.apply(&suspect(1, false)), CommandResponse::Applied { epoch: Epoch(1) });
        assert!(!state.refuses_clone(DeviceId(1)));
        assert_eq!(state.apply(&suspect(1, false)), CommandResponse::Applied { epoch: Epoch(1) }, "no change");
        assert_eq!(state.apply(&suspect(1, true)), CommandResponse::Applied { epoch: Epoch(2) }, "escalates");
        assert!(state.refuses_clone(DeviceId(1)));
        assert_eq!(state.apply(&suspect(1, false)), CommandResponse::Applied { epoch: Epoch(2) }, "never relaxes");
        assert_eq!(state.suspected_clones[&DeviceId(1)].since_ms, 10);
        state.apply(&Command::ClearClone { device: DeviceId(1) });
        assert!(state.suspected_clones.is_empty());
        assert!(matches!(state.apply(&Command::ClearClone { device: DeviceId(1) }), CommandResponse::Refused { .. }));

        state.apply(&suspect(2, true));
        state.apply(&Command::RevokeDevice { device: DeviceId(2) });
        assert!(!state.refuses_clone(DeviceId(2)), "revocation supersedes the suspicion");
        assert!(matches!(state.apply(&suspect(2, true)), CommandResponse::Refused { .. }));

        let many = Command::SuspectClone {
            device: DeviceId(3),
            node: 1,
            addrs: vec!["a".into(); MAX_CLONE_ADDRS + 1],
            refuse: false,
            now_ms: 0,
        };
        assert!(matches!(state.apply(&many), CommandResponse::Refused { .. }));
        let long = Command::SuspectClone {
            device: DeviceId(3),
            node: 1,
            addrs: vec!["a".repeat(65)],
            refuse: false,
            now_ms: 0,
        };
        assert!(matches!(state.apply(&long), CommandResponse::Refused { .. }));
        for i in 0..MAX_SUSPECTED_CLONES as u128 {
            state.apply(&suspect(1000 + i, false));
        }
        let epoch = state.epoch;
        assert!(matches!(state.apply(&suspect(1, false)), CommandResponse::Refused { .. }));
        assert_eq!(state.epoch, epoch);
        assert_eq!(state.suspected_clones.len(), MAX_SUSPECTED_CLONES);
    }

    #[test]
    fn states_written_before_clones_were_recorded_still_load() {
        let mut json = serde_json::to_value(ClusterState::default()).unwrap();
        json.as_object_mut().unwrap().remove("suspected_clones");
        let state: ClusterState = serde_json::from_value(json).unwrap();
        assert!(state.suspected_clones.is_empty());
    }

    #[test]
    fn command_display_never_shows_secrets() {
        let key = TokenKey::from_secret(TokenKeyId(3), [0xab; 32]);
        let text = format!("{} {:?}", Command::RotateTokenKey { key: key.clone(), now_ms: 0 }, key);
        assert!(!text.contains("abab"), "{text}");
    }

    #[test]
    fn a_webhook_keeps_its_secret_across_updates_and_a_rotation_keeps_the_old_one_for_the_grace_period() {
        let mut state = ClusterState::default();
        let first = SigningSecret::generate(1);
        let set = |url: &str, events: &str, secret: &SigningSecret| Command::SetWebhook {
            team_id: "TEAM".into(),
            url: url.into(),
            events: EventKind::parse_list(events).unwrap(),
            secret: secret.clone(),
            now_ms: 10,
        };
        assert_eq!(
            state.apply(&set("https://a.example.com/h", "", &first)),
            CommandResponse::Applied { epoch: Epoch(1) }
        );
        assert_eq!(state.webhooks["TEAM"].secrets, vec![first.clone()]);
        // Setting it again changes the URL and events, never the secret.
        let ignored = SigningSecret::generate(2);
        assert_eq!(
            state.apply(&set("https://b.example.com/h", "delivered", &ignored)),
            CommandResponse::Applied { epoch: Epoch(2) }
        );
        let hook = &state.webhooks["TEAM"];
        assert_eq!(
            (hook.url.as_str(), hook.events.len(), &hook.secrets),
            ("https://b.example.com/h", 1, &vec![first.clone()])
        );
        assert!(hook.wants(EventKind::Delivered) && !hook.wants(EventKind::Expired));
        assert_eq!(
            state.apply(&set("https://b.example.com/h", "delivered", &ignored)),
            CommandResponse::Applied { epoch: Epoch(2) }
        );

        let second = SigningSecret::generate(3);
        let rotate = |secret: &SigningSecret, now_ms| Command::RotateWebhookSecret {
            team_id: "TEAM".into(),
            secret: secret.clone(),
            grace_ms: 100,
            now_ms,
        };
        assert!(matches!(state.apply(&rotate(&second, 1000)), CommandResponse::Applied { .. }));
        let hook = &state.webhooks["TEAM"];
        assert_eq!(hook.signing_keys(1050), vec![second.key.as_slice(), first.key.as_slice()]);
        assert_eq!(hook.signing_keys(1100), vec![second.key.as_slice()], "the old one retires after the grace");
        // A later rotation drops what had retired and keeps the secret it replaces for the grace period.
        let third = SigningSecret::generate(4);
        assert!(matches!(state.apply(&rotate(&third, 2000)), CommandResponse::Applied { .. }));
        let hook = &state.webhooks["TEAM"];
        assert_eq!(hook.secrets.len(), 2);
        assert_eq!(hook.signing_keys(2050), vec![third.key.as_slice(), second.key.as_slice()]);
        assert!(!format!("{}", rotate(&third, 0)).contains(&third.whsec()[6..]));

        // Bad input changes nothing.
        let epoch = state.epoch;
        let short = SigningSecret { key: vec![1; 8], ..first.clone() };
        for bad in [
            set("ftp://a.example.com/", "", &first),
            set("https://a.example.com/", "", &short),
            rotate(&short, 3000),
            Command::RotateWebhookSecret { team_id: "OTHER".into(), secret: first.clone(), grace_ms: 0, now_ms: 0 },
            Command::RemoveWebhook { team_id: "OTHER".into() },
        ] {
            assert!(matches!(state.apply(&bad), CommandResponse::Refused { .. }), "{bad}");
        }
        assert_eq!(state.epoch, epoch);
        assert!(matches!(
            state.apply(&Command::RemoveWebhook { team_id: "TEAM".into() }),
            CommandResponse::Applied { .. }
        ));
        assert!(state.webhooks.is_empty());
    }
}
