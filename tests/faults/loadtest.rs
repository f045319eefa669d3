//! `courier-loadtest` end to end: each scenario at small scale against a cluster it spawns (real `courier`
//! processes, real worker processes), checking that its report adds up. Speed figures stay out of tests;
//! they are in BENCHMARKS.md.

use crate::common;

use std::path::Path;

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    json: serde_json::Value,
}

/// Runs `courier-loadtest <args>` with its cluster, cache and result in `dir`.
fn loadtest(dir: &Path, args: &[&str]) -> Outcome {
    let _turn = crate::ONE_AT_A_TIME.blocking_lock();
    let json_path = dir.join("result.json");
    let output = common::std_command(env!("CARGO_BIN_EXE_courier-loadtest"))
        .args(args)
        .arg("--spawn-dir")
        .arg(dir.join("cluster"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--json")
        .arg(&json_path)
        .current_dir(dir)
        .output()
        .expect("run courier-loadtest");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let json = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(serde_json::Value::Null);
    Outcome { code: output.status.code(), stdout, stderr, json }
}

fn u(value: &serde_json::Value) -> u64 {
    value.as_u64().unwrap_or_else(|| panic!("expected a count, got {value}"))
}

/// The push ledger balances: every push sent was received or is counted under an error reason.
fn assert_ledger_balances(json: &serde_json::Value) -> (u64, u64) {
    let pushes = &json["pushes"];
    let errors: u64 = pushes["errors"].as_object().expect("errors by reason").values().map(u).sum();
    let (sent, received) = (u(&pushes["sent"]), u(&pushes["received"]));
    assert_eq!(sent, received + errors, "sent = received + errors: {pushes}");
    assert_eq!(pushes["consistent"], true);
    assert_eq!(u(&pushes["duplicates"]), 0, "exactly once to the app: {pushes}");
    assert_eq!(u(&pushes["misdelivered"]), 0, "no crossed tokens: {pushes}");
    assert_eq!(u(&json["end_to_end_ms"]["count"]), received, "one latency sample per receipt");
    (sent, received)
}

#[test]
fn connect_ramps_idle_links_and_reconnects_with_resumption() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["connect", "--spawn", "2", "--devices", "300", "--workers", "2", "--hold", "1", "--quiet"];
    let first = loadtest(dir.path(), &args);
    assert_eq!(first.code, Some(0), "{}\n{}", first.stdout, first.stderr);
    let links = &first.json["links"];
    assert_eq!(u(&links["reached"]), 300, "{links}");
    let errors: u64 = links["errors"].as_object().unwrap().values().map(u).sum();
    let handshakes =
        u(&links["handshakes_full"]) + u(&links["handshakes_resumed"]) + u(&links["handshakes_redirected"]);
    assert_eq!(u(&links["attempts"]), handshakes + errors, "every link attempt is a handshake or an error: {links}");
    assert!(u(&links["handshakes_full"]) >= 300, "{links}");
    // The second ramp reconnects every device straight to its node, resuming its TLS session.
    assert_eq!(u(&first.json["reconnect"]["resumed"]), 300, "{}", first.json["reconnect"]);
    assert!(first.json["memory"]["node_kib_per_link"].is_number(), "{}", first.json["memory"]);
    assert!(first.stdout.contains("node memory per idle link"), "summary table: {}", first.stdout);
    assert_eq!(u(&first.json["activated_now"]), 300);

    // A rerun against the same cluster PKI reuses the cached devices.
    let again = loadtest(dir.path(), &args);
    assert_eq!(again.code, Some(0), "{}\n{}", again.stdout, again.stderr);
    assert_eq!(u(&again.json["activated_now"]), 0, "cached devices are not activated again");
    assert_eq!(u(&again.json["links"]["reached"]), 300);
}

#[test]
fn push_ledger_accounts_for_every_notification() {
    let dir = tempfile::tempdir().unwrap();
    let out = loadtest(
        dir.path(),
        &["push", "--spawn", "2", "--devices", "200", "--rate", "300", "--duration", "2", "--connections", "2"],
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let (sent, received) = assert_ledger_balances(&out.json);
    assert!(sent >= 500, "2 s at 300/s is about 600 pushes, got {sent}");
    assert_eq!(received, sent, "a healthy cluster delivers everything it accepted: {}", out.json["pushes"]);
    assert!(out.stderr.contains("links 200/200"), "the live progress line shows the links: {}", out.stderr);
    assert_eq!(out.json["passed"], true);
}

#[test]
fn broadcast_reaches_every_subscriber_of_every_channel() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "broadcast",
        "--spawn",
        "2",
        "--devices",
        "120",
        "--channels",
        "3",
        "--policy",
        "1",
        "--sends",
        "2",
        "--interval-ms",
        "50",
        "--quiet",
    ];
    let out = loadtest(dir.path(), &args);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let broadcast = &out.json["broadcast"];
    assert_eq!(broadcast["subscribers_per_channel"], serde_json::json!([40, 40, 40]), "{broadcast}");
    let sends = broadcast["sends"].as_array().expect("every send");
    assert_eq!(sends.len(), 6, "two per channel: {broadcast}");
    for send in sends {
        assert_eq!((u(&send["received"]), u(&send["missed"]), u(&send["duplicates"])), (40, 0, 0), "{send}");
        assert!(send["last_receipt_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{send}");
    }
    let totals = &broadcast["totals"];
    assert_eq!((u(&totals["received"]), u(&totals["missed"]), u(&totals["misdelivered"])), (240, 0, 0), "{totals}");
    assert!(broadcast["node_bytes_per_subscription"].is_number(), "{broadcast}");
    assert_eq!(out.json["passed"], true);
}

#[test]
fn offline_devices_drain_what_was_stored_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = loadtest(dir.path(), &["offline", "--spawn", "2", "--devices", "200", "--per-device", "3", "--quiet"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let (sent, received) = assert_ledger_balances(&out.json);
    assert_eq!(sent, 600);
    assert_eq!(received, 600);
    let offline = &out.json["offline"];
    assert_eq!(u(&offline["received_while_offline"]), 0, "{offline}");
    assert_eq!(u(&offline["stored"]), 600);
    assert!(offline["drain_per_sec"].as_f64().unwrap() > 0.0, "{offline}");
}

#[test]
fn failover_proves_exactly_once_across_a_killed_node() {
    let dir = tempfile::tempdir().unwrap();
    let out = loadtest(
        dir.path(),
        &[
            "failover",
            "--spawn",
            "3",
            "--devices",
            "300",
            "--rate",
            "150",
            "--duration",
            "8",
            "--kill-after",
            "2",
            "--quiet",
        ],
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let (sent, _) = assert_ledger_balances(&out.json);
    assert!(sent > 1000, "{sent}");
    let failover = &out.json["failover"];
    assert_eq!(u(&failover["lost"]), 0, "{failover}");
    assert!(u(&failover["orphaned_links"]) > 0, "the killed node held links: {failover}");
    assert!(failover["first_recovery_secs"].is_number(), "a device of the killed node got a push again: {failover}");
}

#[test]
fn chaos_keeps_every_promise_through_every_fault_kind() {
    // Partitions put each node in a network namespace: root and iproute2, which `.ci/run` provides.
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "chaos",
        "--spawn",
        "3",
        "--devices",
        "150",
        "--rate",
        "100",
        "--duration",
        "30",
        "--calm",
        "1",
        "--seed",
        "7",
        "--node-arg=--failure-timeout-ms=1000",
        "--node-arg=--probe-interval-ms=200",
        "--node-arg=--raft-heartbeat-ms=100",
        "--node-arg=--raft-election-timeout-ms=500",
        "--quiet",
    ];
    let out = loadtest(dir.path(), &args);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let (sent, _) = assert_ledger_balances(&out.json);
    assert!(sent > 1000, "{sent}");
    let chaos = &out.json["chaos"];
    assert_eq!(u(&chaos["seed"]), 7);
    assert_eq!((u(&chaos["lost"]), u(&chaos["duplicates"]), u(&chaos["misdelivered"])), (0, 0, 0), "{chaos}");
    let windows = chaos["windows"].as_array().expect("fault windows");
    let kinds: std::collections::BTreeSet<&str> = windows.iter().filter_map(|w| w["fault"].as_str()).collect();
    assert_eq!(kinds, ["kill", "partition", "pause", "restart"].into(), "seed 7 draws every fault kind: {chaos}");
    assert!(windows.iter().all(|w| w["recovered"] == true), "ready again after every fault: {chaos}");
}

#[test]
fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = loadtest(dir.path(), &["failover", "--spawn", "2", "--devices", "10", "--quiet"]);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("at least 3 nodes"), "{}", out.stderr);
    let out = loadtest(dir.path(), &["chaos", "--spawn", "2", "--devices", "10", "--quiet"]);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("at least 3 nodes"), "{}", out.stderr);
    let out = loadtest(dir.path(), &["push", "--devices", "10", "--quiet"]);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("--spawn N"), "{}", out.stderr);
    let out = loadtest(dir.path(), &["push", "--spawn", "1", "--rate", "fast"]);
    assert_eq!(out.code, Some(2), "clap refuses the rate");
    assert!(out.stderr.contains("neither `max` nor a positive number"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_cluster_is_reached_through_its_endpoints_ca_and_provider_key() {
    let cluster = common::TestCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (work, pki) = (dir.path().to_path_buf(), cluster.dir.path().to_path_buf());
    let device_addr = cluster.node().device_addr.to_string();
    let provider_addr = cluster.gateway.provider_addr.to_string();
    let metrics = format!("http://{}/metrics", cluster.node().metrics_addr);
    let out = tokio::task::spawn_blocking(move || {
        let pki = pki.to_str().unwrap().to_string();
        loadtest(
            &work,
            &[
                "push",
                "--device-addr",
                &device_addr,
                "--provider-addr",
                &provider_addr,
                "--pki-dir",
                &pki,
                "--node-metrics",
                &metrics,
                "--devices",
                "40",
                "--rate",
                "100",
                "--duration",
                "1.5",
                "--quiet",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let (sent, received) = assert_ledger_balances(&out.json);
    assert!(sent >= 100, "{sent}");
    assert_eq!(received, sent);
    assert_eq!(u(&out.json["spawned_nodes"]), 0);

    // Memory per link comes from the nodes' own gauge when the loadtest did not start them.
    let (work, pki) = (dir.path().to_path_buf(), cluster.dir.path().to_path_buf());
    let device_addr = cluster.node().device_addr.to_string();
    let metrics = format!("http://{}/metrics", cluster.node().metrics_addr);
    let out = tokio::task::spawn_blocking(move || {
        let pki = pki.to_str().unwrap().to_string();
        let args = ["connect", "--device-addr", &device_addr, "--provider-addr", "127.0.0.1:1", "--pki-dir", &pki];
        let mut args: Vec<&str> = args.to_vec();
        args.extend(["--node-metrics", &metrics, "--devices", "40", "--hold", "2", "--no-resume", "--quiet"]);
        loadtest(&work, &args)
    })
    .await
    .unwrap();
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out.json["memory"]["node_rss_after"].as_u64().is_some_and(|rss| rss > 0), "{}", out.json["memory"]);
    assert_eq!(u(&out.json["activated_now"]), 0, "the 40 devices of the push run are cached");
    cluster.shutdown().await;
}
