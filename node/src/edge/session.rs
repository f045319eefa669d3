//! One device link, from the first frame to the goodbye.
//!
//! A link without a client certificate may only activate: one `Activate` frame in, one `Activated` frame
//! (or a goodbye) out, then close. A link with a verified device certificate says `Hello`, gets `Welcome`
//! with the negotiated keepalive, receives the notifications queued for it, and then exchanges frames until
//! either side closes. Every way a link ends sends a `Goodbye` with a reason when the link can carry one.
//! The device id always comes from the certificate the handshake verified, never from a frame. Every write
//! has a timeout (a device that stops reading is a slow consumer), and frames that cause writes are
//! rate-limited per link: only acks for notifications this link carried reach the store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use courier_proto::cluster::Notification;
use courier_proto::device::{self as wire, DeviceFrame, GoodbyeReason, ServerFrame, device_frame, server_frame};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::codec::Framed;

use courier_core::shutdown::CancellationToken;

use super::Edge;
use super::limits::{Pending, TokenBucket};
use super::registry::{LinkEnd, Outgoing, SharedBroadcast};
use super::socket::Socket;
use crate::ids::{DeviceId, unix_millis};
use crate::pki;
use crate::token::KeyState;
use crate::view::Placement;
use courier_core::channel::ChannelId;
use courier_device::codec::{EncodedFrame, FrameCodec};

pub type Link = Framed<TlsStream<Socket>, FrameCodec<DeviceFrame>>;

/// A device link's stream, on the heap: the session's future then holds a pointer, not the TLS state.
pub fn boxed_link(tls: TlsStream<Socket>, max_frame: usize) -> Box<Link> {
    Box::new(courier_device::codec::lean(tls, FrameCodec::new(max_frame)))
}

/// What a device refused as a suspected clone is told.
const CLONE_DETAIL: &str =
    "this device certificate is in use by more than one device; an operator must clear or revoke it";
/// Notifications a link remembers having carried (to tell its acks from forged ones, and for the latency
/// histogram). Beyond it the link only counts what it carried untracked.
const MAX_TRACKED_INFLIGHT: usize = 4096;
/// Broadcast channels one device may subscribe to.
pub const MAX_CHANNELS_PER_DEVICE: usize = 64;

/// A connection that has not yet sent its first frame: the deadline it has from accept, and its place
/// among pending connections, given up once the first frame arrives.
pub struct Opening {
    pub deadline: Instant,
    pub pending: Pending,
    /// A node shutting down does not wait for first frames.
    pub shutdown: CancellationToken,
}

/// Runs one link to completion.
pub async fn run(mut link: Box<Link>, edge: Arc<Edge>, shutdown: CancellationToken, opening: Opening) {
    let peer_cert = link.get_ref().get_ref().1.peer_certificates().and_then(|chain| chain.first()).cloned();
    match peer_cert {
        None => activate(&mut link, &edge, opening).await,
        Some(cert) => match pki::device_id_from_cert(&cert) {
            Some(device) => serve_device(&mut link, device, &edge, shutdown, opening).await,
            None => goodbye(&mut link, GoodbyeReason::BadCertificate, "certificate names no device id").await,
        },
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), SinkExt::<ServerFrame>::close(&mut link)).await;
}

fn frame(kind: server_frame::Kind) -> ServerFrame {
    ServerFrame { kind: Some(kind) }
}

async fn goodbye(link: &mut Link, reason: GoodbyeReason, detail: &str) {
    metrics::counter!("courier_node_link_goodbyes_total", "reason" => reason.as_str_name()).increment(1);
    let bye = frame(server_frame::Kind::Goodbye(wire::Goodbye { reason: reason as i32, detail: detail.to_string() }));
    let _ = tokio::time::timeout(Duration::from_secs(1), link.send(bye)).await;
}

