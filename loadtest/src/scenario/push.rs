//! `push`: every device linked, then provider load at a fixed rate or as fast as answered; end-to-end
//! latency, throughput and the ledger verdict.

use super::*;

pub async fn push(args: PushArgs) -> anyhow::Result<bool> {
    let mut run = prepare("push", &args.target, &args.swarm, &args.output, true).await?;
    run.connect_all(true).await?;
    let targets = run.targets()?;
    run.phase("push");
    let plan = run.load_plan(&args.load, &args.swarm.topic, targets);
    let outcome = crate::load::run(plan, run.ledger.clone()).await?;
    let drained = run.drain().await?;
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
    let failures = verdict(&r.summary, &r.output, Vec::new());
    conclude("courier-loadtest push", rows, r.result, failures, &r.path, r.finished)
}
