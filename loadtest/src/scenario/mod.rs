//! The scenarios beside `chaos`, one file each (`connect`, `push`, `offline`, `failover`, `broadcast`), and
//! what they share here: each prepares the target and the swarm the same way (`prepare`), drives its phases,
//! prints a summary table, writes the JSON result (`conclude`), and returns whether the run passed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use courier_core::shutdown::CancellationToken;
use courier_device::Connector;
use serde_json::json;
use tokio::time::Instant;

use crate::cli::{ConnectArgs, FailoverArgs, LoadArgs, OfflineArgs, OutputArgs, PushArgs, SwarmArgs, TargetArgs};
use crate::cluster::Target;
use crate::load::LoadPlan;
use crate::msg::{Command, WorkerSpec};
use crate::report::{Ledger, Percentiles, ProgressLine, PushSummary, print_table, write_json};
use crate::swarm::{LINKS_PER_SOURCE, LINKS_PER_WORKER, Swarm, SwarmPlan, SwarmTotals, SwarmView};

mod broadcast;
mod connect;
mod failover;
mod offline;
mod push;

pub use broadcast::broadcast;
pub use connect::connect;
pub use failover::failover;
pub(crate) use failover::{start_load, with_uncapped_queues};
pub use offline::offline;
pub use push::push;

/// A prepared run: the cluster, the swarm (started, links not yet opened) and the ledger.
pub(crate) struct Run {
    scenario: &'static str,
    pub(crate) target: Target,
    swarm: Swarm,
    pub(crate) ledger: Arc<Mutex<Ledger>>,
    run_id: u32,
    devices: usize,
    workers: usize,
    source_addrs: Vec<IpAddr>,
    activated: usize,
    phase: Arc<Mutex<String>>,
    progress_stop: CancellationToken,
    progress: tokio::task::JoinHandle<()>,
    output: OutputArgs,
    ramp_timeout: Duration,
}

pub(crate) async fn prepare(
    scenario: &'static str,
    target_args: &TargetArgs,
    swarm_args: &SwarmArgs,
    output: &OutputArgs,
    register: bool,
) -> anyhow::Result<Run> {
    anyhow::ensure!(swarm_args.devices > 0, "--devices must be at least 1");
    let target = Target::from_args(target_args, output.quiet).await?;
    let mut endpoints: Vec<SocketAddr> = Vec::new();
    for addr in &target.device_addrs {
        endpoints.push(courier_device::resolve(addr).await?);
    }
    let devices = swarm_args.devices;
    if target.spawned() && devices.div_ceil(target.nodes.len()) > 19_000 {
        eprintln!(
            "warning: {devices} links over {} node processes is more than the 20,000 open files a process may \
             hold here; use more nodes",
            target.nodes.len()
        );
    }
    let cache = crate::devices::cache_dir(&swarm_args.cache_dir, &target.ca)?;
    let roots = Arc::new(courier_core::tls::roots_from(&target.ca)?);
    let activation = Connector::with_roots(roots, &target.server_name, None)?;
    let activated =
        crate::devices::ensure(&cache, devices, &endpoints, &activation, &target.enrolment_secret, output.quiet)
            .await
            .context("activating devices")?;
    let workers = swarm_args.workers.unwrap_or_else(|| devices.div_ceil(LINKS_PER_WORKER)).max(1);
    let source_addrs = if !swarm_args.source_addrs.is_empty() {
        swarm_args.source_addrs.clone()
    } else if endpoints.iter().all(|e| e.ip().is_loopback()) && devices > LINKS_PER_SOURCE {
        (1..=devices.div_ceil(LINKS_PER_SOURCE) as u8).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect()
    } else {
        Vec::new()
    };
    let run_id: u32 = rand::random();
    let ledger = Arc::new(Mutex::new(Ledger::new(run_id)));
    // Only the link ramps of `connect` are handshakes and nothing else (`SwarmArgs::device_nice`).
    let nice = swarm_args.device_nice.unwrap_or(if scenario == "connect" { 5 } else { 0 });
    let swarm = Swarm::start(
        SwarmPlan {
            devices,
            workers,
            nice,
            spec: WorkerSpec {
                worker: 0,
                cache,
                first: 0,
                count: 0,
                endpoints: target.device_addrs.clone(),
                owner_addrs: target.owner_addrs(),
                ca: target.ca.clone(),
                server_name: target.server_name.clone(),
                source_addrs: source_addrs.clone(),
                topic: register.then(|| swarm_args.topic.clone()),
                run_id,
                connect_concurrency: swarm_args.connect_concurrency,
                max_backoff_ms: swarm_args.max_backoff_ms,
            },
        },
        ledger.clone(),
    )
    .await?;
    let phase = Arc::new(Mutex::new("starting".to_string()));
    let progress_stop = CancellationToken::new();
    let progress = tokio::spawn(progress_loop(
        swarm.view.clone(),
        ledger.clone(),
        phase.clone(),
        devices,
        output.quiet,
        progress_stop.clone(),
    ));
    Ok(Run {
        scenario,
        target,
        swarm,
        ledger,
        run_id,
        devices,
        workers,
        source_addrs,
        activated,
        phase,
        progress_stop,
        progress,
        output: output.clone(),
        ramp_timeout: Duration::from_secs(swarm_args.ramp_timeout),
    })
}

