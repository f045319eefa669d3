//! Copies of stored notifications on other nodes, so that a notification a gateway was told is stored
//! survives the loss of its owner.
//!
//! The owner of a device writes each notification it stores to the device's next R-1 distinct ring
//! successors (R from the Raft state) before the gateway hears 200; if a successor does not answer, the
//! next candidate on the ring takes its place. Acks travel the same way, later and unawaited. Each peer
//! gets one batching task, so concurrent pushes share RPCs the way they share the store's group commits.
//!
//! `rebalance` moves copies when the ring changes: every node sends its queued notifications to the
//! devices' new candidates that did not hold them before, and drops the queues of devices it is no longer a
//! candidate for once the new holders have them. Puts are idempotent by (device, apns-id), so sending a
//! copy twice is harmless; at worst a device sees a redelivery, which its client drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_proto::cluster::{FetchQueueRequest, Notification, QueueKey, ReplicateRequest};
use futures_util::StreamExt;
use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use crate::ids::DeviceId;
use crate::peer::Peers;
use crate::raft::state::NodeId;
use crate::ring::Ring;
use crate::store::Store;
use crate::view::LocalView;

/// Most operations one Replicate RPC carries.
const MAX_BATCH: usize = 512;

enum PeerOp {
    Put(Box<Notification>, oneshot::Sender<bool>),
    Remove(QueueKey),
}

pub struct Replicator {
    pub id: NodeId,
    peers: Arc<Peers>,
    view: Arc<LocalView>,
    /// One batching task per peer address.
    links: Mutex<HashMap<String, mpsc::Sender<PeerOp>>>,
    /// How long a put waits for a peer before the next candidate is tried.
    timeout: Duration,
}

impl Replicator {
    pub fn new(id: NodeId, peers: Arc<Peers>, view: Arc<LocalView>, timeout: Duration) -> Self {
        Replicator { id, peers, view, links: Mutex::new(HashMap::new()), timeout }
    }

    fn link(&self, addr: &str) -> mpsc::Sender<PeerOp> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(link) = links.get(addr).filter(|l| !l.is_closed()) {
            return link.clone();
        }
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        tokio::spawn(send_batches(self.id, addr.to_string(), self.peers.clone(), rx, self.timeout));
        links.insert(addr.to_string(), tx.clone());
        tx
    }

    fn addr_of(&self, node: NodeId) -> Option<String> {
        self.view.get().state.members.get(&node).map(|m| m.cluster_addr.clone())
    }

    /// Sends one copy to `node`; `true` once it is durably stored there.
    pub async fn put_to(&self, node: NodeId, notification: Notification) -> bool {
        let Some(addr) = self.addr_of(node) else { return false };
        let (reply, answer) = oneshot::channel();
        if self.link(&addr).send(PeerOp::Put(Box::new(notification), reply)).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(self.timeout * 2, answer).await, Ok(Ok(true)))
    }

    /// Copies a notification this node stored to the device's successors. Says how many copies exist now,
    /// this node's included, and how many the replication factor asks for with the members active now (R,
    /// or all of them when fewer than R are active).
    pub async fn put(&self, device: DeviceId, notification: &Notification) -> Copies {
        let view = self.view.get();
        let wanted = view.copies_wanted();
        let mut others = view.ring.candidates(device, usize::MAX).into_iter().filter(|id| *id != self.id);
        let mut made = 1;
        // The first successors in parallel; a failed one is replaced by the next candidate.
        let first: Vec<NodeId> = others.by_ref().take(wanted - 1).collect();
        let results = join_all(first.iter().map(|node| self.put_to(*node, notification.clone()))).await;
        made += results.iter().filter(|ok| **ok).count();
        for node in others {
            if made >= wanted {
                break;
            }
            if self.put_to(node, notification.clone()).await {
                made += 1;
            }
        }
        if made < wanted {
            metrics::counter!("courier_node_replication_degraded_total").increment(1);
        }
        Copies { made, wanted }
    }

    /// Tells the device's other candidates that `apns_id` was acked. Not awaited: a lost remove only
    /// means a redelivery the client drops.
    pub fn remove(&self, device: DeviceId, apns_id: &str) {
        let view = self.view.get();
        let holders = view.state.ring.replication_factor.max(1) as usize + 1;
        for node in view.ring.candidates(device, holders) {
            if node == self.id {
                continue;
            }
            if let Some(addr) = self.addr_of(node) {
                let key = QueueKey { device_id: device.to_bytes().to_vec(), apns_id: apns_id.to_string() };
                let _ = self.link(&addr).try_send(PeerOp::Remove(key));
            }
        }
    }

    /// Moves queued notifications after the ring changed from `before` to the current ring, many devices
    /// at a time.
    pub async fn rebalance(&self, store: &Store, before: &Ring) -> Result<RebalanceReport, crate::store::StoreError> {
        let view = self.view.get();
        let wanted = view.state.ring.replication_factor.max(1) as usize;
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

    /// Sends the device's queue to every node in `targets`; with `release`, drops the local copies once
    /// all of them have it.
    async fn hand_over(
        &self,
        store: &Store,
        device: DeviceId,
        targets: &[NodeId],
        release: bool,
    ) -> Result<RebalanceReport, crate::store::StoreError> {
        let queue = store.pending(device).await?;
        let mut complete = true;
        for target in targets {
            let sent = join_all(queue.iter().map(|n| self.put_to(*target, n.clone()))).await;
            complete &= sent.iter().all(|ok| *ok);
        }
        let mut report = RebalanceReport { moved: queue.len() * targets.len(), released: 0 };
        if release && complete {
            for n in &queue {
                store.remove(device, &n.apns_id).await?;
            }
            report.released = queue.len();
        }
        Ok(report)
    }
}

