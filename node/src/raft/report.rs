//! What `courier ctl status` shows and what Prometheus scrapes about the control plane: Raft role and
//! indexes, the epoch, members with their states and ring shares, token keys (ids and states only, never
//! secrets), provider teams and suspected clones.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use courier_core::shutdown::CancellationToken;

use super::control::Control;
use super::state::{KeyState, MemberState};
use crate::ring::Ring;

/// The node's view as a JSON document. Contains no secret.
pub fn status(control: &Control, devices: &[String]) -> Value {
    let state = control.current();
    let metrics = control.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let ring = Ring::from_state(&state);
    let shares = ring.shares();
    let owners: serde_json::Map<String, Value> = devices
        .iter()
        .map(|d| {
            let owner = d.parse().ok().and_then(|device| ring.owner(device));
            (d.clone(), json!(owner))
        })
        .collect();
    let members: Vec<Value> = state
        .members
        .values()
        .map(|m| {
            json!({
                "id": m.id,
                "state": m.state.as_str(),
                "since_ms": m.since_ms,
                "device_addr": m.device_addr,
                "cluster_addr": m.cluster_addr,
                "voter": voters.contains(&m.id),
                "ring_share": shares.get(&m.id).copied().unwrap_or(0.0),
            })
        })
        .collect();
    let keys: Vec<Value> = state
        .token_keys
        .values()
        .map(|r| {
            json!({
                "id": r.key.id.0,
                "state": r.state.as_str(),
                "created_ms": r.created_ms,
                "state_since_ms": r.state_since_ms,
            })
        })
        .collect();
    let providers: Vec<Value> = state
        .providers
        .iter()
        .map(|(team, p)| {
            let broadcast = !state.broadcast_disabled.contains(team);
            json!({"team_id": team, "key_ids": p.keys.keys().collect::<Vec<_>>(), "topics": p.topics, "broadcast": broadcast})
        })
        .collect();
    // Secrets appear only as fingerprints: `ctl webhooks set` shows one once, when it makes it.
    let webhooks: Vec<Value> = state
        .webhooks
        .iter()
        .map(|(team, hook)| {
            let secrets: Vec<Value> = hook
                .secrets
                .iter()
                .map(|s| json!({"fingerprint": s.fingerprint(), "created_ms": s.created_ms, "retires_ms": s.retires_ms}))
                .collect();
            let events: Vec<&str> = hook.events.iter().map(|k| k.as_str()).collect();
            json!({"team_id": team, "url": hook.url, "events": events, "secrets": secrets, "updated_ms": hook.updated_ms})
        })
        .collect();
    let clones: Vec<Value> = state
        .suspected_clones
        .iter()
        .map(|(device, s)| {
            json!({"device": device, "since_ms": s.since_ms, "node": s.node, "addrs": s.addrs, "refuse": s.refuse})
        })
        .collect();
    json!({
        "node_id": control.id,
        "raft": {
            "state": format!("{:?}", metrics.state),
            "term": metrics.current_term,
            "leader": metrics.current_leader,
            "last_log_index": metrics.last_log_index,
            "applied_index": metrics.last_applied.map(|l| l.index),
            "snapshot_index": metrics.snapshot.map(|l| l.index),
            "voters": voters,
        },
        "epoch": state.epoch.0,
        "ring": {"vnodes": state.ring.vnodes, "replication_factor": state.ring.replication_factor},
        "members": members,
        "token_keys": keys,
        "providers": providers,
        "broadcast_disabled": state.broadcast_disabled,
        "webhooks": webhooks,
        "revoked_devices": state.revoked.len(),
        "suspected_clones": clones,
        "owners": owners,
    })
}

/// Keeps the control-plane gauges current until `shutdown`. Each carries a `node` label, so that a
/// process running several nodes (`courier dev`) reports each one's view.
pub async fn export_metrics(
    control: Arc<Control>,
    committed_index: Arc<std::sync::atomic::AtomicU64>,
    shutdown: CancellationToken,
) {
    let node = control.id.to_string();
    loop {
        let metrics = control.raft.metrics().borrow().clone();
        let state = control.current();
        let label = || [("node", node.clone())];
        metrics::gauge!("courier_raft_term", &label()).set(metrics.current_term as f64);
        metrics::gauge!("courier_raft_leader_id", &label()).set(metrics.current_leader.map_or(-1.0, |l| l as f64));
        let leading = if metrics.current_leader == Some(control.id) { 1.0 } else { 0.0 };
        metrics::gauge!("courier_raft_is_leader", &label()).set(leading);
        metrics::gauge!("courier_raft_last_log_index", &label()).set(metrics.last_log_index.unwrap_or(0) as f64);
        let committed = committed_index.load(std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("courier_raft_committed_index", &label()).set(committed as f64);
        let applied = metrics.last_applied.map_or(0, |l| l.index);
        metrics::gauge!("courier_raft_applied_index", &label()).set(applied as f64);
        metrics::gauge!("courier_cluster_epoch", &label()).set(state.epoch.0 as f64);
        metrics::gauge!("courier_node_lease_held", &label()).set(if control.lease.held() { 1.0 } else { 0.0 });
        for member_state in [MemberState::Joining, MemberState::Active, MemberState::Draining, MemberState::Down] {
            let count = state.members_in(member_state).count();
            metrics::gauge!("courier_cluster_members", "node" => node.clone(), "state" => member_state.as_str())
                .set(count as f64);
        }
        if let Some(active) = state.active_key() {
            metrics::gauge!("courier_token_key_active_id", &label()).set(f64::from(active.key.id.0));
        }
        let grace_ms = control.settings.key_grace.as_millis() as u64;
        for record in state.token_keys.values().filter(|r| r.state == KeyState::Accepting) {
            let retires_at = (record.state_since_ms + grace_ms) as f64 / 1000.0;
            metrics::gauge!("courier_token_key_retires_at_seconds", "node" => node.clone(), "key" => record.key.id.0.to_string())
                .set(retires_at);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
