//! Control-plane changes as providers and devices see them: a token-key rotation under a steady stream of
//! pushes, retiring the old key, provider keys that come and go, device revocation, and every node and the
//! gateway agreeing on the ring before and after a member joins. Commands go through Raft on real
//! in-process nodes; what is asserted is only what crosses a wire (HTTP/2 answers, device-link frames) or
//! the applied state each process routes by, and that commands out of the state's limits are refused
//! before they reach the log. It does not test Raft itself; `cluster.rs` does.

use crate::common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Nodes, TOPIC, TestCluster, eventually, push_for};
use courier_core::ids::{DeviceId, unix_millis};
use courier_core::pki::ProviderCredential;
use courier_core::state::{Command, CommandResponse, KeyState, MemberState, RingParams, limits};
use courier_device::{ClientError, DeviceLink, LinkEvent};
use courier_gateway::RunningGateway;
use courier_gateway::provider::{JwtSigner, PushResponse};
use courier_gateway::watch::GatewayView;
use courier_node::raft::control::ControlError;
use courier_node::view::EpochView;
use courier_proto::device::GoodbyeReason;
use tokio::sync::watch;

/// Pushes in the rotation stream.
const STREAM_PUSHES: usize = 300;
/// The stream rotates once this many pushes are answered.
const ROTATE_AFTER: usize = 100;
/// Push after which the stream waits (bounded) for the gateway to route by the rotated epoch, so the
/// pushes after it are certainly answered under the new key set, whatever the machine's speed.
const ROTATION_SEEN_BY: usize = 200;

/// Waits until the gateway routes by `epoch` or later.
async fn gateway_reaches(gateway: &RunningGateway, epoch: u64) {
    eventually(Duration::from_secs(20), &format!("the gateway routes by epoch {epoch}"), || {
        std::future::ready(gateway.epoch().is_some_and(|e| e >= epoch))
    })
    .await;
}

/// Waits until every running node has applied `epoch`.
async fn nodes_reach(nodes: &Nodes, epoch: u64) {
    eventually(Duration::from_secs(20), &format!("every node applied epoch {epoch}"), || {
        std::future::ready(nodes.running().all(|n| n.control.current().epoch.0 >= epoch))
    })
    .await;
}

