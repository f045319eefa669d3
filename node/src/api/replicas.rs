//! The node's side of `Replicate` and `ReplicateStream`: a batch of copies, deletes, subscription changes
//! and receipts another node sends as the devices' owner (`replication`), applied by `delivery`. The stream
//! carries the same batches one after another on one HTTP/2 stream per pair of nodes, each answered before
//! the sender sends the next; it spares each batch a call of its own (a new stream, its headers and
//! trailers, a task on this side), which was most of what a small batch cost.

use std::time::Duration;

use courier_core::protocol::MAX_FORWARD_BATCH;
use courier_core::shutdown::CancellationToken;
use courier_proto::cluster::{ReplicateRequest, ReplicateResponse};
use futures_util::Stream;
use tonic::Status;

use super::authz::{self, Rpc};
use crate::delivery::{Delivery, ReplicaError, ReplicaOps};
use crate::ids::DeviceId;
use crate::pki::ClusterRole;

pub struct Replicas {
    pub delivery: Delivery,
    /// How long a batch stamped with an epoch this node has not applied waits for it.
    pub epoch_wait: Duration,
}

impl Replicas {
    /// Applies one batch from `caller`, which must be the node it names. Copies of notifications for
    /// devices this node's newer view no longer gives the sender are refused, by index.
    pub async fn apply(
        &self,
        rpc: Rpc,
        caller: ClusterRole,
        request: ReplicateRequest,
    ) -> Result<ReplicateResponse, Status> {
        authz::check_node_claim(rpc, caller, request.from_node)?;
        if request.puts.len() + request.removes.len() + request.subscriptions.len() > 4 * MAX_FORWARD_BATCH {
            return Err(Status::invalid_argument("replication batch too large"));
        }
        let (puts, refused) = match super::newer_view(&self.delivery, self.epoch_wait, request.epoch).await? {
            None => (request.puts, Vec::new()),
            Some(view) => {
                let mut puts = Vec::with_capacity(request.puts.len());
                let mut refused = Vec::new();
                for (index, put) in request.puts.into_iter().enumerate() {
                    match DeviceId::from_slice(&put.device_id) {
                        Some(device) if !view.owns(request.from_node, device) => refused.push(index as u32),
                        _ => puts.push(put),
                    }
                }
                if !refused.is_empty() {
                    metrics::counter!("courier_node_replicas_fenced_total").increment(refused.len() as u64);
                }
                (puts, refused)
            }
        };
        let applied = self
            .delivery
            .apply_replica(ReplicaOps {
                from: request.from_node,
                puts,
                removes: request.removes,
                subscriptions: request.subscriptions,
                receipts: request.receipts,
                released: request.released_receipts,
                unsaved_copies: request.unsaved_copies,
                released_copies: request.released_copies,
            })
            .await
            .map_err(|e| match e {
                ReplicaError::BadDeviceId | ReplicaError::BadChannelId | ReplicaError::BadReceipt => {
                    Status::invalid_argument(e.to_string())
                }
                ReplicaError::Store(e) => Status::internal(e.to_string()),
            })?;
        let epoch = self.delivery.view().get().state.epoch.0;
        Ok(ReplicateResponse { applied: applied as u32, epoch, refused })
    }

    /// Answers `caller`'s batches in order, one at a time, until it ends its stream, a batch fails (the
    /// error ends the stream: the sender opens another) or the node stops.
    pub fn serve(
        self,
        caller: ClusterRole,
        requests: tonic::Streaming<ReplicateRequest>,
        shutdown: CancellationToken,
    ) -> impl Stream<Item = Result<ReplicateResponse, Status>> + Send + 'static {
        futures_util::stream::unfold(Some((self, requests)), move |state| {
            let shutdown = shutdown.clone();
            async move {
                let (replicas, mut requests) = state?;
                let request = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    next = requests.message() => match next {
                        Ok(Some(request)) => request,
                        Ok(None) => return None,
                        Err(status) => return Some((Err(status), None)),
                    },
                };
                match replicas.apply(Rpc::ReplicateStream, caller, request).await {
                    Ok(answer) => Some((Ok(answer), Some((replicas, requests)))),
                    Err(status) => Some((Err(status), None)),
                }
            }
        })
    }
}
