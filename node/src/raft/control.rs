//! Using the Raft group: proposing commands (forwarded to the leader from any node), joining and
//! removing members, bootstrapping a new cluster, and the duties only the leader performs — failure
//! detection by probing members, and token-key rotation and retirement on their schedule.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use courier_proto::cluster::cluster_client::ClusterClient;
use courier_proto::cluster::{JoinRequest, JoinResponse, ProbeRequest, ProposeRequest, RemoveNodeRequest};
use futures_util::future::join_all;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;

use courier_core::shutdown::CancellationToken;

use super::Raft;
use super::channels::ChannelShelf;
use super::lease::Lease;
use super::state::{ClusterState, Command, CommandResponse, KeyState, MemberState, NodeId};
use crate::ids::unix_millis;
use crate::peer::Peers;
use crate::pki::{PkiDir, ProviderCredential};
use crate::telemetry::Readiness;
use crate::token::{Keyring, TokenKey, TokenKeyId};

/// Most voters the group keeps; further members are learners.
pub const MAX_VOTERS: usize = 5;
/// How long a proposal may wait for a leader to exist.
const LEADER_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no Raft leader within {0:?}")]
    NoLeader(Duration),
    #[error("raft: {0}")]
    Raft(String),
    #[error("forwarding to the leader: {0}")]
    Forward(String),
    #[error("refused: {0}")]
    Refused(String),
}

impl From<ControlError> for tonic::Status {
    fn from(error: ControlError) -> Self {
        match error {
            ControlError::Refused(reason) => tonic::Status::failed_precondition(reason),
            ControlError::NoLeader(_) => tonic::Status::unavailable(error.to_string()),
            other => tonic::Status::internal(other.to_string()),
        }
    }
}

/// Timings of the leader's duties.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// How often the leader probes each member.
    pub probe_interval: Duration,
    /// A member unanswered for this long is marked down.
    pub failure_timeout: Duration,
    /// A member marked down answers every probe for this long before it is marked active again.
    pub rejoin_after: Duration,
    /// Rotate the token key automatically this often; `None` = only on `courier ctl keys rotate`.
    pub key_rotation: Option<Duration>,
    /// How long a rotated-out key keeps opening tokens before it retires.
    pub key_grace: Duration,
    /// Most channels a team may create for one app (carried in each create this node proposes).
    pub max_channels_per_app: u32,
}

/// What the leader has seen of each member's probes since it began to lead.
#[derive(Default)]
struct ProbeHistory {
    /// When each member last answered.
    last_answer: HashMap<NodeId, Instant>,
    /// Since when each member has answered every probe (absent after a miss).
    answering_since: HashMap<NodeId, Instant>,
}

impl ProbeHistory {
    /// Whether `member`, which missed this round's probe, has been silent for `failure_timeout` at `now`
    /// (from its last answer, or from `since`, when this node began to lead, if it never answered). Never
    /// in a round that no member answered: silence from everyone at once is more likely this node's own
    /// stall (it could not read the answers in time) than every other member failing together, and if they
    /// had, marking them down could not commit anyway. A loaded leader that stalled for a few seconds used
    /// to mark every member down at once, putting every device on itself.
    fn missed_too_long(
        &self,
        member: NodeId,
        since: Instant,
        failure_timeout: Duration,
        any_answered: bool,
        now: Instant,
    ) -> bool {
        let silent_since = self.last_answer.get(&member).copied().unwrap_or(since);
        any_answered && now.saturating_duration_since(silent_since) >= failure_timeout
    }
}

/// This node's handle on the Raft group.
pub struct Control {
    pub id: NodeId,
    pub raft: Raft,
    pub state: watch::Receiver<Arc<ClusterState>>,
    pub peers: Arc<Peers>,
    pub settings: ControlSettings,
    /// Whether this node has heard from a quorum recently enough to act as an owner.
    pub lease: Arc<Lease>,
    /// Serialises membership changes on the leader: openraft refuses a change while another is in
    /// flight, and several nodes joining at once is the normal way a cluster starts.
    pub membership_changes: tokio::sync::Mutex<()>,
    /// The applied channel book (written by the state machine only).
    pub channels: Arc<ChannelShelf>,
}

