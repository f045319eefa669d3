//! Compatibility with a real APNs client: `compat/node-apn/compat.js` sends pushes, and
//! `compat/node-apn/channels.js` manages broadcast channels and broadcasts, through `@parse/node-apn`
//! (pinned in its package.json, installed by `.ci/run` with `npm ci`) with token auth, pointed at a real
//! Courier cluster by addresses, ports and CA only. Successes and APNs's errors must reach that library as
//! APNs would return them.
//!
//! Without `compat/node-apn/node_modules` (or without `node`) the test says so and passes, so that a
//! plain `cargo test` works anywhere; `.ci/run` sets `COURIER_REQUIRE_NODE_APN=1`, which makes a missing
//! client a failure.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::{TOPIC, TestCluster};
use courier_core::pki::ProviderCredential;

fn client_available(dir: &Path) -> bool {
    let installed = dir.join("node_modules/@parse/node-apn").exists();
    let node = std::process::Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    if installed && node {
        return true;
    }
    let why = if node { "run `npm ci` in compat/node-apn" } else { "`node` is not installed" };
    assert!(std::env::var_os("COURIER_REQUIRE_NODE_APN").is_none(), "the node-apn client is required: {why}");
    eprintln!("skipping the node-apn compatibility test: {why}");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_apn_gets_apns_answers_from_courier() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("compat/node-apn");
    if !client_available(&dir) {
        return;
    }
    let cluster = TestCluster::start().await;
    let (mut device, token) = cluster.device().await;
    let (mut gone, gone_token) = cluster.device().await;
    gone.unregister(TOPIC).await.unwrap();

    let credential = ProviderCredential::load(&cluster.pki().provider_credential()).unwrap();
    let ids: Vec<String> = (0..5).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let case = |name: &str, token: &str, topic: &str, id: &str, pad: usize| serde_json::json!({"name": name, "token": token, "topic": topic, "id": id, "padBytes": pad});
    let config = serde_json::json!({
        "address": "localhost",
        "port": cluster.gateway.provider_addr.port(),
        "ca": cluster.pki().cluster_ca_cert(),
        "key": cluster.pki().provider_signing_key(&credential.key_id),
        "keyId": credential.key_id,
        "teamId": credential.team_id,
        "cases": [
            case("success", &token, TOPIC, &ids[0], 0),
            case("bad token", "abc123", TOPIC, &ids[1], 0),
            case("other topic", &token, "com.example.other", &ids[2], 0),
            case("too large", &token, TOPIC, &ids[3], 5000),
            case("unregistered", &gone_token, TOPIC, &ids[4], 0),
        ],
    });
    let lines = run_node(&dir, "compat.js", &config).await;
    assert_eq!(lines.len(), 5, "{lines:?}");

    assert_eq!(lines[0]["sent"], true, "{}", lines[0]);
    assert_eq!(lines[0]["id"], ids[0].as_str(), "the library sees the apns-id echoed");
    for (line, status, reason) in [
        (&lines[1], 400, "BadDeviceToken"),
        (&lines[2], 400, "DeviceTokenNotForTopic"),
        (&lines[3], 413, "PayloadTooLarge"),
        (&lines[4], 410, "Unregistered"),
    ] {
        assert_eq!(line["sent"], false, "{line}");
        assert_eq!((line["status"].as_u64(), line["reason"].as_str()), (Some(status), Some(reason)), "{line}");
    }
    assert!(lines[4]["timestamp"].as_u64().is_some(), "Unregistered carries a timestamp: {}", lines[4]);

    let n = tokio::time::timeout(Duration::from_secs(10), device.next_notification()).await.unwrap().unwrap();
    assert_eq!(n.apns_id, ids[0]);
    let payload: serde_json::Value = serde_json::from_slice(&n.payload).unwrap();
    assert_eq!(payload["aps"]["alert"], "Hello from node-apn");
    cluster.shutdown().await;
}

