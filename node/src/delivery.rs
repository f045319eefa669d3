//! What happens to a notification once it reaches the node that owns its device.
//!
//! A notification with a future expiration is committed to the store and copied to the device's ring
//! successors at the same time, and then handed to the device's link if it has one: the gateway hears
//! `STORED` only once it is durable on R nodes (fewer only when fewer are active), and the device acks it off
//! every queue. A notification with expiration 0 (or already past) is never stored: it goes to a live link
//! (`SENT`) or is dropped (`DISCARDED`), as APNs does.

use std::sync::Arc;

use courier_proto::cluster::{DeliverOutcome, DeliverResult, Notification};

use crate::edge::registry::{Handoff, Registry};
use crate::ids::{DeviceId, unix_millis};
use crate::replication::Replicator;
use crate::store::{Inserted, Store};
use crate::view::{LocalView, Placement};

/// The reason a node gives for a notification whose device it does not own in its current epoch; the
/// gateway retries on the owner of its newer view and never shows it to a provider.
pub const NOT_OWNER: &str = "NotOwner";

#[derive(Clone)]
pub struct Delivery {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub view: Arc<LocalView>,
    pub replicator: Arc<Replicator>,
    // Provider API hooks (see `status_log::deliver_tracked`): unregistered topics and delivery status.
    pub registrations: crate::store::registrations::Registrations,
    pub status: Arc<crate::status_log::StatusLog>,
}

/// The reason a push to a device refused as a cloned identity gets (410, with the time it was refused).
pub const CLONED_IDENTITY: &str = "ClonedIdentity";

fn result(apns_id: &str, outcome: DeliverOutcome, reason: &str) -> DeliverResult {
    DeliverResult { apns_id: apns_id.to_string(), outcome: outcome as i32, reason: reason.to_string(), timestamp_ms: 0 }
}

impl Delivery {
    pub async fn deliver(&self, notification: Notification) -> DeliverResult {
        let apns_id = notification.apns_id.clone();
        let Some(device) = DeviceId::from_slice(&notification.device_id) else {
            metrics::counter!("courier_node_notifications_rejected_total", "reason" => "BadDeviceToken").increment(1);
            return result(&apns_id, DeliverOutcome::Rejected, "BadDeviceToken");
        };
        if self.view.placement(device) != Placement::Here {
            metrics::counter!("courier_node_notifications_rejected_total", "reason" => NOT_OWNER).increment(1);
            return result(&apns_id, DeliverOutcome::Rejected, NOT_OWNER);
        }
        // The gateway refuses these from its view already; this covers a gateway a moment behind.
        if let Some(since_ms) = self.view.get().state.refused_clone(device) {
            metrics::counter!("courier_node_notifications_rejected_total", "reason" => CLONED_IDENTITY).increment(1);
            return DeliverResult {
                timestamp_ms: since_ms,
                ..result(&apns_id, DeliverOutcome::Rejected, CLONED_IDENTITY)
            };
        }
        let storable = notification.expiration > unix_millis() / 1000;
        let notification = Arc::new(notification);
        if storable {
            // The local commit and the copies to the successors proceed together: the gateway hears STORED
            // once both are durable, after one commit's wait instead of two in a row.
            let (stored, _copies) =
                tokio::join!(self.store.insert((*notification).clone()), self.replicator.put(device, &notification));
            match stored {
                Ok(Inserted::Duplicate) => {
                    // A provider's retry: the copies exist again; do not hand it to the link again.
                    metrics::counter!("courier_node_notifications_duplicate_total").increment(1);
                    return result(&apns_id, DeliverOutcome::Stored, "");
                }
                Ok(inserted) => {
                    if inserted == Inserted::Collapsed {
                        metrics::counter!("courier_node_notifications_collapsed_total").increment(1);
                    }
                    metrics::counter!("courier_node_notifications_stored_total").increment(1);
                }
                Err(error) => {
                    tracing::error!(%error, "storing a notification failed");
                    metrics::counter!("courier_node_notifications_rejected_total", "reason" => "InternalServerError")
                        .increment(1);
                    return result(&apns_id, DeliverOutcome::Rejected, "InternalServerError");
                }
            }
            // Durable here and on the replicas before the gateway says 200; then to the device if it is here.
            self.registry.hand_off(device, notification);
            return result(&apns_id, DeliverOutcome::Stored, "");
        }
        match self.registry.hand_off(device, notification) {
            Handoff::Sent => {
                metrics::counter!("courier_node_notifications_sent_total").increment(1);
                result(&apns_id, DeliverOutcome::Sent, "")
            }
            Handoff::NotConnected | Handoff::SlowConsumer => {
                metrics::counter!("courier_node_notifications_discarded_total").increment(1);
                result(&apns_id, DeliverOutcome::Discarded, "")
            }
        }
    }
}
