//! Copies of stored notifications on other nodes, so that a notification a gateway was told is stored
//! survives the loss of its owner.
//!
//! The owner of a device writes each notification it stores to the device's next R-1 distinct ring
//! successors (R from the Raft state) before the gateway hears 200; if a successor does not answer, the
//! next candidate on the ring takes its place. Acks travel the same way, later and unawaited. Each peer
//! gets one batching task, so concurrent pushes share batches the way they share the store's group commits;
//! a batch with nothing urgent in it (nothing awaited, no unsaved receipts' copies) waits up to `LINGER`
//! (10 ms) for more. Batches go on one long-lived `ReplicateStream` per peer, each answered before the next
//! is sent (unary `Replicate` calls to a peer of an earlier release).
//!
//! `rebalance` moves copies when the ring changes: every node sends its queued notifications to the
//! devices' new candidates that did not hold them before, and drops the queues of devices it is no longer a
//! candidate for once the new holders have them. Puts are idempotent by (device, apns-id), so sending a
//! copy twice is harmless; at worst a device sees a redelivery, which its client drops.
//!
//! Devices' channel subscriptions travel the same way: each change a device asks for is copied to the
//! device's successors before the device hears it was made; what a link handed its device follows
//! unawaited, in order, like acks; `rebalance` hands subscriptions over with the queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_core::webhook::Event;
use courier_proto::cluster::cluster_client::ClusterClient;
use courier_proto::cluster::{
    DeviceQueue, FetchQueueRequest, FetchQueuesRequest, HeldReceipt, Notification, QueueKey, ReleasedReceipt,
    ReplicateRequest, ReplicateResponse, Subscription, UnsavedCopy,
};
use futures_util::StreamExt;
use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use courier_core::shutdown::CancellationToken;

use crate::ids::DeviceId;
use crate::peer::Peers;
use crate::raft::state::{Epoch, NodeId};
use crate::ring::Ring;
use crate::store::{ReceiptRole, Store};
use crate::view::{EpochView, LocalView};

/// Most operations one batch carries.
const MAX_BATCH: usize = 512;

/// How long a batch of only unawaited operations (acks, written receipts' copies, what links handed,
/// releases) waits for more to ride in the same batch. Anything awaited (a put the provider's answer waits
/// for) sends the batch at once, and so do unsaved receipts' copies, which their copier gathered for as
/// long already. With receipts on, each push to a connected device costs a receipt copy and a release per
/// holder; sent as they came, they made an RPC of a few operations each, and RPCs were most of what
/// receipts cost a node.
const LINGER: Duration = Duration::from_millis(10);

/// Groups `items` by node, each item under each node it names: one message per node for all of them.
fn by_node<T: Clone, N: IntoIterator<Item = NodeId>>(items: impl Iterator<Item = (N, T)>) -> HashMap<NodeId, Vec<T>> {
    let mut by_node: HashMap<NodeId, Vec<T>> = HashMap::new();
    for (nodes, item) in items {
        // Cloned for every node but the last, which takes the item itself.
        let mut nodes = nodes.into_iter().peekable();
        let mut item = Some(item);
        while let Some(node) = nodes.next() {
            let this = if nodes.peek().is_some() { item.clone() } else { item.take() };
            by_node.entry(node).or_default().extend(this);
        }
    }
    by_node
}

enum PeerOp {
    /// A copy, the epoch of the view that decided it, and who waits for the outcome.
    Put(Box<Notification>, Epoch, oneshot::Sender<bool>),
    Remove(QueueKey),
    /// A subscription change, and who waits to hear it was applied (a device's change, a hand-over), if anyone.
    Subscription(Box<Subscription>, Option<oneshot::Sender<bool>>),
    /// A receipt to hold, and who waits to hear it is stored there, if anyone.
    Receipt(HeldReceipt, Option<oneshot::Sender<bool>>),
    /// Receipts the team's endpoint took: the holder drops its copies.
    Released(Vec<ReleasedReceipt>),
    /// Unsaved receipts for the holder to keep in memory (`receipts::unsaved`).
    UnsavedCopies(Vec<UnsavedCopy>),
    /// Numbers of unsaved copies the holder drops.
    ReleasedCopies(Vec<u64>),
}

impl PeerOp {
    /// Whether this op's batch must not linger: someone waits for its outcome, or it carries unsaved
    /// receipts' copies, which their copier gathered already (`receipts::COPY_GATHER`) and which are lost
    /// with the owner until they arrive.
    fn urgent(&self) -> bool {
        match self {
            PeerOp::Put(..) | PeerOp::UnsavedCopies(_) => true,
            PeerOp::Subscription(_, reply) => reply.is_some(),
            PeerOp::Receipt(_, reply) => reply.is_some(),
            PeerOp::Remove(_) | PeerOp::Released(_) | PeerOp::ReleasedCopies(_) => false,
        }
    }
}