/// Devices whose queues move at the same time during a rebalance.
const REBALANCE_PARALLELISM: usize = 64;

impl Replicator {
    /// Merges into the local store whatever the device's other candidates hold for it; run by the owner
    /// when the device connects, before its queue is replayed. Unreachable candidates are skipped.
    pub async fn gather(&self, store: &Store, device: DeviceId) -> usize {
        let view = self.view.get();
        let holders = view.state.ring.replication_factor.max(1) as usize + 1;
        let others: Vec<String> = view
            .ring
            .candidates(device, holders)
            .into_iter()
            .filter(|id| *id != self.id)
            .filter_map(|id| view.state.members.get(&id).map(|m| m.cluster_addr.clone()))
            .collect();
        let fetched = join_all(others.iter().map(|addr| async move {
            let mut client = self.peers.client(addr).ok()?;
            let mut request = tonic::Request::new(FetchQueueRequest { device_id: device.to_bytes().to_vec() });
            request.set_timeout(self.timeout);
            let answer = tokio::time::timeout(self.timeout, client.fetch_queue(request)).await.ok()?.ok()?;
            Some(answer.into_inner().notifications)
        }))
        .await;
        let now_secs = crate::ids::unix_millis() / 1000;
        let mut added = 0;
        for n in fetched.into_iter().flatten().flatten() {
            if n.expiration > now_secs && matches!(store.insert(n).await, Ok(crate::store::Inserted::New)) {
                added += 1;
            }
        }
        if added > 0 {
            metrics::counter!("courier_node_queue_gathered_total").increment(added as u64);
        }
        added
    }

    /// Hands the queues of devices this node is not a candidate for (copies that arrived after the last
    /// rebalance) to their candidates, then drops them here.
    pub async fn sweep_orphans(&self, store: &Store) -> Result<usize, crate::store::StoreError> {
        let view = self.view.get();
        let wanted = view.state.ring.replication_factor.max(1) as usize;
        let mut released = 0;
        for device in store.devices().await? {
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

async fn send_batches(
    from: NodeId,
    addr: String,
    peers: Arc<Peers>,
    mut ops: mpsc::Receiver<PeerOp>,
    timeout: Duration,
) {
    while let Some(first) = ops.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut request = ReplicateRequest { from_node: from, puts: Vec::new(), removes: Vec::new() };
        let mut waiters = Vec::new();
        for op in batch {
            match op {
                PeerOp::Put(n, reply) => {
                    request.puts.push(*n);
                    waiters.push(reply);
                }
                PeerOp::Remove(key) => request.removes.push(key),
            }
        }
        let ok = match peers.client(&addr) {
            Ok(mut client) => {
                let mut call = tonic::Request::new(request);
                call.set_timeout(timeout);
                matches!(tokio::time::timeout(timeout, client.replicate(call)).await, Ok(Ok(_)))
            }
            Err(_) => false,
        };
        if !ok {
            metrics::counter!("courier_node_replication_failures_total").increment(1);
        }
        for waiter in waiters {
            let _ = waiter.send(ok);
        }
    }
}