async fn next_notification_in_time(link: &mut DeviceLink) -> courier_proto::device::Notification {
    tokio::time::timeout(Duration::from_secs(10), link.next_notification())
        .await
        .expect("a notification within 10s")
        .expect("the link stays healthy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_token_key_under_a_push_stream_fails_no_push_and_retiring_it_expires_old_tokens() {
    let nodes = Nodes::start(3, |_| {}).await;
    // One device takes the whole stream: its per-device rate limit is not what this test is about.
    let (gateway, provider, signer) = nodes.gateway_with(|config| config.device_burst = 10_000).await;
    let control = nodes.node(1).control.clone();
    let old_key = control.current().active_key().expect("the cluster starts with an active key").key.id;

    let credentials = courier_device::activate(&nodes.endpoint(1), "").await.expect("activation");
    let mut link = DeviceLink::connect(&nodes.endpoint(1), &credentials, 0).await.expect("device connects");
    let old_token = link.register(TOPIC).await.expect("register");

    // The device reads concurrently with the stream, as a phone would.
    let reader = tokio::spawn(async move {
        let mut received = Vec::new();
        let give_up = tokio::time::Instant::now() + Duration::from_secs(90);
        while received.len() < STREAM_PUSHES {
            match tokio::time::timeout_at(give_up, link.next_notification()).await {
                Ok(Ok(n)) => received.push(n.apns_id),
                Ok(Err(error)) => panic!("the device link failed mid-stream: {error}"),
                Err(_) => break,
            }
        }
        (link, received)
    });

    let answered = Arc::new(AtomicUsize::new(0));
    let (rotated_tx, rotated_rx) = watch::channel(None::<u64>);
    let stream = tokio::spawn({
        let (provider, signer, token, answered) =
            (provider.clone(), signer.clone(), old_token.clone(), answered.clone());
        let mut gateway_view = gateway.view.clone();
        let mut rotated = rotated_rx;
        async move {
            let mut responses: Vec<PushResponse> = Vec::with_capacity(STREAM_PUSHES);
            for i in 0..STREAM_PUSHES {
                if i == ROTATION_SEEN_BY {
                    let seen = async {
                        let announced = *rotated.wait_for(Option::is_some).await.expect("rotation is announced");
                        let epoch = announced.expect("an announced epoch");
                        let routed = gateway_view.wait_for(|v| v.as_ref().is_some_and(|v| v.epoch.0 >= epoch)).await;
                        routed.map(|_| ()).expect("the gateway's view is alive");
                    };
                    tokio::time::timeout(Duration::from_secs(20), seen)
                        .await
                        .expect("the gateway routes by the rotated epoch within 20s");
                }
                let push = push_for(&signer, &token, &format!(r#"{{"n":{i}}}"#));
                let response = tokio::time::timeout(Duration::from_secs(10), provider.push(&push))
                    .await
                    .expect("an answer within 10s")
                    .expect("the request reaches the gateway");
                responses.push(response);
                answered.fetch_add(1, Ordering::SeqCst);
                // Pacing, so that the rotation lands between pushes rather than after all of them.
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            responses
        }
    });

    eventually(Duration::from_secs(30), "the stream is under way", || {
        std::future::ready(answered.load(Ordering::SeqCst) >= ROTATE_AFTER)
    })
    .await;
    let rotated_epoch = control
        .apply(Command::RotateTokenKey { key: control.next_token_key(), now_ms: unix_millis() })
        .await
        .expect("rotation applies");
    let answered_at_rotation = answered.load(Ordering::SeqCst);
    rotated_tx.send_replace(Some(rotated_epoch.0));

    let responses = stream.await.expect("the stream task");
    // The stream holds at ROTATION_SEEN_BY until the gateway has the new epoch, so pushes on both sides
    // of the rotation, and during it, were answered.
    assert!(
        (ROTATE_AFTER..=ROTATION_SEEN_BY).contains(&answered_at_rotation),
        "the rotation happened mid-stream, after {answered_at_rotation} answers"
    );
    for (i, response) in responses.iter().enumerate() {
        assert_eq!(response.status, 200, "push {i} during rotation: {response:?}");
    }
    let accepted: Vec<String> = responses.iter().map(|r| r.apns_id.clone().expect("a 200 names its apns-id")).collect();
    let accepted_set: HashSet<&String> = accepted.iter().collect();
    assert_eq!(accepted_set.len(), STREAM_PUSHES, "the gateway gave every push its own apns-id");

    let (mut link, received) = reader.await.expect("the reader task");
    assert_eq!(received.len(), STREAM_PUSHES, "the device got every push");
    let received_set: HashSet<&String> = received.iter().collect();
    assert_eq!(received_set, accepted_set, "the device got exactly the accepted apns-ids");
    let extra = tokio::time::timeout(Duration::from_secs(10), link.sync()).await.expect("sync in time").expect("sync");
    let extra: Vec<&str> = extra.iter().map(|n| n.apns_id.as_str()).collect();
    assert!(extra.is_empty(), "nothing arrives twice or unasked for: {extra:?}");

    // The old token still opens: its key is accepting, not retired.
    let state = control.current();
    assert_eq!(state.token_keys[&old_key].state, KeyState::Accepting);
    let new_key = state.active_key().expect("an active key").key.id;
    assert_ne!(new_key, old_key);
    let response = provider.push(&push_for(&signer, &old_token, r#"{"after":"rotation"}"#)).await.expect("push");
    assert_eq!(response.status, 200, "{response:?}");
    let after_rotation_id = response.apns_id.clone();
    let after_rotation = next_notification_in_time(&mut link).await;
    assert_eq!(Some(&after_rotation.apns_id), after_rotation_id.as_ref());

    // Retired: the old token is recognised but expired.
    let retired_epoch = control
        .apply(Command::RetireTokenKey { id: old_key, now_ms: unix_millis() })
        .await
        .expect("retiring an accepting key applies");
    gateway_reaches(&gateway, retired_epoch.0).await;
    nodes_reach(&nodes, retired_epoch.0).await;
    let response = provider.push(&push_for(&signer, &old_token, r#"{"after":"retirement"}"#)).await.expect("push");
    assert_eq!(response.status, 410, "{response:?}");
    assert_eq!(response.reason.as_deref(), Some("ExpiredToken"), "{response:?}");
    let body: serde_json::Value = serde_json::from_slice(&response.body).expect("a JSON error body");
    assert!(body["timestamp"].as_u64().is_some_and(|t| t > 0), "410 carries a timestamp: {body}");

    // A device that comes back holding the expired token is handed a fresh one.
    link.close().await.expect("close");
    let held = [(TOPIC.to_string(), old_token.clone())];
    let mut link =
        DeviceLink::connect_with(&nodes.endpoint(1), &credentials, 0, &held).await.expect("device reconnects");
    let event = tokio::time::timeout(Duration::from_secs(10), link.next_app_event())
        .await
        .expect("an event within 10s")
        .expect("link healthy");
    let LinkEvent::TokenUpdated { topic, token: new_token } = event else {
        panic!("expected TokenUpdated, got {event:?}");
    };
    assert_eq!(topic, TOPIC);
    assert_ne!(new_token, old_token);
    let response = provider.push(&push_for(&signer, &new_token, r#"{"fresh":"token"}"#)).await.expect("push");
    assert_eq!(response.status, 200, "{response:?}");
    let fresh_id = response.apns_id.clone().expect("apns-id");
    // A new link may see acked notifications again (delivery is at-least-once on the wire and a new
    // link has no memory of what it surfaced); anything else is a bug.
    let arrived = loop {
        let n = next_notification_in_time(&mut link).await;
        if n.apns_id == fresh_id {
            break n;
        }
        assert!(
            accepted_set.contains(&n.apns_id) || Some(&n.apns_id) == after_rotation_id.as_ref(),
            "an unknown notification arrived: {n:?}"
        );
    };
    assert_eq!(arrived.payload, br#"{"fresh":"token"}"#);

    link.close().await.expect("close");
    gateway.shutdown().await;
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_provider_key_is_refused_once_the_gateway_has_the_epoch() {
    let cluster = TestCluster::start().await;
    let control = cluster.node().control.clone();
    let (mut device, token) = cluster.device().await;
    let original = ProviderCredential::load(&cluster.pki().provider_credential()).expect("provider.json");

    let second = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key pair");
    let second_kid = "SECONDKEY1".to_string();
    let added = control
        .apply(Command::PutProviderKey {
            team_id: original.team_id.clone(),
            key_id: second_kid.clone(),
            public_key_pem: second.public_key_pem(),
            topics: original.topics.clone(),
        })
        .await
        .expect("adding a provider key applies");
    gateway_reaches(&cluster.gateway, added.0).await;

    let second_signer =
        JwtSigner::new(&original.team_id, &second_kid, second.serialize_pem().as_bytes()).expect("signer");
    let jwt = second_signer.sign();
    let with_jwt = |jwt: &str, payload: &str| {
        let mut push = push_for(&second_signer, &token, payload);
        push.authorization = Some(format!("bearer {jwt}"));
        push
    };
    let response = cluster.send(&with_jwt(&jwt, r#"{"key":"second"}"#)).await;
    assert_eq!(response.status, 200, "the added key signs pushes: {response:?}");
    assert_eq!(next_notification_in_time(&mut device).await.payload, br#"{"key":"second"}"#);

    let removed = control
        .apply(Command::RemoveProvider { team_id: original.team_id.clone(), key_id: Some(second_kid.clone()) })
        .await
        .expect("removing the key applies");
    assert!(removed > added);
    gateway_reaches(&cluster.gateway, removed.0).await;
    // The very JWT the gateway verified (and remembers) before, and a freshly signed one.
    for (what, jwt) in [("the remembered JWT", jwt), ("a fresh JWT", second_signer.sign())] {
        let response = cluster.send(&with_jwt(&jwt, r#"{"key":"removed"}"#)).await;
        assert_eq!(response.status, 403, "{what} of a removed key: {response:?}");
        assert_eq!(response.reason.as_deref(), Some("InvalidProviderToken"), "{what}: {response:?}");
    }

    let response = cluster.send(&cluster.push(&token, r#"{"key":"original"}"#)).await;
    assert_eq!(response.status, 200, "the team's other key still works: {response:?}");
    let arrived = next_notification_in_time(&mut device).await;
    assert_eq!(arrived.payload, br#"{"key":"original"}"#, "nothing signed by the removed key got through");
    let state = control.current();
    assert_eq!(state.providers[&original.team_id].keys.keys().collect::<Vec<_>>(), [&original.key_id]);

    device.close().await.expect("close");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_out_of_bounds_are_refused_before_they_reach_the_log() {
    let cluster = TestCluster::start().await;
    let control = cluster.node().control.clone();
    let epoch = control.current().epoch;
    let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key pair").public_key_pem();
    let put_provider = |team_id: String, public_key_pem: String, topics: Vec<String>| Command::PutProviderKey {
        team_id,
        key_id: "K".into(),
        public_key_pem,
        topics,
    };
    let refused = [
        (Command::SetRing { params: RingParams { vnodes: u32::MAX, replication_factor: 2 } }, "vnodes"),
        (Command::SetRing { params: RingParams { vnodes: 128, replication_factor: 0 } }, "replication factor"),
        (
            Command::PutMember {
                id: 77,
                device_addr: "d".repeat(100_000),
                cluster_addr: "c:1".into(),
                device_name: String::new(),
                now_ms: 1,
            },
            "device address",
        ),
        (
            Command::SuspectClone {
                device: DeviceId(5),
                node: 1,
                addrs: vec!["a".into(); 100],
                refuse: true,
                now_ms: 1,
            },
            "source addresses",
        ),
        (put_provider("T".repeat(1_000), pem.clone(), vec![]), "team id"),
        (put_provider("TEAM".into(), "P".repeat(1 << 20), vec![]), "public key"),
        (put_provider("TEAM".into(), pem.clone(), vec!["t.x".into(); limits::MAX_TOPICS_PER_TEAM + 1]), "topics"),
    ];
    for (command, what) in refused {
        // A refusal from the state machine would come back as `Ok(Refused)`: an error means it never got
        // as far as the log.
        match control.propose(command.clone()).await {
            Err(ControlError::Refused(reason)) => assert!(reason.contains(what), "{command}: {reason}"),
            other => panic!("{command} was not refused before the log: {other:?}"),
        }
    }
    assert_eq!(control.current().epoch, epoch, "nothing was applied");

    let params = RingParams { vnodes: limits::MAX_VNODES, replication_factor: 3 };
    let applied = control.propose(Command::SetRing { params }).await.expect("a ring within bounds is proposed");
    assert!(matches!(applied, CommandResponse::Applied { .. }), "{applied:?}");
    assert_eq!(control.current().ring, params);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_said_goodbye_and_refused_while_others_keep_receiving() {
    let cluster = TestCluster::start().await;
    let control = cluster.node().control.clone();
    let revoked = cluster.activate().await;
    let mut revoked_link = DeviceLink::connect(&cluster.endpoint(), &revoked, 0).await.expect("connects");
    revoked_link.register(TOPIC).await.expect("register");
    let (mut bystander, bystander_token) = cluster.device().await;

    let epoch = control.apply(Command::RevokeDevice { device: revoked.device_id }).await.expect("revocation applies");
    assert!(control.current().revoked.contains(&revoked.device_id));
    let end = tokio::time::timeout(Duration::from_secs(10), revoked_link.next_event())
        .await
        .expect("the revoked link ends within 10s");
    assert!(
        matches!(end, Err(ClientError::Goodbye { reason: GoodbyeReason::Revoked, .. })),
        "the live link ends with goodbye REVOKED, got {end:?}"
    );

    let again = DeviceLink::connect(&cluster.endpoint(), &revoked, 0).await;
    assert!(
        matches!(again, Err(ClientError::Goodbye { reason: GoodbyeReason::Revoked, .. })),
        "reconnecting is refused with REVOKED, got {:?}",
        again.map(|l| l.device_id)
    );

    gateway_reaches(&cluster.gateway, epoch.0).await;
    let response = cluster.send(&cluster.push(&bystander_token, r#"{"still":"here"}"#)).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(next_notification_in_time(&mut bystander).await.payload, br#"{"still":"here"}"#);

    bystander.close().await.expect("close");
    cluster.shutdown().await;
}

/// 500 fixed, well-spread device ids.
fn sample_devices() -> Vec<DeviceId> {
    (1..=500u128).map(|i| DeviceId(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) ^ 0x00c0_ffee)).collect()
}

/// Every running node's view and the gateway's, once they are all of one epoch whose ring has exactly
/// `members` members.
async fn agreed_views(
    nodes: &Nodes,
    gateway: &RunningGateway,
    members: usize,
) -> (Vec<(u64, Arc<EpochView>)>, Arc<GatewayView>) {
    let mut agreed = None;
    eventually(
        Duration::from_secs(30),
        &format!("every node and the gateway on one epoch of {members} members"),
        || {
            let views: Vec<(u64, Arc<EpochView>)> = nodes.running().map(|n| (n.control.id, n.view.get())).collect();
            let gateway_view = gateway.view.borrow().clone();
            let ok = gateway_view.as_ref().is_some_and(|g| {
                g.ring.members().len() == members
                    && views.iter().all(|(_, v)| v.ring.epoch() == g.epoch && v.ring.members() == g.ring.members())
            });
            if ok {
                agreed = gateway_view.map(|g| (views, g));
            }
            std::future::ready(ok)
        },
    )
    .await;
    agreed.expect("agreed views")
}

/// The one owner everyone agrees on for each device.
fn agreed_owners(views: &[(u64, Arc<EpochView>)], gateway: &GatewayView, devices: &[DeviceId]) -> Vec<u64> {
    devices
        .iter()
        .map(|device| {
            let owner = gateway.ring.owner(*device).expect("a non-empty ring");
            for (node, view) in views {
                assert_eq!(view.ring.owner(*device), Some(owner), "node {node} and the gateway disagree on {device}");
            }
            owner
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_and_the_gateway_agree_on_the_ring_and_a_new_member_takes_only_its_share() {
    let mut nodes = Nodes::start(3, |_| {}).await;
    let (gateway, _provider, _signer) = nodes.gateway().await;
    let devices = sample_devices();

    let (views, gateway_view) = agreed_views(&nodes, &gateway, 3).await;
    let before = agreed_owners(&views, &gateway_view, &devices);
    let owners_used: BTreeSet<u64> = before.iter().copied().collect();
    assert_eq!(owners_used, BTreeSet::from([1, 2, 3]), "every member owns some of the sample");

    nodes.add_node(4).await;
    let (views, gateway_view) = agreed_views(&nodes, &gateway, 4).await;
    assert_eq!(views.len(), 4);
    assert!(gateway_view.members.get(&4).is_some_and(|m| m.state == MemberState::Active));
    let after = agreed_owners(&views, &gateway_view, &devices);

    let moved: Vec<(DeviceId, u64, u64)> = devices
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| b != a)
        .map(|(d, (b, a))| (*d, *b, *a))
        .collect();
    let share = moved.len() as f64 / devices.len() as f64;
    assert!((0.15..=0.35).contains(&share), "{} of {} devices moved ({share:.2})", moved.len(), devices.len());
    for (device, from, to) in &moved {
        assert_eq!(*to, 4, "{device} moved from node {from} to node {to}, not to the new member");
    }

    gateway.shutdown().await;
    nodes.shutdown().await;
}
