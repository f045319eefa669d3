//! What one connection, one source address or one flood may cost a node or the gateway. These tests hold
//! thousands of connections and compare process-wide metrics (every in-process node and gateway shares one
//! recorder) before and after, so they take turns.
//!
//! One test binary per area (each `tests/<area>/main.rs`), so that a clean `cargo test` links five test
//! binaries rather than one per file.

#[path = "../common/mod.rs"]
mod common;

mod edge_limits;
mod provider_limits;

/// One test at a time in this binary (see above); sync tests take it with `blocking_lock`.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
