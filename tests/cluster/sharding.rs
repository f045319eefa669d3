//! Sharding as devices and providers see it: a device's queue lives on its owner and the owner's ring
//! successors, a device that dials the wrong node is sent to its owner and finds its queue there, a new
//! member takes over exactly the devices (and queues) its share of the ring gives it, and when an owner is
//! lost its successor already holds what was queued. Nodes and the gateway run in this process on real
//! sockets; what is asserted is what crosses a wire (HTTP/2 answers, device-link frames) and what each
//! node's store holds. The ring's hashing is tested in `ring.rs` and Raft in `cluster.rs`, not here.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Nodes, TOPIC, eventually, push_for};
use courier_core::ids::DeviceId;
use courier_core::state::{Epoch, MemberState, NodeId};
use courier_device::{DeviceCredentials, DeviceLink, LinkEvent};
use courier_gateway::RunningGateway;
use courier_gateway::provider::{JwtSigner, ProviderClient};
use courier_node::RunningNode;
use courier_node::view::EpochView;
use futures_util::future::join_all;

/// Offline devices in the join test: enough that each member's share shows, few enough to set up fast.
const JOIN_DEVICES: usize = 200;
/// Notifications queued for each of them.
const QUEUED_PER_DEVICE: usize = 2;
/// Devices set up (or pushed to) at once; more only queues up behind the two cores.
const CONCURRENCY: usize = 10;
/// How long queues and views get to settle after a membership change.
const SETTLE: Duration = Duration::from_secs(30);

/// A device that registered `TOPIC` while connected and has been offline since.
struct OfflineDevice {
    credentials: DeviceCredentials,
    token: String,
}

impl OfflineDevice {
    fn id(&self) -> DeviceId {
        self.credentials.device_id
    }
}

async fn activate(nodes: &Nodes, through: NodeId) -> DeviceCredentials {
    courier_device::activate(&nodes.endpoint(through), "").await.expect("activation")
}

/// Connects through node `through` (following redirects), registers `TOPIC` and closes the link.
async fn go_offline(nodes: &Nodes, through: NodeId, credentials: DeviceCredentials) -> OfflineDevice {
    let mut link = DeviceLink::connect(&nodes.endpoint(through), &credentials, 0).await.expect("device connects");
    let token = link.register(TOPIC).await.expect("register");
    link.close().await.expect("close");
    OfflineDevice { credentials, token }
}

/// Sends a push with a fresh apns-id and returns that id once the gateway has answered 200.
async fn push_stored(provider: &ProviderClient, signer: &JwtSigner, token: &str, payload: &str) -> String {
    let apns_id = uuid::Uuid::new_v4().to_string();
    let mut push = push_for(signer, token, payload);
    push.apns_id = Some(apns_id.clone());
    let response = provider.push(&push).await.expect("request reaches the gateway");
    assert_eq!(response.status, 200, "{response:?}");
    apns_id
}

/// Copies of each stored notification, as the applied state says.
fn replication_factor(nodes: &Nodes) -> usize {
    nodes.running().next().expect("a running node").control.current().ring.replication_factor as usize
}

async fn queued_ids(node: &RunningNode, device: DeviceId) -> Vec<String> {
    node.store.pending(device).await.expect("store read").into_iter().map(|n| n.apns_id).collect()
}

/// Every running node that queues something for `device`, with the apns-ids it holds in queue order.
async fn queues(nodes: &Nodes, device: DeviceId) -> BTreeMap<NodeId, Vec<String>> {
    let mut held = BTreeMap::new();
    for node in nodes.running() {
        let ids = queued_ids(node, device).await;
        if !ids.is_empty() {
            held.insert(node.control.id, ids);
        }
    }
    held
}

/// Each running node's devices with a queue.
async fn holdings(nodes: &Nodes) -> BTreeMap<NodeId, BTreeSet<DeviceId>> {
    let mut held = BTreeMap::new();
    for node in nodes.running() {
        held.insert(node.control.id, node.store.devices().await.expect("store read").into_iter().collect());
    }
    held
}

/// Waits until every running node has rebalanced its queues for `epoch` or later.
async fn rebalanced_to(nodes: &Nodes, epoch: Epoch) {
    eventually(SETTLE, &format!("every node rebalanced its queues for epoch {}", epoch.0), || {
        std::future::ready(nodes.running().all(|n| *n.rebalanced.borrow() >= epoch))
    })
    .await;
}

