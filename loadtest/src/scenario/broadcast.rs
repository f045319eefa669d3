//! `broadcast`: every device linked and subscribed to one of `--channels` broadcast channels, then
//! broadcasts sent one at a time: the time from each send to its last subscriber's receipt, each
//! subscriber's latency, deliveries per second, and subscribers missed.
//!
//! Every time is the machine's monotonic clock (`clock_micros`), which the coordinator and the worker
//! processes share: a send is timed just before its HTTP request leaves, a receipt as the device's link
//! hands the notification to its app. A broadcast's apns-id is the gateway's own, so the payload carries
//! the run and sequence number (`msg::broadcast_payload`).

use courier_core::channel::ChannelId;
use courier_gateway::provider::{ProviderClient, PushResponse};

use super::*;
use crate::cli::BroadcastArgs;
use crate::report::{BroadcastLedger, BroadcastTotals, FanoutSummary};

/// How long past a broadcast's settle timeout receipts are still waited for: workers report every 200 ms,
/// so a receipt in time can reach the coordinator that much later.
const REPORT_GRACE: Duration = Duration::from_millis(500);

/// Per-broadcast rows in the summary table at most; the JSON result has every broadcast.
const MAX_ROWS: usize = 20;

/// The channels' push type: the one APNs broadcasts are for.
const PUSH_TYPE: &str = "LiveActivity";

/// How long after subscribing node memory is read again, once the work subscribing set off has settled.
const MEMORY_SETTLE: Duration = Duration::from_secs(5);

