//! `courier-loadtest chaos`: a seeded random schedule of faults against a spawned cluster under push load,
//! ending with the ledger's verdict and a timeline of faults, epochs and error rates. The same seed gives
//! the same schedule (which fault, on which node, held for how long, after how long a calm).
//!
//! One fault at a time, on a node drawn at random: with a replication factor of 2, two faults at once could
//! take both holders of a queue, which no such cluster survives. A fault is held, undone, and the next one
//! starts once every node and the gateway report ready again and a calm gap has passed:
//! - `pause`: SIGSTOP for one to three failure timeouts, then SIGCONT (a stall longer than failure
//!   detection: the node is marked down, its devices move, and it comes back behind the cluster);
//! - `kill`: SIGKILL, down for one to three seconds, then started again on its data and addresses;
//! - `restart`: SIGTERM (the node drains), then started again at once: one step of a rolling restart;
//! - `partition`: cut off from the other nodes for half a failure timeout to three (blackhole routes
//!   between network namespaces, `fabric`: needs root and iproute2), while the gateway and the devices
//!   still reach it; then healed.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, RngCore};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use crate::cli::{ChaosArgs, Fault};
use crate::scenario::{Run, conclude, prepare, start_load, with_uncapped_queues};

/// The nodes' failure timeout when `--node-arg` does not set one (the node's own default).
const DEFAULT_FAILURE_TIMEOUT: Duration = Duration::from_millis(3000);

/// How long the cluster may take to be ready again after a fault is undone.
const RECOVERY_BOUND: Duration = Duration::from_secs(60);

/// One line of the timeline.
#[derive(Debug, Clone, Serialize)]
struct Event {
    /// Seconds since the load began.
    at_secs: f64,
    fault: Fault,
    node: u64,
    what: &'static str,
    /// The epoch of the gateway's view then.
    epoch: Option<u64>,
    /// Pushes answered so far, and how many of them were errors.
    answered: u64,
    errors: u64,
}

/// What one fault cost: the pushes answered from its start until the cluster was ready again.
#[derive(Debug, Clone, Serialize)]
struct FaultWindow {
    fault: Fault,
    node: u64,
    secs: f64,
    answered: u64,
    errors: u64,
    recovered: bool,
}

/// The next fault: after how long a calm, which, on which node (0-based), held for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Step {
    calm: Duration,
    fault: Fault,
    index: usize,
    hold: Duration,
}

/// The seeded schedule: the same seed, faults, node count and timings give the same steps.
struct Schedule {
    rng: StdRng,
    faults: Vec<Fault>,
    nodes: usize,
    calm: f64,
    failure_timeout: Duration,
}

impl Schedule {
    fn new(seed: u64, faults: Vec<Fault>, nodes: usize, calm: f64, failure_timeout: Duration) -> Self {
        Schedule { rng: StdRng::seed_from_u64(seed), faults, nodes, calm: calm.max(0.0), failure_timeout }
    }

    fn next(&mut self) -> Step {
        let calm = Duration::from_secs_f64(self.calm * self.rng.random_range(0.5..1.5));
        let fault = self.faults.choose(&mut self.rng).copied().unwrap_or(Fault::Pause);
        let index = self.rng.random_range(0..self.nodes.max(1));
        let hold = match fault {
            Fault::Pause => self.failure_timeout.mul_f64(self.rng.random_range(1.0..3.0)),
            Fault::Kill => Duration::from_secs_f64(self.rng.random_range(1.0..3.0)),
            Fault::Restart => Duration::ZERO,
            Fault::Partition => self.failure_timeout.mul_f64(self.rng.random_range(0.5..3.0)),
        };
        Step { calm, fault, index, hold }
    }
}

/// A timeline line for `fault` on `node`, now.
async fn mark(run: &Run, started: Instant, fault: Fault, node: u64, what: &'static str) -> Event {
    let (answered, errors) = {
        let ledger = run.ledger.lock().unwrap_or_else(|e| e.into_inner());
        (ledger.sent, ledger.error_count())
    };
    let at_secs = started.elapsed().as_secs_f64();
    Event { at_secs, fault, node, what, epoch: run.target.gateway_epoch().await, answered, errors }
}

