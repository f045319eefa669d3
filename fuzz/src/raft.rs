//! The Raft command target: commands as the Propose RPC and the Raft log carry them (serde JSON), and
//! sequences of commands built straight from bytes, so that counts accumulate toward the state's limits.

use std::sync::OnceLock;

use courier_core::ids::DeviceId;
use courier_core::state::{ClusterState, Command, CommandResponse, MemberState, RingParams, limits};
use courier_core::token::{KeyState, TokenKey, TokenKeyId};

/// A real provider public key, so that key-adding commands can succeed.
fn provider_pem() -> &'static str {
    static PEM: OnceLock<String> = OnceLock::new();
    PEM.get_or_init(|| {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key").public_key_pem()
    })
}

/// A small cluster: two members, one token key, one provider team.
fn populated() -> ClusterState {
    let mut state = ClusterState::default();
    let setup = [
        Command::PutMember {
            id: 1,
            device_addr: "a:1".into(),
            cluster_addr: "a:2".into(),
            device_name: String::new(),
            now_ms: 1,
        },
        Command::PutMember {
            id: 2,
            device_addr: "b:1".into(),
            cluster_addr: "b:2".into(),
            device_name: String::new(),
            now_ms: 1,
        },
        Command::SetMemberState { id: 1, state: MemberState::Active, now_ms: 2 },
        Command::RotateTokenKey { key: TokenKey::from_secret(TokenKeyId(1), [1; 32]), now_ms: 3 },
        Command::PutProviderKey {
            team_id: "TEAM".into(),
            key_id: "K".into(),
            public_key_pem: provider_pem().to_string(),
            topics: vec!["app.one".into()],
        },
    ];
    for command in &setup {
        assert!(matches!(state.apply(command), CommandResponse::Applied { .. }), "fixture command {command}");
    }
    state
}

/// Raft commands: the input as JSON, applied to a small cluster's state; then the input read as a
/// sequence of commands, applied one after another to one state.
pub fn raft_command(data: &[u8]) {
    if let Ok(command) = serde_json::from_slice::<Command>(data) {
        let json = serde_json::to_vec(&command).expect("a command serializes");
        let again: Command = serde_json::from_slice(&json).expect("a serialized command parses");
        assert_eq!(serde_json::to_vec(&again).expect("serializes"), json, "JSON round trip");
        check_apply(&mut populated(), &command);
    }
    let mut state = populated();
    let mut reader = Reader(data);
    while let Some(command) = next_command(&mut reader) {
        check_apply(&mut state, &command);
    }
}

/// Applies `command`, holding `validate` and `apply` to their promises.
fn check_apply(state: &mut ClusterState, command: &Command) {
    let before = serde_json::to_value(&*state).expect("state serializes");
    let verdict = command.validate(state);
    let _ = command.to_string();
    match state.apply(command) {
        CommandResponse::Refused { reason } => {
            assert!(!reason.is_empty());
            let after = serde_json::to_value(&*state).expect("state serializes");
            assert_eq!(before, after, "a refused command ({command}: {reason}) changed the state");
        }
        CommandResponse::Applied { epoch } => {
            assert!(verdict.is_ok(), "apply took {command}, which validate refuses: {verdict:?}");
            assert_eq!(epoch, state.epoch);
            let old = before["epoch"].as_u64().expect("epoch is a number");
            assert!(epoch.0 == old || epoch.0 == old + 1, "epoch went from {old} to {}", epoch.0);
        }
        CommandResponse::ChannelApplied { .. } | CommandResponse::ChannelRefused { .. } => {
            panic!("the control state answered {command} as a channel command")
        }
    }
    check_limits(state);
}

