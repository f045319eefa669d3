//! Forwarding accepted notifications to the node that owns their device, over the cluster gRPC API.
//!
//! The owner comes from the ring of the gateway's latest view (see `watch`). Each node address gets one
//! long-lived `Forward` stream, owned by a task: pushes for that node queue up for it, and it sends
//! whatever waits as one batch stamped with the epoch of the gateway's view, then hands each push the
//! node's answer to it (matched by id) with the epoch the node had applied. If the stream breaks, every
//! push it had not answered fails and the next push opens a new stream. Channels come from `Peers`: every
//! stream is one more HTTP/2 stream on a mutual-TLS connection that already exists.
//!
//! When the owner is unreachable, or says it does not own the device, the push is retried on whoever owns
//! it in a newer view (after NOT_OWNER, once the gateway's view reaches the epoch the node answered with),
//! until the request's deadline; only then does the provider hear 503. Once the gateway is shutting down it
//! stops retrying and answers at once, so that draining is not held up. `status` asks the owner for a
//! notification's delivery status the same way, with a unary call.
//!
//! A push answered DELIVERED with the receipt's time leaves a copy of its receipt here (`receipts`); each
//! answer tells the copies which of them the node no longer needs, and `keep_receipts_safe` hands the
//! copies of a node that restarted or left the view to the devices' owners, as `Forward` items of their
//! own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_core::ids::DeviceId;
use courier_core::peer::Peers;
use courier_core::state::{Epoch, MemberState, NodeId};
use courier_proto::cluster::{
    DeliverOutcome, DeliverResult, ForwardBatch, ForwardItem, ForwardResult, ForwardResults, HeldReceipt,
    ManageChannelRequest, ManageChannelResponse, Notification, NotificationStatusRequest, NotificationStatusResponse,
    RefusalReason,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::Streaming;

use courier_core::shutdown::CancellationToken;

use crate::http::apns::Reason;
use crate::receipts::{Held, HeldReceipts, MAX_HELD_PER_NODE};
use crate::watch::ViewReceiver;

/// How the owner node disposed of one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forwarded {
    /// Stored, delivered, sent or (expiration 0, device away) discarded: the provider hears 200 in each case.
    Accepted(DeliverOutcome),
    /// The node refused it for this reason and, for `Unregistered` and `ClonedIdentity`, the time (UNIX ms).
    Rejected(RefusalReason, u64),
    /// No owner could take it before the deadline; the provider should retry.
    Unavailable(String),
    /// The gateway began shutting down while the owner was unreachable.
    ShuttingDown,
}

/// `request` carrying the time left until `deadline` (at least 1 ms) as its gRPC timeout, and that time,
/// to bound the wait on the caller's side too.
fn until<T>(deadline: Instant, request: T) -> (tonic::Request<T>, Duration) {
    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let mut request = tonic::Request::new(request);
    request.set_timeout(remaining);
    (request, remaining)
}

/// What came of asking the cluster to change a channel.
#[derive(Debug)]
pub enum ChannelAnswer {
    /// The node's answer, and whether an earlier attempt may have been applied without its answer arriving.
    Answered(ManageChannelResponse, bool),
    /// The node refused the request as malformed (a bug in the gateway, or a limit it does not know).
    Invalid(String),
    /// No node answered before the deadline.
    Unavailable(String),
    /// The gateway began shutting down before a node answered.
    ShuttingDown,
}

/// What came of a broadcast.
#[derive(Debug)]
pub enum Broadcasted {
    /// Every member of the view took it; handed to this many linked subscribers in all.
    Done { subscribers: u64 },
    /// A member kept refusing it until the deadline (it has no such channel, or could not keep it).
    Refused(RefusalReason, String),
    /// A member could not be reached before the deadline.
    Unavailable(String),
    /// The gateway began shutting down.
    ShuttingDown,
}

