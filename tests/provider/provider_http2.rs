//! HTTP/2 as real APNs clients need it, checked frame by frame with a minimal HTTP/2 client written here
//! (hyper's and h2's clients hide frames): the first SETTINGS frame, PING, a 200 as one HEADERS frame with
//! END_STREAM, an error as HEADERS plus one DATA frame, no stream reset instead of a response, TLS without
//! ALPN or SNI, and the two-step GOAWAY that lets an in-flight request finish. Also 10,000 concurrent
//! requests on one connection through an ordinary client.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{TOPIC, TestCluster};
use courier_gateway::provider::Push;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// HPACK static-table index 8 is `:status: 200`, 12 is `:status: 400`.
const STATUS_200: u8 = 0x88;
const STATUS_400: u8 = 0x8c;

#[derive(Debug, Clone)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// One HTTP/2 connection at the frame level.
struct RawH2 {
    tls: TlsStream<TcpStream>,
    /// The last stream id of every GOAWAY read so far, in order, whichever call read it: `response` skips
    /// frames of other streams, and the server may send its final GOAWAY before a response ends.
    goaways: Vec<u32>,
}

/// An HPACK integer with an `prefix`-bit prefix whose high bits are `flags`.
fn hpack_int(out: &mut Vec<u8>, flags: u8, prefix: u32, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A header block of literal fields without indexing (no Huffman coding).
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        hpack_int(&mut out, 0x00, 4, 0);
        hpack_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

impl RawH2 {
    async fn connect(cluster: &TestCluster, alpn: &[&[u8]], server_name: ServerName<'static>) -> RawH2 {
        let config = courier_core::tls::client_config(&cluster.pki().cluster_ca_cert(), None, alpn).unwrap();
        let tcp = TcpStream::connect(cluster.gateway.provider_addr).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config)).connect(server_name, tcp).await.unwrap();
        let mut raw = RawH2 { tls, goaways: Vec::new() };
        raw.tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        raw.send(SETTINGS, 0, 0, &[]).await;
        raw
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.tls.write_all(&frame).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    /// The next frame, acknowledging SETTINGS and PINGs as a client must; None at the end.
    async fn next(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        match tokio::time::timeout(Duration::from_secs(15), self.tls.read_exact(&mut head)).await {
            Err(_) => panic!("no frame from the gateway for 15 s"),
            Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        self.tls.read_exact(&mut payload).await.ok()?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let frame = Frame { kind: head[3], flags: head[4], stream, payload };
        if frame.kind == SETTINGS && frame.flags & ACK == 0 {
            self.send(SETTINGS, ACK, 0, &[]).await;
        }
        if frame.kind == PING && frame.flags & ACK == 0 {
            self.send(PING, ACK, 0, &frame.payload).await;
        }
        if frame.kind == GOAWAY && frame.payload.len() >= 4 {
            let last_stream =
                u32::from_be_bytes([frame.payload[0], frame.payload[1], frame.payload[2], frame.payload[3]]);
            self.goaways.push(last_stream & 0x7fff_ffff);
        }
        Some(frame)
    }

    /// Every frame on `stream` until it ends (END_STREAM or RST_STREAM), skipping other streams.
    async fn response(&mut self, stream: u32) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await.expect("the connection ended before the response did");
            if frame.stream != stream {
                continue;
            }
            let done =
                frame.flags & END_STREAM != 0 && matches!(frame.kind, DATA | HEADERS) || frame.kind == RST_STREAM;
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    /// Sends a push's HEADERS (and its body, unless `body` is None, leaving the stream open).
    async fn push(&mut self, stream: u32, cluster: &TestCluster, token: &str, body: Option<&[u8]>) {
        let auth = format!("bearer {}", cluster.signer.sign());
        let path = format!("/3/device/{token}");
        let block = header_block(&[
            (":method", "POST"),
            (":scheme", "https"),
            (":path", &path),
            (":authority", "localhost"),
            ("authorization", &auth),
            ("apns-topic", TOPIC),
        ]);
        self.send(HEADERS, END_HEADERS, stream, &block).await;
        if let Some(body) = body {
            self.send(DATA, END_STREAM, stream, body).await;
        }
    }
}

/// (identifier, value) pairs of a SETTINGS payload.
fn settings(payload: &[u8]) -> Vec<(u16, u32)> {
    payload
        .chunks_exact(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
        .collect()
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_what_apns_clients_expect() {
    let cluster = TestCluster::start().await;
    let (_device, token) = cluster.device().await;
    let mut h2 = RawH2::connect(&cluster, &[b"h2"], localhost()).await;
    assert_eq!(h2.tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // The server's first frame is SETTINGS, already allowing at least 1000 concurrent streams.
    let first = h2.next().await.unwrap();
    assert_eq!(first.kind, SETTINGS, "{first:?}");
    let streams = settings(&first.payload).into_iter().find(|(id, _)| *id == SETTINGS_MAX_CONCURRENT_STREAMS);
    assert!(streams.is_some_and(|(_, n)| n >= 1000), "first SETTINGS: {:?}", settings(&first.payload));

    // PING is answered with the same payload.
    h2.send(PING, 0, 0, b"courier!").await;
    loop {
        let frame = h2.next().await.unwrap();
        if frame.kind == PING && frame.flags & ACK != 0 {
            assert_eq!(frame.payload, b"courier!");
            break;
        }
    }

    // 200: one HEADERS frame carrying END_STREAM, and so no DATA frame.
    h2.push(1, &cluster, &token, Some(br#"{"aps":{}}"#)).await;
    let frames = h2.response(1).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].kind, HEADERS);
    assert_eq!(frames[0].flags & (END_STREAM | END_HEADERS), END_STREAM | END_HEADERS);
    assert_eq!(frames[0].payload.first(), Some(&STATUS_200));

    // An error: HEADERS, then exactly one DATA frame holding the whole JSON and END_STREAM.
    h2.push(3, &cluster, &token, Some(b"")).await;
    let frames = h2.response(3).await;
    assert_eq!(frames.iter().map(|f| f.kind).collect::<Vec<_>>(), [HEADERS, DATA], "{frames:?}");
    assert_eq!(frames[0].flags & END_STREAM, 0);
    assert_eq!(frames[0].payload.first(), Some(&STATUS_400));
    assert_eq!(frames[1].flags & END_STREAM, END_STREAM);
    let body: serde_json::Value = serde_json::from_slice(&frames[1].payload).unwrap();
    assert_eq!(body, serde_json::json!({"reason": "PayloadEmpty"}));

    // Refused before its body is read (too large): still a whole response, never a reset instead.
    let mut big = vec![b' '; 4097];
    big[0] = b'{';
    h2.push(5, &cluster, &token, None).await;
    h2.send(DATA, 0, 5, &big).await;
    let frames = h2.response(5).await;
    assert_eq!(frames.iter().map(|f| f.kind).collect::<Vec<_>>(), [HEADERS, DATA], "{frames:?}");
    let body: serde_json::Value = serde_json::from_slice(&frames[1].payload).unwrap();
    assert_eq!(body["reason"], "PayloadTooLarge");

    // The connection is still good.
    h2.push(7, &cluster, &token, Some(b"{}")).await;
    assert_eq!(h2.response(7).await[0].payload.first(), Some(&STATUS_200));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_alpn_or_sni_is_served() {
    let cluster = TestCluster::start().await;
    let (_device, token) = cluster.device().await;
    // An IP address as the server name: rustls sends no SNI then. No ALPN offered either.
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut h2 = RawH2::connect(&cluster, &[], ip).await;
    assert_eq!(h2.tls.get_ref().1.alpn_protocol(), None);
    h2.push(1, &cluster, &token, Some(b"{}")).await;
    let frames = h2.response(1).await;
    assert_eq!(frames[0].payload.first(), Some(&STATUS_200), "{frames:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_a_two_step_goaway_that_lets_open_streams_finish() {
    let cluster = TestCluster::start().await;
    let (_device, token) = cluster.device().await;
    let mut h2 = RawH2::connect(&cluster, &[b"h2"], localhost()).await;
    h2.push(1, &cluster, &token, Some(b"{}")).await;
    h2.response(1).await;
    // A request in flight: its HEADERS are in, its body is not.
    h2.push(3, &cluster, &token, None).await;

    let TestCluster { node, gateway, dir, .. } = cluster;
    let stopping = tokio::spawn(gateway.shutdown());
    // Step one: GOAWAY with the largest stream id, so nothing in flight is cut off.
    while h2.goaways.is_empty() {
        h2.next().await.expect("GOAWAY before the end");
    }
    assert_eq!(h2.goaways, [0x7fff_ffff], "the first GOAWAY must not name a last stream yet");
    // The in-flight request finishes and gets its answer.
    h2.send(DATA, END_STREAM, 3, b"{}").await;
    let frames = h2.response(3).await;
    assert_eq!(frames[0].kind, HEADERS, "{frames:?}");
    assert_eq!(frames[0].payload.first(), Some(&STATUS_200));
    // Step two: GOAWAY naming the last stream it processed (sent once the client has answered the first
    // GOAWAY's PING, so possibly before stream 3's answer), then the connection closes.
    while h2.next().await.is_some() {}
    assert_eq!(h2.goaways, [0x7fff_ffff, 3]);
    tokio::time::timeout(Duration::from_secs(10), stopping).await.unwrap().unwrap();
    if let Some(node) = node {
        node.shutdown().await;
    }
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_requests_on_one_connection() {
    let cluster = TestCluster::start().await;
    let keyring = courier_core::token::Keyring::default();
    keyring.replace_with_states(cluster.node().control.current().token_keys.values().map(|r| (r.key.clone(), r.state)));
    let authorization = format!("bearer {}", cluster.signer.sign());
    let tasks: Vec<_> = (0..10_000u128)
        .map(|i| {
            let push = Push {
                token: keyring.mint(courier_core::ids::DeviceId(i + 1), TOPIC).unwrap(),
                topic: Some(TOPIC.into()),
                authorization: Some(authorization.clone()),
                // Now or never: the devices are away, so nothing waits on the disk.
                expiration: Some("0".into()),
                payload: b"{}".to_vec(),
                ..Push::default()
            };
            let client = cluster.provider.clone();
            tokio::spawn(async move { client.push(&push).await.map(|r| r.status) })
        })
        .collect();
    let mut failures = Vec::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(120), task).await.unwrap().unwrap() {
            Ok(200) => {}
            other => failures.push(format!("{other:?}")),
        }
    }
    assert!(failures.is_empty(), "{} of 10,000 failed, e.g. {:?}", failures.len(), failures.first());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    // The default is an hour (see the gateway's config tests); one second here.
    let cluster = TestCluster::start_configured(|_| {}, |gateway| gateway.idle_timeout_secs = 1).await;
    let (_device, token) = cluster.device().await;
    let mut h2 = RawH2::connect(&cluster, &[b"h2"], localhost()).await;
    h2.push(1, &cluster, &token, Some(b"{}")).await;
    assert_eq!(h2.response(1).await[0].payload.first(), Some(&STATUS_200));
    let started = tokio::time::Instant::now();
    let goaway = loop {
        let frame = h2.next().await.expect("GOAWAY before the connection ends");
        if frame.kind == GOAWAY {
            break frame;
        }
    };
    assert!(started.elapsed() >= Duration::from_millis(900), "closed before it was idle for the timeout");
    let error_code = u32::from_be_bytes(goaway.payload[4..8].try_into().unwrap());
    assert_eq!(error_code, 0, "an idle close is NO_ERROR");
    cluster.shutdown().await;
}
