//! Cloned device identities: one device certificate in use by several devices at once.
//!
//! A clone shows itself on the edge as links with the same certificate that keep replacing each other from
//! different source addresses: each copy reconnects when the other takes its place. `CloneDetector` counts
//! such replacements per device id within a sliding window and says when a device crosses the threshold.
//! A device that merely moves to a new address replaces its own dying link at most once, so it never gets
//! there. The registry calls the detector where it attaches a link; `report` turns the registry's
//! suspicions into the cluster-wide record (`Command::SuspectClone`) that every node and gateway enforce.
//! What a suspicion does to the links (keep the newer one, or refuse both) is the registry's business.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use courier_core::shutdown::CancellationToken;

use crate::ids::{DeviceId, unix_millis};
use crate::raft::control::Control;
use crate::raft::state::{Command, MAX_CLONE_ADDRS};

/// What a node does with a device it suspects of being cloned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ClonePolicy {
    /// Count and record the suspicion; the newer link keeps replacing the older one, as for any device.
    #[default]
    Alert,
    /// Also close every link of the device and refuse new ones (and the gateways answer its pushes 410
    /// `ClonedIdentity`) until an operator clears or revokes the id.
    Refuse,
}

/// How clones are recognised and what is done about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneSettings {
    /// Replacements older than this no longer count.
    pub window: Duration,
    /// Replacements from another source address within the window that make a device a suspected clone.
    pub threshold: u32,
    pub policy: ClonePolicy,
}

impl Default for CloneSettings {
    fn default() -> Self {
        CloneSettings { window: Duration::from_secs(60), threshold: 3, policy: ClonePolicy::Alert }
    }
}

/// Devices whose recent replacements are remembered at once. Beyond it, stale histories are dropped and,
/// if none is stale, a new device is not tracked until some are: the detector never grows with the fleet.
pub const MAX_TRACKED_DEVICES: usize = 65_536;

/// One device's replacements within the window.
#[derive(Debug, Default)]
struct History {
    /// When each counted replacement happened, oldest first; never longer than the threshold.
    replacements: VecDeque<Instant>,
    /// Distinct source addresses of the competing links, for the operator; at most `MAX_CLONE_ADDRS`.
    addrs: Vec<IpAddr>,
}

impl History {
    fn forget_before(&mut self, cutoff: Option<Instant>) {
        while self.replacements.front().is_some_and(|t| cutoff.is_some_and(|c| *t < c)) {
            self.replacements.pop_front();
        }
        if self.replacements.is_empty() {
            self.addrs.clear();
        }
    }

    fn note(&mut self, addr: IpAddr) {
        if !self.addrs.contains(&addr) && self.addrs.len() < MAX_CLONE_ADDRS {
            self.addrs.push(addr);
        }
    }
}

/// Counts replacements between links of one certificate from different source addresses.
#[derive(Debug)]
pub struct CloneDetector {
    /// Replacements older than this are forgotten, so devices that change networks now and then never add up.
    window: Duration,
    /// Replacements within the window that make a suspicion.
    threshold: usize,
    /// Only devices with a replacement within the window; at most `MAX_TRACKED_DEVICES`.
    recent: HashMap<DeviceId, History>,
}

impl CloneDetector {
    pub fn new(settings: &CloneSettings) -> Self {
        // One replacement is what a device that changes networks does; it can never be a suspicion.
        let threshold = settings.threshold.max(2) as usize;
        CloneDetector { window: settings.window, threshold, recent: HashMap::new() }
    }

    /// A live link of `device` from `old` is being replaced by a new link from `new` at `now`. Returns the
    /// competing source addresses when this replacement makes the device a suspected clone; its history
    /// then starts afresh, so a clone that goes on is suspected again after another `threshold`.
    pub fn replaced(&mut self, device: DeviceId, old: IpAddr, new: IpAddr, now: Instant) -> Option<Vec<IpAddr>> {
        if old == new {
            return None;
        }
        let cutoff = now.checked_sub(self.window);
        if !self.recent.contains_key(&device) && self.recent.len() >= MAX_TRACKED_DEVICES {
            self.recent.retain(|_, history| {
                history.forget_before(cutoff);
                !history.replacements.is_empty()
            });
            if self.recent.len() >= MAX_TRACKED_DEVICES {
                tracing::debug!(%device, "clone detector full; this replacement is not tracked");
                return None;
            }
        }
        let history = self.recent.entry(device).or_default();
        history.forget_before(cutoff);
        history.replacements.push_back(now);
        history.note(old);
        history.note(new);
        if history.replacements.len() < self.threshold {
            return None;
        }
        self.recent.remove(&device).map(|history| history.addrs)
    }

    /// Devices with a remembered history.
    pub fn tracked(&self) -> usize {
        self.recent.len()
    }
}

/// A suspicion on its way to the Raft log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneReport {
    pub device: DeviceId,
    pub addrs: Vec<IpAddr>,
    /// The detecting node's policy is `refuse`.
    pub refuse: bool,
}

