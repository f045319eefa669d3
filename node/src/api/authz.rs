//! Who may call which cluster RPC. The TLS layer has already verified the caller's certificate against the
//! cluster CA; this module reads the role that certificate names (`pki::role_from_cert`) and checks it
//! against one table, so every RPC's rule is written once, here, and read at the top of its handler.
//!
//! A refusal is `PermissionDenied` with a message naming the RPC, the caller's role and the roles allowed,
//! and is counted in `courier_node_rpc_denied_total{rpc, role}`. It knows nothing of what the RPCs do.

use std::collections::HashMap;
use std::sync::Mutex;

use rustls::pki_types::CertificateDer;
use tonic::{Request, Status};

use crate::pki::{ClusterRole, role_from_cert};

/// The cluster API's RPCs, as the authorization table names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    RaftAppend,
    RaftVote,
    RaftSnapshot,
    Probe,
    Join,
    Replicate,
    ReplicateStream,
    FetchQueue,
    FetchQueues,
    Forward,
    NotificationStatus,
    Propose,
    RemoveNode,
    Status,
    WatchCluster,
    ManageChannel,
    FetchKept,
    ListChannels,
}

/// Which kinds of caller an RPC admits.
#[derive(Debug, Clone, Copy)]
struct Allowed {
    node: bool,
    gateway: bool,
    admin: bool,
}

const NODES: Allowed = Allowed { node: true, gateway: false, admin: false };
const GATEWAYS: Allowed = Allowed { node: false, gateway: true, admin: false };
const ADMIN: Allowed = Allowed { node: false, gateway: false, admin: true };

impl Rpc {
    pub fn name(self) -> &'static str {
        match self {
            Rpc::RaftAppend => "RaftAppend",
            Rpc::RaftVote => "RaftVote",
            Rpc::RaftSnapshot => "RaftSnapshot",
            Rpc::Probe => "Probe",
            Rpc::Join => "Join",
            Rpc::Replicate => "Replicate",
            Rpc::ReplicateStream => "ReplicateStream",
            Rpc::FetchQueue => "FetchQueue",
            Rpc::FetchQueues => "FetchQueues",
            Rpc::Forward => "Forward",
            Rpc::NotificationStatus => "NotificationStatus",
            Rpc::Propose => "Propose",
            Rpc::RemoveNode => "RemoveNode",
            Rpc::Status => "Status",
            Rpc::WatchCluster => "WatchCluster",
            Rpc::ManageChannel => "ManageChannel",
            Rpc::FetchKept => "FetchKept",
            Rpc::ListChannels => "ListChannels",
        }
    }

    /// The table. Nodes may also `Propose` (only what `check_command` lets a node propose) and `Join`,
    /// because a node that is not the leader forwards those to the leader under its own certificate
    /// (`raft::control`); operator changes and `RemoveNode` are served by the leader alone. No node calls
    /// `Forward`, `NotificationStatus` or `Status` on another. `WatchCluster` carries the token keys, so
    /// it goes to gateways and nodes only, never to the admin tool (whose `Status` shows key ids only).
    fn allowed(self) -> Allowed {
        match self {
            Rpc::RaftAppend
            | Rpc::RaftVote
            | Rpc::RaftSnapshot
            | Rpc::Probe
            | Rpc::Replicate
            | Rpc::ReplicateStream
            | Rpc::FetchQueue
            | Rpc::FetchQueues
            | Rpc::FetchKept => NODES,
            Rpc::Forward | Rpc::NotificationStatus | Rpc::ManageChannel => GATEWAYS,
            Rpc::Status | Rpc::ListChannels => ADMIN,
            Rpc::Propose | Rpc::Join => Allowed { node: true, gateway: false, admin: true },
            Rpc::RemoveNode => ADMIN,
            Rpc::WatchCluster => Allowed { node: true, gateway: true, admin: false },
        }
    }

    fn admits(self, role: ClusterRole) -> bool {
        let allowed = self.allowed();
        match role {
            ClusterRole::Node(_) => allowed.node,
            ClusterRole::Gateway => allowed.gateway,
            ClusterRole::Admin => allowed.admin,
        }
    }

    fn allowed_names(self) -> String {
        let allowed = self.allowed();
        let names: Vec<&str> = [(allowed.node, "nodes"), (allowed.gateway, "gateways"), (allowed.admin, "admin")]
            .into_iter()
            .filter_map(|(yes, name)| yes.then_some(name))
            .collect();
        names.join(", ")
    }
}

