//! The node's side of the cluster gRPC API (mutual TLS, cluster CA): forwarding, Raft transport,
//! membership, admin and the cluster watch.
//!
//! `Forward` is served by `forward`, which streams each gateway's batches into `delivery`; `Replicate` and
//! `ReplicateStream` by `replicas`, which applies other nodes' batches through `delivery`. Everything else
//! hands off to `raft::control` or `raft::network`; this module only translates between protobuf and
//! those. Every RPC first asks `authz` whether the caller's certificate role may call it.

pub mod authz;
pub mod channels;
pub mod forward;
mod replicas;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use courier_proto::cluster::cluster_server::Cluster;
use courier_proto::cluster::{
    ChannelUpdate, ClusterView, DeviceQueue, FetchKeptRequest, FetchKeptResponse, FetchQueueRequest,
    FetchQueueResponse, FetchQueuesRequest, FetchQueuesResponse, ForwardBatch, ForwardResults, JoinRequest,
    JoinResponse, ListChannelsRequest, ListChannelsResponse, ListedChannel, ManageChannelRequest,
    ManageChannelResponse, NotificationStatusRequest, NotificationStatusResponse, ProbeRequest, ProbeResponse,
    ProposeRequest, ProposeResponse, RaftPayload, RemoveNodeRequest, ReplicateRequest, ReplicateResponse,
    StatusRequest, StatusResponse, WatchRequest,
};
use futures_util::Stream;
use tonic::{Request, Response, Status};

use self::authz::{Rpc, authorize};
use courier_core::protocol::WATCH_HEARTBEAT;
use courier_core::shutdown::CancellationToken;

use crate::delivery::Delivery;
use crate::ids::DeviceId;
use crate::pki::ClusterRole;
use crate::raft::control::Control;
use crate::raft::{Command, Epoch, network};
use crate::view::{EpochView, Fence};

pub struct ClusterService {
    pub delivery: Delivery,
    /// Broadcasts: this node's subscribers and kept broadcasts.
    pub broadcasts: crate::broadcast::Broadcasts,
    pub control: Arc<Control>,
    /// Ends watch streams at shutdown; the server's graceful drain would otherwise wait on them forever.
    pub shutdown: CancellationToken,
    /// How long a forwarded batch stamped with an epoch this node has not applied waits for it.
    pub epoch_wait: std::time::Duration,
    /// Whether webhook endpoints may be `http` or private addresses (`--webhooks-allow-private`).
    pub webhooks_allow_private: bool,
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))
}

impl ClusterService {
    /// An operator's change is served by the leader itself: a follower forwarding it would do so under its
    /// own node certificate, which may not make operator changes. A follower answers `FailedPrecondition`
    /// naming the leader's cluster address in the `courier-leader` metadata, and `courier ctl` asks there.
    async fn leader_only(&self) -> Result<(), Status> {
        let (leader, addr) = self.control.wait_for_leader().await?;
        if leader == self.control.id {
            return Ok(());
        }
        let mut status = Status::failed_precondition(format!(
            "node {} is not the Raft leader; ask node {leader} at {addr}",
            self.control.id
        ));
        if let Ok(value) = addr.parse() {
            status.metadata_mut().insert(LEADER_METADATA, value);
        }
        Err(status)
    }
}

impl ClusterService {
    /// This node's view when it is newer than the epoch another node stamped on a data-plane request
    /// (`LocalView::fence`); a request from an epoch this node does not reach within its epoch wait is
    /// refused as UNAVAILABLE.
    async fn newer_view(&self, epoch: u64) -> Result<Option<Arc<EpochView>>, Status> {
        newer_view(&self.delivery, self.epoch_wait, epoch).await
    }

    /// What serves `Replicate` and `ReplicateStream`.
    fn replicas(&self) -> replicas::Replicas {
        replicas::Replicas { delivery: self.delivery.clone(), epoch_wait: self.epoch_wait }
    }
}

/// `delivery`'s view when it is newer than the epoch another node stamped on a data-plane request
/// (`LocalView::fence`); a request from an epoch it does not reach within `epoch_wait` is refused as
/// UNAVAILABLE.
async fn newer_view(delivery: &Delivery, epoch_wait: Duration, epoch: u64) -> Result<Option<Arc<EpochView>>, Status> {
    match delivery.view().fence(Epoch(epoch), epoch_wait).await {
        Fence::Ahead => Err(Status::unavailable(format!(
            "node {} has not reached epoch {epoch}; try again once it has",
            delivery.view().id
        ))),
        Fence::Behind(view) => Ok(Some(view)),
        Fence::Current => Ok(None),
    }
}

