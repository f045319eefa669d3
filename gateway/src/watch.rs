//! The gateway's view of the cluster, learned only from nodes' `WatchCluster` streams: the ring of the
//! latest epoch, member addresses, token keys, provider credentials and refused clones.
//!
//! One task keeps one stream open to some member. When that member goes away it fails over to the next
//! candidate (the configured seeds, then every member the last view named), so the gateway keeps routing
//! as long as any member answers. A view older than the one held is ignored: a lagging member must not
//! turn the gateway's clock back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use courier_node::ids::DeviceId;
use courier_node::peer::Peers;
use courier_node::pki::ProviderCredential;
use courier_node::raft::state::{ClusterState, Epoch, Member, MemberState, NodeId};
use courier_node::ring::Ring;
use courier_node::token::Keyring;
use courier_proto::cluster::WatchRequest;
use tokio::sync::watch;

use crate::http::jwt::ProviderCredentials;

/// One epoch as the gateway routes by it.
pub struct GatewayView {
    pub epoch: Epoch,
    pub leader: NodeId,
    pub ring: Ring,
    pub members: BTreeMap<NodeId, Member>,
    /// Suspected clones the cluster refuses → since when (UNIX ms): their pushes answer 410.
    pub refused_clones: BTreeMap<DeviceId, u64>,
}

impl GatewayView {
    fn from_state(state: &ClusterState, leader: NodeId) -> Self {
        let refused_clones =
            state.suspected_clones.iter().filter(|(_, s)| s.refuse).map(|(device, s)| (*device, s.since_ms)).collect();
        GatewayView {
            epoch: state.epoch,
            leader,
            ring: Ring::from_state(state),
            members: state.members.clone(),
            refused_clones,
        }
    }

    /// Since when the cluster refuses `device` as a clone, if it does.
    pub fn refused_clone(&self, device: DeviceId) -> Option<u64> {
        self.refused_clones.get(&device).copied()
    }

    /// The owner of `device` and its cluster API address.
    pub fn owner(&self, device: DeviceId) -> Option<(NodeId, &str)> {
        let owner = self.ring.owner(device)?;
        self.members.get(&owner).map(|m| (owner, m.cluster_addr.as_str()))
    }
}

pub type ViewReceiver = watch::Receiver<Option<Arc<GatewayView>>>;

/// Watches the cluster until `shutdown`, publishing each new view and keeping `keyring` and
/// `credentials` current.
pub struct ClusterWatch {
    pub seeds: Vec<String>,
    pub peers: Arc<Peers>,
    pub keyring: Keyring,
    pub credentials: ProviderCredentials,
}

impl ClusterWatch {
    pub async fn run(self, views: watch::Sender<Option<Arc<GatewayView>>>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let candidates = self.candidates(&views.borrow());
            for addr in candidates {
                tokio::select! {
                    outcome = self.follow(&addr, &views) => match outcome {
                        Ok(()) => tracing::info!(%addr, "cluster watch ended; failing over"),
                        Err(error) => tracing::info!(%addr, %error, "cluster watch unavailable; failing over"),
                    },
                    _ = courier_node::edge::stopped(&mut shutdown) => return,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = courier_node::edge::stopped(&mut shutdown) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Seeds first, then the last view's members, active ones before the rest, without repeats.
    fn candidates(&self, view: &Option<Arc<GatewayView>>) -> Vec<String> {
        let mut out: Vec<String> = self.seeds.clone();
        if let Some(view) = view {
            let mut members: Vec<&Member> = view.members.values().collect();
            members.sort_by_key(|m| (m.state != MemberState::Active, m.id));
            out.extend(members.into_iter().map(|m| m.cluster_addr.clone()));
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|addr| seen.insert(addr.clone()));
        out
    }

    async fn follow(&self, addr: &str, views: &watch::Sender<Option<Arc<GatewayView>>>) -> Result<(), String> {
        let mut client = self.peers.client(addr).map_err(|e| e.to_string())?;
        let request = WatchRequest { watcher: "gateway".into() };
        let mut stream = client.watch_cluster(request).await.map_err(|s| s.message().to_string())?.into_inner();
        tracing::info!(%addr, "watching the cluster");
        while let Some(message) = stream.message().await.map_err(|s| s.message().to_string())? {
            let state: ClusterState = serde_json::from_slice(&message.state_json).map_err(|e| e.to_string())?;
            let newer = views.borrow().as_ref().is_none_or(|held| state.epoch >= held.epoch);
            if !newer {
                continue;
            }
            self.apply(&state);
            metrics::gauge!("courier_gateway_cluster_epoch").set(state.epoch.0 as f64);
            views.send_replace(Some(Arc::new(GatewayView::from_state(&state, message.leader_id))));
        }
        Ok(())
    }

    fn apply(&self, state: &ClusterState) {
        state.sync_keyring(&self.keyring);
        let credentials: Vec<ProviderCredential> = state
            .providers
            .iter()
            .flat_map(|(team_id, team)| {
                team.keys.iter().map(move |(key_id, pem)| ProviderCredential {
                    team_id: team_id.clone(),
                    key_id: key_id.clone(),
                    public_key_pem: pem.clone(),
                    topics: team.topics.clone(),
                })
            })
            .collect();
        for error in self.credentials.replace_lenient(credentials) {
            tracing::error!(%error, "a provider key in the cluster state does not load; it is not accepted");
        }
    }
}
