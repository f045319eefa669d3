//! Broadcast push over real HTTP/2 to real device links: policy 0 (only linked subscribers), policy 1 (the
//! latest broadcast kept for later subscribers, once), subscribing and unsubscribing, every reason a send
//! and a subscription can be refused with, and a channel deleted while devices subscribe to it.

use crate::common;

use std::time::Duration;

use common::channels::{Channels, assert_reason, broadcaster};
use common::{TestCluster, registered_device};
use courier_device::{ClientError, DeviceLink};
use courier_proto::device::ChannelRefusal;

/// The next notification on `link` within a few seconds.
async fn next(link: &mut DeviceLink) -> courier_device::Notification {
    tokio::time::timeout(Duration::from_secs(10), link.next_notification())
        .await
        .expect("a broadcast arrives in time")
        .expect("the link stays up")
}

/// Everything that reaches `link` before a ping's answer: nothing more is on its way.
async fn nothing_more(link: &mut DeviceLink, what: &str) {
    let arrived = link.sync().await.expect("sync");
    assert!(arrived.is_empty(), "{what}: {arrived:?}");
}

fn refusal(error: ClientError) -> ChannelRefusal {
    match error {
        ClientError::ChannelRefused { reason, .. } => reason,
        other => panic!("expected a refused subscription, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_reach_subscribers_and_a_kept_one_reaches_later_subscribers_once() {
    let cluster = TestCluster::start().await;
    let channels = Channels::connect(&cluster).await;
    let sender = broadcaster(&cluster).await;
    let live = channels.create_ok(0, "LiveActivity").await;
    let kept = channels.create_ok(1, "LiveActivity").await;

    let (_, mut early, _) = registered_device(&cluster.endpoint()).await;
    assert_eq!(early.subscribe(&live, None).await.expect("subscribe"), "com.example.app");
    early.subscribe(&kept, None).await.expect("subscribe");

    // Policy 0: the linked subscriber gets it, with the channel, the app as topic and the unique id.
    let request_id = "6A0F4C1E-0B9D-4C5E-8F7A-3B2C1D0E9F8A";
    let sent = sender
        .broadcast(&live, "liveactivity", &[("apns-request-id", request_id), ("apns-priority", "5")], r#"{"n":1}"#)
        .await;
    assert_eq!(sent.status, 200, "{sent:?}");
    let unique = sent.header("apns-unique-id").expect("apns-unique-id").to_string();
    let n = next(&mut early).await;
    assert_eq!(
        (n.apns_id.as_str(), n.channel_id.as_str(), n.topic.as_str()),
        (unique.as_str(), live.as_str(), "com.example.app")
    );
    assert_eq!((n.payload.as_slice(), n.priority, n.push_type.as_str()), (br#"{"n":1}"#.as_slice(), 5, "liveactivity"));
    assert_eq!(n.expiration, 0, "a policy-0 broadcast is never kept");

    // Policy 1: the linked subscriber gets it at once.
    let first = sender.broadcast_ok(&kept, "liveactivity", r#"{"n":2}"#).await;
    assert_eq!(next(&mut early).await.apns_id, first);
    let second = sender.broadcast_ok(&kept, "liveactivity", r#"{"n":3}"#).await;
    assert_eq!(next(&mut early).await.apns_id, second);
    nothing_more(&mut early, "each broadcast arrives once").await;

    // A device that subscribes later: nothing from the policy-0 channel, the latest kept broadcast (only
    // the latest) from the policy-1 one, and nothing again once it says it has seen it.
    let (credentials, mut late, _) = registered_device(&cluster.endpoint()).await;
    late.subscribe(&live, None).await.expect("subscribe");
    nothing_more(&mut late, "policy 0 keeps nothing").await;
    late.subscribe(&kept, None).await.expect("subscribe");
    let n = next(&mut late).await;
    assert_eq!((n.apns_id.as_str(), n.payload.as_slice()), (second.as_str(), br#"{"n":3}"#.as_slice()));
    assert!(n.expiration > 0, "a kept broadcast says until when");
    nothing_more(&mut late, "only the latest is kept").await;
    late.close().await.expect("close");
    let mut again = common::link_again(&cluster.endpoint(), &credentials, 3).await;
    again.subscribe(&kept, Some(&second)).await.expect("subscribe");
    nothing_more(&mut again, "a kept broadcast the device has seen is not sent again").await;
    again.subscribe(&kept, Some(&first)).await.expect("subscribe again, having seen an older one");
    assert_eq!(next(&mut again).await.apns_id, second);

    // Unsubscribed, a device gets no more; broadcasts were never acked, so none is redelivered.
    early.unsubscribe(&live).await.expect("unsubscribe");
    sender.broadcast_ok(&live, "liveactivity", r#"{"n":4}"#).await;
    nothing_more(&mut early, "an unsubscribed channel").await;
    let metrics = cluster.metrics().await;
    assert!(common::metric_value(&metrics, "courier_node_broadcasts_total").unwrap_or(0.0) >= 4.0, "counted");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broadcast_and_subscription_refusal() {
    let cluster = TestCluster::start().await;
    let channels = Channels::connect(&cluster).await;
    let sender = broadcaster(&cluster).await;
    let live = channels.create_ok(0, "LiveActivity").await;
    let kept = channels.create_ok(1, "LiveActivity").await;
    let alerts = channels.create_ok(1, "alert").await;
    let unknown = courier_core::channel::ChannelId::random().to_string();
    let body = r#"{"aps":{}}"#;

    let missing =
        sender.call(http::Method::POST, common::channels::BROADCAST, &[("apns-push-type", "liveactivity")], body).await;
    assert_reason("no channel id", &missing, 400, "MissingChannelId");
    assert_reason("bad channel id", &sender.broadcast("abc", "liveactivity", &[], body).await, 400, "BadChannelId");
    assert_reason("unknown", &sender.broadcast(&unknown, "liveactivity", &[], body).await, 400, "ChannelNotRegistered");
    let no_type =
        sender.call(http::Method::POST, common::channels::BROADCAST, &[("apns-channel-id", &live)], body).await;
    assert_reason("no push type", &no_type, 400, "MissingPushType");
    assert_reason("other push type", &sender.broadcast(&live, "alert", &[], body).await, 400, "InvalidPushType");
    assert_reason(
        "alert on a live activity channel",
        &sender.broadcast(&alerts, "liveactivity", &[], body).await,
        400,
        "InvalidPushType",
    );
    let later = (courier_core::ids::unix_millis() / 1000 + 60).to_string();
    let expiring = sender.broadcast(&live, "liveactivity", &[("apns-expiration", &later)], body).await;
    assert_reason("expiration on policy 0", &expiring, 400, "BadExpirationDate");
    assert_eq!(sender.broadcast(&kept, "liveactivity", &[("apns-expiration", &later)], body).await.status, 200);
    let past = sender.broadcast(&kept, "liveactivity", &[("apns-expiration", "1")], body).await;
    assert_reason("an expiration already past", &past, 400, "BadExpirationDate");
    let priority = sender.broadcast(&live, "liveactivity", &[("apns-priority", "7")], body).await;
    assert_reason("priority 7", &priority, 400, "BadPriority");
    assert_reason("empty", &sender.broadcast(&live, "liveactivity", &[], "").await, 400, "PayloadEmpty");
    assert_reason("not an object", &sender.broadcast(&live, "liveactivity", &[], "[1]").await, 400, "InvalidPayload");
    let large = format!(r#"{{"pad":"{}"}}"#, "x".repeat(5200));
    assert_reason("5 KB", &sender.broadcast(&live, "liveactivity", &[], &large).await, 413, "PayloadTooLarge");
    let fits = format!(r#"{{"pad":"{}"}}"#, "x".repeat(5100));
    assert_eq!(sender.broadcast(&live, "liveactivity", &[], &fits).await.status, 200, "5,120 bytes are allowed");
    let path = "/4/broadcasts/apps/com.example.app/x";
    assert_reason("path", &sender.call(http::Method::POST, path, &[], body).await, 404, "BadPath");
    let get = sender.call(http::Method::GET, common::channels::BROADCAST, &[], "").await;
    assert_reason("GET", &get, 405, "MethodNotAllowed");
    let twice = sender.broadcast(&live, "liveactivity", &[("apns-channel-id", &live)], body).await;
    assert_reason("two channel ids", &twice, 400, "DuplicateHeaders");
    let other_app = sender
        .call(
            http::Method::POST,
            "/4/broadcasts/apps/com.example.other",
            &[("apns-channel-id", &live), ("apns-push-type", "liveactivity")],
            body,
        )
        .await;
    assert_reason("the channel of another app", &other_app, 400, "ChannelNotRegistered");
    let anonymous = Channels { authorization: None, ..broadcaster(&cluster).await };
    assert_reason("no JWT", &anonymous.broadcast(&live, "liveactivity", &[], body).await, 403, "MissingProviderToken");

    // Subscriptions refused, the link staying up.
    let (_, mut device, _) = registered_device(&cluster.endpoint()).await;
    assert_eq!(refusal(device.subscribe("not base64", None).await.unwrap_err()), ChannelRefusal::BadChannelId);
    assert_eq!(refusal(device.subscribe(&unknown, None).await.unwrap_err()), ChannelRefusal::UnknownChannel);
    device.subscribe(&live, None).await.expect("the link is still up and subscribes");

    // A channel deleted while a device subscribes: sends are refused, and subscribing again too.
    assert_eq!(channels.delete(&live).await.status, 204);
    assert_reason("deleted", &sender.broadcast(&live, "liveactivity", &[], body).await, 400, "ChannelNotRegistered");
    nothing_more(&mut device, "nothing from a deleted channel").await;
    assert_eq!(refusal(device.subscribe(&live, None).await.unwrap_err()), ChannelRefusal::UnknownChannel);

    // An operator keeps the team from broadcast channels, then allows it again.
    let team = cluster.signer.team_id().to_string();
    let ctl = |enable: bool| {
        let (addr, dir, team) = (cluster.node().cluster_addr, cluster.pki().dir, team.clone());
        async move {
            let mut args = vec!["providers", "broadcast", "--team-id", team.as_str()];
            if !enable {
                args.push("--disable");
            }
            let run = common::ctl(addr, &dir, &args).await;
            assert!(run.success, "{run:?}");
        }
    };
    ctl(false).await;
    common::eventually(Duration::from_secs(10), "the gateway hears the team is kept from broadcast", || async {
        sender.broadcast(&kept, "liveactivity", &[], body).await.reason.as_deref() == Some("FeatureNotEnabled")
    })
    .await;
    assert_reason(
        "create",
        &channels.create(r#"{"message-storage-policy": 0, "push-type": "LiveActivity"}"#).await,
        400,
        "FeatureNotEnabled",
    );
    assert_reason(
        "list",
        &channels.call(http::Method::GET, common::channels::ALL_CHANNELS, &[], "").await,
        400,
        "FeatureNotEnabled",
    );
    ctl(true).await;
    common::eventually(Duration::from_secs(10), "allowed again", || async {
        sender.broadcast(&kept, "liveactivity", &[], body).await.status == 200
    })
    .await;

    // At most 64 channels per link.
    for _ in 0..63 {
        let id = channels.create_ok(0, "LiveActivity").await;
        device.subscribe(&id, None).await.expect("within the link's limit");
    }
    assert_eq!(refusal(device.subscribe(&kept, None).await.unwrap_err()), ChannelRefusal::TooManyChannels);
    cluster.shutdown().await;
}
