//! Who may call which cluster RPC. The TLS layer has already verified the caller's certificate against the
//! cluster CA; this module reads the role that certificate names (`pki::role_from_cert`) and checks it
//! against one table, so every RPC's rule is written once, here, and read at the top of its handler.
//!
//! A refusal is `PermissionDenied` with a message naming the RPC, the caller's role and the roles allowed,
//! and is counted in `courier_node_rpc_denied_total{rpc, role}`. It knows nothing of what the RPCs do.

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
    FetchQueue,
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
            Rpc::FetchQueue => "FetchQueue",
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
            | Rpc::FetchQueue
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
    let role = request.peer_certs().and_then(|chain| chain.first().and_then(role_from_cert));
    check(role, rpc)
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

    const ALL: [Rpc; 16] = [
        Rpc::RaftAppend,
        Rpc::RaftVote,
        Rpc::RaftSnapshot,
        Rpc::Probe,
        Rpc::Join,
        Rpc::Replicate,
        Rpc::FetchQueue,
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
    fn the_table_gives_each_role_only_its_rpcs() {
        let allowed =
            |role| ALL.iter().filter(|rpc| check(Some(role), **rpc).is_ok()).map(|r| r.name()).collect::<Vec<_>>();
        assert_eq!(allowed(ClusterRole::Gateway), ["Forward", "NotificationStatus", "WatchCluster", "ManageChannel"]);
        assert_eq!(allowed(ClusterRole::Admin), ["Join", "Propose", "RemoveNode", "Status", "ListChannels"]);
        let node = allowed(ClusterRole::Node(3));
        for rpc in
            ["RaftAppend", "RaftVote", "RaftSnapshot", "Probe", "Replicate", "FetchQueue", "FetchKept", "WatchCluster"]
        {
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