/// An unsaved receipt's copy for its device's other holders (`receipts::unsaved`): its number, the
/// device, the event as JSON, and on the owner the holders it goes to (`Replicator::copy_holders`), which
/// its release goes to as well.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptCopy {
    pub number: u64,
    pub device: DeviceId,
    pub json: bytes::Bytes,
    pub holders: Vec<NodeId>,
}

/// One peer's batching task and its breaker.
struct Link {
    ops: mpsc::Sender<PeerOp>,
    breaker: Arc<Breaker>,
}

/// Fails fast towards a peer that just failed. After a failed batch the peer is skipped for a cool-down
/// (250 ms, doubling with each failure in a row up to the replication timeout): its puts fail at once, so
/// the next ring candidate takes them instead of every push waiting out the timeout on a peer that accepts
/// connections and never answers. The first batch after the cool-down tries the peer again.
struct Breaker {
    state: Mutex<BreakerState>,
    longest: Duration,
}

#[derive(Default)]
struct BreakerState {
    open_until: Option<Instant>,
    cooldown: Duration,
}

const FIRST_COOLDOWN: Duration = Duration::from_millis(250);

impl Breaker {
    fn new(longest: Duration) -> Self {
        Breaker { state: Mutex::new(BreakerState::default()), longest }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the peer is being skipped now.
    fn open(&self) -> bool {
        self.lock().open_until.is_some_and(|until| Instant::now() < until)
    }

    fn record(&self, ok: bool) {
        let mut state = self.lock();
        if ok {
            *state = BreakerState::default();
        } else {
            state.cooldown = (state.cooldown * 2).clamp(FIRST_COOLDOWN, self.longest.max(FIRST_COOLDOWN));
            state.open_until = Some(Instant::now() + state.cooldown);
        }
    }
}

pub struct Replicator {
    pub id: NodeId,
    peers: Arc<Peers>,
    view: Arc<LocalView>,
    /// One batching task per peer address.
    links: Mutex<HashMap<String, Link>>,
    /// One task per peer address that asks it for devices' queues (`gather`), many devices a call.
    gathers: Mutex<HashMap<String, mpsc::Sender<GatherAsk>>>,
    /// How long a put waits for a peer before the next candidate is tried.
    timeout: Duration,
    /// Whether fewer than R copies are enough while fewer than R members are active (`--degraded-writes`).
    degraded: bool,
}

impl Replicator {
    pub fn new(id: NodeId, peers: Arc<Peers>, view: Arc<LocalView>, timeout: Duration, degraded: bool) -> Self {
        let (links, gathers) = (Mutex::new(HashMap::new()), Mutex::new(HashMap::new()));
        Replicator { id, peers, view, links, gathers, timeout, degraded }
    }

    /// How many holders a notification stored now must have (`EpochView::copies_wanted`).
    pub fn copies_wanted(&self) -> usize {
        self.view.get().copies_wanted(self.degraded)
    }

    fn link(&self, addr: &str) -> (mpsc::Sender<PeerOp>, Arc<Breaker>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(link) = links.get(addr).filter(|l| !l.ops.is_closed()) {
            return (link.ops.clone(), link.breaker.clone());
        }
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        let breaker = Arc::new(Breaker::new(self.timeout));
        let task = BatchTask {
            from: self.id,
            addr: addr.to_string(),
            peers: self.peers.clone(),
            view: self.view.clone(),
            breaker: breaker.clone(),
            timeout: self.timeout,
            stream: None,
            unary_only: false,
        };
        tokio::spawn(task.run(rx));
        links.insert(addr.to_string(), Link { ops: tx.clone(), breaker: breaker.clone() });
        (tx, breaker)
    }

    /// Whether puts to `addr` are being skipped after a failure (`Breaker`).
    fn skipped(&self, addr: &str) -> bool {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.get(addr).is_some_and(|link| link.breaker.open())
    }

    fn addr_of(&self, node: NodeId) -> Option<String> {
        self.view.get().state.members.get(&node).map(|m| m.cluster_addr.clone())
    }

    /// Sends one copy to `node`, decided in a view of `epoch`; `true` once it is durably stored there.
    pub async fn put_to(&self, node: NodeId, notification: Notification, epoch: Epoch) -> bool {
        match self.ask(node, |reply| PeerOp::Put(Box::new(notification), epoch, reply)).await {
            Some(done) => done,
            None => {
                metrics::counter!("courier_node_replication_skipped_total").increment(1);
                false
            }
        }
    }

