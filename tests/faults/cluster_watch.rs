//! The gateway's cluster watch when the node it follows stops answering: real `courier node` processes
//! paused with SIGSTOP, and a real gateway whose only seed is the paused node. The node's heartbeats let the
//! gateway tell a quiet cluster from a silent node; it fails over to another member, keeps learning new
//! epochs there (so a push already waiting on the paused node is taken to the device's new owner), and
//! reports not ready while no node it can reach is heard.

use crate::common;

use std::time::Duration;

use common::{ProcessCluster, TOPIC, eventually, http_get, metric_value, push_for, signal};
use courier_core::state::MemberState;
use courier_device::DeviceLink;

/// The gateway's `/readyz` answers 200.
async fn ready(metrics_addr: std::net::SocketAddr) -> bool {
    http_get(&format!("http://{metrics_addr}/readyz")).await.starts_with("HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_node_is_paused_follows_another_member_and_routes_by_its_epochs() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    // The gateway knows only node 1, so it watches node 1 first.
    let ProcessCluster { dir: _dir, nodes, gateway, provider, signer, endpoints } =
        ProcessCluster::start_with(&[], |config| {
            config.node_addrs.truncate(1);
            config.request_timeout_ms = 10_000;
        })
        .await;
    eventually(Duration::from_secs(10), "the gateway reports ready", || ready(gateway.metrics_addr)).await;

    // An offline device that node 1 owns.
    let mut found = None;
    for _ in 0..40 {
        let credentials = courier_device::activate(&endpoints[1], "").await.expect("activation");
        let owner = gateway.view.borrow().as_ref().and_then(|v| v.owner(credentials.device_id)).map(|(id, _)| id);
        if owner == Some(1) {
            found = Some(credentials);
            break;
        }
    }
    let credentials = found.expect("some device of forty is node 1's");
    let mut link = DeviceLink::connect(&endpoints[1], &credentials, 0).await.expect("device connects");
    let token = link.register(TOPIC).await.expect("register");
    link.close().await.expect("close");

    // Node 1 stops answering anything: its watch stream stays open and silent. A push sent now goes to
    // node 1 first (the gateway does not know yet) and must not wait there for its whole deadline.
    signal(&nodes[0], "-STOP");
    let apns_id = uuid::Uuid::new_v4().to_string();
    let mut push = push_for(&signer, &token, r#"{"aps":{"alert":"node 1 is paused"}}"#);
    push.apns_id = Some(apns_id.clone());
    let answer = tokio::spawn({
        let provider = provider.clone();
        async move { provider.push(&push).await.expect("request reaches the gateway") }
    });
    eventually(Duration::from_secs(30), "the gateway learns that node 1 is down", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(view.is_some_and(|v| v.members.get(&1).is_some_and(|m| m.state != MemberState::Active)))
    })
    .await;
    let text = http_get(&format!("http://{}/metrics", gateway.metrics_addr)).await;
    assert!(metric_value(&text, "courier_gateway_watch_failovers_total").is_some_and(|n| n >= 1.0), "{text}");
    eventually(Duration::from_secs(10), "ready again, following another member", || ready(gateway.metrics_addr)).await;

    // So the push leaves node 1 for the device's new owner, stored on the two active nodes.
    let answer = answer.await.expect("push task");
    assert_eq!(answer.status, 200, "retried on the owner of the epoch that moved the device: {answer:?}");

    // Every node silent: nothing to route by, so not ready; ready again once they answer.
    signal(&nodes[1], "-STOP");
    signal(&nodes[2], "-STOP");
    eventually(Duration::from_secs(20), "the gateway reports not ready", || async {
        !ready(gateway.metrics_addr).await
    })
    .await;
    for node in &nodes {
        signal(node, "-CONT");
    }
    eventually(Duration::from_secs(30), "the gateway reports ready again", || ready(gateway.metrics_addr)).await;

    // The notification answered 200 reaches the device once.
    let mut link = common::link_again(&endpoints[1], &credentials, 100).await;
    let notification = loop {
        let event = tokio::time::timeout(Duration::from_secs(15), link.next_event())
            .await
            .expect("a notification in time")
            .expect("the link stays healthy");
        if let courier_device::LinkEvent::Notification(n) = event {
            break n;
        }
    };
    assert_eq!(notification.apns_id, apns_id);
    link.ack(&apns_id).await.expect("ack");
    // Node 1 may take its devices back meanwhile and close this link with a redirect.
    let _ = link.close().await;
    gateway.shutdown().await;
}
