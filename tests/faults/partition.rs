//! Fenced ownership under partitions and pauses, with real `courier node` processes (each in a network
//! namespace of its own, `common::fabric`, where the fault is a network one) and the gateway, the provider
//! and the devices in the test's process.
//!
//! The scenario that lost 56 of 96 acknowledged pushes before: three nodes, 24 devices registered and then
//! offline, the leader (whose cluster watch the gateway follows) cut off from the other two nodes while the
//! gateway and the devices still reach it, four pushes per device during the cut, then the cut-off node
//! SIGKILLed and the network healed, then the devices back. Every push answered 200 must arrive, once, at
//! its own device; every answer during the cut is 200 or 503 and comes within the request timeout; and the
//! cut-off node stops acting as an owner once its lease runs out: it reports not ready.
//!
//! The pause: a follower SIGSTOPped for longer than the failure timeout (its sockets still accept, nothing
//! answers: the "peer that accepts and never answers" too) while pushes go to every device, then resumed.
//! It is marked active again only after answering steadily for `--rejoin-after-ms`, its devices' queues move
//! back to it, and every push answered 200, before or after, arrives once at its own device.
//!
//! A symmetric partition: a follower cut off from everything (the other nodes, the gateway and the
//! devices) while pushes go to every device; after the heal it is active again and every push answered
//! 200 arrives once.
//!
//! A partition during a rolling restart: one node cut off from the others while the two others are
//! restarted in turn (SIGTERM, drain, start again on the same data and addresses), so that for a while no
//! Raft quorum exists; pushes keep coming the whole time. Answers are 200 or 503 within the request
//! timeout, and after the heal every push answered 200 arrives once.

use crate::ONE_AT_A_TIME;
use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::fabric::Fabric;
use common::{ProcessCluster, eventually, http_get, push_for, signal, spawn_node_in};
use courier_device::{DeviceCredentials, DeviceEndpoint, DeviceLink, LinkEvent};
use courier_gateway::provider::{JwtSigner, ProviderClient, PushResponse};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);

/// What arrives on a link (acked) until half a second passes with nothing new once all of `expected` is in, up to `limit` in all; and
/// whether the link is still up. A link ends early when the device's owner changes (the node sends a
/// redirect and closes it), as it may while a healed node rejoins.
async fn collect(link: &mut DeviceLink, expected: &BTreeSet<String>, limit: Duration) -> (Vec<String>, bool) {
    let started = Instant::now();
    let mut got = Vec::new();
    while started.elapsed() < limit {
        let have: BTreeSet<&String> = got.iter().collect();
        let wait = if expected.iter().all(|id| have.contains(id)) { Duration::from_millis(500) } else { limit };
        match tokio::time::timeout(wait, link.next_event()).await {
            Err(_) => break,
            Ok(Err(_)) | Ok(Ok(LinkEvent::Redirect(_))) => return (got, false),
            Ok(Ok(LinkEvent::Notification(n))) => {
                link.ack(&n.apns_id).await.expect("ack");
                got.push(n.apns_id);
            }
            Ok(Ok(LinkEvent::TokenUpdated { .. } | LinkEvent::Missed(_))) => {}
        }
    }
    (got, true)
}

/// `count` devices, each activated and registered through node `i % 3`, then offline.
async fn offline_devices(endpoints: &[DeviceEndpoint], count: usize) -> Vec<(DeviceCredentials, String)> {
    let mut devices = Vec::new();
    for i in 0..count {
        let endpoint = &endpoints[i % endpoints.len()];
        let (credentials, link, token) = common::registered_device(endpoint).await;
        link.close().await.expect("close");
        devices.push((credentials, token));
    }
    devices
}

/// How many of `devices` node `node` owns in the gateway's view.
fn owned_by(gateway: &courier_gateway::RunningGateway, devices: &[(DeviceCredentials, String)], node: u64) -> usize {
    let view = gateway.view.borrow();
    devices
        .iter()
        .filter(|(c, _)| view.as_ref().and_then(|v| v.owner(c.device_id)).is_some_and(|o| o.0 == node))
        .count()
}

/// One push and its answer.
struct Answered {
    device: usize,
    apns_id: String,
    answer: PushResponse,
    took: Duration,
}

