//! Raft RPCs over the cluster gRPC service: the client side (`Network`, handed to openraft) and the
//! server side (`serve_*`, called by the gRPC service). openraft's messages travel as JSON, exactly as its
//! serde derives write them, so this module is only transport.

use std::sync::Arc;
use std::time::Duration;

use courier_proto::cluster::RaftPayload;
use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::lease::Lease;
use super::{NodeId, Raft, TypeConfig};
use crate::api::authz::{self, Rpc as AuthzRpc};
use crate::peer::Peers;
use crate::pki::ClusterRole;

/// Creates connections to Raft peers; one per target, reusing the shared gRPC channels.
#[derive(Clone)]
pub struct Network {
    pub peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        Connection { target, addr: node.addr.clone(), peers: self.peers.clone() }
    }
}

pub struct Connection {
    target: NodeId,
    addr: String,
    peers: Arc<Peers>,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl Connection {
    async fn call<Req, Resp, E>(&self, rpc: Rpc, request: &Req, ttl: Duration) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let json = serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self.peers.client(&self.addr).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { json });
        request.set_timeout(ttl);
        let response = match rpc {
            Rpc::Append => client.raft_append(request).await,
            Rpc::Vote => client.raft_vote(request).await,
            Rpc::Snapshot => client.raft_snapshot(request).await,
        };
        let payload = match response {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Err(status) => return Err(RPCError::Network(NetworkError::new(&status))),
        };
        let answer: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&payload.json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(Rpc::Append, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Rpc::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }
}

fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, tonic::Status> {
    serde_json::from_slice(&payload.json).map_err(|e| tonic::Status::invalid_argument(format!("raft payload: {e}")))
}

fn encode<T: Serialize>(answer: &T) -> Result<RaftPayload, tonic::Status> {
    serde_json::to_vec(answer)
        .map(|json| RaftPayload { json })
        .map_err(|e| tonic::Status::internal(format!("encoding raft answer: {e}")))
}

/// Each Raft message names its sender in its vote (the leader appending, the candidate asking); `caller`
/// is the node the TLS certificate names, and the two must agree, so one node cannot vote or lead as
/// another.
fn check_sender(rpc: AuthzRpc, caller: ClusterRole, vote: &openraft::Vote<NodeId>) -> Result<(), tonic::Status> {
    match vote.leader_id().voted_for() {
        Some(sender) => authz::check_node_claim(rpc, caller, sender),
        None => Err(tonic::Status::invalid_argument(format!("{} names no sender", rpc.name()))),
    }
}

/// Applies a leader's `AppendEntries`; one this node accepts (any answer but a higher vote) renews its
/// lease.
pub async fn serve_append(
    raft: &Raft,
    lease: &Lease,
    payload: &RaftPayload,
    caller: ClusterRole,
) -> Result<RaftPayload, tonic::Status> {
    let request: AppendEntriesRequest<TypeConfig> = decode(payload)?;
    check_sender(AuthzRpc::RaftAppend, caller, &request.vote)?;
    let answer = raft.append_entries(request).await;
    if matches!(&answer, Ok(response) if !matches!(response, AppendEntriesResponse::HigherVote(_))) {
        lease.heard_from_leader();
    }
    encode(&answer)
}

pub async fn serve_vote(raft: &Raft, payload: &RaftPayload, caller: ClusterRole) -> Result<RaftPayload, tonic::Status> {
    let request: VoteRequest<NodeId> = decode(payload)?;
    check_sender(AuthzRpc::RaftVote, caller, &request.vote)?;
    encode(&raft.vote(request).await)
}

/// Installs a leader's snapshot (a chunk of it); an accepted one renews the lease.
pub async fn serve_snapshot(
    raft: &Raft,
    lease: &Lease,
    payload: &RaftPayload,
    caller: ClusterRole,
) -> Result<RaftPayload, tonic::Status> {
    let request: InstallSnapshotRequest<TypeConfig> = decode(payload)?;
    check_sender(AuthzRpc::RaftSnapshot, caller, &request.vote)?;
    let vote = request.vote;
    let answer = raft.install_snapshot(request).await;
    if matches!(&answer, Ok(response) if response.vote <= vote) {
        lease.heard_from_leader();
    }
    encode(&answer)
}
