//! Every status and reason of the provider API, each produced by a real HTTP/2 request to a real gateway
//! in front of a real node, with the `apns-id` echoed and every response checked against
//! `gateway/openapi.yaml` (see `common::openapi`). Also: certificate-based auth, `Unregistered` after a
//! device unregisters, the delivery-status extension, rate limits and the token-refresh limit.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TOPIC, TestCluster, eventually, openapi, request_checked, send_checked};
use courier_core::ids::unix_millis;
use courier_core::pki::PkiDir;
use courier_core::token::{TokenKey, TokenKeyId};
use courier_gateway::http::apns::Reason;
use courier_gateway::provider::{ProviderClient, Push, PushResponse};
use courier_node::raft::Command;

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Asserts status and reason, and that the `apns-id` sent came back byte for byte.
fn assert_answer(what: &str, push: &Push, response: &PushResponse, status: u16, reason: Option<&str>) {
    assert_eq!((response.status, response.reason.as_deref()), (status, reason), "{what}: {response:?}");
    if let Some(sent) = &push.apns_id {
        assert_eq!(response.apns_id.as_ref(), Some(sent), "{what}: apns-id echoed byte for byte");
    }
}

async fn cert_client(cluster: &TestCluster, cert: &Path, key: &Path) -> ProviderClient {
    ProviderClient::connect_with_certificate(
        cluster.gateway.provider_addr,
        "localhost",
        &cluster.pki().cluster_ca_cert(),
        cert,
        key,
    )
    .await
    .expect("a provider certificate connects")
}

/// Asks for a notification's status with a fresh JWT; the response and its parsed body.
async fn status_of(cluster: &TestCluster, token: &str, id: &str) -> (PushResponse, serde_json::Value) {
    let auth = vec![("authorization".to_string(), format!("bearer {}", cluster.signer.sign()))];
    let response = cluster.request(http::Method::GET, &status_path(token, id), auth).await;
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
    (response, body)
}

