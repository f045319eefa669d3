//! Bad input is refused with the right reason, and never harms anyone else: every provider error comes
//! from a real HTTP/2 request, every device-link error from a real TLS connection, while a healthy device
//! on the same node keeps receiving.

use crate::common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::{TOPIC, TestCluster, read_goodbye};
use courier_device::DeviceLink;
use courier_device::codec::FrameCodec;
use courier_gateway::provider::Push;
use courier_proto::device::{DeviceFrame, GoodbyeReason, Hello, device_frame};
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Framed;

/// Proves the healthy device still gets pushes.
async fn still_delivers(cluster: &TestCluster, link: &mut DeviceLink, token: &str, tag: &str) {
    let response = cluster.send(&cluster.push(token, &format!(r#"{{"after":"{tag}"}}"#))).await;
    assert_eq!(response.status, 200, "after {tag}: {response:?}");
    let n = tokio::time::timeout(Duration::from_secs(10), link.next_notification())
        .await
        .unwrap_or_else(|_| panic!("healthy device starved after {tag}"))
        .unwrap();
    assert_eq!(n.payload, format!(r#"{{"after":"{tag}"}}"#).into_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_carry_apns_reasons_and_reach_no_device() {
    let cluster = TestCluster::start().await;
    let (mut healthy, token) = cluster.device().await;
    let good = || cluster.push(&token, r#"{"aps":{"alert":"hi"}}"#);

    let mut flipped = token.clone().into_bytes();
    flipped[40] = if flipped[40] == b'0' { b'1' } else { b'0' };
    let forged = String::from_utf8(flipped).unwrap();

    let two_hours_ago = (courier_core::ids::unix_millis() / 1000) as i64 - 7200;
    let old_jwt = format!("bearer {}", cluster.signer.sign_at(two_hours_ago));
    let stranger = tempfile::tempdir().unwrap();
    courier_core::pki::init(stranger.path(), &Default::default()).unwrap();
    let stranger_signer =
        courier_gateway::provider::JwtSigner::from_pki(&courier_core::pki::PkiDir::new(stranger.path())).unwrap();
    let stranger_jwt = format!("bearer {}", stranger_signer.sign());
    let other_topic = Some("com.example.other".to_string());

    let cases: Vec<(&str, Push, u16, &str)> = vec![
        ("malformed token", Push { token: "abc".into(), ..good() }, 400, "BadDeviceToken"),
        ("forged token", Push { token: forged, ..good() }, 400, "BadDeviceToken"),
        ("another topic", Push { topic: other_topic, ..good() }, 400, "DeviceTokenNotForTopic"),
        ("no topic", Push { topic: None, ..good() }, 400, "MissingTopic"),
        ("4097-byte payload", Push { payload: vec![b' '; 4097], ..good() }, 413, "PayloadTooLarge"),
        ("empty payload", Push { payload: Vec::new(), ..good() }, 400, "PayloadEmpty"),
        ("no authorization", Push { authorization: None, ..good() }, 403, "MissingProviderToken"),
        ("garbage JWT", Push { authorization: Some("bearer not.a.jwt".into()), ..good() }, 403, "InvalidProviderToken"),
        ("old JWT", Push { authorization: Some(old_jwt), ..good() }, 403, "ExpiredProviderToken"),
        ("unknown signing key", Push { authorization: Some(stranger_jwt), ..good() }, 403, "InvalidProviderToken"),
        ("bad apns-id", Push { apns_id: Some("not-a-uuid".into()), ..good() }, 400, "BadMessageId"),
        ("bad priority", Push { priority: Some("7".into()), ..good() }, 400, "BadPriority"),
        ("bad expiration", Push { expiration: Some("soon".into()), ..good() }, 400, "BadExpirationDate"),
        ("long collapse id", Push { collapse_id: Some("c".repeat(65)), ..good() }, 400, "BadCollapseId"),
    ];

    for (what, push, status, reason) in cases {
        let apns_id = push.apns_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let push = Push { apns_id: Some(apns_id.clone()), ..push };
        let response = cluster.send(&push).await;
        assert_eq!((response.status, response.reason.as_deref()), (status, Some(reason)), "{what}: {response:?}");
        assert_eq!(response.apns_id.as_deref(), Some(apns_id.as_str()), "{what}: apns-id echoed on errors");
        let body: serde_json::Value = serde_json::from_slice(&response.body).expect("JSON error body");
        assert_eq!(body["reason"], reason, "{what}");
    }

    let auth = vec![("authorization".to_string(), format!("bearer {}", cluster.signer.sign()))];
    let response =
        cluster.provider.request(http::Method::POST, "/3/nothing", auth.clone(), b"{}".to_vec()).await.unwrap();
    assert_eq!((response.status, response.reason.as_deref()), (404, Some("BadPath")));
    let path = format!("/3/device/{token}");
    let response = cluster.provider.request(http::Method::GET, &path, auth.clone(), Vec::new()).await.unwrap();
    assert_eq!((response.status, response.reason.as_deref()), (405, Some("MethodNotAllowed")));

    // None of the refused pushes reached the device: the next thing it sees is the healthy push.
    assert!(healthy.sync().await.unwrap().is_empty(), "a refused push was delivered");
    still_delivers(&cluster, &mut healthy, &token, "provider errors").await;
    let metrics = common::http_get(&format!("http://{}/metrics", cluster.gateway.metrics_addr)).await;
    assert!(metrics.contains("reason=\"BadDeviceToken\""), "{metrics}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_device_links_are_closed_and_harm_no_other_link() {
    let cluster = TestCluster::start().await;
    let (mut healthy, token) = cluster.device().await;
    let endpoint = cluster.endpoint();

    // No client certificate: anything but Activate is refused with NOT_ACTIVATED.
    let tls = common::raw_link(&endpoint, None).await.unwrap();
    let mut link: common::RawLink = Framed::new(tls, FrameCodec::new(1 << 16));
    let hello = DeviceFrame {
        kind: Some(device_frame::Kind::Hello(Hello { keepalive_secs: 30, client: "t".into(), held_tokens: vec![] })),
    };
    link.send(hello).await.unwrap();
    assert_eq!(read_goodbye(&mut link).await, Some(GoodbyeReason::NotActivated));
    still_delivers(&cluster, &mut healthy, &token, "no certificate").await;

    // A certificate from a device CA the cluster does not trust: the handshake fails.
    let foreign = tempfile::tempdir().unwrap();
    let stranger = common::foreign_credentials(foreign.path());
    let refused = match common::raw_link(&endpoint, Some(&stranger)).await {
        Err(_) => true,
        Ok(mut tls) => {
            let mut byte = [0u8; 1];
            // The server's rejection of the certificate arrives as an alert on the first read.
            !matches!(tls.read(&mut byte).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "a certificate from another CA must not open a link");
    assert!(DeviceLink::connect(&endpoint, &stranger, 0).await.is_err());
    still_delivers(&cluster, &mut healthy, &token, "foreign certificate").await;

    // Garbage bytes from an authenticated device: closed with MALFORMED_FRAME.
    let credentials = cluster.activate().await;
    let mut tls = common::raw_link(&endpoint, Some(&credentials)).await.unwrap();
    tls.write_all(&[0, 0, 0, 6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let mut link: common::RawLink = Framed::new(tls, FrameCodec::new(1 << 16));
    assert_eq!(read_goodbye(&mut link).await, Some(GoodbyeReason::MalformedFrame));
    still_delivers(&cluster, &mut healthy, &token, "garbage bytes").await;

    // A 1 MiB frame: refused from its length prefix, closed with FRAME_TOO_LARGE.
    let mut tls = common::raw_link(&endpoint, Some(&credentials)).await.unwrap();
    let mut frame = BytesMut::with_capacity(4 + (1 << 20));
    frame.put_u32(1 << 20);
    frame.put_bytes(0x0a, 1 << 20);
    // The node may close before reading it all; a failed write is part of being refused.
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.write_all(&frame)).await;
    let mut link: common::RawLink = Framed::new(tls, FrameCodec::new(1 << 16));
    assert_eq!(read_goodbye(&mut link).await, Some(GoodbyeReason::FrameTooLarge));
    still_delivers(&cluster, &mut healthy, &token, "1 MiB frame").await;

    // A frame that is valid protobuf but not valid here: RegisterTopic before Hello.
    let tls = common::raw_link(&endpoint, Some(&credentials)).await.unwrap();
    let mut link: common::RawLink = Framed::new(tls, FrameCodec::new(1 << 16));
    let register = DeviceFrame {
        kind: Some(device_frame::Kind::RegisterTopic(courier_proto::device::RegisterTopic { topic: TOPIC.into() })),
    };
    link.send(register).await.unwrap();
    assert_eq!(read_goodbye(&mut link).await, Some(GoodbyeReason::ProtocolViolation));

    // An invalid topic name.
    let mut bad_topic = DeviceLink::connect(&endpoint, &credentials, 0).await.unwrap();
    let error = bad_topic.register("has spaces").await.unwrap_err();
    assert!(matches!(error, courier_device::ClientError::Goodbye { reason: GoodbyeReason::BadTopic, .. }), "{error}");
    still_delivers(&cluster, &mut healthy, &token, "protocol violations").await;

    let metrics = cluster.metrics().await;
    assert!(metrics.contains("reason=\"FRAME_TOO_LARGE\""), "{metrics}");
    assert!(metrics.contains("reason=\"MALFORMED_FRAME\""), "{metrics}");
    cluster.shutdown().await;
}
