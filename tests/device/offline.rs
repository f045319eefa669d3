//! Store and forward: notifications for a disconnected device survive a node restart and arrive once on
//! reconnect; expired ones and collapsed-over ones do not.

use crate::common;

use std::time::Duration;

use common::{TOPIC, TestCluster, eventually};
use courier_device::DeviceLink;

fn now_secs() -> u64 {
    courier_core::ids::unix_millis() / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_notifications_survive_a_node_restart_and_arrive_once() {
    let mut cluster = TestCluster::start().await;
    let credentials = cluster.activate().await;
    let mut link = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    let token = link.register(TOPIC).await.unwrap();
    link.close().await.unwrap();
    let store = cluster.node().store.clone();
    let registry = cluster.node().registry.clone();
    common::eventually(Duration::from_secs(10), "the node sees the link close", || {
        let registry = registry.clone();
        async move { !registry.is_connected(credentials.device_id) }
    })
    .await;

    let later = (now_secs() + 3600).to_string();
    let expires_at = now_secs() + 2;
    let send = |apns_id: &str, expiration: String, collapse: Option<&str>, body: &str| {
        let mut push = cluster.push(&token, body);
        push.apns_id = Some(apns_id.into());
        push.expiration = Some(expiration);
        push.collapse_id = collapse.map(str::to_string);
        push
    };
    let kept = "00000000-0000-4000-8000-000000000001";
    let expired_soon = "00000000-0000-4000-8000-000000000002";
    let never_stored = "00000000-0000-4000-8000-000000000003";
    let collapsed_old = "00000000-0000-4000-8000-000000000004";
    let collapsed_new = "00000000-0000-4000-8000-000000000005";
    let already_expired = "00000000-0000-4000-8000-000000000006";
    for push in [
        send(kept, later.clone(), None, r#"{"n":"kept"}"#),
        send(expired_soon, expires_at.to_string(), None, r#"{"n":"expires"}"#),
        send(never_stored, "0".into(), None, r#"{"n":"now-or-never"}"#),
        send(collapsed_old, later.clone(), Some("score"), r#"{"score":"1-0"}"#),
        send(collapsed_new, later.clone(), Some("score"), r#"{"score":"2-0"}"#),
        send(already_expired, (now_secs() - 60).to_string(), None, r#"{"n":"stale"}"#),
    ] {
        let response = cluster.send(&push).await;
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.apns_id, push.apns_id);
    }
    let queued: Vec<_> = store.pending(credentials.device_id).await.unwrap().into_iter().map(|n| n.apns_id).collect();
    assert_eq!(queued, [kept, expired_soon, collapsed_new]);
    drop((store, registry));

    cluster.stop_node().await;
    // The short-lived one's expiration passes while the node is down (expirations are whole UNIX seconds).
    eventually(Duration::from_secs(10), "the short-lived notification's expiration passes", || {
        std::future::ready(now_secs() > expires_at)
    })
    .await;
    cluster.start_node().await;

    let mut link = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    let arrived = link.sync().await.unwrap();
    let ids: Vec<_> = arrived.iter().map(|n| n.apns_id.as_str()).collect();
    assert_eq!(ids, [kept, collapsed_new], "exactly the live, newest notifications, once each, in order");
    assert_eq!(arrived[1].payload, br#"{"score":"2-0"}"#);
    for n in &arrived {
        link.ack(&n.apns_id).await.unwrap();
    }
    assert!(link.sync().await.unwrap().is_empty());
    link.close().await.unwrap();

    // Acked means gone: a further reconnect, even across another restart, brings nothing back.
    cluster.stop_node().await;
    cluster.start_node().await;
    let mut link = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    assert!(link.sync().await.unwrap().is_empty(), "acked notifications must not return");
    link.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_notifications_are_redelivered_but_surface_once() {
    let cluster = TestCluster::start().await;
    let credentials = cluster.activate().await;
    let mut link = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    let token = link.register(TOPIC).await.unwrap();
    let response = cluster.send(&cluster.push(&token, r#"{"n":1}"#)).await;
    assert_eq!(response.status, 200);
    // Received on the wire but never acked: the node keeps it.
    let first = link.sync().await.unwrap();
    assert_eq!(first.len(), 1);
    drop(link);

    let mut link = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    let again = link.next_notification().await.unwrap();
    assert_eq!(again.apns_id, first[0].apns_id, "unacked notification is redelivered");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_told_once_what_it_lost_while_away_per_topic() {
    let cluster = TestCluster::start_with(|config| config.queue_cap_per_topic = 2).await;
    let credentials = cluster.activate().await;
    let mut link = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    let token = link.register(TOPIC).await.unwrap();
    let other_topic = "com.example.other";
    let other = link.register(other_topic).await.unwrap();
    link.close().await.unwrap();
    let registry = cluster.node().registry.clone();
    eventually(Duration::from_secs(10), "the node sees the link close", || {
        std::future::ready(!registry.is_connected(credentials.device_id))
    })
    .await;

    // Three for a queue that keeps two: the oldest is pushed out. One for the other topic expires.
    let later = (now_secs() + 3600).to_string();
    for body in [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#] {
        let mut push = cluster.push(&token, body);
        push.expiration = Some(later.clone());
        assert_eq!(cluster.send(&push).await.status, 200);
    }
    // At least a second ahead: one whose expiration has passed when it arrives is discarded, not stored
    // (now + 1 can be the next second a few milliseconds later, which a loaded machine overshoots).
    let expires_at = now_secs() + 2;
    let mut push = cluster.push(&other, r#"{"n":"soon"}"#);
    push.topic = Some(other_topic.into());
    push.expiration = Some(expires_at.to_string());
    assert_eq!(cluster.send(&push).await.status, 200);
    eventually(Duration::from_secs(10), "the expiration passes", || std::future::ready(now_secs() > expires_at)).await;

    let mut link = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    let mut payloads = Vec::new();
    let missed = loop {
        match tokio::time::timeout(Duration::from_secs(10), link.next_event()).await.expect("in time").unwrap() {
            courier_device::LinkEvent::Notification(n) => {
                link.ack(&n.apns_id).await.unwrap();
                payloads.push(String::from_utf8(n.payload).unwrap());
            }
            courier_device::LinkEvent::Missed(topics) => break topics,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(payloads, [r#"{"n":2}"#, r#"{"n":3}"#], "the backlog comes first");
    let counts: Vec<(&str, u32, u32)> = missed.iter().map(|t| (t.topic.as_str(), t.dropped, t.expired)).collect();
    assert_eq!(counts, [(TOPIC, 1, 0), (other_topic, 0, 1)], "by topic");
    link.close().await.unwrap();

    // Told once: the counts are gone, and the next link brings no report.
    let store = cluster.node().store.clone();
    eventually(Duration::from_secs(10), "the counts are taken off", || {
        let store = store.clone();
        async move { store.missed(credentials.device_id).await.unwrap().is_empty() }
    })
    .await;
    let mut link = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    assert!(link.sync().await.unwrap().is_empty());
    let next = tokio::time::timeout(Duration::from_millis(300), link.next_event()).await;
    assert!(!matches!(next, Ok(Ok(courier_device::LinkEvent::Missed(_)))), "{next:?}");
    link.close().await.unwrap();
    cluster.shutdown().await;
}
