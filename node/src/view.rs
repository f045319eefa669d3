//! What this node believes about the cluster right now, derived from the applied Raft state: the ring of
//! the current epoch, where each member's devices connect, and which devices are revoked or refused as
//! clones. Sessions and the delivery path read it; only the state watcher in `node` writes it. The
//! forwarding stream also waits on it, for a gateway's batch stamped with an epoch not applied here yet.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::ids::DeviceId;
use crate::raft::lease::Lease;
use crate::raft::state::{ClusterState, Epoch, NodeId};
use crate::ring::Ring;

/// One epoch's state and the ring built from it.
pub struct EpochView {
    pub state: Arc<ClusterState>,
    pub ring: Ring,
}

impl EpochView {
    /// Whether `node` owns `device` in this epoch.
    pub fn owns(&self, node: NodeId, device: DeviceId) -> bool {
        self.ring.owner(device) == Some(node)
    }

    /// How many holders a stored notification must have in this epoch: the replication factor, or, with
    /// `degraded` writes allowed, every active member when fewer are active.
    pub fn copies_wanted(&self, degraded: bool) -> usize {
        let factor = self.state.ring.copies();
        if degraded { factor.min(self.ring.members().len().max(1)) } else { factor }
    }
}

/// Where a device belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// This node owns it.
    Here,
    /// Another member owns it; its device address and the name its certificate carries for devices.
    Elsewhere { node: NodeId, device_addr: String, device_name: String },
    /// No active member yet (the cluster is forming).
    Nowhere,
}

/// How the epoch stamped on another node's request compares with this node's view.
pub enum Fence {
    /// The same epoch: the sender decided with what this node knows.
    Current,
    /// This node has applied a newer epoch (given): the sender may act on ownership that has moved.
    Behind(Arc<EpochView>),
    /// This node did not reach the request's epoch within its wait.
    Ahead,
}

pub struct LocalView {
    pub id: NodeId,
    current: RwLock<Arc<EpochView>>,
    /// The epoch of `current`, published after it is in place, for callers waiting to reach an epoch.
    epoch: watch::Sender<Epoch>,
    /// The owner's lease (`raft::lease`); `None` only where no Raft group runs (unit tests), which always
    /// act as owners.
    lease: Option<Arc<Lease>>,
}

impl LocalView {
    pub fn new(id: NodeId, state: Arc<ClusterState>, lease: Option<Arc<Lease>>) -> Self {
        let ring = Ring::from_state(&state);
        let epoch = watch::Sender::new(state.epoch);
        LocalView { id, current: RwLock::new(Arc::new(EpochView { state, ring })), epoch, lease }
    }

    /// Whether this node may act as the owner of the devices its view gives it: it holds the lease, so the
    /// cluster cannot have given them to another node yet.
    pub fn holds_lease(&self) -> bool {
        self.lease.as_ref().is_none_or(|lease| lease.held())
    }

    pub fn update(&self, state: Arc<ClusterState>) {
        let ring = Ring::from_state(&state);
        let epoch = state.epoch;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(EpochView { state, ring });
        self.epoch.send_replace(epoch);
    }

    /// Whether this view reaches `epoch` (or a later one) within `within`; true at once if it has already.
    pub async fn reached(&self, epoch: Epoch, within: Duration) -> bool {
        let mut applied = self.epoch.subscribe();
        matches!(tokio::time::timeout(within, applied.wait_for(|now| *now >= epoch)).await, Ok(Ok(_)))
    }

    /// Where a data-plane request another node stamped with `epoch` stands against this view, after
    /// waiting up to `within` for this view to reach it.
    pub async fn fence(&self, epoch: Epoch, within: Duration) -> Fence {
        if !self.reached(epoch, within).await {
            return Fence::Ahead;
        }
        let view = self.get();
        if view.state.epoch > epoch { Fence::Behind(view) } else { Fence::Current }
    }

    pub fn get(&self) -> Arc<EpochView> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn placement(&self, device: DeviceId) -> Placement {
        let view = self.get();
        match view.ring.owner(device) {
            None => Placement::Nowhere,
            Some(owner) if owner == self.id => Placement::Here,
            Some(owner) => match view.state.members.get(&owner) {
                Some(member) => Placement::Elsewhere {
                    node: owner,
                    device_addr: member.device_addr.clone(),
                    device_name: member.device_name(),
                },
                None => Placement::Nowhere,
            },
        }
    }

    pub fn is_revoked(&self, device: DeviceId) -> bool {
        self.get().state.revoked.contains(&device)
    }

    /// The device is a suspected clone recorded with the `refuse` policy: its links are turned away.
    pub fn refuses_clone(&self, device: DeviceId) -> bool {
        self.get().state.refuses_clone(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_at(epoch: u64) -> Arc<ClusterState> {
        Arc::new(ClusterState { epoch: Epoch(epoch), ..ClusterState::default() })
    }

    #[tokio::test]
    async fn a_wait_for_an_epoch_ends_when_the_view_reaches_it_or_at_the_bound() {
        let view = Arc::new(LocalView::new(1, state_at(5), None));
        assert!(view.reached(Epoch(4), Duration::ZERO).await, "an older epoch is reached already");
        assert!(view.reached(Epoch(5), Duration::ZERO).await);
        assert!(!view.reached(Epoch(6), Duration::from_millis(20)).await, "nothing applied epoch 6");

        let waiting = tokio::spawn({
            let view = view.clone();
            async move { view.reached(Epoch(7), Duration::from_secs(30)).await }
        });
        view.update(state_at(6));
        view.update(state_at(7));
        assert!(waiting.await.unwrap(), "the wait ends when epoch 7 is applied");
        assert_eq!(view.get().state.epoch, Epoch(7));
    }
}
