//! Generated types for Courier's two wire contracts.
//!
//! `device` is what travels on a device's mutual-TLS link (length-prefixed frames; the codec that frames
//! them lives in the node's edge module). `cluster` is the gRPC API between gateways, nodes and the admin
//! CLI. Nothing here holds logic: it is the shared vocabulary.

pub mod device {
    tonic::include_proto!("courier.device.v1");
}

pub mod cluster {
    tonic::include_proto!("courier.cluster.v1");
}
