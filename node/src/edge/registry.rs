//! Which devices have a live link on this node, and how to reach each link's task.
//!
//! One entry per device id. A newer link for the same id replaces the older one (a cloned certificate, or
//! a reconnect racing the old link's close): the older link is told to close with `REPLACED` and the
//! event is counted. Only this node's links are here; placement across nodes is the ring's business.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use courier_proto::cluster::Notification;
use courier_proto::device::GoodbyeReason;
use tokio::sync::{mpsc, oneshot};

use crate::ids::DeviceId;

/// How many notifications may wait for one link's task before the device counts as too slow.
const LINK_QUEUE: usize = 1024;

/// How the registry asks a link to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEnd {
    Goodbye(GoodbyeReason),
    /// Send the device to another node (its device address and certificate name).
    Redirect(courier_proto::device::Redirect),
}

struct Entry {
    serial: u64,
    notifications: mpsc::Sender<Arc<Notification>>,
    close: oneshot::Sender<LinkEnd>,
}

/// What a link task receives from the registry.
pub struct Attachment {
    pub serial: u64,
    pub notifications: mpsc::Receiver<Arc<Notification>>,
    /// Fires when the registry wants the link closed, with the reason to give.
    pub close: oneshot::Receiver<LinkEnd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// Queued on the device's link.
    Sent,
    NotConnected,
    /// The link had a backlog; it is being closed so the device reconnects and replays its queue.
    SlowConsumer,
}

#[derive(Default)]
pub struct Registry {
    links: Mutex<HashMap<DeviceId, Entry>>,
    next_serial: AtomicU64,
}

impl Registry {
    pub fn attach(&self, device: DeviceId) -> Attachment {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let (close_tx, close_rx) = oneshot::channel();
        let entry = Entry { serial, notifications: tx, close: close_tx };
        let previous = self.lock().insert(device, entry);
        if let Some(previous) = previous {
            metrics::counter!("courier_node_link_replacements_total").increment(1);
            tracing::warn!(%device, "a newer link presented the same device certificate; closing the older one");
            let _ = previous.close.send(LinkEnd::Goodbye(GoodbyeReason::Replaced));
        }
        metrics::gauge!("courier_node_device_links").set(self.len() as f64);
        Attachment { serial, notifications: rx, close: close_rx }
    }

    /// Removes the device's entry if it still belongs to the link with `serial`.
    pub fn detach(&self, device: DeviceId, serial: u64) {
        let mut links = self.lock();
        if links.get(&device).is_some_and(|e| e.serial == serial) {
            links.remove(&device);
        }
        let len = links.len();
        drop(links);
        metrics::gauge!("courier_node_device_links").set(len as f64);
    }

    pub fn hand_off(&self, device: DeviceId, notification: Arc<Notification>) -> Handoff {
        let mut links = self.lock();
        let Some(entry) = links.get(&device) else {
            return Handoff::NotConnected;
        };
        match entry.notifications.try_send(notification) {
            Ok(()) => Handoff::Sent,
            Err(mpsc::error::TrySendError::Closed(_)) => Handoff::NotConnected,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if let Some(entry) = links.remove(&device) {
                    let _ = entry.close.send(LinkEnd::Goodbye(GoodbyeReason::SlowConsumer));
                }
                Handoff::SlowConsumer
            }
        }
    }

    /// Ends the device's link, if it has one; `true` if it had.
    pub fn close(&self, device: DeviceId, end: LinkEnd) -> bool {
        let entry = self.lock().remove(&device);
        metrics::gauge!("courier_node_device_links").set(self.len() as f64);
        match entry {
            Some(entry) => {
                let _ = entry.close.send(end);
                true
            }
            None => false,
        }
    }

    /// Devices with a live link here.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.lock().keys().copied().collect()
    }

    pub fn is_connected(&self, device: DeviceId) -> bool {
        self.lock().contains_key(&device)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Entry>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newer_link_replaces_older_and_stale_detach_is_ignored() {
        let registry = Registry::default();
        let device = DeviceId(1);
        let old = registry.attach(device);
        let mut new = registry.attach(device);
        assert_eq!(old.close.await.unwrap(), LinkEnd::Goodbye(GoodbyeReason::Replaced));
        registry.detach(device, old.serial);
        assert!(registry.is_connected(device), "the old link's detach must not remove the new link");
        assert_eq!(registry.hand_off(device, Arc::new(Notification::default())), Handoff::Sent);
        assert!(new.notifications.recv().await.is_some());
        registry.detach(device, new.serial);
        assert_eq!(registry.hand_off(device, Arc::new(Notification::default())), Handoff::NotConnected);
    }

    #[tokio::test]
    async fn a_full_link_is_closed_as_slow() {
        let registry = Registry::default();
        let device = DeviceId(2);
        let attachment = registry.attach(device);
        for _ in 0..LINK_QUEUE {
            assert_eq!(registry.hand_off(device, Arc::new(Notification::default())), Handoff::Sent);
        }
        assert_eq!(registry.hand_off(device, Arc::new(Notification::default())), Handoff::SlowConsumer);
        assert_eq!(attachment.close.await.unwrap(), LinkEnd::Goodbye(GoodbyeReason::SlowConsumer));
        assert!(!registry.is_connected(device));
    }
}
