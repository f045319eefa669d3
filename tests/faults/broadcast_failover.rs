//! A broadcast channel's subscriber whose owner node is SIGKILLed: real `courier node` processes, the
//! device offline when the owner dies, a policy-1 broadcast sent while it is gone. Linking again, the
//! device lands on the new owner, subscribes, and gets the latest broadcast from that node's kept copy.

use crate::ONE_AT_A_TIME;
use crate::common;

use std::time::Duration;

use common::channels::Channels;
use common::{ProcessCluster, eventually};
use courier_core::pki::PkiDir;

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
    let n =
        tokio::time::timeout(Duration::from_secs(10), link.next_notification()).await.expect("in time").expect("up");
    assert_eq!(n.apns_id, first);
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

    // Linking again (through a node still up), the device reaches its new owner, which kept the broadcast.
    let alive = endpoints.iter().find(|e| e.addr.to_string() != owner_addr).expect("a live node");
    let mut link = common::link_again(alive, &credentials, 5).await;
    assert_ne!(link.node_addr.to_string(), owner_addr, "a new owner");
    link.subscribe(&channel, Some(&first)).await.expect("subscribe on the new owner");
    let n =
        tokio::time::timeout(Duration::from_secs(10), link.next_notification()).await.expect("in time").expect("up");
    assert_eq!((n.apns_id.as_str(), n.payload.as_slice()), (latest.as_str(), br#"{"n":2}"#.as_slice()));
    assert!(link.sync().await.expect("sync").is_empty(), "once");
    gateway.shutdown().await;
}
