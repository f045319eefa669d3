//! Receipts when the owner dies: with the team's endpoint refusing everything, a device's owner decides
//! outcomes of every kind (an ack of a notification never stored, a stored one acked, a discard, a
//! collapse, an unregistered topic), so their receipts sit in its send queue; then it is SIGKILLed. Once
//! the endpoint answers again, the new owner sends every one of them from the copies it held. And with the
//! endpoint slow instead, a receipt kept unsaved dies with its owner while its request is out: the gateway
//! that forwarded the push kept a copy, and hands it to the new owner, which sends it; or, when the owner
//! is back before anyone marked it down, to the restarted owner, told by the start time in its answers.

use crate::ONE_AT_A_TIME;
use crate::common;

use std::time::Duration;

use common::webhooks::{Receiver, event, gateway_sends_receipts_for, labelled_push, team_id};
use common::{ProcessCluster, TOPIC, eventually};
use courier_device::{DeviceLink, LinkEvent};

fn later() -> u64 {
    courier_core::ids::unix_millis() / 1000 + 3600
}

/// Acks every notification that arrives within `quiet` of the last one.
async fn ack_all(link: &mut DeviceLink, quiet: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(Ok(event)) = tokio::time::timeout(quiet, link.next_event()).await {
        if let LinkEvent::Notification(n) = event {
            link.ack(&n.apns_id).await.expect("ack");
            seen.push(n.apns_id);
        }
    }
    seen
}

/// The node flags of `cluster_with_webhook`.
fn webhook_flags(receiver: &Receiver, extra: &[&str]) -> Vec<String> {
    let ca = receiver.ca_path.to_str().expect("path");
    let mut flags = vec![
        "--webhooks-allow-private",
        "--webhook-ca",
        ca,
        "--webhook-batch-wait-ms",
        "50",
        "--ack-wait-ms",
        "3000",
        "--webhook-save-after-ms",
        "60000",
    ];
    flags.extend_from_slice(extra);
    flags.into_iter().map(str::to_string).collect()
}