fn status_path(token: &str, apns_id: &str) -> String {
    format!("/v1/status/{token}/{apns_id}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_error_has_its_apns_status_and_reason() {
    let cluster = TestCluster::start().await;
    let (_device, token) = cluster.device().await;
    let good = || Push { apns_id: Some(uuid()), ..cluster.push(&token, r#"{"aps":{"alert":"hi"}}"#) };
    let stale = format!("bearer {}", cluster.signer.sign_at((unix_millis() / 1000) as i64 - 7200));
    let voip = |len: usize| Push {
        topic: Some(format!("{TOPIC}.voip")),
        push_type: Some("voip".into()),
        payload: padded(len),
        ..good()
    };

    let cases: Vec<(&str, Push, u16, Option<&str>)> = vec![
        ("valid", good(), 200, None),
        ("upper-case apns-id", Push { apns_id: Some(uuid().to_uppercase()), ..good() }, 200, None),
        ("voip at 5120 bytes", voip(5120), 200, None),
        (
            "liveactivity",
            Push {
                topic: Some(format!("{TOPIC}.push-type.liveactivity")),
                push_type: Some("liveactivity".into()),
                ..good()
            },
            200,
            None,
        ),
        (
            "background at 5",
            Push { push_type: Some("background".into()), priority: Some("5".into()), ..good() },
            200,
            None,
        ),
        ("long collapse id", Push { collapse_id: Some("c".repeat(65)), ..good() }, 400, Some("BadCollapseId")),
        ("garbage token", Push { token: "abc".into(), ..good() }, 400, Some("BadDeviceToken")),
        ("bad expiration", Push { expiration: Some("soon".into()), ..good() }, 400, Some("BadExpirationDate")),
        ("bad apns-id", Push { apns_id: Some("not-a-uuid".into()), ..good() }, 400, Some("BadMessageId")),
        ("bad priority", Push { priority: Some("7".into()), ..good() }, 400, Some("BadPriority")),
        (
            "background at 10",
            Push { push_type: Some("background".into()), priority: Some("10".into()), ..good() },
            400,
            Some("BadPriority"),
        ),
        ("topic with a space", Push { topic: Some("com.example app".into()), ..good() }, 400, Some("BadTopic")),
        (
            "voip topic as alert",
            Push { topic: Some(format!("{TOPIC}.voip")), push_type: Some("alert".into()), ..good() },
            400,
            Some("BadTopic"),
        ),
        (
            "other topic",
            Push { topic: Some("com.example.other".into()), ..good() },
            400,
            Some("DeviceTokenNotForTopic"),
        ),
        ("unknown push type", Push { push_type: Some("sms".into()), ..good() }, 400, Some("InvalidPushType")),
        ("empty token", Push { token: String::new(), ..good() }, 400, Some("MissingDeviceToken")),
        ("no topic", Push { topic: None, ..good() }, 400, Some("MissingTopic")),
        ("empty payload", Push { payload: Vec::new(), ..good() }, 400, Some("PayloadEmpty")),
        ("stale JWT", Push { authorization: Some(stale), ..good() }, 403, Some("ExpiredProviderToken")),
        (
            "garbage JWT",
            Push { authorization: Some("Bearer not.a.jwt".into()), ..good() },
            403,
            Some("InvalidProviderToken"),
        ),
        ("no authorization", Push { authorization: None, ..good() }, 403, Some("MissingProviderToken")),
        ("4097 bytes", Push { payload: padded(4097), ..good() }, 413, Some("PayloadTooLarge")),
        ("voip at 5121 bytes", voip(5121), 413, Some("PayloadTooLarge")),
    ];
    for (what, push, status, reason) in cases {
        let response = cluster.send(&push).await;
        assert_answer(what, &push, &response, status, reason);
    }

    // Requests `Push` cannot express.
    let auth = ("authorization".to_string(), format!("bearer {}", cluster.signer.sign()));
    let topic = ("apns-topic".to_string(), TOPIC.to_string());
    let id = uuid();
    let mut twice = vec![auth.clone(), topic.clone(), ("apns-id".into(), id.clone())];
    twice.push(("apns-priority".into(), "10".into()));
    twice.push(("apns-priority".into(), "10".into()));
    let path = format!("/3/device/{token}");
    let response = request_checked(&cluster.provider, http::Method::POST, &path, twice, b"{}".to_vec()).await;
    assert_eq!((response.status, response.reason.as_deref()), (400, Some("DuplicateHeaders")));
    assert_eq!(response.apns_id.as_deref(), Some(id.as_str()));
    let response = cluster.request(http::Method::POST, "/3/nothing", vec![auth.clone()]).await;
    assert_eq!((response.status, response.reason.as_deref()), (404, Some("BadPath")));
    let response = cluster.request(http::Method::GET, &path, vec![auth.clone(), topic.clone()]).await;
    assert_eq!((response.status, response.reason.as_deref()), (405, Some("MethodNotAllowed")));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_tokens_answer_410_with_a_timestamp() {
    let cluster = TestCluster::start().await;
    let (mut device, token) = cluster.device().await;
    let push = || Push { apns_id: Some(uuid()), ..cluster.push(&token, r#"{"n":1}"#) };
    assert_eq!(cluster.send(&push()).await.status, 200);

    // The device unregisters the app: later pushes are 410 Unregistered with the time it happened.
    let before = unix_millis();
    device.unregister(TOPIC).await.unwrap();
    let after = unix_millis();
    for channel in ["", ".voip"] {
        let mut p = push();
        p.topic = Some(format!("{TOPIC}{channel}"));
        if !channel.is_empty() {
            p.push_type = Some("voip".into());
        }
        let response = cluster.send(&p).await;
        assert_answer("unregistered", &p, &response, 410, Some("Unregistered"));
        let at = response.timestamp.expect("410 carries a timestamp");
        assert!((before..=after).contains(&at), "{at} is when the device unregistered ({before}..={after})");
    }
    // Registering again ends it: same token, pushes go through.
    assert_eq!(device.register(TOPIC).await.unwrap(), token);
    let p = push();
    assert_answer("registered again", &p, &cluster.send(&p).await, 200, None);

    // A retired token key: 410 ExpiredToken, timestamp = now.
    let node = cluster.node();
    let key = TokenKey::generate(TokenKeyId(99));
    node.control.propose(Command::RotateTokenKey { key, now_ms: unix_millis() }).await.unwrap();
    let old = cluster.node().control.current().token_keys.keys().copied().find(|id| id.0 != 99).unwrap();
    node.control.propose(Command::RetireTokenKey { id: old, now_ms: unix_millis() }).await.unwrap();
    // The gateway learns of the retirement from its next cluster view.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    let (p, response) = loop {
        let p = push();
        let response = cluster.send(&p).await;
        if response.status == 410 || tokio::time::Instant::now() > give_up {
            break (p, response);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_answer("retired key", &p, &response, 410, Some("ExpiredToken"));
    assert!(response.timestamp.is_some_and(|t| t >= after));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_auth_needs_no_jwt_and_is_bound_to_its_team_and_topics() {
    let cluster = TestCluster::start().await;
    let (mut device, token) = cluster.device().await;
    let out = tempfile::tempdir().unwrap();
    let (cert, key) = common::issue_cert_with_ctl(&cluster.pki(), "CERTTEAM01", &[TOPIC], out.path());
    let client = cert_client(&cluster, &cert, &key).await;

    let push = Push { authorization: None, apns_id: Some(uuid()), ..cluster.push(&token, r#"{"via":"cert"}"#) };
    assert_answer("certificate, no JWT", &push, &send_checked(&client, &push).await, 200, None);
    let n = tokio::time::timeout(Duration::from_secs(10), device.next_notification()).await.unwrap().unwrap();
    assert_eq!(n.payload, br#"{"via":"cert"}"#);
    // The certificate is the credential: an authorization header is not looked at.
    let garbage = Push { authorization: Some("bearer x.y.z".into()), apns_id: Some(uuid()), ..push.clone() };
    assert_answer("certificate, garbage JWT", &garbage, &send_checked(&client, &garbage).await, 200, None);
    // Its topics bind it.
    let other = Push { topic: Some("com.example.other".into()), apns_id: Some(uuid()), ..push.clone() };
    assert_answer(
        "certificate, other topic",
        &other,
        &send_checked(&client, &other).await,
        400,
        Some("TopicDisallowed"),
    );

    // From the provider CA but naming no team: every request is 403 BadCertificate.
    let (bare_cert, bare_key) = bare_provider_cert(&cluster.pki(), out.path());
    let bare = cert_client(&cluster, &bare_cert, &bare_key).await;
    let p = Push { apns_id: Some(uuid()), ..cluster.push(&token, "{}") };
    assert_answer("bare certificate", &p, &send_checked(&bare, &p).await, 403, Some("BadCertificate"));

    // From another provider CA: the TLS handshake refuses it; no HTTP answer at all.
    let foreign = tempfile::tempdir().unwrap();
    courier_core::pki::init(foreign.path(), &Default::default()).unwrap();
    let (foreign_cert, foreign_key) =
        common::issue_cert_with_ctl(&PkiDir::new(foreign.path()), "FOREIGN001", &[TOPIC], out.path());
    let refused = match ProviderClient::connect_with_certificate(
        cluster.gateway.provider_addr,
        "localhost",
        &cluster.pki().cluster_ca_cert(),
        &foreign_cert,
        &foreign_key,
    )
    .await
    {
        Err(_) => true,
        Ok(client) => client.push(&p).await.is_err(),
    };
    assert!(refused, "a certificate from another CA must not get an HTTP answer");
    cluster.shutdown().await;
}

/// A client certificate signed by the provider CA that does not say which team it is.
fn bare_provider_cert(pki: &PkiDir, out: &Path) -> (PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.provider_ca_key()).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.provider_ca_cert()).unwrap(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (out.join("bare.pem"), out.join("bare.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_status_follows_a_notification() {
    let cluster = TestCluster::start().await;
    let (mut online, online_token) = cluster.device().await;
    let (offline, offline_token) = cluster.device().await;
    offline.close().await.unwrap();
    let auth = || vec![("authorization".to_string(), format!("bearer {}", cluster.signer.sign()))];

    // Delivered, with the time the device acked it.
    let id = uuid();
    let push = Push { apns_id: Some(id.clone()), ..cluster.push(&online_token, r#"{"s":1}"#) };
    assert_eq!(cluster.send(&push).await.status, 200);
    online.next_notification().await.unwrap();
    // The client acks on the app's next call; flush it now.
    online.flush_acks().await.unwrap();
    eventually(Duration::from_secs(10), "the ack is recorded", || async {
        status_of(&cluster, &online_token, &id).await.1["state"] == "delivered"
    })
    .await;
    let (response, body) = status_of(&cluster, &online_token, &id).await;
    assert_eq!(response.apns_id.as_deref(), Some(id.as_str()));
    assert!(body["deliveredAt"].as_u64().unwrap() >= body["acceptedAt"].as_u64().unwrap());

    // Stored, then collapsed by a newer one with the same collapse id.
    let (first, second) = (uuid(), uuid());
    for id in [&first, &second] {
        let p =
            Push { apns_id: Some(id.clone()), collapse_id: Some("score".into()), ..cluster.push(&offline_token, "{}") };
        assert_eq!(cluster.send(&p).await.status, 200);
    }
    let (_, body) = status_of(&cluster, &offline_token, &first).await;
    assert_eq!((body["state"].as_str(), body["reason"].as_str()), (Some("dropped"), Some("collapsed")));
    assert_eq!(status_of(&cluster, &offline_token, &second).await.1["state"], "stored");

    // Expiration 0 and the device away: dropped as discarded.
    let discarded = uuid();
    let p =
        Push { apns_id: Some(discarded.clone()), expiration: Some("0".into()), ..cluster.push(&offline_token, "{}") };
    assert_eq!(cluster.send(&p).await.status, 200);
    let (_, body) = status_of(&cluster, &offline_token, &discarded).await;
    assert_eq!((body["state"].as_str(), body["reason"].as_str()), (Some("dropped"), Some("discarded")));

    // Expired: stored until its expiration passes unacked.
    let brief = uuid();
    // A few seconds ahead, so that it is still in the future when the node stores it on a slow machine.
    let soon = (unix_millis() / 1000 + 3).to_string();
    let p = Push { apns_id: Some(brief.clone()), expiration: Some(soon), ..cluster.push(&offline_token, "{}") };
    assert_eq!(cluster.send(&p).await.status, 200);
    eventually(Duration::from_secs(10), "the notification expires", || async {
        status_of(&cluster, &offline_token, &brief).await.1["state"] == "expired"
    })
    .await;

    // Unknown ids, malformed ids, and another token's notifications.
    let (response, _) = status_of(&cluster, &offline_token, &uuid()).await;
    assert_eq!((response.status, response.reason.as_deref()), (404, Some("UnknownNotification")));
    let (response, _) = status_of(&cluster, &online_token, &second).await;
    assert_eq!((response.status, response.reason.as_deref()), (404, Some("UnknownNotification")));
    let (response, _) = status_of(&cluster, &offline_token, "not-a-uuid").await;
    assert_eq!((response.status, response.reason.as_deref()), (400, Some("BadMessageId")));
    let response = cluster.request(http::Method::GET, &status_path(&offline_token, &second), Vec::new()).await;
    assert_eq!((response.status, response.reason.as_deref()), (403, Some("MissingProviderToken")));
    let response = cluster.request(http::Method::POST, &status_path(&offline_token, &second), auth()).await;
    assert_eq!((response.status, response.reason.as_deref()), (405, Some("MethodNotAllowed")));

    // A provider that may not push to the topic may not see it either.
    let out = tempfile::tempdir().unwrap();
    let (cert, key) = common::issue_cert_with_ctl(&cluster.pki(), "OTHERTEAM1", &["com.example.other"], out.path());
    let stranger = cert_client(&cluster, &cert, &key).await;
    let path = status_path(&offline_token, &second);
    let response = request_checked(&stranger, http::Method::GET, &path, Vec::new(), Vec::new()).await;
    assert_eq!((response.status, response.reason.as_deref()), (403, Some("Forbidden")));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_token_refresh_limits_answer_429() {
    let cluster = TestCluster::start_configured(
        |_| {},
        |gateway| {
            gateway.device_burst = 3;
            gateway.device_rate_per_sec = 0.01;
            gateway.team_burst = 8;
            gateway.team_rate_per_sec = 0.01;
            gateway.min_jwt_refresh_secs = 1200;
        },
    )
    .await;
    let (_device, token) = cluster.device().await;
    let jwt = format!("bearer {}", cluster.signer.sign());
    let push =
        |token: &str| Push { apns_id: Some(uuid()), authorization: Some(jwt.clone()), ..cluster.push(token, "{}") };

    // One device token: a burst of 3, then 429 TooManyRequests.
    for _ in 0..3 {
        let p = push(&token);
        assert_answer("within the device burst", &p, &cluster.send(&p).await, 200, None);
    }
    let p = push(&token);
    assert_answer("device flooded", &p, &cluster.send(&p).await, 429, Some("TooManyRequests"));

    // The team: 8 pushes in all (the device's 4 count), then 429 whatever the device.
    let keyring = courier_core::token::Keyring::default();
    keyring.replace_with_states(cluster.node().control.current().token_keys.values().map(|r| (r.key.clone(), r.state)));
    let mut answers = Vec::new();
    for i in 0..5u128 {
        let p = push(&keyring.mint(courier_core::ids::DeviceId(1000 + i), TOPIC).unwrap());
        answers.push(cluster.send(&p).await.status);
    }
    assert_eq!(answers, [200, 200, 200, 200, 429]);

    // A new JWT sooner than the refresh interval: 429 TooManyProviderTokenUpdates; the old one still works.
    let newer = format!("bearer {}", cluster.signer.sign_at((unix_millis() / 1000) as i64 - 30));
    let p = Push { authorization: Some(newer), ..push(&token) };
    assert_answer("token refreshed too soon", &p, &cluster.send(&p).await, 429, Some("TooManyProviderTokenUpdates"));

    let metrics = common::http_get(&format!("http://{}/metrics", cluster.gateway.metrics_addr)).await;
    assert!(metrics.contains("courier_gateway_rate_limited_total{scope=\"device\"}"), "{metrics}");
    assert!(metrics.contains("courier_gateway_rate_limited_total{scope=\"team\"}"), "{metrics}");
    cluster.shutdown().await;
}

/// The only test in this binary whose pushes are retried, so the process-wide retry counter is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_failures_are_500_and_503() {
    let cluster = TestCluster::start_configured(|_| {}, |gateway| gateway.request_timeout_ms = 5_000).await;
    let (_device, token) = cluster.device().await;

    // The node cannot store: 500 InternalServerError.
    cluster.node().store.close();
    let p = Push { apns_id: Some(uuid()), ..cluster.push(&token, "{}") };
    assert_answer("store closed", &p, &cluster.send(&p).await, 500, Some("InternalServerError"));

    // The owner is unreachable for the whole request timeout: 503 ServiceUnavailable.
    let TestCluster { mut node, gateway, provider, signer, dir, .. } = cluster;
    if let Some(node) = node.take() {
        node.shutdown().await;
    }
    let p = Push { apns_id: Some(uuid()), ..common::push_for(&signer, &token, "{}") };
    assert_answer("node down", &p, &send_checked(&provider, &p).await, 503, Some("ServiceUnavailable"));

    // The gateway starts shutting down while a push is retrying: 503 Shutdown at once.
    let retries = || async {
        let text = common::http_get(&format!("http://{}/metrics", gateway.metrics_addr)).await;
        common::metric_value(&text, "courier_gateway_forward_retries_total").unwrap_or(0.0)
    };
    let before = retries().await;
    let p = Push { apns_id: Some(uuid()), ..common::push_for(&signer, &token, "{}") };
    let in_flight = tokio::spawn({
        let (provider, p) = (provider.clone(), p.clone());
        async move { send_checked(&provider, &p).await }
    });
    eventually(Duration::from_secs(10), "the push is being retried", || async { retries().await > before }).await;
    gateway.shutdown().await;
    let response = tokio::time::timeout(Duration::from_secs(10), in_flight).await.unwrap().unwrap();
    assert_answer("shutting down", &p, &response, 503, Some("Shutdown"));
    drop(dir);
}

#[test]
fn the_openapi_document_lists_every_reason_under_its_status() {
    let operations = [
        ("/3/device/{deviceToken}", "post"),
        ("/v1/status/{deviceToken}/{apnsId}", "get"),
        ("/1/apps/{bundleId}/channels", "post"),
        ("/1/apps/{bundleId}/channels", "get"),
        ("/1/apps/{bundleId}/channels", "delete"),
        ("/1/apps/{bundleId}/all-channels", "get"),
        ("/4/broadcasts/apps/{bundleId}", "post"),
    ];
    for reason in Reason::ALL {
        let status = reason.status().as_u16();
        let documented = operations.iter().any(|(path, method)| {
            openapi::documented_reasons(path, method, status).contains(&reason.as_str().to_string())
        });
        assert!(documented, "{reason} ({status}) is not in gateway/openapi.yaml");
    }
    // And the checker itself refuses what the document does not say.
    assert!(std::panic::catch_unwind(|| openapi::check_response("POST", "/3/device/x", 418, Some("id"), b"")).is_err());
    assert!(
        std::panic::catch_unwind(|| openapi::check_response(
            "POST",
            "/3/device/x",
            400,
            Some("id"),
            br#"{"reason":"Nope"}"#
        ))
        .is_err()
    );
    assert!(std::panic::catch_unwind(|| openapi::check_response("POST", "/3/device/x", 200, None, b"")).is_err());
    assert!(
        std::panic::catch_unwind(|| openapi::check_response("POST", "/3/device/x", 200, Some("id"), b"{}")).is_err()
    );
    openapi::check_response("POST", "/3/device/x", 410, Some("id"), br#"{"reason":"Unregistered","timestamp":1}"#);
}

/// A JSON object of exactly `len` bytes.
fn padded(len: usize) -> Vec<u8> {
    let mut payload = br#"{"pad":""#.to_vec();
    payload.resize(len - 2, b'x');
    payload.extend_from_slice(b"\"}");
    payload
}
