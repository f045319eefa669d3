//! Fenced ownership under a network partition, with real `courier node` processes each in a network
//! namespace of its own (`common::fabric`) and the gateway, the provider and the devices in the test's.
//!
//! The scenario that lost 56 of 96 acknowledged pushes before: three nodes, 24 devices registered and then
//! offline, the leader (whose cluster watch the gateway follows) cut off from the other two nodes while the
//! gateway and the devices still reach it, four pushes per device during the cut, then the cut-off node
//! SIGKILLed and the network healed, then the devices back. Every push answered 200 must arrive, once, at
//! its own device; every answer during the cut is 200 or 503 and comes within the request timeout; and the
//! cut-off node stops acting as an owner once its lease runs out: it reports not ready.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::fabric::Fabric;
use common::{ProcessCluster, TOPIC, eventually, http_get, push_for};
use courier_node::client::{DeviceCredentials, DeviceLink, LinkEvent};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);

/// Everything that arrives on a link within `quiet` of the last arrival, up to `limit` in all, acked.
async fn collect(link: &mut DeviceLink, expected: &BTreeSet<String>, limit: Duration) -> Vec<String> {
    let started = Instant::now();
    let mut got = Vec::new();
    while started.elapsed() < limit {
        let have: BTreeSet<&String> = got.iter().collect();
        let wait = if expected.iter().all(|id| have.contains(id)) { Duration::from_millis(500) } else { limit };
        match tokio::time::timeout(wait, link.next_event()).await {
            Err(_) => break,
            Ok(Err(error)) => panic!("the link failed: {error}"),
            Ok(Ok(LinkEvent::Notification(n))) => {
                link.ack(&n.apns_id).await.expect("ack");
                got.push(n.apns_id);
            }
            Ok(Ok(_)) => {}
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_peers_loses_nothing_answered_200() {
    let mut fabric = Fabric::new(&[1, 2, 3]);
    let ProcessCluster { dir: _dir, mut nodes, gateway, provider, signer, endpoints } =
        ProcessCluster::start_on(Some(&fabric), &[], |config| {
            config.request_timeout_ms = REQUEST_TIMEOUT.as_millis() as u64;
        })
        .await;
    eventually(Duration::from_secs(20), "node 1 leads", || {
        std::future::ready(gateway.view.borrow().as_ref().is_some_and(|v| v.leader == 1))
    })
    .await;

    // 24 devices, registered, then offline.
    let mut devices: Vec<(DeviceCredentials, String)> = Vec::new();
    for i in 0..24 {
        let endpoint = &endpoints[i % 3];
        let credentials = courier_node::client::activate(endpoint, "").await.expect("activation");
        let mut link = DeviceLink::connect(endpoint, &credentials, 0).await.expect("device connects");
        let token = link.register(TOPIC).await.expect("register");
        link.close().await.expect("close");
        devices.push((credentials, token));
    }
    let owned_by_1 = devices
        .iter()
        .filter(|(c, _)| gateway.view.borrow().as_ref().and_then(|v| v.owner(c.device_id)).is_some_and(|o| o.0 == 1))
        .count();
    assert!(owned_by_1 > 0, "node 1 owns some of the 24 devices");

    fabric.isolate(1);
    let node_1_ready = format!("http://{}/readyz", nodes[0].metrics_addr);
    eventually(Duration::from_secs(10), "the cut-off node reports not ready once its lease ends", || {
        let url = node_1_ready.clone();
        async move { !http_get(&url).await.starts_with("HTTP/1.1 200") }
    })
    .await;

    // Four pushes per device during the cut, all at once.
    let mut pushes = Vec::new();
    for (d, (_, token)) in devices.iter().enumerate() {
        for k in 0..4 {
            let mut push = push_for(&signer, token, &format!(r#"{{"aps":{{"alert":"{d}/{k}"}}}}"#));
            push.apns_id = Some(uuid::Uuid::new_v4().to_string());
            pushes.push((d, push));
        }
    }
    let answers = futures_util::future::join_all(pushes.into_iter().map(|(d, push)| {
        let provider = provider.clone();
        async move {
            let started = Instant::now();
            let answer = provider.push(&push).await.expect("request reaches the gateway");
            (d, push.apns_id.expect("apns-id"), answer, started.elapsed())
        }
    }))
    .await;
    let mut accepted: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for (d, apns_id, answer, took) in &answers {
        assert!(
            answer.status == 200 || (answer.status == 503 && answer.reason.as_deref() == Some("ServiceUnavailable")),
            "every answer during the cut is 200 or 503: {answer:?}"
        );
        assert!(*took < REQUEST_TIMEOUT + Duration::from_secs(3), "answered within the request timeout: {took:?}");
        if answer.status == 200 {
            accepted.entry(*d).or_default().insert(apns_id.clone());
        }
    }
    let answered_200: usize = accepted.values().map(BTreeSet::len).sum();
    assert!(answered_200 > 0, "the majority side keeps accepting pushes");
    println!("during the cut: {answered_200} of {} pushes answered 200, the rest 503", answers.len());

    // The cut-off node dies, the network heals, the devices come back through node 2.
    nodes[0].child.start_kill().expect("SIGKILL");
    let _ = nodes[0].child.wait().await;
    fabric.heal();
    let mut lost = Vec::new();
    for (d, (credentials, _)) in devices.iter().enumerate() {
        let expected = accepted.get(&d).cloned().unwrap_or_default();
        let mut link = None;
        for _ in 0..150 {
            match DeviceLink::connect(&endpoints[1], credentials, 0).await {
                Ok(linked) => {
                    link = Some(linked);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let mut link = link.expect("the device links to a survivor");
        let got = collect(&mut link, &expected, Duration::from_secs(15)).await;
        let _ = link.close().await;
        let sent_to_it: BTreeSet<&String> =
            answers.iter().filter(|(device, ..)| *device == d).map(|(_, apns_id, ..)| apns_id).collect();
        assert!(got.iter().all(|id| sent_to_it.contains(id)), "device {d} got only its own notifications");
        let distinct: BTreeSet<&String> = got.iter().collect();
        lost.extend(expected.iter().filter(|id| !distinct.contains(id)).map(|id| format!("{d}:{id}")));
    }
    assert!(lost.is_empty(), "{} of {answered_200} pushes answered 200 never arrived: {lost:?}", lost.len());
    gateway.shutdown().await;
}
