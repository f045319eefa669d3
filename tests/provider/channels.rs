//! APNs channel management (broadcast channels) over real HTTP/2 on the gateway's channels port, in front
//! of real nodes: every call and every reason, with `apns-request-id` echoed and every answer checked
//! against `gateway/openapi.yaml`; channels kept per team; the per-app limit; channels surviving a node
//! restart; and a channel created through one node's gateway read through another's.

use crate::common;

use std::time::Duration;

use common::channels::{ALL_CHANNELS, CHANNELS, Channels, assert_reason};
use common::{TestCluster, eventually};
use courier_core::channel::ChannelId;
use courier_gateway::provider::ProviderClient;
use http::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_created_read_listed_and_deleted() {
    let cluster = TestCluster::start().await;
    let channels = Channels::connect(&cluster).await;
    assert!(channels.list().await.is_empty());

    let request_id = "0C9A1B8E-4D56-4F0A-9E4E-1B2C3D4E5F60";
    let body = r#"{"message-storage-policy": 1, "push-type": "LiveActivity"}"#;
    let created = channels.call(Method::POST, CHANNELS, &[("apns-request-id", request_id)], body).await;
    assert_eq!(created.status, 201, "{created:?}");
    let first = created.header("apns-channel-id").expect("id").to_string();
    // Read at once, on the same gateway: the answer waited for this gateway's copy of the book.
    let read = channels.read(&first).await;
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(read.header("apns-channel-id"), Some(first.as_str()));
    let settings: serde_json::Value = serde_json::from_slice(&read.body).expect("JSON");
    assert_eq!(settings, serde_json::json!({"message-storage-policy": 1, "push-type": "LiveActivity"}));

    // The Courier extension: an alert channel; push types are case-insensitive.
    let second = channels.create_ok(0, "alert").await;
    assert_ne!(first, second, "ids are chosen at random");
    let settings: serde_json::Value = serde_json::from_slice(&channels.read(&second).await.body).expect("JSON");
    assert_eq!(settings, serde_json::json!({"message-storage-policy": 0, "push-type": "Alert"}));
    assert_eq!(channels.list().await, [first.clone(), second.clone()], "oldest first");

    let deleted = channels.delete(&first).await;
    assert_eq!((deleted.status, deleted.body.len()), (204, 0), "{deleted:?}");
    assert_reason("read after delete", &channels.read(&first).await, 400, "ChannelNotRegistered");
    assert_reason("delete twice", &channels.delete(&first).await, 400, "ChannelNotRegistered");
    assert_eq!(channels.list().await, [second.as_str()]);

    // The book is in the Raft state: it survives the node's restart, and the gateway hears it again.
    let mut cluster = cluster;
    cluster.stop_node().await;
    cluster.start_node().await;
    let third = channels.create_ok(1, "LiveActivity").await;
    assert_eq!(channels.list().await, [second, third]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_channel_reason_is_answered() {
    let cluster = TestCluster::start_with(|node| node.max_channels_per_app = 2).await;
    let channels = Channels::connect(&cluster).await;
    let id = channels.create_ok(0, "LiveActivity").await;
    let unknown = ChannelId::random().to_string();

    // Paths and methods.
    assert_reason("other path", &channels.call(Method::GET, "/3/device/00", &[], "").await, 404, "BadPath");
    assert_reason("other path", &channels.call(Method::GET, "/1/apps/x/channel", &[], "").await, 404, "BadPath");
    let put = channels.call(Method::PUT, CHANNELS, &[], "").await;
    assert_reason("PUT", &put, 405, "MethodNotAllowed");
    let post_all = channels.call(Method::POST, ALL_CHANNELS, &[], "{}").await;
    assert_reason("POST all-channels", &post_all, 405, "MethodNotAllowed");
    let no_bundle = channels.call(Method::GET, "/1/apps//all-channels", &[], "").await;
    assert_reason("no bundle", &no_bundle, 400, "BadTopic");
    let bad_request_id = channels.call(Method::GET, ALL_CHANNELS, &[("apns-request-id", "abc")], "").await;
    assert_reason("apns-request-id not a UUID", &bad_request_id, 400, "BadMessageId");

    // The channel id header.
    let missing = channels.call(Method::GET, CHANNELS, &[], "").await;
    assert_reason("no apns-channel-id", &missing, 400, "MissingChannelId");
    let missing = channels.call(Method::DELETE, CHANNELS, &[], "").await;
    assert_reason("delete without apns-channel-id", &missing, 400, "MissingChannelId");
    assert_reason("not base64", &channels.read("not an id!").await, 400, "BadChannelId");
    assert_reason("too short", &channels.read("AAAA").await, 400, "BadChannelId");
    assert_reason("unknown", &channels.read(&unknown).await, 400, "ChannelNotRegistered");
    assert_reason("delete unknown", &channels.delete(&unknown).await, 400, "ChannelNotRegistered");
    let twice = channels.call(Method::GET, CHANNELS, &[("apns-channel-id", &id), ("apns-channel-id", &id)], "").await;
    assert_reason("two ids", &twice, 400, "DuplicateHeaders");

    // Create bodies.
    assert_reason("not JSON", &channels.create("policy 1").await, 400, "BadRequestPayload");
    assert_reason("empty", &channels.create("").await, 400, "BadRequestPayload");
    let no_type = channels.create(r#"{"message-storage-policy": 1}"#).await;
    assert_reason("no push type", &no_type, 400, "MissingPushType");
    let voip = channels.create(r#"{"message-storage-policy": 1, "push-type": "voip"}"#).await;
    assert_reason("voip channel", &voip, 400, "InvalidPushType");
    let policy = channels.create(r#"{"message-storage-policy": 2, "push-type": "LiveActivity"}"#).await;
    assert_reason("policy 2", &policy, 400, "BadRequestParams");
    let too_large = channels.create(&format!(r#"{{"pad": "{}"}}"#, "x".repeat(5000))).await;
    assert_reason("5 KB body", &too_large, 413, "PayloadTooLarge");

    // The per-app limit (2 here): the second channel fits, the third does not, and a delete frees a place.
    let second = channels.create_ok(1, "LiveActivity").await;
    let third = channels.create(r#"{"message-storage-policy": 1, "push-type": "LiveActivity"}"#).await;
    assert_reason("over the per-app limit", &third, 400, "CannotCreateChannelConfig");
    assert_eq!(channels.delete(&second).await.status, 204);
    channels.create_ok(1, "LiveActivity").await;

    // Authentication, as on the provider port.
    let anonymous = Channels { authorization: None, ..Channels::connect(&cluster).await };
    assert_reason("no JWT", &anonymous.call(Method::GET, ALL_CHANNELS, &[], "").await, 403, "MissingProviderToken");
    let forged = Channels { authorization: Some("bearer x.y.z".into()), ..Channels::connect(&cluster).await };
    assert_reason("bad JWT", &forged.call(Method::GET, ALL_CHANNELS, &[], "").await, 403, "InvalidProviderToken");

    // Another team, allowed only another app: the app is not its own, and the first team's channels are
    // invisible to it even where it may look.
    let out = tempfile::tempdir().expect("tempdir");
    let (cert, key) = common::issue_cert_with_ctl(&cluster.pki(), "OTHERTEAM1", &["com.example.other"], out.path());
    let client = ProviderClient::connect_with_certificate(
        cluster.gateway.channels_addr,
        "localhost",
        &cluster.pki().cluster_ca_cert(),
        &cert,
        &key,
    )
    .await
    .expect("a provider certificate connects");
    let other = Channels { client, authorization: None };
    assert_reason("another team's app", &other.read(&id).await, 403, "TopicMismatch");
    assert_reason("another team's app", &other.call(Method::GET, ALL_CHANNELS, &[], "").await, 403, "TopicMismatch");
    let own = other.call(Method::GET, "/1/apps/com.example.other/all-channels", &[], "").await;
    assert_eq!((own.status, own.body.as_slice()), (200, br#"{"channels":[]}"#.as_slice()), "{own:?}");
    let elsewhere =
        other.call(Method::GET, "/1/apps/com.example.other/channels", &[("apns-channel-id", &id)], "").await;
    assert_reason("the id of another team's channel", &elsewhere, 400, "ChannelNotRegistered");
    let delete =
        other.call(Method::DELETE, "/1/apps/com.example.other/channels", &[("apns-channel-id", &id)], "").await;
    assert_reason("deleting another team's channel", &delete, 400, "ChannelNotRegistered");
    assert_eq!(channels.read(&id).await.status, 200, "still there for its own team");

    let metrics = common::http_get(&format!("http://{}/metrics", cluster.gateway.metrics_addr)).await;
    assert!(metrics.contains("courier_gateway_channel_requests_total"), "channel requests are counted");
    cluster.shutdown().await;
}

/// A channel created through the gateway of one node is read through another gateway that watches another
/// node: the change went through Raft to every member, and each gateway hears it from its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_reaches_every_member_and_gateway() {
    let nodes = common::Nodes::start(3, |_| {}).await;
    nodes.wait_all_ready().await;
    let gateway_to = |id: u64| {
        let addr = nodes.node(id).cluster_addr;
        nodes.gateway_with(move |config| config.node_addrs = vec![addr.to_string()])
    };
    let (first, _, signer) = gateway_to(1).await;
    let (third, _, _) = gateway_to(3).await;
    let through_first = Channels::to(first.channels_addr, &nodes.pki(), &signer).await;
    let through_third = Channels::to(third.channels_addr, &nodes.pki(), &signer).await;
    let id = through_first.create_ok(1, "LiveActivity").await;
    eventually(Duration::from_secs(10), "the other gateway has the channel", || async {
        through_third.read(&id).await.status == 200
    })
    .await;
    assert_eq!(through_third.list().await, [id.as_str()]);
    assert_eq!(through_third.delete(&id).await.status, 204);
    eventually(Duration::from_secs(10), "the first gateway hears of the delete", || async {
        through_first.read(&id).await.status == 400
    })
    .await;
    first.shutdown().await;
    third.shutdown().await;
    nodes.shutdown().await;
}
