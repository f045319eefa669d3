//! Sends each team's receipts to its webhook (`courier_core::webhook`): the owner of a device decides a
//! notification's outcome, the store queues the receipt durably in the same commit (`store::receipts`),
//! and this module takes them from there to the team's endpoint. The `delivered` receipts of
//! notifications that nothing stored wait in memory first (`unsaved`), and are written only if the
//! endpoint has not taken them soon enough.
//!
//! The device's other holders keep a copy of each receipt (they make it themselves from the same change
//! to their copy of the queue, or are sent it when nothing was stored). When the endpoint takes a batch,
//! they are told to drop their copies; when the ring changes and this node now owns devices whose
//! receipts it holds (their owner died), it moves those copies to its own send queue. A receipt may so
//! be sent twice, under the same event id; receivers drop repeats by it.
//!
//! One task per team with receipts queued or unsaved. It sends the queued ones first, in order, in batches of
//! at most `batch_max`, and waits up to `batch_wait` for a batch to fill (a batch of unsaved receipts wakes it
//! once full, and leaves when its oldest has waited half of `copy_after`). A 2xx answer deletes the batch;
//! anything else (an error status, a redirect, a timeout, a refused connection) keeps it and retries after an
//! exponential backoff with jitter (1 s doubling to at most 5 min, each wait drawn between half and all of
//! that), for as long as `max_age` after the receipt's outcome; then the receipt is dropped and counted.
//! Teams do not wait on each other: a failing endpoint backs off only its own task. Receipts of a team whose
//! webhook was removed, or of an event kind it no longer wants, are dropped.
//!
//! Endpoints are reached over HTTP/1.1 with one kept-alive connection per team, with timeouts on
//! connecting and on each request; redirects are not followed. Unless the node allows private endpoints
//! (`--webhooks-allow-private`, which `courier dev` sets), a name must resolve to public addresses only
//! and the URL must be https: checked at every connection, so a name that later points inside the cluster
//! is refused then.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_core::webhook::{self, Endpoint, Event, Webhook};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ids::unix_millis;
use crate::raft::state::Epoch;
use crate::replication::Replicator;
use crate::store::{QueuedReceipt, Removal, Store};
use crate::view::{LocalView, Placement};

pub mod unsaved;
use unsaved::{Unsaved, UnsavedReceipts};

/// How receipts are sent.
#[derive(Debug, Clone)]
pub struct ReceiptSettings {
    /// Most receipts in one request.
    pub batch_max: usize,
    /// How long a batch waits to fill, counted from its oldest receipt's outcome.
    pub batch_wait: Duration,
    /// How long a receipt is retried before it is dropped.
    pub max_age: Duration,
    /// Limit on connecting and on each request.
    pub request_timeout: Duration,
    /// Whether endpoints may be `http` or private addresses.
    pub allow_private: bool,
    /// Extra trusted roots for endpoints (a PEM file), beside the public web PKI.
    pub extra_roots: Option<std::path::PathBuf>,
    /// How often the owner looks for stored notifications that expired, to send their receipts.
    pub expiry_sweep: Duration,
}

impl Default for ReceiptSettings {
    fn default() -> Self {
        ReceiptSettings {
            batch_max: 100,
            batch_wait: Duration::from_millis(500),
            max_age: Duration::from_secs(24 * 3600),
            request_timeout: Duration::from_secs(10),
            allow_private: false,
            extra_roots: None,
            expiry_sweep: Duration::from_secs(60),
        }
    }
}

/// Shortest and longest backoff after a failed request.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A team's task ends after this long with nothing queued; the dispatcher starts it again when needed.
const IDLE_END: Duration = Duration::from_secs(30);
/// The least time a request of unsaved receipts is given, however close they are to being written.
const UNSAVED_MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// How often a team's task looks for more while its batch fills.
const FILL_POLL: Duration = Duration::from_millis(50);
/// How long a team's task that found nothing queued in the store sends only unsaved receipts before it
/// looks in the store again.
const STORE_LOOK: Duration = Duration::from_millis(100);
/// Most of an endpoint's answer body read (and thrown away).
const MAX_ANSWER_BODY: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("reading the webhook CA file: {0}")]
    Roots(#[from] courier_core::tls::TlsError),
}

