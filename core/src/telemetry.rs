//! Prometheus metrics and health endpoints, shared by every Courier process.
//!
//! One recorder per process (the `metrics` facade is global), installed on first use; each role registers
//! its own metric names. `serve` answers `/metrics`, `/healthz` (the process is alive) and `/readyz` (the
//! role says it can do its job) on the metrics port.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets in seconds, from sub-millisecond loopback to multi-second stored delivery.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The process's Prometheus handle, installing the recorder the first time.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); then ours only renders.
            let _ = metrics::set_global_recorder(recorder);
            // Every process that renders metrics (node or gateway) exports this gauge, so it is described here.
            metrics::describe_gauge!(
                "process_resident_memory_bytes",
                metrics::Unit::Bytes,
                "Resident memory of this process (refreshed every second); the loadtest divides it by links."
            );
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    for tick in 1u64.. {
                        std::thread::sleep(Duration::from_secs(1));
                        if let Some(rss) = resident_memory_bytes(None) {
                            metrics::gauge!("process_resident_memory_bytes").set(rss as f64);
                        }
                        if tick % 5 == 0 {
                            upkeep.run_upkeep();
                        }
                    }
                })
                .expect("spawning the metrics upkeep thread");
            handle
        })
        .clone()
}

/// Adds one to a gauge while it lives: what is counted (a connection, a stream) stays counted right however
/// the task holding it ends.
pub struct GaugeHeld(&'static str);

impl GaugeHeld {
    pub fn new(name: &'static str) -> Self {
        metrics::gauge!(name).increment(1.0);
        GaugeHeld(name)
    }
}

impl Drop for GaugeHeld {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

/// The resident set size of process `pid` (this process when `None`), from `/proc/<pid>/statm` (Linux;
/// `None` elsewhere or when the process is gone).
pub fn resident_memory_bytes(pid: Option<u32>) -> Option<u64> {
    let path = pid.map_or_else(|| "/proc/self/statm".to_string(), |pid| format!("/proc/{pid}/statm"));
    let statm = std::fs::read_to_string(path).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_size).ok()?)
}

/// How often `measure_runtime_lag` sleeps and wakes.
const LAG_TICK: Duration = Duration::from_millis(100);

/// Lag past which `measure_runtime_lag` also logs a warning: a fraction of the owner's lease.
const LAG_WARN: Duration = Duration::from_millis(500);

/// Measures how late the runtime it runs on gets to a ready task, until `stop`: it sleeps `LAG_TICK` at a
/// time and records how much later than asked it woke, in `courier_node_runtime_lag_seconds{runtime}`,
/// warning above `LAG_WARN`. A runtime with seconds of queued work ahead of its timers shows here first;
/// on a node's main runtime that is what makes leases lapse.
pub async fn measure_runtime_lag(runtime: &'static str, stop: crate::shutdown::CancellationToken) {
    let lag = metrics::histogram!("courier_node_runtime_lag_seconds", "runtime" => runtime);
    loop {
        let asleep = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(LAG_TICK) => {}
            _ = stop.cancelled() => return,
        }
        let late = asleep.elapsed().saturating_sub(LAG_TICK);
        lag.record(late.as_secs_f64());
        if late >= LAG_WARN {
            tracing::warn!(runtime, late_ms = late.as_millis() as u64, "runtime ran a timer late");
        }
    }
}

