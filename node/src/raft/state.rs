//! The control state the Raft group agrees on, and the commands that change it.
//!
//! `ClusterState` is the whole replicated state machine: members, ring parameters, token keys, provider
//! credentials, revoked devices, suspected clones and the epoch. `apply` is the only code that changes it:
//! a plain match over `Command`, deterministic (every timestamp travels inside the command), bumping the
//! epoch on every change it makes. Data-plane traffic never comes here.

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
}

impl Command {
    /// Whether a node proposes this on its own (membership it reports about itself, failure detection,
    /// suspected clones), rather than an operator through `courier ctl`. A node certificate may propose only
    /// these, so a stolen node key cannot rotate keys, add providers or revoke devices.
    pub fn is_cluster_internal(&self) -> bool {
        matches!(self, Command::PutMember { .. } | Command::SetMemberState { .. } | Command::SuspectClone { .. })
    }
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
            Command::SuspectClone { device, refuse, .. } => write!(f, "suspect-clone {device} (refuse: {refuse})"),
            Command::ClearClone { device } => write!(f, "clear-clone {device}"),
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
                let newly_revoked = self.revoked.insert(*device);
                let suspicion_ended = self.suspected_clones.remove(device).is_some();
                if !newly_revoked && !suspicion_ended {
                    return CommandResponse::Applied { epoch: self.epoch };
                }
            }
            Command::SuspectClone { device, node, addrs, refuse, now_ms } => {
                if addrs.len() > MAX_CLONE_ADDRS || addrs.iter().any(|a| a.is_empty() || a.len() > MAX_CLONE_ADDR_LEN) {
                    return refused(&format!(
                        "at most {MAX_CLONE_ADDRS} source addresses of 1-{MAX_CLONE_ADDR_LEN} bytes each"
                    ));
                }
                if self.revoked.contains(device) {
                    return refused("the device is revoked");
                }
                let full = self.suspected_clones.len() >= MAX_SUSPECTED_CLONES;
                match self.suspected_clones.get_mut(device) {
                    Some(known) if known.refuse || !*refuse => return CommandResponse::Applied { epoch: self.epoch },
                    Some(known) => known.refuse = true,
                    None if full => {
                        return refused("too many suspected clones recorded; clear or revoke some first");
                    }
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

    /// The device is a suspected clone whose links and pushes are refused.
    pub fn refuses_clone(&self, device: DeviceId) -> bool {
        self.refused_clone(device).is_some()
    }

    /// Since when (UNIX ms) the device has been refused as a clone, if it is.
    pub fn refused_clone(&self, device: DeviceId) -> Option<u64> {
        self.suspected_clones.get(&device).filter(|s| s.refuse).map(|s| s.since_ms)
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
}
