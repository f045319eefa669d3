//! The coordinator's side of the device swarm: starts the worker processes (this same binary, `worker`
//! subcommand), splits the devices between them, sends commands, and folds their reports into one view and
//! into the ledger.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};

use crate::msg::{Command, Progress, WorkerSpec};
use crate::report::Ledger;

/// Links one worker process holds at most by default, well under the 20,000 open files a process may have.
pub const LINKS_PER_WORKER: usize = 15_000;
/// Links per source address by default.
pub const LINKS_PER_SOURCE: usize = 20_000;

/// Everything the swarm needs to start: how many devices over how many workers, and the spec every worker
/// gets (its `worker`, `first` and `count` are filled in per worker; `connect_concurrency` is the total).
pub struct SwarmPlan {
    pub devices: usize,
    pub workers: usize,
    /// Nice steps the workers run below normal.
    pub nice: u8,
    pub spec: WorkerSpec,
}

/// The swarm as the workers last reported it, summed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SwarmTotals {
    pub links: u64,
    pub running: u64,
    pub full: u64,
    pub resumed: u64,
    pub redirected: u64,
    pub drops: u64,
    pub stale: u64,
    pub orphaned: u64,
    /// Links subscribed to their device's broadcast channel.
    pub subscribed: u64,
    pub subscribe_refusals: BTreeMap<String, u64>,
    pub connect_errors: BTreeMap<String, u64>,
    pub error_samples: BTreeMap<String, String>,
    /// Resident memory of all worker processes.
    pub rss: u64,
}

impl SwarmTotals {
    pub fn connect_error_count(&self) -> u64 {
        self.connect_errors.values().sum()
    }
}

#[derive(Default)]
struct State {
    latest: Vec<Progress>,
    tokens: Vec<Option<String>>,
    token_count: usize,
    recovered: Vec<u64>,
    /// Broadcast receipts not yet taken (`SwarmView::take_broadcasts`), and how many were reported in all.
    broadcasts: Vec<(u64, u64, u64)>,
    broadcast_receipts: u64,
    finished: usize,
    /// A worker that died or said something unreadable.
    failure: Option<String>,
}

pub struct Swarm {
    workers: Vec<(Child, ChildStdin)>,
    pub view: SwarmView,
    pub devices: usize,
}

/// Read access to what the workers last reported; cheap to clone into a progress task.
#[derive(Clone)]
pub struct SwarmView {
    state: Arc<Mutex<State>>,
}

impl SwarmView {
    pub fn totals(&self) -> SwarmTotals {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut totals = SwarmTotals::default();
        for p in &state.latest {
            totals.links += p.links;
            totals.running += p.running;
            totals.full += p.full;
            totals.resumed += p.resumed;
            totals.redirected += p.redirected;
            totals.drops += p.drops;
            totals.stale += p.stale;
            totals.orphaned += p.orphaned;
            totals.subscribed += p.subscribed;
            totals.rss += p.rss;
            for (reason, n) in &p.subscribe_refusals {
                *totals.subscribe_refusals.entry(reason.clone()).or_default() += n;
            }
            for (reason, n) in &p.connect_errors {
                *totals.connect_errors.entry(reason.clone()).or_default() += n;
            }
            for (reason, sample) in &p.error_samples {
                totals.error_samples.entry(reason.clone()).or_insert_with(|| sample.clone());
            }
        }
        totals
    }

    /// Tokens reported so far, by device index.
    pub fn tokens(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).tokens.clone()
    }

    pub fn token_count(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).token_count
    }

    /// UNIX µs at which orphans of the killed node first received through another node.
    pub fn recovered(&self) -> Vec<u64> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).recovered.clone()
    }

    /// Broadcast receipts reported since the last call: (broadcast sequence number, device index,
    /// monotonic µs at receipt).
    pub fn take_broadcasts(&self) -> Vec<(u64, u64, u64)> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).broadcasts)
    }

    /// Broadcast receipts reported since the start.
    pub fn broadcast_receipts(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).broadcast_receipts
    }

    /// Fails if a worker died or spoke nonsense.
    pub fn check(&self) -> anyhow::Result<()> {
        match &self.state.lock().unwrap_or_else(|e| e.into_inner()).failure {
            Some(failure) => anyhow::bail!("{failure}"),
            None => Ok(()),
        }
    }
}

