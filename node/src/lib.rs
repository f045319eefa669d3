//! A Courier node: terminates device links, mints device tokens, stores notifications for offline
//! devices and serves the cluster gRPC API that gateways forward pushes through.
//!
//! Follow a notification: `api` (gRPC `Forward`) → `delivery` → `store` (durable queue) and
//! `edge::registry` → `edge::session` (the device's link) → ack → `store` deletes it.

pub mod api;
pub mod broadcast;
pub mod config;
pub mod delivery;
pub mod delivery_status;
pub mod edge;
pub mod follow;
pub mod node;
pub mod raft;
pub mod receipts;
pub mod replication;
pub mod store;
pub mod view;

// What the node shares with every process, under the names it had here.
pub use courier_core::{ids, peer, pki, ring, secret_file, telemetry, tls, token, topic};

pub use config::NodeConfig;
pub use node::{NodeError, RunningNode, start};
