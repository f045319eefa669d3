//! Which devices have a live link on this node, and how to reach each link's task.
//!
//! One entry per device id. A newer link for the same id replaces the older one (a cloned certificate, or
//! a reconnect racing the old link's close): the older link is told to close with `REPLACED` and the
//! event is counted. Replacements from another source address go to the clone detector (`clones`); when
//! it suspects the device, the suspicion is counted and reported, and under `--on-clone=refuse` both
//! links are closed with `CLONED_IDENTITY` instead. Only this node's links are here; placement across
//! nodes is the ring's business.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use courier_core::ids::FastMap;
use courier_proto::cluster::Notification;
use courier_proto::device::GoodbyeReason;
use tokio::sync::{mpsc, oneshot};

use super::clones::{CloneDetector, ClonePolicy, CloneReport, CloneSettings};
use crate::ids::DeviceId;

/// How many notifications may wait for one link's task before the device counts as too slow.
const LINK_QUEUE: usize = 1024;

/// Subscribers a broadcast is offered to under one lock of the registry.
const OFFER_CHUNK: usize = 256;

/// What a link's task is handed to write.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A notification for this device (acked, tracked by the link).
    Notification(Arc<Notification>),
    /// A broadcast, one for every subscriber (not acked).
    Broadcast(Arc<SharedBroadcast>),
}

/// A broadcast as each subscriber's link gets it: its device frame, encoded once, and what the link
/// remembers of it.
#[derive(Debug)]
pub struct SharedBroadcast {
    pub frame: courier_device::codec::EncodedFrame,
    pub channel: courier_core::channel::ChannelId,
    /// Its apns_id when its channel keeps it (policy 1): the device has now had the kept broadcast.
    pub kept: Option<Arc<str>>,
}

/// How the registry asks a link to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEnd {
    Goodbye(GoodbyeReason),
    /// Send the device to another node (its device address and certificate name).
    Redirect(courier_proto::device::Redirect),
}

struct Entry {
    serial: u64,
    /// The link's source address, which a replacement is compared with.
    addr: IpAddr,
    notifications: mpsc::Sender<Outgoing>,
    close: oneshot::Sender<LinkEnd>,
}

/// What a link task receives from the registry.
pub struct Attachment {
    pub serial: u64,
    pub notifications: mpsc::Receiver<Outgoing>,
    /// Fires when the registry wants the link closed, with the reason to give.
    pub close: oneshot::Receiver<LinkEnd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// Queued on the device's link, the one with this serial.
    Sent(u64),
    NotConnected,
    /// The link had a backlog; it is being closed so the device reconnects and replays its queue.
    SlowConsumer,
}

/// The link was not attached: its certificate is a suspected clone and this node refuses clones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the device certificate is in use by more than one device")]
pub struct RefusedClone;

pub struct Registry {
    links: Mutex<FastMap<DeviceId, Entry>>,
    next_serial: AtomicU64,
    /// Lock order: `links` first, then this.
    clones: Mutex<CloneDetector>,
    /// Whether a suspicion also closes the device's links (`refuse`) or only reports them (`alert`).
    clone_policy: ClonePolicy,
    /// Where suspicions go to be recorded through Raft; `None` records nothing (unit tests).
    clone_reports: Option<mpsc::Sender<CloneReport>>,
    /// Suspicions this registry raised, for tests of one node among several in a process.
    suspicions: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(&CloneSettings::default(), None)
    }
}

impl Registry {
    pub fn new(clones: &CloneSettings, clone_reports: Option<mpsc::Sender<CloneReport>>) -> Self {
        Registry {
            links: Mutex::default(),
            next_serial: AtomicU64::new(0),
            clones: Mutex::new(CloneDetector::new(clones)),
            clone_policy: clones.policy,
            clone_reports,
            suspicions: AtomicU64::new(0),
        }
    }