/// The APNs reason a provider hears for a node's refusal: the one place the two vocabularies meet.
/// `NotOwner`, `EpochAhead`, `TooFewCopies` and `NoLease` are retried (on the right owner) and only reach here if that
/// never worked before the deadline.
pub fn apns_reason(refusal: RefusalReason) -> Reason {
    match refusal {
        RefusalReason::BadDeviceId => Reason::BadDeviceToken,
        RefusalReason::Unregistered => Reason::Unregistered,
        RefusalReason::ClonedIdentity => Reason::ClonedIdentity,
        RefusalReason::UnknownChannel => Reason::ChannelNotRegistered,
        RefusalReason::NotOwner | RefusalReason::EpochAhead | RefusalReason::TooFewCopies | RefusalReason::NoLease => {
            Reason::ServiceUnavailable
        }
        RefusalReason::StoreFailed | RefusalReason::Unspecified => Reason::InternalServerError,
    }
}

/// The gateway's way to the cluster.
#[derive(Clone)]
pub struct NodeRouter {
    pub peers: Arc<Peers>,
    pub view: ViewReceiver,
    pub timeout: Duration,
    /// Becomes true when the gateway shuts down; retries stop then.
    pub shutdown: CancellationToken,
    /// The task owning the `Forward` stream to each node address, started on the first push there or when
    /// the view names the node. The tasks end when the last router is dropped.
    streams: Arc<Mutex<HashMap<String, StreamTask>>>,
    /// Copies of the receipts owners kept unsaved for pushes this gateway forwarded (`receipts`).
    held: Arc<HeldReceipts>,
}

/// How routers reach the task of one node's `Forward` stream.
#[derive(Clone)]
struct StreamTask {
    pushes: mpsc::Sender<Pending>,
    /// Asks the task to open its stream now if none is open, rather than at the next push.
    open_asked: Arc<tokio::sync::Notify>,
}

impl StreamTask {
    fn open_now(&self) {
        self.open_asked.notify_one();
    }
}

/// Receipt copies handed over at once.
const HANDOVER_PARALLELISM: usize = 256;

/// Pause between attempts when no newer view has arrived.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Most notifications in one batch on a `Forward` stream.
const MAX_BATCH: usize = 512;

// A batch the node would refuse would end the stream.
const _: () = assert!(MAX_BATCH <= courier_core::protocol::MAX_FORWARD_BATCH);

/// Pushes sent on one stream and not answered yet beyond which no more are sent: the node's own bound, so
/// the gateway stops sending where the node would stop reading.
const MAX_UNANSWERED: usize = courier_core::protocol::MAX_UNANSWERED;

/// Pushes queued for a stream's task; beyond it callers wait to queue theirs.
const QUEUED: usize = MAX_BATCH * 8;

/// What one item of a `Forward` batch carries.
enum Item {
    Push(Notification),
    /// A receipt copy for its device's owner to take over (`receipts`).
    Receipt(HeldReceipt),
}

/// An item waiting for a stream's task to send it, and where its answer goes.
struct Pending {
    item: Item,
    answer: oneshot::Sender<Result<Answer, String>>,
}

/// The node's answer to one item, the epoch it had applied when it answered, and when its process started.
struct Answer {
    result: DeliverResult,
    epoch: Epoch,
    started_ms: u64,
}

/// The answer's part a push needs beyond its outcome.
struct Answered {
    epoch: Epoch,
    /// For a push answered DELIVERED whose receipt the owner kept unsaved for this gateway to copy: the
    /// receipt's time and the owner process's start.
    kept: Option<(u64, u64)>,
}

impl NodeRouter {
    /// A router, and where the receipt copies it must hand over arrive (for `keep_receipts_safe`).
    pub fn new(
        peers: Arc<Peers>,
        view: ViewReceiver,
        timeout: Duration,
        shutdown: CancellationToken,
    ) -> (Self, mpsc::UnboundedReceiver<Vec<Held>>) {
        let (held, handed) = HeldReceipts::new(MAX_HELD_PER_NODE);
        let router = NodeRouter { peers, view, timeout, shutdown, streams: Arc::default(), held: Arc::new(held) };
        (router, handed)
    }

