//! Delivery receipts as a provider's webhook receives them: three `courier node` processes, a gateway, a
//! real HTTPS receiver with its own CA (`common::webhooks`), and the team's webhook set with the real
//! `courier ctl`. Every request's Standard Webhooks signature is checked here and again by a Python script
//! using only its standard library (`hmac`), so the format is not only checked against itself.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::webhooks::{
    Received, Receiver, apns_id as id, event, gateway_sends_receipts_for, labelled_push, printed_secret, team_id,
};
use common::{ProcessCluster, TOPIC, eventually};
use courier_core::webhook::{self, SigningSecret};
use courier_gateway::provider::Push;

fn push(cluster: &ProcessCluster, token: &str, label: &str, expiration: u64, collapse: Option<&str>) -> Push {
    labelled_push(&cluster.signer, token, label, expiration, collapse)
}

fn later() -> u64 {
    courier_core::ids::unix_millis() / 1000 + 3600
}

/// Verifies every request with Python's `hmac`, as a receiver in another language would; returns the
/// script's verdict per request (true: one of the signatures is the secret's).
fn python_verifies(requests: &[Received], secret: &[u8]) -> Vec<bool> {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("verify.py");
    std::fs::write(
        &script,
        r#"
import base64, hashlib, hmac, json, sys
secret = base64.b64decode(sys.argv[1].removeprefix("whsec_"))
for line in sys.stdin:
    r = json.loads(line)
    signed = f"{r['id']}.{r['timestamp']}.".encode() + bytes.fromhex(r["body"])
    expected = base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()
    given = [s.split(",", 1)[1] for s in r["signature"].split(" ") if s.startswith("v1,")]
    print("ok" if any(hmac.compare_digest(expected, g) for g in given) else "bad")
"#,
    )
    .expect("script");
    let input: String = requests
        .iter()
        .map(|r| {
            let body = hex::encode(&r.body);
            format!(
                "{}\n",
                serde_json::json!({"id": r.id, "timestamp": r.timestamp, "signature": r.signature, "body": body})
            )
        })
        .collect();
    let secret_text = SigningSecret { key: secret.to_vec(), created_ms: 0, retires_ms: None }.whsec();
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .arg(secret_text)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("input");
    let output = child.wait_with_output().expect("python3 finishes");
    assert!(output.status.success(), "the Python verifier failed");
    String::from_utf8_lossy(&output.stdout).lines().map(|l| l == "ok").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_reaches_the_webhook_signed_through_an_outage_and_a_secret_rotation() {
    let receiver = Receiver::start().await;
    let ca = receiver.ca_path.to_str().expect("path").to_string();
    let flags = [
        "--webhooks-allow-private",
        "--webhook-ca",
        &ca,
        "--webhook-batch-wait-ms",
        "100",
        "--queue-cap-per-topic",
        "2",
        "--webhook-expiry-sweep-secs",
        "1",
    ];
    let cluster = ProcessCluster::start(&flags, 10_000).await;
    let team = team_id(cluster.dir.path());

    let set = cluster.ctl_ok(&["webhooks", "set", "--team", &team, "--url", &receiver.url]).await;
    let secret = printed_secret(&set);
    let again = cluster.ctl_ok(&["webhooks", "set", "--team", &team, "--url", &receiver.url]).await;
    assert!(!again.stdout.contains("whsec_") && again.stdout.contains("unchanged"), "{again:?}");
    gateway_sends_receipts_for(&cluster.gateway, &[&team]).await;

    // Delivered: a linked device acks it.
    let (_, mut online, online_token) = common::registered_device(&cluster.endpoints[0]).await;
    let answer = cluster.provider.push(&push(&cluster, &online_token, "delivered-1", later(), None)).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(online.next_notification().await.expect("notification").apns_id, id("delivered-1"));
    online.flush_acks().await.expect("ack");

    // Unregistered: refused with 410, and told to the webhook too.
    let (_, mut gone, gone_token) = common::registered_device(&cluster.endpoints[1]).await;
    gone.unregister(TOPIC).await.expect("unregister");
    let answer = cluster.provider.push(&push(&cluster, &gone_token, "unregistered-1", later(), None)).await.unwrap();
    assert_eq!((answer.status, answer.reason.as_deref()), (410, Some("Unregistered")), "{answer:?}");

    // An offline device: discarded (expiration 0), collapsed, pushed out of its full queue (cap 2), expired.
    let (offline_credentials, offline, offline_token) = common::registered_device(&cluster.endpoints[2]).await;
    offline.close().await.expect("close");
    let soon = courier_core::ids::unix_millis() / 1000 + 2;
    for (apns_id, expiration, collapse) in [
        ("discarded-1", 0, None),
        ("collapsed-1", later(), Some("score")),
        ("collapsed-2", later(), Some("score")),
        ("kept-1", later(), None),
        ("expiring-1", soon, None),
    ] {
        let answer =
            cluster.provider.push(&push(&cluster, &offline_token, apns_id, expiration, collapse)).await.unwrap();
        assert_eq!(answer.status, 200, "{apns_id}: {answer:?}");
    }

    let expected = [
        ("delivered-1", "delivered", None),
        ("unregistered-1", "unregistered", Some("Unregistered")),
        ("discarded-1", "dropped", Some("discarded")),
        ("collapsed-1", "dropped", Some("collapsed")),
        ("collapsed-2", "dropped", Some("queue_overflow")),
        ("expiring-1", "expired", None),
    ];
    // As `eventually`, but a failure names the receipts still missing and the requests the receiver saw.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = receiver.accepted_events();
        let missing: Vec<_> =
            expected.iter().filter(|(id, outcome, _)| event(&events, id, outcome).is_none()).collect();
        if missing.is_empty() {
            break;
        }
        let requests = receiver.requests();
        assert!(tokio::time::Instant::now() < give_up, "receipts still missing: {missing:?}; requests: {requests:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = receiver.accepted_events();
    for (apns_id, outcome, reason) in expected {
        let e = event(&events, apns_id, outcome).expect("checked above");
        assert_eq!(e["team_id"], team.as_str());
        assert_eq!(e["topic"], TOPIC);
        assert_eq!(e["reason"].as_str(), reason, "{e}");
        assert!(e["accepted_at_ms"].as_u64().is_some_and(|t| t > 0), "{e}");
        assert!(e["id"].as_str().is_some_and(|id| id.starts_with("evt_")), "{e}");
        let token = if apns_id.starts_with("delivered") {
            &online_token
        } else if apns_id.starts_with("unregistered") {
            &gone_token
        } else {
            &offline_token
        };
        assert_eq!(e["token"], token.as_str(), "{e}");
        assert_eq!(e["delivered_at_ms"].is_u64(), outcome == "delivered", "{e}");
    }
    // The one notification still queued has no receipt yet; the device gets it when it links.
    assert!(events.iter().all(|e| e["apns_id"] != id("kept-1").as_str()), "{events:?}");
    let mut back = common::link_again(&cluster.endpoints[0], &offline_credentials, 100).await;
    assert_eq!(back.next_notification().await.expect("kept").apns_id, id("kept-1"));
    back.flush_acks().await.expect("ack");
    eventually(Duration::from_secs(10), "the kept one's delivered receipt", || {
        std::future::ready(event(&receiver.accepted_events(), "kept-1", "delivered").is_some())
    })
    .await;

    // An endpoint down for a while gets the receipt once it answers again, as the same message.
    let before = receiver.requests().len();
    receiver.fail_next(2);
    cluster.provider.push(&push(&cluster, &online_token, "delivered-2", later(), None)).await.unwrap();
    assert_eq!(online.next_notification().await.expect("notification").apns_id, id("delivered-2"));
    online.flush_acks().await.expect("ack");
    eventually(Duration::from_secs(30), "the receipt after two failed attempts", || {
        std::future::ready(event(&receiver.accepted_events(), "delivered-2", "delivered").is_some())
    })
    .await;
    let attempts: Vec<Received> = receiver.requests()[before..]
        .iter()
        .filter(|r| r.events().iter().any(|e| e["apns_id"] == id("delivered-2").as_str()))
        .cloned()
        .collect();
    assert_eq!(attempts.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 500, 204], "{attempts:?}");
    assert!(attempts.iter().all(|r| r.id == attempts[0].id), "a retry keeps its webhook-id");
    assert!(attempts[1].timestamp >= attempts[0].timestamp);

    // Rotation: the old and the new secret both verify while the old one is in its grace period.
    let rotated = cluster.ctl_ok(&["webhooks", "rotate-secret", "--team", &team]).await;
    let new_secret = printed_secret(&rotated);
    assert_ne!(new_secret, secret);
    let listed = cluster.ctl_ok(&["webhooks", "list"]).await.stdout;
    assert!(listed.contains(&receiver.url) && listed.contains("retires in"), "{listed}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.provider.push(&push(&cluster, &online_token, "delivered-3", later(), None)).await.unwrap();
    assert_eq!(online.next_notification().await.expect("notification").apns_id, id("delivered-3"));
    online.flush_acks().await.expect("ack");
    eventually(Duration::from_secs(20), "a receipt after the rotation", || {
        std::future::ready(event(&receiver.accepted_events(), "delivered-3", "delivered").is_some())
    })
    .await;
    let requests = receiver.requests();
    let rotated_request = requests
        .iter()
        .find(|r| r.events().iter().any(|e| e["apns_id"] == id("delivered-3").as_str()))
        .expect("the request");
    assert_eq!(rotated_request.signature.split(' ').count(), 2, "{rotated_request:?}");

    // Every request, checked here and by Python: the original secret verifies all, the new one the last.
    for r in &requests {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/hooks/courier"));
        assert!(webhook::verify(&secret, &r.id, r.timestamp, &r.body, &r.signature), "{r:?}");
    }
    assert!(webhook::verify(
        &new_secret,
        &rotated_request.id,
        rotated_request.timestamp,
        &rotated_request.body,
        &rotated_request.signature
    ));
    assert!(python_verifies(&requests, &secret).iter().all(|ok| *ok));
    let by_new = python_verifies(std::slice::from_ref(rotated_request), &new_secret);
    assert_eq!(by_new, [true]);
    let mut tampered = rotated_request.clone();
    tampered.body.push(b' ');
    assert_eq!(python_verifies(&[tampered], &secret), [false], "a changed body must not verify");

    // Each event arrived in exactly one accepted request.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for e in receiver.accepted_events() {
        *seen.entry(e["id"].as_str().unwrap_or("").to_string()).or_default() += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    online.close().await.expect("close");
    drop((gone, back));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_holds_up_only_its_own_team_and_its_redirects_are_not_followed() {
    let failing = Receiver::start().await;
    let working = Receiver::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = dir.path().join("receivers.pem");
    let pem = |path: &std::path::Path| std::fs::read_to_string(path).expect("CA");
    std::fs::write(&bundle, pem(&failing.ca_path) + &pem(&working.ca_path)).expect("bundle");
    let bundle = bundle.to_str().expect("path").to_string();
    let flags = ["--webhooks-allow-private", "--webhook-ca", &bundle, "--webhook-batch-wait-ms", "50"];
    let cluster = ProcessCluster::start(&flags, 10_000).await;

    // A second team, with its own signing key.
    let key = rcgen::KeyPair::generate().expect("key");
    let public = dir.path().join("team-two.pem");
    std::fs::write(&public, key.public_key_pem()).expect("public key");
    let public = public.to_str().expect("path");
    cluster
        .ctl_ok(&["providers", "add", "--team-id", "TEAMTWO001", "--key-id", "KEYTWO0001", "--public-key", public])
        .await;
    let second = courier_gateway::provider::JwtSigner::new("TEAMTWO001", "KEYTWO0001", key.serialize_pem().as_bytes())
        .expect("signer");
    let first = team_id(cluster.dir.path());
    cluster.ctl_ok(&["webhooks", "set", "--team", &first, "--url", &failing.url]).await;
    cluster.ctl_ok(&["webhooks", "set", "--team", "TEAMTWO001", "--url", &working.url]).await;
    failing.refuse_next(usize::MAX, 307);
    gateway_sends_receipts_for(&cluster.gateway, &[&first, "TEAMTWO001"]).await;

    let (_, mut link, token) = common::registered_device(&cluster.endpoints[0]).await;
    for (signer, label) in [(&cluster.signer, "team-one"), (&second, "team-two")] {
        let answer = cluster.provider.push(&labelled_push(signer, &token, label, later(), None)).await.unwrap();
        assert_eq!(answer.status, 200, "{label}: {answer:?}");
        assert_eq!(link.next_notification().await.expect("notification").apns_id, id(label));
    }
    link.flush_acks().await.expect("acks");

    // The working team's receipt comes while the other team's endpoint keeps redirecting.
    eventually(Duration::from_secs(10), "the working team's receipt", || {
        std::future::ready(event(&working.accepted_events(), "team-two", "delivered").is_some())
    })
    .await;
    eventually(Duration::from_secs(10), "the failing endpoint tried twice", || {
        std::future::ready(failing.requests().len() >= 2)
    })
    .await;
    let tried = failing.requests();
    assert!(
        tried.iter().all(|r| r.path == "/hooks/courier" && r.status == 307),
        "redirects are not followed: {tried:?}"
    );
    assert!(working.requests().iter().all(|r| r.events().iter().all(|e| e["team_id"] == "TEAMTWO001")));

    // Once it answers, the first team's receipt arrives (after the backoff of its failures).
    failing.fail_next(0);
    eventually(Duration::from_secs(30), "the first team's receipt", || {
        std::future::ready(event(&failing.accepted_events(), "team-one", "delivered").is_some())
    })
    .await;
    link.close().await.expect("close");
}

/// The `courier_webhook_events_total{outcome}` counter of the node a link is on.
async fn outcome_count(cluster: &ProcessCluster, node_addr: &str, outcome: &str) -> f64 {
    let node = cluster.nodes.iter().find(|n| n.device_addr == node_addr).expect("the link's node");
    let text = common::http_get(&format!("http://{}/metrics", node.metrics_addr)).await;
    let name = format!(r#"courier_webhook_events_total{{outcome="{outcome}"}}"#);
    common::metric_value(&text, &name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_kept_unsaved_are_never_copied_or_written_when_taken_in_time_and_are_when_late_or_refused() {
    let receiver = Receiver::start().await;
    let ca = receiver.ca_path.to_str().expect("path").to_string();
    // A long ack window, so that every ack here spares the commit and the receipt is one nothing stored. A
    // batch may wait 3 s to fill, but one of unsaved receipts leaves when its oldest has had half of the
    // 1 s it may wait uncopied, so a receipt the endpoint takes at once is never copied.
    let flags = [
        "--webhooks-allow-private",
        "--webhook-ca",
        &ca,
        "--webhook-batch-wait-ms",
        "3000",
        "--webhook-copy-after-ms",
        "1000",
        "--webhook-save-after-ms",
        "5000",
        "--ack-wait-ms",
        "3000",
    ];
    let cluster = ProcessCluster::start(&flags, 10_000).await;
    let team = team_id(cluster.dir.path());
    cluster.ctl_ok(&["webhooks", "set", "--team", &team, "--url", &receiver.url]).await;
    gateway_sends_receipts_for(&cluster.gateway, &[&team]).await;
    let (_, mut link, token) = common::registered_device(&cluster.endpoints[0]).await;
    let owner = link.node_addr.to_string();
    // Pushed, received and acked by the device, answered (DELIVERED, as it was acked before any commit; SENT
    // for expiration 0, answered when handed to the link).
    let mut push_and_ack = async |label: &str, expiration: u64| {
        let answer = tokio::spawn({
            let (provider, push) = (cluster.provider.clone(), push(&cluster, &token, label, expiration, None));
            async move { provider.push(&push).await.expect("push") }
        });
        assert_eq!(link.next_notification().await.expect("notification").apns_id, id(label));
        link.flush_acks().await.expect("ack");
        assert_eq!(answer.await.expect("push task").status, 200, "{label}");
    };

    // Taken by the endpoint at once: sent from memory, never queued in the store.
    for label in ["unsaved-1", "unsaved-2", "unsaved-3"] {
        push_and_ack(label, later()).await;
    }
    eventually(Duration::from_secs(10), "the three receipts", || {
        let events = receiver.accepted_events();
        std::future::ready(
            ["unsaved-1", "unsaved-2", "unsaved-3"].iter().all(|l| event(&events, l, "delivered").is_some()),
        )
    })
    .await;
    // The node counts them once it has the endpoint's answer, which may be after the test saw them.
    eventually(Duration::from_secs(10), "the owner counts three sent", || async {
        outcome_count(&cluster, &owner, "sent").await == 3.0
    })
    .await;
    assert_eq!(outcome_count(&cluster, &owner, "queued").await, 0.0, "nothing was written");
    assert_eq!(outcome_count(&cluster, &owner, "saved").await, 0.0);
    assert_eq!(outcome_count(&cluster, &owner, "copied").await, 0.0, "nor sent to the other holders");
    // Their copies are the gateway's, which forwarded the pushes; the owner says it may drop them only
    // once the 5 s before a receipt is written (and a margin) have passed.
    assert_eq!(cluster.gateway.receipt_copies.len(), 3, "the gateway keeps the acked pushes' receipts");

    // Answered after 2 s, past the 1 s it may wait uncopied but inside the 5 s before it is written: the
    // receipt of a push with expiration 0 (its copy goes to the holders: the gateway heard SENT before the
    // ack) is copied to them while the request is out, and nothing is written.
    receiver.slow_next(1, Duration::from_secs(2));
    push_and_ack("slow-1", 0).await;
    eventually(Duration::from_secs(10), "the slow receipt copied while its request is out", || async {
        outcome_count(&cluster, &owner, "copied").await == 1.0
    })
    .await;
    assert!(event(&receiver.accepted_events(), "slow-1", "delivered").is_none(), "not answered yet");
    eventually(Duration::from_secs(10), "the owner counts four sent", || async {
        outcome_count(&cluster, &owner, "sent").await == 4.0
    })
    .await;
    assert_eq!(outcome_count(&cluster, &owner, "saved").await, 0.0);

    // Refused: written (queued here and held by the other holders), and sent once the endpoint answers, as
    // the same message.
    receiver.fail_next(2);
    let before = receiver.requests().len();
    push_and_ack("refused-1", later()).await;
    eventually(Duration::from_secs(30), "the refused receipt, once the endpoint answers", || {
        std::future::ready(event(&receiver.accepted_events(), "refused-1", "delivered").is_some())
    })
    .await;
    let attempts: Vec<Received> = receiver.requests()[before..].to_vec();
    assert_eq!(attempts.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 500, 204], "{attempts:?}");
    assert!(attempts.iter().all(|r| r.id == attempts[0].id), "a retry keeps its webhook-id");
    eventually(Duration::from_secs(10), "the owner counts five sent", || async {
        outcome_count(&cluster, &owner, "sent").await == 5.0
    })
    .await;
    assert_eq!(outcome_count(&cluster, &owner, "saved").await, 1.0);
    assert_eq!(outcome_count(&cluster, &owner, "queued").await, 1.0);
    // Written here, the refused one goes to the other holders' stores too: a copy to write, not one more to
    // keep in memory.
    assert_eq!(outcome_count(&cluster, &owner, "copied").await, 1.0, "the refused one was not copied unsaved");
    link.close().await.expect("close");
}