    /// Queues the op `make` builds on `node`'s batching task and waits for its outcome: `Some(true)` once
    /// `node` applied it, `Some(false)` if it did not (or is not a member), `None` if `node` is being
    /// skipped after a failure (`Breaker`).
    async fn ask(&self, node: NodeId, make: impl FnOnce(oneshot::Sender<bool>) -> PeerOp) -> Option<bool> {
        let Some(addr) = self.addr_of(node) else { return Some(false) };
        let (ops, breaker) = self.link(&addr);
        if breaker.open() {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        if ops.send(make(reply)).await.is_err() {
            return Some(false);
        }
        Some(matches!(tokio::time::timeout(self.timeout * 2, answer).await, Ok(Ok(true))))
    }

    /// Copies a notification this node stored to the device's successors. Says how many copies exist now,
    /// this node's included, and how many the replication factor asks for with the members active now (R,
    /// or with degraded writes all of them when fewer than R are active).
    pub async fn put(&self, device: DeviceId, notification: &Notification) -> Copies {
        let view = self.view.get();
        let wanted = view.copies_wanted(self.degraded);
        let mut others = view.ring.candidates(device, usize::MAX).into_iter().filter(|id| *id != self.id);
        let mut made = 1;
        // The first successors in parallel; a failed one is replaced by the next candidate.
        let first: Vec<NodeId> = others.by_ref().take(wanted - 1).collect();
        let epoch = view.state.epoch;
        let results = join_all(first.iter().map(|node| self.put_to(*node, notification.clone(), epoch))).await;
        made += results.iter().filter(|ok| **ok).count();
        for node in others {
            if made >= wanted {
                break;
            }
            if self.put_to(node, notification.clone(), epoch).await {
                made += 1;
            }
        }
        if made < wanted {
            metrics::counter!("courier_node_replication_degraded_total").increment(1);
        }
        Copies { made, wanted }
    }

    /// Tells the device's other candidates that `apns_id` was acked (at `delivered_at_ms`, when its team
    /// gets receipts: they keep the receipt). Not awaited: a lost remove only means a redelivery the client
    /// drops, and a receipt made again by whoever owns the device then.
    pub fn remove(&self, device: DeviceId, apns_id: &str, delivered_at_ms: Option<u64>) {
        self.tell_other_holders(device, || {
            PeerOp::Remove(QueueKey {
                device_id: device.to_bytes().to_vec(),
                apns_id: apns_id.to_string(),
                delivered_at_ms: delivered_at_ms.unwrap_or(0),
            })
        });
    }

    /// Copies receipts decided with nothing stored to the device's other holders, in parallel; returns how
    /// many of them stored all of them.
    pub async fn hold_receipts(&self, device: DeviceId, events: &[Event]) -> usize {
        let others: Vec<NodeId> = self.other_holders(&self.view.get(), device).collect();
        let held: Vec<HeldReceipt> = events
            .iter()
            .map(|event| HeldReceipt {
                device_id: device.to_bytes().to_vec(),
                event_json: event.to_json(),
                unsaved: false,
                event_id: event.id.clone(),
            })
            .collect();
        let stored = join_all(others.iter().map(|node| {
            let held = held.clone();
            async move {
                let all =
                    join_all(held.into_iter().map(|r| self.ask(*node, |reply| PeerOp::Receipt(r, Some(reply))))).await;
                all.iter().all(|ok| *ok == Some(true))
            }
        }))
        .await;
        stored.into_iter().filter(|ok| *ok).count()
    }

    /// `hold_receipts` for one receipt (its id, and the event as JSON), without waiting: the copy travels
    /// in the next replication batches, like acks.
    pub fn hold_receipt_later(&self, device: DeviceId, event_id: String, event_json: Vec<u8>) {
        let held = HeldReceipt { device_id: device.to_bytes().to_vec(), event_json, unsaved: false, event_id };
        self.tell_other_holders(device, || PeerOp::Receipt(held.clone(), None));
    }

    /// Sends unsaved receipts' copies (`receipts::unsaved`) to the holders each names, without waiting: one
    /// message per holder for all of them.
    pub fn copy_unsaved(&self, copies: Vec<ReceiptCopy>) {
        let sent = copies.into_iter().map(|ReceiptCopy { number, device, json, holders }| {
            (holders, UnsavedCopy { number, device_id: device.to_bytes().to_vec(), event_json: json })
        });
        for (node, copies) in by_node(sent) {
            self.tell(node, PeerOp::UnsavedCopies(copies));
        }
    }

    /// Tells the holders of each copied unsaved receipt (those its copy went to, and its number) to drop
    /// their copy, one message per holder. Not awaited, like `release_receipts`.
    pub fn release_copies<'a>(&self, copies: impl Iterator<Item = (&'a [NodeId], u64)>) {
        for (node, numbers) in by_node(copies.map(|(holders, number)| (holders.iter().copied(), number))) {
            self.tell(node, PeerOp::ReleasedCopies(numbers));
        }
    }