pub async fn broadcast(args: BroadcastArgs) -> anyhow::Result<bool> {
    let channels = usize::from(args.channels);
    anyhow::ensure!(
        channels <= args.swarm.devices,
        "--channels {channels} is more than --devices {}: a channel would have no subscriber",
        args.swarm.devices
    );
    anyhow::ensure!(
        args.settle_timeout.is_finite() && args.settle_timeout > 0.0,
        "--settle-timeout must be a positive number of seconds"
    );
    anyhow::ensure!(
        args.target.spawn.is_some() || args.target.channels_addr.is_some(),
        "broadcast creates its channels on the gateway's channels port: give --channels-addr with an existing \
         cluster"
    );
    let settle = Duration::from_secs_f64(args.settle_timeout);
    let app = args.swarm.topic.clone();
    let mut run = prepare("broadcast", &args.target, &args.swarm, &args.output, false).await?;
    let ramp = run.connect_all(false).await?;

    run.phase("channels");
    let authorization = format!("bearer {}", run.target.signer.sign());
    let channels_addr = run.target.channels_addr.context("the gateway did not say where its channels port is")?;
    let manager = Provider::connect(&run.target, channels_addr, &authorization).await?;
    let mut ids = Vec::with_capacity(channels);
    for _ in 0..channels {
        ids.push(manager.create_channel(&app, args.policy).await?);
    }
    // Node memory with every link up, then with every link subscribed, and again once what subscribing set
    // in motion (stores' commits, copies to successors, the allocator's purge) has settled: what a
    // subscription costs.
    let rss_linked = run.target.node_rss().await;
    let subscribing = run.subscribe(ids.clone()).await?;
    let rss_subscribed = run.target.node_rss().await;
    tokio::time::sleep(MEMORY_SETTLE).await;
    let rss_settled = run.target.node_rss().await;

    let provider = Provider::connect(&run.target, run.target.provider_addr, &authorization).await?;
    let mut ledger = BroadcastLedger::new(run.devices, channels);
    let total = args.sends as usize * channels;
    // CPU time and wall time of the broadcasts' windows (send to settled), pauses left out.
    let (mut cpu, mut busy) = (CpuUse::default(), Duration::ZERO);
    for round in 0..args.sends as usize {
        for (channel, id) in ids.iter().enumerate() {
            let seq = ledger.next_seq();
            if seq > 0 {
                tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
            }
            run.phase(&format!("send {}/{total}", seq + 1));
            let (cpu_before, window) = (CpuUse::now(&run), Instant::now());
            let (sent_us, answer) = provider.broadcast(&app, id, run.run_id, seq).await;
            let recorded = ledger.sent(channel, sent_us);
            debug_assert_eq!(recorded, seq);
            let accepted = answer.is_ok();
            ledger.answered(seq, answer);
            if !accepted {
                cpu.add(cpu_before, CpuUse::now(&run));
                busy += window.elapsed();
                continue;
            }
            let subscribers = ledger.subscribers(channel);
            let waited = Duration::from_micros(crate::clock_micros().saturating_sub(sent_us));
            let timeout = settle.saturating_sub(waited) + REPORT_GRACE;
            run.wait(timeout, |run| {
                take_receipts(&run.swarm.view, &mut ledger);
                ledger.received(seq) >= subscribers
            })
            .await?;
            cpu.add(cpu_before, CpuUse::now(&run));
            busy += window.elapsed();
            tracing::debug!(round, channel, seq, received = ledger.received(seq), subscribers, "broadcast settled");
        }
    }

    let path = run.json_path();
    let mut result = run.describe();
    let view = run.swarm.view.clone();
    let subscribe_refusals = view.totals().subscribe_refusals;
    let (totals, finished) = run.finish().await?;
    // Whatever the workers reported last, late receipts included.
    take_receipts(&view, &mut ledger);
    let settle_us = settle.as_micros() as u64;
    let sends = ledger.summaries(settle_us);
    let figures = ledger.totals(settle_us);

    let subscribers: Vec<usize> = (0..channels).map(|channel| ledger.subscribers(channel)).collect();
    let devices: usize = subscribers.iter().sum();
    let mut rows = vec![
        (
            "channels".into(),
            format!(
                "{channels} (message-storage-policy {}, {PUSH_TYPE}), {} subscribers each; {} broadcasts each, \
                 one at a time, {} ms after the one before settled",
                args.policy,
                spread_of_counts(&subscribers),
                args.sends,
                args.interval_ms
            ),
        ),
        ("links".into(), format!("{devices} in {:.2} s", ramp.as_secs_f64())),
        ("subscribed".into(), subscribed_row(devices, subscribing, &subscribe_refusals)),
    ];
    let per_subscription = |after: Option<u64>| match (rss_linked, after) {
        (Some(before), Some(after)) if devices > 0 => Some(after.saturating_sub(before) as f64 / devices as f64),
        _ => None,
    };
    let (at_once, settled) = (per_subscription(rss_subscribed), per_subscription(rss_settled));
    if let (Some(before), Some(after), Some(later), Some(each), Some(each_later)) =
        (rss_linked, rss_subscribed, rss_settled, at_once, settled)
    {
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        rows.push((
            "node memory".into(),
            format!(
                "{:.1} MiB linked, {:.1} MiB subscribed ({each:.0} bytes a subscription), {:.1} MiB {} s later \
                 ({each_later:.0} bytes a subscription)",
                mib(before),
                mib(after),
                mib(later),
                MEMORY_SETTLE.as_secs()
            ),
        ));
    }
    if sends.len() <= MAX_ROWS {
        for send in &sends {
            rows.push((format!("broadcast {} (channel {})", send.seq + 1, send.channel), send_row(send)));
        }
    }
    rows.extend(total_rows(&figures, args.settle_timeout));
    rows.push(("CPU in the broadcasts".into(), cpu.row(busy)));
    swarm_rows(&mut rows, &totals);

    result["broadcast"] = json!({
        "channels": channels,
        "policy": args.policy,
        "push_type": PUSH_TYPE,
        "sends_per_channel": args.sends,
        "interval_ms": args.interval_ms,
        "settle_secs": args.settle_timeout,
        "subscribers_per_channel": subscribers,
        "ramp_secs": ramp.as_secs_f64(),
        "node_rss_linked_bytes": rss_linked,
        "node_rss_subscribed_bytes": rss_subscribed,
        "node_rss_settled_bytes": rss_settled,
        "node_bytes_per_subscription": at_once,
        "node_bytes_per_subscription_settled": settled,
        "subscribe_secs": subscribing.as_secs_f64(),
        "subscribe_refusals": subscribe_refusals,
        "totals": figures,
        "cpu": cpu.json(busy),
        "sends": sends,
    });
    result["links"] = links_json(&totals);
    result["links"]["stale"] = json!(totals.stale);
    let failures = verdict(&figures);
    conclude("courier-loadtest broadcast", rows, result, failures, &path, finished)
}

impl Run {
    /// Has every device's link subscribe to its channel (device `i` to `channels[i % len]`) and waits until
    /// all are; fails with the refusals if they are not within the ramp timeout.
    async fn subscribe(&mut self, channels: Vec<String>) -> anyhow::Result<Duration> {
        self.phase("subscribe");
        let started = Instant::now();
        self.swarm.command(&Command::Subscribe { channels }).await?;
        let n = self.devices as u64;
        if !self.wait(self.ramp_timeout, |run| run.swarm.view.totals().subscribed >= n).await? {
            let totals = self.swarm.view.totals();
            anyhow::bail!(
                "{} of {n} links subscribed in {:?} ({} links up); refusals: {:?}",
                totals.subscribed,
                self.ramp_timeout,
                totals.links,
                totals.subscribe_refusals
            );
        }
        Ok(started.elapsed())
    }
}

