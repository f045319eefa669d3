//! The device link's lifecycle: activation, keepalive, and two links with one certificate; and the SDK's
//! `Device`, which stays linked (and hands each notification over once) across a SIGKILL of its node.

use crate::common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{ProcessCluster, TOPIC, TestCluster, push_for, read_goodbye};
use courier_device::codec::FrameCodec;
use courier_device::{Backoff, ClientError, Device, DeviceEvent, DeviceLink};
use courier_proto::device::{DeviceFrame, GoodbyeReason, Hello, device_frame};
use futures_util::SinkExt;
use tokio_util::codec::Framed;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_activations_each_get_a_certificate_that_names_their_id_and_links() {
    let cluster = TestCluster::start().await;
    let endpoint = cluster.endpoint();
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move { courier_device::activate(&endpoint, "anything").await })
        })
        .collect();
    let mut credentials = Vec::new();
    for task in tasks {
        credentials.push(task.await.unwrap().expect("activation"));
    }
    // Each answer's certificate names the id the answer gave (not another activation's), and each
    // certificate opens a link on which the node sees that id.
    let mut ids = HashSet::new();
    for c in &credentials {
        let cert = rustls::pki_types::CertificateDer::from(c.cert_der.clone());
        assert_eq!(courier_core::pki::device_id_from_cert(&cert), Some(c.device_id), "the certificate names its id");
        assert!(ids.insert(c.device_id), "device id {} issued twice", c.device_id);
    }
    for c in credentials.iter().step_by(6) {
        let link = DeviceLink::connect(&endpoint, c, 0).await.expect("the certificate links");
        assert_eq!(link.device_id, c.device_id);
        link.close().await.expect("close");
    }
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
    let error = courier_device::activate(&endpoint, "wrong").await.unwrap_err();
    assert!(matches!(error, ClientError::Goodbye { reason: GoodbyeReason::ActivationRefused, .. }), "{error}");
    assert!(courier_device::activate(&endpoint, "s3cret").await.is_ok());
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

