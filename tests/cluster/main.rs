//! The cluster: Raft and the control plane, `courier ctl`, roles in the PKI, sharding and hand-overs,
//! gateway-to-node forwarding, epoch fencing, real node processes, and what 200 means in copies.
//!
//! One test binary per area (each `tests/<area>/main.rs`), so that a clean `cargo test` links five test
//! binaries rather than one per file.

#[path = "../common/mod.rs"]
mod common;

mod broadcast;
mod cluster;
mod control_plane;
mod copies;
mod ctl;
mod fencing;
mod forwarding;
mod processes;
mod roles;
mod sharding;