/// CPU seconds the parties of a run have used: the spawned nodes, the gateway, the swarm's workers and
/// this coordinator. On one machine they share the cores, so the swarm's share is CPU the cluster did not
/// get.
#[derive(Debug, Default, Clone, Copy)]
struct CpuUse {
    nodes: f64,
    gateway: f64,
    workers: f64,
    coordinator: f64,
}

impl CpuUse {
    fn now(run: &Run) -> CpuUse {
        let sum = |pids: &[u32]| pids.iter().filter_map(|&pid| crate::cpu_seconds(pid)).sum();
        let (nodes, gateway) = run.target.pids();
        CpuUse {
            nodes: sum(&nodes),
            gateway: sum(gateway.as_slice()),
            workers: sum(&run.swarm.pids()),
            coordinator: sum(&[std::process::id()]),
        }
    }

    /// Adds what was used between `before` and `after`.
    fn add(&mut self, before: CpuUse, after: CpuUse) {
        self.nodes += (after.nodes - before.nodes).max(0.0);
        self.gateway += (after.gateway - before.gateway).max(0.0);
        self.workers += (after.workers - before.workers).max(0.0);
        self.coordinator += (after.coordinator - before.coordinator).max(0.0);
    }

    fn total(&self) -> f64 {
        self.nodes + self.gateway + self.workers + self.coordinator
    }

    /// In cores: CPU seconds over `wall`.
    fn row(&self, wall: Duration) -> String {
        let secs = wall.as_secs_f64().max(1e-6);
        format!(
            "{:.2} cores over {:.1} s: nodes {:.2}, gateway {:.2}, swarm workers {:.2}, coordinator {:.2} (of {})",
            self.total() / secs,
            secs,
            self.nodes / secs,
            self.gateway / secs,
            self.workers / secs,
            self.coordinator / secs,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        )
    }

    fn json(&self, wall: Duration) -> serde_json::Value {
        json!({
            "wall_secs": wall.as_secs_f64(),
            "nodes_secs": self.nodes,
            "gateway_secs": self.gateway,
            "workers_secs": self.workers,
            "coordinator_secs": self.coordinator,
        })
    }
}

fn take_receipts(view: &SwarmView, ledger: &mut BroadcastLedger) {
    for (seq, device, at_us) in view.take_broadcasts() {
        ledger.receipt(seq, device, at_us);
    }
}

/// A provider's HTTP/2 connection to one of the gateway's ports, with its JWT.
struct Provider {
    client: ProviderClient,
    addr: SocketAddr,
    authorization: String,
}

