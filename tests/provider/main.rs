//! The provider API as providers and APNs client libraries see it: every status and reason, HTTP/2 frame by
//! frame, a real APNs client library, bad input on both sides, and a push's whole way to a device.
//!
//! One test binary per area (each `tests/<area>/main.rs`), so that a clean `cargo test` links five test
//! binaries rather than one per file.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod broadcasts;
mod channels;
mod end_to_end;
mod node_apn;
mod provider_http2;
mod provider_reasons;
mod receipts;