    /// Tells the other holders of each receipt's device that its team's endpoint took it, one message per
    /// holder. Not awaited: a copy left behind is only sent again if the holder becomes the owner, and is
    /// pruned after the retry window.
    pub fn release_receipts(&self, receipts: &[(DeviceId, String)]) {
        let by_node = self.by_other_holder(receipts.iter().map(|(device, id)| {
            (*device, ReleasedReceipt { device_id: device.to_bytes().to_vec(), event_id: id.clone() })
        }));
        for (node, released) in by_node {
            self.tell(node, PeerOp::Released(released));
        }
    }

    /// Groups `items` by the holders of their devices that keep receipts (the first R + 1 candidates) but
    /// this node, each item under each of its device's holders.
    fn by_other_holder<T: Clone>(&self, items: impl Iterator<Item = (DeviceId, T)>) -> HashMap<NodeId, Vec<T>> {
        let view = self.view.get();
        by_node(items.map(|(device, item)| (self.other_holders(&view, device), item)))
    }

    /// Where unsaved receipts' copies go now (`receipts::unsaved`), by device: its first R − 1 candidates
    /// but this node, as for a notification's copies, a candidate skipped after a failure (`Breaker`)
    /// replaced by the next. The owner remembers them with the copy and sends its release there, so that a
    /// later ring or breaker change does not leave the copy behind.
    pub fn copy_holders(&self) -> impl Fn(DeviceId) -> Vec<NodeId> + use<'_> {
        let view = self.view.get();
        let skipped: Vec<NodeId> =
            view.state.members.iter().filter(|(_, m)| self.skipped(&m.cluster_addr)).map(|(id, _)| *id).collect();
        let others = view.state.ring.copies().saturating_sub(1);
        move |device| {
            let mut holders = view.ring.candidates(device, others + 1 + skipped.len());
            holders.retain(|node| *node != self.id && !skipped.contains(node));
            holders.truncate(others);
            holders
        }
    }

    /// Copies a subscription change the device asked for, stored on this node, to the device's other
    /// holders, and waits until each has stored it or failed (a holder skipped after a failure fails at
    /// once, one that does not answer after twice the replication timeout), so that the device hears its
    /// change acknowledged once it survives this node's death. Says how many holders have it, this one
    /// included. A holder that failed misses the change until a ring change hands it the device's data
    /// again, or the device subscribes again (`courier-device`'s `Device::with_channel` does on every link).
    pub async fn copy_subscription(&self, device: DeviceId, change: &Subscription) -> usize {
        let others = self.other_subscription_holders(device);
        let sent = join_all(others.iter().map(|node| self.subscription_to(*node, change.clone()))).await;
        1 + sent.iter().filter(|ok| **ok).count()
    }

    /// Copies a subscription change to the device's other holders without waiting: for what a link handed
    /// its device (`last_seen`), where a lost copy costs at most one kept broadcast sent again.
    pub fn copy_subscription_later(&self, device: DeviceId, change: &Subscription) {
        for node in self.other_subscription_holders(device) {
            self.tell(node, PeerOp::Subscription(Box::new(change.clone()), None));
        }
    }

    /// The device's first R candidates but this node: those that keep its subscriptions (the orphan sweep
    /// hands any other node's rows to them). Unlike a notification, a subscription is not put on a later
    /// candidate in a failed one's place: that candidate's row would be swept away again.
    fn other_subscription_holders(&self, device: DeviceId) -> Vec<NodeId> {
        let view = self.view.get();
        let holders = view.ring.candidates(device, view.state.ring.copies());
        holders.into_iter().filter(|node| *node != self.id).collect()
    }

    /// Queues `op` for each of the device's holders but this node, without waiting.
    fn tell_other_holders(&self, device: DeviceId, op: impl Fn() -> PeerOp) {
        for node in self.other_holders(&self.view.get(), device) {
            self.tell(node, op());
        }
    }

    /// The device's candidates that hold its queue and receipts (the first R + 1) in `view`, but this node.
    fn other_holders(&self, view: &EpochView, device: DeviceId) -> impl Iterator<Item = NodeId> + use<> {
        let me = self.id;
        view.ring.candidates(device, view.state.ring.copies() + 1).into_iter().filter(move |node| *node != me)
    }

    /// Queues `op` for `node`'s next replication batch, without waiting; dropped if its queue is full.
    fn tell(&self, node: NodeId, op: PeerOp) {
        if let Some(addr) = self.addr_of(node) {
            let _ = self.link(&addr).0.try_send(op);
        }
    }

    /// Sends one subscription to `node`; `true` once it is stored there.
    async fn subscription_to(&self, node: NodeId, change: Subscription) -> bool {
        self.ask(node, |reply| PeerOp::Subscription(Box::new(change), Some(reply))).await.unwrap_or(false)
    }

    /// Moves queued notifications after the ring changed from `before` to the current ring, many devices
    /// at a time.
    pub async fn rebalance(&self, store: &Store, before: &Ring) -> Result<RebalanceReport, crate::store::StoreError> {
        let view = self.view.get();
        let wanted = view.state.ring.copies();
        let devices = store.devices().await?;
        let reports: Vec<Result<RebalanceReport, crate::store::StoreError>> = futures_util::stream::iter(devices)
            .map(|device| self.rebalance_device(store, before, &view.ring, wanted, device))
            .buffer_unordered(REBALANCE_PARALLELISM)
            .collect()
            .await;
        let mut total = RebalanceReport::default();
        for report in reports {
            let report = report?;
            total.moved += report.moved;
            total.released += report.released;
        }
        Ok(total)
    }

    async fn rebalance_device(
        &self,
        store: &Store,
        before: &Ring,
        ring: &Ring,
        wanted: usize,
        device: DeviceId,
    ) -> Result<RebalanceReport, crate::store::StoreError> {
        let old = before.candidates(device, wanted);
        let new = ring.candidates(device, wanted);
        let stays = new.contains(&self.id);
        let targets: Vec<NodeId> =
            new.iter().copied().filter(|n| *n != self.id && (!old.contains(n) || !stays)).collect();
        if targets.is_empty() && stays {
            return Ok(RebalanceReport::default());
        }
        self.hand_over(store, device, &targets, !stays && !new.is_empty()).await
    }

    /// Sends the device's queue and subscriptions to every node in `targets`; with `release`, drops the
    /// local copies once all of them have them.
    async fn hand_over(
        &self,
        store: &Store,
        device: DeviceId,
        targets: &[NodeId],
        release: bool,
    ) -> Result<RebalanceReport, crate::store::StoreError> {
        let queue = store.pending(device).await?;
        let subscriptions = store.subscriptions(device).await?;
        let epoch = self.view.get().state.epoch;
        let mut complete = true;
        for target in targets {
            let sent = join_all(queue.iter().map(|n| self.put_to(*target, n.clone(), epoch))).await;
            complete &= sent.iter().all(|ok| *ok);
            let sent = join_all(subscriptions.iter().map(|s| self.subscription_to(*target, s.clone()))).await;
            complete &= sent.iter().all(|ok| *ok);
        }
        let mut report = RebalanceReport { moved: queue.len() * targets.len(), released: 0 };
        if release && complete {
            for n in &queue {
                store.remove(device, &n.apns_id, None, ReceiptRole::None).await?;
            }
            let ended = subscriptions.into_iter().map(|s| Subscription { subscribed: false, ..s }).collect();
            store.save_subscriptions(ended).await?;
            report.released = queue.len();
        }
        Ok(report)
    }
}