    /// The receipt copies this gateway keeps.
    pub fn held_receipts(&self) -> Arc<HeldReceipts> {
        self.held.clone()
    }

    /// Hands one notification to its owner, retrying across owners until the configured timeout.
    pub async fn deliver(&self, notification: Notification) -> Forwarded {
        let deadline = Instant::now() + self.timeout;
        let Some(device) = DeviceId::from_slice(&notification.device_id) else {
            return Forwarded::Rejected(RefusalReason::BadDeviceId, 0);
        };
        let mut view = self.view.clone();
        let mut attempts = 0u32;
        loop {
            let (routed_by, target) = {
                let current = view.borrow_and_update();
                let current = current.as_ref();
                let owner = current.and_then(|v| v.owner(device).map(|(_, addr)| addr.to_string()));
                (current.map_or(Epoch::default(), |v| v.epoch), owner)
            };
            // After NOT_OWNER from a node ahead of this view: the epoch to wait for before retrying.
            let mut catch_up = None;
            let failure = match target {
                None => "no active member owns the device yet".to_string(),
                Some(addr) => match self.try_deliver_while_owner(device, &addr, notification.clone(), deadline).await {
                    Ok((Forwarded::Rejected(RefusalReason::NotOwner, _), Answered { epoch, .. })) => {
                        catch_up = Some(epoch).filter(|epoch| *epoch > routed_by);
                        format!("{addr} does not own it at epoch {}", epoch.0)
                    }
                    Ok((Forwarded::Rejected(RefusalReason::EpochAhead, _), Answered { epoch, .. })) => {
                        format!("{addr} did not reach epoch {} (it is at {})", routed_by.0, epoch.0)
                    }
                    Ok((Forwarded::Rejected(RefusalReason::TooFewCopies, _), _)) => {
                        format!("{addr} could not make the replication factor's copies")
                    }
                    Ok((Forwarded::Rejected(RefusalReason::NoLease, _), Answered { epoch, .. })) => {
                        format!("{addr} has lost touch with the cluster (at epoch {})", epoch.0)
                    }
                    Ok((done, Answered { kept, .. })) => {
                        if let Some((at_ms, started_ms)) = kept {
                            self.held.keep(&addr, Held::of(device, &notification, at_ms, started_ms));
                        }
                        return done;
                    }
                    Err(failure) => format!("{addr}: {failure}"),
                },
            };
            attempts += 1;
            if Instant::now() >= deadline {
                return Forwarded::Unavailable(format!("{failure} (after {attempts} attempts)"));
            }
            if !self.pause_before_retry(&mut view, deadline, catch_up).await {
                return Forwarded::ShuttingDown;
            }
        }
    }

    /// One attempt on `addr`, abandoned if a newer view gives the device to another node first: a node
    /// that hangs (paused, or cut off) must not hold a push until its deadline once the cluster has moved
    /// on. Abandoning is safe: the retry goes to the new owner, the old one refuses the push if it wakes
    /// (it no longer owns the device, or has no lease), and a copy it had already taken is one the device
    /// drops by apns-id.
    async fn try_deliver_while_owner(
        &self,
        device: DeviceId,
        addr: &str,
        notification: Notification,
        deadline: Instant,
    ) -> Result<(Forwarded, Answered), String> {
        let mut view = self.view.clone();
        let moved = view.wait_for(|v| v.as_ref().and_then(|v| v.owner(device)).is_none_or(|(_, owner)| owner != addr));
        tokio::select! {
            answer = self.try_deliver(addr, notification, deadline) => answer,
            Ok(_) = moved => Err("a newer view gives the device to another node".to_string()),
        }
    }