/// What every team's task shares.
struct Shared {
    store: Store,
    view: Arc<LocalView>,
    replicator: Arc<Replicator>,
    unsaved: Arc<UnsavedReceipts>,
    settings: ReceiptSettings,
    tls: tokio_rustls::TlsConnector,
    /// Teams whose task is running.
    running: Mutex<std::collections::HashSet<String>>,
}

/// Runs until `shutdown`: starts a task for every team with receipts queued or unsaved, writes unsaved ones
/// that waited too long, takes over held receipts of devices the ring gave this node, and sweeps expired
/// notifications for their receipts. Unsaved receipts left at the end are written before it returns.
pub async fn run(
    store: Store,
    view: Arc<LocalView>,
    replicator: Arc<Replicator>,
    unsaved: Arc<UnsavedReceipts>,
    settings: ReceiptSettings,
    shutdown: CancellationToken,
) -> Result<(), ReceiptError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.extra_roots {
        for cert in courier_core::tls::roots_from(path)?.roots {
            roots.roots.push(cert);
        }
    }
    let tls = courier_core::tls::client_config_with_roots(Arc::new(roots), None, &[b"http/1.1"])?;
    let queued = store.receipts_queued();
    let shared = Arc::new(Shared {
        store,
        view,
        replicator,
        unsaved,
        settings,
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        running: Mutex::new(Default::default()),
    });
    let tasks = TaskTracker::new();
    tasks.spawn(copy_when_due(shared.clone(), shutdown.clone()));
    let mut next_sweep = Instant::now() + shared.settings.expiry_sweep;
    let mut adopted_in: Option<Epoch> = None;
    // Unsaved receipts are looked at this often, so that none waits much past `save_after`.
    let unsaved_tick = match shared.unsaved.save_after() {
        Duration::ZERO => Duration::from_secs(1),
        after => (after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
    };
    loop {
        let now_ms = unix_millis();
        unsaved::save_late(&shared.store, &shared.replicator, shared.unsaved.overdue(now_ms));
        let held = shared.unsaved.held_overdue(now_ms);
        if let Err(error) = shared.store.keep_receipts(held, crate::store::ReceiptRole::Hold).await {
            tracing::error!(%error, "writing held receipts failed");
        }
        let epoch = shared.view.get().state.epoch;
        if adopted_in != Some(epoch) && shared.view.holds_lease() {
            adopted_in = adopt_held(&shared).await.then_some(epoch);
        }
        match shared.store.receipt_teams().await {
            Ok(mut teams) => {
                teams.extend(shared.unsaved.teams().into_iter().map(|(team, n)| (team, n as u64)));
                let depth: u64 = teams.iter().map(|(_, n)| n).sum();
                metrics::gauge!("courier_webhook_queue_depth").set(depth as f64);
                for (team, _) in teams {
                    if shared.running.lock().unwrap_or_else(|p| p.into_inner()).insert(team.clone()) {
                        tasks.spawn(team_task(shared.clone(), team, shutdown.clone()));
                    }
                }
            }
            Err(error) => tracing::error!(%error, "reading queued receipts failed"),
        }
        if Instant::now() >= next_sweep {
            next_sweep = Instant::now() + shared.settings.expiry_sweep;
            sweep_expired(&shared).await;
            let before_ms = unix_millis().saturating_sub(shared.settings.max_age.as_millis() as u64);
            if let Err(error) = shared.store.prune_held(before_ms).await {
                tracing::error!(%error, "pruning held receipts failed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = queued.notified() => {}
            _ = shared.unsaved.arrived() => {}
            _ = tokio::time::sleep(unsaved_tick) => {}
        }
    }
    tasks.close();
    tasks.wait().await;
    // Stopping: what was not sent is written, and awaited, so that the node sends it when it starts again;
    // so are the copies held for other owners.
    unsaved::save_at_stop(&shared.store, &shared.replicator, shared.unsaved.drain()).await;
    let held = shared.unsaved.drain_held();
    if let Err(error) = shared.store.keep_receipts(held, crate::store::ReceiptRole::Hold).await {
        tracing::error!(%error, "writing held receipts at shutdown failed");
    }
    Ok(())
}

/// Moves the held receipts of devices this node now owns to its send queue; false if the store failed.
async fn adopt_held(shared: &Shared) -> bool {
    let devices = match shared.store.held_devices().await {
        Ok(devices) => devices,
        Err(error) => {
            tracing::error!(%error, "reading held receipts failed");
            return false;
        }
    };
    let owned: Vec<_> = devices.into_iter().filter(|d| shared.view.placement(*d) == Placement::Here).collect();
    // Unsaved copies held in memory are written to the send queue as they are taken.
    let from_memory = shared.unsaved.adopt(|d| shared.view.placement(d) == Placement::Here);
    let in_memory = from_memory.len();
    if let Err(error) = shared.store.keep_receipts(from_memory, crate::store::ReceiptRole::Queue).await {
        tracing::error!(%error, "taking over held receipts failed");
        return false;
    }
    match shared.store.adopt_held(owned).await.map(|n| n + in_memory) {
        Ok(0) => true,
        Ok(adopted) => {
            metrics::counter!("courier_webhook_events_total", "outcome" => "adopted").increment(adopted as u64);
            tracing::info!(adopted, "sending receipts held for devices this node now owns");
            true
        }
        Err(error) => {
            tracing::error!(%error, "taking over held receipts failed");
            false
        }
    }
}

/// Removes stored notifications of receipt teams whose expiration passed, on devices this node owns, with
/// their `expired` receipt. (A device that links first has them removed, and receipted, then.)
async fn sweep_expired(shared: &Shared) {
    if shared.view.get().state.webhooks.is_empty() || !shared.view.holds_lease() {
        return;
    }
    let now_ms = unix_millis();
    match shared.store.expired_with_receipts(now_ms / 1000).await {
        Ok(expired) => {
            for (device, apns_id) in expired {
                if shared.view.placement(device) == Placement::Here {
                    metrics::counter!("courier_node_notifications_expired_total").increment(1);
                    shared.store.remove_later(device, &apns_id, Some(Removal::Expired { at_ms: now_ms }));
                }
            }
        }
        Err(error) => tracing::error!(%error, "looking for expired notifications failed"),
    }
}

/// Sends one team's receipts until none is left for a while, or `shutdown`.
async fn team_task(shared: Arc<Shared>, team: String, shutdown: CancellationToken) {
    let mut sender = TeamSender { connection: None, failures: 0 };
    let mut idle_since = Instant::now();
    // When the store last had none of the team's receipts queued.
    let mut none_stored_at: Option<Instant> = None;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let pause = match next_batch(&shared, &team, &mut none_stored_at).await {
            Next::Send(hook, batch) => {
                idle_since = Instant::now();
                let timeout = shared.settings.request_timeout;
                match sender.post(&shared, &team, &hook, batch.iter().map(|r| (&r.event, None)), timeout).await {
                    Ok(()) => match sent(&shared, &team, &batch).await {
                        Ok(()) => Duration::ZERO,
                        Err(error) => {
                            tracing::error!(%error, "deleting sent receipts failed");
                            Duration::from_secs(1)
                        }
                    },
                    Err(why) => sender.failed(&team, &why),
                }
            }
            Next::SendUnsaved(hook, mut batch) => {
                idle_since = Instant::now();
                // Within what is left of the oldest one's time unsaved: whatever the endpoint has not taken
                // by then is written, and retried from the queue like any other.
                let left_ms =
                    batch.first().map_or(0, |r| r.event.at_ms + shared.unsaved.save_after().as_millis() as u64);
                let left = Duration::from_millis(left_ms.saturating_sub(unix_millis())).max(UNSAVED_MIN_TIMEOUT);
                let timeout = shared.settings.request_timeout.min(left);
                let posted = post_unsaved(&shared, &mut sender, &team, &hook, &mut batch, timeout).await;
                match posted {
                    Ok(()) => {
                        unsaved::release(&shared.replicator, &batch);
                        Duration::ZERO
                    }
                    Err(why) => {
                        unsaved::save_late(&shared.store, &shared.replicator, batch);
                        sender.failed(&team, &why)
                    }
                }
            }
            Next::Wait(pause) => {
                idle_since = Instant::now();
                pause
            }
            Next::Fill(pause) => {
                idle_since = Instant::now();
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = shared.unsaved.filled(&team) => {}
                    _ = tokio::time::sleep(pause) => {}
                }
                Duration::ZERO
            }
            Next::Again => Duration::ZERO,
            Next::Empty if idle_since.elapsed() >= IDLE_END => break,
            Next::Empty => Duration::from_millis(200),
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
    shared.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&team);
}

/// Posts a batch of unsaved receipts; if the request is still out when the oldest not yet copied has waited
/// `copy_after`, copies those to their holders (`unsaved::copies_due` does this for the ones still queued).
async fn post_unsaved(
    shared: &Shared,
    sender: &mut TeamSender,
    team: &str,
    hook: &Webhook,
    batch: &mut [Unsaved],
    timeout: Duration,
) -> Result<(), String> {
    let copy_after_ms = shared.unsaved.copy_after().as_millis() as u64;
    let copy_due_ms = batch.iter().filter(|r| r.needs_copy()).map(|r| r.event.at_ms + copy_after_ms).min();
    let mut copied_late = Vec::new();
    let posted = {
        let batch: &[Unsaved] = batch;
        // A receipt copied already goes into the body as the JSON its holders were sent.
        let events = batch.iter().map(|r| (&r.event, r.copy.as_ref().map(|c| &c.json[..])));
        let post = sender.post(shared, team, hook, events, timeout);
        tokio::pin!(post);
        match copy_due_ms {
            None => post.await,
            Some(due_ms) => {
                let until_due = Duration::from_millis(due_ms.saturating_sub(unix_millis()));
                tokio::select! {
                    posted = &mut post => posted,
                    _ = tokio::time::sleep(until_due) => {
                        let copies = shared.unsaved.copies_of(batch, shared.replicator.copy_holders());
                        copied_late = unsaved::send_numbered(&shared.replicator, copies);
                        post.await
                    }
                }
            }
        }
    };
    unsaved::mark_copied(batch, &copied_late);
    posted
}

/// How long the copier lets receipts gather after one arrives where none was waiting to be copied. A turn
/// costs about as much for one copy as for many, and so does the replication message that carries them
/// (sent at once, without the replication batch's linger); the owner's death loses the receipts decided
/// in it and not yet at their holders. At 5 ms the extra messages cost measurably more, and 20 ms was no
/// cheaper than 10 (`BENCHMARKS.md`) while it would double that window.
const COPY_GATHER: Duration = Duration::from_millis(10);

/// Sends the holders their copies of queued unsaved receipts as they reach `copy_after`, until `shutdown`.
async fn copy_when_due(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let now_ms = unix_millis();
        let (copies, next_ms) = shared.unsaved.copies_due(now_ms, shared.replicator.copy_holders());
        unsaved::send(&shared.replicator, copies);
        let pause = next_ms.map_or(Duration::from_secs(1), |due| Duration::from_millis(due.saturating_sub(now_ms)));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.unsaved.uncopied() => {
                // Let more arrive, so that a turn copies several rather than one each.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(COPY_GATHER) => {}
                }
            }
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

enum Next {
    /// Send this batch of queued receipts to this endpoint.
    Send(Webhook, Vec<QueuedReceipt>),
    /// Send these unsaved receipts (this task owns them now) to this endpoint.
    SendUnsaved(Webhook, Vec<Unsaved>),
    /// A batch is filling; look again after this long.
    Wait(Duration),
    /// A batch of unsaved receipts is filling; look again after this long, or as soon as it is full.
    Fill(Duration),
    /// Some receipts were dropped; look again at once.
    Again,
    Empty,
}

/// The team's next batch, after dropping what must not be sent: its queued receipts first, then, when none
/// is queued, its unsaved ones.
async fn next_batch(shared: &Shared, team: &str, none_stored_at: &mut Option<Instant>) -> Next {
    let settings = &shared.settings;
    // While unsaved receipts flow and nothing is queued in the store, the store is read only every
    // `STORE_LOOK`: a read is a trip to a blocking thread, and each trip lengthens every request's turn.
    if none_stored_at.is_some_and(|at| at.elapsed() < STORE_LOOK) {
        return next_unsaved(shared, team, unix_millis());
    }
    let (queued, unreadable) = match shared.store.receipts(team, settings.batch_max).await {
        Ok(read) => read,
        Err(error) => {
            tracing::error!(%error, "reading queued receipts failed");
            return Next::Wait(Duration::from_secs(1));
        }
    };
    let now_ms = unix_millis();
    if queued.is_empty() && unreadable.is_empty() {
        *none_stored_at = Some(Instant::now());
        return next_unsaved(shared, team, now_ms);
    }
    *none_stored_at = None;
    let hook = shared.view.get().state.webhooks.get(team).cloned();
    let max_age_ms = settings.max_age.as_millis() as u64;
    let mut doomed: Vec<(u64, &'static str, Option<QueuedReceipt>)> =
        unreadable.into_iter().map(|seq| (seq, "unreadable", None)).collect();
    let mut batch = Vec::with_capacity(queued.len());
    for receipt in queued {
        let why = match &hook {
            Some(_) if receipt.event.at_ms.saturating_add(max_age_ms) <= now_ms => "expired",
            hook => match unwanted(hook.as_ref(), &receipt.event) {
                Some(why) => why,
                None => {
                    batch.push(receipt);
                    continue;
                }
            },
        };
        doomed.push((receipt.seq, why, Some(receipt)));
    }
    if !doomed.is_empty() {
        let mut seqs = Vec::with_capacity(doomed.len());
        let mut given_up = Vec::with_capacity(doomed.len());
        for (seq, outcome, receipt) in doomed {
            metrics::counter!("courier_webhook_events_total", "outcome" => outcome).increment(1);
            seqs.push(seq);
            // Given up on here: the other holders need not keep it for this node's death either.
            if let Some(receipt) = receipt {
                given_up.push((receipt.device, receipt.event.id));
            }
        }
        shared.replicator.release_receipts(&given_up);
        if let Err(error) = shared.store.remove_receipts(team, seqs).await {
            tracing::error!(%error, "dropping receipts failed");
            return Next::Wait(Duration::from_secs(1));
        }
        return Next::Again;
    }
    let Some(hook) = hook else { return Next::Empty };
    let oldest_ms = batch.first().map_or(now_ms, |r| r.event.at_ms);
    match fill_wait(settings, batch.len(), oldest_ms, now_ms) {
        Some(pause) => Next::Wait(pause),
        None => Next::Send(hook, batch),
    }
}

/// The team's next batch of unsaved receipts.
fn next_unsaved(shared: &Shared, team: &str, now_ms: u64) -> Next {
    let settings = &shared.settings;
    let (waiting, oldest_ms) = shared.unsaved.waiting(team);
    let Some(oldest_ms) = oldest_ms else { return Next::Empty };
    let hook = shared.view.get().state.webhooks.get(team).cloned();
    // A batch leaves before its oldest is due to be copied, with half that time left for the endpoint to
    // take it: a receipt taken before it is due never costs a copy.
    let copy_after_ms = shared.unsaved.copy_after().as_millis() as u64;
    let send_by_ms = (copy_after_ms > 0).then(|| oldest_ms.saturating_add(copy_after_ms / 2));
    if let Some(hook) = &hook
        && let Some(pause) = fill_wait(settings, waiting, oldest_ms, now_ms)
        && hook.wants(courier_core::webhook::EventKind::Delivered)
        && send_by_ms.is_none_or(|by_ms| by_ms > now_ms)
    {
        let until_send_by = send_by_ms.map_or(pause, |by_ms| Duration::from_millis(by_ms - now_ms));
        return Next::Fill(pause.min(until_send_by));
    }
    let mut batch = shared.unsaved.take(team, settings.batch_max);
    batch.retain(|receipt| match unwanted(hook.as_ref(), &receipt.event) {
        Some(why) => {
            metrics::counter!("courier_webhook_events_total", "outcome" => why).increment(1);
            false
        }
        None => true,
    });
    match hook {
        Some(hook) if !batch.is_empty() => Next::SendUnsaved(hook, batch),
        _ => Next::Again,
    }
}

/// Why a receipt is dropped rather than sent to `hook`, if it is.
fn unwanted(hook: Option<&Webhook>, event: &Event) -> Option<&'static str> {
    match hook {
        None => Some("no_webhook"),
        Some(hook) if !hook.wants(event.outcome) => Some("unwanted"),
        Some(_) => None,
    }
}

/// How long a batch of `len` whose oldest was decided at `oldest_ms` still waits to fill, if it does.
fn fill_wait(settings: &ReceiptSettings, len: usize, oldest_ms: u64, now_ms: u64) -> Option<Duration> {
    let due_ms = oldest_ms.saturating_add(settings.batch_wait.as_millis() as u64);
    (len < settings.batch_max && due_ms > now_ms).then(|| Duration::from_millis(due_ms - now_ms).min(FILL_POLL))
}

/// After the endpoint took a batch of queued receipts: deletes them here and tells the device's other
/// holders to drop their copies.
async fn sent(shared: &Shared, team: &str, batch: &[QueuedReceipt]) -> Result<(), crate::store::StoreError> {
    let seqs = batch.iter().map(|r| r.seq).collect();
    shared.store.remove_receipts(team, seqs).await?;
    let taken: Vec<_> = batch.iter().map(|r| (r.device, r.event.id.clone())).collect();
    shared.replicator.release_receipts(&taken);
    Ok(())
}

/// One team's connection to its endpoint and its run of failures.
struct TeamSender {
    /// The endpoint it is connected to (scheme, host, port) and the connection.
    connection: Option<(Endpoint, SendRequest<Full<Bytes>>)>,
    failures: u32,
}

impl TeamSender {
    /// The next wait after a failed request (`why`): exponential, capped, with jitter.
    fn failed(&mut self, team: &str, why: &str) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.connection = None;
        let exp = BACKOFF_MIN.saturating_mul(1u32 << self.failures.saturating_sub(1).min(16)).min(BACKOFF_MAX);
        let backoff = exp.mul_f64(rand::random_range(0.5..=1.0));
        tracing::info!(%team, %why, retry_in = ?backoff, "a webhook request failed");
        backoff
    }

    /// Posts `events` (each with its JSON, where it was serialized already) signed with the team's live
    /// secrets; `Ok` on a 2xx within `timeout`.
    async fn post<'e>(
        &mut self,
        shared: &Shared,
        team: &str,
        hook: &Webhook,
        events: impl Iterator<Item = (&'e Event, Option<&'e [u8]>)>,
        timeout: Duration,
    ) -> Result<(), String> {
        let with_json: Vec<(&Event, Option<&[u8]>)> = events.collect();
        let events: Vec<&Event> = with_json.iter().map(|(event, _)| *event).collect();
        let now_ms = unix_millis();
        let id = webhook::batch_id(&events);
        let timestamp = now_ms / 1000;
        let body = webhook::batch_body(team, with_json.into_iter(), now_ms);
        let signature = webhook::signature_header(&hook.signing_keys(now_ms), &id, timestamp, &body);
        let endpoint = webhook::check_url(&hook.url, shared.settings.allow_private)?;
        let answer = tokio::time::timeout(timeout, async {
            let sender = self.connected(shared, &endpoint).await?;
            let request = http::Request::post(&endpoint.path)
                .header(http::header::HOST, authority(&endpoint))
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::USER_AGENT, concat!("Courier-Webhooks/", env!("CARGO_PKG_VERSION")))
                .header("webhook-id", &id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", &signature)
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let answer = sender.send_request(request).await.map_err(|e| e.to_string())?;
            let status = answer.status();
            // Read to the end, so the connection can carry the next request.
            Limited::new(answer.into_body(), MAX_ANSWER_BODY).collect().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(status)
        })
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))
        .flatten();
        let status = match answer {
            Ok(status) => status,
            Err(why) => {
                metrics::counter!("courier_webhook_requests_total", "result" => "error").increment(1);
                return Err(why);
            }
        };
        if !status.is_success() {
            metrics::counter!("courier_webhook_requests_total", "result" => "refused").increment(1);
            return Err(format!("the endpoint answered {status}"));
        }
        metrics::counter!("courier_webhook_requests_total", "result" => "ok").increment(1);
        self.failures = 0;
        metrics::counter!("courier_webhook_events_total", "outcome" => "sent").increment(events.len() as u64);
        let done_ms = unix_millis();
        // One lookup of the histogram per request, not per event.
        let latencies = metrics::histogram!("courier_webhook_delivery_latency_seconds");
        for event in &events {
            latencies.record(done_ms.saturating_sub(event.at_ms) as f64 / 1000.0);
        }
        Ok(())
    }

    /// A ready connection to `endpoint`: the kept one if it is to the same place and still open.
    async fn connected(
        &mut self,
        shared: &Shared,
        endpoint: &Endpoint,
    ) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        let reusable = matches!(&self.connection, Some((to, sender))
            if to.https == endpoint.https && to.host == endpoint.host && to.port == endpoint.port && !sender.is_closed());
        if reusable
            && let Some((_, sender)) = &mut self.connection
            && sender.ready().await.is_ok()
        {
            return Ok(&mut self.connection.as_mut().expect("checked above").1);
        }
        self.connection = None;
        let sender = connect(shared, endpoint).await?;
        Ok(&mut self.connection.insert((endpoint.clone(), sender)).1)
    }
}