/// Most devices one `FetchQueues` may ask for (an owner asks for up to `replication::GATHER_BATCH`).
const MAX_FETCHED_QUEUES: usize = 4096;

impl ClusterService {
    /// What this node holds for each of `devices`, for `caller` gathering them as their owner in `epoch`:
    /// a sender behind this node's view that no longer owns a device gets that device marked stale and
    /// nothing of its queue. Answers in the order asked, with this node's epoch.
    async fn fetch(
        &self,
        caller: ClusterRole,
        devices: Vec<DeviceId>,
        epoch: u64,
    ) -> Result<(Vec<DeviceQueue>, u64), Status> {
        let newer = self.newer_view(epoch).await?;
        let stale: Vec<bool> = devices
            .iter()
            .map(|device| match (&newer, caller) {
                (Some(view), ClusterRole::Node(sender)) => !view.owns(sender, *device),
                _ => false,
            })
            .collect();
        let owned = devices.iter().zip(&stale).filter(|(_, stale)| !**stale).map(|(device, _)| *device).collect();
        let mut queues =
            self.delivery.store().pending_many(owned).await.map_err(|e| Status::internal(e.to_string()))?.into_iter();
        let answers = stale
            .into_iter()
            .map(|stale| {
                if stale {
                    metrics::counter!("courier_node_queue_fetches_fenced_total").increment(1);
                    DeviceQueue { notifications: Vec::new(), stale: true }
                } else {
                    DeviceQueue { notifications: queues.next().unwrap_or_default(), stale: false }
                }
            })
            .collect();
        Ok((answers, self.delivery.view().get().state.epoch.0))
    }
}

/// The metadata key in which a follower names the leader's cluster API address.
pub const LEADER_METADATA: &str = "courier-leader";

#[tonic::async_trait]
impl Cluster for ClusterService {
    type ForwardStream = Pin<Box<dyn Stream<Item = Result<ForwardResults, Status>> + Send + 'static>>;

    async fn forward(
        &self,
        request: Request<tonic::Streaming<ForwardBatch>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        authorize(&request, Rpc::Forward)?;
        let batches = request.into_inner();
        let results = forward::serve(
            self.delivery.clone(),
            self.broadcasts.clone(),
            batches,
            self.epoch_wait,
            self.shutdown.clone(),
        );
        Ok(Response::new(Box::pin(results)))
    }

    async fn replicate(&self, request: Request<ReplicateRequest>) -> Result<Response<ReplicateResponse>, Status> {
        let caller = authorize(&request, Rpc::Replicate)?;
        Ok(Response::new(self.replicas().apply(Rpc::Replicate, caller, request.into_inner()).await?))
    }

    type ReplicateStreamStream = Pin<Box<dyn Stream<Item = Result<ReplicateResponse, Status>> + Send + 'static>>;

    async fn replicate_stream(
        &self,
        request: Request<tonic::Streaming<ReplicateRequest>>,
    ) -> Result<Response<Self::ReplicateStreamStream>, Status> {
        let caller = authorize(&request, Rpc::ReplicateStream)?;
        let answers = self.replicas().serve(caller, request.into_inner(), self.shutdown.clone());
        Ok(Response::new(Box::pin(answers)))
    }

