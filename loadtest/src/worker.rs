//! One worker process of the device swarm: holds a slice of the devices' links, each a task that
//! connects (first to the owner its activation named, else to an endpoint; following redirects), registers
//! its topic once, subscribes each link to its broadcast channel once told to, answers pings, acks what its
//! app received, and reconnects with backoff and TLS session resumption when a link breaks.
//!
//! Driven over stdin by the coordinator (`msg::WorkerSpec`, then `msg::Command`s); reports `msg::Progress`
//! on stdout every 200 ms. When stdin closes (the coordinator is gone) the worker exits.

use std::collections::{BTreeMap, HashMap, hash_map};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use courier_core::ids::DeviceId;
use courier_core::shutdown::CancellationToken;
use courier_device::{Backoff, ClientError, Connector, DeviceLink, LinkEvent, RedirectTarget, SeenIds};
use courier_proto::device::ChannelRefusal;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::msg::{BroadcastMarker, Command, Marker, Progress, WorkerSpec};

/// Apns-ids each simulated device has room for from the start. Without it every device's tables were made
/// at its first notification and grown at its fourth and fifth: for 100,000 devices at once, inside the
/// first broadcast's measured window, that was about a tenth of the machine's CPU (page faults for fresh
/// memory), where a real device's tables live on the device and are long warm.
const SEEN_RESERVED: usize = 8;

/// One simulated device.
struct Device {
    /// Global index (the coordinator's numbering).
    index: usize,
    id: DeviceId,
    connector: Connector,
    registered: AtomicBool,
    /// The owner its activation named, and the connector checking that node's name: where the first
    /// link goes, saving the redirect a round-robin endpoint would answer most of the time.
    owner: Option<(SocketAddr, Connector)>,
    /// The node it last linked to, and the connector checking that node's name: a reconnect goes there
    /// first, and resumes the TLS session it made there.
    last_node: Mutex<Option<(SocketAddr, Connector)>>,
    /// apns-ids its app has seen, kept across links so redeliveries are dropped after reconnects too.
    seen: Mutex<Option<SeenIds>>,
    /// The apns-id of the last broadcast it received: a link subscribing again names it, so a channel that
    /// keeps its latest broadcast does not send that one twice.
    last_broadcast: Mutex<Option<String>>,
    /// Woken when the device's task should look up from its link: it was cancelled, or the broadcast
    /// channels changed. Between two frames the task waits on this alone. It used to wait on its
    /// cancellation (two locks a frame) and on a channel watch shared by every device of the worker (a lock
    /// and cache misses on other devices' entries in the watch's wait list, at every frame).
    poke: tokio::sync::Notify,
}

#[derive(Default)]
struct Stats {
    links: AtomicU64,
    running: AtomicU64,
    full: AtomicU64,
    resumed: AtomicU64,
    redirected: AtomicU64,
    drops: AtomicU64,
    stale: AtomicU64,
    orphaned: AtomicU64,
    errors: Mutex<(BTreeMap<String, u64>, BTreeMap<String, String>)>,
    receipts: Mutex<Vec<(u64, u64, u64)>>,
    subscribed: AtomicU64,
    subscribe_refusals: Mutex<BTreeMap<String, u64>>,
    broadcasts: Mutex<Vec<(u64, u64, u64)>>,
    tokens: Mutex<Vec<(u64, String)>>,
    recovered: Mutex<Vec<u64>>,
}

impl Stats {
    fn error(&self, error: &ClientError) {
        let reason = reason(error);
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *errors.0.entry(reason.clone()).or_default() += 1;
        errors.1.entry(reason).or_insert_with(|| error.to_string());
    }

    fn refused(&self, reason: ChannelRefusal) {
        let name = reason.as_str_name();
        let reason = name.strip_prefix("CHANNEL_REFUSAL_").unwrap_or(name).to_ascii_lowercase();
        *self.subscribe_refusals.lock().unwrap_or_else(|e| e.into_inner()).entry(reason).or_default() += 1;
    }
}

/// A short, stable name for why a link attempt failed.
fn reason(error: &ClientError) -> String {
    match error {
        ClientError::Connect { source, .. } => match source.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection_refused".into(),
            std::io::ErrorKind::ConnectionReset => "connection_reset".into(),
            std::io::ErrorKind::TimedOut => "connect_timeout".into(),
            std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse => "no_source_port".into(),
            std::io::ErrorKind::InvalidData => "tls".into(),
            std::io::ErrorKind::UnexpectedEof => "closed_in_handshake".into(),
            _ => "io".into(),
        },
        ClientError::Goodbye { reason, .. } => format!("goodbye_{}", reason.as_str_name().to_ascii_lowercase()),
        ClientError::Timeout(_) => "timeout".into(),
        ClientError::Closed => "closed".into(),
        ClientError::Frame(_) => "frame".into(),
        ClientError::Redirected(_) => "redirect_loop".into(),
        _ => "other".into(),
    }
}

