//! Faults under load: SIGKILLs and rolling restarts with a ledger of apns-ids, network partitions and paused
//! processes, the gateway's cluster watch, ack-before-commit with its owner killed, and every `courier-loadtest`
//! scenario at small scale. Each test runs whole clusters and reads process-wide metrics or times leases
//! on two cores, so they take turns.
//!
//! One test binary per area (each `tests/<area>/main.rs`), so that a clean `cargo test` links five test
//! binaries rather than one per file.

#[path = "../common/mod.rs"]
mod common;

mod ack_before_commit;
mod broadcast_failover;
mod cluster_watch;
mod failover;
mod loadtest;
mod partition;
mod receipts_failover;

/// One test at a time in this binary (see above); sync tests take it with `blocking_lock`.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