async fn gateway_reaches(gateway: &RunningGateway, epoch: Epoch) {
    eventually(SETTLE, &format!("the gateway routes by epoch {} or later", epoch.0), || {
        std::future::ready(gateway.epoch().is_some_and(|e| e >= epoch.0))
    })
    .await;
}

/// The link's notifications up to a ping's pong, as apns-ids, acking none.
async fn sync_ids(link: &mut DeviceLink) -> Vec<String> {
    let arrived = tokio::time::timeout(Duration::from_secs(15), link.sync()).await.expect("pong in time");
    arrived.expect("the link stays healthy").into_iter().map(|n| n.apns_id).collect()
}

fn device_addr_of(nodes: &Nodes, id: NodeId) -> std::net::SocketAddr {
    nodes.configs[id as usize - 1].device_addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_dialling_the_wrong_node_is_redirected_and_receives_its_queue_once() {
    let nodes = Nodes::start(3, |_| {}).await;
    let (gateway, provider, signer) = nodes.gateway().await;
    let replicas = replication_factor(&nodes);

    let device = {
        let credentials = activate(&nodes, 1).await;
        go_offline(&nodes, 1, credentials).await
    };
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(push_stored(&provider, &signer, &device.token, &format!(r#"{{"n":{i}}}"#)).await);
    }

    // A 200 means the queue is durable on the owner and its successors, and nowhere else.
    let view = nodes.node(1).view.get();
    let candidates = view.ring.candidates(device.id(), replicas);
    assert_eq!(candidates.len(), replicas);
    let owner = candidates[0];
    let held = queues(&nodes, device.id()).await;
    assert_eq!(
        held.keys().copied().collect::<BTreeSet<_>>(),
        candidates.iter().copied().collect::<BTreeSet<_>>(),
        "the queue is held by exactly the owner and its successor"
    );
    for (node, ids) in &held {
        assert_eq!(ids, &sent, "node {node} holds every notification, in order");
    }

    let wrong = (1..=3).find(|id| *id != owner).expect("a node that does not own the device");
    // Credentials that name no owner (saved before owners were kept) make the device dial its endpoint.
    let credentials = DeviceCredentials { owner: None, ..device.credentials.clone() };
    let mut link = DeviceLink::connect(&nodes.endpoint(wrong), &credentials, 0).await.expect("connects");
    assert_eq!(link.node_addr, device_addr_of(&nodes, owner), "node {wrong} sent the device to its owner {owner}");
    assert_eq!(sync_ids(&mut link).await, sent, "the queue arrives in order, once each");
    assert!(sync_ids(&mut link).await.is_empty(), "nothing arrives twice");

    for apns_id in &sent {
        link.ack(apns_id).await.expect("ack");
    }
    let (nodes_ref, device_id) = (&nodes, device.id());
    eventually(Duration::from_secs(10), "the acks empty the queue on every node", || async move {
        queues(nodes_ref, device_id).await.is_empty()
    })
    .await;
    assert!(sync_ids(&mut link).await.is_empty(), "acked notifications are not sent again");
    link.close().await.expect("close");

    gateway.shutdown().await;
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_takes_only_the_devices_it_now_owns_and_their_queues_move_with_them() {
    let mut nodes = Nodes::start(3, |_| {}).await;
    let (gateway, provider, signer) = nodes.gateway().await;
    let replicas = replication_factor(&nodes);

    let mut devices: Vec<OfflineDevice> = Vec::with_capacity(JOIN_DEVICES);
    while devices.len() < JOIN_DEVICES {
        let batch = (0..CONCURRENCY.min(JOIN_DEVICES - devices.len())).map(|i| {
            let through = (i % 3) as NodeId + 1;
            let nodes = &nodes;
            async move { go_offline(nodes, through, activate(nodes, through).await).await }
        });
        devices.extend(join_all(batch).await);
    }
    let mut sent: BTreeMap<DeviceId, Vec<String>> = BTreeMap::new();
    for chunk in devices.chunks(CONCURRENCY) {
        let pushed = join_all(chunk.iter().map(|device| {
            let (provider, signer) = (&provider, &signer);
            async move {
                let mut ids = Vec::new();
                for i in 0..QUEUED_PER_DEVICE {
                    ids.push(push_stored(provider, signer, &device.token, &format!(r#"{{"n":{i}}}"#)).await);
                }
                (device.id(), ids)
            }
        }))
        .await;
        sent.extend(pushed);
    }

    let before: Arc<EpochView> = nodes.node(1).view.get();
    assert_eq!(before.ring.members(), [1, 2, 3]);
    let held_before = holdings(&nodes).await;
    let holders = |held: &BTreeMap<NodeId, BTreeSet<DeviceId>>, device: DeviceId| -> BTreeSet<NodeId> {
        held.iter().filter(|(_, devices)| devices.contains(&device)).map(|(node, _)| *node).collect()
    };
    for device in sent.keys() {
        let candidates: BTreeSet<NodeId> = before.ring.candidates(*device, replicas).into_iter().collect();
        assert_eq!(holders(&held_before, *device), candidates, "{device} is held by its owner and successor");
    }

    nodes.add_node(4).await;
    let joined_at = nodes.epoch_active(4).await;
    rebalanced_to(&nodes, joined_at).await;
    gateway_reaches(&gateway, joined_at).await;
    let after: Arc<EpochView> = nodes.node(1).view.get();
    assert_eq!(after.ring.members(), [1, 2, 3, 4]);
    let gateway_view = gateway.view.borrow().clone().expect("a gateway view");
    for node in nodes.running() {
        let view = node.view.get();
        for device in sent.keys() {
            assert_eq!(view.ring.owner(*device), after.ring.owner(*device), "node {} on {device}", node.control.id);
            assert_eq!(gateway_view.ring.owner(*device), after.ring.owner(*device), "the gateway on {device}");
        }
    }

    // Ownership: only the new member gains devices, and about its quarter of them.
    let moved: BTreeSet<DeviceId> =
        sent.keys().copied().filter(|d| before.ring.owner(*d) != after.ring.owner(*d)).collect();
    let owned_by_new: BTreeSet<DeviceId> = sent.keys().copied().filter(|d| after.ring.owner(*d) == Some(4)).collect();
    assert_eq!(moved, owned_by_new, "the devices that changed owner are exactly those node 4 now owns");
    let share = moved.len() as f64 / JOIN_DEVICES as f64;
    assert!((0.15..=0.35).contains(&share), "{} of {JOIN_DEVICES} devices moved ({share:.2})", moved.len());

    // Queues: each device's queue ends up on exactly its new candidates.
    let expected: BTreeMap<NodeId, BTreeSet<DeviceId>> = (1..=4)
        .map(|node| {
            let devices = sent.keys().copied().filter(|d| after.ring.candidates(*d, replicas).contains(&node));
            (node, devices.collect())
        })
        .collect();
    let give_up = tokio::time::Instant::now() + SETTLE;
    let held_after = loop {
        let held = holdings(&nodes).await;
        if held == expected || tokio::time::Instant::now() >= give_up {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let wanted_by_new = &expected[&4];
    assert_eq!(
        held_after[&4].difference(wanted_by_new).count() + wanted_by_new.difference(&held_after[&4]).count(),
        0,
        "node 4 holds the queues of exactly the {} devices it is a candidate for; missing {:?}, extra {:?}",
        wanted_by_new.len(),
        wanted_by_new.difference(&held_after[&4]).collect::<Vec<_>>(),
        held_after[&4].difference(wanted_by_new).collect::<Vec<_>>(),
    );
    for device in wanted_by_new {
        let mut held = queued_ids(nodes.node(4), *device).await;
        let mut wanted = sent[device].clone();
        held.sort();
        wanted.sort();
        assert_eq!(held, wanted, "node 4 holds all of {device}'s queue");
    }
    for (device, ids) in &sent {
        let old = holders(&held_before, *device);
        let new: BTreeSet<NodeId> = after.ring.candidates(*device, replicas).into_iter().collect();
        let now = holders(&held_after, *device);
        for gone in old.difference(&new) {
            assert!(!now.contains(gone), "node {gone} is no longer a candidate for {device} but still holds it");
        }
        assert_eq!(now, new, "{device} is held by exactly its new candidates");
        if old == new {
            for node in &new {
                assert_eq!(&queued_ids(nodes.node(*node), *device).await, ids, "{device} untouched on node {node}");
            }
        }
    }

    // Moved devices dialling an old member are sent to node 4 and find their queue there, once.
    for device in devices.iter().filter(|d| moved.contains(&d.id())).take(5) {
        let mut link = DeviceLink::connect(&nodes.endpoint(1), &device.credentials, 0).await.expect("connects");
        assert_eq!(link.node_addr, device_addr_of(&nodes, 4), "{} is redirected to node 4", device.id());
        let mut arrived = sync_ids(&mut link).await;
        arrived.sort();
        let mut wanted = sent[&device.id()].clone();
        wanted.sort();
        assert_eq!(arrived, wanted, "{}'s queue arrives once each", device.id());
        assert!(sync_ids(&mut link).await.is_empty(), "nothing arrives twice for {}", device.id());
        link.close().await.expect("close");
    }

    gateway.shutdown().await;
    nodes.shutdown().await;
}

/// Each running node's devices with a stored channel subscription.
async fn subscribers_held(nodes: &Nodes, devices: &[DeviceId]) -> BTreeMap<NodeId, BTreeSet<DeviceId>> {
    let mut held = BTreeMap::new();
    for node in nodes.running() {
        let mut mine = BTreeSet::new();
        for device in devices {
            if !node.store.subscriptions(*device).await.expect("store read").is_empty() {
                mine.insert(*device);
            }
        }
        held.insert(node.control.id, mine);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_subscriptions_move_with_their_devices_when_a_node_joins() {
    let mut nodes = Nodes::start(3, |_| {}).await;
    let (gateway, _, signer) = nodes.gateway().await;
    let replicas = replication_factor(&nodes);
    let channels = common::channels::Channels::to(gateway.channels_addr, &nodes.pki(), &signer).await;
    let sender = common::channels::Channels::to(gateway.provider_addr, &nodes.pki(), &signer).await;
    let channel = channels.create_ok(0, "LiveActivity").await;

    // Offline devices that subscribed once.
    let mut devices = Vec::new();
    for chunk in 0..4 {
        let batch = (0..CONCURRENCY).map(|i| {
            let (nodes, channel) = (&nodes, &channel);
            async move {
                let through = ((chunk + i) % 3) as NodeId + 1;
                let credentials = activate(nodes, through).await;
                let mut link = DeviceLink::connect(&nodes.endpoint(through), &credentials, 0).await.expect("connects");
                link.subscribe(channel, None).await.expect("subscribe");
                link.close().await.expect("close");
                credentials
            }
        });
        devices.extend(join_all(batch).await);
    }
    let ids: Vec<DeviceId> = devices.iter().map(|c| c.device_id).collect();
    let candidates_in = |view: &EpochView| -> BTreeMap<NodeId, BTreeSet<DeviceId>> {
        (1..=view.ring.members().len() as NodeId)
            .map(|node| {
                (node, ids.iter().copied().filter(|d| view.ring.candidates(*d, replicas).contains(&node)).collect())
            })
            .collect()
    };
    let before = candidates_in(&nodes.node(1).view.get());
    eventually(SETTLE, "each subscription is on its device's owner and successor", || async {
        subscribers_held(&nodes, &ids).await == before
    })
    .await;

    nodes.add_node(4).await;
    let joined_at = nodes.epoch_active(4).await;
    rebalanced_to(&nodes, joined_at).await;
    gateway_reaches(&gateway, joined_at).await;
    let after_view = nodes.node(1).view.get();
    let after = candidates_in(&after_view);
    assert!(!after[&4].is_empty(), "node 4 is a candidate for some of {} devices", ids.len());
    eventually(SETTLE, "each subscription is on exactly its device's new candidates", || async {
        subscribers_held(&nodes, &ids).await == after
    })
    .await;

    // A device node 4 now owns links there and gets a broadcast without subscribing again.
    let moved = devices.iter().find(|c| after_view.ring.owner(c.device_id) == Some(4)).expect("a device on node 4");
    let mut link = DeviceLink::connect(&nodes.endpoint(1), moved, 0).await.expect("connects");
    assert_eq!(link.node_addr, device_addr_of(&nodes, 4));
    // The node restores a link's subscriptions before it reads the link's first frame: once a ping is
    // answered, the link is a subscriber (policy 0 reaches only subscribers linked when it is sent).
    assert!(link.sync().await.expect("sync").is_empty(), "nothing kept on a policy-0 channel");
    let unique = sender.broadcast_ok(&channel, "liveactivity", r#"{"n":1}"#).await;
    let n = tokio::time::timeout(Duration::from_secs(10), link.next_notification()).await.expect("in time");
    assert_eq!(n.expect("the link stays up").apns_id, unique);
    link.close().await.expect("close");

    gateway.shutdown().await;
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_an_owner_is_lost_its_successor_already_holds_the_queue() {
    let mut nodes = Nodes::start(3, |_| {}).await;
    let (gateway, provider, signer) = nodes.gateway().await;
    let replicas = replication_factor(&nodes);
    let leader = nodes.leader().await;

    // Stopping a follower keeps the leader, so what follows is failure detection, not an election.
    let credentials = loop {
        let credentials = activate(&nodes, leader).await;
        if nodes.node(leader).view.get().ring.owner(credentials.device_id) != Some(leader) {
            break credentials;
        }
    };
    let device = go_offline(&nodes, leader, credentials).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(push_stored(&provider, &signer, &device.token, &format!(r#"{{"n":{i}}}"#)).await);
    }
    let candidates = nodes.node(leader).view.get().ring.candidates(device.id(), replicas);
    let (owner, successor) = (candidates[0], candidates[1]);
    let held = queues(&nodes, device.id()).await;
    assert_eq!(
        held.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([owner, successor]),
        "the queue is held by exactly the owner and its successor"
    );
    assert_eq!(held[&successor], sent, "the successor holds the queue before the owner is lost");

    nodes.stop(owner).await;
    let mut down_at = None;
    eventually(Duration::from_secs(15), "the leader marks the lost owner down", || {
        let state = nodes.node(leader).control.current();
        let down = state.members[&owner].state == MemberState::Down;
        if down {
            down_at = Some(state.epoch);
        }
        std::future::ready(down)
    })
    .await;
    let down_at = down_at.expect("an epoch");
    eventually(Duration::from_secs(15), "the gateway's ring no longer has the lost owner", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(view.is_some_and(|v| !v.ring.members().contains(&owner)))
    })
    .await;
    rebalanced_to(&nodes, down_at).await;
    for node in nodes.running() {
        let view = node.view.get();
        assert_eq!(view.ring.owner(device.id()), Some(successor), "node {} names the successor", node.control.id);
    }

    let other = (1..=3).find(|id| *id != owner && *id != successor).expect("a third node");
    // The new owner copies the queue on to its own new successor, so R copies exist again.
    let (nodes_ref, device_id) = (&nodes, device.id());
    let restored = &BTreeMap::from([(successor, sent.clone()), (other, sent.clone())]);
    eventually(SETTLE, "the queue is on the new owner and its new successor", || async move {
        &queues(nodes_ref, device_id).await == restored
    })
    .await;
    let mut link = DeviceLink::connect(&nodes.endpoint(other), &device.credentials, 0).await.expect("connects");
    assert_eq!(link.node_addr, device_addr_of(&nodes, successor), "sent to the new owner, node {successor}");
    assert_eq!(sync_ids(&mut link).await, sent, "the queue arrives in order, once each");
    assert!(sync_ids(&mut link).await.is_empty(), "nothing arrives twice");

    // The old owner is still down: a new push is stored on the new owner and handed to the link.
    let fresh = push_stored(&provider, &signer, &device.token, r#"{"n":"after the loss"}"#).await;
    let event = tokio::time::timeout(Duration::from_secs(10), link.next_event())
        .await
        .expect("the new push arrives in time")
        .expect("the link stays healthy");
    match event {
        LinkEvent::Notification(n) => assert_eq!(n.apns_id, fresh, "the new push, not a redelivery"),
        other => panic!("expected the new notification, got {other:?}"),
    }
    assert!(sync_ids(&mut link).await.is_empty(), "nothing arrives twice");

    for apns_id in sent.iter().chain([&fresh]) {
        link.ack(apns_id).await.expect("ack");
    }
    let (nodes_ref, device_id) = (&nodes, device.id());
    eventually(Duration::from_secs(10), "the acks empty the queue on every survivor", || async move {
        queues(nodes_ref, device_id).await.is_empty()
    })
    .await;
    link.close().await.expect("close");

    gateway.shutdown().await;
    nodes.shutdown().await;
}