/// Most devices one `FetchQueues` call asks a holder for.
pub const GATHER_BATCH: usize = 256;

/// One device's queue asked of one holder, and where its answer goes: `None` when the holder could not be
/// asked, or refused because this node is behind and no longer owns the device.
struct GatherAsk {
    device: DeviceId,
    answer: oneshot::Sender<Option<Vec<Notification>>>,
}

/// A holder that queues are asked of.
struct Holder {
    addr: String,
    peers: Arc<Peers>,
    timeout: Duration,
}

/// Asks one holder for devices' queues, one call at a time: the devices whose owner asked while a call was
/// out go together in the next one, so a thousand devices linking at once cost a few calls, not a thousand,
/// and a device linking alone waits for no one.
async fn gather_from(holder: Holder, view: Arc<LocalView>, mut asks: mpsc::Receiver<GatherAsk>) {
    let mut batch = Vec::with_capacity(GATHER_BATCH);
    while asks.recv_many(&mut batch, GATHER_BATCH).await > 0 {
        let asked = std::mem::take(&mut batch);
        let devices: Vec<DeviceId> = asked.iter().map(|ask| ask.device).collect();
        // Stamped with the view the call is made in: this node owns these devices in it, or is told so.
        let epoch = view.get().state.epoch.0;
        match holder.fetch(&devices, epoch).await {
            Some(queues) if queues.len() == asked.len() => {
                for (ask, queue) in asked.into_iter().zip(queues) {
                    if queue.stale {
                        // This node no longer owns the device in the holder's newer view: its link will be
                        // redirected.
                        tracing::debug!(device = %ask.device, addr = %holder.addr, "queue fetch fenced; this node is behind");
                    }
                    let _ = ask.answer.send((!queue.stale).then_some(queue.notifications));
                }
            }
            _ => {
                for ask in asked {
                    let _ = ask.answer.send(None);
                }
            }
        }
    }
}