    /// Waits before the next attempt: for a view of at least `catch_up` if given (within the deadline),
    /// else for a newer view or a short pause. False when the gateway is shutting down.
    async fn pause_before_retry(&self, view: &mut ViewReceiver, deadline: Instant, catch_up: Option<Epoch>) -> bool {
        if self.shutdown.is_cancelled() {
            return false;
        }
        metrics::counter!("courier_gateway_forward_retries_total").increment(1);
        let stop = self.shutdown.clone().cancelled_owned();
        match catch_up {
            Some(epoch) => {
                let caught_up = view.wait_for(|v| v.as_ref().is_some_and(|v| v.epoch >= epoch));
                tokio::select! {
                    _ = tokio::time::timeout_at(deadline, caught_up) => true,
                    _ = stop => false,
                }
            }
            None => {
                // A newer view usually explains the failure; otherwise try again shortly.
                let wait = RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now()));
                tokio::select! {
                    _ = tokio::time::timeout(wait, view.changed()) => true,
                    _ = stop => false,
                }
            }
        }
    }

    /// Asks the owner of `device` where notification `apns_id` is. `Err` when no owner answered before
    /// the deadline (or the gateway is shutting down).
    pub async fn status(&self, device: DeviceId, apns_id: &str) -> Result<NotificationStatusResponse, String> {
        let deadline = Instant::now() + self.timeout;
        let mut view = self.view.clone();
        loop {
            let target = view.borrow_and_update().as_ref().and_then(|v| v.owner(device).map(|(_, a)| a.to_string()));
            let failure = match target {
                None => "no active member owns the device yet".to_string(),
                Some(addr) => {
                    let request = NotificationStatusRequest {
                        device_id: device.to_bytes().to_vec(),
                        apns_id: apns_id.to_string(),
                    };
                    match self.try_status(&addr, request, deadline).await {
                        Ok(status) => return Ok(status),
                        Err(failure) => format!("{addr}: {failure}"),
                    }
                }
            };
            if Instant::now() >= deadline || !self.pause_before_retry(&mut view, deadline, None).await {
                return Err(failure);
            }
        }
    }

    async fn try_status(
        &self,
        addr: &str,
        request: NotificationStatusRequest,
        deadline: Instant,
    ) -> Result<NotificationStatusResponse, String> {
        let mut client = self.peers.client(addr).map_err(|e| e.to_string())?;
        let (request, remaining) = until(deadline, request);
        match tokio::time::timeout(remaining, client.notification_status(request)).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(status)) => Err(status.to_string()),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }

    /// Asks the cluster to create or delete a channel: the leader of the gateway's view if it names one,
    /// else any active member (which forwards to the leader), retrying until the deadline. Also says whether
    /// an attempt before the answered one may have been applied (its answer was lost), which turns a
    /// create's `EXISTS` or a delete's `UNKNOWN_CHANNEL` into the earlier attempt's success.
    pub async fn manage_channel(&self, request: ManageChannelRequest) -> ChannelAnswer {
        let deadline = Instant::now() + self.timeout;
        let mut view = self.view.clone();
        let mut retried = false;
        loop {
            let target = view.borrow_and_update().as_ref().and_then(|v| {
                let leader = v.members.get(&v.leader).filter(|m| m.state == MemberState::Active);
                let any = v.members.values().find(|m| m.state == MemberState::Active);
                leader.or(any).map(|m| m.cluster_addr.clone())
            });
            let failure = match target {
                None => "no active member to ask".to_string(),
                Some(addr) => {
                    let mut client = match self.peers.client(&addr) {
                        Ok(client) => client,
                        Err(error) => return ChannelAnswer::Unavailable(error.to_string()),
                    };
                    let (call, remaining) = until(deadline, request.clone());
                    match tokio::time::timeout(remaining, client.manage_channel(call)).await {
                        Ok(Ok(response)) => return ChannelAnswer::Answered(response.into_inner(), retried),
                        Ok(Err(status))
                            if matches!(
                                status.code(),
                                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                            ) =>
                        {
                            return ChannelAnswer::Invalid(status.message().to_string());
                        }
                        Ok(Err(status)) => format!("{addr}: {status}"),
                        Err(_) => format!("{addr}: timed out"),
                    }
                }
            };
            retried = true;
            if Instant::now() >= deadline || !self.pause_before_retry(&mut view, deadline, None).await {
                return if self.shutdown.is_cancelled() {
                    ChannelAnswer::ShuttingDown
                } else {
                    ChannelAnswer::Unavailable(failure)
                };
            }
        }
    }

    /// Hands a broadcast to every active (and draining) member of the gateway's view, each once, in the
    /// members' `Forward` streams (so broadcasts are batched and epoch-stamped like pushes), retrying those
    /// that fail until the deadline. A member that answers from a newer epoch may know members this view
    /// does not: the gateway catches up to it and sends to any it has not reached yet.
    pub async fn broadcast(&self, notification: Notification) -> Broadcasted {
        let deadline = Instant::now() + self.timeout;
        let mut view = self.view.clone();
        let mut reached: HashSet<NodeId> = HashSet::new();
        let mut subscribers = 0u64;
        loop {
            let (epoch, targets) = {
                let current = view.borrow_and_update();
                let Some(current) = current.as_ref() else {
                    return Broadcasted::Unavailable("no view of the cluster yet".into());
                };
                let targets: Vec<(NodeId, String)> = current
                    .serving()
                    .filter(|m| !reached.contains(&m.id))
                    .map(|m| (m.id, m.cluster_addr.clone()))
                    .collect();
                (current.epoch, targets)
            };
            if targets.is_empty() {
                return Broadcasted::Done { subscribers };
            }
            let apns_id = &notification.apns_id;
            let calls = targets
                .iter()
                .map(|(_, addr)| self.forward_once(addr, Item::Push(notification.clone()), apns_id, deadline));
            let answers = futures_util::future::join_all(calls).await;
            let mut newest = epoch;
            let mut failure = None;
            for ((id, addr), answer) in targets.into_iter().zip(answers) {
                match answer {
                    Ok(Answer { result, epoch: theirs, .. }) => {
                        newest = newest.max(theirs);
                        match (result.outcome(), result.reason()) {
                            (DeliverOutcome::Sent | DeliverOutcome::Stored, _) => {
                                reached.insert(id);
                                subscribers += result.subscribers;
                            }
                            // Behind this view: retried once the node has caught up, or on a newer view.
                            (DeliverOutcome::Rejected, RefusalReason::EpochAhead) => {
                                failure = Some(Broadcasted::Unavailable(format!("node {id} at {addr} is behind")));
                            }
                            (_, reason) => failure = Some(Broadcasted::Refused(reason, format!("node {id} at {addr}"))),
                        }
                    }
                    Err(why) => failure = Some(Broadcasted::Unavailable(format!("node {id} at {addr}: {why}"))),
                }
            }
            let catch_up = (newest > epoch).then_some(newest);
            if failure.is_none() && catch_up.is_none() {
                // Every target took it; the next round finds none left.
                continue;
            }
            if Instant::now() >= deadline {
                return failure.unwrap_or_else(|| Broadcasted::Unavailable("the view did not catch up in time".into()));
            }
            if !self.pause_before_retry(&mut view, deadline, catch_up).await {
                return Broadcasted::ShuttingDown;
            }
        }
    }

    /// Keeps a `Forward` stream open to every active or draining member the view names, until shutdown, so
    /// that the first push or broadcast to a node does not wait for a connection, a mutual-TLS handshake
    /// and a new stream. That wait was worst where it hurt most: a broadcast reaches the nodes at once, and
    /// the fan-out on the first nodes to have it took the CPU the others needed to open their streams.
    /// A stream that breaks is opened again by the next push to its node, or when the view changes.
    pub async fn open_streams_ahead(self) {
        let mut view = self.view.clone();
        loop {
            let members: Vec<String> = view
                .borrow_and_update()
                .as_ref()
                .map(|v| v.serving().map(|m| m.cluster_addr.clone()).collect())
                .unwrap_or_default();
            for addr in members {
                self.stream(&addr).open_now();
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = view.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Hands receipt copies to their devices' owners until shutdown: those of a node that restarted (found
    /// in its answers, arriving on `handed`) and those of a node that left the active members (found here,
    /// at each new view).
    pub async fn keep_receipts_safe(self, mut handed: mpsc::UnboundedReceiver<Vec<Held>>) {
        let mut view = self.view.clone();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                copies = handed.recv() => match copies {
                    Some(copies) => {
                        tokio::spawn(self.clone().hand_over(copies));
                    }
                    None => return,
                },
                changed = view.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let active: Option<HashSet<String>> =
                        view.borrow_and_update().as_ref().map(|v| v.serving().map(|m| m.cluster_addr.clone()).collect());
                    if let Some(active) = active {
                        self.held.keep_only(&active);
                    }
                }
            }
        }
    }

    /// Hands each copy to its device's owner, many at once, each retried like a push until the deadline.
    async fn hand_over(self, copies: Vec<Held>) {
        use futures_util::StreamExt;
        tracing::info!(copies = copies.len(), "handing receipt copies to their devices' owners");
        futures_util::stream::iter(copies)
            .for_each_concurrent(HANDOVER_PARALLELISM, |held| self.hand_over_one(held))
            .await;
    }

    async fn hand_over_one(&self, held: Held) {
        let deadline = Instant::now() + self.timeout;
        let receipt = held.receipt();
        let apns_id = held.apns_id();
        let mut view = self.view.clone();
        loop {
            let target =
                view.borrow_and_update().as_ref().and_then(|v| v.owner(held.device).map(|(_, a)| a.to_string()));
            let failure = match target {
                None => "no active member owns the device".to_string(),
                Some(addr) => match self.forward_once(&addr, Item::Receipt(receipt.clone()), apns_id, deadline).await {
                    Ok(answer) if answer.result.outcome() == DeliverOutcome::Stored => {
                        metrics::counter!("courier_gateway_receipts_handed_over_total").increment(1);
                        return;
                    }
                    Ok(answer) => format!("{addr} refused it ({:?})", answer.result.reason()),
                    Err(failure) => format!("{addr}: {failure}"),
                },
            };
            if Instant::now() >= deadline || !self.pause_before_retry(&mut view, deadline, None).await {
                metrics::counter!("courier_gateway_receipts_dropped_total", "reason" => "not_handed_over").increment(1);
                tracing::warn!(%failure, apns_id, "a receipt copy could not be handed over");
                return;
            }
        }
    }

    /// The queue of the stream task for `addr`, started if there is none.
    fn stream(&self, addr: &str) -> StreamTask {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(task) = streams.get(addr).filter(|t| !t.pushes.is_closed()) {
            return task.clone();
        }
        let (queue, pushes) = mpsc::channel(QUEUED);
        let task = StreamTask { pushes: queue, open_asked: Arc::default() };
        let stream = ForwardStream {
            addr: addr.to_string(),
            peers: self.peers.clone(),
            view: self.view.clone(),
            open_timeout: self.timeout,
            open_asked: task.open_asked.clone(),
            held: self.held.clone(),
        };
        tokio::spawn(stream.run(pushes));
        streams.insert(addr.to_string(), task.clone());
        task
    }

    /// One attempt on the node at `addr`: its answer and the epoch it had applied when it gave it.
    async fn try_deliver(
        &self,
        addr: &str,
        notification: Notification,
        deadline: Instant,
    ) -> Result<(Forwarded, Answered), String> {
        let apns_id = notification.apns_id.clone();
        let Answer { result, epoch, started_ms } =
            self.forward_once(addr, Item::Push(notification), &apns_id, deadline).await?;
        let kept = (result.outcome == DeliverOutcome::Delivered as i32 && result.timestamp_ms > 0)
            .then_some((result.timestamp_ms, started_ms));
        let delivery = match DeliverOutcome::try_from(result.outcome) {
            Ok(
                outcome @ (DeliverOutcome::Stored
                | DeliverOutcome::Sent
                | DeliverOutcome::Discarded
                | DeliverOutcome::Delivered),
            ) => Forwarded::Accepted(outcome),
            Ok(DeliverOutcome::Rejected) => Forwarded::Rejected(
                RefusalReason::try_from(result.reason).unwrap_or(RefusalReason::Unspecified),
                result.timestamp_ms,
            ),
            Ok(DeliverOutcome::Unspecified) | Err(_) => {
                return Err(format!("the node answered with outcome {}", result.outcome));
            }
        };
        Ok((delivery, Answered { epoch, kept }))
    }

    /// Sends one item on `addr`'s `Forward` stream and waits (until `deadline`) for the node's answer to it,
    /// which must name `apns_id`.
    async fn forward_once(&self, addr: &str, item: Item, apns_id: &str, deadline: Instant) -> Result<Answer, String> {
        let (answer, answered) = oneshot::channel();
        let stream = self.stream(addr).pushes;
        let attempt = async move {
            if stream.send(Pending { item, answer }).await.is_err() {
                return Err("the stream's task has ended".to_string());
            }
            answered.await.map_err(|_| "the stream's task has ended".to_string())?
        };
        let answer = match tokio::time::timeout_at(deadline, attempt).await {
            Err(_) => return Err("timed out".into()),
            Ok(answer) => answer?,
        };
        if answer.result.apns_id != apns_id {
            return Err(format!("the node answered for apns-id {:?}", answer.result.apns_id));
        }
        Ok(answer)
    }
}

