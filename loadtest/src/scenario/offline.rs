//! `offline`: pushes stored for devices that are away, then drained when they link: stored and drained per
//! second, and nothing lost.

use super::*;

pub async fn offline(args: OfflineArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(args.per_device >= 1, "--per-device must be at least 1");
    let mut run = prepare("offline", &args.target, &args.swarm, &args.output, true).await?;
    run.connect_all(true).await?;
    let targets = run.targets()?;
    run.disconnect(1).await?;
    run.phase("store");
    let total = (args.per_device * run.devices) as u64;
    let mut plan = run.load_plan(&args.load, &args.swarm.topic, targets);
    plan.limit = Some(total);
    // The store phase ends when all `total` are sent, not by time.
    plan.duration = Duration::from_secs(24 * 3600);
    let stored = crate::load::run(plan, run.ledger.clone()).await?;
    let received_offline = run.ledger.lock().unwrap_or_else(|e| e.into_inner()).receipts;
    run.phase("reconnect");
    let reconnect_at = crate::clock_micros();
    let relink = run.connect_all(false).await?;
    let drained = run.drain().await?;
    let devices = run.devices;
    let mut r = run.finish_pushes().await?;
    let store_secs = stored.elapsed.as_secs_f64().max(1e-6);
    let drain_secs = r.last_receipt_us.map(|last| last.saturating_sub(reconnect_at) as f64 / 1e6).unwrap_or(0.0);
    let drain_rate = if drain_secs > 0.0 { r.summary.received as f64 / drain_secs } else { 0.0 };
    let mut rows = vec![
        (
            "stored".into(),
            format!(
                "{} ({} per device), {:.0}/s accepted",
                r.summary.accepted,
                args.per_device,
                r.summary.accepted as f64 / store_secs
            ),
        ),
        ("relinked".into(), format!("{devices} links in {:.2} s", relink.as_secs_f64())),
        ("drain".into(), format!("{} in {drain_secs:.2} s: {drain_rate:.0} notifications/s", r.summary.received)),
    ];
    rows.extend(r.rows());
    r.json();
    r.result["offline"] = json!({
        "per_device": args.per_device,
        "stored": r.summary.accepted,
        "store_secs": store_secs,
        "received_while_offline": received_offline,
        "relink_secs": relink.as_secs_f64(),
        "drain_secs": drain_secs,
        "drain_per_sec": drain_rate,
        "drained": drained,
    });
    let mut extra = Vec::new();
    if received_offline > 0 {
        extra.push(format!("{received_offline} notifications arrived while every device was offline"));
    }
    let failures = verdict(&r.summary, &r.output, extra);
    conclude("courier-loadtest offline", rows, r.result, failures, &r.path, r.finished)
}
