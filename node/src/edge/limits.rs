//! What one connection, one source address and one device link may cost the node.
//!
//! `Admission` bounds connections that have not yet proved anything: from accept until their first
//! frame a connection is *pending*, counted globally and per source address, and refused (dropped before
//! any TLS work) beyond either cap. TLS handshakes take a slot from a small global pool only once the
//! whole ClientHello has arrived, so silent connections cost a socket and a few bytes, never a slot, and
//! one source address may hold at most half the slots and a bounded number of handshakes in progress.
//! A live link's frames that cause writes are bounded by `courier_core::rate::TokenBucket`. Neither knows
//! about frames or TLS.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use courier_core::rate::{TokenBucket, source_key};

/// TLS handshakes a node works on at once. In a reconnect storm the rest wait their turn without costing
/// CPU, so each handshake finishes quickly instead of all of them slowly (and timing out, and retrying).
pub const MAX_CONCURRENT_HANDSHAKES: usize = 128;

/// Handshake slots one source address may hold at once: a peer that stalls its handshakes from one
/// address can delay others only as far as the other half of the pool allows.
const SLOTS_PER_SOURCE: usize = MAX_CONCURRENT_HANDSHAKES / 2;

/// Caps on connections not yet past their first frame.
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// Connections accepted but not yet past their first frame, from all sources.
    pub max_pending: usize,
    /// The same, from one source address (an IPv6 /64 counts as one address).
    pub max_pending_per_source: usize,
    /// Handshakes in progress (ClientHello received, waiting for or holding a slot) from one source.
    pub max_handshakes_per_source: usize,
}

/// Why a connection was refused before it could become a link; the `reason` label of
/// `courier_node_links_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many connections not yet past their first frame.
    Pending,
    /// Too many such connections from this source address.
    PendingPerSource,
    /// Too many handshakes in progress from this source address.
    HandshakesPerSource,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Pending => "pending",
            Refusal::PendingPerSource => "pending_per_source",
            Refusal::HandshakesPerSource => "handshakes_per_source",
        }
    }

    pub fn count(self) {
        metrics::counter!("courier_node_links_refused_total", "reason" => self.as_str()).increment(1);
    }
}

struct Source {
    pending: usize,
    handshakes: usize,
    /// This source's share of the handshake slots.
    slots: Arc<Semaphore>,
}

#[derive(Default)]
struct Counts {
    pending: usize,
    sources: HashMap<IpAddr, Source>,
}

/// Admission of new connections on the device port; shared by the accept loop and every pending
/// connection's task.
pub struct Admission {
    settings: AdmissionSettings,
    counts: Mutex<Counts>,
    slots: Arc<Semaphore>,
}