/// The task that owns the `Forward` stream to one node address.
struct ForwardStream {
    addr: String,
    peers: Arc<Peers>,
    /// Its epoch stamps each batch.
    view: ViewReceiver,
    /// How long the node may take to accept a new stream.
    open_timeout: Duration,
    /// Woken to open a stream with no push waiting (`StreamTask::open_now`).
    open_asked: Arc<tokio::sync::Notify>,
    /// Told what each answer says of the node's receipts.
    held: Arc<HeldReceipts>,
}

/// One open stream's state: what it has sent and not had answered.
struct OpenStream {
    addr: String,
    batches: mpsc::UnboundedSender<ForwardBatch>,
    waiting: HashMap<u64, oneshot::Sender<Result<Answer, String>>>,
    next_id: u64,
    held: Arc<HeldReceipts>,
}

impl ForwardStream {
    /// Opens a stream when a push waits or it is asked to and none is open, and serves it until it breaks;
    /// ends when every router is gone and what was sent is answered.
    async fn run(self, mut pushes: mpsc::Receiver<Pending>) {
        loop {
            let first = tokio::select! {
                biased;
                push = pushes.recv() => match push {
                    Some(push) => Some(push),
                    None => return,
                },
                _ = self.open_asked.notified() => None,
            };
            let (batches, outgoing) = mpsc::unbounded_channel();
            let mut open = OpenStream {
                addr: self.addr.clone(),
                batches,
                waiting: HashMap::new(),
                next_id: 0,
                held: self.held.clone(),
            };
            // Queued before the stream opens: the node answers the stream's headers without waiting for it.
            if let Some(first) = first {
                open.send(first, &mut pushes, &self.view);
            }
            let broke = match self.open(outgoing).await {
                Ok(results) => open.serve(results, &mut pushes, &self.view).await,
                Err(error) => Some(format!("opening the Forward stream: {error}")),
            };
            if let Some(reason) = broke {
                tracing::info!(addr = %self.addr, %reason, unanswered = open.waiting.len(), "Forward stream ended");
                for (_, waiter) in open.waiting.drain() {
                    let _ = waiter.send(Err(reason.clone()));
                }
            }
        }
    }

