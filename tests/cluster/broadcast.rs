//! Broadcasts across a three-node cluster: subscribers whose links are spread over every node each get a
//! broadcast once (and `courier ctl channels` counts them all), and a node that was down while a policy-1 broadcast was sent catches up from its peers
//! when it is back, so a subscriber that links to it then still gets the latest one.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::channels::Channels;
use common::{Nodes, eventually, registered_device};
use courier_core::state::MemberState;
use courier_device::DeviceLink;

async fn next(link: &mut DeviceLink) -> courier_device::Notification {
    tokio::time::timeout(Duration::from_secs(10), link.next_notification())
        .await
        .expect("a broadcast arrives in time")
        .expect("the link stays up")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_on_every_node_get_each_broadcast_once_and_a_returning_node_catches_up() {
    let mut nodes = Nodes::start(3, |_| {}).await;
    let (gateway, _, signer) = nodes.gateway().await;
    let channels = Channels::to(gateway.channels_addr, &nodes.pki(), &signer).await;
    let sender = Channels::to(gateway.provider_addr, &nodes.pki(), &signer).await;
    let channel = channels.create_ok(1, "LiveActivity").await;

    // Devices activated through node 1 link to their owners: enough of them to land on every node.
    let mut links = Vec::new();
    let mut owners = HashSet::new();
    while owners.len() < 3 || links.len() < 9 {
        assert!(links.len() < 60, "devices spread over the three nodes");
        let (credentials, mut link, _) = registered_device(&nodes.endpoint(1)).await;
        link.subscribe(&channel, None).await.expect("subscribe");
        owners.insert(link.node_addr);
        links.push((credentials, link));
    }
    // `courier ctl channels` adds up the subscribers linked to each member.
    let listed = common::ctl(nodes.node(1).cluster_addr, &nodes.pki().dir, &["channels", "--json"]).await;
    assert!(listed.success, "{listed:?}");
    let rows: Vec<serde_json::Value> = listed.stdout.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0]["id"].as_str(), rows[0]["subscribers"].as_u64()),
        (Some(channel.as_str()), Some(links.len() as u64))
    );
    let table =
        common::ctl(nodes.node(1).cluster_addr, &nodes.pki().dir, &["channels", "--app", "com.example.app"]).await;
    assert!(table.stdout.contains(&channel) && table.stdout.contains("SUBSCRIBERS"), "{table:?}");
    let none = common::ctl(
        nodes.node(1).cluster_addr,
        &nodes.pki().dir,
        &["channels", "--app", "com.example.other", "--json"],
    )
    .await;
    assert!(none.success && none.stdout.trim().is_empty(), "{none:?}");

    let unique = sender.broadcast_ok(&channel, "liveactivity", r#"{"n":1}"#).await;
    for (_, link) in &mut links {
        let n = next(link).await;
        assert_eq!((n.apns_id.as_str(), n.channel_id.as_str()), (unique.as_str(), channel.as_str()));
        assert!(link.sync().await.expect("sync").is_empty(), "once");
    }

    // Node 2 goes down; a broadcast sent meanwhile reaches the two others, which keep it.
    let on_two: Vec<usize> =
        (0..links.len()).filter(|i| links[*i].1.node_addr == nodes.configs[1].device_addr).collect();
    assert!(!on_two.is_empty());
    nodes.stop(2).await;
    eventually(Duration::from_secs(20), "the gateway sees node 2 down", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(view.is_some_and(|v| v.members.get(&2).is_some_and(|m| m.state != MemberState::Active)))
    })
    .await;
    let missed = sender.broadcast_ok(&channel, "liveactivity", r#"{"n":2}"#).await;

    // Back, node 2 fetches what it missed from its peers: its own subscriber, linking to it again, gets it.
    nodes.restart(2).await;
    nodes.wait_all_ready().await;
    let (credentials, _) = links.swap_remove(on_two[0]);
    eventually(
        Duration::from_secs(20),
        "a node-2 device links to node 2 again and gets the broadcast it missed",
        || {
            let (endpoint, credentials, channel, unique) =
                (nodes.endpoint(1), credentials.clone(), channel.clone(), unique.clone());
            let node_two = nodes.configs[1].device_addr;
            let missed = missed.clone();
            async move {
                let mut link = common::link_again(&endpoint, &credentials, 3).await;
                if link.node_addr != node_two {
                    return false;
                }
                link.subscribe(&channel, Some(&unique)).await.expect("subscribe");
                let got = tokio::time::timeout(Duration::from_secs(2), link.next_notification()).await;
                matches!(got, Ok(Ok(n)) if n.apns_id == missed)
            }
        },
    )
    .await;
    gateway.shutdown().await;
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_subscription_holds_on_later_links_until_the_device_unsubscribes() {
    let nodes = Nodes::start(3, |_| {}).await;
    let (gateway, _, signer) = nodes.gateway().await;
    let channels = Channels::to(gateway.channels_addr, &nodes.pki(), &signer).await;
    let sender = Channels::to(gateway.provider_addr, &nodes.pki(), &signer).await;
    let channel = channels.create_ok(1, "LiveActivity").await;
    let broadcast = |n: u32| {
        let (sender, channel, body) = (&sender, &channel, format!(r#"{{"n":{n}}}"#));
        async move { sender.broadcast_ok(channel, "liveactivity", &body).await }
    };
    let stored = |device| {
        let stores: Vec<_> = nodes.running().map(|node| node.store.clone()).collect();
        async move {
            // Each node's rows for the device: the kept broadcast it has had, per subscription.
            let mut rows = Vec::new();
            for store in stores {
                rows.extend(store.subscriptions(device).await.expect("store").into_iter().map(|s| s.last_seen));
            }
            rows
        }
    };

    // Subscribed once: the owner stores it and copies it to the device's successor before it answers.
    let (credentials, mut link, _) = registered_device(&nodes.endpoint(1)).await;
    let device = credentials.device_id;
    link.subscribe(&channel, None).await.expect("subscribe");
    assert_eq!(stored(device).await.len(), 2, "on its owner and its copy once answered");
    let first = broadcast(1).await;
    assert_eq!(next(&mut link).await.apns_id, first);
    link.close().await.expect("close");

    // Offline, a broadcast is kept. Linking again without subscribing, the device gets it, then later ones.
    let second = broadcast(2).await;
    let mut link = common::link_again(&nodes.endpoint(1), &credentials, 3).await;
    assert_eq!(next(&mut link).await.apns_id, second, "the kept broadcast it had not had");
    let third = broadcast(3).await;
    assert_eq!(next(&mut link).await.apns_id, third, "a live one on the restored subscription");
    assert!(link.sync().await.expect("sync").is_empty(), "each once");
    link.close().await.expect("close");

    // The owner and the copy record that the device had the kept broadcast when the link ends: the next link
    // does not get it again.
    eventually(Duration::from_secs(10), "the third is stored as seen", || async {
        stored(device).await == [third.clone(), third.clone()]
    })
    .await;
    let mut link = common::link_again(&nodes.endpoint(1), &credentials, 3).await;
    let fourth = broadcast(4).await;
    assert_eq!(next(&mut link).await.apns_id, fourth, "not the third again");

    // Unsubscribed: the owner and the copy drop it, and the next link holds no subscription.
    link.unsubscribe(&channel).await.expect("unsubscribe");
    assert!(stored(device).await.is_empty(), "gone from the owner and its copy once answered");
    link.close().await.expect("close");
    let _link = common::link_again(&nodes.endpoint(1), &credentials, 3).await;
    let listed = common::ctl(nodes.node(1).cluster_addr, &nodes.pki().dir, &["channels", "--json"]).await;
    let row: serde_json::Value = serde_json::from_str(listed.stdout.trim()).expect("one channel, as JSON");
    assert_eq!(row["subscribers"].as_u64(), Some(0), "the device is linked, not subscribed: {listed:?}");
    gateway.shutdown().await;
    nodes.shutdown().await;
}