    async fn fetch_queues(
        &self,
        request: Request<FetchQueuesRequest>,
    ) -> Result<Response<FetchQueuesResponse>, Status> {
        let caller = authorize(&request, Rpc::FetchQueues)?;
        let FetchQueuesRequest { device_ids, epoch } = request.into_inner();
        if device_ids.len() > MAX_FETCHED_QUEUES {
            return Err(Status::invalid_argument(format!("at most {MAX_FETCHED_QUEUES} devices per FetchQueues")));
        }
        let devices = device_ids
            .iter()
            .map(|id| DeviceId::from_slice(id))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Status::invalid_argument("a device id is 16 bytes"))?;
        let (queues, epoch) = self.fetch(caller, devices, epoch).await?;
        Ok(Response::new(FetchQueuesResponse { queues, epoch }))
    }

    async fn fetch_queue(&self, request: Request<FetchQueueRequest>) -> Result<Response<FetchQueueResponse>, Status> {
        let caller = authorize(&request, Rpc::FetchQueue)?;
        let device = DeviceId::from_slice(&request.get_ref().device_id)
            .ok_or_else(|| Status::invalid_argument("a device id is 16 bytes"))?;
        let (mut queues, epoch) = self.fetch(caller, vec![device], request.get_ref().epoch).await?;
        let DeviceQueue { notifications, stale } = queues.pop().unwrap_or_default();
        Ok(Response::new(FetchQueueResponse { notifications, epoch, stale }))
    }

    async fn raft_append(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let caller = authorize(&request, Rpc::RaftAppend)?;
        network::serve_append(&self.control.raft, &self.control.lease, request.get_ref(), caller)
            .await
            .map(Response::new)
    }

    async fn raft_vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let caller = authorize(&request, Rpc::RaftVote)?;
        network::serve_vote(&self.control.raft, request.get_ref(), caller).await.map(Response::new)
    }

    async fn raft_snapshot(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let caller = authorize(&request, Rpc::RaftSnapshot)?;
        network::serve_snapshot(&self.control.raft, &self.control.lease, request.get_ref(), caller)
            .await
            .map(Response::new)
    }

    async fn probe(&self, request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let caller = authorize(&request, Rpc::Probe)?;
        authz::check_node_claim(Rpc::Probe, caller, request.get_ref().from_node)?;
        Ok(Response::new(ProbeResponse { node_id: self.control.id }))
    }

    /// The joining id is not checked against a node caller's: a node that is not the leader forwards
    /// other nodes' joins under its own certificate.
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        authorize(&request, Rpc::Join)?;
        let request = request.into_inner();
        if request.cluster_addr.is_empty() || request.device_addr.is_empty() {
            return Err(Status::invalid_argument("a joining node must give its cluster and device addresses"));
        }
        Ok(Response::new(self.control.join(request).await?))
    }

    async fn propose(&self, request: Request<ProposeRequest>) -> Result<Response<ProposeResponse>, Status> {
        let caller = authorize(&request, Rpc::Propose)?;
        let command: Command = serde_json::from_slice(&request.get_ref().command_json)
            .map_err(|e| Status::invalid_argument(format!("command: {e}")))?;
        authz::check_command(caller, authz::Proposal::of(&command))?;
        // The state takes any well-formed URL; whether it may point inside the network is this node's
        // policy (every node checks it again whenever it connects).
        if let Command::SetWebhook { url, .. } = &command {
            courier_core::webhook::check_url(url, self.webhooks_allow_private).map_err(Status::invalid_argument)?;
        }
        if caller == ClusterRole::Admin {
            self.leader_only().await?;
        }
        tracing::info!(%command, "proposal received");
        let response = self.control.propose(command).await?;
        Ok(Response::new(ProposeResponse { response_json: json(&response)? }))
    }

    async fn remove_node(&self, request: Request<RemoveNodeRequest>) -> Result<Response<ProposeResponse>, Status> {
        authorize(&request, Rpc::RemoveNode)?;
        self.leader_only().await?;
        self.control.remove(request.get_ref().node_id).await?;
        let epoch = self.control.current().epoch;
        let response = crate::raft::CommandResponse::Applied { epoch };
        Ok(Response::new(ProposeResponse { response_json: json(&response)? }))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        authorize(&request, Rpc::Status)?;
        let devices = &request.get_ref().devices;
        if devices.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10000 devices per status request"));
        }
        Ok(Response::new(StatusResponse { json: json(&crate::raft::report::status(&self.control, devices))? }))
    }

    type WatchClusterStream = Pin<Box<dyn Stream<Item = Result<ClusterView, Status>> + Send + 'static>>;

    async fn watch_cluster(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchClusterStream>, Status> {
        authorize(&request, Rpc::WatchCluster)?;
        tracing::debug!(watcher = %request.get_ref().watcher, "cluster watch opened");
        let (views, stream) = tokio::sync::mpsc::channel(16);
        tokio::spawn(watch(self.control.clone(), views, self.shutdown.clone()));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(stream))))
    }

    async fn manage_channel(
        &self,
        request: Request<ManageChannelRequest>,
    ) -> Result<Response<ManageChannelResponse>, Status> {
        authorize(&request, Rpc::ManageChannel)?;
        let max_per_app = self.control.settings.max_channels_per_app;
        let command = channels::command(request.into_inner(), max_per_app, crate::ids::unix_millis())?;
        tracing::info!(%command, "channel change asked");
        let response = self.control.propose(command).await?;
        Ok(Response::new(channels::answer(response)?))
    }

    async fn fetch_kept(&self, request: Request<FetchKeptRequest>) -> Result<Response<FetchKeptResponse>, Status> {
        authorize(&request, Rpc::FetchKept)?;
        let kept = self.broadcasts.all_kept(crate::ids::unix_millis()).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(FetchKeptResponse { kept }))
    }

    async fn list_channels(
        &self,
        request: Request<ListChannelsRequest>,
    ) -> Result<Response<ListChannelsResponse>, Status> {
        authorize(&request, Rpc::ListChannels)?;
        let request = request.into_inner();
        let limit = match request.limit {
            0 => 1000,
            n => n.min(100_000) as usize,
        };
        let nonempty = |text: &str| (!text.is_empty()).then(|| text.to_string());
        let (app, team) = (nonempty(&request.app), nonempty(&request.team_id));
        let (records, more, version) = {
            let book = self.control.channels.read();
            let (records, more) = book.select(app.as_deref(), team.as_deref(), limit);
            (records.into_iter().cloned().collect::<Vec<_>>(), more, book.version())
        };
        let channels = records
            .into_iter()
            .map(|record| {
                let subscribers = self.broadcasts.subscribers(record.id) as u64;
                Ok(ListedChannel { record_json: json(&record)?, subscribers })
            })
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(ListChannelsResponse { channels, more, version }))
    }

    async fn notification_status(
        &self,
        request: Request<NotificationStatusRequest>,
    ) -> Result<Response<NotificationStatusResponse>, Status> {
        authorize(&request, Rpc::NotificationStatus)?;
        let request = request.into_inner();
        let device = crate::ids::DeviceId::from_slice(&request.device_id)
            .ok_or_else(|| Status::invalid_argument("device_id must be 16 bytes"))?;
        let status = self.delivery.status().get(device, &request.apns_id, crate::ids::unix_millis());
        Ok(Response::new(status))
    }
}