/// `host:port` as the Host header names it (IPv6 in brackets).
fn authority(endpoint: &Endpoint) -> String {
    let host = if endpoint.host.contains(':') { format!("[{}]", endpoint.host) } else { endpoint.host.clone() };
    let default = if endpoint.https { 443 } else { 80 };
    if endpoint.port == default { host } else { format!("{host}:{}", endpoint.port) }
}

/// Resolves, checks and connects to `endpoint`, then starts HTTP/1.1 on it.
async fn connect(shared: &Shared, endpoint: &Endpoint) -> Result<SendRequest<Full<Bytes>>, String> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| format!("resolving {}: {e}", endpoint.host))?
        .collect();
    let allowed: Vec<SocketAddr> =
        resolved.iter().copied().filter(|a| shared.settings.allow_private || webhook::is_public(a.ip())).collect();
    if allowed.is_empty() {
        return Err(format!("{} resolves to no public address; private endpoints are not allowed", endpoint.host));
    }
    let mut last = String::new();
    let mut tcp = None;
    for addr in allowed {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                tcp = Some(stream);
                break;
            }
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    let tcp = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    if endpoint.https {
        let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone()).map_err(|e| e.to_string())?;
        let tls = shared.tls.connect(name, tcp).await.map_err(|e| format!("TLS with {}: {e}", endpoint.host))?;
        handshake(tls).await
    } else {
        handshake(tcp).await
    }
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