    async fn open(
        &self,
        mut outgoing: mpsc::UnboundedReceiver<ForwardBatch>,
    ) -> Result<Streaming<ForwardResults>, String> {
        let mut client = self.peers.client(&self.addr).map_err(|e| e.to_string())?;
        let batches = futures_util::stream::poll_fn(move |cx| outgoing.poll_recv(cx));
        match tokio::time::timeout(self.open_timeout, client.forward(batches)).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(status)) => Err(status.to_string()),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }
}

impl OpenStream {
    /// Sends `first` and whatever else is queued (up to a batch) as one batch.
    fn send(&mut self, first: Pending, pushes: &mut mpsc::Receiver<Pending>, view: &ViewReceiver) {
        let mut items = Vec::new();
        let mut next = Some(first);
        while let Some(Pending { item, answer }) = next {
            // A caller past its deadline no longer waits for the answer.
            if !answer.is_closed() {
                let id = self.next_id;
                self.next_id += 1;
                items.push(match item {
                    Item::Push(notification) => ForwardItem { id, notification: Some(notification), receipt: None },
                    Item::Receipt(receipt) => ForwardItem { id, notification: None, receipt: Some(receipt) },
                });
                self.waiting.insert(id, answer);
            }
            next = if items.len() < MAX_BATCH && self.waiting.len() < MAX_UNANSWERED {
                pushes.try_recv().ok()
            } else {
                None
            };
        }
        if items.is_empty() {
            return;
        }
        metrics::histogram!("courier_gateway_forward_batch_size").record(items.len() as f64);
        let epoch = view.borrow().as_ref().map_or(0, |v| v.epoch.0);
        // A stream that has ended drops the batch; `serve` learns it from the results side.
        let _ = self.batches.send(ForwardBatch { epoch, items, holds_receipts: true });
    }

