//! What one provider connection, or one flood of them, may cost the gateway, on a real node and gateway:
//! 10,000 silent TLS connections held by child `python3` processes from four source addresses do not
//! lock a new provider out (the per-address cap refuses most, the first-request deadline closes the
//! rest); a connection that sends no request in time is closed and counted; 1,000 concurrent pushes to
//! one token over one HTTP/2 connection (the `h2` crate's client) each end in a whole answer, 200 or 429,
//! never a reset; an upper-case token shares its lower-case form's rate limit and is delivered; and an
//! oversized body gets 413 while its connection stays usable.

use crate::common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{TOPIC, TestCluster, eventually, http_get, send_checked};
use courier_gateway::provider::ProviderClient;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Opens `count` TLS connections to the gateway from `source`, one after another, completing each
/// handshake and then sending nothing; reports how many it holds and how many the gateway refused, and
/// holds them until its stdin closes.
const SILENT_CLIENT: &str = r#"
import socket, ssl, sys
host, port, source, count, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
context = ssl.create_default_context(cafile=ca)
context.set_alpn_protocols(["h2"])
held, refused = [], 0
for _ in range(count):
    raw = None
    try:
        raw = socket.create_connection((host, port), timeout=60, source_address=(source, 0))
        held.append(context.wrap_socket(raw, server_hostname="localhost"))
    except (OSError, ssl.SSLError):
        refused += 1
        if raw is not None:
            raw.close()
print(f"held {len(held)} refused {refused}", flush=True)
sys.stdin.read()
"#;

/// A counter or gauge sample with exactly these labels in Prometheus text, 0 when absent.
fn labelled(text: &str, series: &str) -> f64 {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

async fn gateway_metrics(cluster: &TestCluster) -> String {
    http_get(&format!("http://{}/metrics", cluster.gateway.metrics_addr)).await
}

async fn new_provider(cluster: &TestCluster) -> ProviderClient {
    ProviderClient::connect(cluster.gateway.provider_addr, "localhost", &cluster.pki().cluster_ca_cert())
        .await
        .expect("a new provider connects")
}

/// A TLS connection to the provider port that completes its handshake and then says nothing.
async fn silent_tls(cluster: &TestCluster) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config = courier_core::tls::client_config(&cluster.pki().cluster_ca_cert(), None, &[b"h2"]).unwrap();
    let tcp = TcpStream::connect(cluster.gateway.provider_addr).await.unwrap();
    TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap()
}

/// An HTTP/2 connection through the `h2` crate's client, and its PING, which tells when every frame the
/// gateway sent before the PONG (a stream reset included) has been taken in.
async fn h2_client(cluster: &TestCluster) -> (h2::client::SendRequest<Bytes>, h2::PingPong) {
    let io = silent_tls(cluster).await;
    let (client, mut connection) = h2::client::handshake(io).await.expect("HTTP/2 handshake");
    let ping = connection.ping_pong().expect("the PING handle");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, ping)
}

/// How one stream ended: a whole answer (status, reason) or an error naming the failure.
type StreamEnd = Result<(u16, Option<String>), String>;

/// The RST_STREAM the gateway sent on a stream, if any (after a PING round trip has drained the
/// connection, a reset that was sent has been received).
fn reset_of(stream: &mut h2::SendStream<Bytes>) -> Option<h2::Reason> {
    use futures_util::FutureExt;
    futures_util::future::poll_fn(|cx| stream.poll_reset(cx)).now_or_never().and_then(Result::ok)
}

/// Sends a push whose body follows its HEADERS only once `body_may_go` opens, and reads the whole answer.
async fn h2_push(
    client: h2::client::SendRequest<Bytes>,
    cluster_authorization: &str,
    token: &str,
    body: Vec<u8>,
    body_may_go: Option<Arc<tokio::sync::Barrier>>,
) -> (StreamEnd, Option<h2::SendStream<Bytes>>) {
    let mut kept = None;
    let end = h2_exchange(client, cluster_authorization, token, body, body_may_go, &mut kept).await;
    (end, kept)
}

