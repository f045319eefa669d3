//! 200 means R copies: with fewer active nodes than the replication factor, a storable push is answered
//! 503 `ServiceUnavailable` (after the gateway's retries within its deadline) unless `--degraded-writes`
//! allows every active node to be enough. Three in-process nodes with R = 3, one of them stopped.

use crate::common;

use std::time::Duration;

use common::{Nodes, eventually, push_for};
use courier_core::state::RingParams;
use courier_device::DeviceLink;
use courier_node::raft::{Command, CommandResponse};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fewer_nodes_than_the_replication_factor_200_needs_degraded_writes() {
    for degraded in [false, true] {
        let mut nodes = Nodes::start(3, |config| config.degraded_writes = degraded).await;
        let leader = nodes.leader().await;
        let params = RingParams { vnodes: 128, replication_factor: 3 };
        let applied = nodes.node(leader).control.propose(Command::SetRing { params }).await.expect("R = 3");
        assert!(matches!(applied, CommandResponse::Applied { .. }), "{applied:?}");
        let (gateway, provider, signer) = nodes.gateway_with(|config| config.request_timeout_ms = 2000).await;

        let endpoint = nodes.endpoint(1);
        let (credentials, link, token) = common::registered_device(&endpoint).await;
        link.close().await.expect("close");

        let push = |n: usize| push_for(&signer, &token, &format!(r#"{{"aps":{{"alert":"{n}"}}}}"#));
        let answer = provider.push(&push(1)).await.expect("answered");
        assert_eq!(answer.status, 200, "three active nodes hold three copies: {answer:?}");

        let stopped = if leader == 3 { 2 } else { 3 };
        nodes.stop(stopped).await;
        eventually(Duration::from_secs(20), "two active members in the gateway's view", || {
            std::future::ready(gateway.view.borrow().as_ref().is_some_and(|v| v.ring.members().len() == 2))
        })
        .await;
        let answer = provider.push(&push(2)).await.expect("answered");
        if degraded {
            assert_eq!(answer.status, 200, "degraded writes: both active nodes are enough: {answer:?}");
        } else {
            assert_eq!(
                (answer.status, answer.reason.as_deref()),
                (503, Some("ServiceUnavailable")),
                "two copies where R = 3 are not a promise: {answer:?}"
            );
        }
        // Stored notifications still arrive (the first one in both cases).
        let mut link = DeviceLink::connect(&endpoint, &credentials, 0).await.expect("device reconnects");
        let first = tokio::time::timeout(Duration::from_secs(10), link.next_event()).await;
        assert!(
            matches!(first, Ok(Ok(courier_device::LinkEvent::Notification(_)))),
            "the stored push arrives: {first:?}"
        );
        let _ = link.close().await;
        gateway.shutdown().await;
        nodes.shutdown().await;
    }
}
