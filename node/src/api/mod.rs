//! The node's side of the cluster gRPC API (mutual TLS, cluster CA).
//!
//! `Deliver` takes a batch and delivers its notifications concurrently, so they share the store's group
//! commits; results come back in request order.

use courier_proto::cluster::cluster_server::Cluster;
use courier_proto::cluster::{DeliverRequest, DeliverResponse};
use futures_util::future::join_all;
use tonic::{Request, Response, Status};

use crate::delivery::Delivery;

/// Largest batch one `Deliver` may carry.
pub const MAX_DELIVER_BATCH: usize = 1024;

pub struct ClusterService {
    pub delivery: Delivery,
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn deliver(&self, request: Request<DeliverRequest>) -> Result<Response<DeliverResponse>, Status> {
        let batch = request.into_inner().notifications;
        if batch.len() > MAX_DELIVER_BATCH {
            return Err(Status::invalid_argument(format!("at most {MAX_DELIVER_BATCH} notifications per Deliver")));
        }
        let results = join_all(batch.into_iter().map(|n| self.delivery.deliver(n))).await;
        Ok(Response::new(DeliverResponse { results }))
    }
}
