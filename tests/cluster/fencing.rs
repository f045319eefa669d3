//! Epoch fencing on the data plane between nodes, over real gRPC with node certificates: a replication
//! batch or a queue fetch stamped with an epoch older than the receiver's is refused for the devices its
//! sender no longer owns there (what a node that was cut off or paused while its devices moved would send),
//! accepted for the devices it still owns, and one stamped with an epoch the receiver has not reached waits
//! and is then refused as unavailable. A node may not speak for another.

use crate::common;

use std::time::Duration;

use common::{Nodes, eventually};
use courier_core::ids::{DeviceId, unix_millis};
use courier_core::peer::Peers;
use courier_proto::cluster::{FetchQueueRequest, FetchQueuesRequest, Notification, ReplicateRequest, Subscription};

fn notification(device: DeviceId, apns_id: &str) -> Notification {
    Notification {
        device_id: device.to_bytes().to_vec(),
        topic: common::TOPIC.into(),
        apns_id: apns_id.into(),
        payload: br#"{"aps":{}}"#.to_vec(),
        expiration: unix_millis() / 1000 + 3600,
        ..Notification::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_replicas_and_fetches_are_refused_for_devices_the_sender_no_longer_owns() {
    let nodes = Nodes::start(2, |config| config.epoch_wait_ms = 300).await;
    let node1 = nodes.node(1);
    // Node 2 must own part of the ring in node 1's view before devices are picked by owner.
    let both = nodes.epoch_active(2).await;
    eventually(Duration::from_secs(10), "node 1's view has node 2 active", || {
        std::future::ready(node1.view.get().state.epoch >= both)
    })
    .await;
    let view = node1.view.get();
    let epoch = view.state.epoch.0;
    assert!(epoch > 1, "the cluster has been through a few epochs: {epoch}");
    let owned_by = |node: u64| {
        std::iter::repeat_with(DeviceId::random)
            .take(100_000)
            .find(|d| view.owns(node, *d))
            .expect("a device owned by the node")
    };
    let (mine, theirs) = (owned_by(1), owned_by(2));

    // Node 2's certificate, as node 2 would send after a pause that ended in an older epoch.
    let as_node2 = Peers::new(&nodes.pki(), "node-2", None, Duration::from_secs(5)).expect("peers");
    let mut client = as_node2.client(&node1.cluster_addr.to_string()).expect("client");
    let stale = ReplicateRequest {
        from_node: 2,
        puts: vec![notification(mine, "for-1"), notification(theirs, "for-2")],
        removes: vec![],
        epoch: epoch - 1,
        ..Default::default()
    };
    let answer = client.replicate(stale).await.expect("a stale batch is answered").into_inner();
    assert_eq!(answer.refused, vec![0], "only the put for a device node 2 does not own is refused");
    assert_eq!(answer.epoch, epoch, "the answer names the receiver's epoch");
    assert!(node1.store.pending(mine).await.expect("store").is_empty(), "the refused copy was not stored");
    let kept = node1.store.pending(theirs).await.expect("store");
    assert_eq!(kept.iter().map(|n| n.apns_id.as_str()).collect::<Vec<_>>(), ["for-2"], "the other copy was stored");

    // In the receiver's epoch nothing is refused: a hand-over from a node that is not the owner is normal.
    let current =
        ReplicateRequest { from_node: 2, puts: vec![notification(mine, "for-1")], epoch, ..Default::default() };
    let answer = client.replicate(current).await.expect("a current batch is answered").into_inner();
    assert!(answer.refused.is_empty(), "{:?}", answer.refused);
    assert_eq!(node1.store.pending(mine).await.expect("store").len(), 1);

    // An epoch the receiver never reaches: refused after its wait, and nothing applied.
    let ahead = ReplicateRequest {
        from_node: 2,
        puts: vec![notification(theirs, "from-the-future")],
        removes: vec![],
        epoch: epoch + 1000,
        ..Default::default()
    };
    let refused = client.replicate(ahead).await.expect_err("an epoch from the future is refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(node1.store.pending(theirs).await.expect("store").len(), 1, "nothing from it was applied");

    // A subscription copy with a malformed channel id is refused, and no copy in its batch is applied.
    let subscription = |channel_id: Vec<u8>| Subscription {
        device_id: mine.to_bytes().to_vec(),
        channel_id,
        last_seen: String::new(),
        subscribed: true,
    };
    let bad = ReplicateRequest {
        from_node: 2,
        epoch,
        subscriptions: vec![subscription(vec![1; 16]), subscription(vec![2; 3])],
        ..Default::default()
    };
    let refused = client.replicate(bad).await.expect_err("a malformed subscription is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(node1.store.subscriptions(mine).await.expect("store").is_empty(), "nothing from the batch was applied");

    // Speaking for node 1 with node 2's certificate is refused.
    let forged = ReplicateRequest { from_node: 1, epoch, ..Default::default() };
    let refused = client.replicate(forged).await.expect_err("a forged sender is refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // Queue fetches: a stale node 2 gets nothing for node 1's device, and its own device's queue.
    let fetch = |device: DeviceId, epoch: u64| FetchQueueRequest { device_id: device.to_bytes().to_vec(), epoch };
    let answer = client.fetch_queue(fetch(mine, epoch - 1)).await.expect("fetch").into_inner();
    assert!(answer.stale && answer.notifications.is_empty(), "fenced: {answer:?}");
    let answer = client.fetch_queue(fetch(theirs, epoch - 1)).await.expect("fetch").into_inner();
    assert!(!answer.stale && answer.notifications.len() == 1, "its own device's queue: {answer:?}");
    let answer = client.fetch_queue(fetch(mine, epoch)).await.expect("fetch").into_inner();
    assert!(!answer.stale && answer.notifications.len() == 1, "in the current epoch: {answer:?}");

    // Many devices in one call (what owners send): fenced device by device, answered in the order asked.
    let many = |devices: &[DeviceId], epoch: u64| FetchQueuesRequest {
        device_ids: devices.iter().map(|d| d.to_bytes().to_vec()).collect(),
        epoch,
    };
    let answer = client.fetch_queues(many(&[theirs, mine, theirs], epoch - 1)).await.expect("fetch").into_inner();
    let seen: Vec<(bool, usize)> = answer.queues.iter().map(|q| (q.stale, q.notifications.len())).collect();
    assert_eq!(seen, [(false, 1), (true, 0), (false, 1)], "only node 1's device is fenced: {answer:?}");
    let answer = client.fetch_queues(many(&[mine, theirs], epoch)).await.expect("fetch").into_inner();
    let seen: Vec<(bool, usize)> = answer.queues.iter().map(|q| (q.stale, q.notifications.len())).collect();
    assert_eq!(seen, [(false, 1), (false, 1)], "in the current epoch: {answer:?}");
    assert_eq!(answer.epoch, epoch);
    let malformed = FetchQueuesRequest { device_ids: vec![vec![1; 16], vec![2; 3]], epoch };
    let refused = client.fetch_queues(malformed).await.expect_err("a malformed device id is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // The same batches on a `ReplicateStream` (what nodes send): fenced alike, answered one by one in order,
    // and a forged sender ends the stream.
    let (requests, outgoing) = tokio::sync::mpsc::channel(1);
    let outgoing = futures_util::stream::unfold(outgoing, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut answers = client.replicate_stream(outgoing).await.expect("node 2 opens a stream").into_inner();
    for (epoch, refused) in [(epoch - 1, vec![0]), (epoch, vec![])] {
        let puts = vec![notification(mine, "streamed-1"), notification(theirs, &format!("streamed-{epoch}"))];
        requests.send(ReplicateRequest { from_node: 2, puts, epoch, ..Default::default() }).await.expect("sent");
        let answer = answers.message().await.expect("answered").expect("an answer");
        assert_eq!(answer.refused, refused, "in epoch {epoch}");
    }
    let ids = |queue: Vec<Notification>| queue.into_iter().map(|n| n.apns_id).collect::<Vec<_>>();
    let streamed_2 = |epoch: u64| format!("streamed-{epoch}");
    assert_eq!(
        ids(node1.store.pending(theirs).await.expect("store")),
        ["for-2", &streamed_2(epoch - 1), &streamed_2(epoch)]
    );
    assert_eq!(
        ids(node1.store.pending(mine).await.expect("store")),
        ["for-1", "streamed-1"],
        "stored once fenced no more"
    );
    requests.send(ReplicateRequest { from_node: 1, epoch, ..Default::default() }).await.expect("sent");
    let refused = answers.message().await.expect_err("a forged sender ends the stream");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    nodes.shutdown().await;
}
