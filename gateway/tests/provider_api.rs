//! End-to-end tests of the provider API: real TLS, real HTTP/2, real gRPC and a real node.
//!
//! Each test makes a PKI directory, starts a Courier node (which bootstraps its one-node cluster from that
//! directory), starts a gateway that learns the cluster from the node's watch stream, and talks to the
//! gateway with `ProviderClient` exactly as a provider would. Pushes go to devices that are not connected,
//! so whatever reaches the node is in its store: refused requests must leave the store untouched.

use std::net::SocketAddr;
use std::path::Path;

use std::time::Duration;

use courier_gateway::provider::{JwtSigner, ProviderClient, Push, PushResponse};
use courier_gateway::{GatewayConfig, RunningGateway};
use courier_node::ids::DeviceId;
use courier_node::pki::PkiDir;
use courier_node::token::Keyring;
use courier_node::{NodeConfig, RunningNode};
use courier_proto::cluster::Notification;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOPIC: &str = "com.example.app";
const APNS_ID: &str = "123e4567-E89B-12d3-a456-426614174000";
/// Generous bound for anything the tests wait on; a healthy run takes milliseconds.
const DEADLINE: Duration = Duration::from_secs(15);

/// A real Courier node on loopback, its data in its own directory.
struct TestNode {
    addr: SocketAddr,
    node: Option<RunningNode>,
}

impl TestNode {
    async fn start(pki: &PkiDir, data_dir: &Path) -> TestNode {
        let node = courier_node::start(NodeConfig::local(pki.dir.clone(), data_dir.to_path_buf())).await.unwrap();
        let give_up = tokio::time::Instant::now() + DEADLINE;
        while !node.is_ready() {
            assert!(tokio::time::Instant::now() < give_up, "the node never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TestNode { addr: node.cluster_addr, node: Some(node) }
    }

    /// What the node holds for `device`: everything a push to an offline device hands it.
    async fn received(&self, device: DeviceId) -> Vec<Notification> {
        self.node.as_ref().expect("node running").store.pending(device).await.unwrap()
    }

    /// Notifications stored across all devices.
    async fn stored(&self) -> u64 {
        self.node.as_ref().expect("node running").store.queued().await.unwrap()
    }

    /// Stops the node; calling it again does nothing.
    async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            tokio::time::timeout(DEADLINE, node.shutdown()).await.expect("the node did not stop");
        }
    }
}

async fn wait_for_view(gateway: &RunningGateway) {
    let give_up = tokio::time::Instant::now() + DEADLINE;
    while gateway.epoch().is_none() {
        assert!(tokio::time::Instant::now() < give_up, "the gateway never got a cluster view");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    pki: PkiDir,
    node: TestNode,
    gateway: RunningGateway,
    client: ProviderClient,
    signer: JwtSigner,
    keyring: Keyring,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        courier_node::pki::init(dir.path(), &courier_node::pki::PkiOptions { nodes: vec![1], ..Default::default() })
            .unwrap();
        let pki = PkiDir::new(dir.path());
        let node = TestNode::start(&pki, &dir.path().join("node")).await;
        let mut config = GatewayConfig::local(dir.path().to_path_buf(), node.addr);
        config.request_timeout_ms = 3000;
        let gateway = courier_gateway::start(config).await.unwrap();
        wait_for_view(&gateway).await;
        let client = connect(gateway.provider_addr, &pki.cluster_ca_cert()).await;
        Harness {
            signer: JwtSigner::from_pki(&pki).unwrap(),
            keyring: Keyring::load(&pki.token_keys()).unwrap(),
            _dir: dir,
            pki,
            node,
            gateway,
            client,
        }
    }

    fn token(&self, device: DeviceId, topic: &str) -> String {
        self.keyring.mint(device, topic).unwrap()
    }

    /// A push that the gateway accepts as it is.
    fn valid_push(&self, device: DeviceId) -> Push {
        Push {
            token: self.token(device, TOPIC),
            topic: Some(TOPIC.into()),
            apns_id: Some(APNS_ID.into()),
            authorization: Some(format!("bearer {}", self.signer.sign())),
            payload: br#"{"aps":{"alert":"hello"}}"#.to_vec(),
            ..Push::default()
        }
    }

    async fn push(&self, push: &Push) -> PushResponse {
        tokio::time::timeout(DEADLINE, self.client.push(push)).await.expect("push timed out").unwrap()
    }
}

async fn connect(addr: SocketAddr, ca: &Path) -> ProviderClient {
    ProviderClient::connect(addr, "localhost", ca).await.unwrap()
}

fn assert_refused(response: &PushResponse, status: u16, reason: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(response.reason.as_deref(), Some(reason), "{response:?}");
    assert!(response.apns_id.is_some(), "every response carries an apns-id: {response:?}");
}