/// Help text for every metric a node exports, so that `promtool check metrics` finds each one described.
pub fn describe_node_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        "courier_node_runtime_lag_seconds",
        Unit::Seconds,
        "How late each runtime woke a 100 ms timer (main: Raft, cluster API, links; handshakes: device TLS)."
    );
    describe_gauge!("courier_node_device_links", "Device links this node holds open.");
    describe_counter!(
        "courier_node_notifications_dropped_total",
        "Stored notifications dropped before delivery, by reason (queue_full: over the per-topic cap)."
    );
    describe_counter!(
        "courier_node_queue_gathered_total",
        "Notifications an owner found only on another candidate when the device connected."
    );
    describe_counter!("courier_node_replicated_ops_total", "Replica puts and removes this node applied for others.");
    describe_counter!(
        "courier_node_replication_degraded_total",
        "Notifications stored with fewer copies than the replication factor asks for."
    );
    describe_counter!("courier_node_replication_failures_total", "Replication RPCs to a peer that failed.");
    describe_gauge!("courier_node_status_entries", "Delivery-status records this node keeps.");
    describe_counter!(
        "courier_webhook_events_total",
        "Delivery receipts by what became of them: queued, sent, expired (past the retry window), overflow (a \
         team's queue was full), unwanted, no_webhook, adopted (held copies taken over from a dead owner), \
         store_failed."
    );
    describe_gauge!("courier_webhook_queue_depth", "Delivery receipts queued on this node for teams' webhooks.");
    describe_counter!("courier_webhook_requests_total", "Requests to teams' webhooks, by result (ok, refused, error).");
    describe_histogram!(
        "courier_webhook_delivery_latency_seconds",
        Unit::Seconds,
        "From a notification's outcome to its receipt's 2xx from the team's webhook."
    );
    describe_gauge!(
        "courier_token_key_retires_at_seconds",
        "When each accepting token key retires and its tokens start answering 410 ExpiredToken, UNIX seconds."
    );
    describe_counter!("courier_node_activations_total", "Device activation requests, by outcome.");
    describe_counter!(
        "courier_node_rpc_denied_total",
        "Cluster API calls refused because the caller's certificate role may not make them, by rpc and role."
    );
    describe_counter!(
        "courier_node_links_refused_total",
        "Device connections refused before they became links, by reason (pending, pending_per_source, \
         handshakes_per_source: admission caps; capacity: --max-links)."
    );
    describe_gauge!("courier_node_pending_links", "Device connections accepted and not yet past their first frame.");
    describe_counter!("courier_node_broadcasts_total", "Broadcasts this node received from gateways to hand out.");
    describe_counter!(
        "courier_node_broadcast_deliveries_total",
        "Broadcasts handed to a linked subscriber's link (one per subscriber per broadcast)."
    );
    describe_counter!(
        "courier_node_broadcasts_missed_total",
        "Broadcasts a linked subscriber missed because its link's queue was full (policy-1 channels send the \
         latest again when it next subscribes)."
    );
    describe_gauge!(
        "courier_node_channel_subscriptions",
        "Broadcast channel subscriptions of the links this node holds."
    );
    describe_counter!(
        "courier_node_channel_subscriptions_refused_total",
        "Channel subscriptions refused, by reason (unknown channel, bad id, too many on one link)."
    );
    describe_counter!(
        "courier_node_acks_ignored_total",
        "Device acks for notifications the link never carried (repeats or forged), which cause no write."
    );
    describe_counter!(
        "courier_node_handshake_failures_total",
        "Device links that failed their TLS handshake or first frame."
    );
    describe_counter!("courier_node_link_goodbyes_total", "Device links this node closed, by Goodbye reason.");
    describe_counter!(
        "courier_node_link_replacements_total",
        "Device links replaced by a newer link with the same certificate."
    );
    describe_counter!(
        "courier_node_suspected_clones_total",
        "Times links with one device certificate crossed the clone threshold (replacing each other from different source addresses)."
    );
    describe_counter!("courier_node_link_redirects_total", "Device links redirected to the node that owns the device.");
    describe_counter!("courier_node_tokens_updated_total", "Device tokens re-issued under the active token key.");
    describe_counter!("courier_node_notifications_stored_total", "Notifications committed to the offline store.");
    describe_counter!(
        "courier_node_store_writes_elided_total",
        "Store writes never made because the device acked a notification within --ack-wait-ms: each such \
         notification counts the insert and the delete of each of its R copies."
    );
    describe_counter!(
        "courier_node_notifications_sent_total",
        "Now-or-never notifications (not storable) written to a live link."
    );
    describe_counter!(
        "courier_node_notifications_discarded_total",
        "Now-or-never notifications dropped because the device had no link that could take them."
    );
    describe_counter!(
        "courier_node_notifications_collapsed_total",
        "Stored notifications replaced by a later one with the same collapse id."
    );
    describe_counter!(
        "courier_node_notifications_duplicate_total",
        "Notifications ignored because their apns-id was already stored for the device."
    );
    describe_counter!("courier_node_notifications_delivered_total", "Notifications a device acknowledged.");
    describe_counter!("courier_node_notifications_expired_total", "Stored notifications dropped at their expiration.");
    describe_counter!("courier_node_notifications_rejected_total", "Notifications this node refused, by APNs reason.");
    describe_histogram!(
        "courier_node_delivery_latency_seconds",
        Unit::Seconds,
        "Time from gateway acceptance to the device's ack, stored deliveries included."
    );
    describe_histogram!(
        "courier_node_store_commit_seconds",
        Unit::Seconds,
        "Duration of one group commit of the store."
    );
    describe_histogram!(
        "courier_node_store_commit_batch_size",
        "Notifications written by one group commit of the store."
    );
    describe_counter!("courier_node_forward_batches_total", "Batches gateways sent on Forward streams to this node.");
    describe_gauge!("courier_node_forward_streams", "Forward streams from gateways open on this node.");
    describe_histogram!(
        "courier_node_forward_batch_size",
        "Notifications in one batch a gateway forwarded to this node."
    );
    describe_gauge!("courier_raft_term", "Current Raft term, as this node sees it.");
    describe_gauge!("courier_raft_leader_id", "Node id of the Raft leader this node knows, -1 without one.");
    describe_gauge!("courier_raft_is_leader", "1 if this node is the Raft leader, else 0.");
    describe_gauge!("courier_raft_last_log_index", "Index of the last entry in this node's Raft log.");
    describe_gauge!("courier_raft_committed_index", "Highest Raft log index this node knows to be committed.");
    describe_gauge!("courier_raft_applied_index", "Highest Raft log index this node has applied to its state machine.");
    describe_gauge!("courier_cluster_epoch", "Cluster epoch this node has applied.");
    describe_gauge!("courier_cluster_members", "Cluster members in each state, as this node sees them.");
    describe_gauge!("courier_token_key_active_id", "Id of the token key that mints new device tokens.");
    describe_gauge!(
        "courier_node_lease_held",
        "1 while this node holds its owner's lease (heard from a Raft quorum within --lease-ms), else 0."
    );
    describe_counter!("courier_node_lease_lapses_total", "Times this node found its owner's lease lapsed.");
    describe_counter!(
        "courier_node_probe_rounds_unanswered_total",
        "Leader probe rounds that no member answered, in which no member was marked down."
    );
    describe_counter!(
        "courier_node_leader_ticks_abandoned_total",
        "Leader duty rounds abandoned after twice the failure timeout."
    );
}