/// The live line: every second, what changed since the last one.
async fn progress_loop(
    view: SwarmView,
    ledger: Arc<Mutex<Ledger>>,
    phase: Arc<Mutex<String>>,
    devices: usize,
    quiet: bool,
    stop: CancellationToken,
) {
    let mut line = ProgressLine::new(quiet);
    let started = Instant::now();
    let (mut last_at, mut last_handshakes, mut last_sent, mut last_received) = (Instant::now(), 0u64, 0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let totals = view.totals();
        let (sent, received, errors, p99) = {
            let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
            (ledger.sent, ledger.receipts, ledger.error_count(), ledger.take_interval_p99_ms())
        };
        // Receipts of either kind: pushes (the ledger's) and broadcasts (counted by the swarm).
        let received = received + view.broadcast_receipts();
        let handshakes = totals.full + totals.resumed + totals.redirected;
        let secs = last_at.elapsed().as_secs_f64().max(1e-3);
        let rate = |now: u64, before: u64| (now.saturating_sub(before)) as f64 / secs;
        let phase = phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
        line.show(&format!(
            "[{:>6.1}s] {phase:<9} links {}/{devices}  handshakes {:.0}/s  sent {sent} ({:.0}/s)  recv {received} \
             ({:.0}/s)  p99 {}  errors {}",
            started.elapsed().as_secs_f64(),
            totals.links,
            rate(handshakes, last_handshakes),
            rate(sent, last_sent),
            rate(received, last_received),
            p99.map(|p| format!("{p:.1}ms")).unwrap_or_else(|| "-".into()),
            errors + totals.connect_error_count(),
        ));
        (last_at, last_handshakes, last_sent, last_received) = (Instant::now(), handshakes, sent, received);
    }
    line.finish();
}

