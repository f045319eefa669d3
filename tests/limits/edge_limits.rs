//! What one connection, one source address and one device link may cost a node, tried against a real
//! node over real TLS: thousands of silent TCP connections held by other processes from other addresses
//! do not lock real devices out; a device that stops reading is closed as a slow consumer; floods of
//! frames that cause writes end the link with their reason and store no more than the caps allow.
//!
//! Metrics are per process, so these tests take turns with the rest of the binary and compare before
//! and after.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{RawLink, TOPIC, TestCluster, eventually, metric_value, read_goodbye};
use courier_device::codec::FrameCodec;
use courier_device::{DeviceCredentials, DeviceEndpoint, DeviceLink};
use courier_gateway::provider::Push;
use courier_proto::device::{
    Ack, DeviceFrame, GoodbyeReason, Hello, RegisterTopic, ServerFrame, UnregisterTopic, device_frame, server_frame,
};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

/// Holds `count` TCP connections from `source` to `addr`, sending nothing, until its stdin closes; prints
/// `held <n>` once they are all open.
const HOLD_SILENT_CONNECTIONS: &str = r#"
import resource, socket, sys
source, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = count + 64
if soft < want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
held = []
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect((host, port))
    held.append(s)
print("held", len(held), flush=True)
sys.stdin.read()
"#;

fn frame(kind: device_frame::Kind) -> DeviceFrame {
    DeviceFrame { kind: Some(kind) }
}

fn hello() -> DeviceFrame {
    frame(device_frame::Kind::Hello(Hello { keepalive_secs: 300, client: "edge-limits".into(), held_tokens: vec![] }))
}

/// A raw mutual-TLS device link; `receive_buffer` shrinks the socket's receive buffer first, so that a
/// peer that stops reading stalls the node's writes after a few frames.
async fn tls_link(endpoint: &DeviceEndpoint, credentials: &DeviceCredentials, receive_buffer: Option<u32>) -> RawLink {
    let identity = (
        vec![CertificateDer::from(credentials.cert_der.clone())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(credentials.key_der.clone())),
    );
    let config = courier_core::tls::client_config(&endpoint.ca_path, Some(identity), &[]).expect("client config");
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes).expect("receive buffer");
    }
    let tcp = socket.connect(endpoint.addr).await.expect("connect");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake");
    Framed::new(tls, FrameCodec::new(1 << 16))
}

/// Reads frames until `want` picks one, failing on a goodbye or the end of the link.
async fn expect_frame<T>(link: &mut RawLink, mut want: impl FnMut(server_frame::Kind) -> Option<T>) -> T {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(15), link.next()).await.expect("a frame in time");
        match next {
            Some(Ok(ServerFrame { kind: Some(server_frame::Kind::Goodbye(bye)) })) => panic!("goodbye: {bye:?}"),
            Some(Ok(ServerFrame { kind: Some(kind) })) => {
                if let Some(found) = want(kind) {
                    return found;
                }
            }
            Some(Ok(ServerFrame { kind: None })) => {}
            Some(Err(error)) => panic!("link failed: {error}"),
            None => panic!("link closed"),
        }
    }
}

/// Says hello and waits for the welcome.
async fn welcomed(link: &mut RawLink) {
    link.send(hello()).await.expect("hello");
    expect_frame(link, |kind| matches!(kind, server_frame::Kind::Welcome(_)).then_some(())).await;
}