/// The caller's role if it may call `rpc`; otherwise `PermissionDenied`, counted.
pub fn authorize<T>(request: &Request<T>, rpc: Rpc) -> Result<ClusterRole, Status> {
    let role = request.peer_certs().and_then(|chain| chain.first().and_then(|cert| ROLES.of(cert)));
    check(role, rpc)
}

/// The roles of the certificates callers presented lately, by their DER bytes. Every RPC on a connection
/// carries the same certificate, and parsing it was most of a small `Replicate` call's cost; the role is a
/// function of the bytes alone (the TLS layer verified them), so it is read once. A cluster has a few
/// dozen certificates; the cache is emptied if it ever holds `ROLES_KEPT`.
static ROLES: RoleCache = RoleCache::new(ROLES_KEPT);

const ROLES_KEPT: usize = 1024;

struct RoleCache {
    kept: usize,
    roles: Mutex<Option<HashMap<Vec<u8>, Option<ClusterRole>>>>,
}

impl RoleCache {
    const fn new(kept: usize) -> Self {
        RoleCache { kept, roles: Mutex::new(None) }
    }

    fn of(&self, cert: &CertificateDer<'_>) -> Option<ClusterRole> {
        let lock = || self.roles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(role) = lock().as_ref().and_then(|roles| roles.get(cert.as_ref())) {
            return *role;
        }
        let role = role_from_cert(cert);
        let mut roles = lock();
        let roles = roles.get_or_insert_with(HashMap::new);
        if roles.len() >= self.kept {
            roles.clear();
        }
        roles.insert(cert.as_ref().to_vec(), role);
        role
    }
}

/// `authorize` on an already extracted role (`None`: no certificate, or one that names no valid role).
pub fn check(role: Option<ClusterRole>, rpc: Rpc) -> Result<ClusterRole, Status> {
    match role {
        Some(role) if rpc.admits(role) => Ok(role),
        Some(role) => Err(denied(
            rpc,
            role_label(Some(role)),
            format!("{} may not call {}; only {} may", role, rpc.name(), rpc.allowed_names()),
        )),
        None => Err(denied(
            rpc,
            role_label(None),
            format!(
                "{} needs a cluster certificate naming a role (urn:courier:role:…); this one names none \
                 (issue one with `courier pki issue`)",
                rpc.name()
            ),
        )),
    }
}

/// Who a proposal comes from, by what it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proposal {
    /// What nodes propose of themselves: their own membership, failure detection, suspected clones.
    ClusterInternal,
    /// A channel created or deleted for a gateway's provider (`ManageChannel`), forwarded to the leader by
    /// the node the gateway asked.
    Channel,
    /// Everything else: `courier ctl`.
    Operator,
}

impl Proposal {
    pub fn of(command: &crate::raft::Command) -> Self {
        if command.is_cluster_internal() {
            Proposal::ClusterInternal
        } else if command.as_channel().is_some() {
            Proposal::Channel
        } else {
            Proposal::Operator
        }
    }
}

/// Which proposals each role may make: a node cluster-internal ones and the channel changes it forwards,
/// the admin only operator changes. A node certificate therefore cannot rotate keys, add providers or
/// revoke devices, and a gateway certificate proposes nothing but channel changes (`ManageChannel`).
pub fn check_command(caller: ClusterRole, proposal: Proposal) -> Result<(), Status> {
    match (caller, proposal) {
        (ClusterRole::Node(_), Proposal::ClusterInternal | Proposal::Channel)
        | (ClusterRole::Admin, Proposal::Operator) => Ok(()),
        (ClusterRole::Node(_), Proposal::Operator) => Err(denied(
            Rpc::Propose,
            role_label(Some(caller)),
            format!("{caller} may not propose an operator change; only the admin certificate may"),
        )),
        _ => Err(denied(
            Rpc::Propose,
            role_label(Some(caller)),
            format!("{caller} may not propose a change the nodes make themselves"),
        )),
    }
}

/// Refuses a node that claims to be another (a Raft message or probe naming node `claimed` over node
/// `caller`'s certificate).
pub fn check_node_claim(rpc: Rpc, caller: ClusterRole, claimed: u64) -> Result<(), Status> {
    match caller {
        ClusterRole::Node(id) if id == claimed => Ok(()),
        _ => Err(denied(
            rpc,
            role_label(Some(caller)),
            format!("{caller} may not speak for node {claimed} in {}", rpc.name()),
        )),
    }
}