/// The next event of `device` within 30 s.
async fn next(device: &mut Device) -> DeviceEvent {
    tokio::time::timeout(Duration::from_secs(30), device.next_event())
        .await
        .expect("an event in time")
        .expect("the cluster does not refuse the device")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_relinks_through_its_nodes_sigkill_and_sees_each_notification_once() {
    let ProcessCluster { dir: _dir, mut nodes, gateway, provider, signer, endpoints } =
        ProcessCluster::start(&[], 10_000).await;
    // A device owned by a node other than the one its endpoint names, so the endpoint outlives the owner.
    let endpoint = endpoints[0].clone();
    let owner_of = |c: &courier_device::DeviceCredentials| {
        gateway.view.borrow().as_ref().and_then(|v| v.owner(c.device_id)).map(|(id, _)| id)
    };
    let mut credentials = None;
    for _ in 0..40 {
        let c = courier_device::activate(&endpoint, "").await.expect("activation");
        if owner_of(&c).is_some_and(|id| id != nodes[0].id) {
            credentials = Some(c);
            break;
        }
    }
    let credentials = credentials.expect("some device of forty is owned by another node");
    let victim = nodes.iter().position(|n| Some(n.id) == owner_of(&credentials)).expect("the owner runs");

    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
    let mut device = Device::new(endpoint, credentials).expect("device").with_topic(TOPIC, None).with_backoff(backoff);
    let DeviceEvent::Linked { node, .. } = next(&mut device).await else { panic!("linked first") };
    assert_eq!(node.to_string(), nodes[victim].device_addr, "the first link goes to the owner from activation");
    let DeviceEvent::Token { topic, token } = next(&mut device).await else { panic!("then its token") };
    assert_eq!(topic, TOPIC);

    let push = |text: &str| {
        let mut push = push_for(&signer, &token, &format!(r#"{{"aps":{{"alert":"{text}"}}}}"#));
        push.apns_id = Some(uuid::Uuid::new_v4().to_string());
        push
    };
    let before = push("before");
    assert_eq!(provider.push(&before).await.expect("push").status, 200);
    let DeviceEvent::Notification(n) = next(&mut device).await else { panic!("the notification") };
    assert_eq!(Some(n.apns_id), before.apns_id);

    // The owner dies; the device loses its link, backs off, and links again through the endpoint to the
    // device's new owner. A push answered 200 meanwhile reaches the app once, and the token stays.
    nodes[victim].child.start_kill().expect("SIGKILL");
    let _ = nodes[victim].child.wait().await;
    let after = push("after");
    assert_eq!(provider.push(&after).await.expect("push").status, 200);
    // The first notification was not acked when the link died (acks go out at the app's next call), so the
    // new owner has it from its replica and sends it again: the device drops the repeat.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut lost, mut relinked, mut tokens) = (0, None, 0);
    loop {
        assert!(Instant::now() < deadline, "the second notification arrives on a new link in time");
        match next(&mut device).await {
            DeviceEvent::Lost { retry_in, .. } => {
                lost += 1;
                assert!(retry_in <= Duration::from_millis(400), "backoff stays under its ceiling: {retry_in:?}");
            }
            DeviceEvent::Linked { node, .. } => relinked = Some(node),
            DeviceEvent::Token { .. } => tokens += 1,
            DeviceEvent::Notification(n) => {
                assert_eq!(Some(n.apns_id), after.apns_id, "only the new notification reaches the app");
                break;
            }
            other @ (DeviceEvent::Subscribed { .. } | DeviceEvent::ChannelRefused { .. }) => {
                panic!("this device subscribes to no channel: {other:?}")
            }
            DeviceEvent::Missed(topics) => panic!("nothing was lost: {topics:?}"),
        }
    }
    assert!(lost >= 1, "the link loss was reported");
    let relinked = relinked.expect("linked again before the notification").to_string();
    assert_ne!(relinked, nodes[victim].device_addr, "relinked to a live node");
    assert_eq!(tokens, 0, "the token survives the relink unchanged");
    device.close().await.expect("close");
    gateway.shutdown().await;
}

/// `Device::with_channel` subscribes on every link: after its node restarts, the relinked device is
/// subscribed again without the app asking, and a channel the node refuses is reported once and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_subscribes_to_its_channels_again_on_every_link() {
    let mut cluster = common::TestCluster::start().await;
    let channels = common::channels::Channels::connect(&cluster).await;
    let sender = common::channels::broadcaster(&cluster).await;
    let channel = channels.create_ok(0, "LiveActivity").await;
    let unknown = courier_core::channel::ChannelId::random().to_string();
    let credentials = cluster.activate().await;
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
    let mut device = Device::new(cluster.endpoint(), credentials)
        .expect("device")
        .with_topic(TOPIC, None)
        .with_channel(&channel)
        .with_channel(&unknown)
        .with_backoff(backoff);

    // Linked, then the token, then each channel's answer.
    let mut events = Vec::new();
    while events.len() < 4 {
        events.push(next(&mut device).await);
    }
    assert!(matches!(events[0], DeviceEvent::Linked { .. }), "{events:?}");
    assert!(matches!(events[1], DeviceEvent::Token { .. }), "{events:?}");
    let answers: Vec<String> = events[2..]
        .iter()
        .map(|event| match event {
            DeviceEvent::Subscribed { channel_id, topic } => {
                assert_eq!(topic, TOPIC);
                format!("subscribed {channel_id}")
            }
            DeviceEvent::ChannelRefused { channel_id, reason } => format!("refused {channel_id} {reason:?}"),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(answers.contains(&format!("subscribed {channel}")), "{answers:?}");
    assert!(answers.contains(&format!("refused {unknown} UnknownChannel")), "{answers:?}");

    let first = sender.broadcast_ok(&channel, "liveactivity", r#"{"n":1}"#).await;
    let DeviceEvent::Notification(n) = next(&mut device).await else { panic!("the broadcast") };
    assert_eq!((n.apns_id.as_str(), n.channel_id.as_str()), (first.as_str(), channel.as_str()));

    // The node restarts: the device relinks and subscribes again by itself; the refused channel is not
    // asked for again.
    cluster.stop_node().await;
    cluster.start_node().await;
    loop {
        match next(&mut device).await {
            DeviceEvent::Subscribed { channel_id, .. } => {
                assert_eq!(channel_id, channel);
                break;
            }
            DeviceEvent::ChannelRefused { channel_id, .. } => panic!("{channel_id} was asked for again"),
            DeviceEvent::Notification(n) => panic!("nothing to redeliver: {n:?}"),
            DeviceEvent::Missed(topics) => panic!("nothing was lost: {topics:?}"),
            DeviceEvent::Lost { .. } | DeviceEvent::Linked { .. } | DeviceEvent::Token { .. } => {}
        }
    }
    let second = sender.broadcast_ok(&channel, "liveactivity", r#"{"n":2}"#).await;
    let DeviceEvent::Notification(n) = next(&mut device).await else { panic!("the broadcast on the new link") };
    assert_eq!(n.apns_id, second);
    device.close().await.expect("close");
    cluster.shutdown().await;
}