/// A labelled sample (`name{label="value"}`) in Prometheus text, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_other_processes_do_not_lock_out_devices() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    // A long deadline, so the silent connections are still held when the device is done.
    let cluster = TestCluster::start_with(|config| config.handshake_timeout_secs = 120).await;
    let addr = cluster.node_config.device_addr;
    let refused = r#"courier_node_links_refused_total{reason="pending_per_source"}"#;
    let refused_before = sample(&cluster.metrics().await, refused);
    const PER_SOURCE: usize = 1000;
    let mut holders = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let child = tokio::process::Command::new("python3")
            .args(["-c", HOLD_SILENT_CONNECTIONS, source, &addr.ip().to_string(), &addr.port().to_string()])
            .arg(PER_SOURCE.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        holders.push(child);
    }
    for child in &mut holders {
        let stdout = child.stdout.take().expect("stdout");
        let line = tokio::time::timeout(Duration::from_secs(60), BufReader::new(stdout).lines().next_line())
            .await
            .expect("the holder opens its connections in time")
            .expect("read the holder's stdout");
        assert_eq!(line.as_deref(), Some(format!("held {PER_SOURCE}").as_str()));
    }
    let silent = (3 * PER_SOURCE) as f64;
    eventually(Duration::from_secs(60), "the node accepted every silent connection", || async {
        sample(&cluster.metrics().await, "courier_node_pending_links") >= silent
    })
    .await;

    // A new device activates, connects, registers and receives, while all of them are held.
    let (mut device, token) = cluster.device().await;
    assert_eq!(cluster.send(&cluster.push(&token, r#"{"aps":{"alert":"through"}}"#)).await.status, 200);
    let n = tokio::time::timeout(Duration::from_secs(15), device.next_notification()).await.expect("in time").unwrap();
    assert_eq!(n.payload, br#"{"aps":{"alert":"through"}}"#);
    let metrics = cluster.metrics().await;
    assert!(sample(&metrics, "courier_node_pending_links") >= silent, "the silent connections were still held");
    assert_eq!(sample(&metrics, refused), refused_before, "the defaults admit 1,000 connections from one address");
    drop(holders);
    // A node shutting down does not wait out the silent connections' deadline.
    tokio::time::timeout(Duration::from_secs(60), cluster.shutdown()).await.expect("shutdown ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_connections_are_capped_per_address_and_end_at_the_deadline() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    let cluster = TestCluster::start_with(|config| {
        config.max_pending_per_address = 4;
        config.handshake_timeout_secs = 3;
    })
    .await;
    let addr: SocketAddr = cluster.node_config.device_addr;
    let refused_before =
        sample(&cluster.metrics().await, r#"courier_node_links_refused_total{reason="pending_per_source"}"#);
    let mut held = Vec::new();
    for _ in 0..12 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.9:0".parse().unwrap()).unwrap();
        held.push(socket.connect(addr).await.expect("the kernel accepts the connection"));
    }
    eventually(Duration::from_secs(20), "connections over the per-address cap are refused", || async {
        sample(&cluster.metrics().await, r#"courier_node_links_refused_total{reason="pending_per_source"}"#)
            >= refused_before + 8.0
    })
    .await;
    // Every one of them ends: the refused at once, the admitted at the deadline (nothing was sent).
    for (i, tcp) in held.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "connection {i} was not closed by the node: {read:?}");
    }
    // Another address, and a real device from it, are unaffected.
    let (mut device, token) = cluster.device().await;
    assert_eq!(cluster.send(&cluster.push(&token, "{}")).await.status, 200);
    assert!(device.next_notification().await.is_ok());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_is_closed_as_slow() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    // The gateway's per-device rate limit is lifted: the test pushes to one device as fast as it can.
    let cluster = TestCluster::start_configured(
        |config| config.link_write_timeout_ms = 500,
        |gateway| {
            gateway.device_rate_per_sec = 0.0;
        },
    )
    .await;
    let slow_before = sample(&cluster.metrics().await, r#"courier_node_link_goodbyes_total{reason="SLOW_CONSUMER"}"#);
    let credentials = cluster.activate().await;
    let mut link = tls_link(&cluster.endpoint(), &credentials, Some(4096)).await;
    welcomed(&mut link).await;
    link.send(frame(device_frame::Kind::RegisterTopic(RegisterTopic { topic: TOPIC.into() }))).await.unwrap();
    let token = expect_frame(&mut link, |kind| match kind {
        server_frame::Kind::TokenIssued(issued) => Some(issued.token),
        _ => None,
    })
    .await;
    // From here on the device reads nothing while the node keeps pushing to it.
    let registry = cluster.node().registry.clone();
    let payload = format!(r#"{{"fill":"{}"}}"#, "x".repeat(3900));
    // One stored notification, then now-or-never ones (no store write, so the test is quick) until the
    // node gives up on the link.
    let kept = uuid::Uuid::new_v4().to_string();
    let push = Push { apns_id: Some(kept.clone()), ..cluster.push(&token, "{}") };
    assert_eq!(cluster.send(&push).await.status, 200);
    let mut pushed = 0;
    while registry.is_connected(credentials.device_id) {
        assert!(pushed < 10_000, "the node kept a link that reads nothing");
        let pushes: Vec<Push> =
            (0..32).map(|_| Push { expiration: Some("0".into()), ..cluster.push(&token, &payload) }).collect();
        let batch = pushes.iter().map(|push| cluster.send(push));
        for response in futures_util::future::join_all(batch).await {
            // The gateway's per-device rate limit answers some of a burst with 429; those never reach it.
            assert!(matches!(response.status, 200 | 429), "{response:?}");
            pushed += usize::from(response.status == 200);
        }
    }
    eventually(Duration::from_secs(10), "the slow consumer is counted", || async {
        sample(&cluster.metrics().await, r#"courier_node_link_goodbyes_total{reason="SLOW_CONSUMER"}"#) > slow_before
    })
    .await;
    // What was stored is not lost: a device that reads gets it on its next link.
    let mut reader = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    assert_eq!(reader.next_notification().await.unwrap().apns_id, kept);
    // The stalled socket is still open on the device's side; shutdown does not wait on it.
    tokio::time::timeout(Duration::from_secs(60), cluster.shutdown()).await.expect("shutdown ends");
    drop(link);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_floods_end_the_link_and_store_at_most_the_cap() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    const CAP: usize = 8;
    let mut cluster = TestCluster::start_with(|config| {
        config.max_topics_per_device = CAP;
        config.link_write_burst = 32;
    })
    .await;
    let credentials = cluster.activate().await;
    let unregister = |topic: String| frame(device_frame::Kind::UnregisterTopic(UnregisterTopic { topic }));

    // Many distinct topics at once: the link ends at the cap.
    let mut link = tls_link(&cluster.endpoint(), &credentials, None).await;
    welcomed(&mut link).await;
    for i in 0..100 {
        if link.send(unregister(format!("com.example.flood{i}"))).await.is_err() {
            break;
        }
    }
    let mut unregistered = 0;
    let reason = loop {
        match tokio::time::timeout(Duration::from_secs(15), link.next()).await.expect("a frame in time") {
            Some(Ok(ServerFrame { kind: Some(server_frame::Kind::TopicUnregistered(_)) })) => unregistered += 1,
            Some(Ok(ServerFrame { kind: Some(server_frame::Kind::Goodbye(bye)) })) => break bye.reason,
            Some(Ok(_)) => {}
            other => panic!("the link ended without a goodbye: {other:?}"),
        }
    };
    assert_eq!(reason, GoodbyeReason::TooManyTopics as i32);
    assert_eq!(unregistered, CAP);

    // A new link cannot add more: the stored unregistrations are capped per device.
    let mut link = tls_link(&cluster.endpoint(), &credentials, None).await;
    welcomed(&mut link).await;
    link.send(unregister("com.example.another".into())).await.unwrap();
    assert_eq!(read_goodbye(&mut link).await, Some(GoodbyeReason::TooManyTopics));

    // Register and unregister of one topic, over and over: the link ends at its write rate.
    let mut link = tls_link(&cluster.endpoint(), &credentials, None).await;
    welcomed(&mut link).await;
    for _ in 0..100 {
        let register = frame(device_frame::Kind::RegisterTopic(RegisterTopic { topic: "com.example.flood0".into() }));
        if link.send(register).await.is_err() || link.send(unregister("com.example.flood0".into())).await.is_err() {
            break;
        }
    }
    assert_eq!(read_goodbye(&mut link).await, Some(GoodbyeReason::RateLimited));

    // Nothing beyond the cap reached the database.
    let data_dir = cluster.node_config.data_dir.clone();
    cluster.stop_node().await;
    let registrations =
        courier_node::store::registrations::Registrations::open(&data_dir.join("registrations.redb")).unwrap();
    assert!(registrations.unregistered_count(credentials.device_id).unwrap() <= CAP);
    assert_eq!(registrations.unregistered_at(credentials.device_id, "com.example.another").unwrap(), None);
    drop(registrations);
    cluster.start_node().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_for_notifications_never_carried_write_nothing() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    let cluster = TestCluster::start().await;
    let credentials = cluster.activate().await;
    let mut sdk = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    let token = sdk.register(TOPIC).await.unwrap();
    sdk.close().await.unwrap();
    let registry = cluster.node().registry.clone();
    eventually(Duration::from_secs(10), "the device is offline", || {
        let registry = registry.clone();
        async move { !registry.is_connected(credentials.device_id) }
    })
    .await;

    // A now-or-never push to the offline device is dropped, never carried by any link.
    let never = uuid::Uuid::new_v4().to_string();
    let push = Push { apns_id: Some(never.clone()), expiration: Some("0".into()), ..cluster.push(&token, "{}") };
    assert_eq!(cluster.send(&push).await.status, 200);
    let status = || async {
        let auth = vec![("authorization".to_string(), format!("bearer {}", cluster.signer.sign()))];
        let response = cluster.request(http::Method::GET, &format!("/v1/status/{token}/{never}"), auth).await;
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
        body["state"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(status().await, "dropped");

    let before = cluster.metrics().await;
    let commits_before = sample(&before, "courier_node_store_commit_batch_size_sum");
    let ignored_before = sample(&before, "courier_node_acks_ignored_total");
    let mut link = tls_link(&cluster.endpoint(), &credentials, None).await;
    welcomed(&mut link).await;
    let ack = |apns_id: String| frame(device_frame::Kind::Ack(Ack { apns_id }));
    link.send(ack(never.clone())).await.unwrap();
    for _ in 0..1000 {
        if link.send(ack(uuid::Uuid::new_v4().to_string())).await.is_err() {
            break;
        }
    }
    assert_eq!(read_goodbye(&mut link).await, Some(GoodbyeReason::RateLimited));

    let after = cluster.metrics().await;
    assert!(sample(&after, "courier_node_acks_ignored_total") >= ignored_before + 128.0, "the default burst");
    assert_eq!(sample(&after, "courier_node_store_commit_batch_size_sum"), commits_before, "no store write");
    assert_eq!(status().await, "dropped", "an ack for a notification the link never carried changes nothing");

    // Acks for what a link did carry still count.
    let id = uuid::Uuid::new_v4().to_string();
    let push = Push { apns_id: Some(id.clone()), ..cluster.push(&token, "{}") };
    let mut sdk = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.unwrap();
    assert_eq!(cluster.send(&push).await.status, 200);
    assert_eq!(sdk.next_notification().await.unwrap().apns_id, id);
    sdk.flush_acks().await.unwrap();
    eventually(Duration::from_secs(10), "the carried notification is delivered", || async {
        let auth = vec![("authorization".to_string(), format!("bearer {}", cluster.signer.sign()))];
        let response = cluster.request(http::Method::GET, &format!("/v1/status/{token}/{id}"), auth).await;
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
        body["state"] == "delivered"
    })
    .await;
    cluster.shutdown().await;
}
