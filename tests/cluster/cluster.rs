//! The control plane across nodes: elections, failure detection, restarts, snapshots and placement.
//! Every node is a real node on real sockets (in this process); Raft travels over mutual-TLS gRPC.

use crate::common;

use std::time::Duration;

use common::{Nodes, eventually, push_for};
use courier_core::ids::DeviceId;
use courier_core::state::{Command, MemberState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_is_elected_and_writes_continue() {
    let mut nodes = Nodes::start(3, |_| {}).await;
    let old_leader = nodes.leader().await;
    let epoch_before = nodes.node(old_leader).control.current().epoch;
    nodes.stop(old_leader).await;

    let new_leader = nodes.leader().await;
    assert_ne!(new_leader, old_leader);
    // A change a node makes itself (operator changes come from the admin certificate only), proposed on
    // the survivor that is not the leader, so it is forwarded too.
    let follower = nodes.running().map(|n| n.control.id).find(|id| *id != new_leader).unwrap();
    let suspicion =
        Command::SuspectClone { device: DeviceId(77), node: follower, addrs: vec![], refuse: false, now_ms: 1 };
    let applied =
        nodes.node(follower).control.apply(suspicion).await.expect("writes continue with two of three voters");
    assert!(applied > epoch_before);
    eventually(Duration::from_secs(10), "every survivor applied the write", || {
        std::future::ready(nodes.running().all(|n| n.control.current().suspected_clones.contains_key(&DeviceId(77))))
    })
    .await;
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_marked_down_routed_around_and_back_when_it_returns() {
    let mut nodes = Nodes::start(3, |_| {}).await;
    let (gateway, provider, signer) = nodes.gateway().await;
    let leader = nodes.leader().await;
    let victim = (1..=3).find(|id| *id != leader).unwrap();

    // A device owned by the victim, registered while it is up, offline from then on.
    let credentials = loop {
        let c = courier_device::activate(&nodes.endpoint(leader), "").await.unwrap();
        if nodes.node(leader).view.get().ring.owner(c.device_id) == Some(victim) {
            break c;
        }
    };
    let mut link = courier_device::DeviceLink::connect(&nodes.endpoint(leader), &credentials, 0).await.unwrap();
    assert_eq!(link.node_addr, nodes.configs[victim as usize - 1].device_addr, "redirected to its owner");
    let token = link.register(common::TOPIC).await.unwrap();
    link.close().await.unwrap();

    nodes.stop(victim).await;
    // Sent while the owner is unreachable and not yet marked down: the gateway keeps retrying until the
    // next epoch names a new owner, and the provider sees a 200, not an error.
    let response = provider.push(&push_for(&signer, &token, r#"{"n":0}"#)).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    eventually(Duration::from_secs(10), "the leader marks the silent node down", || {
        let state = nodes.node(leader).control.current();
        std::future::ready(state.members[&victim].state == MemberState::Down)
    })
    .await;
    eventually(Duration::from_secs(10), "the gateway's ring no longer has the node", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(view.is_some_and(|v| !v.ring.members().contains(&victim)))
    })
    .await;
    // The gateway now routes the device's pushes to its new owner instead of failing.
    let response = provider.push(&push_for(&signer, &token, r#"{"n":1}"#)).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");

    nodes.restart(victim).await;
    eventually(Duration::from_secs(10), "the returning node is marked active again", || {
        let state = nodes.node(leader).control.current();
        std::future::ready(state.members[&victim].state == MemberState::Active)
    })
    .await;
    // Both pushes answered 200 reach the device, once each, wherever its queue is now.
    let mut link = courier_device::DeviceLink::connect(&nodes.endpoint(leader), &credentials, 0).await.unwrap();
    let mut payloads = Vec::new();
    while payloads.len() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(15), link.next_notification())
            .await
            .expect("both notifications in time")
            .expect("the link stays up");
        payloads.push(String::from_utf8(n.payload).unwrap());
    }
    payloads.sort();
    assert_eq!(payloads, [r#"{"n":0}"#, r#"{"n":1}"#]);
    assert!(link.sync().await.unwrap().iter().all(|n| !link.seen.insert(&n.apns_id)), "nothing new arrives after");
    link.close().await.unwrap();

    // Everything survives a restart of every node from its data directory.
    let before = nodes.node(leader).control.current();
    for id in 1..=3 {
        nodes.stop(id).await;
    }
    for id in 1..=3 {
        nodes.restart(id).await;
    }
    nodes.wait_all_ready().await;
    let after = nodes.node(nodes.leader().await).control.current();
    assert!(after.epoch >= before.epoch);
    assert_eq!(after.members.keys().collect::<Vec<_>>(), [&1, &2, &3]);
    assert_eq!(after.token_keys.keys().collect::<Vec<_>>(), before.token_keys.keys().collect::<Vec<_>>());
    assert_eq!(after.providers, before.providers);
    gateway.shutdown().await;
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_node_catches_up_from_a_snapshot() {
    let mut nodes = Nodes::start(3, |config| config.raft_snapshot_logs = 10).await;
    let leader = nodes.leader().await;
    let laggard = (1..=3).find(|id| *id != leader).unwrap();
    let behind_at = nodes.node(laggard).control.raft.metrics().borrow().last_log_index.unwrap_or(0);
    nodes.stop(laggard).await;

    for i in 0..60u128 {
        nodes.node(leader).control.apply(Command::RevokeDevice { device: DeviceId(1000 + i) }).await.unwrap();
    }
    // The log the laggard would need is gone from the leader: only a snapshot can bring it up to date.
    eventually(Duration::from_secs(10), "the leader purges the log past the laggard's last entry", || {
        let purged = nodes.node(leader).control.raft.metrics().borrow().purged.map(|p| p.index);
        std::future::ready(purged.is_some_and(|p| p > behind_at))
    })
    .await;

    nodes.restart(laggard).await;
    let target = nodes.node(leader).control.current().epoch;
    eventually(Duration::from_secs(20), "the laggard reaches the leader's epoch", || {
        std::future::ready(nodes.node(laggard).control.current().epoch >= target)
    })
    .await;
    let caught_up = nodes.node(laggard).control.current();
    assert_eq!(caught_up.revoked.len(), 60);
    let snapshot = nodes.node(laggard).control.raft.metrics().borrow().snapshot;
    assert!(snapshot.is_some_and(|s| s.index > behind_at), "the laggard installed a snapshot: {snapshot:?}");
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_fails_over_when_its_watch_source_dies() {
    let mut nodes = Nodes::start(3, |_| {}).await;
    let (gateway, provider, signer) = nodes.gateway().await;
    // The gateway's seeds list node 1 first, so that is the member it watches.
    nodes.stop(1).await;
    let survivor = nodes.leader().await;
    let epoch = nodes.node(survivor).control.apply(Command::RevokeDevice { device: DeviceId(5) }).await.unwrap();
    eventually(Duration::from_secs(15), "the gateway follows the cluster through another member", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(view.is_some_and(|v| v.epoch >= epoch && !v.ring.members().contains(&1)))
    })
    .await;
    let (mut device, token) = {
        let credentials = courier_device::activate(&nodes.endpoint(survivor), "").await.unwrap();
        let mut link = courier_device::DeviceLink::connect(&nodes.endpoint(survivor), &credentials, 0).await.unwrap();
        let token = link.register(common::TOPIC).await.unwrap();
        (link, token)
    };
    let response = provider.push(&push_for(&signer, &token, r#"{"after":"failover"}"#)).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    let n = tokio::time::timeout(Duration::from_secs(10), device.next_notification()).await.unwrap().unwrap();
    assert_eq!(n.payload, br#"{"after":"failover"}"#);
    gateway.shutdown().await;
    nodes.shutdown().await;
}
