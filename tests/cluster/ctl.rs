//! `courier ctl` as an operator runs it: the real binary, in its own process, against a three-node
//! in-process cluster, authenticating with the `admin` certificate from the PKI directory. Each test checks
//! both what the command prints and that the cluster state changed as it said. Every invocation is also
//! checked for leaked secrets: a token-key secret is 64 hex characters, and no output may hold such a run.
//! Parsing of flags and the printing code are not unit-tested here, only their effect end to end.

use crate::common;

use std::time::Duration;

use common::{Nodes, eventually};
use courier_core::ids::DeviceId;
use courier_core::state::{ClusterState, Command, KeyState};
use courier_core::token::TokenKeyId;

use common::CtlRun as Run;

/// Longest run of consecutive hex digits in `text`.
fn longest_hex_run(text: &str) -> usize {
    text.split(|c: char| !c.is_ascii_hexdigit()).map(str::len).max().unwrap_or(0)
}

/// Runs `courier ctl --node <node 1> --pki-dir <cluster PKI> <args…>`; nothing it prints may hold a secret.
async fn ctl(nodes: &Nodes, args: &[&str]) -> Run {
    let run = common::ctl(nodes.configs[0].cluster_addr, nodes.dir.path(), args).await;
    for (stream, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        assert!(longest_hex_run(text) < 64, "courier ctl {args:?} printed a 64-hex-character run on {stream}: {run:?}");
    }
    run
}

/// Runs `courier ctl`, requiring it to succeed.
async fn ctl_ok(nodes: &Nodes, args: &[&str]) -> Run {
    let run = ctl(nodes, args).await;
    assert!(run.success, "courier ctl {args:?} failed: {run:?}");
    run
}

/// Waits until node 1 has applied a state for which `check` holds.
async fn node1_state(nodes: &Nodes, what: &str, check: impl Fn(&ClusterState) -> bool) {
    eventually(Duration::from_secs(10), what, || std::future::ready(check(&nodes.node(1).control.current()))).await;
}

