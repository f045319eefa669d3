//! The device link's lifecycle: activation, keepalive, and two links with one certificate.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{TestCluster, read_goodbye};
use courier_node::client::{ClientError, DeviceLink};
use courier_node::edge::codec::FrameCodec;
use courier_proto::device::{DeviceFrame, GoodbyeReason, Hello, device_frame};
use futures_util::SinkExt;
use tokio_util::codec::Framed;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activations_never_repeat_an_id_and_certificates_work() {
    let cluster = TestCluster::start().await;
    let endpoint = cluster.endpoint();
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move { courier_node::client::activate(&endpoint, "anything").await })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut credentials = Vec::new();
    for task in tasks {
        let c = task.await.unwrap().expect("activation");
        assert!(ids.insert(c.device_id), "device id {} issued twice", c.device_id);
        credentials.push(c);
    }
    // The certificate names the id the node sees on the link.
    let link = DeviceLink::connect(&endpoint, &credentials[0], 0).await.unwrap();
    assert_eq!(link.device_id, credentials[0].device_id);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_secret_is_enforced() {
    let cluster = TestCluster::start_with(|config| {
        config.open_enrolment = false;
        config.enrolment_secret = Some("s3cret".into());
    })
    .await;
    let endpoint = cluster.endpoint();
    let error = courier_node::client::activate(&endpoint, "wrong").await.unwrap_err();
    assert!(matches!(error, ClientError::Goodbye { reason: GoodbyeReason::ActivationRefused, .. }), "{error}");
    assert!(courier_node::client::activate(&endpoint, "s3cret").await.is_ok());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_link_is_closed_after_two_and_a_half_keepalives() {
    let cluster = TestCluster::start_with(|config| config.keepalive_min_secs = 1).await;
    let credentials = cluster.activate().await;
    let tls = common::raw_link(&cluster.endpoint(), Some(&credentials)).await.unwrap();
    let mut link: common::RawLink = Framed::new(tls, FrameCodec::new(1 << 16));
    let hello = DeviceFrame {
        kind: Some(device_frame::Kind::Hello(Hello { keepalive_secs: 1, client: "t".into(), held_tokens: vec![] })),
    };
    let started = Instant::now();
    link.send(hello).await.unwrap();
    assert_eq!(read_goodbye(&mut link).await, Some(GoodbyeReason::IdleTimeout));
    assert!(started.elapsed() >= Duration::from_millis(2400), "closed too early: {:?}", started.elapsed());

    // A link that keeps pinging (the client does so every keepalive) stays up past that.
    let mut live = DeviceLink::connect(&cluster.endpoint(), &credentials, 1).await.unwrap();
    let token = live.register(common::TOPIC).await.unwrap();
    let idle = tokio::time::timeout(Duration::from_secs(4), live.next_event()).await;
    assert!(idle.is_err(), "the link must stay up with nothing to deliver: {idle:?}");
    assert_eq!(cluster.send(&cluster.push(&token, "{}")).await.status, 200);
    assert!(live.next_notification().await.is_ok());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_link_with_the_same_certificate_replaces_the_first() {
    let cluster = TestCluster::start().await;
    let credentials = cluster.activate().await;
    let tls = common::raw_link(&cluster.endpoint(), Some(&credentials)).await.unwrap();
    let mut older: common::RawLink = Framed::new(tls, FrameCodec::new(1 << 16));
    let hello = DeviceFrame {
        kind: Some(device_frame::Kind::Hello(Hello { keepalive_secs: 30, client: "t".into(), held_tokens: vec![] })),
    };
    older.send(hello).await.unwrap();
    let registry = cluster.node().registry.clone();
    common::eventually(Duration::from_secs(10), "the first link is attached", || {
        let registry = registry.clone();
        async move { registry.is_connected(credentials.device_id) }
    })
    .await;

    let mut newer = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    assert_eq!(read_goodbye(&mut older).await, Some(GoodbyeReason::Replaced));
    let token = newer.register(common::TOPIC).await.unwrap();
    assert_eq!(cluster.send(&cluster.push(&token, "{}")).await.status, 200);
    assert!(newer.next_notification().await.is_ok(), "the newer link receives");
    let metrics = cluster.metrics().await;
    assert!(metrics.contains("courier_node_link_replacements_total"), "{metrics}");
    cluster.shutdown().await;
}
