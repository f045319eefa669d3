//! Keeping the node in step with each applied epoch: the view and the keyring at once (`follow_state`),
//! then the slower work in the background (`reconcile`): queues moved to their new holders, revoked
//! devices and refused clones closed, devices the ring places elsewhere redirected.

use std::sync::Arc;
use std::time::Duration;

use courier_core::shutdown::CancellationToken;
use courier_proto::device::GoodbyeReason;
use tokio::sync::watch;

use crate::edge::registry::{LinkEnd, Registry};
use crate::raft::state::{ClusterState, Epoch};
use crate::replication::{RebalanceReport, Replicator};
use crate::ring::Ring;
use crate::store::Store;
use crate::token::Keyring;
use crate::view::{LocalView, Placement};

/// What `follow_state` keeps in step with the applied state.
#[derive(Clone)]
pub struct Followers {
    pub view: Arc<LocalView>,
    pub keyring: Keyring,
    pub registry: Arc<Registry>,
    pub store: Store,
    pub replicator: Arc<Replicator>,
    pub rebalanced: watch::Sender<Epoch>,
}

/// Keeps the view and the keyring in step with every applied epoch at once, and hands each epoch to
/// `reconcile` for the slower work. The view must never wait behind that work: a node routing new links by
/// an older epoch than its peers would bounce devices between them.
pub async fn follow_state(
    mut state: watch::Receiver<Arc<ClusterState>>,
    followers: Followers,
    redirect_rate: u32,
    shutdown: CancellationToken,
) {
    let (latest, work) = watch::channel(state.borrow().clone());
    let reconciler = tokio::spawn(reconcile(work, followers.clone(), redirect_rate, shutdown.clone()));
    loop {
        tokio::select! {
            changed = state.changed() => if changed.is_err() { break },
            _ = shutdown.cancelled() => break,
        }
        let current = state.borrow_and_update().clone();
        followers.view.update(current.clone());
        current.sync_keyring(&followers.keyring);
        latest.send_replace(current);
    }
    drop(latest);
    let _ = reconciler.await;
}

/// When the ring changes, moves queues to their new holders; then closes the links of revoked devices and
/// refused clones, and redirects devices the ring places elsewhere, at most `redirect_rate` a second so
/// that a membership change does not become a reconnect storm. Always works on the newest epoch: a newer one arriving during
/// a redirect pass starts the pass over.
async fn reconcile(
    mut work: watch::Receiver<Arc<ClusterState>>,
    followers: Followers,
    redirect_rate: u32,
    shutdown: CancellationToken,
) {
    let Followers { view, registry, store, replicator, rebalanced, .. } = followers;
    let pause = Duration::from_secs(1) / redirect_rate.max(1);
    let mut ring_before = Ring::from_state(&work.borrow());
    loop {
        tokio::select! {
            changed = work.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        let current = work.borrow_and_update().clone();
        let ring = Ring::from_state(&current);
        if ring.members() != ring_before.members() || ring_before.members().is_empty() {
            let rebalance = tokio::select! {
                result = replicator.rebalance(&store, &ring_before) => result,
                _ = shutdown.cancelled() => return,
            };
            match rebalance {
                Ok(report) if report != RebalanceReport::default() => {
                    tracing::info!(epoch = current.epoch.0, ?report, "queues moved for the new ring");
                }
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "moving queues for the new ring failed"),
            }
            ring_before = ring;
        }
        rebalanced.send_replace(current.epoch);
        for device in registry.devices() {
            if work.has_changed().unwrap_or(true) {
                break;
            }
            if current.revoked.contains(&device) {
                registry.close(device, LinkEnd::Goodbye(GoodbyeReason::Revoked));
                continue;
            }
            if current.refuses_clone(device) {
                registry.close(device, LinkEnd::Goodbye(GoodbyeReason::ClonedIdentity));
                continue;
            }
            if let Placement::Elsewhere { device_addr, device_name, .. } = view.placement(device) {
                let to = courier_proto::device::Redirect { device_addr, server_name: device_name };
                registry.close(device, LinkEnd::Redirect(to));
                tokio::time::sleep(pause).await;
            }
        }
    }
}
