//! What can go wrong on the device's side, typed so that an app can tell a failure another node or a
//! later attempt may cure from a refusal of this device that no retry will change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use courier_core::pki::PkiError;
use courier_core::tls::TlsError;
use courier_proto::device::GoodbyeReason;

use crate::codec::FrameError;
use crate::redirect::RedirectTarget;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("link: {0}")]
    Frame(#[from] FrameError),
    #[error("the node said goodbye: {reason:?} ({detail})")]
    Goodbye { reason: GoodbyeReason, detail: String },
    #[error("the node closed the link")]
    Closed,
    #[error("redirected to {0}")]
    Redirected(RedirectTarget),
    #[error("node address {0:?} does not resolve")]
    Unresolvable(String),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("device credentials in {path}: {detail}")]
    Credentials { path: PathBuf, detail: String },
    #[error("the node refused the subscription to channel {channel_id}: {reason:?}")]
    ChannelRefused { channel_id: String, reason: courier_proto::device::ChannelRefusal },
}

impl ClientError {
    /// The node was not reached, went away before answering `Hello`, or turns every device away for now
    /// (shutting down, at its link limit), as opposed to refusing this device: another node may still
    /// take the link.
    pub fn another_node_may_answer(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::Timeout(_)
                | ClientError::Closed
                | ClientError::Unresolvable(_)
                | ClientError::Goodbye { reason: GoodbyeReason::Shutdown | GoodbyeReason::Unavailable, .. }
        )
    }
}

impl ClientError {
    /// The cluster refuses this device itself (revoked, a suspected clone, a certificate that names no
    /// device): reconnecting cannot help until an operator acts.
    pub fn refuses_this_device(&self) -> bool {
        matches!(
            self,
            ClientError::Goodbye {
                reason: GoodbyeReason::Revoked | GoodbyeReason::ClonedIdentity | GoodbyeReason::BadCertificate,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_node_wide_failures_send_a_device_to_another_node() {
        let bye = |reason| ClientError::Goodbye { reason, detail: String::new() };
        assert!(bye(GoodbyeReason::Shutdown).another_node_may_answer());
        assert!(bye(GoodbyeReason::Unavailable).another_node_may_answer());
        assert!(ClientError::Closed.another_node_may_answer());
        assert!(ClientError::Unresolvable("nowhere:1".into()).another_node_may_answer());
        for refused in [GoodbyeReason::Revoked, GoodbyeReason::ClonedIdentity, GoodbyeReason::BadCertificate] {
            assert!(!bye(refused).another_node_may_answer(), "{refused:?} refuses the device on every node");
        }
    }

    #[test]
    fn refusals_of_the_device_are_told_apart_from_failures_of_the_link() {
        let bye = |reason| ClientError::Goodbye { reason, detail: String::new() };
        for refused in [GoodbyeReason::Revoked, GoodbyeReason::ClonedIdentity, GoodbyeReason::BadCertificate] {
            assert!(bye(refused).refuses_this_device(), "{refused:?}");
        }
        for passing in [GoodbyeReason::Shutdown, GoodbyeReason::SlowConsumer, GoodbyeReason::IdleTimeout] {
            assert!(!bye(passing).refuses_this_device(), "{passing:?}");
        }
        assert!(!ClientError::Closed.refuses_this_device());
    }
}