/// Runs `script` in `dir` with `config`; its JSON lines.
async fn run_node(dir: &Path, script: &str, config: &serde_json::Value) -> Vec<serde_json::Value> {
    let run = tokio::process::Command::new("node")
        .arg(dir.join(script))
        .env("COURIER_COMPAT", config.to_string())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run).await.expect("node-apn finished").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "node failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_apn_manages_channels_and_broadcasts_through_courier() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("compat/node-apn");
    if !client_available(&dir) {
        return;
    }
    let cluster = TestCluster::start().await;
    let credential = ProviderCredential::load(&cluster.pki().provider_credential()).unwrap();
    let config = |steps: serde_json::Value| {
        serde_json::json!({
            "address": "localhost",
            "port": cluster.gateway.provider_addr.port(),
            "channelsPort": cluster.gateway.channels_addr.port(),
            "ca": cluster.pki().cluster_ca_cert(),
            "key": cluster.pki().provider_signing_key(&credential.key_id),
            "keyId": credential.key_id,
            "teamId": credential.team_id,
            "bundleId": TOPIC,
            "steps": steps,
        })
    };
    let request_id = "0309F412-AA57-46A8-9AC6-B5AECA8C4594";
    let created = run_node(
        &dir,
        "channels.js",
        &config(serde_json::json!([{"name": "create", "action": "create", "policy": 1, "requestId": request_id}])),
    )
    .await;
    assert_eq!(created[0]["sent"], true, "{}", created[0]);
    assert_eq!(created[0]["result"]["apns-request-id"], request_id, "{}", created[0]);
    let channel =
        created[0]["result"]["apns-channel-id"].as_str().expect("the library sees the channel id").to_string();

    let (mut device, _) = cluster.device().await;
    device.subscribe(&channel, None).await.expect("the device subscribes to the library's channel");
    let expiry = courier_core::ids::unix_millis() / 1000 + 3600;
    let steps = serde_json::json!([
        {"name": "read", "action": "read", "channelId": channel},
        {"name": "read all", "action": "readAll"},
        {"name": "broadcast", "action": "broadcast", "channelId": channel, "expiry": expiry, "payload": {"score": "2-1"}},
        {"name": "delete", "action": "delete", "channelId": channel},
        {"name": "read deleted", "action": "read", "channelId": channel},
        {"name": "broadcast deleted", "action": "broadcast", "channelId": channel, "expiry": expiry},
    ]);
    let lines = run_node(&dir, "channels.js", &config(steps)).await;
    assert_eq!(lines.len(), 6, "{lines:?}");
    assert_eq!(lines[0]["sent"], true, "{}", lines[0]);
    assert_eq!(lines[0]["result"]["message-storage-policy"], 1, "{}", lines[0]);
    assert_eq!(lines[0]["result"]["push-type"], "LiveActivity", "{}", lines[0]);
    assert_eq!(lines[1]["result"]["channels"], serde_json::json!([channel]), "{}", lines[1]);
    assert_eq!(lines[2]["sent"], true, "{}", lines[2]);
    let unique = lines[2]["result"]["apns-unique-id"].as_str().expect("the library sees apns-unique-id").to_string();
    assert_eq!(lines[3]["sent"], true, "{}", lines[3]);
    for line in &lines[4..] {
        assert_eq!(line["sent"], false, "{line}");
        assert_eq!(
            (line["result"]["status"].as_u64(), line["result"]["reason"].as_str()),
            (Some(400), Some("ChannelNotRegistered")),
            "{line}"
        );
    }

    let n = tokio::time::timeout(Duration::from_secs(10), device.next_notification()).await.unwrap().unwrap();
    assert_eq!((n.apns_id.as_str(), n.channel_id.as_str()), (unique.as_str(), channel.as_str()));
    let payload: serde_json::Value = serde_json::from_slice(&n.payload).unwrap();
    assert_eq!(payload["aps"]["content-state"]["score"], "2-1", "{payload}");
    cluster.shutdown().await;
}