fn role_label(role: Option<ClusterRole>) -> &'static str {
    match role {
        Some(ClusterRole::Node(_)) => "node",
        Some(ClusterRole::Gateway) => "gateway",
        Some(ClusterRole::Admin) => "admin",
        None => "none",
    }
}

fn denied(rpc: Rpc, role: &'static str, message: String) -> Status {
    metrics::counter!("courier_node_rpc_denied_total", "rpc" => rpc.name(), "role" => role).increment(1);
    tracing::warn!(rpc = rpc.name(), role, "cluster RPC refused: {message}");
    Status::permission_denied(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Rpc; 18] = [
        Rpc::RaftAppend,
        Rpc::RaftVote,
        Rpc::RaftSnapshot,
        Rpc::Probe,
        Rpc::Join,
        Rpc::Replicate,
        Rpc::ReplicateStream,
        Rpc::FetchQueue,
        Rpc::FetchQueues,
        Rpc::Forward,
        Rpc::NotificationStatus,
        Rpc::Propose,
        Rpc::RemoveNode,
        Rpc::Status,
        Rpc::WatchCluster,
        Rpc::ManageChannel,
        Rpc::FetchKept,
        Rpc::ListChannels,
    ];

    #[test]
    fn a_certificate_s_role_is_read_once_and_stays_right_when_the_cache_is_emptied() {
        use crate::pki::{DeviceCa, PkiDir, PkiOptions, load_certs, new_device_key_and_csr};
        let dir = tempfile::tempdir().expect("tempdir");
        crate::pki::init(dir.path(), &PkiOptions { nodes: vec![1, 2], ..PkiOptions::default() }).expect("pki");
        let pki = PkiDir::new(dir.path());
        let cert = |path: std::path::PathBuf| load_certs(&path).expect("cert").remove(0);
        let (_key, csr) = new_device_key_and_csr().expect("csr");
        let device = DeviceCa::load(&pki).expect("ca").issue(&csr, crate::ids::DeviceId(7)).expect("device");
        let cache = RoleCache::new(2);
        let seen = [
            (cert(pki.node_cert(1)), Some(ClusterRole::Node(1))),
            (cert(pki.member_cert("gateway")), Some(ClusterRole::Gateway)),
            (device, None),
            (cert(pki.node_cert(2)), Some(ClusterRole::Node(2))),
        ];
        // Twice round: the second time from the cache, which was emptied on the way by the third and fourth.
        for (cert, role) in seen.iter().chain(seen.iter()) {
            assert_eq!(cache.of(cert), *role);
            assert_eq!(cache.of(cert), *role, "cached");
        }
        let held = cache.roles.lock().expect("lock").as_ref().map_or(0, HashMap::len);
        assert!(held <= 2, "at most `kept` certificates held: {held}");
    }

    #[test]
    fn the_table_gives_each_role_only_its_rpcs() {
        let allowed =
            |role| ALL.iter().filter(|rpc| check(Some(role), **rpc).is_ok()).map(|r| r.name()).collect::<Vec<_>>();
        assert_eq!(allowed(ClusterRole::Gateway), ["Forward", "NotificationStatus", "WatchCluster", "ManageChannel"]);
        assert_eq!(allowed(ClusterRole::Admin), ["Join", "Propose", "RemoveNode", "Status", "ListChannels"]);
        let node = allowed(ClusterRole::Node(3));
        for rpc in [
            "RaftAppend",
            "RaftVote",
            "RaftSnapshot",
            "Probe",
            "Replicate",
            "ReplicateStream",
            "FetchQueue",
            "FetchQueues",
            "FetchKept",
            "WatchCluster",
        ] {
            assert!(node.contains(&rpc), "{rpc}");
        }
        for rpc in ["Forward", "NotificationStatus", "Status", "ManageChannel"] {
            assert!(!node.contains(&rpc), "{rpc}");
        }
        for rpc in ALL {
            let refused = check(None, rpc).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        }
        let refused = check(Some(ClusterRole::Gateway), Rpc::Propose).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("gateway may not call Propose"), "{}", refused.message());
    }

    #[test]
    fn a_node_speaks_only_for_itself() {
        assert!(check_node_claim(Rpc::RaftVote, ClusterRole::Node(2), 2).is_ok());
        assert!(check_node_claim(Rpc::RaftVote, ClusterRole::Node(2), 3).is_err());
        assert!(check_node_claim(Rpc::RaftVote, ClusterRole::Admin, 3).is_err());
    }
}
