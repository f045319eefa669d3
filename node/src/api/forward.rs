//! The node's end of a gateway's `Forward` stream: batches of notifications in, their outcomes out.
//!
//! Each batch runs on a task of its own, its notifications delivered concurrently through `delivery`
//! (one may wait ~25 ms for a device's ack, so many must overlap); answers go back by item id as they
//! complete, whatever is ready coalesced into one `ForwardResults`, each stamped with the epoch this node
//! has applied then. A batch stamped with an epoch this node has not applied waits for it up to
//! `epoch_wait`, then its notifications are refused as EPOCH_AHEAD. Whether this node owns a device is
//! `delivery`'s question, not this module's. Items that are broadcasts (`channel_id` set) go to
//! `broadcast` instead, so broadcasts are batched and epoch-stamped like single pushes; items that carry a
//! receipt a gateway kept for a node that died are taken over (`Delivery::adopt_receipt`). Every answer
//! tells a gateway that keeps receipt copies which it may drop (`Delivery::receipts_safe`).
//!
//! The stream is bounded: at most `MAX_FORWARD_BATCH` items a batch (a larger batch ends the stream with
//! `InvalidArgument`), and no further batch is read while `MAX_UNANSWERED` items wait for their answers,
//! so a gateway faster than this node is slowed by HTTP/2 flow control rather than by this node's memory.
//! The stream ends when the gateway closes its side and every item is answered, or when the node shuts
//! down: it then reads no more batches and ends once what it has read is answered.

use std::time::Duration;

use courier_proto::cluster::{ForwardBatch, ForwardItem, ForwardResult, ForwardResults, RefusalReason};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use courier_core::protocol::{MAX_FORWARD_BATCH, MAX_UNANSWERED};
use courier_core::shutdown::CancellationToken;

use crate::broadcast::Broadcasts;
use crate::delivery::{Delivery, ReceiptCopies, refused};
use crate::raft::state::Epoch;

/// How long a batch stamped with an epoch this node has not applied waits for it (`--epoch-wait-ms`).
pub const DEFAULT_EPOCH_WAIT: Duration = Duration::from_secs(2);

/// Most answers in one `ForwardResults`, so that one message stays small whatever is ready.
const MAX_RESULTS_PER_MESSAGE: usize = 4096;

/// `ForwardResults` the stream holds for a gateway that reads slower than answers come.
const OUTBOX: usize = 16;

