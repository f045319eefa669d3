//! Placement: which node owns a device, on a consistent-hash ring built from one epoch's active members.
//!
//! This is the one wrapper around the `consistent_hash` crate. Every node and gateway that builds a ring
//! from the same epoch gets the same answers, because everything that feeds it is deterministic: member ids
//! (sorted), the virtual-node count from the Raft state, SipHash-1-3 with fixed keys inside the crate, and a
//! device key that is a SHA-256 digest of the device id, never Rust's randomly seeded `DefaultHasher`.

use std::collections::BTreeMap;

use consistent_hash::{DefaultHash, Node, StaticHashRing};

use crate::ids::DeviceId;
use crate::state::{ClusterState, Epoch, MemberState, NodeId};

/// The ring of one epoch.
pub struct Ring {
    epoch: Epoch,
    /// The crate's ring keeps references into its own node list; `'static` is sound because the ring owns
    /// that list and never hands the references out beyond `&self`.
    inner: StaticHashRing<'static, NodeId, (), DefaultHash>,
    members: Vec<NodeId>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("epoch", &self.epoch).field("members", &self.members).finish()
    }
}

/// The stable 64-bit key of a device on the ring.
pub fn device_key(device: DeviceId) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, &device.to_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first)
}

impl Ring {
    pub fn new(epoch: Epoch, members: impl IntoIterator<Item = NodeId>, vnodes: u32) -> Self {
        let mut members: Vec<NodeId> = members.into_iter().collect();
        members.sort_unstable();
        members.dedup();
        let nodes = members.iter().map(|id| Node::new(*id).quantity(vnodes.max(1) as usize));
        Ring { epoch, inner: StaticHashRing::new(DefaultHash, nodes), members }
    }

    /// The ring of `state`'s epoch: its active members with its virtual-node count.
    pub fn from_state(state: &ClusterState) -> Self {
        let active = state.members_in(MemberState::Active).map(|m| m.id);
        Ring::new(state.epoch, active, state.ring.vnodes)
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    /// The device's primary owner; `None` on an empty ring.
    pub fn owner(&self, device: DeviceId) -> Option<NodeId> {
        self.inner.calc_candidates(&device_key(device)).next().map(|n| n.key)
    }

    /// The owner followed by up to `count - 1` distinct successors.
    pub fn candidates(&self, device: DeviceId, count: usize) -> Vec<NodeId> {
        self.inner.calc_candidates(&device_key(device)).take(count).map(|n| n.key).collect()
    }

    /// Each member's share of the key space, estimated from a fixed sample of device keys.
    pub fn shares(&self) -> BTreeMap<NodeId, f64> {
        const SAMPLES: u64 = 1 << 14;
        let mut counts: BTreeMap<NodeId, u64> = self.members.iter().map(|id| (*id, 0)).collect();
        for i in 0..SAMPLES {
            let device = DeviceId(u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
            if let Some(owner) = self.owner(device) {
                *counts.entry(owner).or_default() += 1;
            }
        }
        counts.into_iter().map(|(id, n)| (id, n as f64 / SAMPLES as f64)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(n: u128) -> impl Iterator<Item = DeviceId> {
        (0..n).map(|i| DeviceId(i.wrapping_mul(0x2545_f491_4f6c_dd1d_0000_0000_0000_0001) ^ 0x5555))
    }

    #[test]
    fn same_members_give_the_same_owner_in_any_order() {
        let a = Ring::new(Epoch(3), [1, 2, 3], 64);
        let b = Ring::new(Epoch(3), [3, 1, 2, 2], 64);
        for device in devices(2000) {
            assert_eq!(a.owner(device), b.owner(device));
            let candidates = a.candidates(device, 2);
            assert_eq!(candidates.len(), 2);
            assert_ne!(candidates[0], candidates[1]);
        }
    }

    #[test]
    fn owners_are_pinned_across_builds_and_processes() {
        // Fixed expectations: a change to hashing would silently re-shard every deployed cluster.
        let ring = Ring::new(Epoch(1), [1, 2, 3], 128);
        let owners: Vec<_> = (0..12u128).map(|i| ring.owner(DeviceId(i)).unwrap()).collect();
        assert_eq!(owners, [3, 3, 3, 3, 2, 1, 1, 3, 1, 1, 1, 2]);
        assert_eq!(device_key(DeviceId(0)), 0x3747_08ff_f771_9dd5);
    }

    #[test]
    fn adding_a_fourth_member_moves_about_a_quarter_and_only_to_it() {
        let three = Ring::new(Epoch(1), [1, 2, 3], 128);
        let four = Ring::new(Epoch(2), [1, 2, 3, 4], 128);
        let total = 20_000;
        let mut moved = 0;
        for device in devices(total) {
            let (before, after) = (three.owner(device).unwrap(), four.owner(device).unwrap());
            if before != after {
                moved += 1;
                assert_eq!(after, 4, "a key moved between old members");
            }
        }
        let fraction = moved as f64 / total as f64;
        assert!((0.15..0.35).contains(&fraction), "moved {fraction}");
    }

    #[test]
    fn shares_are_balanced_and_sum_to_one() {
        let shares = Ring::new(Epoch(1), [1, 2, 3], 128).shares();
        let sum: f64 = shares.values().sum();
        assert!((sum - 1.0).abs() < 1e-9);
        for share in shares.values() {
            assert!((0.2..0.46).contains(share), "{shares:?}");
        }
        assert!(Ring::new(Epoch(0), [], 128).owner(DeviceId(1)).is_none());
    }
}
