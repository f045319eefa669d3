//! Forwarding accepted notifications to the node that owns their device, over the cluster gRPC API.
//!
//! The owner comes from the ring of the gateway's latest view (see `watch`). Channels are made once per
//! node and shared: every push is one more HTTP/2 stream on a mutual-TLS connection that already exists.
//! When the owner is unreachable, or says it no longer owns the device, the push is retried on whoever
//! owns it in the next view, until the request's deadline; only then does the provider hear 503. Once the
//! gateway is shutting down it stops retrying and answers at once, so that draining is not held up.
//! `status` asks the owner for a notification's delivery status the same way.

use std::sync::Arc;
use std::time::Duration;

use courier_node::ids::DeviceId;
use courier_node::peer::Peers;
use courier_proto::cluster::{
    DeliverOutcome, DeliverRequest, Notification, NotificationStatusRequest, NotificationStatusResponse, RefusalReason,
};
use tokio::time::Instant;

use crate::http::apns::Reason;

use crate::watch::ViewReceiver;

/// How the owner node disposed of one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Stored, sent or (expiration 0, device away) discarded: the provider hears 200 in all three cases.
    Accepted(DeliverOutcome),
    /// The node refused it for this reason and, for `Unregistered` and `ClonedIdentity`, the time (UNIX ms).
    Rejected(RefusalReason, u64),
    /// No owner could take it before the deadline; the provider should retry.
    Unavailable(String),
    /// The gateway began shutting down while the owner was unreachable.
    ShuttingDown,
}

/// The APNs reason a provider hears for a node's refusal: the one place the two vocabularies meet.
/// `NotOwner` and `EpochAhead` are retried on the right owner and only reach here if that never worked.
pub fn apns_reason(refusal: RefusalReason) -> Reason {
    match refusal {
        RefusalReason::BadDeviceId => Reason::BadDeviceToken,
        RefusalReason::Unregistered => Reason::Unregistered,
        RefusalReason::ClonedIdentity => Reason::ClonedIdentity,
        RefusalReason::NotOwner | RefusalReason::EpochAhead => Reason::ServiceUnavailable,
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
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Pause between attempts when no newer view has arrived.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

impl NodeRouter {
    /// Hands one notification to its owner, retrying across owners until the configured timeout.
    pub async fn deliver(&self, notification: Notification) -> Delivery {
        let deadline = Instant::now() + self.timeout;
        let Some(device) = DeviceId::from_slice(&notification.device_id) else {
            return Delivery::Rejected(RefusalReason::BadDeviceId, 0);
        };
        let mut view = self.view.clone();
        let mut attempts = 0u32;
        loop {
            let target = view.borrow_and_update().as_ref().and_then(|v| v.owner(device).map(|(_, a)| a.to_string()));
            let failure = match target {
                None => "no active member owns the device yet".to_string(),
                Some(addr) => match self.try_deliver(&addr, notification.clone(), deadline).await {
                    Ok(Delivery::Rejected(RefusalReason::NotOwner | RefusalReason::EpochAhead, _)) => {
                        format!("{addr} no longer owns it")
                    }
                    Ok(done) => return done,
                    Err(failure) => format!("{addr}: {failure}"),
                },
            };
            attempts += 1;
            if Instant::now() >= deadline {
                return Delivery::Unavailable(format!("{failure} (after {attempts} attempts)"));
            }
            if !self.pause_before_retry(&mut view, deadline).await {
                return Delivery::ShuttingDown;
            }
        }
    }

    /// Waits for a newer view or a short pause; false when the gateway is shutting down.
    async fn pause_before_retry(&self, view: &mut crate::watch::ViewReceiver, deadline: Instant) -> bool {
        if *self.shutdown.borrow() {
            return false;
        }
        metrics::counter!("courier_gateway_forward_retries_total").increment(1);
        // A newer view usually explains the failure; otherwise try again shortly.
        let wait = RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now()));
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::timeout(wait, view.changed()) => true,
            _ = shutdown.wait_for(|stop| *stop) => false,
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
            if Instant::now() >= deadline || !self.pause_before_retry(&mut view, deadline).await {
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
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let mut request = tonic::Request::new(request);
        request.set_timeout(remaining);
        match tokio::time::timeout(remaining, client.notification_status(request)).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(status)) => Err(status.to_string()),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }

    async fn try_deliver(&self, addr: &str, notification: Notification, deadline: Instant) -> Result<Delivery, String> {
        let apns_id = notification.apns_id.clone();
        let mut client = self.peers.client(addr).map_err(|e| e.to_string())?;
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let mut request = tonic::Request::new(DeliverRequest { notifications: vec![notification] });
        request.set_timeout(remaining);
        let response = match tokio::time::timeout(remaining, client.deliver(request)).await {
            Err(_) => return Err("timed out".into()),
            Ok(Err(status)) => return Err(status.to_string()),
            Ok(Ok(response)) => response.into_inner(),
        };
        let Some(result) = response.results.into_iter().next() else {
            return Err("the node answered with no result".into());
        };
        if result.apns_id != apns_id {
            return Err(format!("the node answered for apns-id {:?}", result.apns_id));
        }
        match DeliverOutcome::try_from(result.outcome) {
            Ok(
                outcome @ (DeliverOutcome::Stored
                | DeliverOutcome::Sent
                | DeliverOutcome::Discarded
                | DeliverOutcome::Delivered),
            ) => Ok(Delivery::Accepted(outcome)),
            Ok(DeliverOutcome::Rejected) => Ok(Delivery::Rejected(
                RefusalReason::try_from(result.reason).unwrap_or(RefusalReason::Unspecified),
                result.timestamp_ms,
            )),
            Ok(DeliverOutcome::Unspecified) | Err(_) => {
                Err(format!("the node answered with outcome {}", result.outcome))
            }
        }
    }
}