/// Everything `limits` promises about a state built only through `apply`.
fn check_limits(state: &ClusterState) {
    assert!((1..=limits::MAX_VNODES).contains(&state.ring.vnodes));
    assert!((1..=limits::MAX_REPLICATION_FACTOR).contains(&state.ring.replication_factor));
    assert!(state.members.len() <= limits::MAX_MEMBERS);
    assert!(
        state
            .members
            .values()
            .all(|m| [&m.device_addr, &m.cluster_addr, &m.device_name].iter().all(|a| a.len() <= limits::MAX_ADDR_LEN))
    );
    assert!(state.token_keys.len() <= limits::MAX_TOKEN_KEYS);
    assert!(state.token_keys.values().filter(|r| r.state == KeyState::Active).count() <= 1);
    assert!(state.providers.len() <= limits::MAX_TEAMS);
    for (team_id, team) in &state.providers {
        assert!(!team_id.is_empty() && team_id.len() <= limits::MAX_ID_LEN);
        assert!(!team.keys.is_empty() && team.keys.len() <= limits::MAX_KEYS_PER_TEAM);
        assert!(team.keys.iter().all(|(k, pem)| k.len() <= limits::MAX_ID_LEN && pem.len() <= limits::MAX_PEM_LEN));
        assert!(team.topics.len() <= limits::MAX_TOPICS_PER_TEAM);
        assert!(team.topics.iter().all(|t| !t.is_empty() && t.len() <= limits::MAX_TOPIC_LEN));
    }
    assert!(state.revoked.len() <= limits::MAX_REVOKED);
    assert!(state.suspected_clones.len() <= courier_core::state::MAX_SUSPECTED_CLONES);
    assert!(state.suspected_clones.values().all(|s| s.addrs.len() <= courier_core::state::MAX_CLONE_ADDRS));
    assert!(state.suspected_clones.keys().all(|d| !state.revoked.contains(d)), "revocation ends a suspicion");
}

/// Reads fields from the input; runs dry into zeros and empty strings.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&first, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        first
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    /// A string: a length byte, then that many input bytes, or (with the top bit set) a run of up to
    /// 127 × 128 bytes to reach the length limits.
    fn string(&mut self) -> String {
        let len = self.byte();
        if len & 0x80 != 0 {
            return "x".repeat(usize::from(len & 0x7f) * 128);
        }
        let take = usize::from(len).min(self.0.len());
        let (text, rest) = self.0.split_at(take);
        self.0 = rest;
        String::from_utf8_lossy(text).into_owned()
    }

    fn device(&mut self) -> DeviceId {
        let mut bytes = [0u8; 16];
        bytes[15] = self.byte();
        DeviceId::from_slice(&bytes).expect("16 bytes")
    }
}

fn next_command(reader: &mut Reader<'_>) -> Option<Command> {
    let (&selector, rest) = reader.0.split_first()?;
    reader.0 = rest;
    let state = |b: u8| {
        [MemberState::Joining, MemberState::Active, MemberState::Draining, MemberState::Down][usize::from(b % 4)]
    };
    let command = match selector % 11 {
        0 => Command::PutMember {
            id: u64::from(reader.byte()),
            device_addr: reader.string(),
            cluster_addr: reader.string(),
            device_name: reader.string(),
            now_ms: u64::from(reader.u32()),
        },
        1 => Command::SetMemberState { id: u64::from(reader.byte()), state: state(reader.byte()), now_ms: 9 },
        2 => Command::RemoveMember { id: u64::from(reader.byte()) },
        3 => Command::SetRing { params: RingParams { vnodes: reader.u32(), replication_factor: reader.u32() } },
        4 => {
            let id = TokenKeyId(u32::from(reader.byte()));
            Command::RotateTokenKey { key: TokenKey::from_secret(id, [reader.byte(); 32]), now_ms: 10 }
        }
        5 => Command::RetireTokenKey { id: TokenKeyId(u32::from(reader.byte())), now_ms: 11 },
        6 => {
            let flags = reader.byte();
            let team_id = reader.string();
            let key_id = reader.string();
            let public_key_pem = if flags & 1 == 0 { provider_pem().to_string() } else { reader.string() };
            // Up to 255 topics, each from the input or generated once it runs dry.
            let topics = (0..reader.byte())
                .map(|i| if reader.0.is_empty() { format!("app.{i}") } else { reader.string() })
                .collect();
            Command::PutProviderKey { team_id, key_id, public_key_pem, topics }
        }
        7 => {
            let team_id = reader.string();
            let key_id = (reader.byte() & 1 == 1).then(|| reader.string());
            Command::RemoveProvider { team_id, key_id }
        }
        8 => Command::RevokeDevice { device: reader.device() },
        9 => {
            let device = reader.device();
            let flags = reader.byte();
            let addrs = (0..flags >> 1).map(|_| reader.string()).collect();
            Command::SuspectClone { device, node: u64::from(reader.byte()), addrs, refuse: flags & 1 == 1, now_ms: 12 }
        }
        _ => Command::ClearClone { device: reader.device() },
    };
    Some(command)
}