impl Holder {
    /// The holder's answer for each of `devices`, in order; `None` if it could not be asked. A holder of an
    /// earlier release, which has no `FetchQueues`, is asked device by device.
    async fn fetch(&self, devices: &[DeviceId], epoch: u64) -> Option<Vec<DeviceQueue>> {
        let mut client = self.peers.client(&self.addr).ok()?;
        let device_ids = devices.iter().map(|d| d.to_bytes().to_vec()).collect();
        let mut request = tonic::Request::new(FetchQueuesRequest { device_ids, epoch });
        request.set_timeout(self.timeout);
        match tokio::time::timeout(self.timeout, client.fetch_queues(request)).await.ok()? {
            Ok(answer) => Some(answer.into_inner().queues),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                let asks = devices.iter().map(|device| {
                    let mut client = client.clone();
                    let device_id = device.to_bytes().to_vec();
                    let mut request = tonic::Request::new(FetchQueueRequest { device_id, epoch });
                    request.set_timeout(self.timeout);
                    async move {
                        let answer =
                            tokio::time::timeout(self.timeout, client.fetch_queue(request)).await.ok()?.ok()?;
                        let answer = answer.into_inner();
                        Some(DeviceQueue { notifications: answer.notifications, stale: answer.stale })
                    }
                });
                join_all(asks).await.into_iter().collect()
            }
            Err(_) => None,
        }
    }
}

/// How often `sweep_orphans_every_few_seconds` sweeps.
const ORPHAN_SWEEP: Duration = Duration::from_secs(2);

/// Sweeps after a ring change that also look at devices with only subscriptions (the first at once).
const SUBSCRIPTION_SWEEPS: u32 = 3;

/// Devices whose queues move at the same time during a rebalance.
const REBALANCE_PARALLELISM: usize = 64;

impl Replicator {
    /// Merges into the local store whatever the device's other candidates hold for it; run by the owner
    /// when the device connects, before its queue is replayed. Unreachable candidates are skipped. The
    /// asks of devices linking at the same time share one `FetchQueues` call per candidate (`gather_from`).
    pub async fn gather(&self, store: &Store, device: DeviceId) -> usize {
        let view = self.view.get();
        let others: Vec<String> = self
            .other_holders(&view, device)
            .filter_map(|id| view.state.members.get(&id).map(|m| m.cluster_addr.clone()))
            .filter(|addr| !self.skipped(addr))
            .collect();
        let fetched = join_all(others.iter().map(|addr| async move {
            let (answer, answered) = oneshot::channel();
            self.gatherer(addr).send(GatherAsk { device, answer }).await.ok()?;
            // The call is bounded by the timeout; this also bounds the wait for the calls queued before it.
            tokio::time::timeout(self.timeout * 2, answered).await.ok()?.ok()?
        }))
        .await;
        let now_secs = crate::ids::unix_millis() / 1000;
        let mut added = 0;
        for n in fetched.into_iter().flatten().flatten() {
            if n.expiration > now_secs
                && matches!(store.insert(n, ReceiptRole::None).await, Ok(crate::store::Inserted::New))
            {
                added += 1;
            }
        }
        if added > 0 {
            metrics::counter!("courier_node_queue_gathered_total").increment(added as u64);
        }
        added
    }

    fn gatherer(&self, addr: &str) -> mpsc::Sender<GatherAsk> {
        let mut gathers = self.gathers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(asks) = gathers.get(addr).filter(|asks| !asks.is_closed()) {
            return asks.clone();
        }
        let (asks, rx) = mpsc::channel(GATHER_BATCH * 16);
        let holder = Holder { addr: addr.to_string(), peers: self.peers.clone(), timeout: self.timeout };
        tokio::spawn(gather_from(holder, self.view.clone(), rx));
        gathers.insert(addr.to_string(), asks.clone());
        asks
    }

    /// Every few seconds, moves copies this node holds for devices it is no longer a candidate for: writes
    /// that raced a ring change land on the old holders after their rebalance read the queue. Devices that
    /// only have subscriptions (many, and rarely written) are swept in the first few sweeps after the
    /// ring changes, when racing copies land, not every time.
    pub async fn sweep_orphans_every_few_seconds(self: Arc<Self>, store: Store, shutdown: CancellationToken) {
        let mut members = self.view.get().ring.members().to_vec();
        let mut subscription_sweeps = SUBSCRIPTION_SWEEPS;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(ORPHAN_SWEEP) => {}
                _ = shutdown.cancelled() => return,
            }
            let ring = self.view.get().ring.members().to_vec();
            if ring != members {
                members = ring;
                subscription_sweeps = SUBSCRIPTION_SWEEPS;
            }
            let with_subscriptions = subscription_sweeps > 0;
            subscription_sweeps = subscription_sweeps.saturating_sub(1);
            let sweep = tokio::select! {
                result = self.sweep_orphans(&store, with_subscriptions) => result,
                _ = shutdown.cancelled() => return,
            };
            match sweep {
                Ok(0) => {}
                Ok(released) => tracing::info!(released, "handed stray copies to their devices' candidates"),
                Err(error) => tracing::warn!(%error, "sweeping stray copies failed"),
            }
        }
    }

    /// Hands the queues (and subscriptions) of devices this node is not a candidate for (copies that
    /// arrived after the last rebalance) to their candidates, then drops them here. Devices with only
    /// subscriptions are looked at only `with_subscriptions`.
    pub async fn sweep_orphans(
        &self,
        store: &Store,
        with_subscriptions: bool,
    ) -> Result<usize, crate::store::StoreError> {
        let view = self.view.get();
        let wanted = view.state.ring.copies();
        let mut released = 0;
        for device in store.devices_holding(with_subscriptions).await? {
            let candidates = view.ring.candidates(device, wanted);
            if candidates.is_empty() || candidates.contains(&self.id) {
                continue;
            }
            released += self.hand_over(store, device, &candidates, true).await?.released;
        }
        Ok(released)
    }
}