impl Swarm {
    /// Starts the workers; devices are split into contiguous ranges.
    pub async fn start(plan: SwarmPlan, ledger: Arc<Mutex<Ledger>>) -> anyhow::Result<Swarm> {
        let exe = std::env::current_exe().context("locating this binary to start workers")?;
        let workers = plan.workers.clamp(1, plan.devices.max(1));
        let state = Arc::new(Mutex::new(State {
            latest: vec![Progress::default(); workers],
            tokens: vec![None; plan.devices],
            ..State::default()
        }));
        let mut handles = Vec::new();
        for worker in 0..workers {
            let first = plan.devices * worker / workers;
            let count = plan.devices * (worker + 1) / workers - first;
            let spec = WorkerSpec {
                worker,
                first,
                count,
                connect_concurrency: plan.spec.connect_concurrency.div_ceil(workers),
                ..plan.spec.clone()
            };
            let mut command = tokio::process::Command::new(&exe);
            crate::die_with_parent(&mut command);
            crate::run_nicer(&mut command, plan.nice);
            let mut child = command
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a swarm worker")?;
            let mut stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let mut line = serde_json::to_vec(&spec)?;
            line.push(b'\n');
            stdin.write_all(&line).await?;
            tokio::spawn(read_reports(worker, stdout, state.clone(), ledger.clone()));
            handles.push((child, stdin));
        }
        Ok(Swarm { workers: handles, view: SwarmView { state }, devices: plan.devices })
    }

    /// The worker processes.
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(|(child, _)| child.id()).collect()
    }

    pub async fn command(&mut self, command: &Command) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(command)?;
        line.push(b'\n');
        for (_, stdin) in &mut self.workers {
            stdin.write_all(&line).await.context("a swarm worker is gone")?;
        }
        Ok(())
    }

    /// Tells every worker which node is about to be killed and waits (up to `timeout`) until each has taken
    /// it: a kill that came first would break links the workers could not yet tell were orphaned.
    pub async fn arm_kill(&mut self, addr: &str, timeout: Duration) -> anyhow::Result<()> {
        self.command(&Command::Killing { addr: addr.to_string() }).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.view.check()?;
            if self.view.state.lock().unwrap_or_else(|e| e.into_inner()).latest.iter().all(|p| p.armed) {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the swarm workers did not take the kill notice within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes every link (acking what arrived) and waits for the workers' last reports and exit.
    pub async fn exit(mut self) -> anyhow::Result<SwarmTotals> {
        let _ = self.command(&Command::Exit).await;
        let workers = self.workers.len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.view.state.lock().unwrap_or_else(|e| e.into_inner()).finished < workers {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (child, stdin) in &mut self.workers {
            let _ = stdin.shutdown().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        }
        Ok(self.view.totals())
    }
}

async fn read_reports(
    worker: usize,
    stdout: tokio::process::ChildStdout,
    state: Arc<Mutex<State>>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => break,
        };
        let mut progress: Progress = match serde_json::from_str(&line) {
            Ok(progress) => progress,
            Err(error) => {
                state.lock().unwrap_or_else(|e| e.into_inner()).failure =
                    Some(format!("worker {worker} sent an unreadable report ({error}): {line:.200}"));
                continue;
            }
        };
        if !progress.receipts.is_empty() {
            let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
            for &(seq, latency_us, device) in &progress.receipts {
                ledger.receipt(seq, latency_us, device);
            }
        }
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        for (device, token) in progress.tokens.drain(..) {
            if let Some(slot) = state.tokens.get_mut(device as usize)
                && slot.replace(token).is_none()
            {
                state.token_count += 1;
            }
        }
        state.recovered.append(&mut progress.recovered);
        state.broadcast_receipts += progress.broadcasts.len() as u64;
        state.broadcasts.append(&mut progress.broadcasts);
        progress.receipts = Vec::new();
        if progress.done {
            state.finished += 1;
        }
        if let Some(slot) = state.latest.get_mut(worker) {
            *slot = progress;
        }
    }
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    if !state.latest.get(worker).is_some_and(|p| p.done) && state.failure.is_none() {
        state.failure = Some(format!("swarm worker {worker} exited before it was told to"));
    }
}