/// Tells a device the node holds all the links it may, so it backs off and retries (or tries another).
pub async fn refuse_at_capacity(link: &mut Link) {
    goodbye(link, GoodbyeReason::Unavailable, "the node is at its link limit").await;
    let _ = tokio::time::timeout(Duration::from_secs(1), SinkExt::<ServerFrame>::close(link)).await;
}

/// Why a write to the device did not happen.
enum WriteFailed {
    /// The link is gone.
    Closed,
    /// The device stopped reading: told `SLOW_CONSUMER` (if that could still be sent).
    Stalled,
}

/// Writes one frame within the write timeout. A device that does not take it in time is a slow
/// consumer: it is told so (briefly) and the caller closes the link, so no task waits on it for longer.
async fn write(link: &mut Link, edge: &Edge, frame: ServerFrame) -> Result<(), WriteFailed> {
    match tokio::time::timeout(edge.settings.link_limits.write_timeout, link.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteFailed::Closed),
        Err(_) => {
            tracing::debug!("device stopped reading; closing its link");
            goodbye(link, GoodbyeReason::SlowConsumer, "the device did not read within the write timeout").await;
            Err(WriteFailed::Stalled)
        }
    }
}

/// Writes a frame encoded once for many links (a broadcast), within the write timeout like `write`.
async fn write_encoded(link: &mut Link, edge: &Edge, frame: EncodedFrame) -> Result<(), WriteFailed> {
    match tokio::time::timeout(edge.settings.link_limits.write_timeout, link.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteFailed::Closed),
        Err(_) => {
            goodbye(link, GoodbyeReason::SlowConsumer, "the device did not read within the write timeout").await;
            Err(WriteFailed::Stalled)
        }
    }
}

/// Tells the device, after its backlog, what it lost while away (pushed out of a full queue, expired),
/// once; false if the link broke.
async fn tell_missed(link: &mut Link, edge: &Edge, device: DeviceId) -> bool {
    let counts = match edge.delivery.missed(device).await {
        Ok(counts) if !counts.is_empty() => counts,
        Ok(_) => return true,
        Err(error) => {
            tracing::error!(%device, %error, "reading what the device missed failed");
            return true;
        }
    };
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    let topics = counts
        .iter()
        .map(|(topic, dropped, expired)| wire::MissedTopic {
            topic: topic.clone(),
            dropped: clamp(*dropped),
            expired: clamp(*expired),
        })
        .collect();
    if write(link, edge, frame(server_frame::Kind::Missed(wire::Missed { topics }))).await.is_err() {
        return false;
    }
    edge.delivery.missed_told(device, counts);
    true
}

/// Reads the first frame within the connection's deadline, or says goodbye and returns `None`. Either
/// way the connection stops counting as pending.
async fn first_frame(link: &mut Link, opening: Opening) -> Option<device_frame::Kind> {
    let Opening { deadline, pending, shutdown } = opening;
    let first = tokio::select! {
        first = tokio::time::timeout_at(deadline, link.next()) => first,
        _ = shutdown.cancelled() => {
            drop(pending);
            goodbye(link, GoodbyeReason::Shutdown, "node shutting down").await;
            return None;
        }
    };
    drop(pending);
    match first {
        Err(_) => {
            goodbye(link, GoodbyeReason::IdleTimeout, "no frame after the handshake").await;
            None
        }
        Ok(None) => None,
        Ok(Some(Err(error))) => {
            if let Some(reason) = error.goodbye_reason() {
                goodbye(link, reason, &error.to_string()).await;
            }
            None
        }
        Ok(Some(Ok(DeviceFrame { kind: None }))) => {
            goodbye(link, GoodbyeReason::ProtocolViolation, "empty frame").await;
            None
        }
        Ok(Some(Ok(DeviceFrame { kind: Some(kind) }))) => Some(kind),
    }
}

