//! `failover`: push load with a node SIGKILLed in the middle: nothing answered 200 is lost or duplicated,
//! and how soon the killed node's devices hear from their new owner.

use super::*;

/// The queue cap of the nodes the failover scenario spawns, unless `--node-arg` sets one.
const FAILOVER_QUEUE_CAP: u64 = 1_000_000;

/// `target` with the nodes' queue cap raised to `FAILOVER_QUEUE_CAP` unless `--node-arg` sets one. What an
/// offline device misses must all wait for it: at saturation a device that sits out the load gets far
/// more than the node's default cap (100 per device and topic), and the oldest beyond the cap are dropped
/// by design, which a scenario that counts losses would count as lost. Failover and chaos both need this.
pub(crate) fn with_uncapped_queues(target: &TargetArgs) -> TargetArgs {
    let mut target = target.clone();
    if !target.node_args.iter().any(|arg| arg.starts_with("--queue-cap-per-topic")) {
        target.node_args.push(format!("--queue-cap-per-topic={FAILOVER_QUEUE_CAP}"));
    }
    target
}

/// Links every device, takes every `offline_every`-th one offline again (0: none), and enters the load
/// phase: how each scenario that pushes through faults begins.
pub(crate) async fn start_load(
    run: &mut Run,
    load: &LoadArgs,
    topic: &str,
    offline_every: usize,
) -> anyhow::Result<LoadPlan> {
    run.connect_all(true).await?;
    let targets = run.targets()?;
    if offline_every > 0 {
        run.disconnect(offline_every).await?;
    }
    run.phase("load");
    Ok(run.load_plan(load, topic, targets))
}

pub async fn failover(args: FailoverArgs) -> anyhow::Result<bool> {
    let nodes = args.target.spawn.unwrap_or(0);
    anyhow::ensure!(
        nodes >= 3,
        "failover kills a node process it started: it needs --spawn with at least 3 nodes (so the Raft group \
         keeps a majority and every queue a replica)"
    );
    let kill_index =
        args.kill_node.unwrap_or(nodes).checked_sub(1).filter(|i| *i < nodes).context("--kill-node is out of range")?;
    let target = with_uncapped_queues(&args.target);
    let mut run = prepare("failover", &target, &args.swarm, &args.output, true).await?;
    let plan = start_load(&mut run, &args.load, &args.swarm.topic, args.offline_every).await?;
    let load = tokio::spawn(crate::load::run(plan, run.ledger.clone()));
    tokio::time::sleep(Duration::from_secs_f64(args.kill_after.max(0.0))).await;
    let victim = run.target.nodes[kill_index].device_addr.clone();
    run.swarm.arm_kill(&victim, Duration::from_secs(10)).await?;
    run.target.kill(kill_index)?;
    let killed_at = crate::clock_micros();
    run.phase("killed");
    let outcome = load.await??;
    // Devices that sat out the load come back for what was stored for them.
    run.connect_all(false).await?;
    let drained = run.drain().await?;
    let recovered = run.swarm.view.recovered();
    let mut r = run.finish_pushes().await?;
    let orphaned = r.totals.orphaned;
    let after_kill = |t: u64| t.saturating_sub(killed_at) as f64 / 1e6;
    let first = recovered.iter().min().map(|t| after_kill(*t));
    let last = (recovered.len() as u64 >= orphaned && orphaned > 0)
        .then(|| recovered.iter().max().map(|t| after_kill(*t)))
        .flatten();
    let secs = outcome.elapsed.as_secs_f64().max(1e-6);
    let mut rows = vec![
        ("killed".into(), format!("node {} ({victim}) with SIGKILL after {:.1} s", kill_index + 1, args.kill_after)),
        ("load".into(), format!("{} at {} pushes/s for {:.1} s", r.summary.sent, args.load.rate, secs)),
        ("links lost with the node".into(), orphaned.to_string()),
        (
            "first delivery via new owner".into(),
            first.map(|s| format!("{s:.2} s after the kill")).unwrap_or_else(|| "none".into()),
        ),
        (
            "every orphan delivered again".into(),
            last.map(|s| format!("{s:.2} s after the kill"))
                .unwrap_or_else(|| format!("{} of {orphaned}", recovered.len())),
        ),
        ("lost (accepted, never received)".into(), r.summary.lost().to_string()),
    ];
    rows.extend(r.rows());
    r.json();
    r.result["failover"] = json!({
        "killed_node": kill_index + 1,
        "kill_after_secs": args.kill_after,
        "orphaned_links": orphaned,
        "orphans_recovered": recovered.len(),
        "first_recovery_secs": first,
        "all_recovered_secs": last,
        "lost": r.summary.lost(),
        "duplicates": r.summary.duplicates,
        "drained": drained,
        "load_secs": secs,
    });
    let mut extra = Vec::new();
    if r.summary.lost() > 0 {
        extra.push(format!(
            "{} accepted notifications never arrived (e.g. {:?})",
            r.summary.lost(),
            r.summary.lost_sample
        ));
    }
    let failures = verdict(&r.summary, &r.output, extra);
    conclude("courier-loadtest failover", rows, r.result, failures, &r.path, r.finished)
}