async fn h2_exchange(
    client: h2::client::SendRequest<Bytes>,
    cluster_authorization: &str,
    token: &str,
    body: Vec<u8>,
    body_may_go: Option<Arc<tokio::sync::Barrier>>,
    kept: &mut Option<h2::SendStream<Bytes>>,
) -> StreamEnd {
    let path = format!("/3/device/{token}");
    let request = http::Request::post(format!("https://localhost{path}"))
        .header("authorization", cluster_authorization)
        .header("apns-topic", TOPIC)
        .header("apns-expiration", "0")
        .body(())
        .unwrap();
    let sent = async {
        let mut client = client.ready().await.map_err(|e| format!("ready: {e}"))?;
        client.send_request(request, false).map_err(|e| format!("headers: {e}"))
    }
    .await;
    // Every task reaches the barrier, whatever happened to it, so that none waits for ever.
    if let Some(barrier) = body_may_go {
        barrier.wait().await;
    }
    let (response, stream) = sent?;
    let stream = kept.insert(stream);
    // Large bodies go in several DATA frames, as a client streaming its body would send them.
    let chunks: Vec<Bytes> = body.chunks(1000).map(Bytes::copy_from_slice).collect();
    let last = chunks.len().saturating_sub(1);
    for (i, chunk) in chunks.into_iter().enumerate() {
        stream.send_data(chunk, i == last).map_err(|e| format!("body: {e}"))?;
    }
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    let status = response.status().as_u16();
    let apns_id = response.headers().get("apns-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut answer = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = answer.data().await {
        let chunk = chunk.map_err(|e| format!("answer body: {e}"))?;
        let _ = answer.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    common::openapi::check_response("POST", &path, status, apns_id.as_deref(), &bytes);
    let reason = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string));
    Ok((status, reason))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_silent_tls_connections_do_not_lock_a_provider_out() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    // The gateway's defaults: connection cap, per-address caps, first-request deadline.
    let cluster = TestCluster::start().await;
    let (_device, token) = cluster.device().await;
    let script = cluster.dir.path().join("silent_client.py");
    std::fs::write(&script, SILENT_CLIENT).unwrap();
    let port = cluster.gateway.provider_addr.port().to_string();
    let ca = cluster.pki().cluster_ca_cert();
    let mut children = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        let mut child = tokio::process::Command::new("python3")
            .arg(&script)
            .args(["127.0.0.1", &port, source, "2500"])
            .arg(&ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        children.push((child, lines));
    }
    let (mut held, mut refused) = (0u64, 0u64);
    for (_, lines) in &mut children {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .expect("the silent clients finish opening their connections")
            .unwrap()
            .expect("a report line");
        let numbers: Vec<u64> = line.split_whitespace().filter_map(|word| word.parse().ok()).collect();
        let [h, r] = numbers[..] else { panic!("unexpected report {line:?}") };
        assert_eq!(h + r, 2500, "{line}");
        assert!(h > 0, "the gateway accepted some connections from each address: {line}");
        held += h;
        refused += r;
    }
    eprintln!("silent clients: {held} connections held, {refused} refused");
    assert!(refused > 0, "the per-address cap refused some of the 10,000 ({held} held)");

    // With every silent client still holding what it got, a new provider connects and pushes.
    let provider = new_provider(&cluster).await;
    let response = send_checked(&provider, &cluster.push(&token, r#"{"aps":{"alert":"through"}}"#)).await;
    assert_eq!(response.status, 200, "{response:?}");

    let metrics = gateway_metrics(&cluster).await;
    let counted =
        labelled(&metrics, r#"courier_gateway_provider_connections_refused_total{reason="address_connections"}"#);
    assert!(counted >= 1.0, "refusals are counted:\n{metrics}");
    // Connections that never send a request are closed at the first-request deadline, and counted.
    eventually(Duration::from_secs(120), "every silent connection is closed at its deadline", || async {
        let metrics = gateway_metrics(&cluster).await;
        labelled(&metrics, r#"courier_gateway_provider_first_request_timeouts_total{stage="request"}"#) >= held as f64
    })
    .await;
    drop(children);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_request_in_time_is_closed_and_counted() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    let cluster = TestCluster::start_configured(
        |_| {},
        |gateway| {
            gateway.first_request_timeout_ms = 500;
            gateway.max_connections = 4;
        },
    )
    .await;
    let (_device, token) = cluster.device().await;
    let before = gateway_metrics(&cluster).await;
    let series = |stage: &str| format!("courier_gateway_provider_first_request_timeouts_total{{stage=\"{stage}\"}}");
    let (request_before, handshake_before) =
        (labelled(&before, &series("request")), labelled(&before, &series("handshake")));

    // Silent TLS connections fill the whole connection cap (each is accepted as an earlier one's deadline
    // frees its place); a new provider waits only until the next deadline, then pushes.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(silent_tls(&cluster).await);
    }
    let provider = new_provider(&cluster).await;
    let response = send_checked(&provider, &cluster.push(&token, "{}")).await;
    assert_eq!(response.status, 200, "{response:?}");
    for mut connection in silent {
        let mut byte = [0u8; 64];
        // The gateway may have sent its SETTINGS first; what matters is that the connection ends.
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match connection.read(&mut byte).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a silent connection was left open past its deadline");
    }
    // A TCP connection that never even starts TLS is closed too, counted at the handshake stage.
    let mut tcp = TcpStream::connect(cluster.gateway.provider_addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a silent TCP connection was left open: {read:?}");
    eventually(Duration::from_secs(10), "the closed connections are counted", || async {
        let metrics = gateway_metrics(&cluster).await;
        labelled(&metrics, &series("request")) >= request_before + 4.0
            && labelled(&metrics, &series("handshake")) > handshake_before
    })
    .await;
    // The provider that pushed keeps its connection; the cluster's own, closed at its deadline before it
    // ever pushed, dials again as APNs clients do.
    assert_eq!(send_checked(&provider, &cluster.push(&token, "{}")).await.status, 200);
    assert_eq!(cluster.send(&cluster.push(&token, "{}")).await.status, 200);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_pushes_to_one_token_all_get_whole_answers() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    // Default limits: a burst of 100 per device, then 20 per second.
    let cluster = TestCluster::start().await;
    let (device, token) = cluster.device().await;
    drop(device);
    let (client, mut ping) = h2_client(&cluster).await;
    let authorization = format!("bearer {}", cluster.signer.sign());
    // Every stream's HEADERS go out before any body, so that a gateway answering early would have to
    // answer streams whose bodies are still to come.
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (client, authorization, token, barrier) =
                (client.clone(), authorization.clone(), token.clone(), barrier.clone());
            tokio::spawn(async move { h2_push(client, &authorization, &token, b"{}".to_vec(), Some(barrier)).await })
        })
        .collect();
    let mut ends = Vec::new();
    for task in tasks {
        ends.push(tokio::time::timeout(Duration::from_secs(120), task).await.expect("every stream ends").unwrap());
    }
    ping.ping(h2::Ping::opaque()).await.expect("PING answered");
    let (mut ok, mut limited, mut other) = (0, 0, Vec::new());
    for (end, stream) in &mut ends {
        if let Some(reason) = stream.as_mut().and_then(reset_of) {
            other.push(Err(format!("reset {reason:?} after {end:?}")));
            continue;
        }
        match end {
            Ok((200, None)) => ok += 1,
            Ok((429, Some(reason))) if reason == "TooManyRequests" => limited += 1,
            end => other.push(end.clone()),
        }
    }
    assert!(other.is_empty(), "{} streams did not end in 200 or 429, e.g. {:?}", other.len(), other.first());
    assert_eq!(ok + limited, 1000);
    assert!(ok >= 1 && limited >= 1, "{ok} × 200 and {limited} × 429 with the default limits");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upper_case_token_shares_the_rate_limit_and_is_delivered() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    let cluster = TestCluster::start_configured(
        |_| {},
        |gateway| {
            gateway.device_burst = 2;
            gateway.device_rate_per_sec = 0.001;
        },
    )
    .await;
    let (mut device, token) = cluster.device().await;
    let upper = token.to_ascii_uppercase();
    assert_ne!(upper, token);

    let mut push = cluster.push(&upper, r#"{"aps":{"alert":"upper"}}"#);
    push.apns_id = Some(uuid::Uuid::new_v4().to_string());
    let response = cluster.send(&push).await;
    assert_eq!(response.status, 200, "{response:?}");
    let received =
        tokio::time::timeout(Duration::from_secs(10), device.next_notification()).await.unwrap().expect("delivered");
    assert_eq!(Some(received.apns_id.clone()), push.apns_id);
    device.ack(&received.apns_id).await.unwrap();

    // The status endpoint reads the token in either case as well.
    let status_path = format!("/v1/status/{upper}/{}", received.apns_id);
    let authorization = vec![("authorization".to_string(), format!("bearer {}", cluster.signer.sign()))];
    let status = cluster.request(http::Method::GET, &status_path, authorization).await;
    assert_eq!(status.status, 200, "{status:?}");

    // Lower case takes the burst's second push; either spelling is then over the limit.
    assert_eq!(cluster.send(&cluster.push(&token, "{}")).await.status, 200);
    for spelling in [&upper, &token] {
        let response = cluster.send(&cluster.push(spelling, "{}")).await;
        assert_eq!((response.status, response.reason.as_deref()), (429, Some("TooManyRequests")), "{spelling}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_413_and_the_connection_stays_usable() {
    let _turn = crate::ONE_AT_A_TIME.lock().await;
    let cluster = TestCluster::start().await;
    let (_device, token) = cluster.device().await;
    let (client, mut ping) = h2_client(&cluster).await;
    let authorization = format!("bearer {}", cluster.signer.sign());
    let oversized = format!("{{\"a\":\"{}\"}}", "x".repeat(8000)).into_bytes();
    // Without content-length, so the gateway finds out only by reading.
    let (end, too_large) = h2_push(client.clone(), &authorization, &token, oversized.clone(), None).await;
    assert_eq!(end, Ok((413, Some("PayloadTooLarge".to_string()))));
    // Refused for another reason first, the answer is still 413 past the limit, and whole.
    let (end, _) = h2_push(client.clone(), "bearer not.a.jwt", &token, oversized, None).await;
    assert_eq!(end, Ok((413, Some("PayloadTooLarge".to_string()))));
    // A refusal within the limit is answered with its own reason after the body was read.
    let (end, refused) = h2_push(client.clone(), "bearer not.a.jwt", &token, vec![b' '; 3000], None).await;
    assert_eq!(end, Ok((403, Some("InvalidProviderToken".to_string()))));
    // The same connection carries the next push.
    let (end, accepted) = h2_push(client, &authorization, &token, b"{}".to_vec(), None).await;
    assert_eq!(end, Ok((200, None)));
    ping.ping(h2::Ping::opaque()).await.expect("PING answered");
    // Past the limit the rest of the body is declined with NO_ERROR after the whole answer (RFC 9113
    // §8.1); every other stream simply ends.
    let declined = too_large.and_then(|mut stream| reset_of(&mut stream));
    assert!(matches!(declined, None | Some(h2::Reason::NO_ERROR)), "{declined:?}");
    for stream in [refused, accepted] {
        assert_eq!(stream.and_then(|mut stream| reset_of(&mut stream)), None);
    }
    cluster.shutdown().await;
}