async fn activate(link: &mut Link, edge: &Edge, opening: Opening) {
    let request = match first_frame(link, opening).await {
        Some(device_frame::Kind::Activate(request)) => request,
        Some(_) => {
            return goodbye(link, GoodbyeReason::NotActivated, "no device certificate: only Activate is accepted")
                .await;
        }
        None => return,
    };
    let refused = |why: &'static str| {
        metrics::counter!("courier_node_activations_total", "outcome" => why).increment(1);
    };
    if !edge.settings.enrolment.admits(&request.enrolment_secret) {
        refused("bad_secret");
        return goodbye(link, GoodbyeReason::ActivationRefused, "enrolment secret not accepted").await;
    }
    let device = loop {
        let candidate = DeviceId::random();
        match edge.store.claim_device_id(candidate).await {
            Ok(true) => break candidate,
            Ok(false) => continue,
            Err(error) => {
                refused("store_error");
                tracing::error!(%error, "could not record a new device id");
                return goodbye(link, GoodbyeReason::ActivationRefused, "the node cannot record devices now").await;
            }
        }
    };
    match edge.device_ca.issue(&request.csr_der, device) {
        Ok(cert) => {
            metrics::counter!("courier_node_activations_total", "outcome" => "issued").increment(1);
            tracing::info!(%device, "device activated");
            let activated = wire::Activated {
                device_id: device.to_string(),
                certificate_der: cert.to_vec(),
                owner: first_link_target(edge, device),
            };
            let _ = write(link, edge, frame(server_frame::Kind::Activated(activated))).await;
        }
        Err(error) => {
            refused("bad_csr");
            goodbye(link, GoodbyeReason::ActivationRefused, &error.to_string()).await;
        }
    }
}

/// Where a freshly activated device should open its first link: the owner of its id in this node's
/// view, so a device activated on any node skips the redirect (and the second handshake) it would
/// otherwise get. When this node is the owner it gives its own advertised address and name, as any
/// other node would. `None` while the cluster has no owner for the id.
fn first_link_target(edge: &Edge, device: DeviceId) -> Option<wire::Redirect> {
    match edge.view.placement(device) {
        Placement::Here => {
            let view = edge.view.get();
            let me = view.state.members.get(&edge.view.id)?;
            Some(wire::Redirect { device_addr: me.device_addr.clone(), server_name: me.device_name() })
        }
        Placement::Elsewhere { device_addr, device_name, .. } => {
            Some(wire::Redirect { device_addr, server_name: device_name })
        }
        Placement::Nowhere => None,
    }
}

/// Sends the device to the node that owns it; the link closes after.
async fn redirect(link: &mut Link, to: wire::Redirect) {
    metrics::counter!("courier_node_link_redirects_total").increment(1);
    let redirect = frame(server_frame::Kind::Redirect(to));
    let _ = tokio::time::timeout(Duration::from_secs(1), link.send(redirect)).await;
}

/// A fresh token for a held one minted under a key that no longer mints, if the held token is this
/// device's and for that topic.
fn replacement_token(edge: &Edge, device: DeviceId, held: &wire::HeldToken) -> Option<wire::TokenUpdated> {
    let (opened, key_state) = edge.keyring.open_any(&held.token).ok()?;
    if opened.device_id != device || !opened.is_for_topic(&held.topic) || key_state == KeyState::Active {
        return None;
    }
    let token = edge.keyring.mint(device, &held.topic)?;
    metrics::counter!("courier_node_tokens_updated_total").increment(1);
    Some(wire::TokenUpdated { topic: held.topic.clone(), token })
}

/// A notification as the frame its device gets (a broadcast's is encoded once for all its subscribers).
pub(crate) fn notification_frame(n: &Notification) -> ServerFrame {
    frame(server_frame::Kind::Notification(wire::Notification {
        apns_id: n.apns_id.clone(),
        topic: n.topic.clone(),
        payload: n.payload.clone(),
        priority: n.priority,
        expiration: n.expiration,
        collapse_id: n.collapse_id.clone(),
        push_type: n.push_type.clone(),
        accepted_at_ms: n.accepted_at_ms,
        channel_id: ChannelId::from_slice(&n.channel_id).map(|id| id.to_string()).unwrap_or_default(),
    }))
}

