//! A push travels the whole way: provider → gateway (HTTP/2, JWT) → node (gRPC, mTLS) → device (mTLS link)
//! → ack → deleted from the store.

use crate::common;

use std::time::Duration;

use common::{TOPIC, TestCluster, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_reaches_a_connected_device_and_is_acked() {
    let cluster = TestCluster::start().await;
    let (mut device, token) = cluster.device().await;
    assert_eq!(token.len(), 88);

    let apns_id = "5b2d3f4e-6a7b-4c8d-9e0f-a1b2c3d4e5f6";
    let mut push = cluster.push(&token, r#"{"aps":{"alert":"hello"}}"#);
    push.apns_id = Some(apns_id.to_string());
    push.collapse_id = Some("greeting".into());
    push.priority = Some("5".into());
    let response = cluster.send(&push).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.apns_id.as_deref(), Some(apns_id));
    assert!(response.body.is_empty(), "a 200 has no body");

    let received = tokio::time::timeout(Duration::from_secs(10), device.next_notification())
        .await
        .expect("notification in time")
        .expect("link healthy");
    assert_eq!(received.apns_id, apns_id);
    assert_eq!(received.topic, TOPIC);
    assert_eq!(received.payload, br#"{"aps":{"alert":"hello"}}"#);
    assert_eq!(received.priority, 5);
    assert_eq!(received.collapse_id, "greeting");

    // The ack goes out on the app's next call (here an explicit flush): then the stored copy goes away.
    device.flush_acks().await.expect("ack");
    let device_id = device.device_id;
    let store = cluster.node().store.clone();
    eventually(Duration::from_secs(10), "the ack deletes the stored notification", || {
        let store = store.clone();
        async move { store.pending(device_id).await.map(|p| p.is_empty()).unwrap_or(false) }
    })
    .await;

    let metrics = cluster.metrics().await;
    assert!(common::metric_value(&metrics, "courier_node_notifications_delivered_total") >= Some(1.0), "{metrics}");
    assert!(common::metric_value(&metrics, "courier_node_device_links") >= Some(1.0), "{metrics}");
    assert!(metrics.contains("courier_node_delivery_latency_seconds_bucket"), "{metrics}");
    let gateway_metrics = common::http_get(&format!("http://{}/metrics", cluster.gateway.metrics_addr)).await;
    assert!(gateway_metrics.contains("courier_gateway_notifications_accepted_total"), "{gateway_metrics}");

    // A generated apns-id comes back when the provider sends none.
    let response = cluster.send(&cluster.push(&token, r#"{"aps":{}}"#)).await;
    assert_eq!(response.status, 200);
    let generated = response.apns_id.expect("generated apns-id");
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let received = device.next_notification().await.expect("second notification");
    assert_eq!(received.apns_id, generated);

    device.close().await.expect("clean close");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_devices_each_get_only_their_own_pushes() {
    let cluster = TestCluster::start().await;
    let mut devices = Vec::new();
    for _ in 0..5 {
        devices.push(cluster.device().await);
    }
    for (i, (_, token)) in devices.iter().enumerate() {
        for j in 0..3 {
            let response = cluster.send(&cluster.push(token, &format!(r#"{{"device":{i},"n":{j}}}"#))).await;
            assert_eq!(response.status, 200, "{response:?}");
        }
    }
    for (i, (link, _)) in devices.iter_mut().enumerate() {
        for j in 0..3 {
            let n = tokio::time::timeout(Duration::from_secs(10), link.next_notification()).await.unwrap().unwrap();
            assert_eq!(String::from_utf8(n.payload).unwrap(), format!(r#"{{"device":{i},"n":{j}}}"#));
        }
        assert!(link.sync().await.unwrap().is_empty(), "device {i} got extra notifications");
    }
    cluster.shutdown().await;
}
