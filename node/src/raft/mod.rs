//! The node's Raft replica of the cluster's control state (openraft 0.9).
//!
//! `state` (in `courier_core`, re-exported here) is the state machine's data and its `apply`; `store` persists the Raft log and the state
//! machine in the node's redb database; `network` carries Raft RPCs over the cluster gRPC service. The type
//! configuration is declared here, once.

pub mod channels;
pub mod control;
pub mod lease;
pub mod network;
pub mod report;
pub mod store;

use std::io::Cursor;

pub use courier_core::state;

pub use state::{ClusterState, Command, CommandResponse, Epoch, NodeId};

openraft::declare_raft_types!(
    /// Courier's Raft types: commands in, command responses out, nodes addressed by their cluster API.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