/// How many holders a notification has, and how many it should have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copies {
    pub made: usize,
    pub wanted: usize,
}

impl Copies {
    /// As many holders as the replication factor asks for with the members active now.
    pub fn enough(&self) -> bool {
        self.made >= self.wanted
    }
}

/// What a rebalance did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RebalanceReport {
    /// Copies sent to new holders.
    pub moved: usize,
    /// Local copies dropped because this node no longer holds those devices.
    pub released: usize,
}

/// One peer's batching task: sends what queued up while the previous batch was in flight as one batch,
/// after waiting up to `LINGER` for more when nothing in it is urgent (`PeerOp::urgent`). Batches go on one
/// `ReplicateStream` to the peer, opened with the first and again after any failure, or as unary
/// `Replicate` calls to a peer of an earlier release.
struct BatchTask {
    from: NodeId,
    addr: String,
    peers: Arc<Peers>,
    view: Arc<LocalView>,
    breaker: Arc<Breaker>,
    timeout: Duration,
    stream: Option<ReplicaStream>,
    /// The peer answered `ReplicateStream` with UNIMPLEMENTED.
    unary_only: bool,
}

/// An open `ReplicateStream`: where batches go, and where their answers come back, one each, in order.
struct ReplicaStream {
    requests: mpsc::Sender<ReplicateRequest>,
    answers: tonic::Streaming<ReplicateResponse>,
}