impl Admission {
    pub fn new(settings: AdmissionSettings) -> Arc<Self> {
        Arc::new(Admission {
            settings,
            counts: Mutex::default(),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES)),
        })
    }

    /// Counts a just-accepted connection from `ip` as pending, or refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, Refusal> {
        let key = source_key(ip);
        let mut counts = self.lock();
        if counts.pending >= self.settings.max_pending {
            return Err(Refusal::Pending);
        }
        let source = counts.sources.entry(key).or_insert_with(|| Source {
            pending: 0,
            handshakes: 0,
            slots: Arc::new(Semaphore::new(SLOTS_PER_SOURCE)),
        });
        if source.pending >= self.settings.max_pending_per_source {
            if source.pending == 0 {
                counts.sources.remove(&key);
            }
            return Err(Refusal::PendingPerSource);
        }
        source.pending += 1;
        counts.pending += 1;
        metrics::gauge!("courier_node_pending_links").set(counts.pending as f64);
        Ok(Pending { admission: self.clone(), key, handshaking: false })
    }

    /// Connections not yet past their first frame.
    pub fn pending(&self) -> usize {
        self.lock().pending
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One pending connection; dropping it (the first frame arrived, or the connection ended) releases it.
pub struct Pending {
    admission: Arc<Admission>,
    key: IpAddr,
    handshaking: bool,
}

/// A held handshake slot: this source's share and the global pool's.
pub struct HandshakeSlot {
    _source: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl Pending {
    /// Counts this connection's handshake as in progress (its ClientHello arrived), or refuses it.
    pub fn start_handshake(&mut self) -> Result<(), Refusal> {
        let mut counts = self.admission.lock();
        let Some(source) = counts.sources.get_mut(&self.key) else {
            return Ok(());
        };
        if source.handshakes >= self.admission.settings.max_handshakes_per_source {
            return Err(Refusal::HandshakesPerSource);
        }
        source.handshakes += 1;
        self.handshaking = true;
        Ok(())
    }

    /// Waits for a handshake slot: first this source's share, then the global pool's.
    pub async fn slot(&self) -> Option<HandshakeSlot> {
        let source_slots = self.admission.lock().sources.get(&self.key).map(|s| s.slots.clone())?;
        let source = source_slots.acquire_owned().await.ok()?;
        let global = self.admission.slots.clone().acquire_owned().await.ok()?;
        Some(HandshakeSlot { _source: source, _global: global })
    }

    /// The handshake is over (either way).
    pub fn end_handshake(&mut self) {
        if !std::mem::take(&mut self.handshaking) {
            return;
        }
        if let Some(source) = self.admission.lock().sources.get_mut(&self.key) {
            source.handshakes = source.handshakes.saturating_sub(1);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.end_handshake();
        let mut counts = self.admission.lock();
        counts.pending = counts.pending.saturating_sub(1);
        if let Some(source) = counts.sources.get_mut(&self.key) {
            source.pending = source.pending.saturating_sub(1);
            if source.pending == 0 {
                counts.sources.remove(&self.key);
            }
        }
        metrics::gauge!("courier_node_pending_links").set(counts.pending as f64);
    }
}

/// Limits on one device link's frames that cause writes.
#[derive(Debug, Clone)]
pub struct LinkLimits {
    /// Frames that cause writes a link may send at once.
    pub write_burst: u32,
    /// ...and per second after that.
    pub write_rate: f64,
    /// Distinct app topics one device may register or unregister (per link, and unregistrations stored).
    pub max_topics: usize,
    /// Longest a write to a device may take before the device counts as a slow consumer.
    pub write_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pending: usize, per_source: usize, handshakes: usize) -> AdmissionSettings {
        AdmissionSettings {
            max_pending: pending,
            max_pending_per_source: per_source,
            max_handshakes_per_source: handshakes,
        }
    }

    #[test]
    fn pending_connections_are_capped_globally_and_per_source() {
        let admission = Admission::new(settings(3, 2, 8));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).err(), Some(Refusal::PendingPerSource));
        let _third = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).err(), Some(Refusal::Pending));
        drop(first);
        assert_eq!(admission.pending(), 2);
        let _again = admission.admit(a).expect("a released connection frees its place");
    }

    #[test]
    fn an_ipv6_64_is_one_source() {
        let admission = Admission::new(settings(10, 1, 8));
        let _one = admission.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert_eq!(admission.admit("2001:db8:1:2:ffff::9".parse().unwrap()).err(), Some(Refusal::PendingPerSource));
        let _other = admission.admit("2001:db8:1:3::1".parse().unwrap()).unwrap();
        let _v4 = admission.admit("192.0.2.7".parse().unwrap()).unwrap();
        assert_eq!(admission.admit("::ffff:192.0.2.7".parse().unwrap()).err(), Some(Refusal::PendingPerSource));
    }

    #[test]
    fn handshakes_in_progress_are_capped_per_source() {
        let admission = Admission::new(settings(10, 10, 2));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut connections: Vec<Pending> = (0..3).map(|_| admission.admit(ip).unwrap()).collect();
        assert!(connections[0].start_handshake().is_ok());
        assert!(connections[1].start_handshake().is_ok());
        assert_eq!(connections[2].start_handshake().err(), Some(Refusal::HandshakesPerSource));
        connections[0].end_handshake();
        connections[0].end_handshake();
        assert!(connections[2].start_handshake().is_ok(), "an ended handshake frees its place, once");
        assert_eq!(connections[0].start_handshake().err(), Some(Refusal::HandshakesPerSource));
        connections.clear();
        assert_eq!(admission.pending(), 0);
        assert!(admission.lock().sources.is_empty(), "a source with nothing pending is forgotten");
    }

    #[tokio::test]
    async fn one_source_holds_at_most_half_the_slots() {
        let admission = Admission::new(settings(1000, 1000, 1000));
        let greedy: IpAddr = "192.0.2.1".parse().unwrap();
        let mut held = Vec::new();
        let mut pendings = Vec::new();
        for _ in 0..SLOTS_PER_SOURCE {
            let pending = admission.admit(greedy).unwrap();
            held.push(pending.slot().await.unwrap());
            pendings.push(pending);
        }
        let one_more = admission.admit(greedy).unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), one_more.slot()).await;
        assert!(waited.is_err(), "the greedy source waits for its own slots");
        let other = admission.admit("192.0.2.2".parse().unwrap()).unwrap();
        assert!(other.slot().await.is_some(), "another source still gets a slot");
    }
}