/// A cluster whose team has its webhook at `receiver` (and whose gateway knows it), its nodes started with
/// `extra` flags besides a long ack window, so that the device's ack (from the test) is in time to spare
/// the commit, and a long time unsaved, so that the receipt of that ack waits in memory.
async fn cluster_with_webhook(receiver: &Receiver, extra: &[&str]) -> ProcessCluster {
    let flags = webhook_flags(receiver, extra);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cluster = ProcessCluster::start(&flags, 10_000).await;
    let team = team_id(cluster.dir.path());
    let node1 = cluster.nodes[0].cluster_addr.parse().expect("address");
    let set =
        common::ctl(node1, cluster.dir.path(), &["webhooks", "set", "--team", &team, "--url", &receiver.url]).await;
    assert!(set.success, "{set:?}");
    gateway_sends_receipts_for(&cluster.gateway, &[&team]).await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_decided_before_the_owner_was_sigkilled_are_sent_by_the_new_owner() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let receiver = Receiver::start().await;
    receiver.fail_next(usize::MAX);
    // The receipt of the ack waits in memory until the endpoint refuses it: then the owner writes it, and
    // the successor drops its memory copy for one in its store.
    let ProcessCluster { dir: _dir, mut nodes, gateway, provider, signer, endpoints } =
        cluster_with_webhook(&receiver, &[]).await;
    let push = |token: &str, label: &str, expiration: u64, collapse: Option<&str>| {
        labelled_push(&signer, token, label, expiration, collapse)
    };

    // A device with two topics; it unregisters the second.
    let (credentials, mut link, token) = common::registered_device(&endpoints[0]).await;
    let other = link.register("com.example.other").await.expect("register");
    link.unregister("com.example.other").await.expect("unregister");
    let owner_addr = link.node_addr.to_string();

    // Acked on the link before any commit: answered DELIVERED once its receipt is held on a successor.
    let answer = tokio::spawn({
        let (provider, push) = (provider.clone(), push(&token, "live", later(), None));
        async move { provider.push(&push).await.expect("push") }
    });
    let live = ack_all(&mut link, Duration::from_millis(500)).await;
    assert_eq!(live, [common::webhooks::apns_id("live")]);
    let answer = answer.await.expect("push task");
    assert_eq!(answer.status, 200, "{answer:?}");
    let mut refused = push(&other, "unregistered", later(), None);
    refused.topic = Some("com.example.other".into());
    let answer = provider.push(&refused).await.expect("push");
    assert_eq!((answer.status, answer.reason.as_deref()), (410, Some("Unregistered")));
    link.close().await.expect("close");

    // Offline: a discard, and a collapse whose survivor is stored and then acked on a new link.
    for (label, expiration, collapse) in
        [("discarded", 0, None), ("first", later(), Some("c")), ("second", later(), Some("c"))]
    {
        let answer = provider.push(&push(&token, label, expiration, collapse)).await.expect("push");
        assert_eq!(answer.status, 200, "{label}: {answer:?}");
    }
    let mut link = common::link_again(&endpoints[0], &credentials, 50).await;
    assert_eq!(link.node_addr.to_string(), owner_addr);
    assert_eq!(ack_all(&mut link, Duration::from_millis(500)).await, [common::webhooks::apns_id("second")]);
    link.close().await.expect("close");
    eventually(Duration::from_secs(10), "the owner tried the endpoint", || {
        std::future::ready(!receiver.requests().is_empty())
    })
    .await;
    assert!(receiver.accepted_events().is_empty(), "the endpoint refused every attempt so far");

    // The owner dies with all of them queued; the endpoint recovers.
    let victim = nodes.iter().position(|n| n.device_addr == owner_addr).expect("the owner");
    let victim_id = nodes[victim].id;
    nodes[victim].child.start_kill().expect("SIGKILL");
    let _ = nodes[victim].child.wait().await;
    receiver.fail_next(0);
    eventually(Duration::from_secs(30), "the gateway sees the owner down", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(view.is_some_and(|v| !v.ring.members().contains(&victim_id)))
    })
    .await;
    // A stored ack whose copy was not removed yet on the successor reaches the device again there; its
    // ack makes the receipt then. Either way, it must arrive.
    let alive = endpoints.iter().find(|e| e.addr.to_string() != owner_addr).expect("a live node");
    let mut link = common::link_again(alive, &credentials, 50).await;
    assert_ne!(link.node_addr.to_string(), owner_addr);
    ack_all(&mut link, Duration::from_millis(500)).await;

    let expected = [
        ("live", "delivered"),
        ("unregistered", "unregistered"),
        ("discarded", "dropped"),
        ("first", "dropped"),
        ("second", "delivered"),
    ];
    eventually(Duration::from_secs(30), "every receipt from the new owner", || {
        let events = receiver.accepted_events();
        std::future::ready(expected.iter().all(|(label, outcome)| event(&events, label, outcome).is_some()))
    })
    .await;
    let events = receiver.accepted_events();
    assert_eq!(event(&events, "first", "dropped").and_then(|e| e["reason"].as_str()), Some("collapsed"));
    assert_eq!(event(&events, "discarded", "dropped").and_then(|e| e["reason"].as_str()), Some("discarded"));
    assert!(events.iter().all(|e| e["topic"] == TOPIC || e["outcome"] == "unregistered"), "{events:?}");
    // They came from the copies the new owner held (the collapse's from its own copy of the queue), not
    // only from notifications delivered again.
    let new_owner = nodes.iter().find(|n| n.device_addr == link.node_addr.to_string()).expect("the new owner");
    let text = common::http_get(&format!("http://{}/metrics", new_owner.metrics_addr)).await;
    let adopted = common::metric_value(&text, r#"courier_webhook_events_total{outcome="adopted"}"#).unwrap_or(0.0);
    assert!(adopted >= 4.0, "held receipts taken over: {adopted}");
    link.close().await.expect("close");
    gateway.shutdown().await;
}

/// A new device, linked through `endpoint` and registered, is pushed `label` and acks it before any commit
/// (answered 200); then its link closes. Gives its token and its owner's device address.
async fn acked_push(
    endpoint: &courier_device::DeviceEndpoint,
    provider: &courier_gateway::provider::ProviderClient,
    signer: &courier_gateway::provider::JwtSigner,
    label: &str,
) -> (String, String) {
    let (_, mut link, token) = common::registered_device(endpoint).await;
    let owner_addr = link.node_addr.to_string();
    let answer = tokio::spawn({
        let (provider, push) = (provider.clone(), labelled_push(signer, &token, label, later(), None));
        async move { provider.push(&push).await.expect("push") }
    });
    assert_eq!(ack_all(&mut link, Duration::from_millis(500)).await, [common::webhooks::apns_id(label)]);
    assert_eq!(answer.await.expect("push task").status, 200);
    link.close().await.expect("close");
    (token, owner_addr)
}