#[tokio::test]
async fn a_valid_push_reaches_the_node_and_echoes_its_apns_id() {
    let h = Harness::start().await;
    let device = DeviceId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    let mut push = h.valid_push(device);
    push.collapse_id = Some("score".into());
    push.priority = Some("5".into());
    let response = h.push(&push).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.apns_id.as_deref(), Some(APNS_ID));
    assert!(response.body.is_empty());

    let received = h.node.received(device).await;
    assert_eq!(received.len(), 1);
    let n = &received[0];
    assert_eq!(n.device_id, device.to_bytes().to_vec());
    assert_eq!(n.topic, TOPIC);
    assert_eq!(n.apns_id, APNS_ID);
    assert_eq!(n.payload, push.payload);
    assert_eq!(n.priority, 5);
    assert_eq!(n.collapse_id, "score");
    assert_eq!(n.push_type, "alert");
    let now_secs = courier_node::ids::unix_millis() / 1000;
    assert!(n.expiration > now_secs + 29 * 86400 && n.expiration <= now_secs + 30 * 86400 + 5);
    assert!(n.accepted_at_ms > 0);

    // Without an apns-id the gateway makes one up and tells both sides the same one.
    push.apns_id = None;
    push.collapse_id = None;
    let response = h.push(&push).await;
    assert_eq!(response.status, 200, "{response:?}");
    let generated = response.apns_id.unwrap();
    assert_eq!(generated.len(), 36);
    assert_eq!(generated, generated.to_lowercase());
    let received = h.node.received(device).await;
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].apns_id, generated);

    // Expiration 0 to a device that is not connected: accepted, and not stored.
    push.expiration = Some("0".into());
    assert_eq!(h.push(&push).await.status, 200);
    assert_eq!(h.node.received(device).await.len(), 2);

    let Harness { gateway, mut node, .. } = h;
    gateway.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn every_bad_input_is_refused_before_the_node() {
    let h = Harness::start().await;
    let device = DeviceId(42);
    let good = h.valid_push(device);

    let mut forged_token = good.token.clone().into_bytes();
    forged_token[30] = if forged_token[30] == b'0' { b'1' } else { b'0' };
    let forged_token = String::from_utf8(forged_token).unwrap();

    let cases: Vec<(&str, Push, u16, &str)> = vec![
        ("garbage token", Push { token: "abc".into(), ..good.clone() }, 400, "BadDeviceToken"),
        ("flipped hex digit", Push { token: forged_token, ..good.clone() }, 400, "BadDeviceToken"),
        (
            "token for another topic",
            Push { token: h.token(device, "com.example.other"), ..good.clone() },
            400,
            "DeviceTokenNotForTopic",
        ),
        ("no topic", Push { topic: None, ..good.clone() }, 400, "MissingTopic"),
        ("payload too large", Push { payload: big_payload(4097), ..good.clone() }, 413, "PayloadTooLarge"),
        ("empty payload", Push { payload: Vec::new(), ..good.clone() }, 400, "PayloadEmpty"),
        ("not a JSON object", Push { payload: b"[1,2]".to_vec(), ..good.clone() }, 400, "InvalidPayload"),
        ("no authorization", Push { authorization: None, ..good.clone() }, 403, "MissingProviderToken"),
        (
            "garbage JWT",
            Push { authorization: Some("bearer not.a.jwt".into()), ..good.clone() },
            403,
            "InvalidProviderToken",
        ),
        (
            "stale JWT",
            Push { authorization: Some(format!("bearer {}", h.signer.sign_at(unix_secs() - 7200))), ..good.clone() },
            403,
            "ExpiredProviderToken",
        ),
        ("bad apns-id", Push { apns_id: Some("not-a-uuid".into()), ..good.clone() }, 400, "BadMessageId"),
        ("bad priority", Push { priority: Some("7".into()), ..good.clone() }, 400, "BadPriority"),
        ("bad expiration", Push { expiration: Some("tomorrow".into()), ..good.clone() }, 400, "BadExpirationDate"),
        ("long collapse id", Push { collapse_id: Some("c".repeat(65)), ..good.clone() }, 400, "BadCollapseId"),
        ("empty token", Push { token: String::new(), ..good.clone() }, 400, "MissingDeviceToken"),
    ];
    for (what, push, status, reason) in cases {
        let response = h.push(&push).await;
        assert_eq!(response.status, status, "{what}: {response:?}");
        assert_eq!(response.reason.as_deref(), Some(reason), "{what}: {response:?}");
        if let Some(apns_id) = &push.apns_id {
            assert_eq!(response.apns_id.as_ref(), Some(apns_id), "{what}: the apns-id is echoed byte for byte");
        }
    }

    let auth = good.authorization.clone().unwrap();
    let base_headers = vec![("authorization".to_string(), auth.clone()), ("apns-topic".to_string(), TOPIC.to_string())];
    let payload = good.payload.clone();
    let raw = |method: http::Method, path: String, headers: Vec<(String, String)>| {
        let client = h.client.clone();
        let payload = payload.clone();
        async move {
            tokio::time::timeout(DEADLINE, client.request(method, &path, headers, payload)).await.unwrap().unwrap()
        }
    };
    let response = raw(http::Method::POST, "/3/devices/abc".into(), base_headers.clone()).await;
    assert_refused(&response, 404, "BadPath");
    let response = raw(http::Method::GET, format!("/3/device/{}", good.token), base_headers.clone()).await;
    assert_refused(&response, 405, "MethodNotAllowed");
    let mut duplicated = base_headers.clone();
    duplicated.push(("apns-priority".into(), "10".into()));
    duplicated.push(("apns-priority".into(), "5".into()));
    let response = raw(http::Method::POST, format!("/3/device/{}", good.token), duplicated).await;
    assert_refused(&response, 400, "DuplicateHeaders");
    let mut error_body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(error_body["reason"].take(), "DuplicateHeaders");

    assert_eq!(h.node.stored().await, 0, "a refused push reached the node");

    // The connection survived all of that, and a good push still goes through.
    let response = h.push(&good).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(h.node.received(device).await.len(), 1);

    let Harness { gateway, mut node, .. } = h;
    gateway.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn a_topic_outside_the_credentials_list_is_disallowed() {
    let dir = tempfile::tempdir().unwrap();
    let mut credential =
        courier_node::pki::init(dir.path(), &courier_node::pki::PkiOptions { nodes: vec![1], ..Default::default() })
            .unwrap();
    credential.topics = vec!["com.example.allowed".into()];
    let pki = PkiDir::new(dir.path());
    std::fs::write(pki.provider_credential(), serde_json::to_vec(&credential).unwrap()).unwrap();
    let mut node = TestNode::start(&pki, &dir.path().join("node")).await;
    let gateway = courier_gateway::start(GatewayConfig::local(dir.path().to_path_buf(), node.addr)).await.unwrap();
    wait_for_view(&gateway).await;
    let client = connect(gateway.provider_addr, &pki.cluster_ca_cert()).await;
    let keyring = Keyring::load(&pki.token_keys()).unwrap();
    let signer = JwtSigner::from_pki(&pki).unwrap();
    let push = |topic: &str| Push {
        token: keyring.mint(DeviceId(7), topic).unwrap(),
        topic: Some(topic.into()),
        authorization: Some(format!("bearer {}", signer.sign())),
        payload: b"{}".to_vec(),
        ..Push::default()
    };
    let response = client.push(&push("com.example.other")).await.unwrap();
    assert_refused(&response, 400, "TopicDisallowed");
    assert_eq!(node.stored().await, 0);
    let response = client.push(&push("com.example.allowed")).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    gateway.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn many_concurrent_pushes_share_one_connection() {
    let h = Harness::start().await;
    let pushes: Vec<_> = (0..200u128)
        .map(|i| {
            let client = h.client.clone();
            let mut push = h.valid_push(DeviceId(i));
            push.apns_id = None;
            tokio::spawn(async move { client.push(&push).await.unwrap().status })
        })
        .collect();
    for push in pushes {
        assert_eq!(tokio::time::timeout(DEADLINE, push).await.unwrap().unwrap(), 200);
    }
    assert_eq!(h.node.stored().await, 200);

    let metrics = http_get(h.gateway.metrics_addr, "/metrics").await;
    assert!(metrics.contains("courier_gateway_notifications_accepted_total"), "{metrics}");
    assert!(metrics.contains("courier_gateway_provider_connections"), "{metrics}");
    assert!(metrics.contains("courier_gateway_forward_latency_seconds"), "{metrics}");
    assert!(http_get(h.gateway.metrics_addr, "/readyz").await.starts_with("HTTP/1.1 200"));

    let Harness { gateway, mut node, .. } = h;
    gateway.shutdown().await;
    node.stop().await;
}

#[tokio::test]
async fn a_stopped_node_means_service_unavailable() {
    let mut h = Harness::start().await;
    let push = h.valid_push(DeviceId(9));
    assert_eq!(h.push(&push).await.status, 200);
    h.node.stop().await;
    let response = h.push(&push).await;
    assert_refused(&response, 503, "ServiceUnavailable");
    assert_eq!(response.apns_id.as_deref(), Some(APNS_ID));
    h.gateway.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns_promptly() {
    let h = Harness::start().await;
    let addr = h.gateway.provider_addr;
    assert_eq!(h.push(&h.valid_push(DeviceId(1))).await.status, 200);
    let Harness { gateway, mut node, pki, .. } = h;
    tokio::time::timeout(DEADLINE, gateway.shutdown()).await.expect("shutdown hung");
    assert!(ProviderClient::connect(addr, "localhost", &pki.cluster_ca_cert()).await.is_err());
    node.stop().await;
}

fn unix_secs() -> i64 {
    (courier_node::ids::unix_millis() / 1000) as i64
}

fn big_payload(len: usize) -> Vec<u8> {
    let mut payload = br#"{"pad":""#.to_vec();
    payload.resize(len - 2, b'x');
    payload.extend_from_slice(b"\"}");
    payload
}

/// A bare HTTP/1.1 GET; the metrics port speaks plain HTTP and this is all the tests need of it.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response)).await.unwrap().unwrap();
    response
}