/// The first whitespace-separated words of each line of a table, for row lookups.
fn rows(text: &str) -> Vec<Vec<&str>> {
    text.lines().map(|line| line.split_whitespace().collect()).filter(|w: &Vec<&str>| !w.is_empty()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_every_active_member_and_the_leader() {
    let nodes = Nodes::start(3, |_| {}).await;
    let leader = nodes.leader().await;

    let text = ctl_ok(&nodes, &["status"]).await.stdout;
    let table = rows(&text);
    for id in 1..=3 {
        let id = id.to_string();
        assert!(
            table.iter().any(|row| row.first() == Some(&id.as_str()) && row.get(1) == Some(&"active")),
            "node {id} is listed as active:\n{text}"
        );
    }
    let header = text.lines().next().unwrap_or_default();
    let named = header.split("leader").nth(1).and_then(|rest| rest.split_whitespace().next());
    assert_eq!(named, Some(leader.to_string().as_str()), "the first line names the leader:\n{text}");

    let json = ctl_ok(&nodes, &["status", "--json"]).await.stdout;
    let doc: serde_json::Value = serde_json::from_str(&json).expect("status --json prints JSON");
    let members = doc["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{doc}");
    assert!(members.iter().all(|m| m["state"] == "active"), "{doc}");
    assert!(doc["epoch"].as_u64().is_some_and(|e| e > 0), "{doc}");
    assert_eq!(doc["raft"]["leader"].as_u64(), Some(leader), "{doc}");

    let device = DeviceId(0x1234_5678_9abc_def0_0fed_cba9_8765_4321);
    let owned = ctl_ok(&nodes, &["status", "--json", "--owner-of", &device.to_string()]).await.stdout;
    let doc: serde_json::Value = serde_json::from_str(&owned).expect("JSON");
    let owner = nodes.node(1).view.get().ring.owner(device);
    assert_eq!(doc["owners"][device.to_string()].as_u64(), owner, "{doc}");

    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_makes_a_new_key_active_and_nothing_prints_a_secret() {
    let nodes = Nodes::start(3, |_| {}).await;
    let old = nodes.node(1).control.current().active_key().expect("an active key").key.id;
    let new = TokenKeyId(old.0 + 1);

    let rotated = ctl_ok(&nodes, &["keys", "rotate"]).await.stdout;
    assert!(rotated.contains(&format!("token key {} is now active", new.0)), "{rotated}");
    node1_state(&nodes, "the rotation is applied on node 1", |s| s.token_keys.contains_key(&new)).await;
    let state = nodes.node(1).control.current();
    let active: Vec<TokenKeyId> =
        state.token_keys.values().filter(|r| r.state == KeyState::Active).map(|r| r.key.id).collect();
    assert_eq!(active, [new], "exactly one active key, the new one");
    assert_eq!(state.token_keys[&old].state, KeyState::Accepting);

    let listed = ctl_ok(&nodes, &["keys", "list"]).await.stdout;
    let table = rows(&listed);
    let state_of = |id: TokenKeyId| {
        table.iter().find(|row| row.first() == Some(&id.0.to_string().as_str())).and_then(|row| row.get(1).copied())
    };
    assert_eq!(state_of(new), Some("active"), "{listed}");
    assert_eq!(state_of(old), Some("accepting"), "{listed}");

    // The active key cannot be retired; the accepting one can.
    let refused = ctl(&nodes, &["keys", "retire", "--id", &new.0.to_string()]).await;
    assert!(!refused.success, "retiring the active key is refused: {refused:?}");
    assert!(refused.stderr.contains("refused"), "{refused:?}");
    ctl_ok(&nodes, &["keys", "retire", "--id", &old.0.to_string()]).await;
    node1_state(&nodes, "the old key is retired", |s| s.token_keys[&old].state == KeyState::Retired).await;

    // Every other read path, checked for secrets by `ctl` too.
    ctl_ok(&nodes, &["status"]).await;
    ctl_ok(&nodes, &["status", "--json"]).await;

    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_are_added_listed_and_removed() {
    let nodes = Nodes::start(3, |_| {}).await;
    let files = tempfile::tempdir().expect("temp dir");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key pair");
    let public_key = files.path().join("provider.pub.pem");
    std::fs::write(&public_key, key.public_key_pem()).expect("write the public key");
    let (team, kid) = ("CTLTEAM001", "CTLKEY0001");

    let public_key_arg = public_key.to_str().expect("utf-8 path");
    let add = ["providers", "add", "--team-id", team, "--key-id", kid, "--public-key", public_key_arg];
    ctl_ok(&nodes, &[&add[..], &["--topic", "com.example.ctl"][..]].concat()).await;
    node1_state(&nodes, "the provider is in the state", |s| s.providers.contains_key(team)).await;
    let state = nodes.node(1).control.current();
    assert_eq!(state.providers[team].keys[kid], key.public_key_pem());
    assert_eq!(state.providers[team].topics, ["com.example.ctl"]);

    let listed = ctl_ok(&nodes, &["providers", "list"]).await.stdout;
    let row = rows(&listed).into_iter().find(|row| row.first() == Some(&team)).map(|row| row.join(" "));
    assert_eq!(row.as_deref(), Some(format!("{team} {kid} com.example.ctl").as_str()), "{listed}");

    // A file that is not a public key is refused before anything is proposed.
    let not_a_key = files.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "hello").expect("write");
    let bad = ["providers", "add", "--team-id", "OTHERTEAM1", "--key-id", "K", "--public-key"];
    let refused = ctl(&nodes, &[&bad[..], &[not_a_key.to_str().expect("utf-8 path")][..]].concat()).await;
    assert!(!refused.success, "{refused:?}");
    assert!(refused.stderr.contains("is not an ES256 public key"), "{refused:?}");

    ctl_ok(&nodes, &["providers", "remove", "--team-id", team, "--key-id", kid]).await;
    node1_state(&nodes, "the provider is gone from the state", |s| !s.providers.contains_key(team)).await;
    let listed = ctl_ok(&nodes, &["providers", "list"]).await.stdout;
    assert!(!listed.contains(team), "{listed}");
    assert!(!nodes.node(1).control.current().providers.contains_key("OTHERTEAM1"));

    let missing = ctl(&nodes, &["providers", "remove", "--team-id", team]).await;
    assert!(!missing.success, "removing an unknown team fails: {missing:?}");

    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_revoke_reaches_the_state_and_a_bad_id_is_refused_clearly() {
    let nodes = Nodes::start(3, |_| {}).await;
    let device = DeviceId::random();

    let revoked = ctl_ok(&nodes, &["devices", "revoke", "--device", &device.to_string()]).await.stdout;
    assert!(revoked.contains("applied"), "{revoked}");
    eventually(Duration::from_secs(10), "every node has the device revoked", || {
        std::future::ready(nodes.running().all(|n| n.control.current().revoked.contains(&device)))
    })
    .await;

    let epoch = nodes.node(1).control.current().epoch;
    for bad in ["not-a-device", "1234", &"g".repeat(32)] {
        let run = ctl(&nodes, &["devices", "revoke", "--device", bad]).await;
        assert!(!run.success, "{bad:?} is refused: {run:?}");
        assert!(run.stderr.contains("a device id is 32 hex characters"), "{bad:?}: {run:?}");
    }
    assert_eq!(nodes.node(1).control.current().epoch, epoch, "a refused id proposes nothing");

    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_list_shows_suspected_clones_and_clear_clone_removes_them() {
    let nodes = Nodes::start(3, |_| {}).await;
    let device = DeviceId::random();
    let suspect = Command::SuspectClone {
        device,
        node: 2,
        addrs: vec!["192.0.2.7".into(), "198.51.100.9".into()],
        refuse: true,
        now_ms: courier_core::ids::unix_millis(),
    };
    let leader = nodes.leader().await;
    nodes.node(leader).control.apply(suspect).await.expect("the suspicion applies");
    node1_state(&nodes, "node 1 has the suspicion", |s| s.suspected_clones.contains_key(&device)).await;

    let list = ctl_ok(&nodes, &["devices", "list"]).await.stdout;
    let row = rows(&list).into_iter().find(|r| r[0] == device.to_string()).unwrap_or_else(|| panic!("{list}"));
    assert_eq!(row[1], "refused", "{list}");
    assert_eq!(row[row.len() - 2..], ["2", "192.0.2.7,198.51.100.9"], "{list}");
    assert!(ctl_ok(&nodes, &["status"]).await.stdout.contains("suspected clones: 1"));

    let cleared = ctl_ok(&nodes, &["devices", "clear-clone", "--device", &device.to_string()]).await.stdout;
    assert!(cleared.contains("applied"), "{cleared}");
    node1_state(&nodes, "node 1 has no suspicion left", |s| s.suspected_clones.is_empty()).await;
    let again = ctl(&nodes, &["devices", "clear-clone", "--device", &device.to_string()]).await;
    assert!(!again.success && again.stderr.contains("not a suspected clone"), "{again:?}");
    let bad = ctl(&nodes, &["devices", "clear-clone", "--device", "1234"]).await;
    assert!(!bad.success && bad.stderr.contains("a device id is 32 hex characters"), "{bad:?}");

    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_remove_leaves_two_members() {
    let nodes = Nodes::start(3, |_| {}).await;
    // Node 3, unless an election made it the leader: removing the leader trips openraft 0.9's
    // "only leader may append membership" debug assertion (reported separately), which is not what
    // this test is about.
    let leader = nodes.leader().await;
    let victim: u64 = if leader == 3 { 2 } else { 3 };
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != victim).collect();
    let reporter = survivors[0];

    let removed = ctl_ok(&nodes, &["nodes", "remove", "--id", &victim.to_string()]).await.stdout;
    assert!(removed.contains(&format!("node {victim} removed")), "{removed}");
    eventually(Duration::from_secs(10), "the node is out of the state and of Raft's voters", || {
        let state = nodes.node(reporter).control.current();
        let metrics = nodes.node(reporter).control.raft.metrics().borrow().clone();
        let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
        let members: Vec<u64> = state.members.keys().copied().collect();
        std::future::ready(members == survivors && voters == survivors)
    })
    .await;

    let json = ctl_ok(&nodes, &["status", "--json"]).await.stdout;
    let doc: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let ids: Vec<u64> = doc["members"].as_array().expect("members").iter().filter_map(|m| m["id"].as_u64()).collect();
    assert_eq!(ids, survivors, "{doc}");
    let text = ctl_ok(&nodes, &["status"]).await.stdout;
    assert!(!rows(&text).iter().any(|row| row.first() == Some(&victim.to_string().as_str())), "{text}");

    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_set_listed_rotated_and_removed_and_private_endpoints_are_refused() {
    let nodes = Nodes::start(3, |_| {}).await;
    let team = "TEAMHOOKS1";
    let hook = |state: &ClusterState| state.webhooks.get(team).cloned();

    // These nodes do not allow private endpoints (only `courier dev` and nodes told so do).
    for url in ["http://127.0.0.1:9000/hook", "https://10.0.0.8/hook", "https://localhost/hook"] {
        let refused = ctl(&nodes, &["webhooks", "set", "--team", team, "--url", url]).await;
        assert!(!refused.success && refused.stderr.contains("private"), "{url}: {refused:?}");
    }
    let bad_events =
        ctl(&nodes, &["webhooks", "set", "--team", team, "--url", "https://hooks.example.com/", "--events", "bounced"])
            .await;
    assert!(!bad_events.success && bad_events.stderr.contains("unknown event"), "{bad_events:?}");
    assert!(hook(&nodes.node(1).control.current()).is_none());

    let set = ctl_ok(
        &nodes,
        &[
            "webhooks",
            "set",
            "--team",
            team,
            "--url",
            "https://hooks.example.com/courier",
            "--events",
            "delivered,expired",
        ],
    )
    .await;
    let shown =
        set.stdout.split_whitespace().find(|w| w.starts_with("whsec_")).expect("the secret is shown once").to_string();
    node1_state(&nodes, "the webhook is set", |s| hook(s).is_some()).await;
    let stored = hook(&nodes.node(1).control.current()).expect("set");
    assert_eq!(stored.url, "https://hooks.example.com/courier");
    assert_eq!(stored.events.iter().map(|k| k.as_str()).collect::<Vec<_>>(), ["delivered", "expired"]);
    assert_eq!(stored.secrets.len(), 1);
    assert_eq!(stored.secrets[0].whsec(), shown);

    // Set again: the URL and events change, the secret does not, and none is printed.
    let again = ctl_ok(&nodes, &["webhooks", "set", "--team", team, "--url", "https://hooks.example.com/v2"]).await;
    assert!(!again.stdout.contains("whsec_"), "{again:?}");
    node1_state(&nodes, "the URL changed", |s| hook(s).is_some_and(|h| h.url.ends_with("/v2"))).await;
    let updated = hook(&nodes.node(1).control.current()).expect("set");
    assert_eq!((updated.events.len(), updated.secrets[0].whsec()), (4, shown.clone()));

    let listed = ctl_ok(&nodes, &["webhooks", "list"]).await.stdout;
    let row = rows(&listed).into_iter().find(|r| r.first() == Some(&team)).unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(row[1], "https://hooks.example.com/v2");
    assert!(listed.contains(&updated.secrets[0].fingerprint()), "{listed}");
    assert!(!listed.contains(&shown[6..]), "list must not show the secret: {listed}");

    let rotated = ctl_ok(&nodes, &["webhooks", "rotate-secret", "--team", team, "--grace-hours", "1"]).await;
    let new_shown =
        rotated.stdout.split_whitespace().find(|w| w.starts_with("whsec_")).expect("new secret").to_string();
    assert_ne!(new_shown, shown);
    node1_state(&nodes, "two secrets", |s| hook(s).is_some_and(|h| h.secrets.len() == 2)).await;
    let rotated_hook = hook(&nodes.node(1).control.current()).expect("set");
    assert_eq!(rotated_hook.secrets[0].whsec(), new_shown);
    let retires = rotated_hook.secrets[1].retires_ms.expect("the old one retires");
    let in_an_hour = courier_core::ids::unix_millis() + 3_600_000;
    assert!(retires <= in_an_hour && retires + 60_000 > in_an_hour, "{retires} vs {in_an_hour}");
    assert_eq!(rotated_hook.signing_keys(courier_core::ids::unix_millis()).len(), 2);

    ctl_ok(&nodes, &["webhooks", "remove", "--team", team]).await;
    node1_state(&nodes, "the webhook is gone", |s| hook(s).is_none()).await;
    let missing = ctl(&nodes, &["webhooks", "remove", "--team", team]).await;
    assert!(!missing.success && missing.stderr.contains("no webhook"), "{missing:?}");
    nodes.shutdown().await;
}