impl BatchTask {
    async fn run(mut self, mut ops: mpsc::Receiver<PeerOp>) {
        use mpsc::error::TryRecvError;
        while let Some(first) = ops.recv().await {
            let linger_until = tokio::time::Instant::now() + LINGER;
            let mut urgent = first.urgent();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                let op = match ops.try_recv() {
                    Ok(op) => op,
                    Err(TryRecvError::Empty) if !urgent => {
                        match tokio::time::timeout_at(linger_until, ops.recv()).await {
                            Ok(Some(op)) => op,
                            _ => break,
                        }
                    }
                    Err(_) => break,
                };
                urgent |= op.urgent();
                batch.push(op);
            }
            self.send(batch).await;
        }
    }

    async fn send(&mut self, batch: Vec<PeerOp>) {
        let mut request = ReplicateRequest { from_node: self.from, ..Default::default() };
        let mut epoch: Option<Epoch> = None;
        let mut waiters = Vec::new();
        let mut applied_waiters = Vec::new();
        for op in batch {
            match op {
                PeerOp::Put(n, decided, reply) => {
                    request.puts.push(*n);
                    epoch = Some(epoch.map_or(decided, |e| e.min(decided)));
                    waiters.push(reply);
                }
                PeerOp::Remove(key) => request.removes.push(key),
                PeerOp::Subscription(change, reply) => {
                    request.subscriptions.push(*change);
                    applied_waiters.extend(reply);
                }
                PeerOp::Receipt(receipt, reply) => {
                    request.receipts.push(receipt);
                    applied_waiters.extend(reply);
                }
                PeerOp::Released(released) => request.released_receipts.extend(released),
                PeerOp::UnsavedCopies(copies) => request.unsaved_copies.extend(copies),
                PeerOp::ReleasedCopies(numbers) => request.released_copies.extend(numbers),
            }
        }
        // Removes alone are stamped with the current epoch: nothing in them is decided by ownership.
        request.epoch = epoch.unwrap_or_else(|| self.view.get().state.epoch).0;
        if self.breaker.open() {
            // Failed a moment ago: skip it rather than make these wait out another timeout.
            metrics::counter!("courier_node_replication_skipped_total").increment(waiters.len() as u64);
            for waiter in waiters.into_iter().chain(applied_waiters) {
                let _ = waiter.send(false);
            }
            return;
        }
        let answer = match self.peers.client(&self.addr) {
            Ok(client) => tokio::time::timeout(self.timeout, self.call(client, request)).await.ok().flatten(),
            Err(_) => None,
        };
        if answer.is_none() {
            // Whatever it was waiting for, the stream is not trusted to answer in order again.
            self.stream = None;
        }
        self.breaker.record(answer.is_some());
        let Some(answer) = answer else {
            metrics::counter!("courier_node_replication_failures_total").increment(1);
            for waiter in waiters.into_iter().chain(applied_waiters) {
                let _ = waiter.send(false);
            }
            return;
        };
        for waiter in applied_waiters {
            let _ = waiter.send(true);
        }
        for (index, waiter) in waiters.into_iter().enumerate() {
            let _ = waiter.send(!answer.refused.contains(&(index as u32)));
        }
        if !answer.refused.is_empty() {
            // The peer's view is newer and moved these devices: catch up before the next batch is stamped.
            metrics::counter!("courier_node_replication_fenced_total").increment(answer.refused.len() as u64);
            self.view.reached(Epoch(answer.epoch), self.timeout).await;
        }
    }

    /// Sends one batch and gives its answer, or `None` if it failed: on the stream to the peer (opened
    /// first if there is none), or as a unary call to a peer that has no stream.
    async fn call(
        &mut self,
        mut client: ClusterClient<Channel>,
        request: ReplicateRequest,
    ) -> Option<ReplicateResponse> {
        if !self.unary_only && self.stream.is_none() {
            let (requests, outgoing) = mpsc::channel(1);
            match client.replicate_stream(tokio_stream::wrappers::ReceiverStream::new(outgoing)).await {
                Ok(answers) => self.stream = Some(ReplicaStream { requests, answers: answers.into_inner() }),
                Err(status) if status.code() == tonic::Code::Unimplemented => self.unary_only = true,
                Err(_) => return None,
            }
        }
        let Some(stream) = self.stream.as_mut() else {
            let mut call = tonic::Request::new(request);
            call.set_timeout(self.timeout);
            return client.replicate(call).await.ok().map(tonic::Response::into_inner);
        };
        stream.requests.send(request).await.ok()?;
        stream.answers.message().await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::state::{ClusterState, Member, MemberState};

    #[tokio::test]
    async fn unsaved_copies_go_to_the_first_r_minus_one_successors_and_a_skipped_one_is_replaced_by_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = crate::pki::PkiOptions { nodes: vec![1], ..Default::default() };
        crate::pki::init(dir.path(), &options).expect("pki");
        let pki = crate::pki::PkiDir::new(dir.path());
        let peers = Arc::new(Peers::new(&pki, "node-1", None, Duration::from_secs(1)).expect("peers"));
        let mut state = ClusterState::default();
        state.ring.replication_factor = 3;
        for id in 1..=5 {
            let member = Member {
                id,
                device_addr: format!("127.0.0.1:{}", 5000 + id),
                cluster_addr: format!("127.0.0.1:{}", 6000 + id),
                device_name: String::new(),
                state: MemberState::Active,
                since_ms: 0,
            };
            state.members.insert(id, member);
        }
        let view = Arc::new(LocalView::new(1, Arc::new(state), None));
        let replicator = Replicator::new(1, peers, view.clone(), Duration::from_secs(1), false);
        let devices: Vec<DeviceId> =
            (0..200u128).map(|i| DeviceId(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) + 1)).collect();
        let others = |device| -> Vec<NodeId> {
            view.get().ring.candidates(device, 5).into_iter().filter(|node| *node != 1).collect()
        };
        let holders = replicator.copy_holders();
        for device in &devices {
            assert_eq!(holders(*device), others(*device)[..2], "R − 1 = 2 of them, this node never one");
        }
        // Node 3 fails a batch: while it is skipped, the next candidate takes its place.
        replicator.link("127.0.0.1:6003").1.record(false);
        let holders = replicator.copy_holders();
        let mut replaced = 0;
        for device in &devices {
            let expected: Vec<NodeId> = others(*device).into_iter().filter(|node| *node != 3).take(2).collect();
            assert_eq!(holders(*device), expected);
            replaced += usize::from(others(*device)[..2].contains(&3));
        }
        assert!(replaced > 0, "some device had node 3 among its first successors");
    }

    #[test]
    fn a_failing_peer_is_skipped_for_a_doubling_cooldown_until_it_answers_again() {
        let breaker = Breaker::new(Duration::from_secs(1));
        assert!(!breaker.open(), "a new peer is tried");
        breaker.record(false);
        assert!(breaker.open(), "skipped right after a failure");
        let cooldowns: Vec<Duration> = (0..4)
            .map(|_| {
                breaker.record(false);
                breaker.lock().cooldown
            })
            .collect();
        let ms = |ms| Duration::from_millis(ms);
        assert_eq!(cooldowns, [ms(500), ms(1000), ms(1000), ms(1000)], "doubling, up to the replication timeout");
        breaker.record(true);
        assert!(!breaker.open(), "an answer closes it at once");
        breaker.record(false);
        assert_eq!(breaker.lock().cooldown, FIRST_COOLDOWN, "and the next failure starts over");
    }
}