impl Provider {
    async fn connect(target: &Target, addr: SocketAddr, authorization: &str) -> anyhow::Result<Provider> {
        let client = ProviderClient::connect(addr, &target.server_name, &target.ca)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to the gateway at {addr}: {e}"))?;
        Ok(Provider { client, addr, authorization: authorization.to_string() })
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Result<PushResponse, String> {
        let mut all = vec![("authorization".to_string(), self.authorization.clone())];
        all.extend(headers.iter().map(|(name, value)| (name.to_string(), value.to_string())));
        // The loadtest does not depend on the `http` crate; `ProviderClient::request` names its method type.
        let post = "POST".parse().map_err(|e| format!("{e}"))?;
        self.client.request(post, path, all, body).await.map_err(|e| format!("transport: {e}"))
    }

    /// Creates a channel for `app`; its id (base64).
    async fn create_channel(&self, app: &str, policy: u8) -> anyhow::Result<String> {
        let body = format!(r#"{{"message-storage-policy":{policy},"push-type":"{PUSH_TYPE}"}}"#);
        let path = format!("/1/apps/{app}/channels");
        let response = self
            .post(&path, &[], body.into_bytes())
            .await
            .map_err(|e| anyhow::anyhow!("creating a channel at {}: {e}", self.addr))?;
        anyhow::ensure!(
            response.status == 201,
            "creating a channel at {}{path}: HTTP {} {}",
            self.addr,
            response.status,
            response.reason.as_deref().unwrap_or("")
        );
        let id = response.header("apns-channel-id").context("a created channel came without apns-channel-id")?;
        anyhow::ensure!(ChannelId::parse(id).is_some(), "the gateway named the new channel {id:?}, not a channel id");
        Ok(id.to_string())
    }

    /// Sends broadcast `seq` on channel `id`: when it was sent (`clock_micros`, taken just before the
    /// request), and when it was answered 200 or why not.
    async fn broadcast(&self, app: &str, id: &str, run_id: u32, seq: u64) -> (u64, Result<u64, String>) {
        let path = format!("/4/broadcasts/apps/{app}");
        let headers = [("apns-channel-id", id), ("apns-push-type", "liveactivity")];
        let payload = crate::msg::broadcast_payload(run_id, seq, courier_core::ids::unix_millis() / 1000);
        let sent_us = crate::clock_micros();
        let answer = self.post(&path, &headers, payload).await;
        let answered_us = crate::clock_micros();
        let answer = match answer {
            Ok(response) if response.status == 200 => Ok(answered_us),
            Ok(response) => Err(response.reason.unwrap_or_else(|| format!("HTTP {}", response.status))),
            Err(error) => Err(error),
        };
        (sent_us, answer)
    }
}

/// "N" when every channel has as many subscribers, else "N–M".
fn spread_of_counts(counts: &[usize]) -> String {
    let (min, max) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
    if min == max { min.to_string() } else { format!("{min}–{max}") }
}

fn subscribed_row(devices: usize, took: Duration, refusals: &std::collections::BTreeMap<String, u64>) -> String {
    let mut row = format!("{devices} links in {:.2} s", took.as_secs_f64());
    if !refusals.is_empty() {
        row.push_str(&format!(" (refused and asked again: {refusals:?})"));
    }
    row
}

fn send_row(send: &FanoutSummary) -> String {
    if let Some(error) = &send.error {
        return format!("refused: {error}");
    }
    let mut row = format!("{}/{}", send.received, send.subscribers);
    if let Some(last) = send.last_receipt_ms {
        row.push_str(&format!(" in {last:.1} ms, {:.0} deliveries/s", send.deliveries_per_sec));
    }
    if let Some(latency) = &send.latency {
        row.push_str(&format!(", p50 {:.1} p99 {:.1} ms", latency.p50_ms, latency.p99_ms));
    }
    if let Some(answer) = send.answer_ms {
        row.push_str(&format!(", answered in {answer:.1} ms"));
    }
    if send.missed > 0 {
        row.push_str(&format!(", {} missed ({} late)", send.missed, send.late));
    }
    row
}

fn total_rows(t: &BroadcastTotals, settle_secs: f64) -> Vec<(String, String)> {
    let spread = |s: &Option<crate::report::Spread>, unit: &str, digits: usize| match s {
        Some(s) => format!(
            "min {:.digits$}  median {:.digits$}  max {:.digits$}{unit}",
            s.min,
            s.median,
            s.max,
            digits = digits
        ),
        None => "-".into(),
    };
    vec![
        (
            "time to last receipt".into(),
            format!(
                "{}  (over {} complete of {} broadcasts)",
                spread(&t.last_receipt_ms, " ms", 1),
                t.complete,
                t.sends
            ),
        ),
        ("deliveries/s".into(), spread(&t.deliveries_per_sec, "", 0)),
        ("gateway answer".into(), spread(&t.answer_ms, " ms", 1)),
        ("per-subscriber latency".into(), t.latency.as_ref().map_or_else(|| "-".into(), Percentiles::row)),
        (
            "missed".into(),
            format!(
                "{} of {} deliveries (not within {settle_secs} s; {} of them late)",
                t.missed, t.deliveries_due, t.late
            ),
        ),
        ("refused broadcasts".into(), t.refused.to_string()),
        ("duplicates / misdelivered".into(), format!("{} / {}", t.duplicates, t.misdelivered)),
    ]
}

/// Pass/fail: every broadcast answered 200 and received by every subscriber in time, once, and by no one else.
fn verdict(t: &BroadcastTotals) -> Vec<String> {
    let mut failures = Vec::new();
    if t.refused > 0 {
        failures.push(format!("{} of {} broadcasts refused", t.refused, t.sends));
    }
    if t.missed > 0 {
        failures.push(format!("{} of {} deliveries missed", t.missed, t.deliveries_due));
    }
    if t.duplicates > 0 {
        failures.push(format!("{} duplicate deliveries to the app", t.duplicates));
    }
    if t.misdelivered > 0 {
        failures.push(format!("{} broadcasts reached a device not subscribed to their channel", t.misdelivered));
    }
    failures
}