struct Shared {
    spec: WorkerSpec,
    endpoints: Vec<SocketAddr>,
    stats: Stats,
    permits: Semaphore,
    /// The device address of the node being killed.
    killing: Mutex<Option<SocketAddr>>,
    /// The broadcast channels of `Command::Subscribe` (empty until then). Every device is poked when they
    /// change, so links already open subscribe then, and every later link right after its handshake.
    channels: Mutex<Arc<Vec<String>>>,
}

impl Shared {
    fn killing(&self) -> Option<SocketAddr> {
        *self.killing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn channels(&self) -> Arc<Vec<String>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The endpoint after `addr` in the list (or the device's own first one if `addr` is not listed).
    fn next_endpoint(&self, addr: SocketAddr, device: usize) -> SocketAddr {
        match self.endpoints.iter().position(|e| *e == addr) {
            Some(i) => self.endpoints[(i + 1) % self.endpoints.len()],
            None => self.endpoints[device % self.endpoints.len()],
        }
    }

    /// Reconnect delays: 100 ms doubling to `--max-backoff-ms`, with jitter.
    fn backoff(&self) -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_millis(self.spec.max_backoff_ms))
    }
}

/// The channel device `index` subscribes to: `channels[index % len]`, none before `Subscribe`.
fn channel_for(channels: &[String], index: usize) -> Option<String> {
    (!channels.is_empty()).then(|| channels[index % channels.len()].clone())
}

/// Where a cached device's owner takes links now: its node's current address when the cluster was spawned
/// here (its ports change at every start), else the address the activation named.
fn owner_now<'a>(current: &'a BTreeMap<String, String>, owner: &'a RedirectTarget) -> &'a str {
    current.get(&owner.server_name).map_or(owner.device_addr.as_str(), String::as_str)
}

/// Runs the worker until `Exit` or until stdin closes.
pub async fn run() -> anyhow::Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await?.context("no worker spec on stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&first).context("parsing the worker spec")?;
    let roots = Arc::new(courier_core::tls::roots_from(&spec.ca)?);
    let mut endpoints = Vec::new();
    for endpoint in &spec.endpoints {
        endpoints.push(courier_device::resolve(endpoint).await?);
    }
    anyhow::ensure!(!endpoints.is_empty(), "no device endpoints");
    let credentials = crate::devices::load_range(&spec.cache, spec.first, spec.count)?;
    // Owners are a few node addresses shared by many devices: each is resolved once.
    let mut owner_addrs: HashMap<String, Option<SocketAddr>> = HashMap::new();
    let mut devices = Vec::with_capacity(credentials.len());
    for (offset, credentials) in credentials.iter().enumerate() {
        let index = spec.first + offset;
        let mut connector = Connector::with_roots(roots.clone(), &spec.server_name, Some(credentials))?;
        if !spec.source_addrs.is_empty() {
            connector = connector.bind_to(spec.source_addrs[index % spec.source_addrs.len()]);
        }
        let mut owner_node = None;
        if let Some(owner) = &credentials.owner {
            let addr = match owner_addrs.entry(owner_now(&spec.owner_addrs, owner).to_string()) {
                hash_map::Entry::Occupied(known) => *known.get(),
                hash_map::Entry::Vacant(new) => {
                    let resolved = courier_device::resolve(new.key()).await;
                    if let Err(error) = &resolved {
                        tracing::warn!(%error, "devices owned there start on the endpoints instead");
                    }
                    *new.insert(resolved.ok())
                }
            };
            if let Some(addr) = addr {
                owner_node = Some((addr, connector.for_redirect(owner)?));
            }
        }
        devices.push(Arc::new(Device {
            index,
            id: credentials.device_id,
            connector,
            registered: AtomicBool::new(false),
            owner: owner_node,
            last_node: Mutex::new(None),
            seen: Mutex::new(None),
            last_broadcast: Mutex::new(None),
            poke: tokio::sync::Notify::new(),
        }));
    }
    let shared = Arc::new(Shared {
        permits: Semaphore::new(spec.connect_concurrency.max(1)),
        spec,
        endpoints,
        stats: Stats::default(),
        killing: Mutex::new(None),
        channels: Mutex::new(Arc::new(Vec::new())),
    });

    let reporter_stop = CancellationToken::new();
    let reporter = tokio::spawn(report_loop(shared.clone(), reporter_stop.clone()));
    let mut running: HashMap<usize, Running> = HashMap::new();
    while let Some(line) = lines.next_line().await? {
        let command: Command = serde_json::from_str(&line).with_context(|| format!("command {line:?}"))?;
        match command {
            Command::Connect => {
                for device in &devices {
                    if running.get(&device.index).is_some_and(|running| !running.task.is_finished()) {
                        continue;
                    }
                    let cancel = CancellationToken::new();
                    let task = tokio::spawn(device_task(device.clone(), shared.clone(), cancel.clone()));
                    running.insert(device.index, Running { device: device.clone(), cancel, task });
                }
            }
            Command::Disconnect { every } => {
                let every = every.max(1);
                let chosen: Vec<usize> = running.keys().copied().filter(|i| i % every == 0).collect();
                let mut tasks = Vec::new();
                for index in chosen {
                    if let Some(running) = running.remove(&index) {
                        tasks.push(running.stop());
                    }
                }
                for task in tasks {
                    let _ = task.await;
                }
            }
            Command::Killing { addr } => {
                let addr = courier_device::resolve(&addr).await?;
                *shared.killing.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
            }
            Command::Subscribe { channels } => {
                *shared.channels.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(channels);
                for device in &devices {
                    device.poke.notify_one();
                }
            }
            Command::Exit => break,
        }
    }
    let tasks: Vec<_> = running.into_values().map(Running::stop).collect();
    for task in tasks {
        let _ = task.await;
    }
    reporter_stop.cancel();
    reporter.await?;
    Ok(())
}

