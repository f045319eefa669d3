//! `push`: every device linked, then provider load at a fixed rate or as fast as answered; end-to-end
//! latency, throughput and the ledger verdict. With `--webhook`, the team's delivery receipts as well.

use super::*;

use crate::receipts::{ReceiptCounts, Receipts};

/// How long receipts may keep arriving after the last one before the run stops waiting for the rest.
const RECEIPTS_QUIET: Duration = Duration::from_secs(15);

pub async fn push(mut args: PushArgs) -> anyhow::Result<bool> {
    if args.webhook {
        anyhow::ensure!(args.target.spawn.is_some(), "--webhook needs a cluster spawned here (--spawn N)");
        args.target.node_args.push("--webhooks-allow-private".into());
    }
    let mut run = prepare("push", &args.target, &args.swarm, &args.output, true).await?;
    let receipts = match args.webhook {
        true => {
            let receipts = Receipts::start().await?;
            let nodes: Vec<String> = run.target.nodes.iter().map(|n| n.cluster_addr.clone()).collect();
            receipts.set_for(&args.target.spawn_dir, &nodes, run.target.signer.team_id()).await?;
            Some(receipts)
        }
        false => None,
    };
    run.connect_all(true).await?;
    let targets = run.targets()?;
    run.phase("push");
    let plan = run.load_plan(&args.load, &args.swarm.topic, targets);
    let started = Instant::now();
    let outcome = crate::load::run(plan, run.ledger.clone()).await?;
    let load_ended = Instant::now();
    let drained = run.drain().await?;
    // Before the cluster stops: the last batches wait up to the nodes' batch wait.
    let receipt_counts = match &receipts {
        Some(receipts) => {
            let delivered = run.ledger.lock().unwrap_or_else(|e| e.into_inner()).summary(0).received;
            Some((wait_for_receipts(receipts, delivered).await, node_receipt_metrics(&run.target).await))
        }
        None => None,
    };
    let mut r = run.finish_pushes().await?;
    let secs = outcome.elapsed.as_secs_f64().max(1e-6);
    let mut rows = vec![
        ("offered rate".into(), args.load.rate.to_string()),
        (
            "load".into(),
            format!("{:.2} s over {} connections x {} streams", secs, args.load.connections, args.load.streams),
        ),
        ("answered pushes/s".into(), format!("{:.0}", r.summary.sent as f64 / secs)),
        ("delivered pushes/s".into(), format!("{:.0}", r.summary.received as f64 / secs)),
    ];
    let mut failures = Vec::new();
    if let Some((counts, on_nodes)) = receipt_counts {
        let delivered = counts.by_outcome.get("delivered").copied().unwrap_or(0);
        let span = counts.last.map_or(0.0, |last| last.duration_since(started).as_secs_f64()).max(1e-6);
        let lag = counts.last.map_or(0.0, |last| last.saturating_duration_since(load_ended).as_secs_f64());
        rows.push((
            "receipts".into(),
            format!(
                "{delivered} delivered for {} delivered pushes; {:.0}/s from the load's start to the last; last \
                 {lag:.2} s after the load",
                r.summary.received,
                delivered as f64 / span
            ),
        ));
        rows.push((
            "receipt requests".into(),
            format!(
                "{} ({:.1} events each), {} repeated events, {} bad signatures, by outcome {:?}",
                counts.requests,
                counts.events as f64 / counts.requests.max(1) as f64,
                counts.events - counts.unique,
                counts.bad_signatures,
                counts.by_outcome
            ),
        ));
        rows.push(("receipts on the nodes".into(), format!("{on_nodes:?}")));
        r.result["webhook"] = json!({
            "node_events": on_nodes,
            "delivered_receipts": delivered,
            "receipts_per_sec": delivered as f64 / span,
            "last_receipt_after_load_secs": lag,
            "requests": counts.requests,
            "events": counts.events,
            "unique_events": counts.unique,
            "bad_signatures": counts.bad_signatures,
            "by_outcome": counts.by_outcome,
        });
        if counts.bad_signatures > 0 {
            failures.push(format!("{} receipt requests with a bad signature", counts.bad_signatures));
        }
        if delivered < r.summary.received {
            failures.push(format!("{} delivered pushes without a receipt", r.summary.received - delivered));
        }
    }
    rows.extend(r.rows());
    r.json();
    r.result["load"] = json!({
        "rate": args.load.rate.to_string(),
        "connections": args.load.connections,
        "streams": args.load.streams,
        "secs": secs,
        "answered_per_sec": r.summary.sent as f64 / secs,
        "accepted_per_sec": r.summary.accepted as f64 / secs,
        "delivered_per_sec": r.summary.received as f64 / secs,
        "drained": drained,
    });
    let failures = verdict(&r.summary, &r.output, failures);
    conclude("courier-loadtest push", rows, r.result, failures, &r.path, r.finished)
}

/// Waits until `receipts` has a `delivered` receipt for each of `delivered` pushes, or until none has
/// come for `RECEIPTS_QUIET`.
async fn wait_for_receipts(receipts: &Receipts, delivered: u64) -> ReceiptCounts {
    let mut last_change = Instant::now();
    let mut seen = 0;
    loop {
        let counts = receipts.counts();
        let got = counts.by_outcome.get("delivered").copied().unwrap_or(0);
        if got >= delivered || last_change.elapsed() >= RECEIPTS_QUIET {
            return counts;
        }
        if counts.events != seen {
            seen = counts.events;
            last_change = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `courier_webhook_events_total` by outcome, added up over the spawned nodes.
async fn node_receipt_metrics(target: &crate::cluster::Target) -> std::collections::BTreeMap<String, f64> {
    let mut sums = std::collections::BTreeMap::new();
    for url in &target.node_metrics {
        let Ok(text) = crate::cluster::http_get(url).await else { continue };
        for line in text.lines().filter(|l| l.starts_with("courier_webhook_events_total{")) {
            let outcome = line.split("outcome=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("?");
            let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            *sums.entry(outcome.to_string()).or_default() += value;
        }
    }
    sums
}