/// The sum of `courier_webhook_events_total{outcome}` over `nodes`' metrics endpoints.
async fn outcome_total(nodes: &[&common::NodeProcess], outcome: &str) -> f64 {
    let name = format!(r#"courier_webhook_events_total{{outcome="{outcome}"}}"#);
    let mut total = 0.0;
    for node in nodes {
        let text = common::http_get(&format!("http://{}/metrics", node.metrics_addr)).await;
        total += common::metric_value(&text, &name).unwrap_or(0.0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_kept_unsaved_is_sent_by_the_new_owner_from_the_copy_the_gateway_kept() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let receiver = Receiver::start().await;
    // The endpoint holds the first request for two minutes: the owner dies with it out, and it is not
    // answered within this test.
    receiver.slow_next(1, Duration::from_secs(120));
    let ProcessCluster { dir: _dir, mut nodes, gateway, provider, signer, endpoints } =
        cluster_with_webhook(&receiver, &["--webhook-timeout-ms", "60000"]).await;

    let (_, owner_addr) = acked_push(&endpoints[0], &provider, &signer, "kept").await;

    // Kept by the gateway, which forwarded the push: copied to no other node, and written nowhere.
    let owner = nodes.iter().position(|n| n.device_addr == owner_addr).expect("the owner");
    assert_eq!(gateway.receipt_copies.len(), 1, "the gateway keeps the receipt's copy");
    // Its request has had time to leave (a batch waits 50 ms): the endpoint holds it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for outcome in ["copied", "saved", "queued"] {
        assert_eq!(outcome_total(&[&nodes[owner]], outcome).await, 0.0, "{outcome}");
    }
    assert_eq!(gateway.receipt_copies.len(), 1, "still kept: the owner has not sent it");
    assert!(receiver.requests().is_empty(), "no request answered yet");

    let victim_id = nodes[owner].id;
    nodes[owner].child.start_kill().expect("SIGKILL");
    let _ = nodes[owner].child.wait().await;
    eventually(Duration::from_secs(30), "the gateway sees the owner down", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(view.is_some_and(|v| !v.ring.members().contains(&victim_id)))
    })
    .await;
    eventually(Duration::from_secs(30), "the receipt from the new owner", || {
        std::future::ready(event(&receiver.accepted_events(), "kept", "delivered").is_some())
    })
    .await;
    let alive: Vec<&common::NodeProcess> = nodes.iter().filter(|n| n.id != victim_id).collect();
    assert!(outcome_total(&alive, "adopted").await >= 1.0, "taken over from the gateway's copy");
    assert!(gateway.receipt_copies.is_empty(), "handed over, not kept");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_an_owner_lost_in_a_quick_restart_is_handed_back_to_it_by_the_gateway() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let receiver = Receiver::start().await;
    receiver.slow_next(1, Duration::from_secs(120));
    // The owner is back long before anyone would mark it down: the ring never changes, and only the start
    // time in its answers tells the gateway that the receipt it kept in memory is gone.
    let extra = ["--webhook-timeout-ms", "60000", "--failure-timeout-ms", "60000"];
    let ProcessCluster { dir, mut nodes, gateway, provider, signer, endpoints } =
        cluster_with_webhook(&receiver, &extra).await;

    let (token, owner_addr) = acked_push(&endpoints[0], &provider, &signer, "kept").await;
    assert_eq!(gateway.receipt_copies.len(), 1, "the gateway keeps the receipt's copy");
    // Its request has had time to leave: the endpoint holds it, and the owner keeps it in memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.requests().is_empty(), "no request answered yet");

    let owner = nodes.iter().position(|n| n.device_addr == owner_addr).expect("the owner");
    let (id, members) = (nodes[owner].id, gateway.view.borrow().as_ref().map(|v| v.ring.members().to_vec()));
    let port = |addr: &str| addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).expect("port");
    let ports = (port(&nodes[owner].device_addr), port(&nodes[owner].cluster_addr));
    nodes[owner].child.start_kill().expect("SIGKILL");
    let _ = nodes[owner].child.wait().await;
    let seed = nodes[(owner + 1) % nodes.len()].cluster_addr.clone();
    let flags = webhook_flags(&receiver, &extra);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    nodes[owner] = common::spawn_node_with(dir.path(), id, Some(&seed), Some(ports), &flags).await;

    // A push to the same device (offline now, so stored) reaches the new process; its answer's start time
    // has the gateway hand the copy back, and the owner sends it.
    let stored = provider.push(&labelled_push(&signer, &token, "after", later(), None)).await.expect("push");
    assert_eq!(stored.status, 200, "{stored:?}");
    eventually(Duration::from_secs(30), "the receipt from the restarted owner", || {
        std::future::ready(event(&receiver.accepted_events(), "kept", "delivered").is_some())
    })
    .await;
    assert_eq!(
        gateway.view.borrow().as_ref().map(|v| v.ring.members().to_vec()),
        members,
        "the ring never changed: the start time alone told the gateway"
    );
    assert!(outcome_total(&[&nodes[owner]], "adopted").await >= 1.0, "taken over from the gateway's copy");
    assert!(gateway.receipt_copies.is_empty(), "handed over, not kept");
    gateway.shutdown().await;
}