/// Reports that may wait for the Raft log; more are dropped (the clone goes on and is suspected again).
pub const REPORT_QUEUE: usize = 256;

/// Proposes each suspicion to the cluster, unless the applied state already records it (as strictly):
/// every node and gateway then sees the device id, and with `refuse` turns its links and pushes away.
pub async fn report(mut reports: mpsc::Receiver<CloneReport>, control: Arc<Control>, shutdown: CancellationToken) {
    loop {
        let report = tokio::select! {
            report = reports.recv() => match report {
                Some(report) => report,
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let recorded =
            control.current().suspected_clones.get(&report.device).is_some_and(|r| r.refuse || !report.refuse);
        if recorded {
            continue;
        }
        let command = Command::SuspectClone {
            device: report.device,
            node: control.id,
            addrs: report.addrs.iter().map(IpAddr::to_string).collect(),
            refuse: report.refuse,
            now_ms: unix_millis(),
        };
        let proposed = tokio::select! {
            result = control.apply(command) => result,
            _ = shutdown.cancelled() => return,
        };
        if let Err(error) = proposed {
            tracing::warn!(device = %report.device, %error, "recording a suspected clone failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn detector(threshold: u32) -> CloneDetector {
        CloneDetector::new(&CloneSettings { window: Duration::from_secs(60), threshold, policy: ClonePolicy::Alert })
    }

    #[test]
    fn links_that_keep_replacing_each_other_from_two_addresses_are_suspected() {
        let mut clones = detector(3);
        let (device, t0) = (DeviceId(1), Instant::now());
        assert_eq!(clones.replaced(device, ip(2), ip(3), t0), None);
        assert_eq!(clones.replaced(device, ip(3), ip(2), t0 + Duration::from_secs(1)), None);
        let suspected = clones.replaced(device, ip(2), ip(3), t0 + Duration::from_secs(2));
        assert_eq!(suspected, Some(vec![ip(2), ip(3)]));
        assert_eq!(clones.tracked(), 0, "a reported device starts afresh");
        assert_eq!(clones.replaced(device, ip(3), ip(2), t0 + Duration::from_secs(3)), None);
    }

    #[test]
    fn a_device_that_moves_to_a_new_address_is_not_suspected() {
        let mut clones = detector(3);
        let (device, t0) = (DeviceId(2), Instant::now());
        assert_eq!(clones.replaced(device, ip(2), ip(3), t0), None, "one replacement is a network change");
        for i in 0..10 {
            assert_eq!(clones.replaced(device, ip(3), ip(3), t0 + Duration::from_secs(i)), None, "same address");
        }
        // Network changes spread out over time never add up.
        let mut clones = detector(3);
        for i in 0..10u64 {
            let (from, to) = if i % 2 == 0 { (ip(2), ip(3)) } else { (ip(3), ip(2)) };
            assert_eq!(clones.replaced(device, from, to, t0 + Duration::from_secs(31 * i)), None, "replacement {i}");
        }
    }

    #[test]
    fn the_threshold_is_at_least_two_and_devices_are_independent() {
        let mut clones = detector(0);
        let t0 = Instant::now();
        assert_eq!(clones.replaced(DeviceId(3), ip(2), ip(3), t0), None);
        assert_eq!(clones.replaced(DeviceId(4), ip(2), ip(3), t0), None);
        assert!(clones.replaced(DeviceId(3), ip(3), ip(2), t0).is_some());
        assert_eq!(clones.tracked(), 1);
    }

    #[test]
    fn memory_is_bounded_and_stale_histories_make_room() {
        let mut clones = detector(3);
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_DEVICES as u128 {
            clones.replaced(DeviceId(i), ip(2), ip(3), t0);
        }
        assert_eq!(clones.tracked(), MAX_TRACKED_DEVICES);
        let late = DeviceId(u128::MAX);
        assert_eq!(clones.replaced(late, ip(2), ip(3), t0 + Duration::from_secs(1)), None);
        assert_eq!(clones.tracked(), MAX_TRACKED_DEVICES, "full of fresh histories: the newcomer is not tracked");
        clones.replaced(late, ip(2), ip(3), t0 + Duration::from_secs(61));
        assert_eq!(clones.tracked(), 1, "stale histories were dropped to make room");
    }

    #[test]
    fn recorded_addresses_are_distinct_and_bounded() {
        let mut clones = detector(40);
        let (device, t0) = (DeviceId(5), Instant::now());
        let mut last = None;
        for i in 0..40u8 {
            last = clones.replaced(device, ip(i), ip(i + 1), t0);
        }
        let addrs = last.expect("suspected after 40 replacements");
        assert_eq!(addrs.len(), MAX_CLONE_ADDRS);
        assert_eq!(addrs[..2], [ip(0), ip(1)]);
    }
}
