//! The gateway-to-node `Forward` stream, end to end over real TLS and gRPC: the gateway opens a stream to
//! every node before the first push, many concurrent pushes share each node's stream as batches and every
//! one is answered and arrives (three real `courier node` processes); a batch routed by an epoch older
//! than the node's is told which epoch the node is at, a batch from a future epoch is refused as
//! EPOCH_AHEAD once the node's wait (`--epoch-wait-ms`) is over, an oversize batch ends the stream, and a
//! push through a gateway after the ring changed reaches its device on the new owner (in-process nodes on
//! real sockets, so the test can read each node's ring).

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Nodes, TOPIC, eventually, push_for, spawn_node};
use courier_core::peer::Peers;
use courier_core::pki::{PkiDir, PkiOptions};
use courier_core::state::MemberState;
use courier_device::{DeviceEndpoint, DeviceLink};
use courier_gateway::provider::{JwtSigner, ProviderClient};
use courier_proto::cluster::{DeliverOutcome, ForwardBatch, ForwardItem, ForwardResults, Notification, RefusalReason};
use futures_util::future::join_all;
use tokio::sync::mpsc;
use tonic::Streaming;

/// Connected devices in the concurrency test, and pushes sent to each of them at once.
const DEVICES: usize = 6;
const PUSHES_PER_DEVICE: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_pushes_through_a_gateway_to_three_nodes_are_all_answered_and_arrive() {
    courier_core::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    courier_core::pki::init(dir.path(), &PkiOptions::default()).unwrap();
    let first = spawn_node(dir.path(), 1, None, None).await;
    let seed = first.cluster_addr.clone();
    let mut nodes = vec![first];
    for id in 2..=3 {
        nodes.push(spawn_node(dir.path(), id, Some(&seed), None).await);
    }
    let pki = PkiDir::new(dir.path());
    let mut config = courier_gateway::GatewayConfig::local(dir.path().to_path_buf(), "127.0.0.1:1".parse().unwrap());
    config.node_addrs = nodes.iter().map(|n| n.cluster_addr.clone()).collect();
    config.request_timeout_ms = 15_000;
    let gateway = courier_gateway::start(config).await.unwrap();
    eventually(Duration::from_secs(30), "three active members in the gateway's view", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(
            view.is_some_and(|v| {
                v.ring.members().len() == 3 && v.members.values().all(|m| m.state == MemberState::Active)
            }),
        )
    })
    .await;
    // The gateway opens a stream to every active member before any push needs one.
    for node in &nodes {
        let url = format!("http://{}/metrics", node.metrics_addr);
        eventually(
            Duration::from_secs(30),
            &format!("node {} holds a Forward stream before any push", node.id),
            || {
                let url = url.clone();
                async move {
                    let metrics = common::http_get(&url).await;
                    common::metric_value(&metrics, "courier_node_forward_streams") >= Some(1.0)
                        && common::metric_value(&metrics, "courier_node_forward_batches_total").is_none()
                }
            },
        )
        .await;
    }
    let provider = ProviderClient::connect(gateway.provider_addr, "localhost", &pki.cluster_ca_cert()).await.unwrap();
    let signer = JwtSigner::from_pki(&pki).unwrap();

    // Devices on every node, each linked to its owner (redirects are followed).
    let endpoints: Vec<DeviceEndpoint> = nodes
        .iter()
        .map(|n| DeviceEndpoint {
            addr: n.device_addr.parse().unwrap(),
            server_name: "localhost".into(),
            ca_path: pki.cluster_ca_cert(),
        })
        .collect();
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let endpoint = &endpoints[i % endpoints.len()];
        let (_, link, token) = common::registered_device(endpoint).await;
        devices.push((link, token));
    }
    let owners: BTreeSet<std::net::SocketAddr> = devices.iter().map(|(link, _)| link.node_addr).collect();

    // Each device's app reads (and acks) while the pushes are under way.
    let (tokens, links): (Vec<String>, Vec<DeviceLink>) = devices.into_iter().map(|(l, t)| (t, l)).unzip();
    let readers: Vec<_> = links
        .into_iter()
        .map(|mut link| {
            tokio::spawn(async move {
                let mut arrived = BTreeSet::new();
                while arrived.len() < PUSHES_PER_DEVICE {
                    let next = tokio::time::timeout(Duration::from_secs(30), link.next_notification()).await;
                    let notification = next.expect("the pushes arrive in time").expect("the link stays healthy");
                    arrived.insert(notification.apns_id);
                }
                let extra = link.sync().await.expect("the link stays healthy");
                link.close().await.expect("close");
                (arrived, extra)
            })
        })
        .collect();

    let signer = &signer;
    let pushes = tokens.iter().flat_map(|token| {
        (0..PUSHES_PER_DEVICE).map(move |n| {
            let mut push = push_for(signer, token, &format!(r#"{{"n":{n}}}"#));
            push.apns_id = Some(uuid::Uuid::new_v4().to_string());
            push
        })
    });
    let answers = join_all(pushes.map(|push| {
        let provider = &provider;
        async move {
            let response = provider.push(&push).await.expect("request reaches the gateway");
            (push.token, push.apns_id.expect("an apns-id"), response)
        }
    }))
    .await;
    for (_, _, response) in &answers {
        assert_eq!(response.status, 200, "{response:?}");
    }

    for (token, reader) in tokens.iter().zip(readers) {
        let (arrived, extra) = reader.await.expect("reader");
        let sent: BTreeSet<String> =
            answers.iter().filter(|(t, _, _)| t == token).map(|(_, apns_id, _)| apns_id.clone()).collect();
        assert_eq!(arrived, sent, "each device receives exactly the pushes sent to it");
        assert!(extra.iter().all(|n| sent.contains(&n.apns_id)), "nothing foreign arrives: {extra:?}");
    }

    // Every push crossed some node's Forward stream in a batch; the gateway and the nodes count them.
    let mut forwarded = 0.0;
    for node in &nodes {
        let metrics = common::http_get(&format!("http://{}/metrics", node.metrics_addr)).await;
        let owner = owners.iter().any(|addr| addr.to_string() == node.device_addr);
        if owner {
            assert!(
                common::metric_value(&metrics, "courier_node_forward_batches_total") >= Some(1.0),
                "node {} counts the batches it was sent:\n{metrics}",
                node.id
            );
        }
        forwarded += common::metric_value(&metrics, "courier_node_forward_batch_size_sum").unwrap_or(0.0);
    }
    let total = (DEVICES * PUSHES_PER_DEVICE) as f64;
    assert!(forwarded >= total, "the nodes were forwarded {forwarded} notifications, at least {total}");
    let metrics = common::http_get(&format!("http://{}/metrics", gateway.metrics_addr)).await;
    let sent = common::metric_value(&metrics, "courier_gateway_forward_batch_size_sum").unwrap_or(0.0);
    assert!(sent >= total, "the gateway sent {sent} notifications in batches, at least {total}");

    gateway.shutdown().await;
    for node in &mut nodes {
        node.terminate(Duration::from_secs(30)).await;
    }
}

/// One `Forward` stream opened with the gateway certificate, driven by hand.
struct RawForward {
    batches: mpsc::UnboundedSender<ForwardBatch>,
    results: Streaming<ForwardResults>,
}

impl RawForward {
    async fn open(peers: &Peers, addr: &str) -> RawForward {
        let (batches, mut outgoing) = mpsc::unbounded_channel();
        let stream = futures_util::stream::poll_fn(move |cx| outgoing.poll_recv(cx));
        let mut client = peers.client(addr).expect("client");
        let results = client.forward(stream).await.expect("a gateway opens a Forward stream").into_inner();
        RawForward { batches, results }
    }

    /// Sends one batch and returns the next answer message.
    async fn ask(&mut self, epoch: u64, items: Vec<ForwardItem>) -> ForwardResults {
        self.batches.send(ForwardBatch { epoch, items, holds_receipts: false }).expect("the stream is open");
        tokio::time::timeout(Duration::from_secs(20), self.results.message())
            .await
            .expect("an answer in time")
            .expect("the stream stays healthy")
            .expect("an answer before the stream ends")
    }
}

/// A notification for `device` that is stored only if the device is linked (expiration 0).
fn item(id: u64, device: courier_core::ids::DeviceId) -> ForwardItem {
    let notification = Notification {
        device_id: device.to_bytes().to_vec(),
        topic: TOPIC.into(),
        apns_id: uuid::Uuid::new_v4().to_string(),
        payload: b"{}".to_vec(),
        ..Default::default()
    };
    ForwardItem { id, notification: Some(notification), receipt: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_behind_by_an_epoch_is_told_so_and_retries_on_the_right_owner() {
    let mut nodes = Nodes::start(3, |config| config.epoch_wait_ms = 300).await;
    let (gateway, provider, signer) = nodes.gateway().await;
    let before = nodes.node(1).view.get();
    let old_epoch = before.state.epoch;

    nodes.add_node_with(4, |config| config.epoch_wait_ms = 300).await;
    nodes.wait_all_ready().await;
    let joined_at = nodes.epoch_active(4).await;
    eventually(Duration::from_secs(30), "every node applied the epoch node 4 joined in", || {
        std::future::ready(nodes.running().all(|n| n.view.get().state.epoch >= joined_at))
    })
    .await;

    // A device the ring moved from an old member to node 4.
    let entry = nodes.endpoint(1);
    let credentials = loop {
        let credentials = courier_device::activate(&entry, "").await.expect("activation");
        let device = credentials.device_id;
        if nodes.node(1).view.get().ring.owner(device) == Some(4) && before.ring.owner(device) != Some(4) {
            break credentials;
        }
    };
    let device = credentials.device_id;
    let old_owner = before.ring.owner(device).expect("an owner before node 4 joined");

    // A gateway still routing by the old epoch sends it to the old owner, and hears whose epoch is newer.
    let gateway_peers = Peers::new(&nodes.pki(), "gateway", None, Duration::from_secs(2)).unwrap();
    let old_owner_addr = nodes.configs[old_owner as usize - 1].cluster_addr.to_string();
    let mut stream = RawForward::open(&gateway_peers, &old_owner_addr).await;
    let answer = stream.ask(old_epoch.0, vec![item(1, device)]).await;
    let node_epoch = nodes.node(old_owner).view.get().state.epoch;
    assert_eq!(answer.results.len(), 1, "{answer:?}");
    let result = answer.results[0].result.as_ref().expect("a result");
    assert_eq!(answer.results[0].id, 1);
    assert_eq!(
        (result.outcome, result.reason),
        (DeliverOutcome::Rejected as i32, RefusalReason::NotOwner as i32),
        "{result:?}"
    );
    assert!(
        answer.epoch >= joined_at.0 && answer.epoch <= node_epoch.0 && answer.epoch > old_epoch.0,
        "the answer names the node's epoch ({} with node 4 active since {}), not the batch's {}",
        answer.epoch,
        joined_at.0,
        old_epoch.0
    );

    // The same stream still serves the devices the node does own, whatever the batch's older epoch.
    let kept = loop {
        let candidate = courier_core::ids::DeviceId::from_slice(&rand_bytes()).expect("16 bytes");
        if nodes.node(old_owner).view.get().ring.owner(candidate) == Some(old_owner) {
            break candidate;
        }
    };
    let answer = stream.ask(old_epoch.0, vec![item(2, kept)]).await;
    let result = answer.results[0].result.as_ref().expect("a result");
    assert_eq!(result.outcome, DeliverOutcome::Discarded as i32, "not linked, expiration 0: {result:?}");

    // A batch from an epoch the node never reaches is refused once its wait is over.
    let future = nodes.node(old_owner).view.get().state.epoch.0 + 1000;
    let answer = stream.ask(future, vec![item(3, kept), item(4, device)]).await;
    let mut answered: Vec<_> = answer.results.iter().map(|r| (r.id, r.result.clone().expect("a result"))).collect();
    answered.sort_by_key(|(id, _)| *id);
    assert_eq!(answered.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [3, 4], "{answer:?}");
    for (id, result) in &answered {
        assert_eq!(
            (result.outcome, result.reason),
            (DeliverOutcome::Rejected as i32, RefusalReason::EpochAhead as i32),
            "item {id}: {result:?}"
        );
    }
    assert!(answer.epoch < future, "the node answers with its own epoch {}, not {future}", answer.epoch);

    // A batch over the bound ends the stream with InvalidArgument.
    let oversize = (0..=courier_core::protocol::MAX_FORWARD_BATCH as u64).map(|id| item(id, kept)).collect();
    stream.batches.send(ForwardBatch { epoch: 0, items: oversize, holds_receipts: false }).expect("the stream is open");
    let refused = tokio::time::timeout(Duration::from_secs(20), stream.results.message()).await.expect("in time");
    match refused {
        Err(status) => assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}"),
        Ok(other) => panic!("an oversize batch is refused, not answered: {other:?}"),
    }

    // Through the gateway, a push after the ring change reaches the device on its new owner.
    let mut link = DeviceLink::connect(&entry, &credentials, 0).await.expect("device connects");
    assert_eq!(link.node_addr, nodes.configs[3].device_addr, "the device links to node 4");
    let token = link.register(TOPIC).await.expect("register");
    let mut push = push_for(&signer, &token, r#"{"after":"the ring change"}"#);
    push.apns_id = Some(uuid::Uuid::new_v4().to_string());
    let response = provider.push(&push).await.expect("request reaches the gateway");
    assert_eq!(response.status, 200, "{response:?}");
    let arrived = tokio::time::timeout(Duration::from_secs(10), link.next_notification())
        .await
        .expect("the push arrives in time")
        .expect("the link stays healthy");
    assert_eq!(Some(arrived.apns_id), push.apns_id);
    link.close().await.expect("close");

    gateway.shutdown().await;
    nodes.shutdown().await;
}

fn rand_bytes() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}