/// One `WatchCluster` stream until the watcher goes or the node stops: the state now and at every change,
/// the channel book whole and then its changes, and a heartbeat every `WATCH_HEARTBEAT` otherwise.
async fn watch(
    control: Arc<Control>,
    views: tokio::sync::mpsc::Sender<Result<ClusterView, Status>>,
    shutdown: CancellationToken,
) {
    let view = |state: Option<&crate::raft::ClusterState>, channels: Option<ChannelUpdate>| {
        // Watchers route pushes; none signs receipts, so webhook secrets stay on the nodes.
        let state_json = state.map(|state| json(&state.without_webhook_secrets())).transpose()?.unwrap_or_default();
        Ok(ClusterView {
            epoch: state.map_or_else(|| control.current().epoch, |state| state.epoch).0,
            leader_id: control.leader().unwrap_or(0),
            state_json,
            applied_index: control.applied_index(),
            lease_lost: !control.lease.held(),
            channels,
        })
    };
    let mut states = control.state.clone();
    let mut book = control.channels.watch();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + WATCH_HEARTBEAT, WATCH_HEARTBEAT);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first message is the state with the first part of the book.
    let state = states.borrow_and_update().clone();
    let mut pending: Vec<Result<ClusterView, Status>> = match channels::whole_book(&book) {
        Ok(updates) => {
            let mut updates = updates.into_iter();
            let mut out = vec![view(Some(&state), updates.next())];
            out.extend(updates.map(|update| view(None, Some(update))));
            out
        }
        Err(status) => vec![Err(status)],
    };
    loop {
        for message in pending.drain(..) {
            let failed = message.is_err();
            if views.send(message).await.is_err() || failed {
                return;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = views.closed() => return,
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
                let state = states.borrow_and_update().clone();
                pending.push(view(Some(&state), None));
            }
            event = book.events.recv() => {
                let update = match event {
                    Ok(event) => channels::change(&event),
                    // Too far behind to catch up change by change: the whole book again.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Ok(None),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                match update {
                    Ok(Some(update)) => pending.push(view(None, Some(update))),
                    Ok(None) => {
                        book = control.channels.watch();
                        match channels::whole_book(&book) {
                            Ok(updates) => pending.extend(updates.into_iter().map(|update| view(None, Some(update)))),
                            Err(status) => pending.push(Err(status)),
                        }
                    }
                    Err(status) => pending.push(Err(status)),
                }
            }
            _ = ticks.tick() => pending.push(view(None, None)),
        }
    }
}
