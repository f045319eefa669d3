//! A Courier node: terminates device links, mints device tokens, stores notifications for offline
//! devices and serves the cluster gRPC API that gateways forward pushes through.
//!
//! Follow a notification: `api` (gRPC `Forward`) → `delivery` → `store` (durable queue) and
//! `edge::registry` → `edge::session` (the device's link) → ack → `store` deletes it.

pub mod api;
pub mod client;
pub mod config;
pub mod delivery;
pub mod edge;
pub mod ids;
pub mod node;
pub mod peer;
pub mod pki;
pub mod raft;
pub mod replication;
pub mod ring;
pub mod secret_file;
pub mod status_log;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod topic;
pub mod view;

pub use config::NodeConfig;
pub use node::{NodeError, RunningNode, start};
