//! Ack before commit: a notification for a device linked to its owner is written to the link at once and
//! stored only if the device does not ack it within the node's ack window. Real nodes, a real gateway and
//! real device links: an ack inside the window means no store write anywhere and a 200 answered as
//! delivered; a device that does not ack gets a notification that is on R stores before the 200; and an
//! owner SIGKILLed while a notification waits for its ack loses nothing the gateway answered 200. And a
//! notification that must be stored is never answered 200 on fewer copies than the replication factor.

use crate::ONE_AT_A_TIME;
use crate::common;

use std::time::Duration;

use common::{Nodes, ProcessCluster, TOPIC, eventually, http_get, metric_value, push_for, signal};
use courier_device::{DeviceLink, LinkEvent};

async fn counter(metrics_url: &str, name: &str) -> f64 {
    metric_value(&http_get(metrics_url).await, name).unwrap_or(0.0)
}

/// The next notification on the link, within 10 s; other events are skipped.
async fn next_notification(link: &mut DeviceLink) -> courier_proto::device::Notification {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), link.next_event())
            .await
            .expect("a notification in time")
            .expect("the link stays healthy");
        if let LinkEvent::Notification(n) = event {
            return n;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_acks_at_once_costs_no_store_write_and_is_answered_delivered() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // A long window, so that even a slow test machine acks inside it.
    let nodes = Nodes::start(3, |config| config.ack_wait_ms = 1000).await;
    let (gateway, provider, signer) = nodes.gateway().await;
    let credentials = courier_device::activate(&nodes.endpoint(1), "").await.expect("activation");
    let mut link = DeviceLink::connect(&nodes.endpoint(1), &credentials, 0).await.expect("device connects");
    let token = link.register(TOPIC).await.expect("register");
    let metrics = format!("http://{}/metrics", nodes.node(1).metrics_addr);
    let stored_before = counter(&metrics, "courier_node_notifications_stored_total").await;
    let elided_before = counter(&metrics, "courier_node_store_writes_elided_total").await;
    let delivered = r#"courier_gateway_notifications_accepted_total{outcome="delivered"}"#;
    let delivered_before = counter(&metrics, delivered).await;

    let apns_id = uuid::Uuid::new_v4().to_string();
    let mut push = push_for(&signer, &token, r#"{"aps":{"alert":"now"}}"#);
    push.apns_id = Some(apns_id.clone());
    let answer = tokio::spawn({
        let provider = provider.clone();
        async move { provider.push(&push).await.expect("request reaches the gateway") }
    });
    let received = next_notification(&mut link).await;
    assert_eq!(received.apns_id, apns_id);
    link.ack(&apns_id).await.expect("ack");
    let answer = answer.await.expect("push task");
    assert_eq!(answer.status, 200, "{answer:?}");

    assert_eq!(counter(&metrics, delivered).await - delivered_before, 1.0, "the gateway heard `delivered`");
    assert_eq!(
        counter(&metrics, "courier_node_notifications_stored_total").await,
        stored_before,
        "no node stored the notification"
    );
    let replicas = nodes.node(1).control.current().ring.replication_factor as f64;
    assert_eq!(
        counter(&metrics, "courier_node_store_writes_elided_total").await - elided_before,
        2.0 * replicas,
        "an insert and a delete saved on each of the R copies"
    );
    for node in nodes.running() {
        assert!(node.store.pending(credentials.device_id).await.expect("store read").is_empty());
    }
    let auth = vec![("authorization".to_string(), format!("bearer {}", signer.sign()))];
    let status = provider
        .request(http::Method::GET, &format!("/v1/status/{token}/{apns_id}"), auth, Vec::new())
        .await
        .expect("status request");
    let body: serde_json::Value = serde_json::from_slice(&status.body).expect("JSON status");
    assert_eq!((status.status, body["state"].as_str()), (200, Some("delivered")), "{body}");

    link.close().await.expect("close");
    gateway.shutdown().await;
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_ack_in_time_gets_a_notification_durable_on_r_copies_before_200() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let nodes = Nodes::start(3, |config| config.ack_wait_ms = 50).await;
    let (gateway, provider, signer) = nodes.gateway().await;
    let credentials = courier_device::activate(&nodes.endpoint(2), "").await.expect("activation");
    let mut link = DeviceLink::connect(&nodes.endpoint(2), &credentials, 0).await.expect("device connects");
    let token = link.register(TOPIC).await.expect("register");
    let metrics = format!("http://{}/metrics", nodes.node(1).metrics_addr);
    let stored = r#"courier_gateway_notifications_accepted_total{outcome="stored"}"#;
    let stored_before = counter(&metrics, stored).await;

    let apns_id = uuid::Uuid::new_v4().to_string();
    let mut push = push_for(&signer, &token, r#"{"aps":{"alert":"unacked"}}"#);
    push.apns_id = Some(apns_id.clone());
    let answer = provider.push(&push).await.expect("request reaches the gateway");
    assert_eq!(answer.status, 200, "{answer:?}");
    // Checked the moment the 200 is in, before anything else can happen: every holder has it stored.
    let device = credentials.device_id;
    let view = nodes.node(1).view.get();
    let holders = view.ring.candidates(device, view.state.ring.replication_factor as usize);
    assert_eq!(holders.len(), 2, "three nodes hold two copies");
    for holder in &holders {
        let queued: Vec<String> =
            nodes.node(*holder).store.pending(device).await.expect("read").into_iter().map(|n| n.apns_id).collect();
        assert_eq!(queued, std::slice::from_ref(&apns_id), "node {holder} holds the copy before the 200");
    }
    assert_eq!(counter(&metrics, stored).await - stored_before, 1.0, "the gateway heard `stored`");
    // The device had it on its link all along; its late ack empties every queue.
    let received = next_notification(&mut link).await;
    assert_eq!(received.apns_id, apns_id);
    link.ack(&apns_id).await.expect("ack");
    let nodes_ref = &nodes;
    eventually(Duration::from_secs(10), "the late ack deletes every copy", || async move {
        let mut empty = true;
        for node in nodes_ref.running() {
            empty &= node.store.pending(device).await.expect("read").is_empty();
        }
        empty
    })
    .await;

    link.close().await.expect("close");
    gateway.shutdown().await;
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_between_hand_off_and_ack_loses_nothing_answered_200() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // A window of 3 s: the kill lands inside it, before the owner could commit anything.
    let ProcessCluster { dir: _dir, mut nodes, gateway, provider, signer, endpoints } =
        ProcessCluster::start(&["--ack-wait-ms", "3000"], 20_000).await;
    let endpoint = |i: usize| endpoints[i].clone();

    let (credentials, mut link, token) = common::registered_device(&endpoint(0)).await;
    let owner = endpoints.iter().position(|e| e.addr == link.node_addr).expect("linked to a node");

    let apns_id = uuid::Uuid::new_v4().to_string();
    let mut push = push_for(&signer, &token, r#"{"aps":{"alert":"in flight"}}"#);
    push.apns_id = Some(apns_id.clone());
    let answer = tokio::spawn({
        let provider = provider.clone();
        async move { provider.push(&push).await.expect("request reaches the gateway") }
    });
    // On the link, not acked, not stored: the owner dies now.
    assert_eq!(next_notification(&mut link).await.apns_id, apns_id);
    nodes[owner].child.start_kill().expect("SIGKILL");
    let _ = nodes[owner].child.wait().await;
    let answer = answer.await.expect("push task");
    assert_eq!(answer.status, 200, "the gateway hands it to the next owner within its deadline: {answer:?}");

    // The device finds its new owner through a survivor and gets the notification from there.
    let survivor = (0..3).find(|i| *i != owner).expect("a survivor");
    let mut again = None;
    for _ in 0..100 {
        match DeviceLink::connect(&endpoint(survivor), &credentials, 0).await {
            Ok(link) if link.node_addr != endpoints[owner].addr => {
                again = Some(link);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut link = again.expect("the device reaches its new owner");
    assert_eq!(next_notification(&mut link).await.apns_id, apns_id, "answered 200, so it survives the owner");
    link.ack(&apns_id).await.expect("ack");
    link.close().await.expect("close");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_never_answered_200_on_fewer_copies_than_promised() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let ProcessCluster { dir: _dir, nodes, gateway, provider, signer, endpoints } =
        ProcessCluster::start(&[], 5_000).await;
    let endpoint = endpoints[0].clone();
    // An offline device: its pushes must be stored on two nodes before they are promised.
    let (credentials, link, token) = common::registered_device(&endpoint).await;
    link.close().await.expect("close");
    let owner = gateway.view.borrow().as_ref().and_then(|v| v.owner(credentials.device_id)).expect("an owner").0;
    let owner = &nodes[owner as usize - 1];
    let others: Vec<&common::NodeProcess> = nodes.iter().filter(|n| n.id != owner.id).collect();

    // Neither node that could hold the second copy answers: the owner alone has it, which is not enough.
    for other in &others {
        signal(other, "-STOP");
    }
    let apns_id = uuid::Uuid::new_v4().to_string();
    let mut push = push_for(&signer, &token, r#"{"aps":{"alert":"two copies"}}"#);
    push.apns_id = Some(apns_id.clone());
    let answer = provider.push(&push).await.expect("request reaches the gateway");
    assert_eq!(
        (answer.status, answer.reason.as_deref()),
        (503, Some("ServiceUnavailable")),
        "one copy is not promised: {answer:?}"
    );
    let owner_metrics = format!("http://{}/metrics", owner.metrics_addr);
    eventually(Duration::from_secs(20), "the owner refused the push for too few copies", || {
        let url = owner_metrics.clone();
        async move {
            let text = http_get(&url).await;
            metric_value(&text, r#"courier_node_notifications_rejected_total{reason="TOO_FEW_COPIES"}"#)
                .is_some_and(|n| n >= 1.0)
        }
    })
    .await;

    // Back again: the provider's retry of the same apns-id is promised, and the device gets it once.
    for other in &others {
        signal(other, "-CONT");
    }
    let mut answered = None;
    for _ in 0..10 {
        push.authorization = Some(format!("bearer {}", signer.sign()));
        let answer = provider.push(&push).await.expect("request reaches the gateway");
        if answer.status == 200 {
            answered = Some(answer);
            break;
        }
    }
    assert!(answered.is_some(), "the retry is answered 200 once both holders answer");
    let mut link = DeviceLink::connect(&endpoint, &credentials, 0).await.expect("device connects");
    assert_eq!(next_notification(&mut link).await.apns_id, apns_id);
    link.ack(&apns_id).await.expect("ack");
    link.close().await.expect("close");
    gateway.shutdown().await;
}
