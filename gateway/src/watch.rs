//! The gateway's view of the cluster, learned only from nodes' `WatchCluster` streams: the ring of the
//! latest epoch, member addresses, token keys, provider credentials and refused clones.
//!
//! One task keeps one stream open to some member. The node sends the state whenever it changes and a
//! heartbeat (epoch, leader, applied index) every second otherwise. When the stream breaks, ends, stays
//! silent for three heartbeats (a paused or hung node), or its node knows no leader or has lost its owner's
//! lease (it has not heard from a Raft quorum, `courier_node::raft::lease`) for as long, the
//! gateway fails over to another member of its last view (active ones first, the configured seeds after
//! them, the member it just left last), so it keeps learning new epochs as long as any member answers. It
//! reports ready (`/readyz`) only while the node it follows is heard, knows a leader and holds its lease.
//! A view older than the one held is ignored: a lagging member must not turn the gateway's clock back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use courier_core::ids::DeviceId;
use courier_core::peer::Peers;
use courier_core::pki::ProviderCredential;
use courier_core::ring::Ring;
use courier_core::state::{ClusterState, Epoch, Member, MemberState, NodeId};
use courier_core::telemetry::Readiness;
use courier_core::token::Keyring;
use courier_proto::cluster::WatchRequest;
use tokio::sync::watch;

use courier_core::shutdown::CancellationToken;

use crate::channels::ChannelView;
use crate::http::jwt::ProviderCredentials;

/// One epoch as the gateway routes by it.
pub struct GatewayView {
    pub epoch: Epoch,
    pub leader: NodeId,
    pub ring: Ring,
    pub members: BTreeMap<NodeId, Member>,
    /// Suspected clones the cluster refuses → since when (UNIX ms): their pushes answer 410.
    pub refused_clones: BTreeMap<DeviceId, u64>,
    /// Teams that may not use broadcast channels.
    pub broadcast_disabled: std::collections::BTreeSet<String>,
    /// Teams with a webhook: their pushes carry the team and token, for the owner's receipts.
    pub receipt_teams: std::collections::BTreeSet<String>,
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
            broadcast_disabled: state.broadcast_disabled.clone(),
            receipt_teams: state.webhooks.keys().cloned().collect(),
        }
    }

    /// The members the gateway forwards to: active and draining ones. It keeps a `Forward` stream open to
    /// each, broadcasts reach each, and it keeps receipt copies only for these.
    pub fn serving(&self) -> impl Iterator<Item = &Member> {
        self.members.values().filter(|m| matches!(m.state, MemberState::Active | MemberState::Draining))
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
    /// The gateway's `/readyz`: true while the watched node is heard, knows its leader and holds its lease.
    pub readiness: Readiness,
    /// The channel book, kept from the stream's channel updates.
    pub channels: Arc<ChannelView>,
}

/// A watched node that sends nothing for this long (three missed heartbeats), or that knows no leader or
/// holds no lease for this long, is left for another member.
pub const WATCH_SILENCE: Duration = Duration::from_secs(3 * courier_core::protocol::WATCH_HEARTBEAT.as_secs());

impl ClusterWatch {
    pub async fn run(self, views: watch::Sender<Option<Arc<GatewayView>>>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut left: Option<String> = None;
        loop {
            let mut heard = false;
            let candidates = self.candidates(&views.borrow(), left.as_deref());
            for addr in candidates {
                let (heard_here, why) = tokio::select! {
                    outcome = self.follow(&addr, &views) => outcome,
                    _ = shutdown.cancelled() => return,
                };
                self.readiness.set(false);
                metrics::counter!("courier_gateway_watch_failovers_total").increment(1);
                tracing::info!(%addr, reason = %why, "cluster watch lost; failing over");
                left = Some(addr);
                if heard_here {
                    // The view it gave may name members the list was made without.
                    heard = true;
                    break;
                }
            }
            if heard {
                backoff = Duration::from_millis(100);
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// With no view yet, the configured seeds. With one, its members (active ones first), then the seeds;
    /// the member just `left` comes last, so a failover goes to another member rather than back to a seed
    /// that may be the node that fell silent.
    fn candidates(&self, view: &Option<Arc<GatewayView>>, left: Option<&str>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if let Some(view) = view {
            let mut members: Vec<&Member> = view.members.values().collect();
            members.sort_by_key(|m| (m.state != MemberState::Active, m.id));
            out.extend(members.into_iter().map(|m| m.cluster_addr.clone()));
        }
        out.extend(self.seeds.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        out.retain(|addr| Some(addr.as_str()) != left && seen.insert(addr.clone()));
        out.extend(left.map(str::to_string));
        out
    }

    /// Follows one node's stream until it fails, ends, falls silent or has no leader for `WATCH_SILENCE`.
    /// Returns whether it heard anything, and why it stopped.
    async fn follow(&self, addr: &str, views: &watch::Sender<Option<Arc<GatewayView>>>) -> (bool, String) {
        let mut heard = false;
        let why = self.follow_until_lost(addr, views, &mut heard).await;
        (heard, why)
    }

    async fn follow_until_lost(
        &self,
        addr: &str,
        views: &watch::Sender<Option<Arc<GatewayView>>>,
        heard: &mut bool,
    ) -> String {
        let mut client = match self.peers.client(addr) {
            Ok(client) => client,
            Err(error) => return error.to_string(),
        };
        let request = WatchRequest { watcher: "gateway".into() };
        let opened = tokio::time::timeout(WATCH_SILENCE, client.watch_cluster(request)).await;
        let mut stream = match opened {
            Err(_) => return format!("no answer for {WATCH_SILENCE:?}"),
            Ok(Err(status)) => return status.message().to_string(),
            Ok(Ok(response)) => response.into_inner(),
        };
        tracing::info!(%addr, "watching the cluster");
        let mut leaderless_since: Option<tokio::time::Instant> = None;
        loop {
            let message = match tokio::time::timeout(WATCH_SILENCE, stream.message()).await {
                Err(_) => return format!("nothing heard for {WATCH_SILENCE:?}"),
                Ok(Err(status)) => return status.message().to_string(),
                Ok(Ok(None)) => return "the node ended the stream".to_string(),
                Ok(Ok(Some(message))) => message,
            };
            if !message.state_json.is_empty() {
                let state: ClusterState = match serde_json::from_slice(&message.state_json) {
                    Ok(state) => state,
                    Err(error) => return format!("an unreadable cluster state: {error}"),
                };
                let newer = views.borrow().as_ref().is_none_or(|held| state.epoch >= held.epoch);
                if newer {
                    self.apply(&state);
                    metrics::gauge!("courier_gateway_cluster_epoch").set(state.epoch.0 as f64);
                    views.send_replace(Some(Arc::new(GatewayView::from_state(&state, message.leader_id))));
                }
            }
            if let Some(update) = &message.channels
                && let Err(why) = self.channels.apply(update)
            {
                return why;
            }
            *heard = true;
            if message.leader_id == 0 || message.lease_lost {
                // Between two leaders for a moment, as in any election; for longer, a node cut off from the
                // rest (a leader cut off still names itself, but has lost its lease), whose view may be
                // behind.
                let since = *leaderless_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= WATCH_SILENCE {
                    return format!("the node has been out of touch with the quorum for {WATCH_SILENCE:?}");
                }
            } else {
                leaderless_since = None;
                self.readiness.set(views.borrow().is_some());
            }
        }
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