fn failure_timeout(node_args: &[String]) -> Duration {
    node_args
        .iter()
        .find_map(|arg| arg.strip_prefix("--failure-timeout-ms=")?.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_FAILURE_TIMEOUT)
}

pub async fn chaos(args: ChaosArgs) -> anyhow::Result<bool> {
    let nodes = args.target.spawn.unwrap_or(0);
    anyhow::ensure!(
        nodes >= 3,
        "chaos injects faults into processes it started: it needs --spawn with at least 3 nodes (so the Raft \
         group keeps a majority and every queue a replica through each fault)"
    );
    anyhow::ensure!(!args.faults.is_empty(), "--faults names no fault");
    let seed = args.seed.unwrap_or_else(|| rand::rng().next_u64());
    // As in failover: every notification an offline device misses must wait for it.
    let mut target = with_uncapped_queues(&args.target);
    target.restartable = true;
    target.partitionable = args.faults.contains(&Fault::Partition);
    let failure_timeout = failure_timeout(&target.node_args);
    let mut run = prepare("chaos", &target, &args.swarm, &args.output, true).await?;
    if !args.output.quiet {
        eprintln!("chaos seed {seed} (rerun the same schedule with --seed {seed})");
    }
    let plan = start_load(&mut run, &args.load, &args.swarm.topic, args.offline_every).await?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.load.duration.max(0.0));
    let load = tokio::spawn(crate::load::run(plan, run.ledger.clone()));

    let mut schedule = Schedule::new(seed, args.faults.clone(), nodes, args.calm, failure_timeout);
    let mut timeline: Vec<Event> = Vec::new();
    let mut windows: Vec<FaultWindow> = Vec::new();
    loop {
        let Step { calm, fault, index, hold } = schedule.next();
        // Only faults that end within the load: the verdict is about faults the cluster got over.
        if Instant::now() + calm + hold >= until {
            break;
        }
        tokio::time::sleep(calm).await;
        let node = run.target.nodes[index].id;
        run.phase(fault.name());
        timeline.push(mark(&run, started, fault, node, "start").await);
        match fault {
            Fault::Pause => {
                run.target.signal(index, libc::SIGSTOP)?;
                tokio::time::sleep(hold).await;
                run.target.signal(index, libc::SIGCONT)?;
            }
            Fault::Kill => {
                run.target.kill(index)?;
                tokio::time::sleep(hold).await;
                run.target.restart(index).await?;
            }
            Fault::Restart => {
                run.target.terminate(index, Duration::from_secs(90)).await?;
                run.target.restart(index).await?;
            }
            Fault::Partition => {
                run.target.isolate(index)?;
                tokio::time::sleep(hold).await;
                run.target.heal()?;
            }
        }
        timeline.push(mark(&run, started, fault, node, "undone").await);
        let deadline = Instant::now() + RECOVERY_BOUND;
        let mut recovered = run.target.healthy().await;
        while !recovered && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            recovered = run.target.healthy().await;
        }
        let end =
            mark(&run, started, fault, node, if recovered { "ready again" } else { "not ready after 60 s" }).await;
        let start = &timeline[timeline.len() - 2];
        windows.push(FaultWindow {
            fault,
            node,
            secs: end.at_secs - start.at_secs,
            answered: end.answered - start.answered,
            errors: end.errors - start.errors,
            recovered,
        });
        timeline.push(end);
        run.phase("load");
    }
    let outcome = load.await??;
    // Devices that sat out the load come back for what was stored for them.
    run.connect_all(false).await?;
    let drained = run.drain().await?;
    let mut r = run.finish_pushes().await?;

    let secs = outcome.elapsed.as_secs_f64().max(1e-6);
    let faults_line = windows.iter().map(|w| format!("{} n{}", w.fault.name(), w.node)).collect::<Vec<_>>().join(", ");
    let mut rows = vec![
        ("seed".into(), seed.to_string()),
        ("load".into(), format!("{} at {} pushes/s for {:.1} s", r.summary.sent, args.load.rate, secs)),
        ("faults".into(), format!("{}: {faults_line}", windows.len())),
        ("lost (accepted, never received)".into(), r.summary.lost().to_string()),
    ];
    rows.extend(r.rows());
    println!("\ntimeline (seconds into the load; gateway epoch; answered / errors so far):");
    for e in &timeline {
        println!(
            "  {:>7.2}  {:<9} node {}  {:<20} epoch {:>4}  {} / {}",
            e.at_secs,
            e.fault.name(),
            e.node,
            e.what,
            e.epoch.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
            e.answered,
            e.errors
        );
    }
    for w in &windows {
        rows.push((
            format!("{} node {}", w.fault.name(), w.node),
            format!(
                "{:.1} s to ready; {} answered, {} errors ({:.1}%)",
                w.secs,
                w.answered,
                w.errors,
                100.0 * w.errors as f64 / w.answered.max(1) as f64
            ),
        ));
    }
    r.json();
    r.result["chaos"] = json!({
        "seed": seed,
        "faults": args.faults,
        "windows": windows,
        "timeline": timeline,
        "lost": r.summary.lost(),
        "duplicates": r.summary.duplicates,
        "misdelivered": r.summary.misdelivered,
        "drained": drained,
        "load_secs": secs,
    });
    // Errors during a fault are expected (503 once a request's deadline passes); what fails a chaos run is
    // a broken promise: an accepted push lost, duplicated or misdelivered, or a cluster that did not recover.
    let s = &r.summary;
    let mut failures = Vec::new();
    if !s.consistent {
        failures.push("the ledger does not balance (a push with no answer, or with two)".into());
    }
    if s.lost() > 0 {
        failures.push(format!("{} accepted notifications never arrived (e.g. {:?})", s.lost(), s.lost_sample));
    }
    if s.duplicates > 0 {
        failures.push(format!("{} duplicate deliveries to the app", s.duplicates));
    }
    if s.misdelivered > 0 {
        failures.push(format!("{} notifications reached the wrong device", s.misdelivered));
    }
    let stuck = windows.iter().filter(|w| !w.recovered).count();
    if stuck > 0 {
        failures.push(format!("the cluster was not ready again within 60 s after {stuck} fault(s)"));
    }
    if windows.is_empty() {
        failures.push("no fault fitted in the load; give a longer --duration or a shorter --calm".into());
    }
    conclude("courier-loadtest chaos", rows, r.result, failures, &r.path, r.finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(seed: u64) -> Vec<Step> {
        let all = vec![Fault::Pause, Fault::Kill, Fault::Restart, Fault::Partition];
        let mut schedule = Schedule::new(seed, all, 3, 4.0, Duration::from_secs(3));
        (0..20).map(|_| schedule.next()).collect()
    }

    #[test]
    fn a_seed_gives_one_schedule_within_the_bounds() {
        assert_eq!(steps(7), steps(7), "the same seed, the same schedule");
        assert_ne!(steps(7), steps(8), "another seed, another schedule");
        for step in steps(7) {
            assert!(step.index < 3);
            assert!((2.0..6.0).contains(&step.calm.as_secs_f64()), "{step:?}");
            let hold = step.hold.as_secs_f64();
            match step.fault {
                Fault::Pause => assert!((3.0..9.0).contains(&hold), "{step:?}"),
                Fault::Kill => assert!((1.0..3.0).contains(&hold), "{step:?}"),
                Fault::Restart => assert_eq!(hold, 0.0),
                Fault::Partition => assert!((1.5..9.0).contains(&hold), "{step:?}"),
            }
        }
        let kinds: std::collections::BTreeSet<&str> = steps(7).iter().map(|s| s.fault.name()).collect();
        assert_eq!(kinds.len(), 4, "twenty draws name every fault kind");
    }

    #[test]
    fn the_failure_timeout_comes_from_the_node_flags() {
        assert_eq!(failure_timeout(&[]), DEFAULT_FAILURE_TIMEOUT);
        let flags = ["--queue-cap-per-topic=5".to_string(), "--failure-timeout-ms=1000".to_string()];
        assert_eq!(failure_timeout(&flags), Duration::from_millis(1000));
    }
}