/// The state of an authenticated link between frames.
struct LinkState<'a> {
    device: DeviceId,
    /// The registry's serial of this link: subscriptions are held by it.
    serial: u64,
    edge: &'a Edge,
    /// apns-id → when the gateway accepted it, for every notification this link carried and the device
    /// has not acked: only these acks become store and replication writes.
    inflight: HashMap<String, u64>,
    /// Notifications carried while `inflight` was full; as many unknown acks are taken as real.
    untracked: usize,
    /// Frames that cause writes: topic (un)registrations and acks for notifications never carried.
    writes: TokenBucket,
    /// App topics this link registered or unregistered (capped at the per-device topic limit).
    topics: HashSet<String>,
    /// Broadcast channels the device subscribes to (at most `MAX_CHANNELS_PER_DEVICE`).
    channels: HashMap<ChannelId, Handed>,
}

enum Next {
    Continue,
    Close,
}

/// The kept broadcast a link last handed its device on one channel.
#[derive(Default)]
struct Handed {
    apns_id: Option<Arc<str>>,
    /// Whether the device's stored subscription says so yet (else it is stored when the link ends).
    stored: bool,
}

impl LinkState<'_> {
    fn new(device: DeviceId, serial: u64, edge: &Edge) -> LinkState<'_> {
        let limits = &edge.settings.link_limits;
        LinkState {
            device,
            serial,
            edge,
            inflight: HashMap::new(),
            untracked: 0,
            writes: TokenBucket::new(f64::from(limits.write_burst), limits.write_rate, Instant::now().into_std()),
            topics: HashSet::new(),
            channels: HashMap::new(),
        }
    }

    async fn send_notification(&mut self, link: &mut Link, n: &Notification) -> bool {
        if !n.channel_id.is_empty() {
            // A broadcast is not acked: nothing was queued for this device.
        } else if self.inflight.len() < MAX_TRACKED_INFLIGHT {
            self.inflight.insert(n.apns_id.clone(), n.accepted_at_ms);
        } else {
            self.untracked += 1;
        }
        write(link, self.edge, notification_frame(n)).await.is_ok()
    }

    /// Charges one frame that causes writes; `false` (after a goodbye) when the link is over its rate.
    async fn charge(&mut self, link: &mut Link, what: &'static str) -> bool {
        if self.writes.take(Instant::now().into_std()) {
            return true;
        }
        tracing::debug!(device = %self.device, what, "device link over its write rate");
        goodbye(link, GoodbyeReason::RateLimited, &format!("too many {what} frames; reconnect with backoff")).await;
        false
    }

    /// Counts `topic`'s app among this link's topics; `false` (after a goodbye) when that is one too many.
    async fn admit_topic(&mut self, link: &mut Link, topic: &str) -> bool {
        let app = crate::topic::app_topic(topic);
        if self.topics.contains(app) {
            return true;
        }
        let max = self.edge.settings.link_limits.max_topics;
        if self.topics.len() >= max {
            too_many_topics(link, max).await;
            return false;
        }
        self.topics.insert(app.to_string());
        true
    }

    /// Whether an ack is for a notification this link carried; forgets it either way.
    fn carried(&mut self, apns_id: &str) -> Option<Option<u64>> {
        if let Some(accepted_at_ms) = self.inflight.remove(apns_id) {
            return Some(Some(accepted_at_ms));
        }
        if self.untracked > 0 {
            self.untracked -= 1;
            return Some(None);
        }
        None
    }

    async fn handle(&mut self, link: &mut Link, kind: Option<device_frame::Kind>) -> Next {
        use device_frame::Kind;
        match kind {
            Some(Kind::RegisterTopic(request)) => {
                if !courier_core::topic::valid_topic(&request.topic) {
                    goodbye(link, GoodbyeReason::BadTopic, "topic must be 1-255 printable ASCII characters").await;
                    return Next::Close;
                }
                if !self.charge(link, "RegisterTopic").await || !self.admit_topic(link, &request.topic).await {
                    return Next::Close;
                }
                let Some(token) = self.edge.keyring.mint(self.device, &request.topic) else {
                    tracing::error!("no active token key; cannot register topics");
                    goodbye(link, GoodbyeReason::Shutdown, "the node has no token key").await;
                    return Next::Close;
                };
                // Provider API hook: registering again ends an earlier unregistration.
                if let Err(error) = self.edge.registrations.register(self.device, &request.topic).await {
                    tracing::error!(%error, "clearing an unregistration failed");
                }
                let issued = wire::TokenIssued { topic: request.topic, token };
                if write(link, self.edge, frame(server_frame::Kind::TokenIssued(issued))).await.is_err() {
                    return Next::Close;
                }
            }
            Some(Kind::UnregisterTopic(request)) => {
                if !courier_core::topic::valid_topic(&request.topic) {
                    goodbye(link, GoodbyeReason::BadTopic, "topic must be 1-255 printable ASCII characters").await;
                    return Next::Close;
                }
                if !self.charge(link, "UnregisterTopic").await || !self.admit_topic(link, &request.topic).await {
                    return Next::Close;
                }
                // Provider API hook: later pushes to this topic answer 410 Unregistered (durable first).
                let at_ms = unix_millis();
                let max = self.edge.settings.link_limits.max_topics;
                match self.edge.registrations.unregister_capped(self.device, &request.topic, at_ms, max).await {
                    Ok(true) => {}
                    Ok(false) => {
                        too_many_topics(link, max).await;
                        return Next::Close;
                    }
                    Err(error) => tracing::error!(%error, "recording an unregistration failed"),
                }
                let done = wire::TopicUnregistered { topic: request.topic };
                if write(link, self.edge, frame(server_frame::Kind::TopicUnregistered(done))).await.is_err() {
                    return Next::Close;
                }
            }
            Some(Kind::Ack(ack)) => {
                let Some(accepted_at_ms) = self.carried(&ack.apns_id) else {
                    // Not carried here (a repeat, or forged): no store, replica or status write.
                    metrics::counter!("courier_node_acks_ignored_total").increment(1);
                    return if self.charge(link, "unknown Ack").await { Next::Continue } else { Next::Close };
                };
                metrics::counter!("courier_node_notifications_delivered_total").increment(1);
                if let Some(accepted_at_ms) = accepted_at_ms {
                    let latency = unix_millis().saturating_sub(accepted_at_ms) as f64 / 1000.0;
                    metrics::histogram!("courier_node_delivery_latency_seconds").record(latency);
                }
                self.edge.delivery.acked(self.device, &ack.apns_id);
            }
            Some(Kind::SubscribeChannel(request)) => {
                if !self.charge(link, "SubscribeChannel").await {
                    return Next::Close;
                }
                return self.subscribe(link, request).await;
            }
            Some(Kind::UnsubscribeChannel(request)) => {
                if !self.charge(link, "UnsubscribeChannel").await {
                    return Next::Close;
                }
                if let Some(channel) = ChannelId::parse(&request.channel_id) {
                    if self.channels.remove(&channel).is_some() {
                        self.edge.broadcasts.unsubscribe(self.device, self.serial, channel);
                    }
                    // Removed from the store even if this link did not hold it.
                    if let Err(error) = self.edge.subscriptions.remove(self.device, channel).await {
                        tracing::error!(device = %self.device, %error, "removing a stored subscription failed");
                    }
                }
                let done = wire::ChannelUnsubscribed { channel_id: request.channel_id };
                if write(link, self.edge, frame(server_frame::Kind::ChannelUnsubscribed(done))).await.is_err() {
                    return Next::Close;
                }
            }
            Some(Kind::Ping(ping)) => {
                let pong = frame(server_frame::Kind::Pong(wire::Pong { nonce: ping.nonce }));
                if write(link, self.edge, pong).await.is_err() {
                    return Next::Close;
                }
            }
            Some(Kind::Pong(_)) => {}
            Some(Kind::Goodbye(_)) => return Next::Close,
            Some(Kind::Hello(_)) | Some(Kind::Activate(_)) => {
                goodbye(link, GoodbyeReason::ProtocolViolation, "Hello and Activate are only valid first").await;
                return Next::Close;
            }
            None => {
                goodbye(link, GoodbyeReason::ProtocolViolation, "empty frame").await;
                return Next::Close;
            }
        }
        Next::Continue
    }
}