    /// Makes the link from `addr` the device's link, replacing an older one; refused when this replacement
    /// makes the device a suspected clone and the policy is `refuse` (the older link is closed too).
    pub fn attach(&self, device: DeviceId, addr: IpAddr) -> Result<Attachment, RefusedClone> {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let (close_tx, close_rx) = oneshot::channel();
        let entry = Entry { serial, addr, notifications: tx, close: close_tx };
        let mut links = self.lock();
        let suspected = links.get(&device).and_then(|previous| {
            let mut clones = self.clones.lock().unwrap_or_else(|p| p.into_inner());
            clones.replaced(device, previous.addr, addr, std::time::Instant::now())
        });
        if let Some(addrs) = suspected {
            self.suspect(device, addrs);
            if self.clone_policy == ClonePolicy::Refuse {
                if let Some(previous) = links.remove(&device) {
                    let _ = previous.close.send(LinkEnd::Goodbye(GoodbyeReason::ClonedIdentity));
                }
                let len = links.len();
                drop(links);
                metrics::gauge!("courier_node_device_links").set(len as f64);
                return Err(RefusedClone);
            }
        }
        let previous = links.insert(device, entry);
        let len = links.len();
        drop(links);
        if let Some(previous) = previous {
            metrics::counter!("courier_node_link_replacements_total").increment(1);
            tracing::warn!(%device, "a newer link presented the same device certificate; closing the older one");
            let _ = previous.close.send(LinkEnd::Goodbye(GoodbyeReason::Replaced));
        }
        metrics::gauge!("courier_node_device_links").set(len as f64);
        Ok(Attachment { serial, notifications: rx, close: close_rx })
    }

    fn suspect(&self, device: DeviceId, addrs: Vec<IpAddr>) {
        self.suspicions.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("courier_node_suspected_clones_total").increment(1);
        let policy = self.clone_policy;
        tracing::warn!(%device, ?addrs, ?policy, "suspected clone: links of one certificate keep replacing each other");
        let refuse = self.clone_policy == ClonePolicy::Refuse;
        let report = CloneReport { device, addrs, refuse };
        if let Some(reports) = &self.clone_reports
            && reports.try_send(report).is_err()
        {
            tracing::warn!(%device, "too many clone reports waiting; this one is not recorded");
        }
    }

