//! Broadcasts when a node fails, with real `courier node` processes: a subscriber whose owner is SIGKILLed
//! keeps its subscription (the owner's copy on its successor) and gets the latest policy-1 broadcast through
//! its new owner without subscribing again; and a paused member makes broadcasts answer
//! 503 until the cluster marks it down, after which they go on without it and reach every other
//! subscriber.

use crate::ONE_AT_A_TIME;
use crate::common;

use std::time::Duration;

use common::channels::Channels;
use common::{ProcessCluster, eventually};
use courier_core::pki::PkiDir;

async fn next(link: &mut courier_device::DeviceLink) -> courier_device::Notification {
    tokio::time::timeout(Duration::from_secs(10), link.next_notification()).await.expect("in time").expect("up")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_owner_was_sigkilled_gets_the_latest_broadcast_through_the_new_owner() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let ProcessCluster { dir, mut nodes, gateway, signer, endpoints, .. } = ProcessCluster::start(&[], 10_000).await;
    let pki = PkiDir::new(dir.path());
    let channels = Channels::to(gateway.channels_addr, &pki, &signer).await;
    let sender = Channels::to(gateway.provider_addr, &pki, &signer).await;
    let channel = channels.create_ok(1, "LiveActivity").await;

    // A subscriber, linked to its owner, gets the first broadcast; then it goes offline.
    let (credentials, mut link, _) = common::registered_device(&endpoints[0]).await;
    link.subscribe(&channel, None).await.expect("subscribe");
    let first = sender.broadcast_ok(&channel, "liveactivity", r#"{"n":1}"#).await;
    assert_eq!(next(&mut link).await.apns_id, first);
    let owner_addr = link.node_addr.to_string();
    link.close().await.expect("close");

    // Its owner is SIGKILLed and marked down; a broadcast sent now goes to the two others.
    let victim = nodes.iter().position(|n| n.device_addr == owner_addr).expect("the owner is one of the nodes");
    let victim_id = nodes[victim].id;
    nodes[victim].child.start_kill().expect("SIGKILL");
    eventually(Duration::from_secs(30), "the gateway sees the owner down", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(view.is_some_and(|v| !v.ring.members().contains(&victim_id)))
    })
    .await;
    let latest = sender.broadcast_ok(&channel, "liveactivity", r#"{"n":2}"#).await;

    // Linking again (through a node still up), the device reaches its new owner, which holds the copy of its
    // subscription and kept the broadcast: the device gets it without subscribing again, then later ones.
    let alive = endpoints.iter().find(|e| e.addr.to_string() != owner_addr).expect("a live node");
    let mut link = common::link_again(alive, &credentials, 5).await;
    assert_ne!(link.node_addr.to_string(), owner_addr, "a new owner");
    let n = next(&mut link).await;
    assert_eq!((n.apns_id.as_str(), n.payload.as_slice()), (latest.as_str(), br#"{"n":2}"#.as_slice()));
    let live = sender.broadcast_ok(&channel, "liveactivity", r#"{"n":3}"#).await;
    assert_eq!(next(&mut link).await.apns_id, live, "the restored subscription is live");
    // Subscribing again, as `Device::with_channel` does, sends nothing this link already handed.
    link.subscribe(&channel, Some(&first)).await.expect("subscribe on the new owner");
    assert!(link.sync().await.expect("sync").is_empty(), "once");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_member_makes_broadcasts_503_until_it_is_marked_down() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let ProcessCluster { dir, nodes, gateway, signer, endpoints, .. } =
        ProcessCluster::start_with(&[], |config| config.request_timeout_ms = 1_000).await;
    let pki = PkiDir::new(dir.path());
    let channels = Channels::to(gateway.channels_addr, &pki, &signer).await;
    let sender = Channels::to(gateway.provider_addr, &pki, &signer).await;
    let channel = channels.create_ok(0, "LiveActivity").await;
    // Subscribers on every node.
    let mut links = Vec::new();
    while links.iter().map(|l: &courier_device::DeviceLink| l.node_addr).collect::<std::collections::HashSet<_>>().len()
        < 3
    {
        assert!(links.len() < 60, "devices spread over the three nodes");
        let (_, mut link, _) = common::registered_device(&endpoints[0]).await;
        link.subscribe(&channel, None).await.expect("subscribe");
        links.push(link);
    }
    let leader = gateway.view.borrow().as_ref().expect("a view").leader;
    let paused = nodes.iter().find(|n| n.id != leader).expect("a follower");
    common::signal(paused, "-STOP");
    let during = sender.broadcast(&channel, "liveactivity", &[], r#"{"n":1}"#).await;
    common::channels::assert_reason("a member does not answer", &during, 503, "ServiceUnavailable");
    eventually(Duration::from_secs(30), "the paused member is marked down", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(view.is_some_and(|v| !v.ring.members().contains(&paused.id)))
    })
    .await;
    let unique = sender.broadcast_ok(&channel, "liveactivity", r#"{"n":2}"#).await;
    let paused_addr = paused.device_addr.clone();
    // The members that answered delivered the first one although the provider heard 503 (as with APNs, a
    // failed broadcast may have reached some subscribers); every subscriber of a live member gets the second.
    for link in links.iter_mut().filter(|l| l.node_addr.to_string() != paused_addr) {
        let mut got = Vec::new();
        while !got.contains(&unique) {
            let n = tokio::time::timeout(Duration::from_secs(10), link.next_notification()).await;
            got.push(n.expect("the second broadcast arrives in time").expect("up").apns_id);
        }
        assert!(got.len() <= 2, "the 503 one at most once, then the second: {got:?}");
    }
    common::signal(paused, "-CONT");
    gateway.shutdown().await;
}