impl LinkState<'_> {
    /// Subscribes this link to a channel and answers: `ChannelSubscribed` (followed by the channel's kept
    /// broadcast when the device has not seen it), or `ChannelRefused` with the link left up.
    async fn subscribe(&mut self, link: &mut Link, request: wire::SubscribeChannel) -> Next {
        use wire::ChannelRefusal;
        let channel_id = request.channel_id;
        let refused = |reason: ChannelRefusal| {
            metrics::counter!("courier_node_channel_subscriptions_refused_total", "reason" => reason.as_str_name())
                .increment(1);
            frame(server_frame::Kind::ChannelRefused(wire::ChannelRefused {
                channel_id: channel_id.clone(),
                reason: reason as i32,
            }))
        };
        let answer = match ChannelId::parse(&channel_id) {
            None => Err(refused(ChannelRefusal::BadChannelId)),
            Some(channel)
                if !self.channels.contains_key(&channel) && self.channels.len() >= MAX_CHANNELS_PER_DEVICE =>
            {
                Err(refused(ChannelRefusal::TooManyChannels))
            }
            Some(channel) => {
                let (device, serial, now_ms) = (self.device, self.serial, unix_millis());
                let broadcasts = &self.edge.broadcasts;
                match broadcasts.subscribe(device, serial, channel, &request.last_seen, now_ms, true).await {
                    None => Err(refused(ChannelRefusal::UnknownChannel)),
                    Some((topic, kept)) => {
                        // What this link handed already is newer than what the device says it saw.
                        let handed = self.channels.get(&channel).and_then(|h| h.apns_id.clone());
                        let seen = handed.as_deref().unwrap_or(&request.last_seen).to_string();
                        match self.edge.subscriptions.save(device, channel, &seen).await {
                            Ok(()) => {
                                let entry = self.channels.entry(channel).or_default();
                                entry.stored = true;
                                Ok((channel, topic, kept.filter(|k| k.apns_id != seen)))
                            }
                            Err(error) => {
                                tracing::error!(%device, %error, "storing a subscription failed");
                                if !self.channels.contains_key(&channel) {
                                    broadcasts.unsubscribe(device, serial, channel);
                                }
                                Err(refused(ChannelRefusal::Unavailable))
                            }
                        }
                    }
                }
            }
        };
        let written = match answer {
            Err(refusal) => write(link, self.edge, refusal).await.is_ok(),
            Ok((channel, topic, kept)) => self.subscribed(link, channel, topic, kept).await,
        };
        if written { Next::Continue } else { Next::Close }
    }

    /// Tells the device it subscribes to `channel` (of app `topic`), then hands it the channel's kept
    /// broadcast if it has not had it; `false` if the link failed.
    async fn subscribed(
        &mut self,
        link: &mut Link,
        channel: ChannelId,
        topic: String,
        kept: Option<Notification>,
    ) -> bool {
        let done = wire::ChannelSubscribed { channel_id: channel.to_string(), topic };
        if write(link, self.edge, frame(server_frame::Kind::ChannelSubscribed(done))).await.is_err() {
            return false;
        }
        let Some(kept) = kept else { return true };
        if !self.send_notification(link, &kept).await {
            return false;
        }
        // Stored at once (a subscription or a link's start, not a fan-out): a quick reconnect must not
        // find the older one.
        let stored = match self.edge.subscriptions.handed(self.device, channel, &kept.apns_id).await {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(device = %self.device, %error, "storing what a device has seen failed");
                false
            }
        };
        self.channels.insert(channel, Handed { apns_id: Some(Arc::from(kept.apns_id.as_str())), stored });
        true
    }

    /// Indexes the device's stored subscriptions for this link, telling it of each (`ChannelSubscribed`,
    /// then the kept broadcast it has not had). Channels this node does not have are skipped; deleted ones'
    /// rows are removed by `forget_deleted_channels`. `false` if the link failed.
    async fn restore_subscriptions(&mut self, link: &mut Link) -> bool {
        let stored = match self.edge.subscriptions.of(self.device).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::error!(device = %self.device, %error, "reading stored subscriptions failed");
                return true;
            }
        };
        let now_ms = unix_millis();
        for (channel, last_seen) in stored.into_iter().take(MAX_CHANNELS_PER_DEVICE) {
            let broadcasts = &self.edge.broadcasts;
            let Some((topic, kept)) =
                broadcasts.subscribe(self.device, self.serial, channel, &last_seen, now_ms, false).await
            else {
                continue;
            };
            self.channels.entry(channel).or_default();
            if !self.subscribed(link, channel, topic, kept).await {
                return false;
            }
        }
        true
    }

    /// A broadcast this link wrote: a kept one is now the device's last seen on its channel.
    fn wrote_broadcast(&mut self, broadcast: &SharedBroadcast) {
        // Only a kept broadcast changes anything: a policy-0 one costs no lookup in the link's channels.
        if let Some(apns_id) = &broadcast.kept
            && let Some(handed) = self.channels.get_mut(&broadcast.channel)
        {
            *handed = Handed { apns_id: Some(apns_id.clone()), stored: false };
        }
    }

    /// Takes this link's subscriptions out of the index (they stay stored), storing the kept broadcasts
    /// the device had on it; the link has ended.
    fn end(&mut self) {
        let mut seen = Vec::new();
        for (channel, handed) in self.channels.drain() {
            self.edge.broadcasts.unsubscribe(self.device, self.serial, channel);
            if !handed.stored {
                seen.extend(handed.apns_id.map(|apns_id| (channel, apns_id)));
            }
        }
        self.edge.subscriptions.seen_later(self.device, seen);
    }
}

