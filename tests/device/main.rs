//! The device side: the link's lifecycle and the SDK, a device's first link to its owner, cloned identities,
//! and store and forward for devices that are offline.
//!
//! One test binary per area (each `tests/<area>/main.rs`), so that a clean `cargo test` links five test
//! binaries rather than one per file.

#[path = "../common/mod.rs"]
mod common;

mod clones;
mod device_link;
mod first_link;
mod offline;