    /// Suspected clones this registry has raised since it was made.
    pub fn clone_suspicions(&self) -> u64 {
        self.suspicions.load(Ordering::Relaxed)
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
        match entry.notifications.try_send(Outgoing::Notification(notification)) {
            Ok(()) => Handoff::Sent(entry.serial),
            Err(mpsc::error::TrySendError::Closed(_)) => Handoff::NotConnected,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if let Some(entry) = links.remove(&device) {
                    let _ = entry.close.send(LinkEnd::Goodbye(GoodbyeReason::SlowConsumer));
                }
                Handoff::SlowConsumer
            }
        }
    }

    /// Queues a broadcast on each subscriber's link (a device and its link's serial) that is still up and
    /// has room, and returns how many took it. A full queue only loses this broadcast for that device
    /// (unlike `hand_off`, it does not close the link: nothing was stored for it to replay). The registry
    /// is locked once per `OFFER_CHUNK` subscribers, not once each, and never for a whole fan-out, so links
    /// coming and going wait at most one chunk.
    pub fn offer(&self, subscribers: &[(DeviceId, u64)], broadcast: &Arc<SharedBroadcast>) -> u64 {
        let mut handed = 0;
        for chunk in subscribers.chunks(OFFER_CHUNK) {
            let links = self.lock();
            for (device, serial) in chunk {
                if let Some(entry) = links.get(device).filter(|entry| entry.serial == *serial)
                    && entry.notifications.try_send(Outgoing::Broadcast(broadcast.clone())).is_ok()
                {
                    handed += 1;
                }
            }
        }
        handed
    }

    /// The serial of the device's live link, if it has one.
    pub fn serial(&self, device: DeviceId) -> Option<u64> {
        self.lock().get(&device).map(|e| e.serial)
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

    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<DeviceId, Entry>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn newer_link_replaces_older_and_stale_detach_is_ignored() {
        let registry = Registry::default();
        let device = DeviceId(1);
        let old = registry.attach(device, HERE).unwrap();
        let mut new = registry.attach(device, HERE).unwrap();
        assert_eq!(old.close.await.unwrap(), LinkEnd::Goodbye(GoodbyeReason::Replaced));
        registry.detach(device, old.serial);
        assert!(registry.is_connected(device), "the old link's detach must not remove the new link");
        assert_eq!(registry.hand_off(device, Arc::new(Notification::default())), Handoff::Sent(new.serial));
        assert_eq!(registry.serial(device), Some(new.serial));
        assert!(new.notifications.recv().await.is_some());
        registry.detach(device, new.serial);
        assert_eq!(registry.hand_off(device, Arc::new(Notification::default())), Handoff::NotConnected);
    }

    #[tokio::test]
    async fn a_full_link_is_closed_as_slow() {
        let registry = Registry::default();
        let device = DeviceId(2);
        let attachment = registry.attach(device, HERE).unwrap();
        for _ in 0..LINK_QUEUE {
            assert_eq!(registry.hand_off(device, Arc::new(Notification::default())), Handoff::Sent(attachment.serial));
        }
        assert_eq!(registry.hand_off(device, Arc::new(Notification::default())), Handoff::SlowConsumer);
        assert_eq!(attachment.close.await.unwrap(), LinkEnd::Goodbye(GoodbyeReason::SlowConsumer));
        assert!(!registry.is_connected(device));
    }

    fn settings(policy: ClonePolicy) -> CloneSettings {
        CloneSettings { policy, ..CloneSettings::default() }
    }

    #[tokio::test]
    async fn alert_counts_and_reports_a_clone_and_keeps_the_newer_link() {
        let (reports, mut reported) = mpsc::channel(4);
        let registry = Registry::new(&settings(ClonePolicy::Alert), Some(reports));
        let device = DeviceId(3);
        let (a, b) = (IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3]));
        let mut older = registry.attach(device, a).unwrap();
        for (i, from) in [b, a, b].into_iter().enumerate() {
            let newer = registry.attach(device, from).unwrap();
            assert_eq!(older.close.await.unwrap(), LinkEnd::Goodbye(GoodbyeReason::Replaced), "replacement {i}");
            older = newer;
        }
        assert_eq!(registry.clone_suspicions(), 1);
        let report = reported.try_recv().expect("the suspicion is reported");
        assert_eq!(report, CloneReport { device, addrs: vec![a, b], refuse: false });
        assert!(registry.is_connected(device));
    }

    #[tokio::test]
    async fn refuse_closes_both_links_of_a_clone() {
        let (reports, mut reported) = mpsc::channel(4);
        let registry = Registry::new(&settings(ClonePolicy::Refuse), Some(reports));
        let device = DeviceId(4);
        let (a, b) = (IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3]));
        let first = registry.attach(device, a).unwrap();
        let second = registry.attach(device, b).unwrap();
        assert_eq!(first.close.await.unwrap(), LinkEnd::Goodbye(GoodbyeReason::Replaced));
        let third = registry.attach(device, a).unwrap();
        assert_eq!(second.close.await.unwrap(), LinkEnd::Goodbye(GoodbyeReason::Replaced));
        assert_eq!(registry.attach(device, b).err(), Some(RefusedClone));
        assert_eq!(third.close.await.unwrap(), LinkEnd::Goodbye(GoodbyeReason::ClonedIdentity));
        assert!(!registry.is_connected(device));
        assert!(reported.try_recv().expect("reported").refuse);
    }

    #[tokio::test]
    async fn one_move_to_a_new_address_is_no_clone() {
        let registry = Registry::new(&settings(ClonePolicy::Refuse), None);
        let device = DeviceId(5);
        let old = registry.attach(device, IpAddr::from([127, 0, 0, 2])).unwrap();
        registry.attach(device, IpAddr::from([127, 0, 0, 3])).unwrap();
        assert_eq!(old.close.await.unwrap(), LinkEnd::Goodbye(GoodbyeReason::Replaced));
        assert_eq!(registry.clone_suspicions(), 0);
    }
}
