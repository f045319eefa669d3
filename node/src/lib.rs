//! A Courier node: terminates device links, mints device tokens, stores notifications for offline
//! devices and serves the cluster gRPC API that gateways forward pushes through.

pub mod ids;
pub mod pki;
pub mod telemetry;
pub mod tls;
pub mod token;