impl Run {
    pub(crate) fn phase(&self, name: &str) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = name.to_string();
    }

    /// Polls until `done` holds; `false` after `timeout`. Fails at once if a worker died.
    async fn wait(&self, timeout: Duration, mut done: impl FnMut(&Run) -> bool) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            self.swarm.view.check()?;
            if done(self) {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn links(&self) -> u64 {
        self.swarm.view.totals().links
    }

    /// Opens every link and, when registering, waits for every token; fails with what went wrong if the
    /// swarm does not get there in time.
    pub(crate) async fn connect_all(&mut self, register: bool) -> anyhow::Result<Duration> {
        self.phase("connect");
        let started = Instant::now();
        self.swarm.command(&Command::Connect).await?;
        let n = self.devices;
        let ok = self
            .wait(self.ramp_timeout, |run| run.links() >= n as u64 && (!register || run.swarm.view.token_count() >= n))
            .await?;
        if !ok {
            let totals = self.swarm.view.totals();
            anyhow::bail!(
                "the swarm reached {} of {n} links ({} tokens) in {:?}; link errors: {:?}; examples: {:?}",
                totals.links,
                self.swarm.view.token_count(),
                self.ramp_timeout,
                totals.connect_errors,
                totals.error_samples
            );
        }
        Ok(started.elapsed())
    }

    /// Closes the links of every `every`th device and waits until they are closed.
    pub(crate) async fn disconnect(&mut self, every: usize) -> anyhow::Result<()> {
        self.phase("close");
        self.swarm.command(&Command::Disconnect { every }).await?;
        let expected = (self.devices - self.devices.div_ceil(every.max(1))) as u64;
        let ok = self.wait(Duration::from_secs(60), |run| run.swarm.view.totals().running == expected).await?;
        anyhow::ensure!(ok, "links did not close within 60 s");
        Ok(())
    }

    /// Tokens by device, in device order.
    pub(crate) fn targets(&self) -> anyhow::Result<Vec<(u64, String)>> {
        self.swarm
            .view
            .tokens()
            .into_iter()
            .enumerate()
            .map(|(i, token)| token.map(|t| (i as u64, t)).with_context(|| format!("device {i} has no token")))
            .collect()
    }

    pub(crate) fn load_plan(&self, load: &LoadArgs, topic: &str, targets: Vec<(u64, String)>) -> LoadPlan {
        LoadPlan {
            provider_addr: self.target.provider_addr,
            server_name: self.target.server_name.clone(),
            ca: self.target.ca.clone(),
            signer: self.target.signer.clone(),
            topic: topic.to_string(),
            connections: load.connections,
            streams: load.streams,
            rate: load.rate,
            duration: Duration::from_secs_f64(load.duration.max(0.0)),
            run_id: self.run_id,
            targets,
            limit: None,
        }
    }

    /// Waits (up to `--drain-timeout`) for accepted notifications still on their way.
    pub(crate) async fn drain(&self) -> anyhow::Result<bool> {
        self.phase("drain");
        let timeout = Duration::from_secs(self.output.drain_timeout);
        self.wait(timeout, |run| run.ledger.lock().unwrap_or_else(|e| e.into_inner()).complete()).await
    }

    /// Stops the swarm, the progress line and the cluster; returns the swarm's last totals.
    async fn finish(self) -> anyhow::Result<(SwarmTotals, Finished)> {
        let Run { swarm, progress_stop, progress, target, .. } = self;
        let totals = swarm.exit().await?;
        progress_stop.cancel();
        let _ = progress.await;
        target.stop().await;
        Ok((totals, Finished))
    }

    fn describe(&self) -> serde_json::Value {
        json!({
            "scenario": self.scenario,
            "run_id": format!("{:08x}", self.run_id),
            "devices": self.devices,
            "workers": self.workers,
            "source_addrs": self.source_addrs,
            "activated_now": self.activated,
            "spawned_nodes": self.target.nodes.len(),
            "device_endpoints": self.target.device_addrs,
            "provider_addr": self.target.provider_addr.to_string(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        })
    }

    fn json_path(&self) -> PathBuf {
        self.output.json.clone().unwrap_or_else(|| PathBuf::from(format!("loadtest-{}.json", self.scenario)))
    }
}

/// Proof that `Run::finish` ran (the cluster is stopped) before results are written.
pub(crate) struct Finished;

fn swarm_rows(rows: &mut Vec<(String, String)>, totals: &SwarmTotals) {
    rows.push((
        "handshakes".into(),
        format!("{} full, {} resumed, {} redirected", totals.full, totals.resumed, totals.redirected),
    ));
    rows.push(("link errors".into(), format!("{} {:?}", totals.connect_error_count(), totals.connect_errors)));
    rows.push(("links dropped".into(), totals.drops.to_string()));
}

fn push_rows(rows: &mut Vec<(String, String)>, summary: &PushSummary, e2e: &Percentiles, response: &Percentiles) {
    rows.push(("sent".into(), summary.sent.to_string()));
    rows.push(("accepted (200)".into(), summary.accepted.to_string()));
    rows.push(("received".into(), summary.received.to_string()));
    rows.push(("errors".into(), format!("{} {:?}", summary.error_total(), summary.errors)));
    rows.push(("every push answered once".into(), summary.consistent.to_string()));
    rows.push(("duplicates / misdelivered".into(), format!("{} / {}", summary.duplicates, summary.misdelivered)));
    if summary.delivered_despite_error > 0 || summary.stale > 0 {
        rows.push((
            "delivered despite error / stale".into(),
            format!("{} / {}", summary.delivered_despite_error, summary.stale),
        ));
    }
    rows.push(("end-to-end latency".into(), e2e.row()));
    rows.push(("provider answer latency".into(), response.row()));
}

/// Pass/fail: the reasons a run failed (empty = passed).
pub(crate) fn verdict(s: &PushSummary, output: &OutputArgs, extra: Vec<String>) -> Vec<String> {
    let mut failures = extra;
    if !s.consistent {
        failures.push("the ledger does not balance (a push with no answer, or with two)".into());
    }
    if s.duplicates > 0 {
        failures.push(format!("{} duplicate deliveries to the app", s.duplicates));
    }
    if s.misdelivered > 0 {
        failures.push(format!("{} notifications reached the wrong device", s.misdelivered));
    }
    let rate = s.error_total() as f64 / s.sent.max(1) as f64;
    if rate > output.max_error_rate {
        failures.push(format!("error rate {:.4} over --max-error-rate {}", rate, output.max_error_rate));
    }
    failures
}

pub(crate) fn conclude(
    title: &str,
    mut rows: Vec<(String, String)>,
    mut result: serde_json::Value,
    failures: Vec<String>,
    path: &std::path::Path,
    _finished: Finished,
) -> anyhow::Result<bool> {
    let passed = failures.is_empty();
    rows.push(("result".into(), if passed { "PASS".into() } else { format!("FAIL: {}", failures.join("; ")) }));
    print_table(title, &rows);
    result["passed"] = json!(passed);
    result["failures"] = json!(failures);
    write_json(path, &result)?;
    println!("\nJSON result: {}", path.display());
    Ok(passed)
}

fn kib(bytes: f64) -> f64 {
    bytes / 1024.0
}

/// What every push-carrying scenario reports once the cluster is stopped.
pub(crate) struct PushResult {
    pub(crate) summary: PushSummary,
    e2e: Percentiles,
    response: Percentiles,
    totals: SwarmTotals,
    last_receipt_us: Option<u64>,
    pub(crate) path: PathBuf,
    pub(crate) result: serde_json::Value,
    output: OutputArgs,
    pub(crate) finished: Finished,
}

impl Run {
    pub(crate) async fn finish_pushes(self) -> anyhow::Result<PushResult> {
        let path = self.json_path();
        let result = self.describe();
        let output = self.output.clone();
        let ledger = self.ledger.clone();
        let (totals, finished) = self.finish().await?;
        let ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
        Ok(PushResult {
            summary: ledger.summary(totals.stale),
            e2e: Percentiles::of(&ledger.end_to_end),
            response: Percentiles::of(&ledger.response),
            last_receipt_us: ledger.last_receipt_us,
            totals,
            path,
            result,
            output,
            finished,
        })
    }
}

impl PushResult {
    pub(crate) fn rows(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        push_rows(&mut rows, &self.summary, &self.e2e, &self.response);
        swarm_rows(&mut rows, &self.totals);
        rows
    }

    pub(crate) fn json(&mut self) {
        self.result["pushes"] = json!(self.summary);
        self.result["end_to_end_ms"] = json!(self.e2e);
        self.result["provider_answer_ms"] = json!(self.response);
        self.result["links"] = links_json(&self.totals);
    }
}

/// What every scenario reports of the swarm's links: handshakes by kind, errors with samples, drops.
pub(crate) fn links_json(totals: &SwarmTotals) -> serde_json::Value {
    json!({
        "handshakes_full": totals.full,
        "handshakes_resumed": totals.resumed,
        "handshakes_redirected": totals.redirected,
        "errors": totals.connect_errors,
        "error_samples": totals.error_samples,
        "drops": totals.drops,
    })
}