    /// Sends batches and hands out answers until the stream breaks (the reason) or every router is gone and
    /// every push is answered (`None`).
    async fn serve(
        &mut self,
        mut results: Streaming<ForwardResults>,
        pushes: &mut mpsc::Receiver<Pending>,
        view: &ViewReceiver,
    ) -> Option<String> {
        let mut routers_gone = false;
        while !(routers_gone && self.waiting.is_empty()) {
            tokio::select! {
                biased;
                message = results.message() => match message {
                    Ok(Some(message)) => self.answer(message),
                    Ok(None) => return Some("the node ended the stream".into()),
                    Err(status) => return Some(status.to_string()),
                },
                push = pushes.recv(), if !routers_gone && self.waiting.len() < MAX_UNANSWERED => match push {
                    Some(first) => {
                        // Let the request tasks that are ready now queue their pushes too, so that a busy
                        // gateway sends batches rather than one push a message; an idle one loses nothing.
                        tokio::task::yield_now().await;
                        self.send(first, pushes, view)
                    }
                    None => routers_gone = true,
                },
            }
        }
        None
    }

    fn answer(&mut self, message: ForwardResults) {
        let epoch = Epoch(message.epoch);
        let started_ms = message.started_ms;
        // Before any waiter hears its answer, so that copies of a restarted node's earlier process are
        // told apart from the ones this answer makes.
        self.held.answered(&self.addr, started_ms, message.receipts_safe_before_ms);
        for ForwardResult { id, result } in message.results {
            let Some(waiter) = self.waiting.remove(&id) else {
                tracing::debug!(id, "a node answered a push this stream is not waiting for");
                continue;
            };
            let answer = result.map(|result| Answer { result, epoch, started_ms });
            let _ = waiter.send(answer.ok_or_else(|| "the node answered with no result".to_string()));
        }
    }
}