/// Serves one `Forward` stream; what the RPC returns as its response stream.
pub fn serve(
    delivery: Delivery,
    broadcasts: Broadcasts,
    batches: Streaming<ForwardBatch>,
    epoch_wait: Duration,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<ForwardResults, Status>> {
    let (out, results) = mpsc::channel(OUTBOX);
    tokio::spawn(run(Forwarding { delivery, broadcasts, epoch_wait, shutdown, out }, batches));
    ReceiverStream::new(results)
}

/// What the stream's task works with.
struct Forwarding {
    delivery: Delivery,
    /// Where items that are broadcasts (`channel_id` set) go.
    broadcasts: Broadcasts,
    epoch_wait: Duration,
    /// Stops reading batches; those read are still answered.
    shutdown: CancellationToken,
    out: mpsc::Sender<Result<ForwardResults, Status>>,
}

async fn run(stream: Forwarding, mut batches: Streaming<ForwardBatch>) {
    let _counted = courier_core::telemetry::GaugeHeld::new("courier_node_forward_streams");
    let (answer, mut answers) = mpsc::unbounded_channel();
    // Aborted with the stream: an item nobody will hear the answer to is the gateway's to retry.
    let mut running = JoinSet::new();
    let mut unanswered = 0usize;
    let mut reading = true;
    let mut ready = Vec::new();
    while reading || unanswered > 0 {
        tokio::select! {
            biased;
            _ = stream.shutdown.cancelled(), if reading => reading = false,
            received = answers.recv_many(&mut ready, MAX_RESULTS_PER_MESSAGE), if unanswered > 0 => {
                // Let deliveries that are finishing now add their answers to this message.
                tokio::task::yield_now().await;
                let mut received = received;
                while ready.len() < MAX_RESULTS_PER_MESSAGE && let Ok(more) = answers.try_recv() {
                    ready.push(more);
                    received += 1;
                }
                unanswered = unanswered.saturating_sub(received);
                let epoch = stream.delivery.view().get().state.epoch.0;
                let (receipts_safe_before_ms, started_ms) = stream.delivery.receipts_safe();
                let results = std::mem::take(&mut ready);
                let message = ForwardResults { epoch, results, receipts_safe_before_ms, started_ms };
                if stream.out.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            Some(finished) = running.join_next(), if !running.is_empty() => {
                if let Err(error) = finished {
                    tracing::error!(%error, "a forwarded batch's task failed");
                    let _ = stream.out.send(Err(Status::internal("a forwarded batch failed"))).await;
                    return;
                }
            }
            batch = batches.message(), if reading && unanswered < MAX_UNANSWERED => match batch {
                Ok(Some(batch)) => match stream.start(batch, &mut running, &answer) {
                    Ok(items) => unanswered += items,
                    Err(refusal) => {
                        let _ = stream.out.send(Err(refusal)).await;
                        return;
                    }
                },
                Ok(None) => reading = false,
                Err(status) => {
                    tracing::debug!(%status, "a gateway's Forward stream broke");
                    let _ = stream.out.send(Err(status)).await;
                    return;
                }
            },
        }
    }
}

impl Forwarding {
    /// Starts delivering `batch` on a task of its own; how many items it carries, or why it is refused.
    fn start(
        &self,
        batch: ForwardBatch,
        running: &mut JoinSet<()>,
        answer: &mpsc::UnboundedSender<ForwardResult>,
    ) -> Result<usize, Status> {
        let items = batch.items.len();
        metrics::counter!("courier_node_forward_batches_total").increment(1);
        metrics::histogram!("courier_node_forward_batch_size").record(items as f64);
        if items > MAX_FORWARD_BATCH {
            let refusal = format!("a Forward batch carries at most {MAX_FORWARD_BATCH} notifications, not {items}");
            return Err(Status::invalid_argument(refusal));
        }
        let (delivery, broadcasts) = (self.delivery.clone(), self.broadcasts.clone());
        let shutdown = self.shutdown.clone();
        running.spawn(deliver_batch(delivery, broadcasts, batch, self.epoch_wait, shutdown, answer.clone()));
        Ok(items)
    }
}

/// Delivers one batch's notifications concurrently, answering each as it completes; first waits for the
/// batch's epoch if this node has not applied it.
async fn deliver_batch(
    delivery: Delivery,
    broadcasts: Broadcasts,
    batch: ForwardBatch,
    epoch_wait: Duration,
    shutdown: CancellationToken,
    answer: mpsc::UnboundedSender<ForwardResult>,
) {
    let epoch = Epoch(batch.epoch);
    let caught_up = tokio::select! {
        reached = delivery.view().reached(epoch, epoch_wait) => reached,
        _ = shutdown.cancelled() => delivery.view().get().state.epoch >= epoch,
    };
    if !caught_up {
        for item in batch.items {
            let apns_id = item.notification.map(|n| n.apns_id).unwrap_or_default();
            let refusal = refused(&apns_id, RefusalReason::EpochAhead, 0);
            let _ = answer.send(ForwardResult { id: item.id, result: Some(refusal) });
        }
        return;
    }
    let copies = if batch.holds_receipts { ReceiptCopies::Sender } else { ReceiptCopies::Holders };
    let mut delivering: FuturesUnordered<_> = batch
        .items
        .into_iter()
        .map(|ForwardItem { id, notification, receipt }| {
            let (delivery, broadcasts) = (delivery.clone(), broadcasts.clone());
            // An item with neither a notification nor a receipt has no 16-byte device id, and is refused as
            // such.
            let notification = notification.unwrap_or_default();
            async move {
                let result = if let Some(receipt) = receipt {
                    delivery.adopt_receipt(receipt).await
                } else if notification.channel_id.is_empty() {
                    delivery.deliver(notification, copies).await
                } else {
                    crate::broadcast::deliver_forwarded(&broadcasts, notification).await
                };
                ForwardResult { id, result: Some(result) }
            }
        })
        .collect();
    while let Some(result) = delivering.next().await {
        let _ = answer.send(result);
    }
}
