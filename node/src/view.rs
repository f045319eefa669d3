//! What this node believes about the cluster right now, derived from the applied Raft state: the ring of
//! the current epoch, where each member's devices connect, and which devices are revoked or refused as
//! clones. Sessions and the delivery path read it; only the state watcher in `node` writes it.

use std::sync::{Arc, RwLock};

use crate::ids::DeviceId;
use crate::raft::state::{ClusterState, NodeId};
use crate::ring::Ring;

/// One epoch's state and the ring built from it.
pub struct EpochView {
    pub state: Arc<ClusterState>,
    pub ring: Ring,
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

pub struct LocalView {
    pub id: NodeId,
    current: RwLock<Arc<EpochView>>,
}

impl LocalView {
    pub fn new(id: NodeId, state: Arc<ClusterState>) -> Self {
        let ring = Ring::from_state(&state);
        LocalView { id, current: RwLock::new(Arc::new(EpochView { state, ring })) }
    }

    pub fn update(&self, state: Arc<ClusterState>) {
        let ring = Ring::from_state(&state);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(EpochView { state, ring });
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
