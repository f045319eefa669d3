//! `connect`: ramps device links up to `--devices` and measures handshakes, links per second, memory per
//! link and reconnects.

use super::*;

pub async fn connect(args: ConnectArgs) -> anyhow::Result<bool> {
    let mut run = prepare("connect", &args.target, &args.swarm, &args.output, false).await?;
    let n = run.devices as u64;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_before = run.target.node_rss().await;
    let before = run.swarm.view.totals();
    let ramp = run.connect_all(false).await?;
    let ramped = run.swarm.view.totals();
    run.phase("hold");
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let rss_after = run.target.node_rss().await;
    let held = run.swarm.view.totals();
    let handshakes = |t: &SwarmTotals| t.full + t.resumed + t.redirected;
    let ramp_handshakes = handshakes(&ramped) - handshakes(&before);
    let per_link = match (rss_before, rss_after) {
        (Some(before), Some(after)) => Some(kib(after.saturating_sub(before) as f64 / n as f64)),
        _ => None,
    };
    let client_per_link = kib(held.rss as f64 / n as f64);

    let mut resume = None;
    if !args.no_resume {
        run.disconnect(1).await?;
        let closed = run.swarm.view.totals();
        let took = run.connect_all(false).await?;
        let again = run.swarm.view.totals();
        resume = Some((
            took,
            again.resumed - closed.resumed,
            again.full - closed.full,
            handshakes(&again) - handshakes(&closed),
        ));
    }
    let path = run.json_path();
    let nodes = run.target.nodes.len();
    let mut result = run.describe();
    let output = run.output.clone();
    let (totals, finished) = run.finish().await?;

    let ramp_secs = ramp.as_secs_f64();
    let mut rows = vec![
        ("links".into(), format!("{} of {n}", ramped.links)),
        ("ramp".into(), format!("{ramp_secs:.2} s: {:.0} links/s", n as f64 / ramp_secs)),
        (
            "handshakes in the ramp".into(),
            format!(
                "{ramp_handshakes} ({:.0}/s): {} full, {} redirected",
                ramp_handshakes as f64 / ramp_secs,
                ramped.full - before.full,
                ramped.redirected - before.redirected
            ),
        ),
        (
            "node memory per idle link".into(),
            per_link.map(|k| format!("{k:.1} KiB (RSS, {} nodes)", nodes)).unwrap_or("unknown".into()),
        ),
        ("loadtest memory per link".into(), format!("{client_per_link:.1} KiB (worker RSS)")),
    ];
    if let Some((took, resumed, full, count)) = resume {
        rows.push((
            "reconnect (resumption)".into(),
            format!(
                "{:.2} s: {:.0} links/s, {count} handshakes ({resumed} resumed, {full} full)",
                took.as_secs_f64(),
                n as f64 / took.as_secs_f64()
            ),
        ));
    }
    swarm_rows(&mut rows, &totals);
    let attempts = handshakes(&totals) + totals.connect_error_count();
    let mut links = links_json(&totals);
    for (key, value) in [
        ("target", json!(n)),
        ("reached", json!(ramped.links)),
        ("ramp_secs", json!(ramp_secs)),
        ("links_per_sec", json!(n as f64 / ramp_secs)),
        ("ramp_handshakes", json!(ramp_handshakes)),
        ("ramp_handshakes_per_sec", json!(ramp_handshakes as f64 / ramp_secs)),
        ("attempts", json!(attempts)),
    ] {
        links[key] = value;
    }
    result["links"] = links;
    result["memory"] = json!({
        "node_rss_before": rss_before,
        "node_rss_after": rss_after,
        "node_kib_per_link": per_link,
        "loadtest_rss": held.rss,
        "loadtest_kib_per_link": client_per_link,
    });
    if let Some((took, resumed, full, count)) = resume {
        result["reconnect"] = json!({
            "secs": took.as_secs_f64(),
            "links_per_sec": n as f64 / took.as_secs_f64(),
            "handshakes": count,
            "resumed": resumed,
            "full": full,
        });
    }
    let error_rate = totals.connect_error_count() as f64 / attempts.max(1) as f64;
    let mut failures = Vec::new();
    if ramped.links < n {
        failures.push(format!("only {} of {n} links", ramped.links));
    }
    if error_rate > output.max_error_rate {
        failures.push(format!("link error rate {error_rate:.4} over --max-error-rate {}", output.max_error_rate));
    }
    conclude("courier-loadtest connect", rows, result, failures, &path, finished)
}