/// `per_device` pushes to every device, all at once; each answer is 200 or 503 and comes within the
/// request timeout.
async fn push_all(
    provider: &ProviderClient,
    signer: &JwtSigner,
    devices: &[(DeviceCredentials, String)],
    per_device: usize,
) -> Vec<Answered> {
    let mut pushes = Vec::new();
    for (d, (_, token)) in devices.iter().enumerate() {
        for k in 0..per_device {
            let mut push = push_for(signer, token, &format!(r#"{{"aps":{{"alert":"{d}/{k}"}}}}"#));
            push.apns_id = Some(uuid::Uuid::new_v4().to_string());
            pushes.push((d, push));
        }
    }
    let answers = futures_util::future::join_all(pushes.into_iter().map(|(device, push)| async move {
        let started = Instant::now();
        let answer = provider.push(&push).await.expect("request reaches the gateway");
        Answered { device, apns_id: push.apns_id.expect("apns-id"), answer, took: started.elapsed() }
    }))
    .await;
    for Answered { answer, took, .. } in &answers {
        assert!(
            answer.status == 200 || (answer.status == 503 && answer.reason.as_deref() == Some("ServiceUnavailable")),
            "every answer during a fault is 200 or 503: {answer:?}"
        );
        assert!(*took < REQUEST_TIMEOUT + Duration::from_secs(3), "answered within the request timeout: {took:?}");
    }
    answers
}

/// Brings every device back through `endpoint` (following redirects) and checks the ledger: each push in
/// `answers` that was answered 200 arrives, and nothing arrives at a device it was not sent to.
async fn every_200_arrives(
    endpoint: &DeviceEndpoint,
    devices: &[(DeviceCredentials, String)],
    answers: &[Answered],
) -> usize {
    let mut lost = Vec::new();
    let mut answered_200 = 0;
    for (d, (credentials, _)) in devices.iter().enumerate() {
        let expected: BTreeSet<String> =
            answers.iter().filter(|a| a.device == d && a.answer.status == 200).map(|a| a.apns_id.clone()).collect();
        answered_200 += expected.len();
        // Link, collect, and link again (following redirects) if the link ends before the quiet spell.
        let mut got = Vec::new();
        let started = Instant::now();
        loop {
            let mut link = common::link_again(endpoint, credentials, 150).await;
            let (more, still_up) = collect(&mut link, &expected, Duration::from_secs(15)).await;
            got.extend(more);
            if still_up {
                let _ = link.close().await;
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "device {d}'s links keep ending");
        }
        let sent_to_it: BTreeSet<&String> = answers.iter().filter(|a| a.device == d).map(|a| &a.apns_id).collect();
        assert!(got.iter().all(|id| sent_to_it.contains(id)), "device {d} got only its own notifications");
        let distinct: BTreeSet<&String> = got.iter().collect();
        lost.extend(expected.iter().filter(|id| !distinct.contains(id)).map(|id| format!("{d}:{id}")));
    }
    assert!(lost.is_empty(), "{} of {answered_200} pushes answered 200 never arrived: {lost:?}", lost.len());
    answered_200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_peers_loses_nothing_answered_200() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut fabric = Fabric::new(&[1, 2, 3]).expect("a network namespace per node (root and iproute2)");
    let ProcessCluster { dir: _dir, mut nodes, gateway, provider, signer, endpoints } =
        ProcessCluster::start_on(Some(&fabric), &[], |config| {
            config.request_timeout_ms = REQUEST_TIMEOUT.as_millis() as u64;
        })
        .await;
    eventually(Duration::from_secs(20), "node 1 leads", || {
        std::future::ready(gateway.view.borrow().as_ref().is_some_and(|v| v.leader == 1))
    })
    .await;

    let devices = offline_devices(&endpoints, 24).await;
    assert!(owned_by(&gateway, &devices, 1) > 0, "node 1 owns some of the 24 devices");

    let lapses_before = metric(&nodes[0], "courier_node_lease_lapses_total{node=\"1\"}").await;
    fabric.isolate(1).expect("cut node 1 off");
    let node_1_ready = format!("http://{}/readyz", nodes[0].metrics_addr);
    eventually(Duration::from_secs(10), "the cut-off node reports not ready once its lease ends", || {
        let url = node_1_ready.clone();
        async move { !http_get(&url).await.starts_with("HTTP/1.1 200") }
    })
    .await;
    // The lapse is counted once (a cut is one lapse however often it is looked at), and the gauge says 0.
    assert_eq!(metric(&nodes[0], "courier_node_lease_lapses_total{node=\"1\"}").await, lapses_before + 1.0);
    eventually(Duration::from_secs(5), "the lease gauge says it is not held", || async {
        metric(&nodes[0], "courier_node_lease_held{node=\"1\"}").await == 0.0
    })
    .await;

    // Four pushes per device during the cut, all at once.
    let answers = push_all(&provider, &signer, &devices, 4).await;
    let during = answers.iter().filter(|a| a.answer.status == 200).count();
    assert!(during > 0, "the majority side keeps accepting pushes");
    println!("during the cut: {during} of {} pushes answered 200, the rest 503", answers.len());

    // The cut-off node dies, the network heals, the devices come back through node 2.
    nodes[0].child.start_kill().expect("SIGKILL");
    let _ = nodes[0].child.wait().await;
    fabric.heal().expect("heal");
    every_200_arrives(&endpoints[1], &devices, &answers).await;
    gateway.shutdown().await;
}

/// A sample's value in `node`'s `/metrics` (`series` is its name and labels, as printed), 0 when absent.
async fn metric(node: &common::NodeProcess, series: &str) -> f64 {
    let scrape = http_get(&format!("http://{}/metrics", node.metrics_addr)).await;
    let value = scrape.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' '));
    value.map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// How long a paused node must answer steadily before it is active again, in the pause test.
const REJOIN_AFTER: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_the_failure_timeout_loses_nothing_and_rejoins_only_once_steady() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let rejoin_ms = REJOIN_AFTER.as_millis().to_string();
    let ProcessCluster { dir: _dir, nodes, gateway, provider, signer, endpoints } =
        ProcessCluster::start_on(None, &["--rejoin-after-ms", &rejoin_ms], |config| {
            config.request_timeout_ms = REQUEST_TIMEOUT.as_millis() as u64;
        })
        .await;
    let members = || gateway.view.borrow().as_ref().map_or(0, |v| v.ring.members().len());
    let devices = offline_devices(&endpoints, 24).await;
    // A follower: pausing the leader would also test an election, which the failover tests do.
    let leader = gateway.view.borrow().as_ref().expect("a view").leader;
    let paused = nodes.iter().find(|n| n.id != leader).expect("a follower");
    let owned = owned_by(&gateway, &devices, paused.id);
    assert!(owned > 0, "the paused node owns some of the 24 devices");

    signal(paused, "-STOP");
    let mut answers = push_all(&provider, &signer, &devices, 3).await;
    let during = answers.iter().filter(|a| a.answer.status == 200).count();
    println!("during the pause: {during} of {} pushes answered 200, the rest 503", answers.len());
    assert!(during > 0, "the others keep accepting pushes");
    eventually(Duration::from_secs(10), "the paused node is marked down", || std::future::ready(members() == 2)).await;

    signal(paused, "-CONT");
    let resumed = Instant::now();
    eventually(Duration::from_secs(30), "the resumed node is active again", || std::future::ready(members() == 3))
        .await;
    let back_after = resumed.elapsed();
    println!("marked active again {back_after:?} after it resumed");
    assert!(
        back_after >= REJOIN_AFTER - Duration::from_millis(500),
        "a node that was down rejoins only after answering for --rejoin-after-ms: {back_after:?}"
    );

    // More pushes now that its devices are its own again (their queues moved back to it), then the ledger.
    answers.extend(push_all(&provider, &signer, &devices, 1).await);
    let answered_200 = every_200_arrives(&endpoints[0], &devices, &answers).await;
    assert!(answered_200 > during, "pushes after the pause are accepted");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_during_a_rolling_restart_loses_nothing_answered_200() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut fabric = Fabric::new(&[1, 2, 3]).expect("a network namespace per node (root and iproute2)");
    let ProcessCluster { dir, mut nodes, gateway, provider, signer, endpoints } =
        ProcessCluster::start_on(Some(&fabric), &[], |config| {
            config.request_timeout_ms = REQUEST_TIMEOUT.as_millis() as u64;
        })
        .await;
    let devices = std::sync::Arc::new(offline_devices(&endpoints, 24).await);
    fabric.isolate(3).expect("cut node 3 off");
    eventually(Duration::from_secs(10), "the cut-off node is marked down", || {
        std::future::ready(gateway.view.borrow().as_ref().is_some_and(|v| v.ring.members().len() == 2))
    })
    .await;

    // One push per device after another, until the restarts are over.
    let stop = tokio_util::sync::CancellationToken::new();
    let pushing = tokio::spawn({
        let (stop, devices) = (stop.clone(), devices.clone());
        async move {
            let mut answers = Vec::new();
            while !stop.is_cancelled() {
                answers.extend(push_all(&provider, &signer, &devices, 1).await);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            answers
        }
    });
    for index in [0, 1] {
        let id = nodes[index].id;
        let port = |addr: &str| addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).expect("a port");
        let ports = (port(&nodes[index].device_addr), port(&nodes[index].cluster_addr));
        nodes[index].terminate(Duration::from_secs(40)).await;
        let (namespace, host) = (fabric.namespace(id), fabric.host(id));
        nodes[index] = spawn_node_in(dir.path(), id, None, Some((&namespace, &host)), Some(ports), &[]).await;
        let ready = format!("http://{}/readyz", nodes[index].metrics_addr);
        eventually(Duration::from_secs(40), &format!("node {id} is ready again after its restart"), || {
            let url = ready.clone();
            async move { http_get(&url).await.starts_with("HTTP/1.1 200") }
        })
        .await;
    }
    fabric.heal().expect("heal");
    stop.cancel();
    let answers = pushing.await.expect("pushes");
    eventually(Duration::from_secs(30), "the cut-off node is active again after the heal", || {
        std::future::ready(gateway.view.borrow().as_ref().is_some_and(|v| v.ring.members().len() == 3))
    })
    .await;
    let during = answers.iter().filter(|a| a.answer.status == 200).count();
    println!("during the partition and the restarts: {during} of {} pushes answered 200", answers.len());
    assert!(during > 0, "pushes are accepted while a quorum exists");
    every_200_arrives(&endpoints[0], &devices, &answers).await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_everything_loses_nothing_answered_200_and_rejoins_after_the_heal() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut fabric = Fabric::new(&[1, 2, 3]).expect("a network namespace per node (root and iproute2)");
    let ProcessCluster { dir: _dir, nodes, gateway, provider, signer, endpoints } =
        ProcessCluster::start_on(Some(&fabric), &[], |config| {
            config.request_timeout_ms = REQUEST_TIMEOUT.as_millis() as u64;
        })
        .await;
    let members = || gateway.view.borrow().as_ref().map_or(0, |v| v.ring.members().len());
    let devices = offline_devices(&endpoints, 24).await;
    let leader = gateway.view.borrow().as_ref().expect("a view").leader;
    let cut = nodes.iter().position(|n| n.id != leader).expect("a follower");
    let owned = owned_by(&gateway, &devices, nodes[cut].id);
    assert!(owned > 0, "the cut-off node owns some of the 24 devices");

    fabric.cut_off(nodes[cut].id).expect("cut the node off from everything");
    let mut answers = push_all(&provider, &signer, &devices, 3).await;
    let during = answers.iter().filter(|a| a.answer.status == 200).count();
    println!("during the partition: {during} of {} pushes answered 200", answers.len());
    assert!(during > 0, "the majority side keeps accepting pushes");
    eventually(Duration::from_secs(10), "the cut-off node is marked down", || std::future::ready(members() == 2)).await;

    fabric.heal().expect("heal");
    eventually(Duration::from_secs(30), "the node is active again after the heal", || {
        std::future::ready(members() == 3)
    })
    .await;
    answers.extend(push_all(&provider, &signer, &devices, 1).await);
    let leader_index = nodes.iter().position(|n| n.id == leader).expect("the leader");
    every_200_arrives(&endpoints[leader_index], &devices, &answers).await;
    gateway.shutdown().await;
}