async fn too_many_topics(link: &mut Link, max: usize) {
    let detail = format!("a device may hold at most {max} topics; nothing was stored for this one");
    goodbye(link, GoodbyeReason::TooManyTopics, &detail).await;
}

async fn serve_device(link: &mut Link, device: DeviceId, edge: &Edge, shutdown: CancellationToken, opening: Opening) {
    let hello = match first_frame(link, opening).await {
        Some(device_frame::Kind::Hello(hello)) => hello,
        Some(_) => {
            return goodbye(link, GoodbyeReason::ProtocolViolation, "the first frame must be Hello").await;
        }
        None => return,
    };
    if edge.view.is_revoked(device) {
        return goodbye(link, GoodbyeReason::Revoked, "this device was revoked").await;
    }
    if edge.view.refuses_clone(device) {
        return goodbye(link, GoodbyeReason::ClonedIdentity, CLONE_DETAIL).await;
    }
    match edge.view.placement(device) {
        Placement::Here if !edge.view.holds_lease() => {
            return goodbye(link, GoodbyeReason::Unavailable, "this node has lost touch with the cluster").await;
        }
        Placement::Here => {}
        Placement::Elsewhere { device_addr, device_name, .. } => {
            return redirect(link, wire::Redirect { device_addr, server_name: device_name }).await;
        }
        Placement::Nowhere => return goodbye(link, GoodbyeReason::Unavailable, "the cluster is not ready").await,
    }
    let keepalive = edge.settings.negotiate_keepalive(hello.keepalive_secs);
    let idle_limit = keepalive.mul_f64(2.5);
    // Attach before reading the queue: a notification stored after this point is also handed to the link,
    // one stored before it is in the queue, so none falls between (a few may arrive twice; devices dedupe).
    // A dead socket has no peer address; it is compared as unspecified and closes at the first write.
    let peer = link.get_ref().get_ref().0.peer_addr().map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip());
    let Ok(mut attachment) = edge.registry.attach(device, peer) else {
        return goodbye(link, GoodbyeReason::ClonedIdentity, CLONE_DETAIL).await;
    };
    let mut state = LinkState::new(device, attachment.serial, edge);
    let welcome = wire::Welcome {
        device_id: device.to_string(),
        keepalive_secs: keepalive.as_secs() as u32,
        server_time_ms: unix_millis(),
    };
    tracing::debug!(%device, client = %hello.client, ?keepalive, "device link up");
    'link: {
        if write(link, edge, frame(server_frame::Kind::Welcome(welcome))).await.is_err() {
            break 'link;
        }
        for held in &hello.held_tokens {
            if let Some(fresh) = replacement_token(edge, device, held)
                && write(link, edge, frame(server_frame::Kind::TokenUpdated(fresh))).await.is_err()
            {
                break 'link;
            }
        }
        match edge.delivery.backlog(device).await {
            Ok(queued) => {
                for n in &queued {
                    if !state.send_notification(link, n).await {
                        break 'link;
                    }
                }
            }
            Err(error) => tracing::error!(%device, %error, "reading the device's queue failed"),
        }
        if !tell_missed(link, edge, device).await {
            break 'link;
        }
        if !state.restore_subscriptions(link).await {
            break 'link;
        }
        let mut last_heard = Instant::now();
        // Made once for the link's life, not once per frame: each would register with the shutdown token
        // and the timer wheel again, shared by every link on the node. The link waits on a child of the
        // node's token: polling a token locks its mutex, and the node's is shared by every link.
        let link_shutdown = shutdown.child_token();
        let cancelled = link_shutdown.cancelled();
        tokio::pin!(cancelled);
        let idle = tokio::time::sleep_until(last_heard + idle_limit);
        tokio::pin!(idle);
        loop {
            courier_device::codec::release_idle_buffers(link);
            tokio::select! {
                _ = &mut cancelled => {
                    goodbye(link, GoodbyeReason::Shutdown, "node shutting down").await;
                    break;
                }
                end = &mut attachment.close => {
                    match end.unwrap_or(LinkEnd::Goodbye(GoodbyeReason::Shutdown)) {
                        LinkEnd::Goodbye(reason) => goodbye(link, reason, "closed by the node").await,
                        LinkEnd::Redirect(to) => redirect(link, to).await,
                    }
                    break;
                }
                incoming = link.next() => match incoming {
                    None => break,
                    Some(Err(error)) => {
                        if let Some(reason) = error.goodbye_reason() {
                            tracing::debug!(%device, %error, "closing link");
                            goodbye(link, reason, &error.to_string()).await;
                        }
                        break;
                    }
                    Some(Ok(DeviceFrame { kind })) => {
                        last_heard = Instant::now();
                        if let Next::Close = state.handle(link, kind).await {
                            break;
                        }
                    }
                },
                Some(outgoing) = attachment.notifications.recv() => {
                    let written = match outgoing {
                        Outgoing::Notification(n) => state.send_notification(link, &n).await,
                        Outgoing::Broadcast(broadcast) => {
                            let written = write_encoded(link, edge, broadcast.frame.clone()).await.is_ok();
                            state.wrote_broadcast(&broadcast);
                            written
                        }
                    };
                    if !written {
                        break;
                    }
                }
                _ = &mut idle => {
                    // Frames only move `last_heard`; the timer catches up when it fires.
                    let due = last_heard + idle_limit;
                    if due > Instant::now() {
                        idle.as_mut().reset(due);
                        continue;
                    }
                    goodbye(link, GoodbyeReason::IdleTimeout, "nothing received for 2.5 keepalive intervals").await;
                    break;
                }
            }
        }
    }
    state.end();
    edge.registry.detach(device, attachment.serial);
}