/// A device's task, and how to stop it.
struct Running {
    device: Arc<Device>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Cancels the task (its link, if it has one, closes) and returns it to be awaited.
    fn stop(self) -> JoinHandle<()> {
        self.cancel.cancel();
        self.device.poke.notify_one();
        self.task
    }
}

/// What ended a link.
enum Ended {
    Cancelled,
    Redirect(courier_device::RedirectTarget),
    Broke(ClientError),
}

async fn device_task(device: Arc<Device>, shared: Arc<Shared>, cancel: CancellationToken) {
    let stats = &shared.stats;
    stats.running.fetch_add(1, Ordering::Relaxed);
    let mut seen = device.seen.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_else(|| {
        let mut seen = SeenIds::default();
        seen.reserve(SEEN_RESERVED);
        seen
    });
    // The connector holds the name the next node is checked by: the configured one, or the one its
    // owner or redirect gave.
    let first_endpoint = || (shared.endpoints[device.index % shared.endpoints.len()], device.connector.clone());
    let last_node = device.last_node.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut to_owner = last_node.is_none() && device.owner.is_some();
    let (mut addr, mut connector) = last_node.or_else(|| device.owner.clone()).unwrap_or_else(first_endpoint);
    let mut backoff = shared.backoff();
    let mut orphaned = false;
    // One wait on the token for the task's life, for waits off the link (connecting, subscribing, backing
    // off); between frames the task waits on its poke instead.
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let attempt = async {
            let _permit = shared.permits.acquire().await;
            connect(&device, &shared, addr, &mut connector).await
        };
        let result = tokio::select! {
            _ = &mut cancelled => break,
            result = attempt => result,
        };
        let from_owner = std::mem::replace(&mut to_owner, false);
        let mut link = match result {
            Ok(link) => link,
            Err(error) if from_owner && error.another_node_may_answer() => {
                // The owner named at activation may be gone (a respawned cluster listens on other ports) or
                // shutting down: start as a device without one does, at once and without counting an error.
                tracing::debug!(device = device.index, %error, "the owner from activation did not take the link");
                (addr, connector) = first_endpoint();
                continue;
            }
            Err(error) => {
                stats.error(&error);
                // A dead or refusing node: try the next one (which redirects to the owner).
                addr = shared.next_endpoint(addr, device.index);
                connector = device.connector.clone();
                tokio::select! {
                    _ = &mut cancelled => break,
                    _ = tokio::time::sleep(backoff.failed()) => continue,
                }
            }
        };
        backoff.succeeded();
        addr = link.node_addr;
        *device.last_node.lock().unwrap_or_else(|e| e.into_inner()) = Some((addr, connector.clone()));
        stats.links.fetch_add(1, Ordering::Relaxed);
        link.seen = std::mem::take(&mut seen);
        // The channel this link subscribes to, once the node said so.
        let mut subscribed: Option<String> = None;
        let mut refused = shared.backoff();
        // Whether the channels may differ from what the link subscribes to: at the link's start, and when
        // the device is poked.
        let mut recheck = true;
        let ended = loop {
            let wanted = recheck
                .then(|| channel_for(&shared.channels(), device.index))
                .flatten()
                .filter(|wanted| subscribed.as_ref() != Some(wanted));
            // Looked at again after a subscription (to find it done) or a refusal (to retry), not otherwise.
            recheck = wanted.is_some();
            if let Some(channel) = wanted {
                let last_seen = device.last_broadcast.lock().unwrap_or_else(|e| e.into_inner()).clone();
                // Under the same bound as link attempts: a hundred thousand links subscribing at the same
                // instant would starve the nodes' Raft heartbeats and probes on a small machine, and
                // devices do not all subscribe at once.
                let subscribe = async {
                    let _permit = shared.permits.acquire().await;
                    link.subscribe(&channel, last_seen.as_deref()).await
                };
                let answer = tokio::select! {
                    biased;
                    _ = &mut cancelled => break Ended::Cancelled,
                    answer = subscribe => answer,
                };
                match answer {
                    Ok(_topic) => {
                        if subscribed.replace(channel).is_none() {
                            stats.subscribed.fetch_add(1, Ordering::Relaxed);
                        }
                        refused.succeeded();
                    }
                    Err(ClientError::ChannelRefused { reason, .. }) => {
                        // A node whose copy of the channel book is behind the gateway's does not know a
                        // channel just created yet: ask again after a pause.
                        stats.refused(reason);
                        tokio::select! {
                            _ = &mut cancelled => break Ended::Cancelled,
                            _ = tokio::time::sleep(refused.failed()) => continue,
                        }
                    }
                    Err(error) => break Ended::Broke(error),
                }
            }
            // The link first: while frames are waiting, nothing else is looked at.
            let event = tokio::select! {
                biased;
                event = link.next_app_event() => event,
                () = device.poke.notified() => {
                    if cancel.is_cancelled() {
                        break Ended::Cancelled;
                    }
                    recheck = true;
                    continue;
                }
            };
            match event {
                Ok(LinkEvent::Notification(n)) if !n.channel_id.is_empty() => {
                    let now = crate::clock_micros();
                    match serde_json::from_slice::<BroadcastMarker>(&n.payload) {
                        Ok(BroadcastMarker { lb: (run, seq) }) if run == shared.spec.run_id => {
                            let receipt = (seq, device.index as u64, now);
                            stats.broadcasts.lock().unwrap_or_else(|e| e.into_inner()).push(receipt);
                        }
                        _ => {
                            stats.stale.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    *device.last_broadcast.lock().unwrap_or_else(|e| e.into_inner()) = Some(n.apns_id);
                }
                Ok(LinkEvent::Notification(n)) => {
                    let now = crate::clock_micros();
                    match serde_json::from_slice::<Marker>(&n.payload) {
                        Ok(Marker { lt: (run, seq, _, sent_us) }) if run == shared.spec.run_id => {
                            let latency = now.saturating_sub(sent_us);
                            stats.receipts.lock().unwrap_or_else(|e| e.into_inner()).push((
                                seq,
                                latency,
                                device.index as u64,
                            ));
                            if orphaned && Some(link.node_addr) != shared.killing() {
                                orphaned = false;
                                stats.recovered.lock().unwrap_or_else(|e| e.into_inner()).push(now);
                            }
                        }
                        _ => {
                            stats.stale.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(LinkEvent::Redirect(to)) => break Ended::Redirect(to),
                // The loadtest stores no more than a queue keeps, and counts its own misses from the ledger.
                Ok(LinkEvent::TokenUpdated { .. } | LinkEvent::Missed(_)) => {}
                Err(error) => break Ended::Broke(error),
            }
        };
        seen = std::mem::take(&mut link.seen);
        stats.links.fetch_sub(1, Ordering::Relaxed);
        if subscribed.is_some() {
            stats.subscribed.fetch_sub(1, Ordering::Relaxed);
        }
        match ended {
            Ended::Cancelled => {
                let _ = tokio::time::timeout(Duration::from_secs(5), link.close()).await;
                break;
            }
            Ended::Redirect(to) => {
                if let (Ok(next), Ok(named)) =
                    (courier_device::resolve(&to.device_addr).await, device.connector.for_redirect(&to))
                {
                    addr = next;
                    connector = named;
                }
            }
            Ended::Broke(error) => {
                stats.drops.fetch_add(1, Ordering::Relaxed);
                if !orphaned && shared.killing() == Some(link.node_addr) {
                    orphaned = true;
                    stats.orphaned.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(device = device.index, %error, "link broke; reconnecting");
                backoff.succeeded();
                tokio::select! {
                    _ = &mut cancelled => break,
                    _ = tokio::time::sleep(backoff.failed()) => {}
                }
            }
        }
    }
    *device.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen);
    stats.running.fetch_sub(1, Ordering::Relaxed);
}

/// One link: handshakes on `addr` and wherever it is redirected (each node checked by the name its redirect
/// gives; `connector` ends as the one the link was made with), then the topic registration the first time.
async fn connect(
    device: &Device,
    shared: &Shared,
    mut addr: SocketAddr,
    connector: &mut Connector,
) -> Result<DeviceLink, ClientError> {
    let stats = &shared.stats;
    let mut redirects = 0;
    let mut link = loop {
        match DeviceLink::connect_once(connector, addr, device.id, 0, &[]).await {
            Ok(link) => break link,
            Err(ClientError::Redirected(to)) if redirects < courier_device::MAX_REDIRECTS => {
                stats.redirected.fetch_add(1, Ordering::Relaxed);
                redirects += 1;
                addr = courier_device::resolve(&to.device_addr).await?;
                *connector = device.connector.for_redirect(&to)?;
            }
            Err(error) => return Err(error),
        }
    };
    if link.resumed {
        stats.resumed.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.full.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(topic) = &shared.spec.topic
        && !device.registered.load(Ordering::Relaxed)
    {
        let token = link.register(topic).await?;
        device.registered.store(true, Ordering::Relaxed);
        stats.tokens.lock().unwrap_or_else(|e| e.into_inner()).push((device.index as u64, token));
    }
    Ok(link)
}

async fn report_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let done = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        let stats = &shared.stats;
        let (connect_errors, error_samples) = stats.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let progress = Progress {
            worker: shared.spec.worker,
            links: stats.links.load(Ordering::Relaxed),
            running: stats.running.load(Ordering::Relaxed),
            full: stats.full.load(Ordering::Relaxed),
            resumed: stats.resumed.load(Ordering::Relaxed),
            redirected: stats.redirected.load(Ordering::Relaxed),
            connect_errors,
            error_samples,
            drops: stats.drops.load(Ordering::Relaxed),
            receipts: std::mem::take(&mut *stats.receipts.lock().unwrap_or_else(|e| e.into_inner())),
            subscribed: stats.subscribed.load(Ordering::Relaxed),
            subscribe_refusals: stats.subscribe_refusals.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            broadcasts: std::mem::take(&mut *stats.broadcasts.lock().unwrap_or_else(|e| e.into_inner())),
            stale: stats.stale.load(Ordering::Relaxed),
            tokens: std::mem::take(&mut *stats.tokens.lock().unwrap_or_else(|e| e.into_inner())),
            orphaned: stats.orphaned.load(Ordering::Relaxed),
            recovered: std::mem::take(&mut *stats.recovered.lock().unwrap_or_else(|e| e.into_inner())),
            armed: shared.killing().is_some(),
            rss: courier_core::telemetry::resident_memory_bytes(None).unwrap_or(0),
            done,
        };
        // The coordinator reads line by line; a broken pipe means it is gone, and so should we be.
        let mut line = match serde_json::to_vec(&progress) {
            Ok(line) => line,
            Err(_) => return,
        };
        line.push(b'\n');
        let mut stdout = std::io::stdout().lock();
        if stdout.write_all(&line).and_then(|()| stdout.flush()).is_err() {
            std::process::exit(0);
        }
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_owner_is_found_at_its_node_s_current_address_and_elsewhere_where_it_was() {
        let owner = |name: &str, addr: &str| RedirectTarget { device_addr: addr.into(), server_name: name.into() };
        let spawned: BTreeMap<String, String> =
            [("node-2.courier.internal".to_string(), "127.0.0.1:41002".to_string())].into();
        // A spawned cluster started again: node 2 listens on a new port.
        assert_eq!(owner_now(&spawned, &owner("node-2.courier.internal", "127.0.0.1:38000")), "127.0.0.1:41002");
        // A node this cluster does not have, or an existing cluster (no names): the address it was given.
        assert_eq!(owner_now(&spawned, &owner("node-7.courier.internal", "127.0.0.1:38007")), "127.0.0.1:38007");
        assert_eq!(owner_now(&BTreeMap::new(), &owner("node-2.courier.internal", "10.0.0.2:7300")), "10.0.0.2:7300");
    }
}
