//! The control state the Raft group agrees on, and the commands that change it.
//!
//! `ClusterState` is the whole replicated state machine: members, ring parameters, token keys, provider
//! credentials, revoked devices and the epoch. `apply` is the only code that changes it: a plain match over
//! `Command`, deterministic (every timestamp travels inside the command), bumping the epoch on every change
//! it makes. Data-plane traffic never comes here.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;
pub use crate::token::KeyState;
use crate::token::{TokenKey, TokenKeyId};

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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterState {
    pub epoch: Epoch,
    pub members: BTreeMap<NodeId, Member>,
    pub ring: RingParams,
    pub token_keys: BTreeMap<TokenKeyId, TokenKeyRecord>,
    /// Team id → team.
    pub providers: BTreeMap<String, ProviderTeam>,
    pub revoked: BTreeSet<DeviceId>,
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
    RevokeDevice {
        device: DeviceId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Applied; the state is now at this epoch.
    Applied { epoch: Epoch },
    /// Valid Raft entry, refused by the state machine; nothing changed.
    Refused { reason: String },
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
        }
    }
}

impl ClusterState {
    /// Applies one command. A refused command changes nothing, the epoch included.
    pub fn apply(&mut self, command: &Command) -> CommandResponse {
        let refused = |reason: &str| CommandResponse::Refused { reason: reason.to_string() };
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
            Command::SetRing { params } => {
                if params.vnodes == 0 || params.replication_factor == 0 {
                    return refused("vnodes and replication factor must be at least 1");
                }
                self.ring = *params;
            }
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
                if team_id.is_empty() || key_id.is_empty() {
                    return refused("team id and key id must not be empty");
                }
                if let Err(why) = crate::pki::check_es256_public_key(public_key_pem) {
                    return refused(&format!("provider public key: {why}"));
                }
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
                if !self.revoked.insert(*device) {
                    return CommandResponse::Applied { epoch: self.epoch };
                }
            }
        }
        self.epoch.0 += 1;
        CommandResponse::Applied { epoch: self.epoch }
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

    #[test]
    fn command_display_never_shows_secrets() {
        let key = TokenKey::from_secret(TokenKeyId(3), [0xab; 32]);
        let text = format!("{} {:?}", Command::RotateTokenKey { key: key.clone(), now_ms: 0 }, key);
        assert!(!text.contains("abab"), "{text}");
    }
}
