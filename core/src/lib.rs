//! What every Courier process shares: the node, the gateway, the loadtest and the tools build on this
//! crate and never on each other for it.
//!
//! Identity and naming: `ids` (device ids, times), `topic`, `token` (device tokens and the keyring that
//! mints them). Trust: `pki` (the cluster's certificate authority and the identities it issues),
//! `secret_file` (files that hold secrets), `tls` (rustls configurations from those identities), `peer`
//! (gRPC channels to other members). Placement: `state` (the control state the Raft group agrees on,
//! with its commands), `ring` (which node owns a device in an epoch). Running: `listen` (binding ports),
//! `protocol` (bounds both ends of the cluster protocol keep), `rate` (token buckets and client sources),
//! `telemetry` (metrics, health and readiness), `shutdown`. Receipts: `webhook` (teams' endpoints, their
//! signing secrets and events).

pub mod channel;
pub mod ids;
pub mod listen;
pub mod peer;
pub mod pki;
pub mod protocol;
pub mod rate;
pub mod ring;
pub mod secret_file;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod topic;
pub mod webhook;