impl Control {
    pub fn current(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The index of the last Raft log entry this node has applied.
    pub fn applied_index(&self) -> u64 {
        self.raft.metrics().borrow().last_applied.map_or(0, |log_id| log_id.index)
    }

    /// An active member of the epoch it has applied, with a known leader and the lease: what `/readyz`
    /// reports.
    pub fn is_serving(&self) -> bool {
        let active = self.current().members.get(&self.id).is_some_and(|m| m.state == MemberState::Active);
        active && self.leader().is_some() && self.lease.held()
    }

    /// The client for a peer's cluster API, for forwarding to the leader.
    fn forward_to(&self, addr: &str) -> Result<ClusterClient<Channel>, ControlError> {
        self.peers.client(addr).map_err(|e| ControlError::Forward(e.to_string()))
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id)
    }

    /// Cluster API address of `node` as Raft's membership knows it.
    fn raft_addr(&self, node: NodeId) -> Option<String> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics.membership_config.membership().get_node(&node).map(|n| n.addr.clone())
    }

    /// Voter and learner ids of the current Raft membership.
    fn raft_members(&self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners = membership.learner_ids().filter(|id| !voters.contains(id)).collect();
        (voters, learners)
    }

    /// Waits until some node is leader; returns its id and address.
    pub async fn wait_for_leader(&self) -> Result<(NodeId, String), ControlError> {
        let give_up = Instant::now() + LEADER_WAIT;
        loop {
            if let Some(leader) = self.leader()
                && let Some(addr) = self.raft_addr(leader)
            {
                return Ok((leader, addr));
            }
            if Instant::now() > give_up {
                return Err(ControlError::NoLeader(LEADER_WAIT));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Commits `command` through Raft, from whichever node this is. A command out of the state's limits
    /// is refused here, before it reaches the log (the state machine checks again when it applies).
    pub async fn propose(&self, command: Command) -> Result<CommandResponse, ControlError> {
        command.validate(&self.current()).map_err(ControlError::Refused)?;
        let (leader, addr) = self.wait_for_leader().await?;
        if leader == self.id {
            return match self.raft.client_write(command.clone()).await {
                Ok(written) => Ok(written.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(to))) => match to.leader_node {
                    Some(node) => self.forward_propose(&node.addr, &command).await,
                    None => Err(ControlError::NoLeader(LEADER_WAIT)),
                },
                Err(error) => Err(ControlError::Raft(error.to_string())),
            };
        }
        self.forward_propose(&addr, &command).await
    }

    async fn forward_propose(&self, addr: &str, command: &Command) -> Result<CommandResponse, ControlError> {
        let command_json = serde_json::to_vec(command).map_err(|e| ControlError::Forward(e.to_string()))?;
        let mut client = self.forward_to(addr)?;
        let answer = client
            .propose(ProposeRequest { command_json })
            .await
            .map_err(|status| ControlError::Forward(status.message().to_string()))?
            .into_inner();
        serde_json::from_slice(&answer.response_json).map_err(|e| ControlError::Forward(e.to_string()))
    }

    /// Proposes and turns a state-machine refusal into an error.
    pub async fn apply(&self, command: Command) -> Result<super::Epoch, ControlError> {
        match self.propose(command).await? {
            CommandResponse::Applied { epoch } => Ok(epoch),
            CommandResponse::Refused { reason } => Err(ControlError::Refused(reason)),
            CommandResponse::ChannelApplied { .. } => Ok(self.current().epoch),
            CommandResponse::ChannelRefused { refusal } => Err(ControlError::Refused(format!("{refusal:?}"))),
        }
    }

    /// Adds a node to the group and the control state; run on the leader, forwarded from elsewhere.
    pub async fn join(&self, request: JoinRequest) -> Result<JoinResponse, ControlError> {
        let (leader, addr) = self.wait_for_leader().await?;
        if leader != self.id {
            let mut client = self.forward_to(&addr)?;
            return client
                .join(request)
                .await
                .map(|r| r.into_inner())
                .map_err(|status| ControlError::Forward(status.message().to_string()));
        }
        let id = request.node_id;
        let put = Command::PutMember {
            id,
            device_addr: request.device_addr.clone(),
            cluster_addr: request.cluster_addr.clone(),
            device_name: crate::pki::node_device_name(id),
            now_ms: unix_millis(),
        };
        // Checked before Raft's membership changes, so a node the state would refuse never becomes a learner.
        put.validate(&self.current()).map_err(ControlError::Refused)?;
        let _serial = self.membership_changes.lock().await;
        let (voters, learners) = self.raft_members();
        if !voters.contains(&id) && !learners.contains(&id) {
            self.raft
                .add_learner(id, BasicNode::new(&request.cluster_addr), true)
                .await
                .map_err(|e| ControlError::Raft(e.to_string()))?;
        }
        let (voters, _) = self.raft_members();
        let voter = voters.contains(&id) || voters.len() < MAX_VOTERS;
        if voter && !voters.contains(&id) {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                .await
                .map_err(|e| ControlError::Raft(e.to_string()))?;
        }
        self.apply(put).await?;
        self.apply(Command::SetMemberState { id, state: MemberState::Active, now_ms: unix_millis() }).await?;
        tracing::info!(node = id, voter, "node joined the cluster");
        Ok(JoinResponse { leader_id: self.id, voter })
    }

    /// Takes a node out of the group and the control state, promoting a learner if a voter left.
    pub async fn remove(&self, id: NodeId) -> Result<(), ControlError> {
        let (leader, addr) = self.wait_for_leader().await?;
        if leader != self.id {
            let mut client = self.forward_to(&addr)?;
            client
                .remove_node(RemoveNodeRequest { node_id: id })
                .await
                .map_err(|status| ControlError::Forward(status.message().to_string()))?;
            return Ok(());
        }
        if id == self.id {
            // openraft 0.9 cannot take the leader out of the voters from the leader itself.
            return Err(ControlError::Refused(format!(
                "node {id} is the Raft leader; stop it first (another node takes over) and remove it then"
            )));
        }
        let raft_err = |e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>| ControlError::Raft(e.to_string());
        let _serial = self.membership_changes.lock().await;
        let (voters, learners) = self.raft_members();
        if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(ControlError::Refused("cannot remove the last voter".into()));
            }
            self.raft.change_membership(ChangeMembers::RemoveVoters([id].into()), false).await.map_err(raft_err)?;
            if let Some(learner) = learners.iter().find(|l| **l != id) {
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds([*learner].into()), false)
                    .await
                    .map_err(raft_err)?;
            }
        }
        if voters.contains(&id) || learners.contains(&id) {
            self.raft.change_membership(ChangeMembers::RemoveNodes([id].into()), false).await.map_err(raft_err)?;
        }
        if self.current().members.contains_key(&id) {
            self.apply(Command::RemoveMember { id }).await?;
        }
        Ok(())
    }

    /// Starts a new cluster with this node as its only voter, seeding the token keys and the provider
    /// credential from the PKI directory.
    pub async fn initialize(&self, cluster_addr: &str, device_addr: &str, pki: &PkiDir) -> Result<(), ControlError> {
        let members = BTreeMap::from([(self.id, BasicNode::new(cluster_addr))]);
        self.raft.initialize(members).await.map_err(|e| ControlError::Raft(e.to_string()))?;
        let now_ms = unix_millis();
        self.apply(Command::PutMember {
            id: self.id,
            device_addr: device_addr.to_string(),
            cluster_addr: cluster_addr.to_string(),
            device_name: crate::pki::node_device_name(self.id),
            now_ms,
        })
        .await?;
        self.apply(Command::SetMemberState { id: self.id, state: MemberState::Active, now_ms }).await?;
        if self.current().token_keys.is_empty() {
            let keyring = Keyring::load(&pki.token_keys()).map_err(|e| ControlError::Refused(e.to_string()))?;
            if let Some(active) = keyring.active() {
                self.apply(Command::RotateTokenKey { key: active, now_ms }).await?;
            }
        }
        if self.current().providers.is_empty()
            && let Ok(credential) = ProviderCredential::load(&pki.provider_credential())
        {
            self.apply(Command::PutProviderKey {
                team_id: credential.team_id,
                key_id: credential.key_id,
                public_key_pem: credential.public_key_pem,
                topics: credential.topics,
            })
            .await?;
        }
        tracing::info!(node = self.id, "initialized a new cluster");
        Ok(())
    }

    /// A new token key, numbered after every existing one.
    pub fn next_token_key(&self) -> TokenKey {
        let next = self.current().token_keys.keys().map(|id| id.0).max().unwrap_or(0) + 1;
        TokenKey::generate(TokenKeyId(next))
    }

    /// A node restarted after a drain or a crash asks to be active again once a leader is known (after a crash,
    /// once it has run for `rejoin_after`).
    pub async fn reactivate(self: Arc<Self>, shutdown: CancellationToken) {
        let started = tokio::time::Instant::now();
        loop {
            let me = self.current().members.get(&self.id).map(|m| m.state);
            // A node that drained left on purpose and comes back at once; one the leader marked down (it
            // crashed, or was cut off) first runs for `rejoin_after`, as the leader would make it answer for.
            let settled = started.elapsed() >= self.settings.rejoin_after;
            match me {
                Some(MemberState::Draining) | Some(MemberState::Down)
                    if self.leader().is_some() && (me == Some(MemberState::Draining) || settled) =>
                {
                    let now_ms = unix_millis();
                    let command = Command::SetMemberState { id: self.id, state: MemberState::Active, now_ms };
                    match self.apply(command).await {
                        Ok(_) => return,
                        Err(error) => tracing::info!(%error, "asking to be active again; will retry"),
                    }
                }
                Some(MemberState::Active) => return,
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Ready once this node is an active member of an epoch it has applied and a leader is known.
    pub async fn track_readiness(self: Arc<Self>, readiness: Readiness, shutdown: CancellationToken) {
        loop {
            readiness.set(self.is_serving());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// The leader's periodic duties; runs on every node and acts only while it leads. A tick that cannot
    /// finish (an isolated leader's writes never commit) is abandoned after twice the failure timeout, so
    /// the duties go on once the leader can commit again, or stop when it no longer leads.
    pub async fn run_leader_duties(self: Arc<Self>, shutdown: CancellationToken) {
        let mut probes = ProbeHistory::default();
        let mut leading_since: Option<Instant> = None;
        let bound = self.settings.failure_timeout.max(self.settings.probe_interval) * 2;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.probe_interval) => {}
                _ = shutdown.cancelled() => return,
            }
            if !self.is_leader() {
                leading_since = None;
                continue;
            }
            let since = *leading_since.get_or_insert_with(|| {
                probes = ProbeHistory::default();
                Instant::now()
            });
            let tick = tokio::select! {
                tick = tokio::time::timeout(bound, self.leader_tick(&mut probes, since)) => tick,
                _ = shutdown.cancelled() => return,
            };
            match tick {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "leader duties"),
                Err(_) => {
                    metrics::counter!("courier_node_leader_ticks_abandoned_total").increment(1);
                    tracing::warn!(bound_ms = bound.as_millis() as u64, "leader duties did not finish; abandoned");
                }
            }
        }
    }

    async fn leader_tick(&self, probes: &mut ProbeHistory, since: Instant) -> Result<(), ControlError> {
        let state = self.current();
        let now_ms = unix_millis();
        if let Some(me) = state.members.get(&self.id)
            && matches!(me.state, MemberState::Down | MemberState::Joining)
        {
            self.apply(Command::SetMemberState { id: self.id, state: MemberState::Active, now_ms }).await?;
        }
        let others: Vec<_> = state.members.values().filter(|m| m.id != self.id).cloned().collect();
        // A member that answers late is busy, not gone: an answer counts until the failure timeout, so a
        // loaded node is not marked down (and its devices moved, loading the others) while it still answers.
        let probe_timeout = self.settings.failure_timeout.max(self.settings.probe_interval);
        let answers = join_all(others.iter().map(|member| async move {
            let Ok(mut client) = self.peers.client(&member.cluster_addr) else { return false };
            let mut request = tonic::Request::new(ProbeRequest { from_node: self.id });
            request.set_timeout(probe_timeout);
            matches!(
                tokio::time::timeout(probe_timeout, client.probe(request)).await,
                Ok(Ok(answer)) if answer.get_ref().node_id == member.id
            )
        }))
        .await;
        let any_answered = answers.iter().any(|answered| *answered);
        if !any_answered && !others.is_empty() {
            metrics::counter!("courier_node_probe_rounds_unanswered_total").increment(1);
            tracing::warn!(members = others.len(), "no member answered this probe round; marking none down");
        }
        for (member, answered) in others.iter().zip(answers) {
            let now = Instant::now();
            if answered {
                probes.last_answer.insert(member.id, now);
                let streak = *probes.answering_since.entry(member.id).or_insert(now);
                // A new member joins at once; one marked down must first answer for `rejoin_after`.
                let rejoin = match member.state {
                    MemberState::Joining => true,
                    MemberState::Down => now.duration_since(streak) >= self.settings.rejoin_after,
                    _ => false,
                };
                if rejoin {
                    tracing::info!(node = member.id, "member answers again; marking it active");
                    self.apply(Command::SetMemberState { id: member.id, state: MemberState::Active, now_ms }).await?;
                }
                continue;
            }
            probes.answering_since.remove(&member.id);
            let timeout = self.settings.failure_timeout;
            if member.state == MemberState::Active
                && probes.missed_too_long(member.id, since, timeout, any_answered, now)
            {
                tracing::warn!(node = member.id, "member missed its probes; marking it down");
                self.apply(Command::SetMemberState { id: member.id, state: MemberState::Down, now_ms }).await?;
            }
        }
        if let Some(period) = self.settings.key_rotation
            && let Some(active) = state.active_key()
            && active.created_ms + period.as_millis() as u64 <= now_ms
        {
            let key = self.next_token_key();
            tracing::info!(key = key.id.0, "rotating the token key on schedule");
            self.apply(Command::RotateTokenKey { key, now_ms }).await?;
        }
        let grace = self.settings.key_grace.as_millis() as u64;
        for record in state.token_keys.values() {
            if record.state == KeyState::Accepting && record.state_since_ms + grace <= now_ms {
                tracing::info!(key = record.key.id.0, "retiring a token key after its grace period");
                self.apply(Command::RetireTokenKey { id: record.key.id, now_ms }).await?;
            }
        }
        Ok(())
    }

    /// Joins through `seeds` (tried in turn, again and again) until a member accepts.
    pub async fn join_through(&self, seeds: &[String], request: JoinRequest, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            for seed in seeds {
                let attempt = async {
                    let mut client = self.peers.client(seed).map_err(|e| e.to_string())?;
                    client.join(request.clone()).await.map_err(|s| s.message().to_string())
                };
                match attempt.await {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        tracing::info!(leader = answer.leader_id, voter = answer.voter, %seed, "joined the cluster");
                        return;
                    }
                    Err(error) => tracing::info!(%seed, %error, "join attempt failed; will retry"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_down_after_the_failure_timeout_only_in_a_round_another_member_answered() {
        let timeout = Duration::from_secs(3);
        let began = Instant::now();
        let mut probes = ProbeHistory::default();
        probes.last_answer.insert(2, began + Duration::from_secs(1));
        let at = |secs: u64| began + Duration::from_secs(secs);
        // Silent for 2 s, then for 3 s, counted from its last answer.
        assert!(!probes.missed_too_long(2, began, timeout, true, at(3)));
        assert!(probes.missed_too_long(2, began, timeout, true, at(4)));
        // A member that never answered is counted from when this node began to lead.
        assert!(!probes.missed_too_long(3, began, timeout, true, at(2)));
        assert!(probes.missed_too_long(3, began, timeout, true, at(3)));
        // Nobody answered this round: nobody is marked down, however long the silence.
        assert!(!probes.missed_too_long(2, began, timeout, false, at(60)));
        assert!(!probes.missed_too_long(3, began, timeout, false, at(60)));
    }
}