/// Readiness of one role in this process; `/readyz` answers 200 only when every registered flag is set.
/// A flag made `refreshed_within` a bound also reads as not ready once it has not been set for that long:
/// its setter runs periodically, so a stale flag means the process was stalled (SIGSTOP, a long pause)
/// and what it last said may no longer hold.
#[derive(Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    fresh_for: Option<Duration>,
    /// When it was last set, in milliseconds since `origin()`.
    set_at_ms: Arc<AtomicU64>,
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    origin().elapsed().as_millis() as u64
}

impl Readiness {
    /// A flag that must be set at least every `bound` to read as ready.
    pub fn refreshed_within(bound: Duration) -> Self {
        Readiness { fresh_for: Some(bound), ..Readiness::default() }
    }

    pub fn set(&self, ready: bool) {
        self.set_at_ms.store(now_ms(), Ordering::SeqCst);
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        let fresh = self.fresh_for.is_none_or(|bound| {
            now_ms().saturating_sub(self.set_at_ms.load(Ordering::SeqCst)) <= bound.as_millis() as u64
        });
        fresh && self.ready.load(Ordering::SeqCst)
    }
}

/// Serves metrics and health on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    readiness: Vec<Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = prometheus();
    let router = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = readiness.iter().all(Readiness::is_ready);
                std::future::ready(if ready {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                })
            }),
        );
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_that_must_be_refreshed_reads_not_ready_once_stale() {
        let kept = Readiness::default();
        let refreshed = Readiness::refreshed_within(Duration::from_millis(50));
        assert!(!refreshed.is_ready() && !kept.is_ready(), "not ready until set");
        kept.set(true);
        refreshed.set(true);
        assert!(refreshed.is_ready() && kept.is_ready());
        // As a process stalled past the bound would find it on waking.
        std::thread::sleep(Duration::from_millis(120));
        assert!(!refreshed.is_ready(), "stale: set longer ago than its bound");
        assert!(kept.is_ready(), "a flag without a bound stays as set");
        refreshed.set(true);
        assert!(refreshed.is_ready(), "ready again once refreshed");
    }
}
